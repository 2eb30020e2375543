"""Resume never loses or silently changes a run: a damaged checkpoint falls back to the previous one
(RELIABILITY.md §4.5), an abandoned branch is set aside, and config changes on resume are reported,
applied (optimizer settings) or refused (model shape) (§4.19)."""

import json
import shutil

import pytest

from tests.test_checkpoint_files import flip_a_bit  # inside the tensor bytes: it still unpickles
from tests.test_reliability import assert_same_steps, cmd, metrics, run, run_with
from tests.test_train_e2e import shapes  # noqa: F401  (fixture)


def truncate(f):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def with_resume(args, path):
    return [*args[:2], "--resume", str(path), *args[2:]]


def straight(tmp_path, shapes, ds=None, ranks=1):
    a = tmp_path / "run"
    args = cmd(a, shapes, "train.steps=6", "train.save_every=3", ds=ds, ranks=ranks)
    rc, out = run(args, tmp_path)
    assert rc == 0, out[-3000:]
    return a, args, metrics(a, 0)


def falls_back_to_step_3(args, tmp_path, first, message):
    """Rerun ``straight``'s command: it warns with ``message`` and redoes steps 4-6 bit for bit from step 3."""
    rc, out = run(args, tmp_path)
    assert rc == 0, out[-3000:]
    assert message in out and "at step 3" in out
    assert_same_steps(first, metrics(tmp_path / "run", -1), range(4, 7))


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, shapes):
    a, args, first = straight(tmp_path, shapes)
    ck = a / "checkpoints"
    # the load of step 6 fails after DeepSpeed restored module, optimizer and scheduler from it: the
    # fallback to step 3 overwrites all of it (steps 4-6 repeat the straight run bit for bit)
    rc, out = run_with(args, tmp_path, "load_fails@6:0")
    assert rc == 0, out[-3000:]
    assert "injected load failure" in out and "trying the next older complete checkpoint" in out
    assert "resumed from" in out and "at step 3" in out
    assert_same_steps(first, metrics(a, -1), range(4, 7))
    aside = [p for p in ck.iterdir() if p.name.startswith("abandoned_")]
    assert len(aside) == 1 and (aside[0] / "step_00000006").is_dir()  # moved, not deleted
    # (a damaged file's fallback: test_flipped_bit_..., and test_file_unreadable_on_one_rank_... without sums)
    # a tag the user named is not replaced by another: exit 2 naming the file
    bad = ck / "step_00000006" / "mp_rank_00_model_states.pt"
    truncate(bad)
    rc, out = run(with_resume(args, ck / "step_00000006"), tmp_path)
    assert rc == 2 and str(bad) in out and "Traceback" not in out, out[-3000:]
    # without checksums a missing model-states file still stops (DeepSpeed's load returns (None, None))
    kept = bad.read_bytes()
    bad.unlink()
    rc, out = run([*with_resume(args, ck / "step_00000006"), "train.checkpoint_integrity=none"], tmp_path)
    assert rc == 2 and f"{bad} (DeepSpeed's model states) is missing" in out and "step 0" not in out, out[-3000:]
    bad.write_bytes(kept)
    # every complete tag damaged: exit 2 naming the files, never a restart from step 0
    truncate(ck / "step_00000003" / "rank_00000.pt")
    rc, out = run(args, tmp_path)
    assert rc == 2, out[-3000:]
    assert "Refusing to start from step 0" in out and str(bad) in out and "step_00000003/rank_00000.pt" in out
    assert "starting at step 0" not in out


def test_flipped_bit_fails_the_checksum_falls_back_or_stops_in_strict_mode(tmp_path, shapes):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    a, args, first = straight(tmp_path, shapes, ds=ds)
    ck = a / "checkpoints"
    optim = ck / "step_00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert optim.name in (ck / "step_00000006" / "SHA256SUMS").read_text()
    # fallback (the default): the warning names the file, steps 4-6 are redone bit for bit from step 3
    flip_a_bit(optim)
    falls_back_to_step_3(args, tmp_path, first, f"{optim}: SHA-256 checksum mismatch")
    # strict: exit 2 naming the file and the way out; nothing trained, moved or deleted
    flip_a_bit(optim)
    damaged = optim.read_bytes()
    rc, out = run([*args, "train.checkpoint_integrity=strict"], tmp_path)
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    assert f"{optim}: SHA-256 checksum mismatch" in out and "train.checkpoint_integrity=fallback" in out
    assert "resumed from" not in out and optim.read_bytes() == damaged
    assert len([p for p in ck.iterdir() if p.name.startswith("abandoned_")]) == 1  # only the first fallback's
    # the control: without checksums the damaged optimizer state is taken as it is, silently
    rc, out = run([*args, "train.checkpoint_integrity=none"], tmp_path)
    assert rc == 0 and "resumed from" in out and "at step 6" in out and "checksum" not in out, out[-3000:]


@pytest.mark.dist
def test_file_unreadable_on_one_rank_makes_every_rank_fall_back(tmp_path, shapes):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    a, args, first = straight(tmp_path, shapes, ds=ds, ranks=2)
    truncate(a / "checkpoints" / "step_00000006" / "rank_00001.pt")  # read by rank 1 only
    # no checksums: the unpickling check of the files each rank reads finds it (with checksums on, the
    # rank whose share holds the file would, and the others follow the same way)
    rc, out = run([*args, "train.checkpoint_integrity=none"], tmp_path)
    assert rc == 0, out[-3000:]
    assert "rank 1: " in out and "step_00000006/rank_00001.pt" in out and "at step 3" in out
    assert_same_steps(first, metrics(a, -1), range(4, 7))


def test_resume_with_changed_lr_warns_and_follows_the_new_schedule(tmp_path, shapes):
    a, args, first = straight(tmp_path, shapes)
    shutil.rmtree(a / "checkpoints" / "step_00000006")
    rc, out = run([*args, "train.lr=1e-3"], tmp_path)
    assert rc == 0, out[-3000:]
    assert "train.lr: 0.002 -> 0.001" in out and "train.lr wins" in out
    again = metrics(a, -1)
    for s in (4, 5):  # warmup_init_lr = min_lr = 0: the whole schedule scales with train.lr
        assert again[s]["lr"] == pytest.approx(first[s]["lr"] / 2, rel=1e-12), s


def test_resume_with_changed_model_shape_exits_2_naming_the_key(tmp_path, shapes):
    a = tmp_path / "run"
    args = cmd(a, shapes, "train.steps=2", "train.save_every=2")
    rc, out = run(args, tmp_path)
    assert rc == 0, out[-3000:]
    rc, out = run([*args, "train.steps=4", "model.embed_dim=48"], tmp_path)
    assert rc == 2, out[-3000:]
    assert "model.embed_dim: 32 -> 48" in out and "Traceback" not in out
    assert (a / "checkpoints" / "step_00000002" / "COMPLETE").is_file()


def test_resume_none_sets_the_earlier_run_aside(tmp_path, shapes):
    a = tmp_path / "run"
    args = cmd(a, shapes, "train.steps=2", "train.save_every=1")
    rc, out = run(args, tmp_path)
    assert rc == 0, out[-3000:]
    rc, out = run(with_resume([*args, "train.steps=1"], "none"), tmp_path)
    assert rc == 0, out[-3000:]
    ck = a / "checkpoints"
    aside = [p for p in ck.iterdir() if p.name.startswith("abandoned_")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step_00000001", "step_00000002"]
    assert [p.name for p in ck.iterdir() if p.name.startswith("step_")] == ["step_00000001"]
