"""The Triton kernels compile for real GPUs (sm_90 = H100/H200, sm_80 = A100) with the launch
parameters the library uses, without a GPU: `python -m declip_ds.kernels.compile_check` in a
subprocess (it needs TRITON_INTERPRET unset, which the rest of the suite sets).

What the CPU interpreter cannot show and these catch: a kernel that does not lower for the card (dot
shapes, layouts, dtypes), tiles that need more shared memory than a block may have (the launch would
fail), and register spills from a tile configuration (the kernel would run, slowly).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_backend() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return False
    ptxas = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return ptxas.exists()


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="triton with its NVIDIA backend (ptxas) is not installed")


def compile_reports(tmp_path, *args, expect_rc=0):
    out = tmp_path / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "declip_ds.kernels.compile_check", "--json", str(out),
                           "--max-spill", "100000", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def check_reports(reports, arch):
    kernels = {r["kernel"] for r in reports}
    # every kernel of both public functions was captured and compiled, in every dtype asked for
    # (fp32 CLIP inputs use the read-modify-write backward kernels, 16-bit ones the chunked backward's dX kernel
    # by default and the register-accumulator ones with bwd_chunk=0)
    assert kernels == {"_clip_fwd_kernel", "_clip_dlogits_kernel", "_clip_bwd_rows_kernel", "_clip_bwd_cols_kernel",
                       "_clip_bwd_rows_rmw_kernel", "_clip_bwd_cols_rmw_kernel", "_tm_fwd_kernel", "_tm_bwd_x_kernel",
                       "_tm_bwd_y_kernel", "_tm_bwd_x_saved_kernel", "_tm_bwd_y_saved_kernel"}, kernels
    assert {r["dtype"] for r in reports} == {"bfloat16", "float16", "float32"}
    for r in reports:
        where = f"{r['kernel']} {r['dtype']} sm_{arch} {r['tiles']}"
        assert r["arch"] == arch
        assert r["error"] is None and r["fits"], f"{where}: {r['status']}"
        assert r["shared_bytes"] <= r["shared_limit"], where
        # tensor cores for 16-bit inputs (wgmma on Hopper); fp32 stays true fp32 on FMA units
        # (wgmma needs an M of 64 per warpgroup: the saved-index y kernel's dot has M = BN, 32 at 49x16 / 77x16)
        if r["dtype"] != "float32":
            short_m = r["kernel"] == "_tm_bwd_y_saved_kernel" and "BN=32" in r["tiles"]
            assert r["mma"] == ("wgmma" if arch == 90 and not short_m else "mma.sync"), where
        # at most a few spilled registers in the CLIP kernels and in FILIP tiles of one sample each (Ti, Tt <=
        # 64 x 128), for both backward designs: the tiles the H200 timed fastest spill 32 B (512-column CLIP
        # backward), 76 B (fp16 CLIP forward) and 32-64 B (fp16 saved-index FILIP at BD=128) on sm_90; the
        # tiles a long sample forces (Ti=197 -> 256 x 128) and multi-sample tiles spill more (up to 624 B
        # recomputing / 756 B saved-index on sm_90 with triton 3.8; 0.8-1 KB before the two-phase epilogue)
        if r["kernel"].startswith("_clip") or "IB=1 JB=1 BM=64 BN=128" in r["tiles"]:
            assert r["spill_bytes"] <= 128, f"{where}: {r['spill_bytes']} bytes of register spills"
        else:
            assert r["spill_bytes"] <= 768, f"{where}: {r['spill_bytes']} bytes of register spills"


@pytest.mark.slow  # 50 s on 2 cores: run it (python -m pytest -m slow -k compile) before spending GPU time
def test_kernels_compile_for_sm90(tmp_path):
    reports, stdout = compile_reports(tmp_path, "--arch", "90")
    check_reports(reports, 90)
    assert "launches compile and fit in shared memory" in stdout


@pytest.mark.slow
def test_kernels_compile_for_sm80(tmp_path):
    reports, _ = compile_reports(tmp_path, "--arch", "80")
    check_reports(reports, 80)


@pytest.mark.slow
def test_kernels_on_cards_with_99_kb_of_shared_memory(tmp_path):
    """sm_89 (L40S, RTX 4090; sm_86 likewise): 16-bit launches all fit, the 256 x 128 FILIP backward (x) only
    with one pipeline stage (the runtime falls back to it); fp32 FILIP at 256 x 128 does not fit at all, which the
    runtime reports with the fix (bf16/fp16 or loss.impl=torch)."""
    reports, _ = compile_reports(tmp_path, "--arch", "89", expect_rc=1)
    for r in reports:
        where = f"{r['kernel']} {r['dtype']} {r['tiles']}: {r['status']}"
        assert r["error"] is None, where
        big_filip_bwd = r["kernel"].startswith("_tm_bwd") and "BM=256 BN=128" in r["tiles"]
        if r["dtype"] == "float32" and big_filip_bwd:
            assert not r["fits"], where
        else:
            assert r["fits"], where
            assert r["fallback_stages"] in ((None, 1) if big_filip_bwd else (None,)), where
    assert any(r["fallback_stages"] == 1 for r in reports if r["kernel"] == "_tm_bwd_x_kernel")  # 104 KB at 2 stages


def test_compile_check_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "declip_ds.kernels.compile_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "unset TRITON_INTERPRET" in proc.stderr


def test_max_spill_sets_the_exit_status(tmp_path):
    """The default --max-spill 0 fails on the (known, small) spills of the 256 x 128 FILIP tiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys; from declip_ds.kernels import compile_check as cc; "
            "cc.CLIP_SHAPES = []; cc.FILIP_SHAPES = [(8, 197, 77, 256)]; "
            "sys.exit(cc.main(['--dtype', 'bf16']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "spills" in proc.stdout
