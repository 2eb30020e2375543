"""Changing the number of ranks or the ZeRO stage between save and resume (RELIABILITY.md §4 item 16),
and exact resume in bf16 (item 1).

A 2-rank ZeRO-2 checkpoint resumed on 1 rank must fail before training, naming both world sizes and
the conversion command; after ``python -m declip_ds.train.universal`` the 1-rank resume must restore
the weights and the unpadded fp32 master weights and Adam moments exactly (compared with DeepSpeed's
zero_to_fp32 and with the moments read straight from the original per-rank partitions), then train on.
"""

import json
import os
import re
import shutil
import sys
from collections import defaultdict

import pytest
import torch

from tests.distributed import run_ranks
from tests.test_reliability import cmd, metrics, run
from tests.test_train_e2e import ROOT, SMALL, shapes  # noqa: F401  (shapes is a fixture)

TAG = "step_00000004"
CONFIG = str(ROOT / "experiments/demo_shapes.yaml")
RESNET = "model.vision.name=resnet_tiny_clip"  # the demo's tower: BatchNorm buffers, which universal files lack


def ds_json(path, stage, bf16=False):
    cfg = {"zero_optimization": {"stage": stage}}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    path.write_text(json.dumps(cfg))
    return path


def overrides(run_dir, shapes, *extra):
    return [*SMALL, f"data.synthetic_root={shapes}", f"train.output_dir={run_dir}", "train.log_every=1",
            "eval.at_end=false", "train.steps=6", "train.save_every=4", *extra]


def saved_at_step_4(tmp_path, shapes, stage, *extra):
    """A 2-rank run of 6 steps whose step-6 checkpoint is lost: the newest complete tag is step 4."""
    run_dir = tmp_path / "run"
    ds = ds_json(tmp_path / f"zero{stage}.json", stage)
    rc, out = run(cmd(run_dir, shapes, "train.steps=6", "train.save_every=4", *extra, ds=ds, ranks=2), tmp_path)
    assert rc == 0, out[-3000:]
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
    return run_dir


@pytest.fixture(scope="module")
def zero2_two_ranks(tmp_path_factory, shapes):
    return saved_at_step_4(tmp_path_factory.mktemp("zero2"), shapes, 2, RESNET)


def copy_run(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def convert(path, cwd, *extra):
    return run([sys.executable, "-m", "declip_ds.train.universal", str(path), "--workers", "1", *extra], cwd)


# ----------------------------------------------------------------------------- the reference state


def reference_state(tag_dir):
    """fp32 master weights by DeepSpeed's zero_to_fp32, and Adam's moments cut out of each rank's
    partition with the partition's own fragment map (no padding), concatenated in rank order."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    files = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"),
                   key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1)))
    assert len(files) == 2
    pieces = {k: defaultdict(list) for k in ("exp_avg", "exp_avg_sq")}
    for f in files:
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for gi, mapping in enumerate(osd["param_slice_mappings"]):
            state = osd["base_optimizer_state"]["state"][gi]
            for name, frag in mapping.items():
                for k in pieces:
                    pieces[k][name].append(state[k].narrow(0, frag.start, frag.numel))
    ref = {"fp32": fp32}
    for k, by_name in pieces.items():
        ref[k] = {n: torch.cat(v).view(fp32[n].shape) for n, v in by_name.items()}
    groups = torch.load(files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
    ref["groups"] = [{k: v for k, v in g.items() if k != "params"}
                     for g in groups["base_optimizer_state"]["param_groups"]]
    return ref


class _Loaded(Exception):
    pass


def _capture_after_resume(rank, world, config, ovr, ds):
    """Run the trainer (``--resume auto``) up to the end of its checkpoint load, and return what the
    engine then holds: module weights and buffers, fp32 master weights, Adam moments, param groups."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from declip_ds.config import load_config
    from declip_ds.train import checkpoint as C
    from declip_ds.train import engine as E

    os.environ.setdefault("LOCAL_RANK", str(rank))
    seen = {}
    original = C.load

    def load(engine, method, target, seed=0, integrity="fallback"):
        client = original(engine, method, target, seed, integrity)
        named = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in named],
                                               enabled=engine.zero_optimization_stage() == 3):
            weights = {n: p.detach().float().clone() for n, p in named}
        seen.update(
            universal=target.universal, step=client["step"], weights=weights,
            buffers={n: b.detach().clone() for n, b in engine.module.named_buffers()},
            fp32={n: safe_get_full_fp32_param(p).clone() for n, p in named},
            exp_avg={n: safe_get_full_optimizer_state(p, "exp_avg").clone() for n, p in named},
            exp_avg_sq={n: safe_get_full_optimizer_state(p, "exp_avg_sq").clone() for n, p in named},
            groups=[{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups],
            last_epoch=engine.lr_scheduler.last_epoch,
        )
        raise _Loaded

    C.load = load
    try:
        E.train(load_config(config, ovr), ds_config=str(ds), resume="auto")
    except _Loaded:
        pass
    return seen if rank == 0 else None


def assert_restored(seen, ref, tag_dir):
    from safetensors.torch import load_file

    saved = load_file(str(tag_dir / "model.safetensors"))
    assert seen["universal"] and seen["step"] == 4 and seen["last_epoch"] == 4
    names = sorted(seen["fp32"])
    assert names and set(names) <= set(ref["fp32"])
    for n in names:
        assert torch.equal(seen["weights"][n], saved[n]), f"weight {n}"
        assert torch.equal(seen["fp32"][n], ref["fp32"][n].float()), f"fp32 master {n}"
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(seen[k][n], ref[k][n]), f"{k} {n}"
    for n, b in seen["buffers"].items():  # BatchNorm statistics: not in DeepSpeed's universal files
        assert torch.equal(b, saved[n].to(b.dtype)), f"buffer {n}"
    assert len(seen["groups"]) == len(ref["groups"])
    for live, orig in zip(seen["groups"], ref["groups"]):
        for k in ("lr", "weight_decay", "betas", "eps"):
            assert live[k] == orig[k], f"param group {k}: {live[k]} != {orig[k]}"


# ----------------------------------------------------------------------------- resume planning (no processes)


def fake_tag(ck, step, universal=False, files=("mp_rank_00_model_states.pt",), **marker):
    from declip_ds.train import checkpoint as C

    t = ck / (C.tag_for(step) + (C.UNIVERSAL_SUFFIX if universal else ""))
    t.mkdir(parents=True)
    for f in files:
        (t / f).write_bytes(b"x")
    (t / C.MARKER).write_text(json.dumps({"step": step, **marker, **({"universal": True} if universal else {})}))
    return t


def test_plan_resume_fits_the_checkpoint_to_the_run(tmp_path):
    from declip_ds.train import checkpoint as C

    ck = tmp_path / "checkpoints"
    fake_tag(ck, 4, world_size=2, zero_stage=2)
    same = C.plan_resume("auto", tmp_path, 2, 2)
    assert (same.tag, same.universal, same.world_size, same.zero_stage) == (TAG, False, 2, 2)
    with pytest.raises(C.CheckpointError, match=r"2 rank\(s\), ZeRO stage 2 but this run has 1 rank\(s\)"):
        C.plan_resume("auto", tmp_path, 1, 2)
    with pytest.raises(C.CheckpointError, match="python -m declip_ds.train.universal .*step_00000004"):
        C.plan_resume("auto", tmp_path, 2, 3)  # a stage change needs the conversion too
    fake_tag(ck, 4, universal=True, world_size=2, zero_stage=2)
    for world, stage in ((1, 2), (4, 1), (2, 3)):  # the conversion next to the tag is picked up
        t = C.plan_resume("auto", tmp_path, world, stage)
        assert (t.tag, t.universal, t.world_size) == (TAG + "_universal", True, 2)
    explicit = C.plan_resume(str(ck / (TAG + "_universal")), tmp_path, 2, 2)
    assert explicit.universal and explicit.ckpt_dir == ck
    with pytest.raises(C.CheckpointError, match="ZeRO stage 1, 2 or 3 only"):
        C.plan_resume("auto", tmp_path, 1, 0)


def test_plan_resume_zero0_and_zero3_and_old_markers(tmp_path):
    from declip_ds.train import checkpoint as C

    z0 = tmp_path / "z0"
    fake_tag(z0 / "checkpoints", 4, world_size=1, zero_stage=0)
    assert not C.plan_resume("auto", z0, 8, 0).universal  # unpartitioned: any world size as it is
    with pytest.raises(C.CheckpointError, match="stage-0 --ds_config"):
        C.plan_resume("auto", z0, 8, 2)
    z3 = tmp_path / "z3"
    fake_tag(z3 / "checkpoints", 4, universal=True, world_size=2, zero_stage=3)
    assert C.plan_resume(str(z3 / "checkpoints" / (TAG + "_universal")), z3, 1, 3).universal
    with pytest.raises(C.CheckpointError, match="only its ZeRO-3 loader reads"):
        C.plan_resume(str(z3 / "checkpoints" / (TAG + "_universal")), z3, 1, 2)
    old = tmp_path / "old"  # a marker from before zero_stage was recorded: the stage from DeepSpeed's file names
    fake_tag(old / "checkpoints", 4, files=("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
             world_size=2)
    assert C.plan_resume("auto", old, 2, 2).zero_stage is None  # stage 1 or 2: loads at 1 or 2 as before
    with pytest.raises(C.CheckpointError, match="ZeRO stage 1 or 2 but this run has 1 rank"):
        C.plan_resume("auto", old, 1, 2)


def test_retention_deletes_a_conversion_with_its_tag_and_the_converter_refuses_what_it_cannot_convert(tmp_path):
    from declip_ds.train import checkpoint as C
    from declip_ds.train.universal import convert as to_universal

    ck = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        fake_tag(ck, s, world_size=2, zero_stage=2)
    fake_tag(ck, 2, universal=True, world_size=2, zero_stage=2)
    fake_tag(ck, 6, universal=True, world_size=2, zero_stage=2)
    C._retain(ck, keep_last=2, keep="step_00000006")
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000004", "step_00000006", "step_00000006_universal"]
    with pytest.raises(C.CheckpointError, match="already a universal checkpoint"):
        to_universal(ck / "step_00000006_universal")
    fake_tag(tmp_path / "z0", 2, world_size=1, zero_stage=0)
    with pytest.raises(C.CheckpointError, match="ZeRO stage 0.*already resumes at any world size"):
        to_universal(tmp_path / "z0")


def test_load_universal_in_the_ds_config_is_ours(tmp_path):
    from declip_ds.config import ConfigError
    from declip_ds.train import checkpoint as C
    from declip_ds.train.engine import _set_load_universal

    cfg = {"zero_optimization": {"stage": 2}}
    _set_load_universal(cfg, C.ResumeTarget(tmp_path, TAG + "_universal", universal=True), "x.json")
    assert cfg["checkpoint"] == {"load_universal": True}
    _set_load_universal(cfg := {}, None, "x.json")
    assert cfg["checkpoint"] == {"load_universal": False}
    with pytest.raises(ConfigError, match="checkpoint.load_universal=true.*not a universal checkpoint"):
        _set_load_universal({"checkpoint": {"load_universal": True}}, C.ResumeTarget(tmp_path, TAG), "x.json")


# ----------------------------------------------------------------------------- tests with ranks


@pytest.mark.dist
def test_checkpoints_carry_universal_checkpoint_info(zero2_two_ranks):
    tag_dir = zero2_two_ranks / "checkpoints" / TAG
    sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert "universal_checkpoint_version" in sd["universal_checkpoint_info"]
    assert sd["world_size"] == 2 and sd["zero_stage"] == 2  # our client state
    marker = json.loads((tag_dir / "COMPLETE").read_text())
    assert marker["world_size"] == 2 and marker["zero_stage"] == 2 and marker["precision"] == "fp32"


@pytest.mark.dist
def test_other_world_size_without_conversion_fails_before_training(tmp_path, shapes, zero2_two_ranks):
    run_dir = copy_run(zero2_two_ranks, tmp_path)
    lines_before = (run_dir / "metrics.jsonl").read_text()
    ds = ds_json(tmp_path / "z2.json", 2)
    rc, out = run(cmd(run_dir, shapes, "train.steps=6", "train.save_every=4", RESNET, ds=ds), tmp_path)
    assert rc == 2, out[-3000:]
    tag_dir = run_dir / "checkpoints" / TAG
    assert "saved with 2 rank(s), ZeRO stage 2 but this run has 1 rank(s)" in out
    assert f"python -m declip_ds.train.universal {tag_dir}" in out
    assert (run_dir / "metrics.jsonl").read_text() == lines_before  # nothing trained
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [TAG]


@pytest.mark.dist
def test_convert_then_resume_on_one_rank_restores_the_exact_state(tmp_path, shapes, zero2_two_ranks):
    run_dir = copy_run(zero2_two_ranks, tmp_path)
    tag_dir = run_dir / "checkpoints" / TAG
    rc, out = convert(run_dir, tmp_path)
    assert rc == 0, out[-3000:]
    uni = run_dir / "checkpoints" / (TAG + "_universal")
    assert f"universal checkpoint: {uni}" in out
    names = {p.name for p in uni.iterdir()}
    assert {"COMPLETE", "zero", "model.safetensors", "config.yaml", "rank_00000.pt", "rank_00001.pt"} <= names
    assert json.loads((uni / "COMPLETE").read_text())["universal"] is True
    rc, out = convert(run_dir, tmp_path)  # idempotent
    assert rc == 0 and "already exists" in out

    # the universal fragments hold the unpadded state of the two partitions
    ref = reference_state(tag_dir)
    for n, t in ref["exp_avg"].items():
        assert torch.equal(torch.load(uni / "zero" / n / "exp_avg.pt", weights_only=False)["param"], t), n
        assert torch.equal(torch.load(uni / "zero" / n / "fp32.pt", weights_only=False)["param"],
                           ref["fp32"][n].float()), n

    # what a 1-rank engine holds right after `--resume auto` picked the conversion
    ds = ds_json(tmp_path / "z2.json", 2)
    seen = run_ranks(_capture_after_resume, world=1, args=(CONFIG, overrides(run_dir, shapes, RESNET), ds),
                     timeout=300)[0]
    assert any("running_mean" in n for n in seen["buffers"])
    assert_restored(seen, ref, tag_dir)

    # and it trains on from step 4 on one rank
    rc, out = run(cmd(run_dir, shapes, "train.steps=6", "train.save_every=4", RESNET, ds=ds), tmp_path)
    assert rc == 0, out[-3000:]
    assert "at step 4" in out and "universal checkpoint loader" in out and "world size changed from 2 to 1" in out
    m = metrics(run_dir)
    assert {5, 6} <= set(m) and all(torch.isfinite(torch.tensor(m[s]["loss"])) for s in (5, 6))
    marker = json.loads((run_dir / "checkpoints" / "step_00000006" / "COMPLETE").read_text())
    assert marker["world_size"] == 1 and not (run_dir / "checkpoints" / "step_00000006" / "rank_00001.pt").exists()


@pytest.mark.dist
@pytest.mark.slow
def test_zero1_to_zero3_through_the_universal_checkpoint(tmp_path, shapes):
    """DeCLIP (BatchNorm heads, a per-rank queue): 2 ranks ZeRO-1 -> 2 ranks ZeRO-3. The stage change
    alone also needs the conversion; buffers and per-group weight decay must survive it."""
    run_dir = saved_at_step_4(tmp_path, shapes, 1, "method.name=declip")
    tag_dir = run_dir / "checkpoints" / TAG
    z3 = ds_json(tmp_path / "z3.json", 3)
    rc, out = run(cmd(run_dir, shapes, "train.steps=6", "train.save_every=4", "method.name=declip", ds=z3, ranks=2),
                  tmp_path)
    assert rc != 0 and "ZeRO stage 1 but this run has 2 rank(s), ZeRO stage 3" in out, out[-3000:]
    rc, out = convert(tag_dir, tmp_path)
    assert rc == 0, out[-3000:]
    ref = reference_state(tag_dir)
    seen = run_ranks(_capture_after_resume, world=2,
                     args=(CONFIG, overrides(run_dir, shapes, "method.name=declip"), z3), timeout=400)[0]
    assert seen["buffers"], "DeCLIP has BatchNorm buffers"
    assert_restored(seen, ref, tag_dir)
    rc, out = run(cmd(run_dir, shapes, "train.steps=6", "train.save_every=4", "method.name=declip", ds=z3, ranks=2),
                  tmp_path)
    assert rc == 0, out[-3000:]
    assert "at step 4" in out and "universal checkpoint loader" in out
    assert max(metrics(run_dir)) == 6


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_exact_resume_two_ranks(tmp_path, shapes, stage):
    """8 steps straight vs 4 + resume + 4, bf16 on 2 ranks with ZeRO 1, 2 and 3: the losses, LRs and gradient
    norms of steps 5-8 and the step-8 checkpoints (bf16 weights, fp32 master partitions, Adam moments) are
    bit for bit the same (RELIABILITY.md §4 item 1 asks for 1e-3 in bf16; the restore is exact)."""
    from tests.test_reliability import assert_same_state

    ds = ds_json(tmp_path / "bf16.json", stage, bf16=True)
    a = tmp_path / "run"
    args = cmd(a, shapes, "train.steps=8", "train.save_every=4", ds=ds, ranks=2)
    rc, out = run(args, tmp_path)
    assert rc == 0, out[-3000:]
    ck = a / "checkpoints"
    straight_8 = tmp_path / "straight_step_8"
    shutil.move(str(ck / "step_00000008"), straight_8)  # lost: the relaunch resumes from step 4
    rc, out = run(args, tmp_path)
    assert rc == 0, out[-3000:]
    assert "at step 4" in out
    first, again = metrics(a, 0), metrics(a, -1)
    assert sorted(again) == list(range(1, 9))
    for s in range(5, 9):
        assert first[s] is not again[s] and "grad_norm" in again[s]
        for f in ("lr", "loss", "clip_loss", "grad_norm", "logit_scale"):
            assert again[s][f] == first[s][f], f"step {s} {f}: {again[s][f]!r} != {first[s][f]!r}"
    assert_same_state(straight_8, ck / "step_00000008")


@pytest.mark.dist
@pytest.mark.slow
def test_zero3_two_ranks_to_one_rank_through_the_universal_checkpoint(tmp_path, shapes):
    """A ZeRO-3 tag saved at 2 ranks, converted, resumed at 1 rank with ZeRO-3 holds what the 2-rank resume
    of the tag as saved holds: weights, fp32 master weights, Adam moments and param groups, bit for bit
    (the reference is DeepSpeed's own 2-rank ZeRO-3 load, gathered); then it trains on. A ZeRO-2 resume of
    the conversion is refused before training (DeepSpeed's ZeRO-3 fragments load only at ZeRO-3)."""
    run_dir = saved_at_step_4(tmp_path, shapes, 3)
    z3 = ds_json(tmp_path / "z3.json", 3)
    ovr = overrides(run_dir, shapes)
    ref = run_ranks(_capture_after_resume, world=2, args=(CONFIG, ovr, z3), timeout=400)[0]
    assert not ref["universal"] and ref["step"] == 4
    rc, out = convert(run_dir, tmp_path)
    assert rc == 0, out[-3000:]
    uni = run_dir / "checkpoints" / (TAG + "_universal")
    assert json.loads((uni / "COMPLETE").read_text())["zero_stage"] == 3

    seen = run_ranks(_capture_after_resume, world=1, args=(CONFIG, ovr, z3), timeout=300)[0]
    assert seen["universal"] and seen["step"] == 4 and seen["last_epoch"] == ref["last_epoch"] == 4
    assert sorted(seen["fp32"]) == sorted(ref["fp32"])
    for k in ("weights", "fp32", "exp_avg", "exp_avg_sq", "buffers"):
        for n, t in ref[k].items():
            assert torch.equal(seen[k][n], t), f"{k} {n}"
    for live, orig in zip(seen["groups"], ref["groups"], strict=True):
        for k in ("lr", "weight_decay", "betas", "eps"):
            assert live[k] == orig[k], f"param group {k}: {live[k]} != {orig[k]}"

    rc, out = run(cmd(run_dir, shapes, "train.steps=6", "train.save_every=4", ds=ds_json(tmp_path / "z2.json", 2)),
                  tmp_path)
    assert rc == 2 and "only its ZeRO-3 loader reads" in out, out[-3000:]
    rc, out = run(cmd(run_dir, shapes, "train.steps=6", "train.save_every=4", ds=z3), tmp_path)
    assert rc == 0, out[-3000:]
    assert "at step 4" in out and "universal checkpoint loader" in out
    m = metrics(run_dir)
    assert {5, 6} <= set(m) and all(torch.isfinite(torch.tensor(m[s]["loss"])) for s in (5, 6))


def _clear_launch_env(monkeypatch):
    from declip_ds.train.dist import LAUNCHER_VARS

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_NODES",
                "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE", *sum(LAUNCHER_VARS, ())):
        monkeypatch.setenv(var, "")  # recorded even when absent: what adopt_launcher_env sets is undone after
        monkeypatch.delenv(var)


def _mpi4py(monkeypatch, present: bool, size: int = 8, rank: int = 5, rank0_sends=("node0", "29611")):
    """mpi4py not installed, or a stand-in whose COMM_WORLD has ``size`` ranks, this one ``rank``; its bcast
    gives rank 0 its own value and the others ``rank0_sends``."""
    import types

    if not present:
        monkeypatch.setitem(sys.modules, "mpi4py", None)
        return
    calls = []
    comm = types.SimpleNamespace(Get_size=lambda: size, Get_rank=lambda: rank,
                                 bcast=lambda value, root=0: calls.append("bcast") or (value if rank == 0 else rank0_sends))
    module = types.ModuleType("mpi4py")
    module.MPI = types.SimpleNamespace(COMM_WORLD=comm, Finalize=lambda: calls.append("finalize"))
    monkeypatch.setitem(sys.modules, "mpi4py", module)
    return calls


@pytest.mark.parametrize("launcher", ["openmpi", "mvapich", "hydra", "srun"])
def test_mpirun_and_srun_ranks_are_adopted(monkeypatch, launcher):
    """mpirun and srun export their own rank variables, not RANK / WORLD_SIZE: every process used to become a
    world of one (all on GPU 0, in one output_dir). They are adopted before DeepSpeed starts; without a
    rendezvous address the error says what to export. Under mpirun with mpi4py, every rank leaves the
    rendezvous to DeepSpeed's MPI discovery, even with MASTER_ADDR in its own environment (remote ranks get
    only what -x forwards: ranks choosing by their own environment would take different paths)."""
    from declip_ds.config import ConfigError
    from declip_ds.train import dist as D

    _clear_launch_env(monkeypatch)
    _mpi4py(monkeypatch, False)
    triple = dict(zip(("openmpi", "mvapich", "hydra", "srun"), D.LAUNCHER_VARS))[launcher]
    for var, value in zip(triple, ("5", "8", "1")):
        monkeypatch.setenv(var, value)
    assert D.env_world_size() == 8
    with pytest.raises(ConfigError, match=f"launched as 8 processes \\({triple[1]}=8.*MASTER_ADDR and MASTER_PORT are "
                                          f"not set.*MASTER_ADDR=<the first"):
        D.adopt_launcher_env()
    assert "RANK" not in os.environ
    monkeypatch.setenv("MASTER_ADDR", "node1")
    with pytest.raises(ConfigError, match=r"but MASTER_PORT is not set"):
        D.adopt_launcher_env()
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert D.adopt_launcher_env() == 8
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    if launcher != "srun":  # with mpi4py: rank 0's address and port, whatever this rank's environment says
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(var)
        _mpi4py(monkeypatch, True)
        assert D.adopt_launcher_env() == 8
        assert [os.environ[v] for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")] == ["5", "1", "node0", "29611"]


def test_a_rank_left_over_in_the_shell_is_named_under_mpirun_or_srun(monkeypatch, capsys):
    """RANK exported in the user's shell reaches mpirun's ranks on the first node (over ssh) or every rank (hydra,
    srun). Alone (no WORLD_SIZE / LOCAL_RANK) it gives way to the launcher's rank on every rank, named in a
    warning: whether a rank adopts the launcher's values depends only on which variables are set, never on their
    values, so all ranks take one path (a RANK equal to one rank's own number once sent that rank alone into the
    MPI rendezvous while the others waited in DeepSpeed's MPI discovery). With all three set (a wrapper may set
    them on purpose) they are used as they are, with a warning when they differ from the launcher's; torchrun or
    the deepspeed launcher inside sets them itself."""
    from declip_ds.train import dist as D

    def fresh(triple, rank, **values):
        _clear_launch_env(monkeypatch)
        for var in ("TORCHELASTIC_RUN_ID", "CROSS_RANK"):
            monkeypatch.delenv(var, raising=False)
        for var, value in zip(triple, (str(rank), "4", str(rank))):
            monkeypatch.setenv(var, value)
        for var, value in {"MASTER_ADDR": "node1", "MASTER_PORT": "29500", **values}.items():
            monkeypatch.setenv(var, value)

    _mpi4py(monkeypatch, False)
    for launcher, triple in (("mpirun", D.LAUNCHER_VARS[0]), ("mpirun", D.LAUNCHER_VARS[2]),
                             ("srun", D.LAUNCHER_VARS[3])):
        for rank in range(4):  # RANK=0 left in the shell: every rank adopts its own
            fresh(triple, rank, RANK="0")
            assert D.adopt_launcher_env() == 4, (launcher, rank)
            assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == (str(rank), "4", str(rank))
            err = capsys.readouterr().err
            assert (f"warning: RANK=0 is set without WORLD_SIZE / LOCAL_RANK; the launcher made this process rank "
                    f"{rank} of 4 ({triple[1]}), which is used instead" in err) == (rank != 0), err
        # a WORLD_SIZE left over too: the DeepSpeed config and the resume plan, made before the adoption, see the
        # launcher's world size as the run will (they used 8, then the run had 4 ranks)
        fresh(triple, 1, RANK="1", WORLD_SIZE="8")
        assert D.env_rank() == (1, 4) and D.env_world_size() == 4
        assert D.adopt_launcher_env() == 4 and os.environ["WORLD_SIZE"] == "4"
        assert "warning: RANK=1 WORLD_SIZE=8 is set without LOCAL_RANK; the launcher made this process rank 1 of 4" \
            in capsys.readouterr().err
        # all three set and different from the launcher's: used as they are, named
        fresh(triple, 2, RANK="5", WORLD_SIZE="8", LOCAL_RANK="1")
        assert D.adopt_launcher_env() is None and os.environ["RANK"] == "5"
        err = capsys.readouterr().err
        assert (f"warning: RANK=5 WORLD_SIZE=8 is set, but {launcher} made this process rank 2 of 4 ({triple[1]})" in err
                and f"unset RANK, WORLD_SIZE and LOCAL_RANK before {launcher}" in err), err
        for same_path in ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"},  # what the launcher says
                          {"RANK": "5", "TORCHELASTIC_RUN_ID": "job1"}, {"RANK": "5", "CROSS_RANK": "0"}):
            fresh(triple, 2, **same_path)
            assert D.adopt_launcher_env() is None and os.environ["RANK"] == same_path["RANK"]
            assert capsys.readouterr().err == "", same_path


def test_a_rank_left_over_without_a_launcher(monkeypatch, capsys):
    """RANK left in the shell of a plain ``python train.py`` (no launcher, no WORLD_SIZE / LOCAL_RANK): DeepSpeed's
    init would look for a launcher through MPI (mpi4py missing: a traceback); it runs as a world of one, with a
    warning."""
    from declip_ds.train import dist as D

    _clear_launch_env(monkeypatch)
    monkeypatch.setenv("RANK", "3")
    assert D.adopt_launcher_env() is None and D.env_rank() == (0, 1)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert "warning: RANK=3 is set without WORLD_SIZE / LOCAL_RANK, and no launcher started this process: it runs " \
        "as a world of one" in capsys.readouterr().err
    _clear_launch_env(monkeypatch)
    for var, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "node1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(var, value)  # a launch of one's own (the evaluation scripts need no LOCAL_RANK): as it is
    assert D.adopt_launcher_env() is None and os.environ["RANK"] == "3" and capsys.readouterr().err == ""


def test_srun_with_the_pmi2_plugin_keeps_slurms_local_rank(monkeypatch):
    """Slurm's pmi2 plugin (MpiDefault=pmi2 on many clusters) sets PMI_RANK / PMI_SIZE in every task but no
    MPI_LOCALRANKID: the hydra entry matched first and every rank of a node took local rank 0 (GPU 0)."""
    from declip_ds.config import ConfigError
    from declip_ds.train import dist as D

    _clear_launch_env(monkeypatch)
    _mpi4py(monkeypatch, False)
    for var, value in (("PMI_RANK", "13"), ("PMI_SIZE", "16"), ("SLURM_PROCID", "13"), ("SLURM_STEP_NUM_TASKS", "16"),
                       ("SLURM_LOCALID", "5"), ("MASTER_ADDR", "node1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(var, value)
    assert D.launcher_ranks() == (13, 16, 5, "SLURM_STEP_NUM_TASKS")
    D.adopt_launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("13", "16", "5")
    _clear_launch_env(monkeypatch)  # PMI alone, no local rank anywhere: say so instead of guessing 0
    for var, value in (("PMI_RANK", "3"), ("PMI_SIZE", "4"), ("MASTER_ADDR", "node1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match="gives no local rank.*export LOCAL_RANK"):
        D.adopt_launcher_env()
    monkeypatch.setenv("LOCAL_RANK", "3")
    D.adopt_launcher_env()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("3", "3")


def test_local_rank_indexes_the_gpus_the_process_sees(monkeypatch):
    """srun --gpus-per-task=1: local rank 5 sees one GPU. DeepSpeed takes cuda:LOCAL_RANK itself (in its
    init and engine), so LOCAL_RANK is made an index of the visible GPUs; under Open MPI DeepSpeed insists on
    LOCAL_RANK = OMPI_COMM_WORLD_LOCAL_RANK, so that layout is refused with what to change. A loopback
    MASTER_ADDR for a launch over several nodes is refused too."""
    from declip_ds.config import ConfigError
    from declip_ds.train import dist as D

    monkeypatch.setattr(D.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(D.torch.cuda, "device_count", lambda: 1)
    _mpi4py(monkeypatch, False)
    for launcher, triple in (("srun", D.LAUNCHER_VARS[3]), ("openmpi", D.LAUNCHER_VARS[0])):
        _clear_launch_env(monkeypatch)
        for var, value in (*zip(triple, ("13", "16", "5")), ("MASTER_ADDR", "node1"), ("MASTER_PORT", "29500")):
            monkeypatch.setenv(var, value)
        if launcher == "srun":
            D.adopt_launcher_env()
            assert os.environ["LOCAL_RANK"] == "0"
        else:
            with pytest.raises(ConfigError, match="local rank 5 but sees 1 GPU.*CUDA_VISIBLE_DEVICES"):
                D.adopt_launcher_env()
    _clear_launch_env(monkeypatch)
    for var, value in (*zip(D.LAUNCHER_VARS[3], ("0", "16", "0")), ("SLURM_STEP_NUM_NODES", "2"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match="MASTER_ADDR=127.0.0.1 is a loopback address.*several nodes"):
        D.adopt_launcher_env()
    monkeypatch.setenv("MASTER_ADDR", "127.0.1.1")  # Debian's /etc/hosts entry for the host's own name
    with pytest.raises(ConfigError, match="is a loopback address"):
        D.adopt_launcher_env()
    assert not D._is_loopback("node1") and not D._is_loopback("10.0.0.1") and D._is_loopback("::1")


def test_mpirun_with_mpi4py_meets_at_rank_0s_address(monkeypatch):
    """Under mpirun, remote ranks get only what -x forwards: rank 0's MASTER_ADDR / MASTER_PORT (or its own address
    and 29500) reach every rank through MPI before any process group. An mpi4py built for another MPI (each
    process alone in its MPI world) is refused before the ranks would each bind the same port, as is one that
    does not load."""
    from declip_ds.config import ConfigError
    from declip_ds.train import dist as D

    _clear_launch_env(monkeypatch)
    for var, value in zip(D.LAUNCHER_VARS[0], ("0", "8", "0")):
        monkeypatch.setenv(var, value)
    calls = _mpi4py(monkeypatch, True, rank=0)
    monkeypatch.setattr(D, "_own_address", lambda: "10.1.2.3")
    assert D.adopt_launcher_env() == 8
    assert (os.environ["RANK"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("0", "10.1.2.3", "29500")
    # MPI is finalised right after: left to mpi4py's exit handler, a rank exiting on an error would wait there
    assert calls == ["bcast", "finalize"]
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var)

    def unresolvable():
        raise OSError("[Errno -2] Name or service not known")

    calls = _mpi4py(monkeypatch, True, rank=0)  # rank 0 cannot tell its address: still sent, so no rank hangs
    monkeypatch.setattr(D, "_own_address", unresolvable)
    with pytest.raises(ConfigError, match="rank 0 cannot tell its own address.*export MASTER_ADDR"):
        D.adopt_launcher_env()
    assert calls == ["bcast", "finalize"] and "RANK" not in os.environ
    _mpi4py(monkeypatch, True, size=1, rank=0)
    with pytest.raises(ConfigError, match="as 8 processes.*mpi4py sees an MPI world of 1.*another MPI library"):
        D.adopt_launcher_env()
    assert "RANK" not in os.environ

    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("libmpi.so.40: cannot open shared object file")

    monkeypatch.setitem(sys.modules, "mpi4py", Broken())
    with pytest.raises(ConfigError, match="mpi4py does not load.*libmpi.*uninstall it and export MASTER_ADDR"):
        D.adopt_launcher_env()


def test_the_process_group_outlasts_the_data_timeout():
    from declip_ds.train import dist as D

    assert D.process_group_timeout_s(15) == D.process_group_timeout_s(0) == 1800  # the default: 30 min
    assert D.process_group_timeout_s(60) == 3900  # a stalled read on one rank reaches the others as its error
