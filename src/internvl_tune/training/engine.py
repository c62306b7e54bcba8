"""The distributed engine (accelerate over DDP, FSDP2 or DeepSpeed ZeRO): everything that differs between engines lives
here, so the recipes and the rest of training/ are written once for all of them."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
from torch.distributed.tensor import DTensor

from internvl_tune.config import ConfigError, TrainArgs
from internvl_tune.model.forward import InternVLTrainingForward, idle_inputs
from internvl_tune.training.checkpoint import keep_trainable_weights
from internvl_tune.training.failure import watch_peers

logger = logging.getLogger(__name__)


# Test-only: shard on CPU ranks over gloo as on GPUs (docs/distributed.md). accelerate turns FSDP and DeepSpeed on only
# for GPU-like devices; without this an `accelerate launch` of an FSDP or ZeRO file on CPU runs DDP instead.
SHARD_ON_CPU = "INTERNVL_TUNE_SHARD_ON_CPU"


def requested_engine() -> str | None:
    """ "fsdp" or "deepspeed" when the launch asks for one (accelerate launch's environment), else None (DDP or one
    process)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return None


def make_accelerator(t: TrainArgs) -> Accelerator:
    """The run's Accelerator: DDP, FSDP2 or DeepSpeed as the launch asks, with this run's batch, accumulation and
    clipping written into a DeepSpeed config's "auto" values (accelerate fills them from data loaders, which our
    recipes do not hand it)."""
    engine = requested_engine()
    on_cpu = not torch.accelerator.is_available()
    shard_on_cpu = on_cpu and engine is not None and os.environ.get(SHARD_ON_CPU, "") == "1"
    if on_cpu and engine is not None and not shard_on_cpu:
        logger.warning("accelerate runs %s only on GPUs: on this CPU machine the ranks train as DDP", engine.upper())
    kwargs: dict[str, Any] = dict(
        mixed_precision="bf16" if t.bf16 else "no",
        log_with=None if t.report_to == "none" else t.report_to,  # its tracker starts in `start_tracker`
        project_dir=t.output_dir,
    )
    if shard_on_cpu and engine == "deepspeed":
        # DeepSpeed's CPU accelerator and gloo; accelerate must not be told cpu=True, or it drops DeepSpeed.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        accelerator = Accelerator(cpu=False, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kwargs)
    elif shard_on_cpu:
        # The process group is gloo over CPU ranks (MULTI_CPU); accelerate then takes the FSDP branch it takes for
        # GPUs when it is shown a multi-GPU state for the time it builds its own.
        PartialState(cpu=True)
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        accelerator = Accelerator(cpu=True, **kwargs)
    else:
        # cpu=True on machines without an accelerator makes torchrun / accelerate launch give DDP over gloo.
        accelerator = Accelerator(cpu=on_cpu, **kwargs)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fill_deepspeed_config(accelerator, t)
    elif accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise ConfigError(
                f"FSDP version {plugin.fsdp_version} is not supported: use fsdp_version: 2 in the accelerate config "
                "(configs/accelerate/fsdp2.yaml)"
            )
        if isinstance(plugin.cpu_offload, CPUOffloadPolicy) and on_cpu:
            plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)  # pinned memory needs an accelerator
    watch_peers(accelerator.process_index, accelerator.num_processes)  # a rank's error ends every rank
    return accelerator


def fill_deepspeed_config(accelerator: Accelerator, t: TrainArgs) -> None:
    """Write this run's values where the DeepSpeed config says "auto" (and check the others): the micro-batch, the
    accumulation (informative: every step's boundary is set by the recipe, see `micro_batch`), the global batch and
    `gradient_clipping` from `train.max_grad_norm` (DeepSpeed clips inside its step)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    values = {
        "train_micro_batch_size_per_gpu": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * accelerator.num_processes,
        "gradient_clipping": t.max_grad_norm,
    }
    for key, value in values.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif key == "gradient_clipping" and float(config[key]) != float(value):
            raise ConfigError(
                f"the DeepSpeed config clips at gradient_clipping={config[key]} but train.max_grad_norm is {value}: "
                'set one of them to the other (or the config\'s to "auto")'
            )


@contextlib.contextmanager
def micro_batch(accelerator: Accelerator, model: nn.Module, *, last: bool) -> Iterator[None]:
    """One micro-batch of an optimizer step, under every engine alike: its backward adds to the step's gradients,
    and only the step's last micro-batch synchronises them (DDP's all-reduce, FSDP2's reduce-scatter, ZeRO's
    reduction) and, under DeepSpeed, ends in the engine's own step (clipping at `gradient_clipping`, the update; the
    recipe's `optimizer.step()` is a no-op there). A step can have fewer micro-batches than
    `gradient_accumulation_steps` (an epoch's last), so the boundary is set by the recipe, never counted by accelerate
    or DeepSpeed."""
    accelerator.sync_gradients = last
    try:
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            yield
    finally:
        accelerator.sync_gradients = True


def backward(accelerator: Accelerator, loss: torch.Tensor) -> None:
    """Backward of a loss that is already this micro-batch's share of the step's (globally normalised) loss: no engine
    may divide it again. accelerate divides by its accumulation count, which stays 1; DeepSpeed divides by its
    config's `gradient_accumulation_steps` unless told not to."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def gathered_state_dict(accelerator: Accelerator, forward: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of the trained model (keys as in the model, without the forward wrapper's `model.`), on
    the main process; {} on the others. Every rank must call it: ZeRO-3 and FSDP2 gather their shards collectively
    (DeepSpeed hands the result to rank 0 only, FSDP2 to rank 0 in CPU memory)."""
    state = accelerator.get_state_dict(forward)
    if not accelerator.is_main_process or state is None:
        return {}
    return {k.removeprefix("model."): v for k, v in state.items()}


def idle_loss(forward, accelerator: Accelerator, pad_token_id: int, dummy_tile: torch.Tensor) -> torch.Tensor:
    """A zero loss for a micro-batch with nothing to train (its samples skipped as bad, or a rank past the end of a
    packed epoch's last global batch), computed by a real forward on one padding token and one dummy tile: DDP's
    forward broadcasts buffers and its backward all-reduces every gradient, FSDP2 and ZeRO-3 gather parameters in
    both, so every rank must run both."""
    return forward(**idle_inputs(pad_token_id, dummy_tile, accelerator.device)).sum() * 0.0


def engine_name(accelerator: Accelerator) -> str:
    """ "one process", "DDP", "FSDP2", "ZeRO-1/2/3": what the run trains on, for logs and `summary.json`."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if accelerator.distributed_type == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    return "DDP" if accelerator.num_processes > 1 else "one process"


def prepare_reference(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The forward of a frozen reference model, placed as the policy is: under FSDP2 sharded per block like it
    (`fully_shard`, no optimizer); under ZeRO-3 a DeepSpeed engine without optimizer on the policy's ZeRO settings
    (its parameters partitioned, gathered layer by layer); under DDP and ZeRO-1/2, where the policy's parameters are
    whole on every rank too, the whole model on the device. Under FSDP2 and ZeRO-3 its forward is collective: every
    rank calls it together (`LiveReference.idle` for a rank with nothing to score)."""
    forward = InternVLTrainingForward(model)
    if accelerator.distributed_type == DistributedType.FSDP:
        from accelerate.utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, forward)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        config["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=forward, config=config)
        engine.eval()
        return engine
    return forward.to(accelerator.device)


def keep_only_trained_weights(accelerator: Accelerator) -> None:
    """Step checkpoints of a LoRA run hold its trained weights only (adapters, an unfrozen projector): the frozen base
    comes from model_name_or_path again on resume. DDP and one process drop the frozen weights from the state accelerate
    saves; DeepSpeed leaves them out itself (`save_checkpoint`); FSDP2 saves the whole model."""
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        accelerator.register_save_state_pre_hook(keep_trainable_weights)


def save_checkpoint(accelerator: Accelerator, folder: Path, *, uses_lora: bool) -> None:
    """accelerate's `save_state` into `folder`, every rank writing its part (ZeRO's partitions, DeepSpeed's own
    layout)."""
    kwargs = {"exclude_frozen_parameters": True} if uses_lora and _is_deepspeed(accelerator) else {}
    accelerator.save_state(str(folder), **kwargs)


def load_checkpoint(accelerator: Accelerator, folder: Path, *, uses_lora: bool) -> None:
    """accelerate's `load_state` from `folder`; a LoRA checkpoint lacks the frozen weights, which are then kept as
    loaded from model_name_or_path."""
    if _is_deepspeed(accelerator):
        accelerator.load_state(str(folder), load_module_strict=not uses_lora)
    elif accelerator.distributed_type == DistributedType.FSDP:
        accelerator.load_state(str(folder))
    else:
        accelerator.load_state(str(folder), strict=not uses_lora)


def check_resume_engine(folder: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse, in one line, a resume that the checkpoint's layout cannot give exactly: another engine (each writes
    its own files), or another number of ranks under ZeRO (its optimizer state is split per rank). DDP and FSDP2
    checkpoints hold whole states; a rank count change there is the data order's check (`check_data_order`)."""
    if saved["engine"] != current["engine"]:
        raise ConfigError(
            f"{folder} was saved by {saved['engine']} on {saved['processes']} ranks and this run is {current['engine']}: "
            "resume with the accelerate config the run started with"
        )
    if saved["processes"] != current["processes"] and saved["engine"].startswith("ZeRO"):
        raise ConfigError(
            f"{folder} was saved by {saved['engine']} on {saved['processes']} ranks, whose optimizer state is split per "
            f"rank; this run has {current['processes']}: resume on {saved['processes']} ranks"
        )


def _is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def local_numel(t: torch.Tensor) -> int:
    """The elements of a parameter or state tensor this rank holds: an FSDP2 DTensor's local shard; a ZeRO-3
    parameter's partition (its own `numel()` is 0 outside a gather), or all of it when ZeRO-3 keeps it whole on every
    rank (under `stage3_param_persistence_threshold`); else the tensor's."""
    if isinstance(t, DTensor):
        return t.to_local().numel()
    if hasattr(t, "ds_tensor"):
        return t.ds_numel if getattr(t, "ds_persist", False) else t.ds_tensor.numel()
    return t.numel()


def engine_report(accelerator: Accelerator, forward: nn.Module, optimizer) -> dict[str, Any]:
    """What each rank holds: its bytes of parameters and of Adam's moments (ZeRO's fp32 master partitions are not
    counted, so that the numbers compare with one process's), and the number of FSDP2 units. Shows that a run really sharded (about 1/N of one process's bytes per
    rank) rather than fell back to DDP; logged and written to `summary.json`. Every rank calls it."""
    params = sum(local_numel(p) * p.element_size() for p in forward.parameters())
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) or type(inner).__module__.startswith("deepspeed"):
        inner = inner.optimizer  # accelerate's wrapper, then DeepSpeed's ZeRO optimizer, around the torch AdamW
    moments = sum(
        local_numel(v) * v.element_size()
        for state in inner.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    units = sum(isinstance(m, FSDPModule) for m in forward.modules())
    mine = [params, moments]
    everyone = [mine]
    if accelerator.num_processes > 1:
        everyone = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(everyone, mine)
    return {
        "engine": engine_name(accelerator),
        "num_processes": accelerator.num_processes,
        "parameter_bytes_per_rank": [e[0] for e in everyone],
        "optimizer_bytes_per_rank": [e[1] for e in everyone],
        "fsdp_units": units,
    }
