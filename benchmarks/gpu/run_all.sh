#!/usr/bin/env bash
# Every check that needs a GPU, as ONE command for a lent GPU machine (issues #5 and #8).
#
# Here, first:   bash benchmarks/gpu/wheels.sh          (deepspeed, webdataset, ... into .whl/; only the train step
#                                                         needs them, so they are installed just before it)
# Then, with the device tool:  run(command="bash benchmarks/gpu/run_all.sh", carry=[".whl"], timeout_s=590)
#
# Steps, most important first, each stopped with SIGINT at its limit (the benchmarks then keep every finished row
# in their CSV; the rest of the step is lost, the later steps still run). Limits sum to 480 s; with ~10 s of setup
# and up to 5 s per step between SIGINT and a KILL (at most 540 s in all), the run ends inside timeout_s=590:
#   tests_gpu          150 s  the bf16 / large-shape tests marked `gpu` (KERNELS.md §3.3 tolerances, CLIP memory
#                             <= 0.2 GB and linear in B, FILIP memory, the arg-max debug mode in bf16), -n 4 when
#                             pytest-xdist is there (~40 Triton compiles of ~3 s each)
#   contrastive         45 s  KERNELS.md §3.1 targets: fused loss vs eager, B 4k..64k, D=512 first (memory at 32k
#                             and its linearity in B, fwd+bwd vs eager at 32k), then D=768
#   filip_target        55 s  KERNELS.md §3.2 target shape B=1024 Ti=50 Tt=77 D=512: speed and memory vs eager, every
#                             backward, and triton_nomask (masks must cost under 5 %)
#   tiles_contrastive   40 s  CLIP tile sweep at 32k x 512 next to the defaults
#   tiles_filip         40 s  FILIP tile sweep at the target shape
#   tests_rest          50 s  20 fp32/fp16 tests on the real compiler (the GPU tile tables, sm_80's too, default
#                             tiles, FA's 2x rule, fp16 gradients that must stay out of fp16's subnormals: the
#                             compiled casts and cuBLAS must keep them); the whole suite runs on CPUs interpreted
#   contrastive_torch   10 s  the chunked torch reference (loss.impl=torch) at 8k and 32k
#   filip_197           35 s  FILIP Ti=197 at B=1024 (eager is expected to OOM)
#   train_step          55 s  the carried wheels installed (with_wheels.sh), then the real towers: CLIP and FILIP,
#                             ZeRO-2, bf16 (the JSON is rewritten after each row: a cut step keeps the finished ones)
# Left out for time: FILIP's extra shapes 49x16, 77x16 and D=256 (KERNELS.md §3.2 "also benchmark"; run
# bench_filip.py without --no-extra), B=2048 FILIP rows, the other train-step methods.
#
# What comes back: $OUT/run.log (everything printed) and $OUT/results.tgz (CSV, PNG, JSON, per-step logs, env.txt
# with the mm out_dtype probe), rewritten after every step (to a temporary name, then moved), so a run killed from
# outside still returns the steps that finished. STEP_SCALE=0.8 scales every limit.
# QUICK=1 runs the same steps with CPU-sized grids (to try this script on a laptop: steps that need CUDA report
# that; the tile sweeps run interpreted); its limits are 4x (STEP_SCALE defaults to 4 there).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/out/gpu}
WORK=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
pack() {  # never truncate the last good archive: write a temporary one, then rename it over
    tar -czf "$OUT/results.tgz.part" -C "$WORK" . && mv -f "$OUT/results.tgz.part" "$OUT/results.tgz"
}
finish() { pack && echo "== results in \$OUT/results.tgz: $(ls "$WORK" | tr '\n' ' ')"; }
trap finish EXIT

quick=${QUICK:-0}
scale=${STEP_SCALE:-$([ "$quick" = 1 ] && echo 4 || echo 1)}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
    # whether cuBLAS bf16 GEMMs write fp32 here (else the chunked CLIP backward upcasts: slower, more memory)
    python3 -c "import torch; from declip_ds.kernels import contrastive as c
print('mm out_dtype=fp32 probe:', c.mm_out_dtype_probe('cuda') if torch.cuda.is_available() else 'no CUDA')"
} 2>&1 | tee "$WORK/env.txt"
XDIST=()
if python3 -c "import xdist" 2>/dev/null; then XDIST=(-n 4); else echo "pytest-xdist missing: tests run in one process"; fi
echo "step limits x$scale; pytest ${XDIST[*]:-(no -n)}"

step() {  # step NAME SECONDS CMD...
    local name=$1 limit; limit=$(python3 -c "print(max(10, int($2 * $scale)))"); shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$WORK/$name.log"
    echo "== $name: rc=$rc in $((SECONDS - t0))s"
    pack  # after every step: a run killed from outside keeps what finished
}

# the tile sweeps (same lists in both modes, so QUICK=1 checks that every spec parses and runs), most telling first
# CLIP: bwd_chunk=0 is the fused backward (timed 32.5 ms fwd + bwd in the first run) next to the chunked default
CLIP_TILES=(bwd_chunk=0 bwd_chunk=256 bwd_chunk=1024 g_bm=64,g_bn=128,g_warps=4 g_bn=256 g_stages=4 g_bk=32
            bwd_chunk=2048 fwd_bm=128,fwd_bn=128,fwd_warps=8)
# FILIP: without kernels=1 the rows time the GEMM backward (default), whose tiles only the forward kernel uses
# (default 64 x 256: 3 texts per tile, 70 % of the tile used instead of 47 %, no spills on sm_90); save=1 with the
# saved indices; kernels=1 the Triton backward kernels (64 x 128 x 64 and BD 128: their defaults)
FILIP_TILES=(64x128x64x8x2 64x128x64x8x2,save=1 64x256x64x8x3 64x256x32x8x2 64x256x64x4x2 128x128x64x8x2,save=1
             64x256x64x8x2,save=1,group=8 64x128x64x8x2,kernels=1,group=8 64x128x64x8x2,save=1,kernels=1,BD=256)
FILIP_METHODS=(eager triton triton_nomask triton_kernels triton_saved triton_saved_kernels)
REST="gpu_tile_configuration or token_max_gpu_tiles or equals_clip_loss_default_tiles or within_2x_of_torch or fp16_backward_keeps or token_max_fp16_backward"

if [ "$quick" = 1 ]; then  # CPU-sized grids; the sweeps' kernel rows interpreted
    CLIP=(--B 256 512 --D 64 --reps 3 --warmup 1)
    FILIP_TARGET=(--B 16 --Ti 10 --Tt 8 --D 32 --reps 3 --warmup 1)
    CLIP_SWEEP=(--B 130 --D 72 --reps 1 --warmup 0)
    FILIP_SWEEP=(--B 3 --Ti 50 --Tt 77 --D 72 --reps 1 --warmup 0)
    CLIP_TORCH=(--B 256 1024 --D 64 --reps 3 --warmup 1)
    FILIP_197=(--B 4 --Ti 197 --Tt 77 --D 32 --reps 1 --warmup 0)
    TRAIN=(--methods clip --zero 0 --steps 2 --warmup 1)
    SWEEP=(env TRITON_INTERPRET=1)
else
    CLIP=(--B 4096 8192 16384 32768 65536 --D 512 768 --reps 10 --warmup 2)
    FILIP_TARGET=(--B 1024 --Ti 50 --Tt 77 --D 512 --reps 10 --warmup 2)
    CLIP_SWEEP=(--B 32768 --D 512 --reps 10 --warmup 2)
    FILIP_SWEEP=(--B 1024 --Ti 50 --Tt 77 --D 512 --reps 5 --warmup 1)
    CLIP_TORCH=(--B 8192 32768 --D 512 --reps 5 --warmup 1)
    FILIP_197=(--B 1024 --Ti 197 --Tt 77 --D 512 --reps 5 --warmup 1)
    TRAIN=(--methods clip filip --zero 2 --steps 5 --warmup 2)
    SWEEP=()
fi
mkdir -p "$WORK/filip_target" "$WORK/tiles" "$WORK/contrastive_torch" "$WORK/filip_197"

# Limits from the first run (H200, 2026-11-27: 15 gpu tests in 44 s, ~3 s per Triton compile; the chunked-torch
# reference takes 0.6 s per call at B=64k and 1.2 s for FILIP, so it gets only small shapes); the Triton cache on
# disk carries compiles from the tests to the benchmarks.
step tests_gpu 150 python3 -m pytest ${XDIST[@]+"${XDIST[@]}"} -v -rfEs --durations=10 tests/test_kernels.py -m gpu \
    -p no:cacheprovider
step contrastive 45 python3 benchmarks/bench_contrastive.py --out "$WORK" --methods eager triton "${CLIP[@]}"
step filip_target 55 python3 benchmarks/bench_filip.py --out "$WORK/filip_target" --no-extra \
    --methods "${FILIP_METHODS[@]}" "${FILIP_TARGET[@]}"
# tile sweeps next to the defaults, same shape, same run (defaults since the first GPU run: CLIP forward
# 64 x 128 x 4 warps, fused backward D chunks of 512; FILIP 16-bit K chunks of 64 for <= 64-row tiles, saved
# BD 128; since then, untimed: the chunked CLIP backward, 512 rows, 128 x 128 x 64 dX tiles, 8 warps; the
# FILIP GEMM backward with 64 x 256 forward tiles)
step tiles_contrastive 40 ${SWEEP[@]+"${SWEEP[@]}"} python3 benchmarks/bench_contrastive.py --out "$WORK/tiles" --methods triton \
    "${CLIP_SWEEP[@]}" --tiles "${CLIP_TILES[@]}"
step tiles_filip 40 ${SWEEP[@]+"${SWEEP[@]}"} python3 benchmarks/bench_filip.py --out "$WORK/tiles" --no-extra \
    --methods triton triton_saved "${FILIP_SWEEP[@]}" --tiles "${FILIP_TILES[@]}"
step tests_rest 50 python3 -m pytest ${XDIST[@]+"${XDIST[@]}"} -v -rfEs tests/test_kernels.py -m "not gpu" -k "$REST" \
    -p no:cacheprovider
step contrastive_torch 10 python3 benchmarks/bench_contrastive.py --out "$WORK/contrastive_torch" --methods torch \
    "${CLIP_TORCH[@]}"
step filip_197 35 python3 benchmarks/bench_filip.py --out "$WORK/filip_197" --no-extra \
    --methods eager triton triton_saved "${FILIP_197[@]}"
step train_step 55 bash benchmarks/gpu/with_wheels.sh python3 benchmarks/bench_train_step.py "${TRAIN[@]}" \
    --json "$WORK/train_step.json" --markdown
