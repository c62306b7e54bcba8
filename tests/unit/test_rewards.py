"""Rewards as data (rewards.py): each term by hand, the weighted total, user rewards and their errors."""

from __future__ import annotations

import sys

import pytest

from internvl_tune.errors import UserError
from internvl_tune.rewards import Rewards, RewardSpec, overlong_penalty, repeated_ngram_share, score_group

THOUGHT = "<think>\nThe triangle has sides 3 and 4, so the hypotenuse is 5.\n</think>\n"


def test_accuracy_and_format_as_internvl3_5_geometry_reward():
    """0.9 x accuracy + 0.1 x format, r1 prompts: a correct boxed answer after a thought scores 1; a wrong one
    0.1 (format only); a right number without the thought is unparseable under r1, so 0 for both (gated)."""
    rewards = Rewards(RewardSpec(("accuracy", "format"), (0.9, 0.1), prompt_version="en_r1"))
    record = {"answer": "5", "source": "geometry"}
    totals, terms = score_group(
        rewards,
        [THOUGHT + "So \\boxed{5}.", THOUGHT + "So \\boxed{7}.", "The answer is \\boxed{5}."],
        [40, 40, 9],
        record,
    )
    assert totals == pytest.approx([1.0, 0.1, 0.0])
    assert terms[1] == {"accuracy": 0.0, "format": 1.0}


def test_repetition_and_length_by_hand():
    assert repeated_ngram_share("a b c d a b c d") == pytest.approx(1 / 5)  # 5 4-grams, "a b c d" once more
    assert repeated_ngram_share("one two three") == 0.0
    assert [overlong_penalty(n, 100, 20) for n in (80, 90, 100)] == [0.0, -0.5, -1.0]
    assert overlong_penalty(100, 100, 0) == -1.0 and overlong_penalty(99, 100, 0) == 0.0
    rewards = Rewards(RewardSpec(("repetition", "length"), (1.0, 0.5), max_new_tokens=100, length_buffer=20))
    terms = rewards.terms("a b c d a b c d", 90, {})
    assert terms == pytest.approx({"repetition": -0.2, "length": -0.5}) and rewards.total(terms) == pytest.approx(-0.45)


def test_a_user_reward_by_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def short(response, record):\n    return float(len(response) < 5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = Rewards(RewardSpec(("accuracy", "my_rewards:short"), (1.0, 0.5)))
    assert rewards.total(rewards.terms("red", 2, {"answer": "red"})) == pytest.approx(1.5)
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize(
    "names, weights, message",
    [
        (("accuracy",), (1.0, 2.0), "as long as each other"),
        (("accurate",), (1.0,), "unknown reward 'accurate'"),
        (("no_such_module:f",), (1.0,), "cannot import 'no_such_module'"),
        (("internvl_tune.judge:nothing",), (1.0,), "has no function 'nothing'"),
    ],
)
def test_reward_mistakes_are_one_line(names, weights, message):
    with pytest.raises(UserError, match=message):
        Rewards(RewardSpec(names, weights))


def test_accuracy_needs_the_records_answer():
    with pytest.raises(UserError, match="needs an 'answer'"):
        Rewards(RewardSpec(("accuracy",), (1.0,))).terms("red", 1, {})
