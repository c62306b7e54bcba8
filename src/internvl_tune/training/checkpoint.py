"""Resumable checkpoints (through accelerate) and the final, self-describing model folder."""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from internvl_tune.atomic import atomic_dir
from internvl_tune.checkpoints.metadata import METADATA_FILE
from internvl_tune.checkpoints.write import BASE_RECORD, EXTRA_WEIGHTS_FILE, base_model_record
from internvl_tune.config import ConfigError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "train_state.json"  # written last: a checkpoint without it is not whole


class TrainState:
    """Counters that a resume must restore; registered with accelerate so they live in every checkpoint."""

    def __init__(self) -> None:
        self.step = 0
        self.micro_batches = 0  # consumed since the start of training: the data position
        self.skipped: list[tuple[str, str]] = []
        self.num_truncated = 0
        # What the data order depends on (the sampler's `order_inputs`); checked on resume (batching.data_stream).
        self.data_order: dict[str, Any] | None = None
        # What is trained and how it is optimized (optim.run_settings); checked and applied on resume.
        self.settings: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.micro_batches = state["micro_batches"]
        self.skipped = [tuple(s) for s in state["skipped"]]
        self.num_truncated = state["num_truncated"]
        self.data_order = state.get("data_order")  # None in checkpoints written before it was recorded
        self.settings = state.get("settings")


def read_train_state(folder: Path) -> dict[str, Any]:
    """A whole checkpoint's `train_state.json` (TrainState.state_dict), read before accelerate loads anything."""
    return json.loads((folder / STATE_FILE).read_text())


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Step checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a whole checkpoint, or None when it is.

    Whole: `train_state.json` (written last), model weights, and no truncated file. Checkpoints are renamed into
    place only when complete, so this catches what a crash of an older version or a damaged disk left behind; the
    checks read file ends and headers only (a torch file is a zip with its directory at the end; a safetensors
    header gives the data's length).
    """
    if not folder.is_dir():
        return "not a folder"
    if not (folder / STATE_FILE).is_file():
        return f"no {STATE_FILE}"
    if not any(folder.glob("model*.safetensors")) and not any(folder.glob("pytorch_model*")):
        return "no model weights"
    for path in sorted(folder.iterdir()):
        if path.suffix in (".bin", ".pkl") and path.is_file() and not zipfile.is_zipfile(path):
            return f"{path.name} is truncated"
        if path.suffix == ".safetensors" and not _whole_safetensors(path):
            return f"{path.name} is truncated"
    return None


def _whole_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
    except (OSError, struct.error, ValueError):
        return False
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return path.stat().st_size >= 8 + header_size + end


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: an explicit folder (refused unless whole), the newest whole one in
    `output_dir` for 'auto' (logging each newer one it skips), or None."""
    if not resume:
        return None
    if resume == "auto":
        for folder in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder
            logger.warning("resume: skipping incomplete checkpoint %s (%s)", folder, problem)
        return None
    path = Path(resume)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"train.resume_from_checkpoint: {path} is not a whole checkpoint ({problem})")
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
    # The base's absolute path and weights' fingerprint, so that export --merge-lora finds and checks it.
    metadata = {**metadata, BASE_RECORD: base_model_record(model.peft_config["default"].base_model_name_or_path)}
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)  # PeftModel: adapter_config.json + adapter weights
        trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
        extra = {n: state_dict[n].detach().cpu().contiguous() for n in trainable}
        if extra:
            save_file(extra, tmp / EXTRA_WEIGHTS_FILE)
        tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
    return output_dir
