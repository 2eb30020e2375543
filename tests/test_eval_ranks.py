"""The evaluation scripts under a launcher with several ranks: mpirun / srun ranks are adopted with an explicit
timeout, one rank's error stops every rank (exit 2, naming it), a script destroys the process group it made and
only that one, the retrieval gallery is gathered on rank 0 alone (also tests/test_retrieval.py's two-rank token
test), and the one-process scripts (linear probe, suite) run on rank 0 alone."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from datetime import timedelta

import pytest
import torch

from tests.distributed import _free_port, run_ranks
from tests.test_eval_suite import image_bytes, save_checkpoint, tiny_model, write_folder


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
def test_eval_scripts_join_an_srun_or_mpirun_launch_with_an_explicit_timeout(launch_env, monkeypatch, capsys,
                                                                             launcher):
    """srun and mpirun export their own rank variables, not WORLD_SIZE: the evaluation scripts used to run as
    that many lone processes, each evaluating everything. They are adopted (without a rendezvous address the
    scripts exit 2 saying what to export), and the group gets the evaluation's explicit timeout, not NCCL's
    10-minute default."""
    import eval_zeroshot
    from declip_ds.config import ConfigError
    from declip_ds.eval import retrieval
    from declip_ds.train import dist as D

    names = {"srun": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
             "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")}[launcher]
    launch_env.update(dict(zip(names, ("1", "2", "1"))))
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # not installed (with it, rank 0's address comes through MPI)
    with pytest.raises(ConfigError, match=f"launched as 2 processes \\({names[1]}=2.*MASTER_ADDR"):
        D.init_eval_ranks(torch.nn.Linear(1, 1))
    for main in (eval_zeroshot.main, retrieval.main):
        assert main(["--checkpoint", "nowhere", "--data", "nowhere"]) == 2
        assert "launched as 2 processes" in capsys.readouterr().err
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


def _call(main, argv):
    """(exit code, stderr, whether a process group is left) of ``main(argv)``, its output captured."""
    import torch.distributed as dist

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue(), dist.is_initialized()


def _one_rank_fails(rank, world, ckpt, folder, captions, store_file):
    """In the scripts' own process groups (made from RANK / WORLD_SIZE / MASTER_*, as under torchrun): an
    unreadable image in rank 1's share of a folder, then the checkpoint missing on rank 1's node; then, in a
    group the caller made, a retrieval that succeeds (and what its gather gave each rank)."""
    import torch.distributed as dist

    import eval_zeroshot
    from declip_ds.eval import retrieval

    torch.set_num_threads(1)
    dist.destroy_process_group()  # the scripts make their own
    store = dist.FileStore(str(store_file), world)

    def new_port(name):  # picked by rank 0 just before it is bound (a port picked early can be taken meanwhile)
        if rank == 0:
            store.set(name, str(_free_port()))
        os.environ["MASTER_PORT"] = store.get(name).decode()

    zs = ["--checkpoint", ckpt, "--data", folder, "--templates", "simple", "--batch-size", 1]
    new_port("zero-shot")
    out = [_call(eval_zeroshot.main, zs)]
    new_port("retrieval")
    out.append(_call(retrieval.main, ["--checkpoint", ckpt if rank == 0 else f"{ckpt}_not_on_this_node",
                                      "--data", captions]))
    new_port("caller")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    held, gather = [], retrieval.gather_embeddings

    def recorded(*a, **k):
        got = gather(*a, **k)
        held.append(None if got is None else len(got[0]))
        return got

    retrieval.gather_embeddings = recorded  # in this spawned process only
    out.append((*_call(retrieval.main, ["--checkpoint", ckpt, "--data", captions]), held))
    return out


@pytest.mark.dist
def test_an_error_on_one_rank_stops_every_rank_and_scripts_destroy_only_their_own_group(tmp_path):
    """One rank's error (an unreadable image met while the others evaluate; a path missing on one node) used to
    leave the other ranks waiting in the next collective for the process-group timeout: now every rank exits 2,
    the others naming the rank that failed and its error. A script destroys the process group it made, on every
    exit, and leaves one its caller made (it destroyed it, and did not destroy its own on an error)."""
    exp, model = tiny_model()
    ckpt = save_checkpoint(model, exp, tmp_path / "run" / "step_00000001")
    folder = write_folder(tmp_path / "colors", ["red", "green"], per_class=2)
    (folder / "red" / "img1.png").write_bytes(image_bytes(1)[:60])  # sample 3 of 0..3: rank 1's 2nd batch
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for i in range(3):
        (gallery / f"{i}.png").write_bytes(image_bytes(i))
    (gallery / "captions.tsv").write_text("".join(f"{i}.png\ta picture number {i}\n" for i in range(3)))
    (zs0, zs1), (ret0, ret1), (ok0, ok1) = zip(*run_ranks(
        _one_rank_fails, 2, (ckpt, folder, gallery / "captions.tsv", tmp_path / "ports"), timeout=90))
    assert zs0[0] == zs1[0] == 2 and ret0[0] == ret1[0] == 2
    bad = f"Cannot read the image {folder / 'red' / 'img1.png'}"
    assert f"rank 1 of 2: error: {bad}" in zs1[1]
    assert "rank 0 of 2: error: rank 1 of 2 failed (UnreadableImage: " + bad in zs0[1]
    assert zs0[1].rstrip().endswith("stopping every rank.")
    assert "rank 1 of 2 failed (FileNotFoundError: " in ret0[1] and "_not_on_this_node" in ret0[1]
    assert not any(left for _, _, left in (zs0, zs1, ret0, ret1))  # the scripts' own groups: destroyed
    assert ok0[:1] == ok1[:1] == (0,), (ok0, ok1)
    assert ok0[2] and ok1[2]  # the caller's group: left to the caller
    assert ok0[3] == [3] and ok1[3] == [None]  # the global embeddings gathered on rank 0 alone, which scores them


def test_linear_probe_and_suite_run_on_rank_0_alone(launch_env, tmp_path, capsys):
    """Under a launcher every rank used to run the whole probe (all on GPU 0) and write the same --out and
    cache files together: the other ranks now return at once, writing nothing; rank 0 runs it."""
    from declip_ds.eval import linear_probe as lp
    from declip_ds.eval import suite

    runs = {lp.main: ["--train", tmp_path, "--test", tmp_path], suite.main: ["--data-root", tmp_path]}
    for rank_vars in ({"RANK": "1", "WORLD_SIZE": "2"}, {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4"}):
        os.environ.update(rank_vars)
        for main, argv in runs.items():
            out = tmp_path / "out" / "x.json"
            assert main([str(a) for a in ["--checkpoint", tmp_path / "missing", *argv, "--out", out]]) == 0
            assert "runs in one process, rank 0, which alone writes the results; this rank exits" in \
                capsys.readouterr().err
            assert not (tmp_path / "out").exists()
        for var in rank_vars:
            del os.environ[var]
    os.environ.update(RANK="0", WORLD_SIZE="2")
    for main, argv in runs.items():  # rank 0 runs it (and fails here: no checkpoint)
        assert main([str(a) for a in ["--checkpoint", tmp_path / "missing", *argv]]) == 2
        assert "which alone writes the results." in capsys.readouterr().err


def _trainer_eval_sources(rank, world, tmp):
    """engine.evaluate (the trainer's in-training evaluation) on this rank, model and scoring stubbed: zero-shot
    task 'a' has classnames.txt on rank 0 only (a node-local copy), retrieval source 'r1' resolves on rank 0
    only, and scoring 'r2' runs out of memory on rank 0 alone (rank 0 scores the gathered gallery). Returns
    what this rank evaluated, then one more collective proves the ranks are still paired."""
    import types
    from pathlib import Path

    from declip_ds.config import from_dict
    from declip_ds.eval import retrieval, zero_shot
    from declip_ds.train import dist as D
    from declip_ds.train import engine

    root = Path(tmp) / f"eval{rank}"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    (root / "b" / "classnames.txt").write_text("x\ny\n")
    if rank == 0:
        (root / "a" / "classnames.txt").write_text("x\ny\n")

    def resolve(path):
        if path == "r1" and rank == 1:
            raise FileNotFoundError("r1: no such file on this node")
        return types.SimpleNamespace(name=path)

    def score(model, tok, source, *, group=None, **kw):
        D.share_error(MemoryError("CUDA out of memory (scoring)") if source.name == "r2" and rank == 0 else None, group)
        return {"mean_recall": 0.5, "n_images": 1, "n_texts": 1}

    def task(model, tok, task_dir, *, group=None, **kw):
        D.share_error(None, group)  # the real one's collectives
        return {"acc1": 1.0, "mean_per_class_recall": 1.0, "n": 2}

    zero_shot.evaluate_task_dir, retrieval.resolve_source, retrieval.evaluate_retrieval = task, resolve, score
    exp = from_dict({"eval": {"retrieval": ["r1", "r2", "r3"], "tasks": ["a", "b"], "data_root": str(root)}})
    model = torch.nn.Linear(1, 1)
    method = types.SimpleNamespace(model=model, cfg=None, tokenizer=lambda: None, eval=lambda: None, train=lambda: None)
    logger = types.SimpleNamespace(scalars=lambda *a, **k: None)
    results = engine.evaluate(exp, method, 1, logger, root)
    done = sorted(sorted(json.loads(f.read_text())["results"]) for f in (root / "eval").glob("*.json")) if rank == 0 else None

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    logger.scalars = disk_full  # rank 0 alone writes: its failure must reach rank 1, which would train on
    try:
        engine.evaluate(exp, method, 2, logger, root)
        failed = None
    except Exception as e:  # noqa: BLE001
        failed = type(e).__name__
    return sorted(results), done, failed, D.all_reduce_int(7)


@pytest.mark.dist
def test_the_trainers_evaluation_skips_a_source_on_every_rank_or_on_none(tmp_path):
    """A task or retrieval source that fails on one rank only is skipped on every rank: the ranks took different
    ways on (one skipped, the other went into the task's collectives; or the rank whose scoring ran out of memory
    stopped while the other trained on) and their collectives paired wrongly. Rank 0's records failing to be
    written stops every rank."""
    (r0, done, failed0, n0), (r1, _, failed1, n1) = run_ranks(_trainer_eval_sources, 2, (str(tmp_path),))
    assert r0 == r1 == ["b"] and n0 == n1 == 14
    assert done == sorted([["b"], ["r3"]]), done
    assert (failed0, failed1) == ("OSError", "RankFailed")  # rank 0's records cannot be written: both stop


def _forward_fails(rank, world):
    """Zero-shot and retrieval forwards that run out of memory on rank 1 alone (its 2nd image batch); returns the
    error each rank raised, then proves the ranks are still paired by one more collective."""
    import torch.distributed as dist

    from declip_ds.eval import retrieval, zero_shot
    from declip_ds.train import dist as D

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.calls = torch.nn.Linear(3, 4), 0

        def encode_image(self, x):  # (B, 3, H, W) -> (B, 4)
            self.calls += 1
            if rank == 1 and self.calls == 2:
                raise MemoryError("CUDA out of memory (this rank's forward)")
            return self.proj(x.mean(dim=(2, 3)))

        def encode_text(self, ids):  # (n, L) -> (n, 4)
            return self.proj(torch.ones(len(ids), 3))

    batches = [(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))] * 3
    failed = []
    for run in (lambda: zero_shot.zero_shot_evaluate(Tower(), torch.eye(4)[:, :2], batches, group=dist.group.WORLD,
                                                      image_size=8),
                lambda: retrieval.embed(Tower(), lambda caps: torch.zeros(len(caps), 5, dtype=torch.long),
                                        [(b[0], [["a caption"]] * 2) for b in batches], group=dist.group.WORLD,
                                        image_size=8)):
        try:
            run()
            failed.append(None)
        except Exception as e:  # noqa: BLE001
            failed.append(type(e).__name__)
    return failed, D.all_reduce_int(7)


@pytest.mark.dist
def test_a_forward_that_fails_on_one_rank_stops_every_rank():
    """Out of memory in one rank's forward (zero-shot, retrieval embedding) is shared at the next count of the
    ranks with a batch, where the others are: they used to wait there for the process-group timeout."""
    (f0, n0), (f1, n1) = run_ranks(_forward_fails, 2, ())
    assert f0 == ["RankFailed"] * 2 and f1 == ["MemoryError"] * 2 and n0 == n1 == 14
