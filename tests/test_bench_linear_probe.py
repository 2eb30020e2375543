"""benchmarks/bench_linear_probe.py: both ways run in their own process and agree."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_both_ways_agree_and_report(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_linear_probe
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = bench_linear_probe.main(["--N", "3000", "--D", "16", "--C", "10", "--reps", "1"])
    assert [r["way"] for r in rows] == ["autograd", "blocked"]
    assert all(r["median_s"] > 0 and r["extra_peak_rss_gib"] >= 0 for r in rows)
    assert "| blocked |" in capsys.readouterr().out
