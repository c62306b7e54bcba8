"""What a run writes as it goes and at its end: step checkpoints (accelerate's state, atomically), the stop-request
checkpoint, `final/` and `final_adapter/`, and `summary.json`."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

from internvl_tune.atomic import atomic_dir
from internvl_tune.checkpoints.metadata import checkpoint_settings, metadata_for
from internvl_tune.checkpoints.read import resolve_dtype
from internvl_tune.config import TrainArgs, to_dict
from internvl_tune.model.forward import base_model
from internvl_tune.model.save import save_hf_checkpoint
from internvl_tune.training.checkpoint import (
    STATE_FILE,
    TrainState,
    checkpoint_problem,
    prune_checkpoints,
    save_adapter,
)
from internvl_tune.training.engine import engine_report, gathered_state_dict, save_checkpoint
from internvl_tune.training.session import TrainingInterrupted

logger = logging.getLogger(__name__)


def save_step_checkpoint(accelerator: Accelerator, state: TrainState, t: TrainArgs) -> Path:
    """`output_dir/checkpoint-N`, written by every rank into the main process's temporary folder, which the main
    process renames once all parts and, last, `train_state.json` are written: a crash leaves no checkpoint-N."""
    folder = Path(t.output_dir) / f"checkpoint-{state.step}"
    with atomic_dir(folder) if accelerator.is_main_process else contextlib.nullcontext() as tmp:
        (tmp,) = broadcast_object_list([tmp])  # its name holds the main process's pid
        save_checkpoint(accelerator, tmp, uses_lora=trains_lora(state))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state.state_dict()))
    if accelerator.is_main_process:
        prune_checkpoints(t.output_dir, t.save_total_limit)
    return folder


def trains_lora(state: TrainState) -> bool:
    """Whether the run trains LoRA adapters (its checkpoints then hold the trained weights only)."""
    trained = state.settings["trained"]
    return bool(trained["model.use_llm_lora"] or trained["model.use_backbone_lora"])


def save_and_stop(accelerator: Accelerator, state: TrainState, t: TrainArgs) -> None:
    """Answer a stop request at a step boundary: save the step's checkpoint (unless it is already there) and raise
    `TrainingInterrupted` with the line to print."""
    if state.step == 0:
        raise TrainingInterrupted("interrupted before the first step: nothing to save")
    folder = Path(t.output_dir) / f"checkpoint-{state.step}"
    if checkpoint_problem(folder) is not None:
        folder = save_step_checkpoint(accelerator, state, t)
    raise TrainingInterrupted(
        f"interrupted at step {state.step}: saved {folder}; resume with train.resume_from_checkpoint=auto"
    )


def save_final(
    accelerator: Accelerator,
    forward: nn.Module,
    tokenizer,
    output_dir: Path,
    metadata: dict[str, Any],
    *,
    uses_lora: bool,
    dtype: torch.dtype | None = None,
) -> Path:
    """`output_dir/final` (full model, LoRA merged, weights in `dtype`) and, for LoRA, `final_adapter`; from the
    gathered state."""
    accelerator.wait_for_everyone()
    final_dir = output_dir / "final"
    final_state = gathered_state_dict(accelerator, forward)
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(forward).model
        if uses_lora:
            save_adapter(trained, tokenizer, output_dir / "final_adapter", metadata, final_state)
        save_hf_checkpoint(trained, tokenizer, final_dir, metadata, state_dict=final_state, dtype=dtype)
    return final_dir


def run_metadata(accelerator: Accelerator, forward: nn.Module, config, settings) -> dict[str, Any]:
    """What a model folder written by this run records (`internvl_tune.json`): the model's settings, the run's
    sample settings and config, and the family of the starting checkpoint (InternLM2 models train as Llama), which
    `convert --to original` needs."""
    model = accelerator.unwrap_model(forward).model
    family = checkpoint_settings(config.model.model_name_or_path).get("llm_family")
    return metadata_for(base_model(model).config, {**asdict(settings), "llm_family": family}, config=to_dict(config))


def save_model_folder(
    accelerator: Accelerator,
    forward: nn.Module,
    tokenizer,
    folder: Path,
    metadata: dict[str, Any],
    *,
    dtype: torch.dtype | None = None,
) -> None:
    """The whole model (LoRA merged) as an HF-layout folder, from the gathered state; every rank calls it (the
    gather is collective under sharding), the main process writes (atomically: the folder is replaced when
    complete). The other ranks return before the write ends: a caller that needs the folder waits."""
    accelerator.wait_for_everyone()
    state_dict = gathered_state_dict(accelerator, forward)
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(forward).model
        save_hf_checkpoint(trained, tokenizer, folder, metadata, state_dict=state_dict, dtype=dtype)


def finish_run(
    accelerator: Accelerator,
    forward: nn.Module,
    tokenizer,
    config,
    settings,
    state: TrainState,
    *,
    optimizer,
    uses_lora: bool,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Save the final model with its metadata, write `summary.json` (with what each rank held: `engine_report`),
    report skipped samples."""
    d, output_dir = config.data, Path(config.train.output_dir)
    metadata = run_metadata(accelerator, forward, config, settings)
    dtype = resolve_dtype(config.train.save_dtype, config.model.model_name_or_path)
    final_dir = save_final(accelerator, forward, tokenizer, output_dir, metadata, uses_lora=uses_lora, dtype=dtype)
    engine = engine_report(accelerator, forward, optimizer)
    logger.info(
        "%s over %d ranks; per rank: %s MB of parameters, %s MB of optimizer moments",
        engine["engine"],
        engine["num_processes"],
        ", ".join(f"{b / 2**20:.2f}" for b in engine["parameter_bytes_per_rank"]),
        ", ".join(f"{b / 2**20:.2f}" for b in engine["optimizer_bytes_per_rank"]),
    )
    summary = {
        "steps": state.step,
        **extra,
        "num_skipped": len(state.skipped),
        "skipped": state.skipped,
        "output_dir": str(output_dir),
        "final_model": str(final_dir),
        "engine": engine,
    }
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        if state.skipped:
            logger.warning("%d bad samples were skipped:", len(state.skipped))
            for where, message in state.skipped[:20]:
                logger.warning("  %s", message if message.startswith(where) else f"{where}: {message}")
        if state.num_truncated:
            logger.warning("%d samples had their text cut to max_seq_length=%d", state.num_truncated, d.max_seq_length)
    return summary
