"""Two CPU processes launched the way ``torchrun`` launches them (gloo, one thread each),
shared by the DDP tests of every task."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two(args, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=2 ARGS`` on loopback, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "NUMBA_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def run_two_ranks(tmp_path, script_template: str, timeout: int = 240, **fields):
    """Run ``script_template`` (formatted with ``tests``, ``out`` and ``fields``) as two ranks;
    returns the finished process and the (created) output directory ``tmp_path/run``."""
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "ddp_script.py"
    script.write_text(script_template.format(tests=str(TESTS), out=str(out), **fields))
    return torchrun_two([script], timeout=timeout), out


def identical_rank_states(out):
    """The ``rank0.pt`` / ``rank1.pt`` a DDP script saved, after asserting equal weights."""
    r0, r1 = (torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for (name, a), b in zip(r0["state"].items(), r1["state"].values()):
        assert torch.equal(a, b), f"rank 0 and rank 1 disagree on {name}"
    return r0, r1
