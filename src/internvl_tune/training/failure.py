"""One rank's error ends every rank of the run, each with one line, instead of leaving the others waiting.

A rank that stops (a data error on its share of the batches, say) leaves the others in their next collective:
with NCCL they wait there until the timeout; with gloo they fail with "Connection closed by peer" and a traceback
that hides the cause. So the rank that fails writes its exit code and error line into the launch's store (the
TCPStore at MASTER_ADDR:MASTER_PORT that every rank of a torchrun, `accelerate launch` or env:// job reaches)
before it exits (`report_failure`), and every rank runs a thread that polls the store and, when another rank has
failed, prints `error: rank R stopped the run: <its line>` and ends its own process with R's exit code (the main
thread may be blocked in a collective that never returns, so nothing gentler reaches it). A rank whose collective
fails because the peer is gone asks the store first (`peer_failure`) and reports the peer's error, not its own
consequence of it.

Worked example: 2 ranks, rank 1 reads a malformed line. Rank 1 prints `error: ...train.jsonl:2: malformed JSON
line ...`, writes `1<TAB>2<TAB>that line` under `internvl_tune/failed/0` and exits 2; rank 0, in its step's
all-reduce, prints `error: rank 1 stopped the run: ...train.jsonl:2: ...` and exits 2 within a poll (0.5 s).

The thread is stopped and joined when the interpreter exits (`stop_watching`, an atexit hook). A daemon thread left
running is killed by CPython's finalization when it next takes the GIL, and if that happens as it returns from a
store call (C++ frames on its stack, the GIL released inside pybind11), the forced unwind ends in std::terminate:
"terminate called without an active exception" and SIGABRT, on a rank whose work was done.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5


@dataclass
class _Watch:
    store: Any  # torch.distributed.TCPStore
    rank: int
    key: str
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


_watch: _Watch | None = None
_ending = threading.Lock()  # one line per process: whoever takes it (this rank's error or a peer's) reports


def watch_peers(rank: int, world_size: int) -> None:
    """Start (once per process) the thread that ends this process when another rank of the run reports a failure.

    A no-op for one process, and where the launch has no store to reach (MASTER_ADDR / MASTER_PORT unset).
    """
    global _watch
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if world_size < 2 or _watch is not None or not address or not port:
        return
    from torch.distributed import TCPStore

    try:
        store = TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        logger.warning("cannot watch the other ranks for failures (store %s:%s: %s)", address, port, e)
        return
    # A restarted torchrun attempt starts clean: the key of a failure names its attempt.
    key = f"internvl_tune/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    _watch = _Watch(store, rank, key)
    _watch.thread = threading.Thread(target=_poll, args=(_watch,), daemon=True, name="peer-failure")
    _watch.thread.start()
    atexit.register(stop_watching)


def stop_watching() -> None:
    """Stop the watching thread and wait for it: its store call in flight returns first (at most the store's
    timeout; a poll's check takes milliseconds). A no-op when none runs."""
    watch = _watch
    if watch is None or watch.thread is None:
        return
    watch.stop.set()
    if watch.thread is not threading.current_thread():
        watch.thread.join(timeout=60)


def report_failure(code: int, line: str) -> None:
    """Tell the other ranks that this one stops with exit code `code`; `line` is its error, on one line.

    A no-op outside a watched multi-process run.
    """
    watch = _watch
    if watch is None or not _ending.acquire(blocking=False):
        return
    watch.stop.set()
    try:
        watch.store.set(watch.key, f"{watch.rank}\t{code}\t{line}")
    except (RuntimeError, OSError):  # the store is gone: the job is ending anyway
        pass


def peer_failure() -> tuple[int, str] | None:
    """(exit code, line) when another rank reported a failure: what an error of this rank is the consequence of
    (its collective lost the peer). The line is this rank's to print; None when no other rank failed."""
    watch = _watch
    failure = _read(watch) if watch is not None else None
    if failure is None or not _ending.acquire(blocking=False):
        return None
    watch.stop.set()
    rank, code, line = failure
    return code, f"rank {rank} stopped the run: {line.removeprefix('error: ')}"


def _read(watch: _Watch) -> tuple[int, int, str] | None:
    """Another rank's failure (rank, exit code, line) from the store, if there is one."""
    try:
        if not watch.store.check([watch.key]):
            return None
        rank, code, line = watch.store.get(watch.key).decode().split("\t", 2)
    except (RuntimeError, OSError):  # the store went away with the job (its host rank finished)
        watch.stop.set()
        return None
    return None if int(rank) == watch.rank else (int(rank), int(code), line)


def _poll(watch: _Watch) -> None:
    while not watch.stop.wait(POLL_SECONDS):
        failure = _read(watch)
        if failure is None or not _ending.acquire(blocking=False):
            continue
        rank, code, line = failure
        print(f"error: rank {rank} stopped the run: {line.removeprefix('error: ')}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)
