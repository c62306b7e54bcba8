"""The distributed engine (accelerate over DDP, FSDP2 or DeepSpeed ZeRO): everything that differs between engines lives
here, so the recipes and the rest of training/ are written once for all of them."""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator

from internvl_tune.config import TrainArgs
from internvl_tune.training.failure import watch_peers

logger = logging.getLogger(__name__)


def make_accelerator(t: TrainArgs) -> Accelerator:
    # cpu=True on machines without an accelerator makes torchrun / accelerate launch give DDP over gloo.
    accelerator = Accelerator(
        mixed_precision="bf16" if t.bf16 else "no",
        cpu=not torch.accelerator.is_available(),
        log_with=None if t.report_to == "none" else t.report_to,  # its tracker starts in `start_tracker`
        project_dir=t.output_dir,
    )
    watch_peers(accelerator.process_index, accelerator.num_processes)  # a rank's error ends every rank
    return accelerator


def idle_loss(forward, accelerator: Accelerator, pad_token_id: int, dummy_tile: torch.Tensor) -> torch.Tensor:
    """A zero loss for a micro-batch with nothing to train (its samples skipped as bad, or a rank past the end of a
    packed epoch's last global batch), computed by a real forward on one padding token and one dummy tile: DDP's
    forward broadcasts buffers and its backward all-reduces every gradient, so every rank must run both."""
    device = accelerator.device
    token_logps = forward(
        input_ids=torch.full((1, 1), pad_token_id, dtype=torch.long, device=device),
        attention_mask=torch.ones((1, 1), dtype=torch.long, device=device),
        position_ids=torch.zeros((1, 1), dtype=torch.long, device=device),
        pixel_values=dummy_tile.unsqueeze(0).to(device),
        image_flags=torch.zeros(1, dtype=torch.bool),
        logp_index=torch.zeros(1, dtype=torch.long, device=device),
        logp_targets=torch.full((1,), pad_token_id, dtype=torch.long, device=device),
    )
    return token_logps.sum() * 0.0
