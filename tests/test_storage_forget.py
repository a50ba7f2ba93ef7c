"""Store.forget_stage: one stage is asked again, nothing else is lost."""
from __future__ import annotations

from pathlib import Path

from freeal_backend.records import Item
from freeal_backend.storage import Store


def test_forget_stage_drops_its_mark_and_answers_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite")
    store.replace_items([Item("a", "one"), Item("b", "two")])
    for stage in ("llm_r0", "llm_r1"):
        for item_id in ("a", "b"):
            store.add_annotation(stage, item_id, "pos", 0.9, {"pos": 0.9}, "pos", None)
        store.mark_stage(stage, {"asked": 2})
    store.mark_stage("slm_r1")
    store.forget_stage("llm_r1")
    assert list(store.stages()) == ["llm_r0", "slm_r1"]
    assert store.annotations("llm_r1") == {}
    assert set(store.annotations("llm_r0")) == {"a", "b"}
    store.close()
