"""benchmarks/mini_clip_benchmark.py end to end on a very small run: every row and the RESULTS section."""

from __future__ import annotations

import json
import sys

from tests.test_train_e2e import ROOT, SMALL

sys.path.insert(0, str(ROOT / "benchmarks"))
import mini_clip_benchmark as mini  # noqa: E402


def test_mini_benchmark_writes_table_and_section(tmp_path):
    overrides = [o for o in SMALL if not o.startswith("data.synthetic.eval_samples_per_class")]
    overrides += ["data.synthetic.eval_samples_per_class=8"]
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Measured results\n\nkept text\n\n" + mini.START + "\nold\n" + mini.END + "\n\ntail\n")
    assert mini.main(["--steps", "2", "--methods", "slip", "--work-dir", str(tmp_path / "w"),
                      "--results", str(results_md), *overrides]) == 0
    data = json.loads((tmp_path / "w" / "results.json").read_text())
    assert list(data["results"]) == ["slip"] and data["meta"]["steps"] == 2  # one row: each method is a run
    for r in data["results"].values():
        assert set(r["zeroshot"]) == {"shape", "color", "shape_color"}
        assert set(r["probe"]) == {"shape", "color"}
        assert all(0.0 <= v <= 1.0 for v in [*r["zeroshot"].values(), *r["probe"].values()]) and r["wall_s"] > 0
    text = results_md.read_text()
    assert "kept text" in text and "tail" in text and "\nold\n" not in text  # only the section is replaced
    assert text.count(mini.START) == 1 and "| `slip` |" in text and "| chance |" in text
    # the heading is the command the user typed; the runs got the benchmark's caption default first
    assert data["meta"]["overrides"] == overrides and data["meta"]["run_overrides"] == [mini.DEFAULT_CAPTIONS, *overrides]
    assert "captions=rich" not in text.split("\n## Mini CLIP-Benchmark (`", 1)[1].split("`)", 1)[0]


def test_old_results_json_heading_drops_the_recorded_default(tmp_path):
    row = {"wall_s": 1.0, "zeroshot": {"shape": 0.5, "color": 0.9, "shape_color": 0.4}, "probe": {"shape": 0.6, "color": 0.95}}
    meta = {"steps": 300, "batch_size": 64, "overrides": [mini.DEFAULT_CAPTIONS, "train.lr=0.001"], "device": "CPU",
            "platform": "x", "date": "2026-11-27", "torch": "2"}
    (tmp_path / "results.json").write_text(json.dumps({"meta": meta, "results": {"clip": row}}))
    md = tmp_path / "R.md"
    md.write_text("# Measured results\n")
    assert mini.main(["--from-json", str(tmp_path / "results.json"), "--results", str(md)]) == 0
    assert "--steps 300 --results benchmarks/RESULTS.md train.lr=0.001`)" in md.read_text()
