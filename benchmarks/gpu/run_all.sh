#!/usr/bin/env bash
# Every check that needs a GPU, as ONE command for a lent GPU machine (issues #5 and #8):
#   1. tests/test_kernels.py on real Triton: the bf16 and large-shape tests marked `gpu` (KERNELS.md
#      §3.3 tolerances, memory <= 0.2 GB and linear in B), then the fp32/fp16 suite
#   2. benchmarks/bench_contrastive.py  (eager formula vs chunked torch vs fused kernel)
#   3. benchmarks/bench_filip.py        (eager vs chunked torch vs token-max kernel)
#   4. benchmarks/bench_train_step.py   (real towers of the YFCC-15M recipes, bf16, per method)
#
# Here, first:   bash benchmarks/gpu/wheels.sh          (deepspeed, webdataset, ... into .whl/)
# Then, with the device tool:  run(command="bash benchmarks/gpu/run_all.sh", carry=[".whl"], timeout_s=570)
# Each step has its own time limit (STEP_SCALE=0.5 halves them all), so the whole run ends in about
# 9 minutes (timeout_s=570; the last two steps are tile sweeps for tuning and can be cut first; with
# a slow machine start, STEP_SCALE=0.8 leaves more of the 15-minute device budget) and what finished
# comes back: $OUT/run.log (everything printed) and $OUT/results.tgz (CSV, PNG, JSON, per-step logs;
# rewritten after every step, so a run killed from outside still returns the steps that finished).
# QUICK=1 runs the CPU-sized grids (to try this script on a laptop).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/out/gpu}
WORK=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
finish() { tar -czf "$OUT/results.tgz" -C "$WORK" . && echo "== results in \$OUT/results.tgz: $(ls "$WORK" | tr '\n' ' ')"; }
trap finish EXIT

if ! python3 -c "import deepspeed, webdataset, ftfy" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" || { echo "wheel install failed"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$WORK/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" \
    | tee -a "$WORK/env.txt"

scale=${STEP_SCALE:-1}
step() {  # step NAME SECONDS CMD...
    local name=$1 limit; limit=$(python3 -c "print(max(10, int($2 * $scale)))"); shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$WORK/$name.log"
    echo "== $name: rc=$rc in $((SECONDS - t0))s"
    tar -czf "$OUT/results.tgz" -C "$WORK" .  # after every step: a run killed from outside keeps what finished
}

if [ "${QUICK:-0}" = 1 ]; then
    step tests_gpu 120 python3 -m pytest -q tests/test_kernels.py -m gpu -p no:cacheprovider
    step tests_rest 600 python3 -m pytest -q -x tests/test_kernels.py -m "not gpu" -k fp32 -p no:cacheprovider
    step contrastive 300 python3 benchmarks/bench_contrastive.py --out "$WORK" --reps 3 --warmup 1
    mkdir -p "$WORK/filip_target"
    step filip_target 300 python3 benchmarks/bench_filip.py --out "$WORK/filip_target" --reps 3 --warmup 1
    step filip 300 python3 benchmarks/bench_filip.py --out "$WORK" --reps 3 --warmup 1
    step train_step 600 python3 benchmarks/bench_train_step.py --methods clip --zero 0 --steps 2 --warmup 1 \
        --json "$WORK/train_step.json" --markdown
    mkdir -p "$WORK/tiles"
    step tiles_contrastive 120 python3 benchmarks/bench_contrastive.py --out "$WORK/tiles" --reps 2 --warmup 1 \
        --tiles fwd_bm=128,fwd_bn=128 bwd_bd=0
    step tiles_filip 120 python3 benchmarks/bench_filip.py --out "$WORK/tiles" --reps 2 --warmup 1 --tiles 64x256x32 \
        64x128x32x8x2,group=1024 64x128x32x8x2,save=1,BD=64
else
    # the bf16 / large-shape / memory tests first (each new tile config JIT-compiles for seconds on
    # a real GPU, so the whole file may not fit one limit); then the interpreter suite on real Triton
    step tests_gpu 80 python3 -m pytest -q tests/test_kernels.py -m gpu -p no:cacheprovider
    step tests_rest 50 python3 -m pytest -q tests/test_kernels.py -m "not gpu" -p no:cacheprovider
    step contrastive 90 python3 benchmarks/bench_contrastive.py --out "$WORK" --reps 20 --warmup 3
    # FILIP: the target shape first (KERNELS.md: >= 3x faster, >= 20x less memory than eager), both
    # backward designs (triton = recompute, triton_saved = save_argmax), then the rest of the grid
    mkdir -p "$WORK/filip_target"
    step filip_target 40 python3 benchmarks/bench_filip.py --out "$WORK/filip_target" --B 1024 --Ti 50 --Tt 77 \
        --D 512 --no-extra --reps 20 --warmup 3
    step filip 55 python3 benchmarks/bench_filip.py --out "$WORK" --reps 10 --warmup 2
    step train_step 110 python3 benchmarks/bench_train_step.py --methods clip slip declip filip defilip --zero 2 \
        --steps 10 --warmup 3 --json "$WORK/train_step.json" --markdown
    # tile sweeps: the default kernel row next to alternatives, same shape, same run (tuning data;
    # the defaults were picked without a GPU by declip_ds.kernels.compile_check: no register spills).
    # FILIP: group=1024 is the plain 2-D grid order (no L2 bands); save=1 rows time the saved-index
    # backward at other D chunks (BD; default 64 here) and at 64 x 256 tiles (70 % of the tile used instead
    # of 47 %; compile_check: 0-16 B of spills in bf16)
    mkdir -p "$WORK/tiles"
    # CLIP: bwd_bd=0 is the read-modify-write backward (the design before 2026-11-27), 128 / 512 other D chunks
    step tiles_contrastive 50 python3 benchmarks/bench_contrastive.py --out "$WORK/tiles" --B 32768 --D 512 \
        --methods triton --reps 10 --warmup 2 --tiles bwd_bd=0 bwd_bd=512 bwd_bd=128 fwd_bm=128,fwd_bn=128 \
        fwd_bm=64,fwd_bn=128,fwd_warps=4 bwd_bm=128,bwd_bn=64 bwd_warps=4 groups=32
    step tiles_filip 60 python3 benchmarks/bench_filip.py --out "$WORK/tiles" --B 1024 --Ti 50 --Tt 77 --D 512 \
        --no-extra --methods triton triton_saved --reps 5 --warmup 1 --tiles 64x128x32x8x2,group=1024 \
        64x128x32x8x2,group=8 64x256x32 64x128x64 64x128x32x8x2,save=1,BD=32 64x128x32x8x2,save=1,BD=128 \
        64x256x32x8x2,save=1
fi
