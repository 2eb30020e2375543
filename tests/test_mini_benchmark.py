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
    assert mini.main(["--steps", "2", "--methods", "clip", "slip", "--work-dir", str(tmp_path / "w"),
                      "--results", str(results_md), *overrides]) == 0
    data = json.loads((tmp_path / "w" / "results.json").read_text())
    assert list(data["results"]) == ["clip", "slip"] and data["meta"]["steps"] == 2
    for r in data["results"].values():
        assert set(r["zeroshot"]) == {"shape", "color", "shape_color"}
        assert set(r["probe"]) == {"shape", "color"}
        assert all(0.0 <= v <= 1.0 for v in [*r["zeroshot"].values(), *r["probe"].values()]) and r["wall_s"] > 0
    text = results_md.read_text()
    assert "kept text" in text and "tail" in text and "\nold\n" not in text  # only the section is replaced
    assert text.count(mini.START) == 1 and "| `clip` |" in text and "| `slip` |" in text and "| chance |" in text
