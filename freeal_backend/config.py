"""Settings read from the environment (upper-case names, documented defaults)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def whole_number(value: Any) -> int | None:
    """A whole number from 0, given as an int or a string of digits ("2", " 2 "); None for anything else (a
    Label Studio project's ``rounds``, ``audit`` or ``max_llm_calls``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    return int(value) if isinstance(value, str) and value.strip().isdigit() else None


def unit_share(value: Any) -> float | None:
    """A number strictly between 0 and 1, given as a number or a string ("0.05"); None for anything else
    (a target error rate: ``FREEAL_TARGET_ERROR`` or a Label Studio project's ``target_error``)."""
    try:
        share = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        return None
    return share if share is not None and 0 < share < 1 else None


ENV_NAMES = {  # Settings field -> the environment variable that sets it
    "data_dir": "FREEAL_DATA_DIR", "llm_base_url": "LLM_BASE_URL", "llm_model": "LLM_MODEL",
    "llm_concurrency": "LLM_CONCURRENCY", "llm_timeout": "LLM_TIMEOUT",
    "llm_max_retries": "LLM_MAX_RETRIES", "llm_logprobs": "LLM_LOGPROBS", "llm_threads": "LLM_THREADS",
    "llm_max_tokens": "LLM_MAX_TOKENS", "llm_no_think": "LLM_NO_THINK",
    "shots": "FREEAL_SHOTS", "demos_per_label": "FREEAL_DEMOS_PER_LABEL",
    "demo_pool_size": "FREEAL_DEMO_POOL", "rounds": "FREEAL_ROUNDS", "encoder": "FREEAL_ENCODER",
    "max_length": "FREEAL_MAX_LENGTH", "max_chars": "FREEAL_MAX_CHARS",
    "slm_epochs": "FREEAL_SLM_EPOCHS", "slm_min_steps": "FREEAL_SLM_MIN_STEPS",
    "slm_warmup_epochs": "FREEAL_SLM_WARMUP",
    "slm_folds": "FREEAL_SLM_FOLDS", "slm_robust": "FREEAL_SLM_ROBUST", "refine_share": "FREEAL_REFINE_SHARE",
    "set_aside_less_sure": "FREEAL_SET_ASIDE_LESS_SURE",
    "slm_train_layers": "FREEAL_SLM_TRAIN_LAYERS", "slm_lr": "FREEAL_SLM_LR",
    "slm_batch_size": "FREEAL_SLM_BATCH", "torch_threads": "FREEAL_TORCH_THREADS",
    "clean_threshold": "FREEAL_CLEAN_THRESHOLD",
    "select_ratio": "FREEAL_SELECT_RATIO", "seed": "FREEAL_SEED", "task_description": "FREEAL_TASK",
    "queue_url": "FREEAL_QUEUE", "queue_lock_ttl": "FREEAL_QUEUE_LOCK_TTL", "max_jobs": "FREEAL_MAX_JOBS",
    "max_llm_calls": "FREEAL_MAX_LLM_CALLS",
    "push_every_round_max_tasks": "FREEAL_PUSH_EVERY_ROUND_MAX", "keep_old_versions": "FREEAL_KEEP_OLD_VERSIONS",
    "target_error": "FREEAL_TARGET_ERROR", "target_confidence": "FREEAL_TARGET_CONFIDENCE",
    "audit_size": "FREEAL_AUDIT", "llm_calibrated": "FREEAL_LLM_CALIBRATED", "second_judge": "FREEAL_SECOND_JUDGE",
}


@dataclass(frozen=True)
class Settings:
    """Every knob of freeal, with the environment variable that sets it.

    LLM_BASE_URL empty means: start the embedded offline model LLM_MODEL (llm/embedded.py) on 127.0.0.1.
    """

    data_dir: Path = Path("./freeal_data")  # FREEAL_DATA_DIR: all state, caches and models live here
    llm_base_url: str | None = None  # LLM_BASE_URL, e.g. https://api.openai.com/v1 or http://vllm:8000/v1
    llm_model: str = "qwen2.5-coder-1.5b-instruct"  # LLM_MODEL; without LLM_BASE_URL: an embedded model's name
    llm_api_key: str | None = field(default=None, repr=False)  # LLM_API_KEY or OPENAI_API_KEY
    llm_concurrency: int = 4  # LLM_CONCURRENCY: requests in flight at once
    llm_timeout: float = 60.0  # LLM_TIMEOUT seconds per request
    llm_max_retries: int = 5  # LLM_MAX_RETRIES on 429/5xx/timeouts/connection errors
    llm_logprobs: bool = True  # LLM_LOGPROBS: ask for token logprobs (confidence); off for endpoints that reject it
    llm_threads: int = 2  # LLM_THREADS: CPU threads of the embedded server
    llm_max_tokens: int = 16  # LLM_MAX_TOKENS per label answer (raise it for models that think before answering)
    llm_no_think: bool = False  # LLM_NO_THINK: send chat_template_kwargs.enable_thinking=false (vLLM, SGLang)
    shots: int | None = None  # FREEAL_SHOTS: demos per prompt (k); default 10, or 4 with the embedded LLM
    demos_per_label: int | None = None  # FREEAL_DEMOS_PER_LABEL: self-generated demos per label in round 0;
    #   default: enough for a pool of 3 x shots (at least 6 per label), so retrieving k of them matters
    demo_pool_size: int = 40  # FREEAL_DEMO_POOL: diverse (k-means) demo pool size over all classes (feedback)
    refine_share: float = 1.0  # FREEAL_REFINE_SHARE: share of the texts outside the clean pool re-asked per
    #   round, unanswered then lowest-scored first (1.0 = all, as in the paper; lower it to pay for fewer calls)
    set_aside_less_sure: bool = False  # FREEAL_SET_ASIDE_LESS_SURE: set a refinement aside when the LLM is less
    #   sure of the answers it changed than of those they replace (off: the paper keeps every refinement; on 14
    #   live runs the rule fired 4 times, rightly twice: +3.4 and +1.8 points, wrongly twice: -6.3 and -0.6)
    rounds: int = 2  # FREEAL_ROUNDS
    encoder: str | None = None  # FREEAL_ENCODER: local Hugging Face model dir; empty = packaged all-MiniLM-L6-v2
    second_judge: str | None = None  # FREEAL_SECOND_JUDGE: a frozen encoder (as FREEAL_ENCODER: a packaged one's name,
    #   e.g. all-mpnet-base-v2, or a directory) whose probe ranks beside the small model (slm/second_judge.py); empty:
    #   off. Classes only
    max_length: int = 128  # FREEAL_MAX_LENGTH tokens per text for the SLM
    max_chars: int = 4000  # FREEAL_MAX_CHARS: longer texts are truncated (with a warning)
    slm_epochs: int = 2  # FREEAL_SLM_EPOCHS per fold model (best epoch on an inner split of its training folds)
    slm_min_steps: int = 50  # FREEAL_SLM_MIN_STEPS: at least this many optimiser steps per fold model: more epochs
    #   on a small project, where 2 epochs are a handful of steps and left the judge near chance (SST-2, 200 texts:
    #   54-57 % right; 50 steps: 78 %, 100: 79.5 % at twice the time); a few thousand texts reach it within the epochs
    slm_warmup_epochs: int = 1  # FREEAL_SLM_WARMUP: plain cross-entropy epochs before the small-loss split
    slm_folds: int = 3  # FREEAL_SLM_FOLDS: cross-fitting folds (each label judged by a model that never saw it)
    slm_robust: bool = False  # FREEAL_SLM_ROBUST: the paper's robust training (GMM split, mixup, consistency);
    #   off by default: on the MR replay plain cross-entropy judged the labels better, and faster (README)
    slm_train_layers: int = 4  # FREEAL_SLM_TRAIN_LAYERS: top encoder layers fine-tuned (rest frozen, cached)
    slm_lr: float = 1e-4  # FREEAL_SLM_LR
    slm_batch_size: int = 32  # FREEAL_SLM_BATCH
    torch_threads: int | None = None  # FREEAL_TORCH_THREADS: CPU threads for the SLM (default: torch's own)
    clean_threshold: float = 0.7  # FREEAL_CLEAN_THRESHOLD: GMM posterior of the low-loss component
    select_ratio: float = 0.2  # FREEAL_SELECT_RATIO: rho_sel, top share of the clean agreed pool per class
    seed: int = 0  # FREEAL_SEED
    task_description: str | None = None  # FREEAL_TASK: one line telling the LLM what the labels mean
    queue_url: str | None = None  # FREEAL_QUEUE: redis://host:6379/0 = jobs go to `freeal worker`s; empty = a thread
    queue_lock_ttl: float = 60.0  # FREEAL_QUEUE_LOCK_TTL: a killed worker's job is resumed this long after
    max_jobs: int = 1  # FREEAL_MAX_JOBS: project jobs one backend process runs at a time without FREEAL_QUEUE (the
    #   rest wait their turn, queued); with FREEAL_QUEUE the number of workers bounds them
    max_llm_calls: int | None = None  # FREEAL_MAX_LLM_CALLS, e.g. 5000: LLM requests one job (or one `freeal run`)
    #   may send; answers from the cache are free; what it could not ask stays for the next job; empty = no limit
    push_every_round_max_tasks: int = 10000  # FREEAL_PUSH_EVERY_ROUND_MAX: projects with at most this many tasks
    #   get each round's predictions in Label Studio as the round ends; bigger ones only the final round's, as
    #   Label Studio deletes a replaced version one prediction at a time (~30-40/s: ~1 h per 100k)
    keep_old_versions: bool = False  # FREEAL_KEEP_OLD_VERSIONS: leave replaced versions in Label Studio (hidden:
    #   not selected) instead of deleting them; while Label Studio deletes a version, people's saves wait for it
    target_error: float | None = None  # FREEAL_TARGET_ERROR, e.g. 0.05: review set = fewest least-confident texts
    #   whose review brings the estimated error of all labels to this or below (slm/budget.py); empty = off
    target_confidence: float | None = None  # FREEAL_TARGET_CONFIDENCE, e.g. 0.9: the review set meets the target
    #   error with this confidence (one-sided; chance and the scores' calibration offset, slm/budget.py), not
    #   only in expectation; empty = in expectation
    llm_calibrated: bool | None = None  # FREEAL_LLM_CALIBRATED: the LLM's logprob confidence is calibrated, so its
    #   mean sets the level of the scores and of run health (up as well as down); empty = on for an embedded model
    #   measured so (the 1.5B), off for an endpoint: then the lower of its figure and the small model's counts
    audit_size: int = 0  # FREEAL_AUDIT, e.g. 50: tasks drawn at random for people to label blind (their labels
    #   measure the run and teach it nothing); from 20 labelled on, run health and the scores' level are the
    #   audit's (slm/audit.py); 0 = no audit

    def __post_init__(self) -> None:
        if self.target_error is not None and unit_share(self.target_error) is None:  # also refuses NaN
            raise ValueError(f"FREEAL_TARGET_ERROR must lie strictly between 0 and 1 (e.g. 0.05 for at most 5 % "
                             f"wrong labels), got {self.target_error!r}")
        if self.target_confidence is not None and unit_share(self.target_confidence) is None:
            raise ValueError(f"FREEAL_TARGET_CONFIDENCE must lie strictly between 0 and 1 (e.g. 0.9: the review "
                             f"set meets the target error with 90 % confidence), got {self.target_confidence!r}")
        if self.max_llm_calls is not None and self.max_llm_calls < 1:
            raise ValueError(f"FREEAL_MAX_LLM_CALLS is a number of LLM requests per job (at least 1; empty = no "
                             f"limit), got {self.max_llm_calls!r}")
        if self.audit_size < 0:
            raise ValueError(f"FREEAL_AUDIT is a number of tasks (0 = no audit), got {self.audit_size!r}")

    @classmethod
    def from_env(cls, **overrides: Any) -> "Settings":
        """Build settings from environment variables; keyword overrides win."""
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, var in ENV_NAMES.items():
            raw = _env(var)
            if raw is not None:
                values[name] = _coerce(types[name], raw, var)
        key = _env("LLM_API_KEY") or _env("OPENAI_API_KEY")
        if key:
            values["llm_api_key"] = key
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])
        return cls(**values)

    def with_(self, **changes: Any) -> "Settings":
        """A copy with some fields changed (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _coerce(type_name: Any, raw: str, var: str) -> Any:
    text = str(type_name)
    try:
        if "bool" in text:
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if "int" in text:
            return int(raw)
        if "float" in text:
            return float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {var}={raw!r} is not a valid {text}") from exc
    return raw
