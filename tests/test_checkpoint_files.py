"""Checkpoint bookkeeping that needs no process group: completeness, resume resolution, retention."""

from pathlib import Path

import pytest

from declip_ds.train import checkpoint as C


def make_tag(d, step, complete=True):
    t = d / C.tag_for(step)
    t.mkdir(parents=True)
    (t / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (t / C.MARKER).write_text("{}")
    return t


def test_only_complete_tags_count(tmp_path):
    ck = tmp_path / "checkpoints"
    make_tag(ck, 2)
    make_tag(ck, 10)
    make_tag(ck, 12, complete=False)  # a save that died half way
    assert C.complete_tags(ck) == ["step_00000002", "step_00000010"]
    assert C.resolve_resume("auto", tmp_path) == (ck, "step_00000010")


def test_auto_on_empty_run_dir_starts_fresh(tmp_path):
    assert C.resolve_resume("auto", tmp_path) is None
    assert C.resolve_resume("none", tmp_path) is None


def test_explicit_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(C.CheckpointError, match=str(missing)):
        C.resolve_resume(str(missing), tmp_path)


def test_explicit_incomplete_tag_is_refused(tmp_path):
    t = make_tag(tmp_path / "checkpoints", 4, complete=False)
    with pytest.raises(C.CheckpointError, match="incomplete"):
        C.resolve_resume(str(t), tmp_path)


def test_explicit_paths_resolve(tmp_path):
    ck = tmp_path / "checkpoints"
    t = make_tag(ck, 4)
    make_tag(ck, 6)
    assert C.resolve_resume(str(t), tmp_path) == (ck, "step_00000004")
    assert C.resolve_resume(str(tmp_path), tmp_path) == (ck, "step_00000006")
    assert C.resolve_resume(str(ck), tmp_path) == (ck, "step_00000006")


def test_retention_keeps_newest_complete_and_never_the_new_one(tmp_path):
    ck = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        make_tag(ck, s)
    make_tag(ck, 5, complete=False)  # leftover of a crashed save, older than the newest complete one
    make_tag(ck, 8, complete=False)  # a save in progress: untouched
    C._retain(ck, keep_last=2, keep="step_00000006")
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000004", "step_00000006", "step_00000008"]


def test_a_delete_that_fails_half_way_leaves_no_complete_tag_with_files_missing(tmp_path, monkeypatch, caplog):
    """Retention removes the commit marker before the files: a tag whose delete fails part way (a busy file
    on a network filesystem) is incomplete, so it is never resumed from, and a later retention retries it."""
    import shutil

    ck = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        make_tag(ck, s)
    real = shutil.rmtree

    def fails_half_way(d, *a, **k):
        (d / "mp_rank_00_model_states.pt").unlink()
        raise OSError(16, "Device or resource busy", str(d / ".nfs0001"))

    monkeypatch.setattr(shutil, "rmtree", fails_half_way)
    C._retain(ck, keep_last=2, keep="step_00000006")
    assert C.complete_tags(ck) == ["step_00000004", "step_00000006"]
    assert "could not delete old checkpoint" in caplog.text and (ck / "step_00000002").is_dir()
    monkeypatch.setattr(shutil, "rmtree", real)
    C._retain(ck, keep_last=2, keep="step_00000006")  # the leftover is an incomplete tag older than the newest
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000004", "step_00000006"]


def test_rng_state_round_trip():
    import random

    import numpy as np
    import torch

    state = C.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    C.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_unreadable_marker_falls_back_to_an_older_tag(tmp_path):
    ck = tmp_path / "checkpoints"
    make_tag(ck, 2)
    (make_tag(ck, 4) / C.MARKER).write_bytes(b"\xff{not json")
    t = C.plan_resume("auto", tmp_path, 1, 0)
    assert t.tag == "step_00000002" and not t.explicit
    with pytest.raises(C.CheckpointError, match="step_00000004/COMPLETE"):  # named: no fallback
        C.plan_resume(str(ck / "step_00000004"), tmp_path, 1, 0)
    (ck / "step_00000002" / C.MARKER).write_bytes(b"\xff")
    with pytest.raises(C.CheckpointError, match="Refusing to start from step 0"):  # never silently from scratch
        C.plan_resume("auto", tmp_path, 1, 0)


def test_resuming_an_older_tag_sets_the_newer_branch_aside(tmp_path):
    """--resume of step 500 while 900 and 1000 exist (the audit's g_branch.py): the newer tags are moved,
    not deleted, and --resume auto / retention only see this run's branch."""
    ck = tmp_path / "checkpoints"
    for s in (500, 900, 1000):
        make_tag(ck, s)
    (ck / "step_00001000_universal").mkdir()
    C._atomic_write(ck / "latest", "step_00001000")
    dest = C.set_aside_newer(ck, 500)
    assert sorted(p.name for p in dest.iterdir()) == ["step_00000900", "step_00001000", "step_00001000_universal"]
    assert (ck / "latest").read_text() == "step_00000500"
    for s in (600, 700):  # what save() does after each commit
        make_tag(ck, s)
        C._retain(ck, 2, keep=C.tag_for(s))
    assert C.complete_tags(ck) == ["step_00000600", "step_00000700"]
    assert C.resolve_resume("auto", tmp_path) == (ck, "step_00000700")
    assert (dest / "step_00001000" / C.MARKER).is_file()  # the user's data is still there
    assert C.set_aside_newer(ck, 700) is None  # nothing newer: nothing moves
    assert C.set_aside_newer(tmp_path / "nothing", 0) is None


def test_config_changes_lists_dotted_keys():
    old = {"train": {"lr": 2e-3, "betas": [0.9, 0.98]}, "model": {"embed_dim": 32}, "gone": 1}
    new = {"train": {"lr": 1e-3, "betas": (0.9, 0.98)}, "model": {"embed_dim": 32}, "added": 2}
    ch = C.config_changes(old, new)
    assert list(ch) == ["added", "gone", "train.lr"] and ch["train.lr"] == (2e-3, 1e-3)


def test_apply_hparams_puts_this_runs_optimizer_settings_back():
    """After a load restored a checkpoint's optimizer and LambdaLR (other lr, weight decay, betas, eps),
    the run's own settings win: per group, and the LR for the restored step from the new base LR."""
    from types import SimpleNamespace

    import torch

    def make(lr, wd, betas, eps):
        ps = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
        opt = torch.optim.AdamW([{"params": ps[:1], "weight_decay": wd}, {"params": ps[1:], "weight_decay": 0.0}],
                                lr=lr, betas=betas, eps=eps)
        return SimpleNamespace(optimizer=opt, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 10))

    old, new = make(2e-3, 0.3, (0.8, 0.9), 1e-6), make(1e-3, 0.1, (0.9, 0.98), 1e-8)
    for _ in range(3):
        old.optimizer.step()
        old.lr_scheduler.step()
    hp = C._hparams(new)
    new.optimizer.load_state_dict(old.optimizer.state_dict())  # what DeepSpeed's load does
    new.lr_scheduler.load_state_dict(old.lr_scheduler.state_dict())
    assert new.optimizer.param_groups[0]["weight_decay"] == 0.3 and new.lr_scheduler.base_lrs == [2e-3, 2e-3]
    C._apply_hparams(new, hp)
    groups = new.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-8 for g in groups)
    assert new.lr_scheduler.base_lrs == [1e-3, 1e-3] and new.lr_scheduler.last_epoch == 3
    assert [g["lr"] for g in groups] == new.lr_scheduler.get_last_lr() == [1e-3 * 0.4] * 2
    new.lr_scheduler.step()
    assert [g["lr"] for g in groups] == [1e-3 * 0.5] * 2


# ----------------------------------------------------------------------------- checksums (RELIABILITY §4.5)


def flip_a_bit(f, at=0.5):
    data = bytearray(f.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    f.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_tensor_loads_silently_without_checksums(tmp_path):
    """Why the sums exist: torch.load does not check the zip CRCs, so a damaged tensor loads as data."""
    import torch

    f = tmp_path / "optim_states.pt"
    torch.save({"exp_avg": torch.arange(50_000, dtype=torch.float32)}, f)
    flip_a_bit(f)
    assert not torch.equal(torch.load(f, weights_only=True)["exp_avg"], torch.arange(50_000, dtype=torch.float32))


def test_share_hashes_every_file_once_and_spreads_the_bytes():
    files = [(f"f{i}", s) for i, s in enumerate([100, 5, 90, 7, 50, 50, 3, 0])]
    for world in (1, 2, 3, 8, 11):
        shares = [C.share(files, world, r) for r in range(world)]
        assert sorted(n for s in shares for n in s) == sorted(n for n, _ in files)
    sizes = dict(files)
    load = [sum(sizes[n] for n in C.share(files, 2, r)) for r in range(2)]
    assert load == [153, 152]  # 100+50+3 | 90+50+7+5


def test_checksums_written_and_verified_by_shares(tmp_path):
    t = make_tag(tmp_path / "checkpoints", 3)
    (t / "zero").mkdir()
    (t / "zero" / "fp32.pt").write_bytes(b"a" * 1000)
    (t / "rank_00000.pt").write_bytes(b"b" * 10)
    (t / "rank_00000.tmp").write_bytes(b"leftover")  # temporary files are not covered
    C.write_checksums(t)
    sums = C.read_checksums(t)
    assert sorted(sums) == ["mp_rank_00_model_states.pt", "rank_00000.pt", "zero/fp32.pt"]
    # the format of sha256sum(1), so `sha256sum -c SHA256SUMS` checks a tag by hand
    assert (t / C.CHECKSUMS).read_text().splitlines()[2] == f"{C.sha256_file(t / 'zero/fp32.pt')}  zero/fp32.pt"
    for mode in ("fallback", "strict"):
        assert C.verify_tag(t, mode) is None
        assert [C.verify_tag(t, mode, r, 2) for r in range(2)] == [None, None]
    flip_a_bit(t / "zero" / "fp32.pt")
    (t / "rank_00000.pt").unlink()
    problems = C.verify_tag(t, "fallback")
    assert f"{t / 'zero/fp32.pt'}: SHA-256 checksum mismatch" in problems
    assert f"{t / 'rank_00000.pt'}: missing (listed in SHA256SUMS)" in problems
    # split over 2 ranks: the biggest file is rank 0's, and each problem is found by exactly one rank
    by_rank = [C.verify_tag(t, "fallback", r, 2) for r in range(2)]
    assert "zero/fp32.pt" in by_rank[0] and "rank_00000.pt" not in by_rank[0] and "rank_00000.pt" in by_rank[1]
    assert C.verify_tag(t, "none") is None


def test_tag_without_checksums_passes_unless_strict(tmp_path):
    t = make_tag(tmp_path / "checkpoints", 3)
    assert C.read_checksums(t) is None and C.verify_tag(t, "fallback") is None
    assert "train.checkpoint_integrity=strict only resumes from verified checkpoints" in C.verify_tag(t, "strict")
    (t / C.CHECKSUMS).write_text("not a checksum line\n")
    with pytest.raises(C.CheckpointError, match="SHA256SUMS: unreadable checksum list"):
        C.verify_tag(t, "fallback")


def test_evaluation_refuses_weights_that_fail_their_checksum(tmp_path):
    import torch
    from safetensors.torch import save_file

    from declip_ds.config import Experiment, save_config
    from declip_ds.models import build_model
    from declip_ds.models.pretrained import CheckpointFormatError, _load_ours

    exp = Experiment()
    model = build_model(exp.model)
    t = make_tag(tmp_path / "checkpoints", 3)
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(t / "model.safetensors"))
    save_config(exp, t / "config.yaml")
    C.write_checksums(t)
    loaded = _load_ours(t)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    flip_a_bit(t / "model.safetensors", at=0.9)
    with pytest.raises(CheckpointFormatError, match="model.safetensors: SHA-256 checksum mismatch"):
        _load_ours(t)


def test_the_universal_converter_names_its_own_argument(tmp_path):
    from declip_ds.train.universal import convert

    for path, match in ((tmp_path / "nope", "checkpoint .*nope: no such file or directory"),
                        (tmp_path, "checkpoint .*: no complete checkpoint")):
        with pytest.raises(C.CheckpointError, match=match) as e:
            convert(path)
        assert "--resume" not in str(e.value)  # train.py's flag, not this command's


def _agree(rank, world, views):
    from pathlib import Path

    view = views[rank]
    target = None if view is None else C.ResumeTarget(Path(view[0]), view[1])
    try:
        C.agree_on_target(target)
        return "agreed"
    except C.CheckpointError as e:
        return str(e)


@pytest.mark.dist
def test_ranks_that_see_different_checkpoints_stop_on_every_rank():
    """Each rank picks its tag before the process group exists: the same choice passes; a different tag,
    or none on one rank (a node-local output_dir), fails on every rank naming each rank's view (the
    end-to-end case is in test_reliability's mid-save test; every 2-rank run that starts fresh agrees on
    none)."""
    from tests.distributed import run_ranks

    same = [("/r/checkpoints", "step_00000004")] * 2
    assert run_ranks(_agree, 2, (same,)) == ["agreed", "agreed"]
    for views in ([same[0], None], [same[0], ("/r/checkpoints", "step_00000002")]):
        out = run_ranks(_agree, 2, (views,))
        assert out[0] == out[1] and "rank 0: /r/checkpoints/step_00000004; rank 1: " in out[0]
        assert ("no complete checkpoint" if views[1] is None else "step_00000002") in out[0]
        assert "--resume PATH" in out[0]


def _rollback(rank, world, root, cases):
    """plan_rollback on this rank for each case, whose run directory holds complete tags ``steps[rank]``."""
    from pathlib import Path

    out = []
    for name, steps in cases:
        run_dir = Path(root) / name / f"rank{rank}"
        for s in steps[rank]:
            make_tag(run_dir / "checkpoints", s)
        try:
            target = C.plan_rollback(run_dir, world, 0)
            out.append(None if target is None else target.tag)
        except C.CheckpointError as e:
            out.append(str(e))
    return out


@pytest.mark.dist
def test_ranks_agree_on_the_rollback_checkpoint(tmp_path):
    """The guard's rollback picks its tag on each rank: the same tag is loaded on every rank; a different
    one, or none on one rank (a stale listing), stops every rank with each rank's view (one rank stopping
    alone left the others in the load's collectives until the process-group timeout)."""
    from tests.distributed import run_ranks

    cases = [("same", [[2, 4], [2, 4]]), ("none", [[], []]), ("older", [[2, 4], [2]]), ("missing", [[2, 4], []])]
    r0, r1 = run_ranks(_rollback, 2, (str(tmp_path), cases))
    assert r0[:2] == r1[:2] == ["step_00000004", None]
    for a, b, view in zip(r0[2:], r1[2:], ("rank 1: step_00000002", "rank 1: no complete checkpoint")):
        for msg in (a, b):
            assert "cannot agree on a checkpoint" in msg and "rank 0: step_00000004; " + view in msg, (a, b)


def _fall_back(rank, world, older):
    """resume_from on this rank: step 6 fails to load on every rank, and the next older tag each rank
    finds is ``older[rank]`` (a listing that differs between ranks); returns the tags loaded or the error."""
    from pathlib import Path

    loaded = []

    def load(engine, method, target, seed, integrity):
        loaded.append(target.tag)
        if target.step == 6:
            raise C.UnreadableCheckpoint(f"rank {rank}: {target.tag}/mp_rank_00_model_states.pt is truncated")
        return {"step": target.step}

    C._hparams = lambda engine: {}
    C.check_config = lambda engine, target, config: {}
    C.load = load
    C.next_target = lambda ckpt_dir, below, w, z, failures: C.ResumeTarget(ckpt_dir, older[rank])
    try:
        target, _ = C.resume_from(None, None, C.ResumeTarget(Path("/r/checkpoints"), "step_00000006"), 0, {}, world, 1)
        return loaded, target.tag
    except C.CheckpointError as e:
        return loaded, str(e)


@pytest.mark.dist
def test_ranks_agree_again_on_the_tag_they_fall_back_to():
    """A tag that fails to load sends every rank to the next older one, which each rank again picks from its own
    listing: when those differ, every rank stops before loading it, naming both (one agreement on the first
    tag is not enough)."""
    from tests.distributed import run_ranks

    same = run_ranks(_fall_back, 2, (["step_00000004", "step_00000004"],))
    assert same == [(["step_00000006", "step_00000004"], "step_00000004")] * 2
    out = run_ranks(_fall_back, 2, (["step_00000004", "step_00000002"],))
    assert [loaded for loaded, _ in out] == [["step_00000006"]] * 2  # neither rank loaded its older tag
    msg = out[0][1]
    assert out[1][1] == msg and "rank 0: /r/checkpoints/step_00000004; rank 1: /r/checkpoints/step_00000002" in msg


def test_a_second_training_in_the_same_output_dir_is_refused_until_the_first_ends(tmp_path):
    """The run directory's lock: held by a live process (here a child holding it), a second taker gets an error
    naming the holder; the kernel drops it when the holder dies (even by SIGKILL), and the next run takes it."""
    import json
    import os
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    # the holder forks a child (as DataLoader workers are forked) that outlives it: a lock a child inherited
    # (flock's) would outlive the holder's SIGKILL and refuse the restarted run
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from pathlib import Path; from declip_ds.train import checkpoint as C; "
        f"assert C.lock_run_dir(Path({str(run)!r})) is None\n"
        "if os.fork() == 0:\n    time.sleep(20); os._exit(0)\n"
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = C.lock_run_dir(run)
        assert err and f'"pid": {holder.pid}' in err and "in use by another training" in err
        assert "give this run another train.output_dir" in err and str(run / "STOP") in err
        # the trainer asks before it touches the directory or generates data: exit 2 with that message
        root = Path(__file__).resolve().parents[1]
        p = subprocess.run([sys.executable, str(root / "train.py"), "--config", str(root / "experiments/demo_shapes.yaml"),
                            f"train.output_dir={run}", f"data.synthetic_root={tmp_path / 'shapes'}"],
                           capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(root)))
        assert p.returncode == 2 and "in use by another training" in p.stderr, p.stderr[-3000:]
        assert not (tmp_path / "shapes").exists() and not (run / "config.yaml").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    try:
        assert C.lock_run_dir(run) is None  # released with its holder, its forked child still running
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
    assert json.loads((run / C.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert C.lock_run_dir(run) is None  # this process holds it already
