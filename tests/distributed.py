"""Run a function on W gloo ranks in subprocesses (spawned), with a timeout so a hang fails."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    result = None
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # report, don't hang the parent
        result = ("error", traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int = 2, args: tuple = (), timeout: float = 120.0) -> list:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; returns the per-rank results in rank order.
    ``fn`` must be a module-level function (it is pickled into the spawned processes)."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), fn, args, out_dir), nprocs=world,
                                 join=False, start_method="spawn")
        import time

        deadline = time.time() + timeout
        while not ctx.join(timeout=max(0.1, deadline - time.time())):
            if time.time() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{world} ranks did not finish within {timeout} s (a hang?)")
        results = []
        for r in range(world):
            status, value = pickle.load(open(os.path.join(out_dir, f"{r}.pkl"), "rb"))
            if status != "ok":
                raise RuntimeError(f"rank {r} failed:\n{value}")
            results.append(value)
        return results
