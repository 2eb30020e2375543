"""Benchmark: one DeepSpeed training step per method x ZeRO stage — samples/s, where the step's time
goes (data wait, forward, backward, optimizer step, communication) and peak memory, side by side.

Run:  python benchmarks/bench_train_step.py [--device auto|cpu|cuda] [--methods clip declip ...]
          [--zero 0 1 2 3] [--world-size 1] [--extra-runs clip:2:2] [--batch-size N] [--steps 10]
          [--warmup 3] [--vision NAME] [--json OUT] [--markdown]

What runs: the step of ``declip_ds.train.engine.train`` with its own pieces (``param_groups``, the
LambdaLR schedule, ``build_ds_config`` on ``ds_configs/zero{N}.json``, ``deepspeed.initialize``,
``to_device``, ``clamp_scales``): fetch a batch, ``out = engine(batch)``, ``loss =
method.total_loss(out)``, ``engine.backward(loss)``, ``engine.step()``, clamp the temperatures.
Left out of the timed step: the engine's bad-step guard and end-of-epoch check (one scalar
all-reduce each per micro-batch), logging and checkpoints.

* CPU (default without CUDA): the tiny towers of experiments/demo_shapes.yaml (``method.name`` set
  per row), fp32, the synthetic shapes shards (made once by ``ensure_dataset`` under --data-dir)
  read by the real webdataset loader (data.workers DataLoader workers per rank), 1 torch thread per
  rank (--threads).
* CUDA: the real towers (--vision, default vit_base_patch32_clip_224; the method's
  ``experiments/{method}_vit_b32_yfcc15m.yaml`` recipe, or ``_rn50_`` for a ResNet tower), bf16 as
  the ds_configs enable it, and synthetic IN-MEMORY batches (--data memory): the method's own sample
  transform applied to 16 random-noise images and stock captions, tiled to the batch size and kept
  on the GPU, so the data phase is ~0 by construction and webdataset is not needed.

Phases, wall time per step (perf_counter; torch.cuda.synchronize() at every boundary on CUDA), mean
over the --steps timed steps after --warmup untimed ones, mean over ranks:
  data       next batch from the loader (wait) + host->device copy
  forward    engine(batch) (the method's forward: towers, heads, the named losses) + total_loss
  backward   engine.backward(loss) (with ZeRO 1/2/3 the gradient reduction hooks run inside it)
  optimizer  engine.step() (+ the ZeRO-1/2 parameter all-gather) + clamp_scales
  step       wall time of the timed loop / steps; samples/s = world x batch x steps / the slowest
             rank's wall time
Communication is measured, not estimated: every collective of torch.distributed and deepspeed.comm
(the loss's all-gather and its backward all-reduce, DeepSpeed's gradient all-reduce /
reduce-scatter, ZeRO parameter all-gathers, its overflow / norm checks) is wrapped and its wall
time added to the phase it ran in; asynchronous handles add the time spent in their wait(). It is
PART of forward/backward/optimizer, not an extra phase. On gloo (CPU) a collective blocks, so the
figure includes waiting for the slower rank; on CUDA each wrapped collective is bracketed by
torch.cuda.synchronize(), which removes its overlap with compute (an upper bound on exposed comm).
Peak memory: CUDA torch.cuda.max_memory_allocated() (the rank's peak over model build + warmup +
timed steps); CPU the growth of the rank process's RSS high-water mark (resource.getrusage
ru_maxrss, after the timed steps minus before the model was built; DataLoader workers not
included). Each row runs in fresh processes (torch.multiprocessing, spawn) so these peaks are the
row's own; --in-process (world size 1) reuses this process and then gives lower bounds after the
first row.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import logging
import multiprocessing
import os
import platform
import resource
import shlex
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Allow `python benchmarks/bench_train_step.py` from a checkout without installing the package.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("clip", "declip", "slip", "filip", "defilip")
PHASES = ("data", "forward", "backward", "optimizer")
REAL_TOWERS = ("vit_base_patch32_clip_224", "vit_base_patch16_clip_224", "resnet50_clip")
CAPTIONS = ["a red circle on the left", "two blue squares and a yellow star", "a crimson disk, top right",
            "a large green triangle in the middle of the picture", "a white heart", "an orange cross at the bottom",
            "a photo of a dog on the beach at sunset", "a city street at night with people and cars",
            "a small boat on a river under a bridge", "snow on the mountain behind an old house",
            "a bird on a tree in the garden", "a market with flowers and fruit", "a train crossing a bridge",
            "two cats sleeping on a sofa", "a bowl of soup on a wooden table", "a man riding a bicycle"]


@dataclass
class Spec:
    """One row: what a rank needs to build and time its step (pickled into spawned ranks)."""

    method: str
    zero: str
    world_size: int = 1
    device: str = "cpu"
    vision: str = ""
    batch_size: int = 0  # 0 = the config's
    steps: int = 10
    warmup: int = 3
    precision: str = "auto"  # auto = bf16 on CUDA (as ds_configs enable it), fp32 on CPU
    data: str = "auto"  # auto | shards | memory
    data_dir: str = ""
    data_workers: int = -1  # -1 = the config's data.workers
    threads: int = 0  # torch threads per rank; 0 = 1 on CPU, torch's default on CUDA
    overrides: list = field(default_factory=list)


# ----------------------------------------------------------------------------- communication


class CommTimer:
    """Wall time spent in collectives, by phase and by op.

    Wraps the collectives of ``torch.distributed`` (our losses call them directly) and of
    ``deepspeed.comm`` (ZeRO calls those; some reach torch through function references bound at
    init, which a torch-level wrapper would miss). A call made from inside another wrapped call
    (deepspeed.comm -> torch.distributed) is counted once, at the outermost level.
    """

    TORCH_OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
                 "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_to_all",
                 "all_to_all_single", "all_reduce_coalesced", "barrier", "gather", "scatter")
    DS_OPS = ("all_reduce", "inference_all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor",
              "allgather_fn", "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_fn",
              "broadcast", "reduce", "all_to_all", "all_to_all_single", "barrier")

    def __init__(self, sync):
        self.sync, self.phase, self._local = sync, None, threading.local()
        self._patched: list[tuple[object, str, object]] = []
        self.reset()

    def reset(self) -> None:
        self.by_phase = {p: 0.0 for p in PHASES}
        # "loss": torch.distributed called directly (our losses' all-gather and its backward
        # all-reduce); "deepspeed": deepspeed.comm (gradient reduction, ZeRO all-gathers, checks)
        self.by_source = {"loss": 0.0, "deepspeed": 0.0}
        self.ops: dict[str, dict] = {}

    def _add(self, name: str, seconds: float, nbytes: int = 0, call: bool = True) -> None:
        if self.phase is None:
            return
        self.by_phase[self.phase] += seconds
        self.by_source["deepspeed" if name.startswith("ds.") else "loss"] += seconds
        op = self.ops.setdefault(name, {"calls": 0, "seconds": 0.0, "bytes": 0})
        op["calls"] += int(call)
        op["seconds"] += seconds
        op["bytes"] += nbytes

    def _wrap(self, name: str, fn):
        timer = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if getattr(timer._local, "depth", 0):
                return fn(*args, **kwargs)
            timer._local.depth = 1
            try:
                timer.sync()
                start = time.perf_counter()
                work = fn(*args, **kwargs)
                timer.sync()
                seconds = time.perf_counter() - start
            finally:
                timer._local.depth = 0
            timer._add(name, seconds, _largest_tensor_bytes(args, kwargs))
            return _TimedWork(work, timer, name) if hasattr(work, "wait") else work

        return timed

    def install(self) -> "CommTimer":
        import deepspeed.comm as ds_comm
        import deepspeed.comm.comm as ds_comm_impl
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for module, names, prefix in ((dist, self.TORCH_OPS, "torch."), (c10d, self.TORCH_OPS, "torch."),
                                      (ds_comm, self.DS_OPS, "ds."), (ds_comm_impl, self.DS_OPS, "ds.")):
            for name in names:
                fn = getattr(module, name, None)
                if callable(fn):
                    self._patched.append((module, name, fn))
                    setattr(module, name, self._wrap(prefix + name.lstrip("_"), fn))
        return self

    def uninstall(self) -> None:
        for module, name, fn in reversed(self._patched):
            setattr(module, name, fn)
        self._patched.clear()


class _TimedWork:
    """An async collective's handle whose wait() time is counted (the op's time on gloo)."""

    def __init__(self, work, timer: CommTimer, name: str):
        self._work, self._timer, self._name = work, timer, name

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        result = self._work.wait(*args, **kwargs)
        self._timer.sync()
        self._timer._add(self._name, time.perf_counter() - start, call=False)
        return result

    def __getattr__(self, name):
        return getattr(self._work, name)


def _largest_tensor_bytes(args, kwargs) -> int:
    sizes = [0]
    for a in (*args, *kwargs.values()):
        items = a if isinstance(a, (list, tuple)) else [a]
        sizes.append(sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor)))
    return max(sizes)


# ----------------------------------------------------------------------------- experiment + data


def build_experiment(spec: Spec):
    """demo_shapes.yaml for the tiny towers, the method's YFCC-15M recipe for a real tower."""
    from declip_ds.config import load_config

    real = spec.vision in REAL_TOWERS
    if real:
        family = "rn50" if "resnet" in spec.vision else "vit_b32"
        path = ROOT / "experiments" / f"{spec.method}_{family}_yfcc15m.yaml"
        if not path.is_file():  # e.g. no DeFILIP RN50 recipe: the ViT one with the tower swapped
            path = ROOT / "experiments" / f"{spec.method}_vit_b32_yfcc15m.yaml"
        overrides = [f"model.vision.name={spec.vision}", "model.vision.image_size=224"]
    else:
        path = ROOT / "experiments" / "demo_shapes.yaml"
        overrides = [f"method.name={spec.method}"] + ([f"model.vision.name={spec.vision}"] if spec.vision else [])
    if spec.batch_size:
        overrides.append(f"train.batch_size={spec.batch_size}")
    if spec.data_dir:
        overrides.append(f"data.synthetic_root={spec.data_dir}")
    if spec.data_workers >= 0:
        overrides.append(f"data.workers={spec.data_workers}")
    overrides.append("train.precision=auto")  # the precision comes from the DeepSpeed JSON (below)
    exp = load_config(path, overrides + list(spec.overrides))
    if getattr(exp.method, "eda_require_wordnet", False):
        from declip_ds.data.text_aug import wordnet_available

        if not wordnet_available():
            # The YFCC DeCLIP/DeFILIP recipes refuse to train without WordNet (EDA's synonym replacement).
            # A step's time does not depend on it (captions are augmented on the host, before the timed
            # phases; in-memory batches are augmented once), so the benchmark runs without it, and says so.
            print(f"[bench_train_step] {spec.method}: NLTK WordNet is not installed here; EDA runs without "
                  "synonym replacement (method.eda_require_wordnet=false), which the step time does not see",
                  file=sys.stderr, flush=True)
            exp = load_config(path, overrides + list(spec.overrides) + ["method.eda_require_wordnet=false"])
    return exp


def prepare_data(spec: Spec) -> None:
    """Make the synthetic shards before any rank starts, so their generation is neither timed nor
    in a rank's RSS high-water mark."""
    exp = build_experiment(spec)
    if data_source(spec, exp) == "shards":
        from declip_ds.train.engine import synthetic_sources

        synthetic_sources(exp)


def data_source(spec: Spec, exp) -> str:
    if spec.data != "auto":
        return spec.data
    return "shards" if exp.data.train_shards == ["synthetic"] and spec.device == "cpu" else "memory"


def ds_config_for(spec: Spec, exp, world: int) -> tuple[dict, str]:
    """ds_configs/zero{N}.json with precision set for this device; filled in by build_ds_config."""
    from declip_ds.config import ConfigError
    from declip_ds.train.ds_config import build_ds_config, read_ds_config, resolve_precision

    path = ROOT / "ds_configs" / f"zero{spec.zero}.json"
    ds = read_ds_config(str(path))
    precision = spec.precision if spec.precision != "auto" else ("bf16" if spec.device == "cuda" else "fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision {precision}: allowed auto, fp32, bf16, fp16.")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    return build_ds_config(exp, ds, world, str(path)), resolve_precision(exp, ds, str(path))


class ShardBatches:
    """The training loader of engine.train (resampled synthetic shards), restarted at a virtual
    epoch's end; batches come out on the device in the compute dtype."""

    def __init__(self, exp, method, sources, device, dtype):
        from declip_ds.train.engine import build_loader

        self.build = lambda epoch: iter(build_loader(exp, method, sources, epoch))
        self.epoch, self.it, self.device, self.dtype = 0, self.build(0), device, dtype

    def __next__(self) -> dict:
        from declip_ds.train.engine import to_device

        batch = next(self.it, None)
        if batch is None:
            self.epoch += 1
            self.it = self.build(self.epoch)
            batch = next(self.it)
        for key in ("_skips", "_cursor", "__key__", "__url__"):
            batch.pop(key, None)
        return to_device(batch, self.device, self.dtype)

    def close(self) -> None:
        self.it = None  # shuts the DataLoader workers down


class MemoryBatches:
    """Synthetic in-memory batches with the method's exact keys, shapes and dtypes: its sample
    transform on ``distinct`` random-noise images and stock captions, tiled to the batch size,
    made once and kept on the device (no decoding, no loader, no webdataset)."""

    def __init__(self, exp, method, batch_size: int, device, dtype, distinct: int = 16, seed: int = 0):
        import numpy as np
        from PIL import Image

        from declip_ds.train.engine import to_device

        rng = np.random.default_rng(seed)
        size = exp.model.vision.image_size + 32
        transform = method.sample_transform()
        samples = [transform(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
                             CAPTIONS[i % len(CAPTIONS)]) for i in range(min(distinct, batch_size))]
        index = torch.arange(batch_size) % len(samples)
        stacked = {k: torch.stack([s[k] for s in samples])[index] for k in samples[0]}
        self.batch = to_device(stacked, device, dtype)

    def __next__(self) -> dict:
        return dict(self.batch)

    def close(self) -> None:
        self.batch = None


# ----------------------------------------------------------------------------- one rank


def _memory_probe(device: str):
    """(kind, read()) where read() gives the bytes to report; reset now."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return "cuda_max_memory_allocated", torch.cuda.max_memory_allocated
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return "rss_high_water_mark_growth", lambda: 1024 * (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)


class TransformOnly:
    """What a method's ``sample_transform`` reads (exp, cfg, tokenizer), without building its towers."""

    def __init__(self, cls, exp):
        self.cls, self.exp, self.cfg = cls, exp, exp.method

    def tokenizer(self):
        return self.cls.tokenizer(self)

    def sample_transform(self):
        return self.cls.sample_transform(self)


def _batches(source: str, exp, method, sources, device, dtype):
    if source == "shards":
        return ShardBatches(exp, method, sources, device, dtype)
    return MemoryBatches(exp, method, exp.train.batch_size, device, dtype)


def _import_libraries(source: str) -> None:
    import declip_ds.data.transforms  # noqa: F401
    import declip_ds.methods  # noqa: F401
    import declip_ds.models  # noqa: F401
    import timm  # noqa: F401

    if source == "shards":
        import declip_ds.data.wds  # noqa: F401


def measure(spec: Spec) -> dict:
    """Build the method and engine for ``spec`` on this rank (the process group must exist), run
    --warmup then --steps steps, and return this rank's timings."""
    import deepspeed
    import torch.distributed as dist

    from declip_ds.registry import get_method
    from declip_ds.train import dist as D
    from declip_ds.train.engine import DTYPES, clamp_scales, param_groups, synthetic_sources
    from declip_ds.train.schedule import lr_lambda

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    world, rank = D.world_size(), D.rank()
    exp = build_experiment(spec)
    ds_cfg, precision = ds_config_for(spec, exp, world)
    source = data_source(spec, exp)
    sources = synthetic_sources(exp) if source == "shards" else None  # made by prepare_data; else on rank 0
    dtype, device = DTYPES[precision], D.device()
    # the data side first (loader, or batches on the device; tokenizer, WordNet for EDA): the memory
    # figure is then the model's and the step's, not the library code's or the data pipeline's
    _import_libraries(source)
    batches = _batches(source, exp, TransformOnly(get_method(exp.method.name), exp), sources, device, dtype)
    mem_kind, mem_read = _memory_probe(spec.device)

    torch.manual_seed(exp.train.seed)
    method = get_method(exp.method.name)(exp, group=dist.group.WORLD if world > 1 else None)
    if exp.model.grad_checkpointing:
        method.model.set_grad_checkpointing(True)
    engine, _, _, _ = deepspeed.initialize(
        model=method, model_parameters=param_groups(method, exp.train.weight_decay, exp.train.no_decay_embeddings),
        config=ds_cfg, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(exp.train)))
    torch.manual_seed(exp.train.seed * 1000 + rank)
    clamp_scales(engine, method, exp.model.logit_scale_bounds)
    sync = torch.cuda.synchronize if spec.device == "cuda" else (lambda: None)
    comm = CommTimer(sync).install()
    try:
        bounds = exp.model.logit_scale_bounds
        for _ in range(spec.warmup):
            _one_step(engine, method, batches, sync, comm, bounds)
        D.barrier()
        comm.reset()
        start = time.perf_counter()
        records = [_one_step(engine, method, batches, sync, comm, bounds) for _ in range(spec.steps)]
        wall = time.perf_counter() - start
        loss = float(records[-1].pop("_loss"))
    finally:
        comm.uninstall()
        batches.close()
    for r in records:
        r.pop("_loss", None)
    result = {
        "rank": rank, "world_size": world, "precision": precision, "data": source,
        "batch_size_per_rank": exp.train.batch_size, "vision": exp.model.vision.name,
        "zero_stage": engine.zero_optimization_stage(), "wall_s": wall, "step_s": wall / spec.steps,
        "phases_s": {p: sum(r[p] for r in records) / spec.steps for p in PHASES},
        "step_s_min": min(sum(r.values()) for r in records), "step_s_max": max(sum(r.values()) for r in records),
        "comm_s": {p: v / spec.steps for p, v in comm.by_phase.items()},
        "comm_by_source_s": {k: v / spec.steps for k, v in comm.by_source.items()},
        "comm_ops": {k: {"calls_per_step": v["calls"] / spec.steps, "s_per_step": v["seconds"] / spec.steps,
                         "bytes_per_step": v["bytes"] / spec.steps} for k, v in sorted(comm.ops.items())},
        "memory": {"kind": mem_kind, "peak_bytes": int(mem_read())}, "loss": loss,
        "parameters": sum(p.numel() for p in method.parameters()),
        "threads": torch.get_num_threads(),
    }
    del engine, method, batches
    gc.collect()
    return result


def _one_step(engine, method, batches, sync, comm: CommTimer, bounds) -> dict:
    """One step of engine.train, with a timestamp at every phase boundary."""
    from declip_ds.train.engine import clamp_scales

    t0 = time.perf_counter()
    comm.phase = "data"
    batch = next(batches)
    sync()
    t1 = time.perf_counter()
    comm.phase = "forward"
    out = engine(batch)
    loss = method.total_loss(out)
    sync()
    t2 = time.perf_counter()
    comm.phase = "backward"
    engine.backward(loss)
    sync()
    t3 = time.perf_counter()
    comm.phase = "optimizer"
    engine.step()
    clamp_scales(engine, method, bounds)
    sync()
    t4 = time.perf_counter()
    comm.phase = None
    return {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3, "_loss": loss.detach()}


def _set_threads(spec: Spec) -> None:
    n = spec.threads or (1 if spec.device == "cpu" else 0)
    if n:
        torch.set_num_threads(n)


def _rank_entry(rank: int, world: int, port: int, spec: Spec, out_dir: str) -> None:
    """A spawned rank: environment for D.init_distributed (gloo on CPU, NCCL on CUDA), measure, report."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if spec.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    if "fork" in multiprocessing.get_all_start_methods():
        # DataLoader workers start as under the deepspeed launcher (fork), not spawn, which spawned
        # ranks would inherit and which needs picklable sample transforms
        multiprocessing.set_start_method("fork", force=True)
    result = None
    try:
        _set_threads(spec)
        from declip_ds.train import dist as D

        D.init_distributed()
        result = ("ok", measure(spec))
    except BaseException:
        result = ("error", traceback.format_exc())
        raise  # a non-zero exit makes the parent stop the other ranks instead of waiting on a collective
    finally:
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
        import torch.distributed as dist

        if dist.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_spawned(spec: Spec, timeout: float) -> list[dict]:
    """``spec.world_size`` fresh rank processes (torch.multiprocessing, spawn); per-rank results."""
    import torch.multiprocessing as mp

    world = spec.world_size
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_rank_entry, args=(world, _free_port(), spec, out_dir), nprocs=world,
                                 join=False, start_method="spawn")
        deadline, failure = time.time() + timeout, None
        try:
            while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.time()))):
                if time.time() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    raise TimeoutError(f"{world} rank(s) did not finish within {timeout:.0f} s (--timeout)")
        except Exception as e:  # a rank exited with an error: join() has stopped the others
            failure = e
        results = []
        for r in range(world):
            path = os.path.join(out_dir, f"{r}.json")
            status, value = (json.load(open(path)) if os.path.exists(path)
                             else ("error", f"no result; the rank process died: {failure}"))
            if status != "ok":
                raise RuntimeError(f"rank {r} failed:\n{value}")
            results.append(value)
        if failure is not None:
            raise RuntimeError(str(failure))
        return results


def run_in_process(spec: Spec) -> list[dict]:
    """World size 1 in this process (a world of one through D.init_distributed if none exists)."""
    import torch.distributed as dist

    if spec.world_size != 1:
        raise ValueError("--in-process runs one rank; use the default (spawned ranks) for --world-size > 1.")
    saved_env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    owns_group = not dist.is_initialized()
    threads = torch.get_num_threads()
    try:
        _set_threads(spec)
        from declip_ds.train import dist as D

        D.init_distributed()
        return [measure(spec)]
    finally:
        torch.set_num_threads(threads)
        if owns_group and dist.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups
            for k, v in saved_env.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


# ----------------------------------------------------------------------------- rows and report


def merge_ranks(spec: Spec, ranks: list[dict]) -> dict:
    """One row: phases and comm = mean over ranks; samples/s from the slowest rank; memory = max."""
    mean = lambda key, sub: sum(r[key][sub] for r in ranks) / len(ranks)  # noqa: E731
    first, wall = ranks[0], max(r["wall_s"] for r in ranks)
    phases = {p: mean("phases_s", p) for p in PHASES}
    comm = {p: mean("comm_s", p) for p in PHASES}
    by_source = {k: mean("comm_by_source_s", k) for k in ("loss", "deepspeed")}
    step = sum(r["step_s"] for r in ranks) / len(ranks)
    return {
        "method": spec.method, "zero": spec.zero, "world_size": spec.world_size, "device": spec.device,
        "vision": first["vision"], "precision": first["precision"], "data": first["data"],
        "batch_size_per_rank": first["batch_size_per_rank"], "global_batch": first["batch_size_per_rank"] * len(ranks),
        "steps": spec.steps, "warmup": spec.warmup, "threads_per_rank": first["threads"],
        "parameters": first["parameters"],
        "samples_per_s": first["batch_size_per_rank"] * len(ranks) * spec.steps / wall,
        "step_s": step, "phases_s": phases, "unaccounted_s": step - sum(phases.values()),
        "comm_s": {**comm, "total": sum(comm.values())}, "comm_by_source_s": by_source,
        "memory": {"kind": first["memory"]["kind"], "peak_mib": max(r["memory"]["peak_bytes"] for r in ranks) / 2**20},
        "loss": first["loss"], "per_rank": ranks, "error": None,
    }


def machine() -> dict:
    import deepspeed

    if torch.cuda.is_available():
        hw = f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    else:
        cpu = platform.processor()
        if os.path.exists("/proc/cpuinfo"):
            names = (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
            cpu = next(names, cpu)
        hw = f"{cpu}, {os.cpu_count()} CPUs, no GPU"
    return {"hardware": hw, "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__}


MEASURES = {
    "data": "next batch from the loader (wait) + host->device copy",
    "forward": "engine(batch) + method.total_loss",
    "backward": "engine.backward(loss), incl. the ZeRO gradient-reduction hooks",
    "optimizer": "engine.step() + clamp_scales",
    "comm": ("wall time inside torch.distributed / deepspeed.comm collectives, part of forward/backward/"
             "optimizer (not an extra phase); on gloo it includes waiting for the slower rank; on CUDA each "
             "collective is synchronised (no overlap with compute, an upper bound)"),
    "loss gather": "of comm: our losses' all-gather (forward) and its all-reduce (backward), torch.distributed",
    "DeepSpeed comm": "of comm: deepspeed.comm (gradient all-reduce / reduce-scatter, ZeRO all-gathers, checks)",
    "memory": ("CUDA: torch.cuda.max_memory_allocated per rank; CPU: growth of the rank's RSS high-water "
               "mark (ru_maxrss) from before the model was built to after the timed steps, loader workers excluded"),
    "step": "wall time of the timed loop / steps (mean over ranks); samples/s uses the slowest rank",
}


def _ms(x: float) -> str:
    return f"{1000 * x:.1f}"


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "ZeRO", "ranks", "batch/rank", "samples/s", "step ms", "data ms", "forward ms",
              "backward ms", "optimizer ms", "comm ms", "loss gather ms", "DeepSpeed comm ms", "peak mem MiB"]
    out = []
    for r in rows:
        if r.get("error"):
            out.append([r["method"], str(r["zero"]), str(r["world_size"]), "-", "failed"] + ["-"] * (len(header) - 5))
            continue
        p, c = r["phases_s"], r["comm_s"]
        out.append([r["method"], str(r["zero"]), str(r["world_size"]), str(r["batch_size_per_rank"]),
                    f"{r['samples_per_s']:.1f}", _ms(r["step_s"]), *(_ms(p[k]) for k in PHASES),
                    _ms(c["total"]), _ms(r["comm_by_source_s"]["loss"]), _ms(r["comm_by_source_s"]["deepspeed"]),
                    f"{r['memory']['peak_mib']:.0f}"])
    return header, out


def _errors(rows: list[dict]) -> list[str]:
    return [f"{r['method']} ZeRO-{r['zero']} x{r['world_size']} failed: {r['error'].strip().splitlines()[-1]}"
            for r in rows if r.get("error")]


def format_markdown(report: dict) -> str:
    meta, rows = report["meta"], report["runs"]
    ok = [r for r in rows if not r.get("error")]
    mem = ("max_memory_allocated" if ok and ok[0]["memory"]["kind"].startswith("cuda")
           else "RSS high-water-mark growth (ru_maxrss)")
    lines = [f"`{meta['command']}`", "",
             f"{meta['date']}; {meta['machine']['hardware']} (load average "
             f"{', '.join(map(str, meta['machine']['load_average']))} at the end); torch {meta['machine']['torch']}, "
             f"DeepSpeed {meta['machine']['deepspeed']}."]
    if ok:
        r = ok[0]
        lines.append(f"{r['vision']} towers, {r['precision']}, data: {r['data']}"
                     + (" (synthetic in-memory batches, no loader)" if r["data"] == "memory" else
                        " (synthetic shapes shards through the webdataset loader)")
                     + f"; {r['threads_per_rank']} torch thread(s) per rank; mean of {r['steps']} steps after "
                     f"{r['warmup']} warm-up steps, mean over ranks. Peak memory = {mem}, per rank. Comm = wall "
                     "time inside collectives (already part of forward/backward/optimizer; on gloo it includes "
                     "waiting for the slower rank): loss gather = our losses' all-gather and its backward "
                     "all-reduce, DeepSpeed comm = gradient all-reduce / reduce-scatter, ZeRO all-gathers, checks.")
    header, body = table_rows(rows)
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines + [""] * bool(_errors(rows)) + _errors(rows))


def format_text(report: dict) -> str:
    header, body = table_rows(report["runs"])
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines = [fmt(header)] + [fmt(row) for row in body] + _errors(report["runs"])
    lines += ["", *(f"{k:>14}: {v}" for k, v in MEASURES.items())]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="default: all five")
    p.add_argument("--zero", nargs="+", default=["0", "1", "2", "3"],
                   help="stages, read from ds_configs/zero{N}.json (2_offload works too); default 0 1 2 3")
    p.add_argument("--world-size", type=int, default=1, help="ranks per row (spawned; gloo on CPU)")
    p.add_argument("--extra-runs", nargs="*", default=[], metavar="METHOD:ZERO:WORLD",
                   help="rows beyond the methods x zero grid, e.g. clip:2:2")
    p.add_argument("--vision", default="", help="tower; default vit_tiny (demo) on CPU, vit_base_patch32_clip_224 on "
                                                "CUDA. A real tower uses the method's YFCC-15M recipe")
    p.add_argument("--batch-size", type=int, default=0, help="per rank; default the config's (64 demo, 128 recipes)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--data", choices=("auto", "shards", "memory"), default="auto",
                   help="auto: synthetic shards on CPU with the demo towers, in-memory batches otherwise")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "declip_ds_bench_train_step", "shapes"),
                   help="where the synthetic shards are made once and reused")
    p.add_argument("--data-workers", type=int, default=-1, help="DataLoader workers per rank; default the config's")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank; default 1 on CPU")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted config overrides, as train.py takes them")
    p.add_argument("--timeout", type=float, default=900, help="seconds per row")
    p.add_argument("--in-process", action="store_true", help="run world-size-1 rows in this process (tests)")
    p.add_argument("--json", help="write the full report (every row, per rank, per op) here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table with command, date, hardware")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}. Known: {', '.join(METHODS)}.")
    zeros = list(args.zero)
    worlds = [args.world_size]
    for item in args.extra_runs:
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in METHODS or not parts[2].isdigit() or int(parts[2]) < 1:
            p.error(f"--extra-runs {item}: expected METHOD:ZERO:WORLD (e.g. clip:2:2) with METHOD one of "
                    f"{', '.join(METHODS)}")
        zeros.append(parts[1])
        worlds.append(int(parts[2]))
    for z in zeros:
        if not (ROOT / "ds_configs" / f"zero{z}.json").is_file():
            p.error(f"--zero {z}: ds_configs/zero{z}.json not found")
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        p.error(f"world size {max(worlds)} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    if args.in_process and max(worlds) > 1:
        p.error("--in-process runs one rank per row; drop it for --world-size / --extra-runs with more ranks")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def make_specs(args) -> list[Spec]:
    vision = args.vision or ("vit_base_patch32_clip_224" if args.device == "cuda" else "")
    common = dict(device=args.device, vision=vision,
                  batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, precision=args.precision,
                  data=args.data, data_dir=args.data_dir, data_workers=args.data_workers, threads=args.threads,
                  overrides=list(args.overrides))
    specs = [Spec(method=m, zero=z, world_size=args.world_size, **common) for m in args.methods for z in args.zero]
    for item in args.extra_runs:
        method, zero, world = item.split(":")
        specs.append(Spec(method=method, zero=zero, world_size=int(world), **common))
    return specs


def _write_json(path: str, report: dict) -> None:
    """Atomically (a temporary file, then a rename): a run stopped while writing keeps the previous rows."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    part.write_text(json.dumps(report, indent=2))
    part.replace(target)


def main(argv=None) -> dict:
    """Every spec's row; with --json the report is rewritten after each row, so a run stopped at a time limit
    (SIGINT, as benchmarks/gpu/run_all.sh does) keeps the rows that finished (meta.interrupted is then true)."""
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported
    command = "python benchmarks/bench_train_step.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows, specs = [], make_specs(args)
    report = {"meta": {"command": command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                       "machine": machine(), "measures": MEASURES, "spec": asdict(specs[0]), "interrupted": False},
              "runs": rows}
    try:
        for spec in specs:
            label = f"{spec.method} ZeRO-{spec.zero} x{spec.world_size}"
            print(f"[bench_train_step] {label} ...", flush=True)
            try:
                prepare_data(spec)  # a no-op once the shards exist
                ranks = run_in_process(spec) if args.in_process else run_spawned(spec, args.timeout)
                row = merge_ranks(spec, ranks)
                print(f"[bench_train_step] {label}: {row['samples_per_s']:.1f} samples/s, "
                      f"step {_ms(row['step_s'])} ms", flush=True)
            except Exception as e:  # one failing row does not lose the others
                traceback.print_exc()
                row = {"method": spec.method, "zero": spec.zero, "world_size": spec.world_size, "error": str(e)}
            rows.append(row)
            if args.json:
                _write_json(args.json, report)
    except KeyboardInterrupt:  # a time limit: report what finished
        report["meta"]["interrupted"] = True
        print(f"\n[bench_train_step] interrupted after {len(rows)} of {len(specs)} rows", flush=True)
    print()
    if rows:
        print(format_markdown(report) if args.markdown else format_text(report))
    if args.json:
        _write_json(args.json, report)
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(130 if report["meta"]["interrupted"] else 1 if any(r.get("error") for r in report["runs"]) else 0)
