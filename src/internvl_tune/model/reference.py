"""The reference model of preference training, three ways (design decision 6).

- `copy`: a frozen copy of the starting model, in eval mode (no dropout / DropPath, as the original reference).
- `lora_disabled`: the policy itself with its LoRA adapters switched off (exactly the starting model, no copy).
- `precomputed`: summed log-probs of every pair computed once (`internvl-tune precompute-ref`) into a cache keyed
  by record content, data settings and a fingerprint of the reference weights; training then holds one model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from internvl_tune.model.convert import weight_files
from internvl_tune.model.forward import InternVLTrainingForward
from internvl_tune.model.logprobs import gather_logps

CACHE_VERSION = 1


def pair_logps(forward: nn.Module, batch: dict[str, Any], device) -> dict[str, torch.Tensor]:
    """Summed chosen / rejected response log-probs (and token counts) of a collated pair batch."""
    logits = forward(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        position_ids=batch["position_ids"].to(device),
        pixel_values=batch["pixel_values"].to(device),
        image_flags=batch["image_flags"].to(device),
    )
    out = {}
    for side in ("chosen", "rejected"):
        logps, num_tokens = gather_logps(
            logits, *(batch[f"{side}_{k}"].to(device) for k in ("rows", "positions", "targets", "mask"))
        )
        out[f"{side}_logps"], out[f"{side}_num_tokens"] = logps, num_tokens
    return out


class LiveReference:
    """Reference log-probs from a model run under no_grad in eval mode: a frozen copy, or the LoRA-disabled policy."""

    def __init__(self, model: nn.Module, *, disable_lora_of: nn.Module | None = None):
        self.forward = InternVLTrainingForward(model)
        self.disable_lora_of = disable_lora_of

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], device) -> tuple[torch.Tensor, torch.Tensor]:
        module = self.forward.model
        was_training = module.training
        module.eval()  # the reference never drops paths or dropout, also when it is the policy itself
        context = (
            self.disable_lora_of.disable_adapter() if self.disable_lora_of is not None else contextlib.nullcontext()
        )
        try:
            with context:
                out = pair_logps(self.forward, batch, device)
        finally:
            module.train(was_training)
        return out["chosen_logps"], out["rejected_logps"]


def frozen_copy(model: nn.Module) -> nn.Module:
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def weights_fingerprint(path: str | Path) -> str:
    """SHA-256 over a checkpoint's weight files (names and full contents), so any changed weight is noticed.

    Hashing runs at about 1-2 GB/s; a progress bar shows for checkpoints over 1 GB.
    """
    files = weight_files(Path(path))
    total = sum(f.stat().st_size for f in files)
    digest = hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc="fingerprint", disable=total < 1 << 30) as progress:
        for file in files:
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    progress.update(len(chunk))
    return digest.hexdigest()[:32]


class ReferenceCache:
    """Precomputed reference log-probs: `{key: (chosen_logps, rejected_logps)}` plus what they depend on."""

    def __init__(self, fingerprint: str, settings: dict[str, Any], logps: dict[str, tuple[float, float]]):
        self.fingerprint = fingerprint
        self.settings = settings
        self.logps = logps

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.logps)
        torch.save(
            {
                "version": CACHE_VERSION,
                "fingerprint": self.fingerprint,
                "settings": json.dumps(self.settings, sort_keys=True),
                "keys": keys,
                "logps": torch.tensor([self.logps[k] for k in keys], dtype=torch.float64).reshape(-1, 2),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path, *, fingerprint: str, settings: dict[str, Any]) -> ReferenceCache:
        """Load and check a cache; a stale one (other weights or data settings) is refused with the reason."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no reference cache; run `internvl-tune precompute-ref` with this config first")
        raw = torch.load(path, weights_only=True)
        if raw.get("version") != CACHE_VERSION:
            raise ValueError(f"{path}: cache version {raw.get('version')} is not {CACHE_VERSION}; recompute it")
        if raw["fingerprint"] != fingerprint:
            raise ValueError(f"{path}: stale cache: computed for other reference weights; recompute it")
        cached_settings = json.loads(raw["settings"])
        if cached_settings != settings:
            changed = sorted(
                k for k in settings.keys() | cached_settings.keys() if settings.get(k) != cached_settings.get(k)
            )
            raise ValueError(f"{path}: stale cache: data settings changed ({', '.join(changed)}); recompute it")
        logps = {k: (float(c), float(r)) for k, (c, r) in zip(raw["keys"], raw["logps"].tolist(), strict=True)}
        return cls(fingerprint, settings, logps)

    def __call__(self, batch: dict[str, Any], device) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [k for k in batch["keys"] if k not in self.logps]
        if missing:
            raise ValueError(
                f"incomplete reference cache: {len(missing)} pair(s) of this batch are not in it (e.g. record key "
                f"{missing[0]}); recompute it for this data"
            )
        values = torch.tensor([self.logps[k] for k in batch["keys"]], dtype=torch.float32, device=device)
        return values[:, 0], values[:, 1]
