"""The bad-step guard (RELIABILITY.md §4): a skipped batch leaves no trace, rollback works in the middle
of gradient accumulation and in contrastive accumulation, rollbacks are limited, the guard's state
resumes exactly, and a partly written bad_batches.jsonl does not stop a restart."""

import json
import logging
import shutil

import pytest
import torch

from declip_ds.config import ConfigError, from_dict
from declip_ds.registry import get_method
from declip_ds.train.guard import BatchStats, Guard
from tests.test_methods import TINY, make_batch
from tests.test_reliability import cmd, metrics, run, run_with
from tests.test_train_e2e import shapes  # noqa: F401  (fixture)


def bad_lines(run_dir):
    return [json.loads(x) for x in (run_dir / "bad_batches.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- units


def test_truncated_last_line_of_bad_batches_is_ignored_and_cut_off(tmp_path, caplog):
    exp = from_dict({})
    good = json.dumps({"step": 3, "epoch": 0, "epoch_batch": 3, "reason": "non-finite loss", "keys": []})
    path = tmp_path / "bad_batches.jsonl"
    path.write_text(good + "\n" + good[:17])  # the run was killed while writing the second record
    with caplog.at_level(logging.WARNING, logger="declip_ds"):
        guard = Guard(exp.train, tmp_path)
    assert guard.is_known_bad(0, 3) and "partly written last line" in caplog.text
    assert path.read_text() == good + "\n"  # the next record starts on a line of its own
    guard.record("non-finite loss", 5, [(0, 6, ["k"])])
    assert [r["epoch_batch"] for r in map(json.loads, path.read_text().splitlines())] == [3, 6]
    path.write_text(good[:17] + "\n" + good + "\n")  # damage before the last line: named, not guessed at
    with pytest.raises(ConfigError, match="line 1"):
        Guard(exp.train, tmp_path)


def test_recorded_bad_batches_apply_to_their_own_data_stream(tmp_path, caplog):
    """A position (epoch, batch) names the same samples only in the same data stream (world size,
    data.workers, seed, mode, batch size, shards, ...): a record of another stream is not passed over (with a warning); records without a stream (older
    runs) still are."""
    exp = from_dict({})
    two = {"world_size": 2, "workers": 1, "seed": 0, "mode": "resampled"}
    Guard(exp.train, tmp_path, two).record("non-finite loss", 4, [(0, 4, ["k"])])
    assert json.loads((tmp_path / "bad_batches.jsonl").read_text())["stream"] == two
    with (tmp_path / "bad_batches.jsonl").open("a") as f:  # a record of an older version, no stream
        f.write(json.dumps({"step": 7, "epoch": 0, "epoch_batch": 7, "reason": "non-finite loss", "keys": []}) + "\n")
    assert Guard(exp.train, tmp_path, two).known == {(0, 4), (0, 7)}
    with caplog.at_level(logging.WARNING, logger="declip_ds"):
        one = Guard(exp.train, tmp_path, {**two, "world_size": 1})
    assert one.known == {(0, 7)} and "1 recorded bad batch(es) come from another data stream" in caplog.text
    # the trainer's stream also names the batch size, shards, weights, sample count and shuffle buffer; a
    # record of an older version without them still applies when the settings it names agree
    from declip_ds.train.engine import data_stream

    stream = data_stream(exp, 2)
    assert {k: stream[k] for k in two} == {**two, "workers": exp.data.workers}
    assert Guard(exp.train, tmp_path, {**stream, "workers": 1}).known == {(0, 4), (0, 7)}
    (tmp_path / "bad_batches.jsonl").unlink()
    Guard(exp.train, tmp_path, stream).record("non-finite loss", 3, [(0, 3, ["k"])])
    for change in ({"train": {"batch_size": 32}}, {"data": {"train_shards": ["a/{0..3}.tar"]}},
                   {"data": {"num_samples": 100}}, {"data": {"shuffle_buffer": 10}}, {"train": {"seed": 1}}):
        assert Guard(exp.train, tmp_path, data_stream(from_dict(change), 2)).known == set(), change
    assert Guard(exp.train, tmp_path, data_stream(from_dict({"train": {"lr": 1e-4}}), 2)).known == {(0, 3)}


def test_max_rollbacks_is_validated():
    assert from_dict({}).train.max_rollbacks == 3
    with pytest.raises(ConfigError, match="train.max_rollbacks"):
        from_dict({"train": {"max_rollbacks": -1}})


def test_skipped_nan_batch_leaves_batchnorm_and_queue_untouched():
    """What the trainer does around one micro-batch: BatchNorm statistics saved before the forward and
    restored when the guard skips it; DeCLIP's queue update deferred and dropped."""
    torch.manual_seed(0)
    method = get_method("declip")(from_dict({**TINY, "method": {"name": "declip", "queue_size": 64}})).train()
    method.defer_commit = True
    stats = BatchStats(method)
    assert len(stats.slots) >= 3 * 3  # the SimSiam heads' BatchNorms (running mean, var, count)

    def snapshot():
        return ({n: b.clone() for n, b in method.named_buffers()}, method.nn_queue.state_dict())

    def same(a, b):
        return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and \
            a[1]["ptr"] == b[1]["ptr"] and torch.equal(a[1]["bank"], b[1]["bank"])

    batch = make_batch(method, n=4)
    poisoned = {**batch, "image": batch["image"].clone()}
    poisoned["image"][0, 0, 0, 0] = float("nan")
    before = snapshot()
    stats.save()
    loss = method.total_loss(method(poisoned))
    assert not torch.isfinite(loss)  # the guard skips it
    method.commit_deferred(keep=False)
    stats.restore()
    assert same(snapshot(), before)

    stats.save()  # a good batch still counts
    loss = method.total_loss(method(batch))
    assert torch.isfinite(loss)
    method.commit_deferred(keep=True)
    after = snapshot()
    assert after[1]["ptr"] == before[1]["ptr"] + 8  # T2 and T1 of 4 samples
    assert not torch.equal(after[0]["predictor.bn1.running_mean"], before[0]["predictor.bn1.running_mean"])
    assert int(after[0]["predictor.bn1.num_batches_tracked"]) == int(before[0]["predictor.bn1.num_batches_tracked"]) + 2


# ----------------------------------------------------------------------------- training runs


def test_skipped_batch_leaves_no_trace_in_a_run(tmp_path, shapes):
    """DeCLIP (BatchNorm heads, queue): a run whose step-3 micro-batch the guard skips ends bit-identical
    (weights, BatchNorm statistics, every rank's queue) to a run that passes over that batch from the
    start (listed in bad_batches.jsonl)."""
    from safetensors.torch import load_file

    extra = ("train.steps=4", "train.save_every=4", "method.name=declip", "method.queue_size=64")
    a, b = tmp_path / "skipped", tmp_path / "passed_over"
    rc, out = run_with(cmd(a, shapes, *extra), tmp_path, "nan_loss@3:0")
    assert rc == 0 and "skipped on every rank" in out, out[-3000:]
    b.mkdir()
    shutil.copy(a / "bad_batches.jsonl", b / "bad_batches.jsonl")
    rc, out = run(cmd(b, shapes, *extra), tmp_path)
    assert rc == 0 and "passing over batch 3" in out, out[-3000:]
    wa, wb = (load_file(str(d / "checkpoints/step_00000004/model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and any("running_mean" in k for k in wa)
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    qa, qb = (torch.load(d / "checkpoints/step_00000004/rank_00000.pt", weights_only=True)["method"]["nn_queue"]
              for d in (a, b))
    assert qa["ptr"] == qb["ptr"] and torch.equal(qa["bank"], qb["bank"])
    ma, mb = metrics(a), metrics(b)
    assert [ma[s]["loss"] for s in range(1, 5)] == [mb[s]["loss"] for s in range(1, 5)]


@pytest.mark.parametrize("zero", [None, pytest.param({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
                                                    marks=[pytest.mark.dist, pytest.mark.slow], id="zero2-bf16-2ranks")])
def test_rollback_in_the_middle_of_accumulation_equals_a_restart(tmp_path, shapes, zero):
    """grad_accum=2; step 4's first micro-batch is back-propagated, its second is bad twice -> rollback to
    step 2. The steps redone after the rollback must equal those of a fresh restart from step 2 that
    passes over the same batches: no stale gradient, DeepSpeed at an accumulation boundary."""
    run_dir, ds, ranks = tmp_path / "run", None, 1 if zero is None else 2
    if zero is not None:
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps(zero))
    args = cmd(run_dir, shapes, "train.steps=6", "train.save_every=2", "train.grad_accum=2",
               "train.on_bad_steps=rollback", "train.max_bad_steps=2", "train.keep_last=0",
               "train.log_sample_keys=true", ds=ds, ranks=ranks)
    rc, out = run_with(args, tmp_path, "nan_loss@4+1x2:0")
    assert rc == 0, out[-3000:]
    assert out.count("rolled back to step 2") == ranks  # logged by every rank
    rolled = metrics(run_dir)
    assert sorted(rolled) == list(range(1, 7))
    key_log = run_dir / "sample_keys" / "rank_00000.jsonl"
    before = [json.loads(x) for x in key_log.read_text().splitlines()]
    # the steps redone after the rollback are logged again; step 4's first try (one micro-batch trained
    # on, then the rollback) is not
    assert [x["step"] for x in before] == [1, 2, 3, 3, 4, 5, 6] and all(len(x["keys"]) == 16 for x in before)
    for tag in ("step_00000004", "step_00000006"):
        shutil.rmtree(run_dir / "checkpoints" / tag)
    rc, out = run(args, tmp_path)
    assert rc == 0 and "at step 2" in out, out[-3000:]
    restarted = metrics(run_dir)
    for s in range(3, 7):
        for f in ("loss", "lr", "grad_norm", "logit_scale"):
            assert rolled[s][f] == restarted[s][f], f"step {s} {f}: {rolled[s][f]!r} != {restarted[s][f]!r}"
    again = [json.loads(x) for x in key_log.read_text().splitlines()][len(before):]
    assert [x["step"] for x in again] == [3, 4, 5, 6] and [x["keys"] for x in again] == [x["keys"] for x in before[3:]]


def test_rollbacks_to_the_same_checkpoint_are_limited(tmp_path, shapes):
    run_dir = tmp_path / "run"
    args = cmd(run_dir, shapes, "train.steps=4", "train.save_every=2", "train.on_bad_steps=rollback",
               "train.max_bad_steps=2", "train.max_rollbacks=2")
    rc, out = run_with(args, tmp_path, "nan_loss@3x1000:*", timeout=200)  # step 3 is always bad
    assert rc == 3, out[-3000:]
    assert out.count("rolled back to step 2") == 2 and "train.max_rollbacks=2" in out
    assert len(bad_lines(run_dir)) == 2 * 3  # max_bad_steps per try: before each rollback and the last one


def test_rollback_before_the_first_checkpoint_stops_and_says_so(tmp_path, shapes):
    run_dir = tmp_path / "run"
    args = cmd(run_dir, shapes, "train.steps=4", "train.save_every=2", "train.on_bad_steps=rollback",
               "train.max_bad_steps=2")
    rc, out = run_with(args, tmp_path, "nan_loss@1x1000:*")
    assert rc == 3, out[-3000:]
    assert "no complete checkpoint to roll back to yet" in out and "train.save_every" in out, out[-3000:]
    assert "rolled back" not in out and len(bad_lines(run_dir)) == 2


def test_contrastive_accumulation_shares_the_bad_step_policy(tmp_path, shapes):
    """train.accumulation=contrastive: skips are logged, counted and recorded (all k micro-batches of the
    skipped contrastive batch), and on_bad_steps=rollback rolls back instead of stopping."""
    run_dir = tmp_path / "run"
    args = cmd(run_dir, shapes, "train.steps=4", "train.save_every=2", "train.grad_accum=2",
               "train.accumulation=contrastive", "train.on_bad_steps=rollback", "train.max_bad_steps=2",
               "train.log_sample_keys=true")
    rc, out = run_with(args, tmp_path, "nan_loss@3x2:0")
    assert rc == 0, out[-3000:]
    assert out.count("skipped on every rank") == 2 and out.count("rolled back to step 2") == 1
    bad = bad_lines(run_dir)
    assert len(bad) == 4 and len({(r["epoch"], r["epoch_batch"]) for r in bad}) == 4
    assert metrics(run_dir)[4]["bad_steps"] == 2
    assert (run_dir / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    logged = [json.loads(x) for x in (run_dir / "sample_keys" / "rank_00000.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged] == [1, 2, 3, 4] and all(len(x["keys"]) == 16 for x in logged)


def test_guard_state_resumes_exactly(tmp_path, shapes):
    """spike_factor>0: the running mean and counts are checkpointed per rank, so a run resumed at step 12
    flags the same spike at step 13 as the straight run and continues bit for bit."""
    run_dir = tmp_path / "run"
    args = cmd(run_dir, shapes, "train.steps=14", "train.save_every=12", "train.spike_factor=5")
    rc, out = run_with(args, tmp_path, "spike_loss@13:0")
    assert rc == 0 and "above 5.0 x its running mean" in out, out[-3000:]
    straight = metrics(run_dir)
    rank_file = run_dir / "checkpoints" / "step_00000014" / "rank_00000.pt"
    want = torch.load(rank_file, weights_only=True).get("guard")
    shutil.rmtree(run_dir / "checkpoints" / "step_00000014")  # lost, with the spike's record: the resumed
    (run_dir / "bad_batches.jsonl").unlink()  # run meets the same batch and must flag it itself
    rc, out = run_with(args, tmp_path, "spike_loss@13:0")
    assert rc == 0 and "at step 12" in out, out[-3000:]
    assert "above 5.0 x its running mean" in out
    resumed = metrics(run_dir)
    for s in (13, 14):
        for f in ("loss", "bad_steps", "grad_norm", "lr"):
            assert straight[s][f] == resumed[s][f], f"step {s} {f}: {straight[s][f]!r} != {resumed[s][f]!r}"
    assert want["seen"] == 14 and want["total"] == 1  # this rank's file holds the guard's state
    assert torch.load(rank_file, weights_only=True)["guard"] == want


def _known_after_agreement(rank, world, root):
    """Rank r reads its own copy of bad_batches.jsonl (a stale network-filesystem view): rank 0 two records, rank
    1 one of them and a third; returns (the batches it passes over, whether it warned that the views differ)."""
    from pathlib import Path

    from declip_ds.train.guard import Guard

    run_dir = Path(root) / f"view{rank}"
    run_dir.mkdir(parents=True, exist_ok=True)
    positions = [(0, 3), (0, 7)] if rank == 0 else [(0, 3), (1, 2)]
    (run_dir / "bad_batches.jsonl").write_text("".join(
        json.dumps({"step": 1, "epoch": e, "epoch_batch": b, "reason": "non-finite loss"}) + "\n" for e, b in positions))
    import logging

    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("declip_ds").addHandler(handler)
    guard = Guard(from_dict({}).train, run_dir)
    guard.agree()
    return sorted(guard.known), any("the ranks read different records" in w for w in warned)


@pytest.mark.dist
def test_every_rank_passes_over_the_same_recorded_batches(tmp_path):
    """Each rank reads bad_batches.jsonl itself; ranks that read different versions would pass over different
    batches and pair their collectives wrongly from then on. After the agreement all pass over the union."""
    from tests.distributed import run_ranks

    union = [(0, 3), (0, 7), (1, 2)]
    assert run_ranks(_known_after_agreement, 2, (str(tmp_path),)) == [(union, True), (union, False)]  # rank 0 warns


def test_a_test_hook_before_the_process_group_knows_mpiruns_rank(monkeypatch):
    """Hooks that fire before the process group exists (hide_newest, when --resume auto plans) read the rank the
    launcher gives: under mpirun / srun that is its own variable (RANK is adopted only later), not rank 0 for all."""
    from declip_ds.train import guard
    from declip_ds.train.dist import LAUNCHER_VARS

    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT", *sum(LAUNCHER_VARS, ())):
        monkeypatch.delenv(var, raising=False)
    for var, value in zip(LAUNCHER_VARS[0], ("1", "2", "1")):
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("DECLIP_DS_FAULTS", "hide_newest@4:1")
    monkeypatch.setattr(guard, "_FIRED", {})
    monkeypatch.setattr(guard, "_SEEN", {})
    assert guard.fault("hide_newest", 4) and not guard.fault("hide_newest", 4)  # once, on rank 1
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    monkeypatch.setattr(guard, "_FIRED", {})
    assert not guard.fault("hide_newest", 4)
