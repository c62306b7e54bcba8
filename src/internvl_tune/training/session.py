"""One training run's session: the accelerator's lifetime, the output folder, and stop requests (SIGINT / SIGTERM)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from internvl_tune.atomic import remove_stale_temporaries
from internvl_tune.config import ConfigError, TrainArgs
from internvl_tune.training.checkpoint import (
    CHECKPOINT_PATTERN,
    list_checkpoints,
    resolve_resume,
)
from internvl_tune.training.engine import make_accelerator

logger = logging.getLogger(__name__)


# What a run writes into output_dir (beside checkpoint-N/): a folder holding any of them holds a run. Other files
# (a precomputed reference cache) are not the run's: they are neither a reason to refuse nor deleted on overwrite.
RUN_FILES = (
    "metrics.jsonl",
    "summary.json",
    "config.resolved.json",
    "final",
    "final_adapter",
    "tensorboard",
    "wandb",
    "rollouts",  # the RL recipe's rl.log_rollouts
)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT / SIGTERM; the message says what was saved (the CLI prints it as one line)."""


class StopRequest:
    """The first SIGINT / SIGTERM asks the loop to save a checkpoint and stop at the next step boundary (a step
    cut in half cannot be resumed); a second one stops at once, with a plain KeyboardInterrupt.

    Installed before the data loader starts, so its forked workers inherit it and ignore the signals: a Ctrl-C
    reaches the whole process group, and workers ended by it would fail the loop before its checkpoint.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:  # a data loader worker: the loop ends it
            return
        if self.signal_name is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s: stopping after this step with a checkpoint (again: stop at once)", self.signal_name)

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any rank was signalled; every rank calls it at every step boundary, so all stop at the same one."""
        if accelerator.num_processes == 1:
            return self.signal_name is not None
        flag = torch.tensor(int(self.signal_name is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item())


@contextlib.contextmanager
def run_session(t: TrainArgs) -> Iterator[Accelerator]:
    """The accelerator of one run; afterwards, whether the run finished or raised, accelerate's global state is gone
    (see `finish`), so the next run in the process may choose another precision."""
    accelerator = make_accelerator(t)
    try:
        yield accelerator
    finally:
        finish(accelerator)


def prepare_output_dir(accelerator: Accelerator, t: TrainArgs) -> tuple[Path, Path | None]:
    """Check and prepare `output_dir` before anything is loaded; returns it and the checkpoint to resume from.

    A folder that holds another run is refused unless the run resumes (`resume_from_checkpoint`) or replaces it
    (`overwrite_output_dir`, which deletes the run's files): reusing it silently would append to its metrics, replace
    its final model and leave its checkpoints for a later `auto` resume. A run that stopped before its first step
    (no step logged, no checkpoint, no final model: only its resolved config) is no run: its folder is reused.
    Leftovers of saves that were killed are removed.
    """
    output_dir = Path(t.output_dir)
    found = sorted(p.name for p in output_dir.glob("*") if p.name in RUN_FILES or CHECKPOINT_PATTERN.match(p.name))
    started, has_checkpoint = bool(found) and _run_started(output_dir), bool(list_checkpoints(output_dir))
    if found and not started:
        logger.info("%s holds a run that stopped before its first step (%s): reusing it", output_dir, ", ".join(found))
    elif found and not (t.resume_from_checkpoint or t.overwrite_output_dir):
        listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        resume = "resume it with train.resume_from_checkpoint=auto, " if has_checkpoint else ""
        raise ConfigError(
            f"{output_dir} holds another run ({listed}): {resume}replace it with train.overwrite_output_dir=true, or "
            "pick another train.output_dir"
        )
    elif found and t.resume_from_checkpoint == "auto" and not has_checkpoint:
        raise ConfigError(
            f"{output_dir} holds another run with no checkpoint to resume (a resume would train it again from step "
            "0): replace it with train.overwrite_output_dir=true, or pick another train.output_dir"
        )
    resume_dir = resolve_resume(t.resume_from_checkpoint, output_dir)
    accelerator.wait_for_everyone()  # every rank has looked before the main process deletes anything
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for path in remove_stale_temporaries(output_dir):
            logger.info("removed %s, left by an interrupted save", path)
        if found and (t.overwrite_output_dir or not started):
            if t.overwrite_output_dir:
                logger.warning("overwrite_output_dir: deleting %s in %s", ", ".join(found), output_dir)
            for name in found:
                path = output_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    accelerator.wait_for_everyone()
    return output_dir, resume_dir


def _run_started(output_dir: Path) -> bool:
    """Whether `output_dir` holds a run that did something: a logged step, a checkpoint or a final model."""
    metrics = output_dir / "metrics.jsonl"
    logged = metrics.is_file() and any(line.strip() for line in metrics.read_text().splitlines())
    finished = any((output_dir / name).exists() for name in ("final", "final_adapter", "summary.json"))
    return logged or finished or bool(list_checkpoints(output_dir))


def finish(accelerator: Accelerator) -> None:
    accelerator.end_training()
    # Forget this run's precision so a later run in the same process (tests, the demo, notebooks) may choose
    # another; the process group (PartialState) is kept.
    AcceleratorState._reset_state()
