"""Reward accuracy of a policy against a reference on held-out preference pairs (the DPO implicit reward)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from internvl_tune.config import DataArgs
from internvl_tune.data.collate import pair_collate
from internvl_tune.data.dataset import RecordDataset
from internvl_tune.data.images import blank_tile
from internvl_tune.data.preference import PairBuilder
from internvl_tune.data.transform import SampleBuilder
from internvl_tune.losses.preference import rewards
from internvl_tune.model.forward import InternVLTrainingForward
from internvl_tune.model.load import load_model
from internvl_tune.model.logprobs import pair_logps
from internvl_tune.model.prepare import sample_settings


@torch.no_grad()
def reward_accuracy(
    policy_dir: str | Path, reference_dir: str | Path, data: DataArgs, *, beta: float = 0.1, batch_size: int = 8
) -> dict[str, Any]:
    """Share of pairs whose chosen reward β·Δc beats the rejected reward β·Δr (strictly, as trl and the original
    count it: a policy equal to its reference scores 0), the mean margin, and the same per `question_type` when
    the records carry one."""
    policy, tokenizer = load_model(policy_dir)
    reference, _ = load_model(reference_dir)
    settings = sample_settings(data, policy.config)
    dataset = RecordDataset(
        data.meta_path, PairBuilder(SampleBuilder(tokenizer, settings)), seed=0, require_data_augment=False
    )
    collate = partial(
        pair_collate,
        pad_token_id=tokenizer.pad_token_id,
        dummy_tile=blank_tile(settings.image_size, settings.normalize_type),
    )
    forwards = [InternVLTrainingForward(m.eval()) for m in (policy, reference)]
    wins: list[bool] = []
    margins: list[float] = []
    kinds: list[str] = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="reward accuracy", unit="batch"):
        indices = range(start, min(start + batch_size, len(dataset)))
        batch = collate([dataset[i] for i in indices])
        (policy_logps, reference_logps) = (pair_logps(f, batch, "cpu") for f in forwards)
        chosen, rejected = rewards(
            policy_logps["chosen_logps"],
            policy_logps["rejected_logps"],
            reference_logps["chosen_logps"],
            reference_logps["rejected_logps"],
            beta,
        )
        wins += (chosen > rejected).tolist()
        margins += (chosen - rejected).tolist()
        kinds += [dataset.record(i)[0].get("question_type", "all") for i in indices]
    result: dict[str, Any] = {"reward_accuracy": sum(wins) / len(wins), "reward_margin": sum(margins) / len(margins)}
    for kind in sorted(set(kinds)):
        hits = [w for w, k in zip(wins, kinds, strict=True) if k == kind]
        result[f"reward_accuracy/{kind}"] = sum(hits) / len(hits)
    return result
