"""Launching ``torchrun --standalone`` from a test: the worktree on the workers' ``PYTHONPATH``, one thread each,
a free port chosen by torchrun itself (``--standalone``), and the output kept for the failure message."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600


def torchrun(args: Sequence[str], n_ranks: int = 2, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N ARGS`` (torchrun), output captured."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_ranks}",
               *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@contextlib.contextmanager
def busy_port(port: int) -> Iterator[None]:
    """Hold ``port`` on localhost (if it is free) while the block runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        try:
            holder.bind(("127.0.0.1", port))
            holder.listen(1)
        except OSError:  # already taken by someone else: busy either way
            pass
        yield
