"""Checkpoint bookkeeping that needs no process group: completeness, resume resolution, retention."""

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


def test_rng_state_round_trip():
    import random

    import numpy as np
    import torch

    state = C.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    C.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
