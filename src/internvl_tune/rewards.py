"""Rewards of online RL, as data: named terms with weights, every one graded by `judge.py` (the one judge of
sampling, pairs, evaluation and rewards) or written by the user.

A run names its terms and their weights (`rl.rewards`, `rl.reward_weights`); a response's reward is the weighted
sum, and each term is also logged on its own. The terms:

- `accuracy`: 1 when the response's final answer (extracted by the prompt version the data was asked with,
  `judge.extract_answer`) is correct against the record's `answer` (`judge.judge`, the scorers of the record's
  `source`), else 0. Gated on a parseable answer: an answer the judge cannot find scores 0, never a partial match
  of the whole response.
- `format`: 1 when the response has the form its prompt version asks for (the judge finds its answer: for `en_r1`,
  one `<think>...</think>` of more than 20 characters, then a boxed answer), else 0. InternVL3.5's geometry-style
  reward is `[accuracy, format]` weighted `[0.9, 0.1]`.
- `repetition`: minus the share of the response's word 4-grams that repeat an earlier one (0 for a response without
  repeats, towards -1 for a loop).
- `length`: DAPO's overlong penalty: 0 up to `max_new_tokens - length_buffer` tokens, then falling linearly to -1 at
  `max_new_tokens` (a response that hit the limit was cut).
- `module:function`: a user's reward, imported by name; called as `function(response: str, record: dict) -> float`,
  where `record` is the prompt's data record (its `answer`, `source` and any other field). Example::

      # my_rewards.py
      def short(response, record):
          return 1.0 if len(response.split()) <= 20 else 0.0

      rl: {rewards: [accuracy, my_rewards:short], reward_weights: [1.0, 0.2]}
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from internvl_tune.errors import UserError
from internvl_tune.judge import extract_answer, judge, scorers_for

BUILTIN_REWARDS = ("accuracy", "format", "repetition", "length")
REPETITION_NGRAM = 4

UserReward = Callable[[str, dict[str, Any]], float]


@dataclass(frozen=True)
class RewardSpec:
    """The reward of a run: term names, their weights, and what the built-in terms need."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    prompt_version: str = "direct"  # how the data's questions were asked: where the judge finds the answer
    max_new_tokens: int = 1024
    length_buffer: int = 256

    def __post_init__(self) -> None:
        if not self.names or len(self.names) != len(self.weights):
            raise UserError(
                f"rl.rewards ({len(self.names)} terms) and rl.reward_weights ({len(self.weights)}) must be as long "
                "as each other, and not empty"
            )
        for name in self.names:
            if name not in BUILTIN_REWARDS and ":" not in name:
                raise UserError(
                    f"unknown reward {name!r}: use {', '.join(BUILTIN_REWARDS)} or a user reward as module:function"
                )


def load_user_reward(name: str) -> UserReward:
    """The function `module:function` names, imported (the module from the Python path, e.g. the run's folder).

    Raises:
        UserError: the module cannot be imported or has no such callable.
    """
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"reward {name!r}: cannot import {module_name!r} ({e})") from e
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"reward {name!r}: {module_name} has no function {function_name!r}")
    return function


class Rewards:
    """Scores responses by a `RewardSpec`: `terms` per term, `total` weighted."""

    def __init__(self, spec: RewardSpec):
        self.spec = spec
        self.user = {name: load_user_reward(name) for name in spec.names if ":" in name}

    def terms(self, response: str, num_tokens: int, record: dict[str, Any]) -> dict[str, float]:
        """Each term's value for one response (`num_tokens`: its length in tokens, the stop token included)."""
        values = {}
        for name in self.spec.names:
            if name == "accuracy":
                values[name] = self.accuracy(response, record)
            elif name == "format":
                values[name] = float(extract_answer(response, self.spec.prompt_version) is not None)
            elif name == "repetition":
                values[name] = -repeated_ngram_share(response)
            elif name == "length":
                values[name] = overlong_penalty(num_tokens, self.spec.max_new_tokens, self.spec.length_buffer)
            else:
                values[name] = float(self.user[name](response, record))
        return values

    def total(self, terms: dict[str, float]) -> float:
        return sum(w * terms[name] for name, w in zip(self.spec.names, self.spec.weights, strict=True))

    def accuracy(self, response: str, record: dict[str, Any]) -> float:
        if "answer" not in record:
            raise UserError("the accuracy reward needs an 'answer' in every prompt record")
        result = judge(response, str(record["answer"]), self.spec.prompt_version, scorers_for(record.get("source", "")))
        return float(result.answer is not None and result.correct)


def repeated_ngram_share(text: str, n: int = REPETITION_NGRAM) -> float:
    """The share of `text`'s word n-grams that already appeared earlier in it (0 for fewer than n + 1 words).

    Example: "a b c d a b c d" has 5 4-grams, of which "a b c d" repeats once: 0.2.
    """
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


def overlong_penalty(num_tokens: int, max_new_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong penalty: 0 up to `max_new_tokens - buffer` tokens, -1 at `max_new_tokens`, linear between.

    Example: max 100, buffer 20: 80 tokens -> 0, 90 -> -0.5, 100 -> -1.
    """
    if buffer <= 0:
        return -1.0 if num_tokens >= max_new_tokens else 0.0
    start = max_new_tokens - buffer
    if num_tokens <= start:
        return 0.0
    return -min(1.0, (num_tokens - start) / buffer)


def score_group(
    rewards: Rewards, responses: Sequence[str], lengths: Sequence[int], record: dict[str, Any]
) -> tuple[list[float], list[dict[str, float]]]:
    """Totals and terms of a prompt's responses."""
    terms = [rewards.terms(text, n, record) for text, n in zip(responses, lengths, strict=True)]
    return [rewards.total(t) for t in terms], terms
