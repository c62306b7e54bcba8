"""Resumable checkpoints (through accelerate) and the final, self-describing model folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from internvl_tune.model.checkpoint_io import EXTRA_WEIGHTS_FILE
from internvl_tune.model.load import METADATA_FILE

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class TrainState:
    """Counters that a resume must restore; registered with accelerate so they live in every checkpoint."""

    def __init__(self) -> None:
        self.step = 0
        self.micro_batches = 0  # consumed since the start of training: the data position
        self.skipped: list[tuple[str, str]] = []
        self.num_truncated = 0

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.micro_batches = state["micro_batches"]
        self.skipped = [tuple(s) for s in state["skipped"]]
        self.num_truncated = state["num_truncated"]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Step checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: an explicit folder, the latest one for 'auto', or None."""
    if not resume:
        return None
    if resume == "auto":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / "train_state.json").is_file():
        raise ValueError(f"{path}: not an internvl-tune checkpoint (no train_state.json)")
    return path


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)


def keep_trainable_weights(models: list[nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
    """accelerate save-state hook: drop frozen parameters from the saved model state (LoRA checkpoints)."""
    for model, state in zip(models, weights, strict=True):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for name in [n for n in state if n not in trainable]:
            del state[name]


def save_adapter(
    model: nn.Module, tokenizer, output_dir: str | Path, metadata: dict[str, Any], state_dict: dict[str, Any]
) -> Path:
    """Write LoRA adapters only (PEFT format) plus the other trained weights (e.g. an unfrozen projector) and the
    metadata; `internvl-tune export --merge-lora` turns the folder into a full model in either layout.

    `state_dict` is the full, gathered state of `model` (so ZeRO-3 / FSDP shards are saved whole).
    """
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, state_dict=state_dict)  # PeftModel: adapter_config.json + adapter weights
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    extra = {n: state_dict[n].detach().cpu().contiguous() for n in trainable}
    if extra:
        save_file(extra, output_dir / EXTRA_WEIGHTS_FILE)
    tokenizer.save_pretrained(output_dir)
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
    return output_dir
