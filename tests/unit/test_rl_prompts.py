"""The RL prompt order (preference_data/rl_prompts.py): ranks split each step's prompts, a step's prompts depend only
on the step (resume), epochs follow each other, and a bad line names its file:line when drawn."""

from __future__ import annotations

import json

import pytest
from conftest import draw_image, write_jsonl

from internvl_tune.data.errors import DataError
from internvl_tune.preference_data.rl_prompts import PromptSet


@pytest.fixture
def meta(tmp_path):
    draw_image(tmp_path / "a.png", (56, 56), "red")
    write_jsonl(tmp_path / "p.jsonl", [{"image": "a.png", "question": f"q{i}?", "answer": str(i)} for i in range(5)])
    write_jsonl(tmp_path / "t.jsonl", [{"question": f"t{i}?", "answer": "x"} for i in range(2)])
    entries = {
        "p": {"root": str(tmp_path), "annotation": str(tmp_path / "p.jsonl"), "repeat_time": 1},
        "t": {"root": str(tmp_path), "annotation": str(tmp_path / "t.jsonl"), "repeat_time": 1.5},
    }
    (tmp_path / "meta.json").write_text(json.dumps(entries))
    return tmp_path / "meta.json"


def test_ranks_split_each_step_and_steps_cross_epochs(meta):
    prompts = PromptSet(meta, seed=3)
    assert len(prompts) == 5 + 3  # t repeated 1.5 times
    one = [[p.where for p in prompts.for_step(s, 4)] for s in range(5)]  # 20 prompts: 2.5 epochs
    two = [[p.where for r in (0, 1) for p in prompts.for_step(s, 4, r, 2)] for s in range(5)]
    assert [sorted(a) for a in one] == [sorted(b) for b in two]
    first_epoch = one[0] + one[1]
    assert sorted(first_epoch) == sorted(p.where for p in prompts.for_step(0, 8))  # every line once per epoch
    assert len(set(first_epoch)) == 7  # t's extra half repeats one of its 2 lines
    assert [p.where for p in PromptSet(meta, seed=3).for_step(3, 4)] == one[3]  # a resumed run draws the same
    assert [p.where for p in PromptSet(meta, seed=4).for_step(0, 8)] != first_epoch


def test_a_bad_line_names_its_place(meta, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"image": "missing.png", "question": "q?", "answer": "1"}])
    with pytest.raises(DataError, match="p.jsonl:1: image .*missing.png not found"):
        PromptSet(meta, seed=0).for_step(0, 4)
