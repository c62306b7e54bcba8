"""An error on one rank ends every rank, each with one line (training/failure.py). The ranks are started as two
plain processes (as srun or mpirun start them), so no launcher's agent kills the survivor: each rank's own exit
code and output are seen."""

import os
import socket
import subprocess
import sys
import textwrap
import time

from conftest import make_colour_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(argv: list[str], timeout: float = 180) -> tuple[list[subprocess.CompletedProcess], float]:
    """Both ranks of a 2-process gloo job on the CPU; their results, and the seconds until both ended."""
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    base |= {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "WORLD_SIZE": "2"}
    base |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    start = time.perf_counter()
    ranks = [
        subprocess.Popen(
            [sys.executable, *argv],
            env=base | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    results = []
    try:
        for rank in ranks:
            out, err = rank.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
            results.append(subprocess.CompletedProcess(rank.args, rank.returncode, out, err))
    finally:
        for rank in ranks:
            rank.kill()
    return results, time.perf_counter() - start


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    # From "error:" on: rank 0's progress bar has no newline of its own before the line.
    return [line[line.index("error:") :] for line in err.splitlines() if "error:" in line]


def test_a_data_error_on_one_rank_ends_both(tmp_path, tiny_model_dir):
    """Rank 1's first sample is a malformed line (shuffle off, one sample per rank), rank 0's is fine: rank 1 stops
    with the data error, and rank 0, in the step's all-reduce, stops with the same line instead of gloo's
    "Connection closed by peer" traceback (exit 1); with NCCL it would have waited there until the timeout."""
    meta = make_colour_dataset(tmp_path / "data", num=4)
    annotation = tmp_path / "data" / "train.jsonl"
    lines = annotation.read_text().splitlines()
    lines[1] = '{"id": "cut", '
    annotation.write_text("\n".join(lines) + "\n")
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model: {{model_name_or_path: {tiny_model_dir}, grad_checkpoint: false}}\n"
        f"data: {{meta_path: {meta}, max_dynamic_patch: 2}}\n"
        f"train: {{max_steps: 2, shuffle: false, per_device_train_batch_size: 1, output_dir: {tmp_path / 'run'}}}\n"
    )
    (rank0, rank1), seconds = _start_ranks(["-m", "internvl_tune.cli", "sft", "--config", str(config)])
    assert rank1.returncode == 2 and rank0.returncode == 2, (rank0.stderr[-3000:], rank1.stderr[-3000:])
    (line1,) = _error_lines(rank1.stderr)
    (line0,) = _error_lines(rank0.stderr)
    assert "train.jsonl:2: malformed JSON line" in line1
    assert line0 == line1.replace("error: ", "error: rank 1 stopped the run: ", 1)
    assert seconds < 180


def test_a_rank_outside_any_collective_is_ended_too(tmp_path):
    """Rank 0 is busy where no collective would notice the peer is gone (as a rank blocked in NCCL is): the watcher
    ends it within a poll of rank 1's report, with rank 1's exit code and line."""
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time
            import torch.distributed as dist
            from internvl_tune.training.failure import report_failure, watch_peers

            dist.init_process_group("gloo")
            rank = dist.get_rank()
            watch_peers(rank, dist.get_world_size())
            dist.barrier()
            if rank == 1:
                print("error: shard 1: a bad line", file=sys.stderr)
                report_failure(2, "error: shard 1: a bad line")
                sys.exit(2)
            time.sleep(120)  # never returns in time: only the watcher can end this rank
            """
        )
    )
    (rank0, rank1), seconds = _start_ranks([str(script)], timeout=60)
    assert rank1.returncode == 2 and _error_lines(rank1.stderr) == ["error: shard 1: a bad line"]
    assert rank0.returncode == 2 and _error_lines(rank0.stderr) == [
        "error: rank 1 stopped the run: shard 1: a bad line"
    ]
    assert seconds < 60
