"""A rank whose work is done exits cleanly while its peer-failure thread polls the store (training/failure.py).

The subprocess polls without pause (POLL_SECONDS = 0), so the thread is almost always inside a store call when the
interpreter exits; before `stop_watching` joined it at exit, each such exit aborted with "terminate called without
an active exception" (exit -6), as a rank of a 2-rank benchmark run did after its last step."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, socket, threading, time
    from datetime import timedelta
    from torch.distributed import TCPStore
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from internvl_tune.training import failure
    failure.POLL_SECONDS = 0.0
    failure.watch_peers(0, 2)
    time.sleep(0.2)
    assert any(t.name == "peer-failure" for t in threading.enumerate())
    """
)


def test_a_rank_exits_cleanly_while_its_watch_thread_polls():
    for _ in range(3):  # each run aborted before the fix
        done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr
