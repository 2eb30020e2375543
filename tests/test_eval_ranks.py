"""The evaluation scripts under a launcher with several ranks: mpirun / srun ranks are adopted with an explicit
timeout."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch


@pytest.fixture
def launch_env():
    """os.environ without launcher variables, restored whole afterwards (the code under test sets RANK, ...)."""
    from declip_ds.train.dist import LAUNCHER_VARS

    saved = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", *sum(LAUNCHER_VARS, ())):
        os.environ.pop(var, None)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("launcher", ["srun", "openmpi"])
def test_eval_scripts_join_an_srun_or_mpirun_launch_with_an_explicit_timeout(launch_env, monkeypatch, launcher):
    """srun and mpirun export their own rank variables, not WORLD_SIZE: the evaluation scripts used to run as
    that many lone processes, each evaluating everything. They are adopted (without a rendezvous address: an
    error saying what to export), and the group gets the evaluation's explicit timeout, not NCCL's 10-minute
    default."""
    from declip_ds.config import ConfigError
    from declip_ds.train import dist as D

    names = {"srun": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
             "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")}[launcher]
    launch_env.update(dict(zip(names, ("1", "2", "1"))))
    with pytest.raises(ConfigError, match=f"launched as 2 processes \\({names[1]}=2.*MASTER_ADDR"):
        D.init_eval_ranks(torch.nn.Linear(1, 1))  # mpirun too: the scripts have no mpi4py discovery
    launch_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    seen = {}

    class Joined(Exception):
        pass

    def init_process_group(backend, **kw):
        seen.update(kw, env={k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
        raise Joined

    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    with pytest.raises(Joined):
        D.init_eval_ranks(torch.nn.Linear(1, 1))
    assert seen["env"] == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert seen["timeout"] == timedelta(seconds=D.EVAL_TIMEOUT_S) >= timedelta(minutes=30)
