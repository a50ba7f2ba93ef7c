"""docker-compose.yml, Dockerfile, .dockerignore and scripts/make-env.sh, checked without a Docker engine.

``resolve`` loads the compose file the way the Compose specification says Docker Compose v2 does, for what this
file uses: ``.env`` and environment variables, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
``${VAR:?error}``, ``${VAR?error}`` and ``$$``; profiles (a service targeted by name adds its profiles);
``depends_on`` (a required dependency that is off is an error, an optional one is dropped). It does so for every
profile and for every ``docker compose`` command that the file's comments and the README document; what it
resolves, and the file itself, must match the Compose specification's JSON schema (the copy ``check-jsonschema``
vendors). The build context is computed by the Docker SDK's own .dockerignore matcher.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from docker.utils.build import exclude_paths
from werkzeug.serving import make_server

from freeal_backend import status as run_status
from freeal_backend.config import Settings
from freeal_backend.labelstudio.backend import ServerSettings
from freeal_backend.labelstudio.server import create_app

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
MAKE_ENV = ROOT / "scripts" / "make-env.sh"
RAW: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
PROFILES = sorted({p for svc in RAW["services"].values() for p in svc.get("profiles", [])})
SLOT_TOKENS = 4096  # a prompt with 10 demonstrations plus the answer, per llama.cpp slot
HIDDEN_FROM_IMAGE = (".git", ".venv", ".venv-ls", ".env", "models", "freeal_data", "tests", "benchmarks")
PLACEHOLDER = re.compile(r"\$(\$|\{[^}]*\}|[A-Za-z_]\w*)")
EXPANSION = re.compile(r"([A-Za-z_]\w*)(?:(:?[-?])([^$]*))?")  # NAME, NAME:-default, NAME?error, ...


class ComposeError(Exception):
    """What ``docker compose`` stops with before it starts anything."""


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .env written by scripts/make-env.sh, as a user's first step writes it."""
    path = tmp_path_factory.mktemp("compose") / ".env"
    subprocess.run(["sh", str(MAKE_ENV), str(path)], check=True, capture_output=True)
    return path


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of a .env file (blank lines and ``#`` comments skipped, one pair of quotes removed)."""
    values = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith("#"):
            value = value.strip()
            quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
            values[name.strip()] = value[1:-1] if quoted else value
    return values


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """``value`` with every ``$`` placeholder in its strings replaced, as Compose does before anything else."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def expand(found: re.Match[str]) -> str:
        if found.group(1) == "$":
            return "$"
        form = EXPANSION.fullmatch(found.group(1).strip("{}"))
        if form is None:
            raise ComposeError(f"this test does not know the interpolation {found.group(0)}")
        name, operator, argument = form.groups()
        current = variables.get(name)
        missing = current is None or (current == "" and (operator or "").startswith(":"))
        if operator and operator.endswith("?") and missing:
            raise ComposeError(f"required variable {name} is missing a value: {argument}")
        if operator and operator.endswith("-") and missing:
            return argument
        return current or ""  # an unset ${VAR} is empty (Compose warns)

    return PLACEHOLDER.sub(expand, value)


def dependencies(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``depends_on`` in its long form (the short list means ``service_started``, required)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        deps = {name: {"condition": "service_started"} for name in deps}
    return {name: {"required": True, **spec} for name, spec in deps.items()}


def resolve(env_file: Path, profiles: Sequence[str], services: Sequence[str] = (),
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """The project Compose loads for ``--env-file ENV_FILE --profile P... config SERVICE...`` with ``env`` as the
    shell's environment; raises ComposeError where Compose refuses to load it."""
    variables = {**read_env_file(env_file), **(env or {})}
    project = interpolate(RAW, variables)
    defined: dict[str, Any] = project["services"]
    active = set(profiles or [p for p in variables.get("COMPOSE_PROFILES", "").split(",") if p])
    for name in services:  # a service named on the command line runs whatever its profiles
        active |= set(defined[name].get("profiles") or [])
    enabled = {name for name, svc in defined.items() if not svc.get("profiles") or active & set(svc["profiles"])}
    for name in enabled:
        for dep, spec in dependencies(defined[name]).items():
            if dep not in defined:
                raise ComposeError(f"{name} depends on undefined service {dep}")
            if dep not in enabled and spec["required"]:
                raise ComposeError(f"{name} depends on disabled {dep}")
    selected, todo = set(), list(services or enabled)
    while todo:  # the named services and, transitively, the dependencies that are enabled
        name = todo.pop()
        if name not in selected:
            selected.add(name)
            todo += [dep for dep in dependencies(defined[name]) if dep in enabled]
    for svc in defined.values():
        environment = svc.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) if "=" in item else (item, None) for item in environment)
        svc["environment"] = {k: v if v is None or isinstance(v, str) else str(v) for k, v in environment.items()}
    project["services"] = {name: svc for name, svc in defined.items() if name in selected}
    return project


def published_ports(service: dict[str, Any]) -> set[int]:
    """The host ports of ``ports`` (short ``HOST:CONTAINER`` or long syntax)."""
    return {int(p["published"]) if isinstance(p, dict) else int(str(p).rsplit(":", 2)[-2])
            for p in service.get("ports") or [] if isinstance(p, dict) or ":" in str(p)}


def schema_errors(path: Path) -> str | None:
    """check-jsonschema's report when ``path`` does not match the Compose specification, else None."""
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=120)
    return None if done.returncode == 0 else done.stdout + done.stderr


def llm_args(service: dict[str, Any]) -> dict[str, str]:
    """The llama.cpp server's ``--flag value`` options."""
    cmd = service["command"]
    return {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("-")}


def healthcheck_port(service: dict[str, Any]) -> int | None:
    test = " ".join((service.get("healthcheck") or {}).get("test") or [])
    found = re.search(r"https?://[^/:\s]+:(\d+)/", test)
    return int(found.group(1)) if found else None


def problems(project: dict[str, Any]) -> list[str]:
    """What would break at run time in a resolved project (empty when nothing)."""
    services: dict[str, Any] = project["services"]
    env = {name: svc.get("environment") or {} for name, svc in services.items()}
    built = [name for name, svc in services.items() if "build" in svc]
    workers = [name for name in built if services[name].get("command") == ["freeal", "worker"]]
    backends = [name for name in built if name not in workers]
    out = []
    for name in built:
        queue = env[name].get("FREEAL_QUEUE") or ""
        if name in workers and not queue:
            out.append(f"{name}: FREEAL_QUEUE is empty, so the worker exits")
        host = urlsplit(queue).hostname
        if host in RAW["services"] and host not in services:
            out.append(f"{name}: FREEAL_QUEUE={queue} but service {host} is not started")
    for backend in backends:
        for worker in workers:
            if env[backend].get("FREEAL_QUEUE") != env[worker].get("FREEAL_QUEUE"):
                out.append(f"{backend} and {worker} use different queues ({env[backend].get('FREEAL_QUEUE')!r} "
                           f"vs {env[worker].get('FREEAL_QUEUE')!r}): the workers never get a job")
        base, model = env[backend].get("LLM_BASE_URL") or "", env[backend].get("LLM_MODEL") or ""
        if not base and model:
            out.append(f"{backend}: LLM_MODEL={model} with the embedded LLM overrides freeal's own default model")
        url = urlsplit(base)
        if url.hostname in RAW["services"]:
            server = services.get(url.hostname)
            if server is None:
                out.append(f"{backend}: LLM_BASE_URL={base} but service {url.hostname} is not started")
            else:
                port = int(llm_args(server).get("--port", 8080))  # llama-server's default port
                if url.port != port or healthcheck_port(server) != port:
                    out.append(f"{backend}: LLM_BASE_URL port {url.port}, {url.hostname} serves on {port}, "
                               f"its healthcheck asks {healthcheck_port(server)}")
                if model != llm_args(server).get("--alias"):
                    out.append(f"{backend}: LLM_MODEL={model!r} is not the server's --alias")
        if "label-studio" in services:
            ls_env = env["label-studio"]
            if env[backend].get("LABEL_STUDIO_API_KEY") != ls_env.get("LABEL_STUDIO_USER_TOKEN"):
                out.append(f"{backend}: LABEL_STUDIO_API_KEY is not Label Studio's LABEL_STUDIO_USER_TOKEN")
            if urlsplit(env[backend].get("LABEL_STUDIO_PUBLIC_URL") or "").port not in \
                    published_ports(services["label-studio"]):
                out.append(f"{backend}: LABEL_STUDIO_PUBLIC_URL is not on a port Label Studio publishes")
        if not (env[backend].get("BASIC_AUTH_USER") and env[backend].get("BASIC_AUTH_PASS")):
            out.append(f"{backend}: no basic auth")
        if "llm" in services and urlsplit(base).hostname != "llm":
            out.append(f"{backend}: the llm server runs but {backend} does not use it (LLM_BASE_URL={base!r})")
    return out


# every profile ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profiles", [[]] + [[p] for p in PROFILES] + [PROFILES], ids=lambda p: "+".join(p) or "none")
def test_every_profile_loads_and_matches_the_compose_spec(profiles: list[str], env_file: Path,
                                                          tmp_path: Path) -> None:
    """Every service the profiles enable finds its required dependencies enabled, and the result is valid."""
    project = resolve(env_file, profiles)
    (tmp_path / "resolved.json").write_text(json.dumps(project))
    assert schema_errors(tmp_path / "resolved.json") is None


def test_the_file_itself_matches_the_compose_spec() -> None:
    assert schema_errors(COMPOSE_FILE) is None


# every documented command ---------------------------------------------------------------------------------------
def documented_commands() -> list[str]:
    """``[VAR=value ...] docker compose ...`` from the compose file's comments and from the README."""
    comments = "\n".join(line.split("#", 1)[1] for line in COMPOSE_FILE.read_text().splitlines() if "#" in line)
    found = re.findall(r"(?:[A-Z][A-Z0-9_]*=\S+\s+)*docker compose\s[^#`\n]*",
                       comments + "\n" + (ROOT / "README.md").read_text())
    return sorted({cmd.strip().rstrip(".,;:)") for cmd in found})


def test_the_docs_show_the_profile_commands() -> None:
    commands = documented_commands()
    for profile in PROFILES:
        assert any(f"--profile {profile}" in cmd for cmd in commands), f"no documented command for {profile}"


@pytest.mark.parametrize("command", documented_commands())
def test_documented_command_works(command: str, env_file: Path) -> None:
    """The command's environment, profiles and services load, and nothing in what they start is left dangling."""
    words = shlex.split(command)
    env = {}
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    words = words[2:]  # docker compose
    profiles = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--profile"]
    scaled = [words[i + 1].split("=")[0] for i, word in enumerate(words[:-1]) if word == "--scale"]
    # the services named after the subcommand (not the values of --profile or --scale)
    services = [w for i, w in enumerate(words) if w in RAW["services"] and words[i - 1] not in ("--profile", "--scale")]
    project = resolve(env_file, profiles, services, env)
    assert set(scaled) <= set(project["services"]), f"--scale names a service that is not started: {scaled}"
    assert problems(project) == []


@pytest.mark.parametrize("choices", [
    {"COMPOSE_PROFILES": "scale", "FREEAL_QUEUE": "redis://redis:6379/0"},  # the compose file's header
    {"COMPOSE_PROFILES": "llm", "LLM_BASE_URL": "http://llm:8080/v1", "LLM_MODEL": "local"},  # the README
], ids=lambda choices: choices["COMPOSE_PROFILES"])
def test_profile_choices_in_env_file_stick(choices: dict[str, str], env_file: Path, tmp_path: Path) -> None:
    """A plain ``docker compose up -d`` on a .env that holds the documented profile choices runs that profile."""
    path = tmp_path / ".env"
    path.write_text(env_file.read_text() + "".join(f"{name}={value}\n" for name, value in choices.items()))
    project = resolve(path, [])
    assert {name for name, svc in RAW["services"].items() if choices["COMPOSE_PROFILES"] in svc.get("profiles", [])} \
        <= set(project["services"])
    assert problems(project) == []


# single parts ---------------------------------------------------------------------------------------------------
def test_one_image_for_the_services_built_here(env_file: Path) -> None:
    project = resolve(env_file, PROFILES)
    built = {name: svc.get("image") for name, svc in project["services"].items() if "build" in svc}
    assert set(built) == {"freeal", "worker", "worker-gpu"}
    assert len(set(built.values())) == 1 and None not in built.values(), built


def test_llm_slots_fit_a_prompt_with_ten_demonstrations(env_file: Path) -> None:
    llm = resolve(env_file, ["llm"])["services"]["llm"]
    args = llm_args(llm)
    assert int(args["--ctx-size"]) // int(args.get("--parallel", 1)) >= SLOT_TOKENS
    assert healthcheck_port(llm) == int(args.get("--port", 8080)) == 8080  # the image's own healthcheck port


def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path, env_file: Path) -> None:
    """No .env: Compose stops and names the script; a .env without the basic auth pair is refused too."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    with pytest.raises(ComposeError, match="scripts/make-env.sh"):
        resolve(empty, [])
    no_auth = tmp_path / "no-auth.env"
    no_auth.write_text("".join(line + "\n" for line in env_file.read_text().splitlines()
                               if not line.startswith("BASIC_AUTH_")))
    with pytest.raises(ComposeError, match="BASIC_AUTH_"):
        resolve(no_auth, [])


def test_make_env_writes_the_secrets_once(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("LABEL_STUDIO_USER_TOKEN=the-token-label-studio-already-has")  # no final newline
    subprocess.run(["sh", str(MAKE_ENV), str(path)], check=True, capture_output=True)
    first = path.read_text()
    values = dict(line.split("=", 1) for line in first.splitlines())
    assert values["LABEL_STUDIO_USER_TOKEN"] == "the-token-label-studio-already-has"
    required = set(re.findall(r"\$\{([A-Z_]+):?\?", COMPOSE_FILE.read_text()))
    assert required <= {name for name, value in values.items() if value}, required - set(values)
    assert values["BASIC_AUTH_PASS"] != values["LABEL_STUDIO_PASSWORD"] and len(values["BASIC_AUTH_PASS"]) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    subprocess.run(["sh", str(MAKE_ENV), str(path)], check=True, capture_output=True)
    assert path.read_text() == first  # a second run changes nothing


def test_docs_put_the_basic_auth_pair_in_the_model_url(tmp_path: Path) -> None:
    """Label Studio 1.23's "Use basic auth" model switch leaves out the /webhook it adds for the model, so the
    compose file, the script's closing hint and the README all give the pair inside the Connect Model URL."""
    hint = subprocess.run(["sh", str(MAKE_ENV), str(tmp_path / ".env")], check=True, capture_output=True,
                          text=True).stdout
    for where, text in {"docker-compose.yml": COMPOSE_FILE.read_text(), "scripts/make-env.sh": hint,
                        "README.md": (ROOT / "README.md").read_text()}.items():
        assert "http://<BASIC_AUTH_USER>:<BASIC_AUTH_PASS>@freeal:9090" in text, where


def test_env_file_stays_out_of_git() -> None:
    assert subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT).returncode == 0


def test_build_context_is_what_the_dockerfile_copies() -> None:
    """The context Docker sends (its .dockerignore rules, as the Docker SDK applies them): the COPY sources,
    no repository history, virtual environments, models, data or secrets."""
    ignore = ROOT / ".dockerignore"
    patterns = [line.strip() for line in (ignore.read_text().splitlines() if ignore.exists() else [])
                if line.strip() and not line.strip().startswith("#")]
    context = exclude_paths(str(ROOT), patterns)
    copied = [src for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")
              for src in line.split()[1:-1]]
    assert copied and set(copied) <= context
    assert not [p for p in context if p.split("/")[0] in HIDDEN_FROM_IMAGE or p.endswith(".pyc")]


def test_llama_cpp_is_built_for_any_cpu() -> None:
    """No -march=native by default: the image must run on CPUs other than the build machine's."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    install = next(line for line in dockerfile.splitlines() if "pip install" in line and "requirements.txt" in line)
    assert 'CMAKE_ARGS="$LLAMA_CMAKE_ARGS"' in install, install
    assert re.search(r'^ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"$', dockerfile, re.M)


def test_the_set_up_caches_a_llama_cpp_wheel_for_this_cpus_instruction_sets() -> None:
    """scripts/setup.sh caches the wheel it builds in the home folder, which may move to another machine: a
    wheel built for the building CPU (-march=native) then died with SIGILL on its first answer (seen on
    2026-12-06: every test with a real LLM failed). It is built with the instruction sets scripts/llama_build.py
    names (never -march=native or AMX: tests/test_llama_build.py), in a folder named after them (so a wheel for
    another CPU is not reused), and installed over whatever an earlier set-up put in the venv; the venv's stamp
    counts the variant, so a venv moved to another CPU is set up again."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    build = next(line for line in setup.splitlines() if "pip wheel" in line)
    folder = re.search(r'-w "(\$[A-Z_]+)"', build).group(1)
    assert f'{folder[1:]}="$WHEELS/llama-$LLAMA_VARIANT"' in setup, build
    assert 'read -r LLAMA_VARIANT LLAMA_CMAKE_ARGS < <("$PY" scripts/llama_build.py)' in setup
    build_step = setup[setup.index("CMAKE_ARGS="):setup.index("pip wheel")]
    assert 'CMAKE_ARGS="$LLAMA_CMAKE_ARGS"' in build_step
    assert "--no-cache-dir" in build, build  # pip's wheel cache ignores CMAKE_ARGS
    stamp = setup[setup.index("STAMP="):setup.index("if ! [ -f \"$STAMP\" ]")]
    assert "$LLAMA_VARIANT" in stamp and "scripts/llama_build.py" in stamp, stamp
    assert re.search(r"pip install [^\n]*--force-reinstall [^\n]*llama_cpp_python", setup)


@pytest.fixture()
def backend_with_basic_auth(tmp_path: Path) -> Iterator[int]:
    """The backend over real HTTP with basic auth on, as the shipped set-up runs it; yields its port."""
    app = create_app(Settings(slm_min_steps=0, data_dir=tmp_path / "data"),
                     ServerSettings(basic_auth_user="freeal", basic_auth_pass="s3cret", auto_job=False))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()
    thread.join(timeout=10)


def test_image_healthcheck_passes_with_basic_auth_on(backend_with_basic_auth: int) -> None:
    """The Dockerfile's HEALTHCHECK, run as Docker runs it (sh -c), knows no secret and must still pass."""
    check = re.search(r"^HEALTHCHECK .*?CMD (.+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    done = subprocess.run(["sh", "-c", check], env={**env, "PORT": str(backend_with_basic_auth)},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert subprocess.run(["sh", "-c", check], env={**env, "PORT": str(port)}, capture_output=True,
                          timeout=30).returncode != 0


def test_review_link_uses_the_public_label_studio_url(env_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In compose the backend reaches Label Studio as http://label-studio:8080, which no browser resolves."""
    freeal = resolve(env_file, [])["services"]["freeal"]["environment"]
    monkeypatch.setenv("LABEL_STUDIO_PUBLIC_URL", freeal["LABEL_STUDIO_PUBLIC_URL"])
    status = run_status.project_status(7, {"view_id": 3}, None, freeal["LABEL_STUDIO_URL"])
    assert status["review_tab"]["url"] == "http://localhost:8080/projects/7/data?tab=3"
    monkeypatch.delenv("LABEL_STUDIO_PUBLIC_URL")
    status = run_status.project_status(7, {"view_id": 3}, None, "http://ls.example:8080")
    assert status["review_tab"]["url"] == "http://ls.example:8080/projects/7/data?tab=3"
