"""The trainer does not lose or silently change a run: exact resume, preemption (RELIABILITY.md §4)."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.test_train_e2e import ROOT, SMALL, shapes  # noqa: F401  (shapes is a fixture)

FIELDS = ("loss", "clip_loss", "lr", "grad_norm", "logit_scale")


def cmd(run_dir, shapes, *extra, ds=None, ranks=1):
    base = [str(ROOT / "train.py"), "--config", str(ROOT / "experiments/demo_shapes.yaml"), *SMALL,
            f"data.synthetic_root={shapes}", f"train.output_dir={run_dir}", "train.log_every=1",
            "eval.at_end=false", *extra]
    if ds is not None:
        base[1:1] = ["--ds_config", str(ds)]
    if ranks == 1:
        return [sys.executable, *base]
    port = str(29600 + os.getpid() % 300)
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", port, *base]


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def run(args, cwd, timeout=400, environ=None):
    """(exit code, stdout + stderr) of ``args``; on timeout the whole process group (launcher, ranks,
    DataLoader workers) is killed before the test fails, so that a hung run leaves nothing behind."""
    p = subprocess.Popen(args, cwd=cwd, env=environ or env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"timed out after {timeout} s (process group killed): {' '.join(map(str, args))}\n"
                    f"{(out + err)[-3000:]}")
    return p.returncode, out + err


def metrics(run_dir, occurrence=-1):
    """step -> logged record; with occurrence=0 the first record of a step, -1 the last (a resumed
    run appends the steps it redoes)."""
    by_step = {}
    for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        by_step.setdefault(r["step"], []).append(r)
    return {s: rs[occurrence] for s, rs in by_step.items()}


def assert_same_steps(a, b, steps):
    for s in steps:
        for f in FIELDS:
            if f in a[s] or f in b[s]:
                assert a[s][f] == b[s][f], f"step {s} {f}: {a[s][f]!r} != {b[s][f]!r}"  # bitwise (fp32)


def straight_vs_resumed(tmp_path, shapes, ds=None, ranks=1):
    """6 steps with a checkpoint at 3 and 6; then the step-6 checkpoint is lost (a crash before it)
    and the same command resumes from 3: steps 4-6 must repeat bit for bit. The ViT's stochastic depth
    (drop_path) draws from the trainer's torch RNG, so this holds only if the checkpoint restores it."""
    a = tmp_path / "run"
    args = cmd(a, shapes, "train.steps=6", "train.save_every=3", "model.vision.drop_path=0.2",
               "train.log_sample_keys=true", ds=ds, ranks=ranks)
    rc, out = run(args, tmp_path)
    assert rc == 0, out[-3000:]

    straight6 = tmp_path / "straight_step_6"
    shutil.move(a / "checkpoints" / "step_00000006", straight6)  # lost to the run, kept for the comparison
    saved = [torch.load(a / "checkpoints" / "step_00000003" / f"rank_{r:05d}.pt", weights_only=True)
             for r in range(ranks)]
    if ranks > 1:  # RELIABILITY §4.3: each rank draws its own dropout / drop-path masks (seeded per rank)
        assert not torch.equal(saved[0]["rng"]["torch"], saved[1]["rng"]["torch"])
    for r in range(ranks):  # where each loader stream's consumed batches end: skipped undecoded on resume
        data = saved[r]["data"]
        assert data["epoch_batches"] == 3 and data["cursors"][0][0] >= 3 * 8, data  # batch 8, one worker
        assert data["cursors"][0][1] == 3 and data["last_stream"] == 0, data  # its 3rd batch
    rc, out = run(args, tmp_path)
    assert rc == 0, out[-3000:]
    assert "at step 3" in out and "1 loader stream(s) skip the" in out
    first, again = metrics(a, 0), metrics(a, -1)
    assert sorted(again) == list(range(1, 7))
    assert all(first[s] is not again[s] for s in (4, 5, 6))
    assert_same_steps(first, again, range(4, 7))
    assert_same_state(straight6, a / "checkpoints" / "step_00000006")
    # RELIABILITY §4.2 from the sample-key log: after the resume each rank trains on the keys the
    # straight run trained on at those steps, in order (no gap, no repeat); the ranks' streams differ
    logged = []
    for r in range(ranks):
        lines = [json.loads(x) for x in (a / "sample_keys" / f"rank_{r:05d}.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6, 4, 5, 6] and {x["rank"] for x in lines} == {r}
        assert all(len(x["keys"]) == 8 and all(k.startswith("train_") for k in x["keys"]) for x in lines)
        assert [x["keys"] for x in lines[6:]] == [x["keys"] for x in lines[3:6]]
        logged.append([x["keys"] for x in lines[:6]])
    assert ranks == 1 or logged[0] != logged[1]


def _tensors(obj, prefix=""):
    """Every tensor in a (nested) checkpoint object, by its path."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def assert_same_state(tag_a, tag_b):
    """The two tags hold the same weights (model.safetensors), optimizer state (fp32 master partitions, Adam
    moments, DeepSpeed's model states) bit for bit (RELIABILITY §4.1)."""
    from safetensors.torch import load_file

    wa, wb = load_file(tag_a / "model.safetensors"), load_file(tag_b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    files = sorted(f.name for f in tag_a.glob("*states.pt"))
    assert files and files == sorted(f.name for f in tag_b.glob("*states.pt"))
    for name in files:
        ta = dict(_tensors(torch.load(tag_a / name, map_location="cpu", weights_only=False)))
        tb = dict(_tensors(torch.load(tag_b / name, map_location="cpu", weights_only=False)))
        assert ta.keys() == tb.keys() and ta, name
        different = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not different, f"{name}: {different[:5]}"


@pytest.mark.slow  # the default run: the 2-rank case below and test_epoch_mode_resumes_mid_epoch_exactly
def test_exact_resume_single_process(tmp_path, shapes):
    straight_vs_resumed(tmp_path, shapes)


def test_epoch_mode_resumes_mid_epoch_exactly(tmp_path, shapes):
    """data.mode=epoch, 3 loader workers on 4 shards: one stream reads two shards (8 batches), two read one
    (4), so after batch 12 only one stream is left. A resume from step 13 (in that tail) continues with the
    batches the straight run trained on, through the start of epoch 1 (16 batches per epoch), bit for bit;
    nothing of the epoch is seen twice."""
    data = tmp_path / "shards"
    data.mkdir()
    for i in range(4):
        shutil.copy(shapes / "train" / f"{i:05d}.tar", data / f"{i:05d}.tar")
    (data / "sizes.json").write_text(json.dumps({f"{i:05d}.tar": 32 for i in range(4)}))
    a = tmp_path / "run"
    args = cmd(a, shapes, f"data.train_shards={data}/{{00000..00003}}.tar", "data.mode=epoch", "data.workers=3",
               "train.steps=18", "train.save_every=13", "train.log_sample_keys=true")
    rc, out = run(args, tmp_path)
    assert rc == 0, out[-3000:]
    shutil.move(a / "checkpoints" / "step_00000018", tmp_path / "straight_step_18")
    data_state = torch.load(a / "checkpoints" / "step_00000013" / "rank_00000.pt", weights_only=True)["data"]
    assert data_state["epoch_batches"] == 13 and sorted(m for _, m in data_state["cursors"].values()) == [4, 4, 5]
    rc, out = run(args, tmp_path)
    assert rc == 0, out[-3000:]
    assert "at step 13" in out and "3 loader stream(s) skip the" in out and "resumes at the start" not in out
    first, again = metrics(a, 0), metrics(a, -1)
    assert [first[s]["epoch"] for s in (16, 17)] == [0, 1]
    assert all(first[s] is not again[s] for s in range(14, 19))
    assert_same_steps(first, again, range(14, 19))
    assert_same_state(tmp_path / "straight_step_18", a / "checkpoints" / "step_00000018")
    lines = [json.loads(x) for x in (a / "sample_keys" / "rank_00000.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [*range(1, 19), *range(14, 19)]
    assert [x["keys"] for x in lines[18:]] == [x["keys"] for x in lines[13:18]]
    epoch0 = [k for x in lines[:16] for k in x["keys"]]
    assert len(epoch0) == len(set(epoch0)) == 128  # each of the 4 shards' samples once
    # another shuffle buffer reorders each stream: its cursors would skip other samples than those trained on,
    # so the epoch starts again (named in the warning); a changed batch size alone keeps them
    shutil.rmtree(a / "checkpoints" / "step_00000018")
    rc, out = run([*args, "data.shuffle_buffer=20", "train.steps=14"], tmp_path)
    assert rc == 0 and "resumes at the start of epoch 0 (13 batches of it are seen again): data.shuffle_buffer " \
        "changed" in out, out[-3000:]
    shutil.rmtree(a / "checkpoints" / "step_00000014")
    rc, out = run([*args, "train.batch_size=4", "train.steps=14"], tmp_path)
    assert rc == 0 and "3 loader stream(s) skip the" in out and "resumes at the start" not in out, out[-3000:]


def test_resume_at_the_end_of_a_virtual_epoch_starts_the_next_one(tmp_path, shapes):
    """Resampled mode, a virtual epoch of 4 batches (data.num_samples=32, batch 8): a checkpoint at its last
    batch resumes into epoch 1 with the batches the straight run trained on, bit for bit (the loader stream
    fast-forwarded to its share used to make one batch more, shifting every later step)."""
    a = tmp_path / "run"
    args = cmd(a, shapes, "data.num_samples=32", "train.steps=6", "train.save_every=4", "train.log_sample_keys=true")
    rc, out = run(args, tmp_path)
    assert rc == 0, out[-3000:]
    shutil.move(a / "checkpoints" / "step_00000006", tmp_path / "straight_step_6")
    rc, out = run(args, tmp_path)
    assert rc == 0 and "at step 4" in out, out[-3000:]
    first, again = metrics(a, 0), metrics(a, -1)
    assert [first[s]["epoch"] for s in (4, 5)] == [0, 1] and all(first[s] is not again[s] for s in (5, 6))
    assert_same_steps(first, again, (5, 6))
    assert_same_state(tmp_path / "straight_step_6", a / "checkpoints" / "step_00000006")
    lines = [json.loads(x) for x in (a / "sample_keys" / "rank_00000.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6, 5, 6]
    assert [x["keys"] for x in lines[6:]] == [x["keys"] for x in lines[4:6]]


@pytest.mark.dist
@pytest.mark.parametrize("hook, says", [("loader_error@1:1", "rank 1's loader failed to start at step 1"),
                                        pytest.param("data_error@3:1", "rank 1's data failed at step 3",
                                                     marks=pytest.mark.slow)])
def test_a_data_error_on_one_rank_stops_every_rank_with_its_cause(tmp_path, shapes, hook, says):
    """Rank 1's loader fails to start (an unreadable sizes.json, workers that cannot start; also at each new
    epoch and after a rollback), or fails at step 3 (a stalled or unreadable shard): both ranks stop at once
    with exit 2, rank 1 with its error and rank 0 naming rank 1. Rank 0 used to go on into the next collective
    and, under NCCL, wait there for the 30-minute process-group timeout, which ends the job without naming the
    rank or the cause."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    rc, out = run_with(cmd(tmp_path / "run", shapes, "train.steps=6", ds=ds, ranks=2), tmp_path, hook, timeout=240)
    assert rc == 2, out[-3000:]
    assert f"error: test hook: {says}" in out, out[-3000:]
    assert "error: rank(s) [1] of 2 stopped on an error in their training data" in out, out[-3000:]
    assert "Traceback" not in out


@pytest.mark.dist
def test_an_epoch_with_nothing_for_one_rank_stops_every_rank(tmp_path, shapes):
    """Epoch mode shares shards out by count: here one of the two shards holds only corrupt samples, so in
    every epoch one rank has no batch. Every rank stops with the data error (exit 2) naming the cause; the
    rank with data used to go on into the loss's all-gather and wait there for the process-group timeout."""
    import io
    import tarfile

    data = tmp_path / "shards"
    data.mkdir()
    shutil.copy(shapes / "train" / "00000.tar", data / "00000.tar")
    with tarfile.open(data / "00001.tar", "w") as tar:
        for i in range(3):
            for ext, payload in (("jpg", b"not a jpeg"), ("txt", b"a broken sample")):
                info = tarfile.TarInfo(f"bad{i}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (data / "sizes.json").write_text(json.dumps({"00000.tar": 32, "00001.tar": 3}))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    args = cmd(tmp_path / "run", shapes, f"data.train_shards={data}/{{00000..00001}}.tar", "data.mode=epoch",
               "train.steps=20", ds=ds, ranks=2)
    rc, out = run(args, tmp_path, timeout=240)
    assert rc == 2, out[-3000:]
    assert out.count("gives no batch of 8 on rank(s) [") == 2 and "data.mode=resampled" in out, out[-3000:]


@pytest.mark.dist
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)])
def test_exact_resume_two_ranks(tmp_path, shapes, stage):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    straight_vs_resumed(tmp_path, shapes, ds=ds, ranks=2)


@pytest.mark.dist
@pytest.mark.slow
def test_zero3_resumed_run_saves_and_trains_on(tmp_path, shapes):
    """ZeRO-3, 2 ranks, grad_accum 2: a resumed run that saves a checkpoint and then trains on. The save's
    gather used to break the fetch trace DeepSpeed recorded after the load (the temperature was not in it):
    the next backward stopped with "tracing error ... model.logit_scale ... but got ()"."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    a = tmp_path / "run"
    args = cmd(a, shapes, "train.steps=5", "train.save_every=2", "train.keep_last=0", "train.grad_accum=2",
               ds=ds, ranks=2)
    rc, out = run(args, tmp_path, timeout=240)
    assert rc == 0, out[-3000:]

    for tag in ("step_00000004", "step_00000005"):  # lost: the rerun resumes from step 2 and saves step 4 itself
        shutil.rmtree(a / "checkpoints" / tag)
    rc, out = run(args, tmp_path, timeout=240)
    assert rc == 0, out[-3000:]
    assert "at step 2" in out and (a / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    first, again = metrics(a, 0), metrics(a, -1)
    assert sorted(again) == [1, 2, 3, 4, 5]
    assert all(first[s] is not again[s] for s in (3, 4, 5))
    assert_same_steps(first, again, range(3, 6))  # step 5 comes after the resumed run's save


def test_sigterm_saves_at_the_step_boundary_and_resumes_exactly(tmp_path, shapes):
    a, b = tmp_path / "straight", tmp_path / "preempted"
    rc, out = run(cmd(a, shapes, "train.steps=40", "train.save_every=1000"), tmp_path)
    assert rc == 0, out[-3000:]
    proc = subprocess.Popen(cmd(b, shapes, "train.steps=40", "train.save_every=1000"), cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((b / "metrics.jsonl").is_file() and len(metrics(b)) >= 2):
        time.sleep(0.2)
    # to the whole process group, as SLURM and the deepspeed launcher send it: the DataLoader worker
    # (data.workers=1) gets it too and must not die before the trainer has saved
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    stopped_at = max(metrics(b))
    assert stopped_at < 40, "the run finished before the signal arrived; make it longer"
    assert (b / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").is_file()
    assert "exit code 75" in out
    rc, out = run(cmd(b, shapes, "train.steps=40", "train.save_every=1000"), tmp_path)
    assert rc == 0, out[-3000:]
    assert f"at step {stopped_at}" in out
    assert_same_steps(metrics(a), metrics(b), range(1, 41))


def test_wall_time_limit_and_sigusr1_save_and_exit_75(tmp_path, shapes):
    """train.max_wall_minutes and SIGUSR1 (SLURM's --signal=USR1@T) stop the run like SIGTERM does."""
    a = tmp_path / "wall"
    rc, out = run(cmd(a, shapes, "train.steps=400", "train.save_every=1000", "train.max_wall_minutes=0.05"), tmp_path)
    assert rc == 75, out[-3000:]
    stopped_at = max(metrics(a))
    assert 0 < stopped_at < 400 and "wall-time limit" in out
    assert (a / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").is_file()
    b = tmp_path / "usr1"
    proc = subprocess.Popen(cmd(b, shapes, "train.steps=400", "train.save_every=1000"), cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((b / "metrics.jsonl").is_file() and len(metrics(b)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    stopped_at = max(metrics(b))
    assert stopped_at < 400 and f"signal {int(signal.SIGUSR1)}" in out
    assert (b / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").is_file()


def fault_env(spec):
    return dict(env(), DECLIP_DS_FAULTS=spec)


def run_with(args, cwd, spec, timeout=400):
    return run(args, cwd, timeout, environ=fault_env(spec))


def _zero_state(tag_dir):
    """Every tensor of a ZeRO-2 tag's optimizer partitions (fp32 master weights, Adam moments, step counts)
    and its fp32 model file, by name."""
    from safetensors.torch import load_file

    out = {f"model/{k}": v for k, v in load_file(tag_dir / "model.safetensors").items()}
    parts = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    assert len(parts) == 2, [p.name for p in tag_dir.iterdir()]

    def walk(prefix, x):
        if torch.is_tensor(x):
            out[prefix] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}/{i}", v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            out[prefix] = torch.tensor(x)

    for p in parts:
        walk(p.name, torch.load(p, map_location="cpu", weights_only=False)["optimizer_state_dict"])
    return out


@pytest.mark.dist
def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path, shapes):
    """RELIABILITY §4.13: a NaN in rank 1's loss at step 3 (bf16, ZeRO-2) skips that batch on both ranks,
    counted once, and step 3 is retried on the next batch. The skip leaves nothing behind: every rank's fp32
    master weights, both Adam moments and step counts, and the model file equal bit for bit those of a run
    that passes over the same batch from the start (bad_batches.jsonl), and so do the losses."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    a, b = tmp_path / "skipped", tmp_path / "passed_over"
    extra = ("train.steps=4", "train.save_every=4")
    rc, out = run_with(cmd(a, shapes, *extra, ds=ds, ranks=2), tmp_path, "nan_loss@3:1")
    assert rc == 0, out[-3000:]
    m = metrics(a)
    assert sorted(m) == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in m.values())
    assert m[2]["bad_steps"] == 0 and m[4]["bad_steps"] == 1  # counted once, for both ranks
    bad = [json.loads(x) for x in (a / "bad_batches.jsonl").read_text().splitlines()]
    assert len(bad) == 1 and bad[0]["step"] == 3 and bad[0]["reason"] == "non-finite loss"
    b.mkdir()
    shutil.copy(a / "bad_batches.jsonl", b / "bad_batches.jsonl")
    rc, out = run(cmd(b, shapes, *extra, ds=ds, ranks=2), tmp_path)
    assert rc == 0 and "passing over batch 3" in out, out[-3000:]
    sa, sb = (_zero_state(d / "checkpoints" / "step_00000004") for d in (a, b))
    for name in ("exp_avg", "exp_avg_sq", "step"):  # 2 param groups (decay, no decay) x 2 ranks' partitions
        assert sum(k.endswith(f"/{name}") for k in sa) == 4, name
    assert sum("single_partition_of_fp32_groups" in k for k in sa) == 4
    assert sa.keys() == sb.keys() and [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    assert [m[s]["loss"] for s in range(1, 5)] == [metrics(b)[s]["loss"] for s in range(1, 5)]


def test_updates_deepspeed_skips_are_counted_logged_and_limited(tmp_path, shapes):
    """A finite loss with non-finite gradients (bf16, ZeRO-2: DeepSpeed's overflow check skips the update) is
    not silent (DeepSpeed #8415): logged, counted in skipped_updates, the weights unchanged by that step;
    train.max_bad_steps such skips in a row stop the run with exit code 3."""
    from safetensors.torch import load_file

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    run_dir = tmp_path / "run"
    rc, out = run_with(cmd(run_dir, shapes, "train.steps=4", "train.save_every=1", "train.keep_last=0", ds=ds),
                       tmp_path, "inf_grad@3:0")
    assert rc == 0, out[-3000:]
    assert "step 3: DeepSpeed skipped the optimizer update (a non-finite gradient under bf16); 1 in a row" in out
    m = metrics(run_dir)
    assert [m[s]["skipped_updates"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in m.values())
    w = {s: load_file(run_dir / "checkpoints" / f"step_{s:08d}" / "model.safetensors") for s in (2, 3, 4)}
    assert all(torch.equal(w[2][k], w[3][k]) for k in w[2])  # step 3 changed nothing
    assert not all(torch.equal(w[3][k], w[4][k]) for k in w[3])  # step 4 trained
    rc, out = run_with(cmd(tmp_path / "again", shapes, "train.steps=8", "train.save_every=100",
                           "train.max_bad_steps=3", ds=ds), tmp_path, "inf_grad@3:0,inf_grad@4:0,inf_grad@5:0")
    assert rc == 3 and "DeepSpeed skipped 3 optimizer updates in a row" in out, out[-3000:]


def test_bad_steps_in_a_row_stop_and_a_restart_passes_over_them(tmp_path, shapes):
    run_dir = tmp_path / "run"
    args = cmd(run_dir, shapes, "train.steps=6", "train.save_every=2", "train.max_bad_steps=3")
    rc, out = run_with(args, tmp_path, "nan_loss@3x3:0")
    assert rc == 3 and "3 bad steps in a row" in out and "bad_batches.jsonl" in out
    bad = [json.loads(x) for x in (run_dir / "bad_batches.jsonl").read_text().splitlines()]
    assert [b["epoch_batch"] for b in bad] == [3, 4, 5]
    rc, out = run(args, tmp_path)  # no fault now: resumes at step 2 and passes over the recorded batches
    assert rc == 0, out[-3000:]
    assert out.count("passing over batch") == 3
    assert max(metrics(run_dir)) == 6


def test_loss_spike_is_skipped(tmp_path, shapes):
    run_dir = tmp_path / "run"
    rc, out = run_with(cmd(run_dir, shapes, "train.steps=14", "train.save_every=100", "train.spike_factor=5"),
                       tmp_path, "spike_loss@13:0")
    assert rc == 0, out[-3000:]
    assert "above 5.0 x its running mean" in out and metrics(run_dir)[14]["bad_steps"] == 1


def _corrupt_copy(src, dst):
    """``src`` (a synthetic training shard of 32 samples) with 4 of its samples made bad, one of each kind
    RELIABILITY §4.9 names: an undecodable JPEG, a missing .txt, a zero-byte image, a key seen before."""
    import io
    import tarfile

    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        first_key = tin.getmembers()[0].name.rsplit(".", 1)[0]
        for m in tin.getmembers():
            key, ext = m.name.rsplit(".", 1)
            data = tin.extractfile(m).read()
            n = int(re.search(r"(\d+)$", key).group(1)) % 32
            if n == 5 and ext == "jpg":
                data = b"\xff\xd8\xff\xe0 not really a jpeg"
            elif n == 10 and ext == "txt":
                continue
            elif n == 15 and ext == "jpg":
                data = b""
            elif n == 20:
                m.name = f"{first_key}.{ext}"  # the shard's first key again
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


@pytest.mark.dist
def test_corrupt_samples_two_ranks_epoch_mode(tmp_path, shapes):
    """RELIABILITY §4.9 through the trainer: 2 ranks, epoch mode, one shard each, one of them with 4 bad
    samples (bad JPEG, missing .txt, zero-byte image, duplicate key). Its rank has 28 samples (3 batches of
    8), the other 32 (4): the run completes, the 4 skips are logged once per kind and in the run's
    skipped_samples total (checkpointed, carried over a resume), and both ranks start epoch 1 together after
    3 steps (the other rank's 4th batch is not waited for) and save the same data position."""
    from declip_ds.data.wds import SAMPLE_SKIP_KINDS

    data = tmp_path / "shards"
    data.mkdir()
    _corrupt_copy(shapes / "train" / "00000.tar", data / "00000.tar")
    shutil.copy(shapes / "train" / "00001.tar", data / "00001.tar")
    (data / "sizes.json").write_text(json.dumps({"00000.tar": 32, "00001.tar": 32}))
    run_dir = tmp_path / "run"
    rc, out = run(cmd(run_dir, shapes, f"data.train_shards={data}/{{00000..00001}}.tar", "data.mode=epoch",
                      "train.steps=4", "train.save_every=4", ranks=2), tmp_path)
    assert rc == 0, out[-3000:]
    m = metrics(run_dir)
    assert sorted(m) == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in m.values())
    assert [m[s]["epoch"] for s in (1, 2, 3, 4)] == [0, 0, 0, 1]
    assert "epoch 0 ended after 3 batches: rank(s) [0] ran out of data; the rest of rank(s) [1]'s" in out, out[-3000:]
    kinds = ("decode_error", "missing_text", "empty_member", "duplicate_key")
    epoch0 = {k: sum(m[s].get(f"skipped/{k}", 0) for s in (1, 2, 3)) for k in SAMPLE_SKIP_KINDS}
    assert {k: v for k, v in epoch0.items() if v} == dict.fromkeys(kinds, 1)
    for k in kinds:  # each bad sample is named with its shard
        assert re.search(rf"skipped {k} in shard \S*0000[01].tar", out), k
    assert m[3]["skipped_samples"] == 4 and m[4]["skipped_samples"] >= 4  # the run's total, both ranks
    tag = run_dir / "checkpoints" / "step_00000004"
    states = [torch.load(tag / f"rank_{r:05d}.pt", weights_only=True)["data"] for r in (0, 1)]
    assert [(s["epoch"], s["epoch_batches"]) for s in states] == [(1, 1), (1, 1)]
    saved = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["skipped_total"]
    assert sum(saved[k] for k in SAMPLE_SKIP_KINDS) == m[4]["skipped_samples"]
    # the total carries over a resume (here on one process: ZeRO 0 resumes at any world size)
    rc, out = run(cmd(run_dir, shapes, f"data.train_shards={data}/{{00000..00001}}.tar", "data.mode=epoch",
                      "train.steps=5", "train.save_every=100"), tmp_path)
    assert rc == 0 and "at step 4" in out, out[-3000:]
    assert metrics(run_dir)[5]["skipped_samples"] >= m[4]["skipped_samples"]


@pytest.mark.dist
def test_rank_killed_mid_save_loses_nothing(tmp_path, shapes):
    """Rank 1 dies after DeepSpeed wrote its part of step 6 (keep_last=2, saves at 2, 4, 6): step 6 never
    becomes complete, `latest` still names step 4, and retention has deleted neither 2 nor 4 (RELIABILITY
    §4.4, §4.8); the relaunch resumes from step 4, and its step-6 save then retires step 2."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    run_dir = tmp_path / "run"
    args = cmd(run_dir, shapes, "train.steps=6", "train.save_every=2", "train.keep_last=2", ds=ds, ranks=2)
    rc, out = run_with(args, tmp_path, "crash_in_save@6:1")
    assert rc != 0
    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000004"
    assert all((ck / f"step_{s:08d}" / "COMPLETE").is_file() for s in (2, 4))
    assert not (ck / "step_00000006" / "COMPLETE").exists()
    # rank 1 does not see step 4 (a stale network-filesystem listing): the ranks must not resume from
    # different steps; the run stops before training, naming both views, and moves nothing
    logged = (run_dir / "metrics.jsonl").read_text()
    rc, out = run_with(args, tmp_path, "hide_newest@4:1")
    assert rc == 2, out[-3000:]
    assert re.search(r"rank 0: \S*step_00000004; rank 1: \S*step_00000002", out), out[-3000:]
    assert (run_dir / "metrics.jsonl").read_text() == logged  # no step was taken
    assert all((ck / f"step_{s:08d}" / "COMPLETE").is_file() for s in (2, 4)) and not list(ck.glob("abandoned_*"))
    rc, out = run(args, tmp_path)
    assert rc == 0, out[-3000:]
    assert "at step 4" in out and (ck / "step_00000006" / "COMPLETE").is_file()
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000004", "step_00000006"]


def _stop_two_ranks(run_dir, args, cwd, request) -> tuple[int, str]:
    """Launch ``args`` (2 ranks), call ``request(launcher)`` once two steps are logged, wait for the exit."""
    proc = subprocess.Popen(args, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        n = len(metrics(run_dir)) if (run_dir / "metrics.jsonl").is_file() else 0
        deadline = time.time() + 300
        while time.time() < deadline and not ((run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= n + 2):
            time.sleep(0.2)
        request(proc)
        return proc.wait(timeout=180), proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _sigterm_rank_1(launcher) -> None:
    import psutil

    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)  # not its DataLoader worker
             if "--local_rank=1" in p.cmdline() and "deepspeed.launcher.launch" in p.parent().cmdline()]
    assert len(ranks) == 1, [p.cmdline() for p in psutil.Process(launcher.pid).children(recursive=True)]
    ranks[0].send_signal(signal.SIGTERM)


@pytest.mark.dist
def test_two_ranks_stop_on_rank_1s_signal_and_on_the_stop_file_exit_75(tmp_path, shapes):
    """RELIABILITY §4.7: SIGTERM to rank 1 only makes both ranks save at the same step boundary and exit 75,
    which the deepspeed launcher passes on. Then the rerun resumes there and <output_dir>/STOP
    (train.stop_file) stops it the same way (the launcher-independent request: a signal sent to a launcher
    gets the launcher's own exit status); the file is removed once the checkpoint is saved. Afterwards no
    DeepSpeed CPU all-reduce file is left in /dev/shm (DeepSpeed makes a 69 MB one per rank and never removes
    it; 300 of them had filled the development box's memory): each rank unlinks its own once all mapped them."""
    import glob

    run_dir = tmp_path / "run"
    args = cmd(run_dir, shapes, "train.steps=400", "train.save_every=1000", ranks=2)
    port = args[args.index("--master_port") + 1]
    shm = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"
    for stale in glob.glob(shm):  # from an earlier run on this port
        os.unlink(stale)
    stops = []
    for request in (_sigterm_rank_1, lambda launcher: (run_dir / "STOP").touch()):
        rc, out = _stop_two_ranks(run_dir, args, tmp_path, request)
        assert rc == 75, out[-3000:]
        stopped_at = max(metrics(run_dir))
        tag = run_dir / "checkpoints" / f"step_{stopped_at:08d}"
        assert (tag / "COMPLETE").is_file() and (tag / "rank_00000.pt").is_file() and (tag / "rank_00001.pt").is_file()
        assert out.count(f"stopping at step {stopped_at} (") == 2, out[-3000:]  # both ranks, one step
        stops.append(stopped_at)
        if len(stops) == 1:  # rank 1 got the signal, rank 0 followed
            assert f"[rank 1] stopping at step {stopped_at} (signal {int(signal.SIGTERM)})" in out, out[-3000:]
            assert f"[rank 0] stopping at step {stopped_at} (another rank was asked to stop)" in out
    assert 2 <= stops[0] < stops[1] - 1 < 400 and f"at step {stops[0]}" in out
    assert f"stop file {run_dir / 'STOP'}" in out and not (run_dir / "STOP").exists()
    assert glob.glob(shm) == []


@pytest.mark.dist
def test_torchrun_restarts_after_a_killed_worker_and_resumes_exactly(tmp_path, shapes):
    """RELIABILITY §4.20: under `torchrun --max-restarts=1`, rank 1 SIGKILLs itself at step 5 (checkpoints at 2
    and 4). torchrun stops rank 0 and restarts both; the new workers form their group on a fresh key prefix of
    the agent's store (without it the restarted gloo ranks read the dead ones' addresses and fail or hang), the
    run resumes from step 4 and ends at step 6, and steps 1-6 equal an uninterrupted torchrun run bit for bit."""
    def torchrun(run_dir, port):
        base = cmd(run_dir, shapes, "train.steps=6", "train.save_every=2")
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
                "--master_port", str(port), *base[1:]]

    port = 29300 + os.getpid() % 250  # the other 2-rank tests use 29600 + pid % 300
    straight = tmp_path / "straight"
    rc, out = run(torchrun(straight, port), tmp_path, timeout=240)
    assert rc == 0, out[-3000:]
    run_dir = tmp_path / "run"
    rc, out = run_with(torchrun(run_dir, port + 1), tmp_path, "sigkill@5:1", timeout=300)
    assert rc == 0, out[-3000:]
    assert "exitcode: -9" in out and "rendezvous round 1" in out and "at step 4" in out, out[-3000:]
    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000006" and (ck / "step_00000006" / "COMPLETE").is_file()
    first, last = metrics(run_dir, 0), metrics(run_dir, -1)
    assert sorted(first) == sorted(last) == [1, 2, 3, 4, 5, 6]  # step 5 died before it was logged
    assert_same_steps(metrics(straight), last, range(1, 7))


@pytest.mark.dist
@pytest.mark.slow
def test_zero3_with_a_frozen_patch_embedding_saves_resumes_and_exports(tmp_path, shapes):
    """RELIABILITY §4.17 with the ViT recipes' frozen patch embedding, under ZeRO-3 on 2 ranks: the frozen
    weights stay as initialised and are in model.safetensors with every other key (a strict load of the
    model), the resume from step 2 repeats steps 3-4 bit for bit, and the export to open_clip gives the same
    embeddings."""
    from safetensors.torch import load_file

    from declip_ds.data.tokenizer import Tokenizer
    from declip_ds.models import load_pretrained

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    a = tmp_path / "run"
    args = cmd(a, shapes, "train.steps=4", "train.save_every=1", "train.keep_last=0",
               "model.vision.freeze_patch_embed=true", ds=ds, ranks=2)
    rc, out = run(args, tmp_path)
    assert rc == 0, out[-3000:]
    ck = a / "checkpoints"
    w = {s: load_file(ck / f"step_{s:08d}" / "model.safetensors") for s in (1, 4)}
    frozen = [k for k in w[1] if "patch_embed" in k]
    assert frozen and all(torch.equal(w[1][k], w[4][k]) for k in frozen)
    assert not all(torch.equal(w[1][k], w[4][k]) for k in w[1] if k not in frozen)
    ours = load_pretrained(ck / "step_00000004").eval()  # strict: every key of the model, no other
    shutil.rmtree(ck / "step_00000003"), shutil.rmtree(ck / "step_00000004")
    rc, out = run(args, tmp_path)
    assert rc == 0 and "at step 2" in out, out[-3000:]
    assert_same_steps(metrics(a, 0), metrics(a, -1), range(3, 5))
    out_dir = tmp_path / "open_clip"
    rc, out = run([sys.executable, "-m", "declip_ds.export", "--to", "open_clip", str(ck / "step_00000004"),
                   str(out_dir)], tmp_path)
    assert rc == 0, out[-3000:]
    exported = load_pretrained(out_dir / "open_clip_model.safetensors").eval()
    images, tokens = torch.randn(2, 3, 64, 64), Tokenizer(32)(["a red circle", "two blue squares"])
    with torch.no_grad():
        torch.testing.assert_close(exported.encode_image(images), ours.encode_image(images), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(exported.encode_text(tokens), ours.encode_text(tokens), atol=1e-5, rtol=1e-4)
