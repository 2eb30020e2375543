"""The kernel benchmarks run (CPU: tiny grid, torch paths) and accept tile sweeps for the GPU rows."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_contrastive  # noqa: E402
import bench_filip  # noqa: E402


def run(script, tmp_path, *args, interpret=False):
    """The script in a subprocess; TRITON_INTERPRET (set for the whole suite by conftest) only with interpret."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--out", str(tmp_path), "--reps", "2",
                           "--warmup", "1", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    return proc


def test_bench_contrastive_cpu_grid_and_tile_specs(tmp_path):
    proc = run("bench_contrastive.py", tmp_path, "--B", "64", "128", "--D", "32", "--tiles", "fwd_bm=64,fwd_bn=128")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the triton rows need a GPU" in proc.stdout
    rows = list(csv.DictReader(open(tmp_path / "contrastive.csv")))
    assert {(r["method"], r["B"]) for r in rows} == {("eager", "64"), ("torch", "64"), ("eager", "128"), ("torch", "128")}
    assert all(r["status"] == "ok" and float(r["fwd_bwd_ms"]) > 0 for r in rows)


def test_bench_contrastive_kernel_rows_run_interpreted(tmp_path):
    """The kernel rows and --tiles rows (as run_all.sh sweeps them) go through the same code under the
    interpreter; with only kernel rows asked for on a CPU without it, the (empty) table still prints."""
    proc = run("bench_contrastive.py", tmp_path, "--B", "40", "--D", "24", "--methods", "triton",
               "--tiles", "bwd_bd=16", "fwd_bm=24", "fwd_bm=16,fwd_bn=32,fwd_warps=4", "bwd_chunk=16,g_bm=16",
               interpret=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "triton rows run interpreted" in proc.stdout
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "contrastive.csv"))}
    assert set(rows) == {"triton", "triton[bwd_bd=16]", "triton[fwd_bm=24]", "triton[fwd_bm=16,fwd_bn=32,fwd_warps=4]",
                         "triton[bwd_chunk=16,g_bm=16]"}
    # a row that cannot run (24-row tiles: not a power of 2, as a compile error on a GPU) is recorded, the rest run
    assert rows.pop("triton[fwd_bm=24]")["status"].startswith("ERROR: ") and "power of 2" in proc.stdout
    assert all(r["status"] == "ok" for r in rows.values())
    proc = run("bench_contrastive.py", tmp_path, "--B", "40", "--D", "24", "--methods", "triton", "--tiles", "bwd_bd=16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(no rows)" in proc.stdout


def test_bench_filip_cpu_grid(tmp_path):
    proc = run("bench_filip.py", tmp_path, "--B", "8", "--Ti", "6", "--Tt", "5", "--D", "16", "--tiles", "64x128x32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "filip.csv")))
    assert {r["method"] for r in rows} == {"eager", "torch"} and all(r["status"] == "ok" for r in rows)


def test_bench_filip_kernel_rows_run_interpreted(tmp_path):
    """The GPU-only rows (triton, triton_nomask, triton_saved and --tiles rows with their extras) go through
    the same code under the interpreter, so a GPU session does not find their bugs first."""
    proc = run("bench_filip.py", tmp_path, "--B", "3", "--Ti", "6", "--Tt", "5", "--D", "16",
               "--methods", "triton", "triton_nomask", "triton_kernels", "triton_saved", "triton_saved_kernels",
               "--tiles", "16x16x16,group=1", "16x16x16x4x1,BD=16,save=1,kernels=1", "16x32x16,save=1",
               "16x16x16,kernels=1", "4x16x16", interpret=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "triton rows run interpreted" in proc.stdout
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "filip.csv"))}
    assert set(rows) == {"triton", "triton_nomask", "triton_kernels", "triton_saved", "triton_saved_kernels",
                         "triton[16x16x16,group=1]", "triton[16x16x16x4x1,BD=16,save=1,kernels=1]",
                         "triton[16x32x16,save=1]", "triton[16x16x16,kernels=1]", "triton[4x16x16]"}
    assert rows["triton[4x16x16]"]["status"] == "skipped: tiles smaller than one sample"
    assert all(r["status"] == "ok" for k, r in rows.items() if k != "triton[4x16x16]")


@pytest.mark.parametrize("bench", [bench_contrastive, bench_filip])
def test_a_failing_row_is_recorded_not_raised(bench):
    """Any exception of a row (a Triton compile error, too little shared memory, a cuBLAS failure) becomes its
    status, "ERROR: <type>: <first line>" ("OOM" for out-of-memory), so one bad row does not end the step."""
    errors = [(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`\nmore"),
               "ERROR: RuntimeError: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
              (ValueError("PassManager::run failed"), "ERROR: ValueError: PassManager::run failed"),
              (RuntimeError("CUDA out of memory. Tried to allocate 16 GiB"), "OOM")]
    for err, status in errors:
        def fail(*args, err=err):
            raise err
        shape = (4, 8) if bench is bench_contrastive else (2, 3, 4, 8)
        row = bench.bench_one("bad", fail, *shape, torch.float32, 1, 0, None)
        assert row["status"] == status and row["method"] == "bad"


def wait_for_rows(path, n, proc, timeout=120):
    """Wait until the CSV at path holds n data rows (the process still running); returns them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the benchmark ended before it was interrupted: " + proc.stdout.read()[-2000:]
        if path.exists():
            rows = list(csv.DictReader(open(path)))
            if len(rows) >= n:
                return rows
        time.sleep(0.1)
    raise AssertionError(f"no {n} rows in {path} after {timeout} s")


@pytest.mark.parametrize("script,args", [
    ("bench_contrastive.py", ["--B", "16", "4096", "--D", "32", "--methods", "eager", "torch"]),
    ("bench_filip.py", ["--B", "4", "160", "--Ti", "10", "--Tt", "8", "--D", "32", "--methods", "eager", "torch"])])
def test_an_interrupted_benchmark_keeps_its_finished_rows(tmp_path, script, args):
    """run_all.sh stops a step with SIGINT at its time limit: the rows finished by then are in the CSV (appended
    and flushed one by one), the partial table is printed, and the exit status is non-zero (130)."""
    name = script.replace("bench_", "").replace(".py", ".csv")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / script), "--out", str(tmp_path), "--reps", "200",
                             "--warmup", "1", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        first = wait_for_rows(tmp_path / name, 1, proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-2000:]
    rows = list(csv.DictReader(open(tmp_path / name)))
    assert rows[:len(first)] == first and rows[0]["method"] == "eager" and rows[0]["status"] == "ok"
    assert len(rows) < 4  # cut short: the large shape's rows never finished
    assert "interrupted (SIGINT)" in out and f"({len(rows)} rows, partial)" in out
    assert out.index("interrupted") < out.index("method ")  # the partial table follows


def test_tile_specs_are_parsed_and_bad_ones_named():
    assert bench_contrastive.parse_tiles("fwd_bm=128, fwd_warps=4") == {"fwd_bm": 128, "fwd_warps": 4}
    assert bench_filip.parse_tiles("64x256x32") == {"BM": 64, "BN": 256, "BK": 32}
    assert bench_filip.parse_tiles("128x128x32x8x2") == {"BM": 128, "BN": 128, "BK": 32, "num_warps": 8, "num_stages": 2}
    with pytest.raises(SystemExit, match="KEY one of fwd_bm"):
        bench_contrastive.parse_tiles("fwd_block=128")
    assert bench_filip.parse_tiles("64x128x32x8x2,group=1,BD=64,save=1,kernels=1") == {
        "BM": 64, "BN": 128, "BK": 32, "num_warps": 8, "num_stages": 2, "group": 1, "BD": 64, "save": 1, "kernels": 1}
    with pytest.raises(SystemExit, match="BMxBNxBK"):
        bench_filip.parse_tiles("64x256")
    with pytest.raises(SystemExit, match="'grp=1' is not group=<int>"):
        bench_filip.parse_tiles("64x128x32,grp=1")


RUN_ALL = ROOT / "benchmarks" / "gpu" / "run_all.sh"


def test_run_all_replaces_its_archive_whole(tmp_path):
    """run_all.sh rewrites $OUT/results.tgz after every step: a tar that fails or is killed mid-write must leave the
    previous good archive, so it writes a temporary one and renames it over (pack)."""
    pack = re.search(r"^pack\(\) \{.*?^\}", RUN_ALL.read_text(), re.M | re.S)
    assert pack, "run_all.sh has no pack() function"
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    (work / "a.csv").write_text("x\n")
    script = pack.group(0) + "\npack\n"
    env = dict(os.environ, OUT=str(out), WORK=str(work))
    subprocess.run(["bash", "-c", script], check=True, env=env)
    good = (out / "results.tgz").read_bytes()
    assert subprocess.run(["tar", "-tzf", str(out / "results.tgz")], capture_output=True, text=True).stdout.split() \
        == ["./", "./a.csv"]
    env["WORK"] = str(tmp_path / "missing")  # tar fails
    assert subprocess.run(["bash", "-c", script], env=env, capture_output=True).returncode != 0
    assert (out / "results.tgz").read_bytes() == good


def test_run_all_fits_its_device_budget():
    """run_all.sh runs once, inside one 590-s device call: its step limits sum to at most 480 s (setup, and up to
    5 s per step between SIGINT and KILL, fit in the rest); the bf16 GPU tests come first, then the KERNELS.md §3
    target benchmarks (CLIP memory and speed vs eager, FILIP's target shape with and without masks). Arrays that
    may be empty expand safely under set -u on bash < 4.4 (macOS's 3.2)."""
    text = RUN_ALL.read_text()
    subprocess.run(["bash", "-n", str(RUN_ALL)], check=True)
    steps = re.findall(r"^step (\w+) (\d+) ", text, re.M)
    names = [n for n, _ in steps]
    assert len(set(names)) == len(names) >= 8
    assert sum(int(s) for _, s in steps) <= 480, steps
    kill = re.search(r"--kill-after=(\d+)", text)
    assert kill and sum(int(s) for _, s in steps) + len(steps) * int(kill.group(1)) <= 540
    assert not re.search(r'"\$\{(XDIST|SWEEP)\[@\]\}"', text.replace('+"${', "+{"))  # only ${A[@]+"${A[@]}"}
    assert names[:3] == ["tests_gpu", "contrastive", "filip_target"]
    assert re.search(r"^FILIP_METHODS=\(eager triton triton_nomask ", text, re.M)
