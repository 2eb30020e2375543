"""benchmarks/bench_train_step.py: the report's schema from a short in-process CPU run, and the
communication timer's bookkeeping."""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    # importable by name, so that spawned ranks find _rank_entry (they inherit sys.path)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("bench_train_step")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


TINY = ["--set", "data.synthetic.num_samples=64", "data.synthetic.shard_size=32",
        "data.synthetic.eval_samples_per_class=1", "data.shuffle_buffer=16",
        "model.vision.layers=1", "model.text.layers=1"]


def check_row(bench, row, method, zero, world):
    assert row["error"] is None
    assert (row["method"], row["zero"], row["world_size"]) == (method, zero, world)
    assert set(row["phases_s"]) == set(bench.PHASES) == {"data", "forward", "backward", "optimizer"}
    assert all(v >= 0 for v in row["phases_s"].values()), row["phases_s"]
    assert row["step_s"] > 0 and row["samples_per_s"] > 0
    # the phases are contiguous: they add up to the step, up to the loop's own bookkeeping
    assert sum(row["phases_s"].values()) == pytest.approx(row["step_s"], rel=0.05, abs=0.01)
    assert set(row["comm_s"]) == {*bench.PHASES, "total"} and all(v >= 0 for v in row["comm_s"].values())
    assert row["comm_s"]["total"] <= row["step_s"]
    assert set(row["comm_by_source_s"]) == {"loss", "deepspeed"}
    by_source = row["comm_by_source_s"]
    assert by_source["loss"] + by_source["deepspeed"] == pytest.approx(row["comm_s"]["total"])
    assert row["memory"]["kind"] == "rss_high_water_mark_growth" and row["memory"]["peak_mib"] >= 0
    assert math.isfinite(row["loss"]) and row["data"] == "shards" and row["precision"] == "fp32"
    assert len(row["per_rank"]) == world


def test_cpu_report_schema(bench, tmp_path, capsys):
    out = tmp_path / "report.json"
    report = bench.main(["--device", "cpu", "--methods", "clip", "declip", "--zero", "0", "--steps", "2",
                         "--warmup", "1", "--batch-size", "8", "--data-workers", "0", "--in-process",
                         "--data-dir", str(tmp_path / "shapes"), "--json", str(out), "--markdown", *TINY])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert {"command", "date", "machine", "measures"} <= set(report["meta"])
    assert [r["method"] for r in report["runs"]] == ["clip", "declip"]
    for row in report["runs"]:
        check_row(bench, row, row["method"], "0", 1)
        assert row["batch_size_per_rank"] == 8 and row["global_batch"] == 8 and row["steps"] == 2
    printed = capsys.readouterr().out
    assert "| method | ZeRO | ranks |" in printed and "| clip | 0 | 1 | 8 |" in printed


def test_a_run_stopped_at_its_time_limit_keeps_the_finished_rows(bench, tmp_path, monkeypatch, capsys):
    """run_all.sh stops a step with SIGINT at its limit: the JSON holds every finished row (rewritten after
    each), the interrupted flag is set, and the table of what finished is printed; it was written at the end
    only, so a cut step lost every row."""
    out, real, seen = tmp_path / "report.json", bench.run_in_process, []

    def second_is_interrupted(spec):
        if seen:
            seen.append(json.loads(out.read_text()))  # what is on disk when the stop arrives
            raise KeyboardInterrupt
        seen.append(spec)
        return real(spec)

    monkeypatch.setattr(bench, "run_in_process", second_is_interrupted)
    report = bench.main(["--device", "cpu", "--methods", "clip", "declip", "--zero", "0", "--steps", "1",
                         "--warmup", "0", "--batch-size", "8", "--data-workers", "0", "--in-process",
                         "--data-dir", str(tmp_path / "shapes"), "--json", str(out), *TINY])
    assert [r["method"] for r in seen[1]["runs"]] == ["clip"], seen[1]
    assert seen[1]["runs"][0].get("error") is None
    assert report["meta"]["interrupted"] and [r["method"] for r in report["runs"]] == ["clip"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    printed = capsys.readouterr().out
    assert "interrupted after 1 of 2 rows" in printed and "clip" in printed


@pytest.mark.parametrize("method", ["declip", "defilip"])
def test_gpu_rows_of_the_wordnet_recipes_run_without_wordnet(bench, method, monkeypatch, capsys):
    """The YFCC DeCLIP/DeFILIP recipes require WordNet (method.eda_require_wordnet); the GPU rows build
    them (real towers) on machines without NLTK's data: the benchmark turns the requirement off, says so,
    and the method's transform builds."""
    from declip_ds.data import text_aug
    from declip_ds.registry import get_method

    monkeypatch.setattr(text_aug, "wordnet_available", lambda: False)
    exp = bench.build_experiment(bench.Spec(method=method, zero="2", device="cuda",
                                            vision="vit_base_patch32_clip_224"))
    assert exp.method.eda_require_wordnet is False
    assert "method.eda_require_wordnet=false" in capsys.readouterr().err
    bench.TransformOnly(get_method(method), exp).sample_transform()  # no ConfigError
    clip = bench.build_experiment(bench.Spec(method="clip", zero="2", device="cuda", vision="vit_base_patch32_clip_224"))
    assert not getattr(clip.method, "eda_require_wordnet", False)


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_measure_the_loss_gather_and_gradient_reduction(bench, tmp_path):
    report = bench.main(["--device", "cpu", "--methods", "clip", "--zero", "2", "--world-size", "2", "--steps", "2",
                         "--warmup", "1", "--batch-size", "8", "--data-workers", "0",
                         "--data-dir", str(tmp_path / "shapes"), *TINY])
    row = report["runs"][0]
    check_row(bench, row, "clip", "2", 2)
    assert row["global_batch"] == 16
    assert row["comm_by_source_s"]["loss"] > 0 and row["comm_by_source_s"]["deepspeed"] > 0
    ops = row["per_rank"][0]["comm_ops"]
    assert ops["torch.all_gather"]["calls_per_step"] >= 1  # the loss's all-gather


def test_comm_timer_counts_a_nested_collective_once_and_async_waits(bench):
    timer = bench.CommTimer(sync=lambda: None)
    timer.phase = "backward"

    class Work:
        waited = False

        def wait(self):
            Work.waited = True

    inner = timer._wrap("torch.all_reduce", lambda t: None)
    outer = timer._wrap("ds.all_reduce", lambda t: inner(t))
    outer(None)
    handle = timer._wrap("ds.all_gather_into_tensor", lambda: Work())()
    handle.wait()
    assert Work.waited
    assert set(timer.ops) == {"ds.all_reduce", "ds.all_gather_into_tensor"}  # inner call not counted again
    assert timer.ops["ds.all_reduce"]["calls"] == 1 and timer.ops["ds.all_gather_into_tensor"]["calls"] == 1
    assert timer.by_phase["backward"] == pytest.approx(sum(op["seconds"] for op in timer.ops.values()))
    assert timer.by_source["loss"] == 0 and timer.by_source["deepspeed"] == timer.by_phase["backward"]
    timer.phase = None  # outside the timed phases nothing is recorded
    outer(None)
    assert timer.ops["ds.all_reduce"]["calls"] == 1
