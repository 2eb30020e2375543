"""The training loop: one code path for `python train.py` (a world of one) and `deepspeed ... train.py`.

Read top to bottom: checks that need no processes -> process group -> data -> method + DeepSpeed
engine -> resume -> steps (forward, named losses, backward, step, clamp the temperature) with
logging, checkpoints and zero-shot evaluation.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from declip_ds.config import ConfigError, Experiment, config_hash, save_config, to_dict
from declip_ds.train import checkpoint as C
from declip_ds.train import dist as D
from declip_ds.train.ds_config import build_ds_config, read_ds_config, resolve_precision
from declip_ds.train.accumulate import ContrastiveBatch
from declip_ds.train.guard import BadStepsError, BatchStats, Guard, SkippedUpdates, fault, poison_grad

log = logging.getLogger("declip_ds")
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the run saved a checkpoint and stopped early; rerun to resume
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_DECAY_NAMES = ("token_embedding", "positional_embedding", "pos_embed", "cls_token", "class_embedding")
# the transformer blocks' attention input-projection biases (text tower: MHA's in_proj_bias; timm ViT: qkv)
ATTN_IN_PROJ_BIAS = re.compile(r"(\.attn\.in_proj_bias|blocks\.\d+\.attn\.qkv\.bias)$")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    logging.getLogger("declip_ds").setLevel(level)


# ----------------------------------------------------------------------------- data


def resolve_sources(exp: Experiment) -> list[list[str]] | None:
    """Shard urls per source, checked before any process starts; None = the synthetic shards,
    which are generated (if missing) once the process group exists."""
    from declip_ds.data.wds import check_epoch_shards, expand_urls

    specs = exp.data.train_shards
    if specs == ["synthetic"]:
        return None
    if "synthetic" in specs:
        raise ConfigError("data.train_shards: 'synthetic' cannot be mixed with other sources.")
    sources = expand_urls(specs)
    if not exp.data.num_samples:
        from declip_ds.data.wds import read_num_samples

        read_num_samples([u for s in sources for u in s])  # sizes.json or a clear error, before any process
    if exp.data.mode == "epoch":
        check_epoch_shards(sum(len(s) for s in sources), D.env_world_size(), max(1, exp.data.workers))
    return sources


def synthetic_sources(exp: Experiment) -> list[list[str]]:
    """Generate the synthetic shards on rank 0 if needed (others wait), return their urls."""
    from declip_ds.data.synthetic import ensure_dataset

    s, root = exp.data.synthetic, Path(exp.data.synthetic_root)
    if D.rank() == 0:
        if s.generate_if_missing:
            ensure_dataset(root, num_samples=s.num_samples, shard_size=s.shard_size, seed=s.seed,
                           image_size=exp.model.vision.image_size, noise=s.noise,
                           eval_per_class=s.eval_samples_per_class, captions=s.captions, progress=True)
    D.barrier()
    urls = sorted(str(p) for p in (root / "train").glob("*.tar"))
    if not urls:
        raise ConfigError(f"No synthetic shards in {root / 'train'}; set data.synthetic.generate_if_missing=true "
                          f"or run python -m declip_ds.data.synthetic --out {root}.")
    if exp.data.mode == "epoch":
        from declip_ds.data.wds import check_epoch_shards

        check_epoch_shards(len(urls), D.world_size(), max(1, exp.data.workers))
    return [urls]


def build_loader(exp: Experiment, method, sources, epoch: int, start_batch: int = 0, cursors: dict | None = None,
                 last_stream: int | None = None):
    """The loader of one (virtual) epoch. Both modes are pure functions of (seed, epoch, rank, worker),
    so ``start_batch`` resumes exactly where a checkpoint left off (``cursors``: where each stream's
    consumed batches end and how many it made, so they are skipped undecoded; ``last_stream``: the
    stream of the last consumed batch, which epoch mode needs as its streams run dry at different
    batches)."""
    from declip_ds.data.wds import build_train_loader, read_num_samples

    d = exp.data
    num_samples = d.num_samples or read_num_samples([u for s in sources for u in s])
    return build_train_loader(
        sources, method.sample_transform(), exp.train.batch_size, rank=D.rank(), world_size=D.world_size(),
        seed=exp.train.seed, mode=d.mode, workers=d.workers, shuffle_buffer=d.shuffle_buffer,
        weights=d.train_weights or None, strict=d.strict, epoch=epoch, num_samples=num_samples,
        drop_last=True, start_batch=start_batch, cursors=cursors if start_batch else None,
        last_stream=last_stream if start_batch else None, jpeg_draft=d.jpeg_draft,
        pin_memory=d.pin_memory and torch.cuda.is_available(),
    )


def training_batches(exp: Experiment, loader):
    """The loader's batches; data.timeout_minutes is armed once every worker has delivered one (wds.Batches)."""
    from declip_ds.data.wds import Batches

    return Batches(loader, exp.data.timeout_minutes * 60, f"rank {D.rank()}'s training data ({exp.data.train_shards})")


def to_device(batch: dict, device, dtype) -> dict:
    """Float tensors to the compute dtype, integer tensors as they are; metadata stays on the host."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, dtype if v.is_floating_point() else v.dtype, non_blocking=True)
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------- optimisation


def param_groups(module: torch.nn.Module, weight_decay: float, no_decay_embeddings: bool,
                 decay_attention_in_proj_bias: bool = False) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms (every <2-D tensor; with
    ``decay_attention_in_proj_bias`` except the attention input-projection biases, as the DeCLIP
    reference), the temperatures and, if asked, embeddings; frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        one_d = p.ndim < 2 and not (decay_attention_in_proj_bias and ATTN_IN_PROJ_BIAS.search(name))
        skip = one_d or "logit_scale" in name or (no_decay_embeddings and any(n in name for n in NO_DECAY_NAMES))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def grad_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the local gradients (ZeRO 0: every rank holds the full averaged gradient)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def register_scales(engine, method) -> None:
    """ZeRO-3: make the temperatures external parameters of the method (the engine's module) from the start.

    The methods' forwards read them directly (``self.model.scale()``), not through a forward of the module
    that owns them, so ZeRO-3 gathers them only because DeepSpeed registers such a parameter with the
    running forward's module the first time it is read while partitioned. In a fresh run that is the first
    forward, inside the recorded fetch trace. After a checkpoint load it is not: the load gathers them
    (persistent parameters), so the trace is recorded without them; the next save's gather re-partitions
    them, the next forward registers them, and the following backward stops with DeepSpeed's "tracing error
    ... expected ... model.logit_scale ... but got ()". Registered here, every run traces them alike."""
    if engine.zero_optimization_stage() != 3:
        return
    import deepspeed

    for p in method.scale_parameters():
        deepspeed.zero.register_external_parameter(method, p)


@torch.no_grad()
def clamp_scales(engine, method, bounds) -> None:
    """Clamp the temperature parameters, including the optimizer's fp32 master copies (bf16, ZeRO):
    clamping only the module's copy would be undone by the next step."""
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param,
                                 safe_set_local_fp32_param)

    lo, hi = bounds
    zero3 = engine.zero_optimization_stage() == 3
    for p in method.scale_parameters():
        if zero3:  # the clamp is elementwise: each rank clamps its own partition of the master copy
            master = safe_get_local_fp32_param(p)
            if master is not None and master.numel() and not bool(((master >= lo) & (master <= hi)).all()):
                safe_set_local_fp32_param(p, master.clamp(lo, hi))
            # ... and of the working copy the next forward gathers from (setting the master does not copy
            # it there: without this the forward would use the unclamped value until the next step)
            partition = getattr(p, "ds_tensor", None)
            if partition is not None and partition.numel():
                partition.clamp_(lo, hi)
        else:
            master = safe_get_full_fp32_param(p)  # ZeRO-1/2 and the BF16_Optimizer; None otherwise
            if master is not None and not bool(((master >= lo) & (master <= hi)).all()):
                safe_set_full_fp32_param(p, master.clamp(lo, hi))
            elif master is None:  # ZeRO-0 with bf16/fp16: the FP16 optimizers' masters, found by position
                view = fp16_optimizer_master(engine.optimizer, p)
                if view is not None:
                    view.clamp_(lo, hi)
        if p.numel() > 0:  # ZeRO-3 partitions leave an empty local tensor
            p.data.clamp_(lo, hi)


def fp16_optimizer_master(optimizer, p: torch.Tensor) -> torch.Tensor | None:
    """The fp32 master copy of ``p`` (a view to clamp in place) under DeepSpeed's ZeRO-0 16-bit optimizers,
    which link no ``_hp_mapping`` for ``safe_get_full_fp32_param``: FP16_UnfusedOptimizer keeps one fp32
    tensor per parameter (``fp32_groups``), FP16_Optimizer (fused Adam) one flat tensor per group
    (``fp32_groups_flat``), laid out in ``fp16_groups`` order. None for any other optimizer (fp32 training
    keeps no copy). Without this the clamp reached only the working copy: the master drifted past the
    bound, and the temperature stayed stuck there long after the gradient turned."""
    for g, group in enumerate(getattr(optimizer, "fp16_groups", None) or []):
        for i, q in enumerate(group):
            if q is not p:
                continue
            if hasattr(optimizer, "fp32_groups"):
                return optimizer.fp32_groups[g][i].data
            if hasattr(optimizer, "fp32_groups_flat"):
                offset = sum(x.numel() for x in group[:i])
                return optimizer.fp32_groups_flat[g].data.narrow(0, offset, p.numel()).view_as(p)
    return None


# ----------------------------------------------------------------------------- logging


@dataclass
class Meter:
    """Running sums between two log lines."""

    sums: dict = field(default_factory=dict)
    count: int = 0
    data_time: float = 0.0
    step_time: float = 0.0
    samples: int = 0
    skips: dict = field(default_factory=dict)
    bad_steps: int = 0

    def add(self, out: dict) -> None:
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self.count += 1

    def add_skips(self, skips: dict | None) -> None:
        for k, v in (skips or {}).items():
            self.skips[k] = self.skips.get(k, 0) + int(v)


class SampleKeyLog:
    """train.log_sample_keys: ``<run_dir>/sample_keys/rank_XXXXX.jsonl``, one line per step with the keys of
    the samples this rank trained on in it (in micro-batch order)."""

    def __init__(self, run_dir: Path, rank: int):
        path = run_dir / "sample_keys" / f"rank_{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.f = rank, open(path, "a", buffering=1)  # line-buffered: a crash loses at most one step

    def write(self, step: int, keys: list) -> None:
        self.f.write(json.dumps({"step": step, "rank": self.rank, "keys": [str(k) for k in keys]}) + "\n")

    def close(self) -> None:
        self.f.close()


class Logger:
    def __init__(self, exp: Experiment, run_dir: Path, rank: int):
        self.rank, self.tb, self.wandb = rank, None, None
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"))
        self.jsonl = run_dir / "metrics.jsonl"
        if exp.train.wandb:
            import wandb

            try:
                self.wandb = wandb.init(project=exp.train.wandb_project, dir=str(run_dir), config=to_dict(exp))
            except BaseException:
                self.tb.close()
                raise

    def scalars(self, values: dict, step: int) -> None:
        """TensorBoard, wandb, and one JSON line per call in ``metrics.jsonl`` (exact float reprs,
        so two runs can be compared bitwise)."""
        if self.rank != 0:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for k, v in values.items():
            if v is not None and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self, exit_code: int = 0) -> None:
        tb, run, self.tb, self.wandb = self.tb, self.wandb, None, None  # closed once
        try:
            if tb is not None:
                tb.close()
        finally:  # W&B finished even when TensorBoard's write fails (disk full)
            if run is not None:
                run.finish(exit_code=exit_code)

    def close_after_error(self) -> None:
        """When the run stops with an error: TensorBoard's buffered events (up to a couple of minutes' worth)
        are written out and the W&B run is finished as failed; a failure here is logged, never raised over the
        run's own error."""
        try:
            self.close(exit_code=1)
        except Exception as e:  # noqa: BLE001
            log.warning("could not close the run's logs after the error: %s: %s", type(e).__name__, e)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    if D.world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=D.device())
    dist.all_reduce(t)
    return {k: float(v) / D.world_size() for k, v in zip(keys, t.tolist())}


# ----------------------------------------------------------------------------- preemption


class StopRequest:
    """SIGTERM / SIGUSR1 (on any rank), the wall-time limit or the stop file (seen by rank 0): every rank
    saves at the next step boundary and the run exits with PREEMPTED_EXIT_CODE.

    The stop file is the launcher-independent way: a launcher that receives a signal itself answers it
    its own way (DeepSpeed's kills the ranks' process trees after 30 s and exits 1, or dies at once on
    SIGUSR1), while ranks that stop by themselves exit 75, which the launchers pass on."""

    def __init__(self, max_wall_minutes: float, stop_file: Path | None = None):
        import signal

        self.reason, self.stop_file = None, stop_file
        self.deadline = time.monotonic() + 60 * max_wall_minutes if max_wall_minutes > 0 else None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.reason = f"signal {signum}"

    def should_stop(self) -> bool:
        """Collective: true on every rank as soon as one rank was asked to stop."""
        if self.reason is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.reason = "wall-time limit (train.max_wall_minutes)"
        if self.reason is None and self.stop_file is not None and D.rank() == 0 and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        return D.all_reduce_int(0 if self.reason is None else 1, op=dist.ReduceOp.MAX) == 1

    def consume(self) -> None:
        """After the checkpoint is saved: rank 0 removes the stop file, so that the rerun goes on."""
        if self.stop_file is not None and D.rank() == 0 and self.reason and self.reason.startswith("stop file"):
            self.stop_file.unlink(missing_ok=True)
            log.info("removed the stop file %s (the checkpoint is saved)", self.stop_file)


# ----------------------------------------------------------------------------- evaluation


def evaluate(exp: Experiment, method, step: int, logger: Logger, run_dir: Path) -> dict:
    """Zero-shot on the configured eval tasks, every rank scoring its shards; the sums are exact."""
    from declip_ds.eval.zero_shot import NoEvalSamples, evaluate_task_dir, token_settings

    root = Path(exp.eval.data_root or Path(exp.data.synthetic_root) / "eval")
    tok = method.tokenizer()
    group = dist.group.WORLD if D.world_size() > 1 else None
    results = {}
    method.eval()
    try:
        for task in exp.eval.tasks:
            task_dir = root / task
            seen = D.all_reduce_int(int((task_dir / "classnames.txt").is_file()))  # collective: skip on all or none
            if seen < D.world_size():
                log.warning("zero-shot task '%s' skipped: %s/classnames.txt not found%s", task, task_dir,
                            f" on {D.world_size() - seen} of {D.world_size()} ranks (every rank must see the same "
                            f"eval data: eval.data_root on a shared filesystem)" if seen else "")
                continue
            try:
                results[task] = evaluate_task_dir(
                    method.model, tok, task_dir, templates=exp.eval.templates, image_size=exp.model.vision.image_size,
                    normalize=exp.data.normalize, interpolation=exp.eval.interpolation, crop_ratio=exp.eval.crop_ratio,
                    batch_size=exp.eval.batch_size, rank=D.rank(), world_size=D.world_size(), group=group,
                    scoring=getattr(method.cfg, "zero_shot_scoring", "global"), **token_settings(method.cfg),
                )
            except NoEvalSamples as e:  # on every rank (the count is summed): the run goes on without it
                log.warning("zero-shot task '%s' skipped: %s", task, e)
        retrieval = evaluate_retrieval_sources(exp, method, tok, group)
    finally:
        method.train()
    # the live (DeepSpeed) module: bf16 / fp16 weights under those precisions, unlike the fp32 model.safetensors
    dtype = str(next(method.model.parameters()).dtype).removeprefix("torch.")
    with D.errors_shared(group):  # rank 0's logs and files: a failure there (disk full) stops every rank together
        _report_eval(exp, method, step, logger, run_dir, results, retrieval, dtype)
    return results


def _report_eval(exp: Experiment, method, step: int, logger: Logger, run_dir: Path, results: dict, retrieval: dict,
                 dtype: str) -> None:
    """Rank 0: the evaluation's log lines, scalars and eval/*_step_N.json records."""
    from declip_ds.eval.zero_shot import format_table

    if D.rank() == 0 and retrieval:
        log.info("retrieval at step %d:\n%s", step, "\n".join(
            f"{name}: " + "  ".join(f"{k} {100 * v:.2f}" for k, v in r.items() if "@" in k)
            + f"  mean {100 * r['mean_recall']:.2f}  ({r['n_images']} images, {r['n_texts']} captions)"
            for name, r in retrieval.items()))
        logger.scalars({f"retrieval/{n}/{k}": v for n, r in retrieval.items() for k, v in r.items()
                        if "@" in k or k == "mean_recall"}, step)
        (run_dir / "eval").mkdir(exist_ok=True)
        record = {"step": step, "config_hash": config_hash(exp), "method": exp.method.name, "dtype": dtype,
                  "scoring": getattr(method.cfg, "zero_shot_scoring", "global"), "results": retrieval}
        (run_dir / "eval" / f"retrieval_step_{step:08d}.json").write_text(json.dumps(record, indent=2))
    if D.rank() == 0 and results:
        note = "" if dtype == "float32" else (f" (the training model, in {dtype}; the saved fp32 weights, e.g. through "
                                              f"eval_zeroshot.py, can differ slightly)")
        log.info("zero-shot at step %d%s:\n%s", step, note, format_table(results))
        logger.scalars({f"zeroshot/{t}/{m}": v for t, r in results.items() for m, v in r.items() if m != "n"}, step)
        (run_dir / "eval").mkdir(exist_ok=True)
        record = {"step": step, "config_hash": config_hash(exp), "method": exp.method.name, "dtype": dtype,
                  "results": results}
        (run_dir / "eval" / f"zeroshot_step_{step:08d}.json").write_text(json.dumps(record, indent=2))


def evaluate_retrieval_sources(exp: Experiment, method, tok, group) -> dict:
    """Recall@k of every ``eval.retrieval`` source (every rank embeds its part, rank 0 scores, all get the numbers),
    by the method's scoring; a source that vanished or holds no captioned image is skipped with a warning."""
    from declip_ds.eval.report import dataset_name
    from declip_ds.eval.retrieval import evaluate_retrieval, resolve_source

    out = {}
    for path in exp.eval.retrieval:
        try:
            with D.errors_shared(group):  # a source missing on one rank only: skipped on every rank
                source = resolve_source(path)
            name = source.name or dataset_name(path)
            out[name] = evaluate_retrieval(
                method.model, tok, source, image_size=exp.model.vision.image_size, normalize=exp.data.normalize,
                interpolation=exp.eval.interpolation, crop_ratio=exp.eval.crop_ratio, batch_size=exp.eval.batch_size,
                rank=D.rank(), world_size=D.world_size(), group=group,
                scoring=getattr(method.cfg, "zero_shot_scoring", "global"),
                mask_padding=getattr(method.cfg, "mask_padding", True))
        except Exception as e:  # noqa: BLE001 (only what every rank raised is skipped: the ranks must go on alike)
            # shared by share_error (one rank's unreadable image or out-of-memory while scoring: its own error
            # there, RankFailed on the others; a missing or empty source); alone, a missing or empty source
            if not (D.was_shared(e) or (D.world_size() == 1 and isinstance(e, (FileNotFoundError, ValueError)))):
                raise
            log.warning("retrieval on '%s' skipped: %s: %s", path, type(e).__name__, e)
    return out


def applied_lr(scheduler) -> float:
    """The LR the last optimizer step used (``get_last_lr()`` is already the next step's): what a log
    line of step s should show, lr_at(s - 1)."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](max(scheduler.last_epoch - 1, 0))


def check_eval(exp: Experiment) -> None:
    """What the zero-shot evaluation will need, checked before training rather than at its end."""
    if exp.eval.at_end or exp.train.eval_every:
        from declip_ds.eval.retrieval import resolve_source
        from declip_ds.eval.zero_shot import check_templates

        check_templates(exp.eval.templates)
        check_eval_tasks(exp)
        for i, path in enumerate(exp.eval.retrieval):
            try:
                resolve_source(path)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"eval.retrieval[{i}]: {e} Fix the path or drop it from eval.retrieval.") from None


def check_eval_tasks(exp: Experiment) -> None:
    """Every ``eval.tasks`` entry must be a task directory under the eval root (classnames.txt and shards),
    or, for the synthetic root the trainer generates, one of its tasks: a typo in eval.data_root or a task
    name would otherwise cost the run its zero-shot numbers at the end, with only a warning."""
    from declip_ds.data.synthetic import TASKS

    root = Path(exp.eval.data_root or Path(exp.data.synthetic_root) / "eval")
    key = "eval.data_root" if exp.eval.data_root else "eval.data_root (unset: <data.synthetic_root>/eval)"
    generated = (not exp.eval.data_root and exp.data.train_shards == ["synthetic"]
                 and exp.data.synthetic.generate_if_missing)

    def usable(d: Path) -> bool:
        return (d / "classnames.txt").is_file() and any(d.glob("*.tar"))

    for task in exp.eval.tasks:
        d = root / task
        if usable(d):
            continue
        if generated and task in TASKS:  # made with the training shards if missing
            continue
        what = ("has no classnames.txt" if d.is_dir() and not (d / "classnames.txt").is_file()
                else "has no .tar shards" if d.is_dir() else "does not exist")
        known = sorted(p.name for p in root.iterdir() if usable(p)) if root.is_dir() else []
        raise ConfigError(
            f"eval.tasks: '{task}' needs the directory {d} (classnames.txt and *.tar shards with a cls key), which "
            f"{what}. {key} is {root}" + (f", whose tasks are: {', '.join(known)}" if known else "")
            + ". Fix eval.data_root or eval.tasks, or set eval.at_end=false and train.eval_every=0 to train "
              "without zero-shot evaluation.")


def data_stream(exp: Experiment, world: int) -> dict:
    """The settings that decide which samples an (epoch, micro-batch) position holds (the bad-step guard's
    records of skipped batches apply only to the stream that wrote them)."""
    d = exp.data
    return {"world_size": world, "workers": d.workers, "seed": exp.train.seed, "mode": d.mode,
            "batch_size": exp.train.batch_size, "train_shards": list(d.train_shards),
            "train_weights": list(d.train_weights), "num_samples": d.num_samples, "shuffle_buffer": d.shuffle_buffer}


# data_stream keys that change the order of a stream's raw samples (batch_size does not: cursors count samples)
STREAM_ORDER_KEYS = ("mode", "seed", "train_shards", "train_weights", "shuffle_buffer")


def fresh_start_message(run_dir: Path) -> str:
    """What ``--resume auto`` says when it finds no checkpoint: the absolute directory it looked in (a
    relative train.output_dir follows the working directory), and the steps this directory's metrics.jsonl
    logged, which are trained again (a run that died before its first save, or a checkpoints/ that is
    gone)."""
    ckpt = (run_dir / "checkpoints").resolve()
    last = None
    try:
        with open(run_dir / "metrics.jsonl") as f:
            for line in f:
                try:
                    last = max(last or 0, int(json.loads(line)["step"]))
                except (ValueError, KeyError, TypeError):
                    continue
    except OSError:
        pass
    msg = f"no complete checkpoint in {ckpt} (--resume auto): starting at step 0"
    if last:
        msg += (f". This directory's metrics.jsonl logged steps up to {last}, which are trained again; if the "
                f"checkpoints are elsewhere, stop and pass --resume PATH (or fix train.output_dir)")
    return msg


# ----------------------------------------------------------------------------- the run


def _on_rank_0(rank: int, work) -> None:
    """Collective: ``work()`` on rank 0 alone (the run directory's files), which returns an error message or None;
    every rank raises a CheckpointError with it (exit 2), rather than rank 0 alone while the others wait."""
    error = next((e for e in D.gather_objects(work() if rank == 0 else None) if e), None)
    if error:
        raise C.CheckpointError(error)


def train(exp: Experiment, *, ds_config: str | None = None, resume: str = "auto") -> dict:
    """Train ``exp``; returns the last logged losses and the final zero-shot results."""
    opened: list[Logger] = []  # the run's logger once made: closed here if the run stops with an error
    try:
        return _train(exp, ds_config, resume, opened)
    except BaseException:
        for logger in opened:
            logger.close_after_error()
        raise


def _train(exp: Experiment, ds_config: str | None, resume: str, opened: list) -> dict:
    from declip_ds.data.wds import SAMPLE_SKIP_KINDS, SKIP_KINDS, counted_cursors, read_cursors

    # 1. everything that can fail without a process group or a loader
    src = ds_config or "the default DeepSpeed config (ZeRO 0)"
    ds_user = read_ds_config(ds_config)
    ds_cfg = build_ds_config(exp, ds_user, D.env_world_size(), src)
    precision = resolve_precision(exp, ds_user, src)
    check_eval(exp)
    sources = resolve_sources(exp)
    zero_stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
    target = C.plan_resume(resume, Path(exp.train.output_dir), D.env_world_size(), zero_stage)
    _set_load_universal(ds_cfg, target, src)

    # 2. processes
    rank, world = D.init_distributed(D.process_group_timeout_s(exp.data.timeout_minutes))
    setup_logging(rank)
    run_dir = Path(exp.train.output_dir)
    def lock() -> str | None:  # first: another training there may be saving
        try:
            return C.lock_run_dir(run_dir)
        except OSError as e:  # read-only, not a directory, no space
            return (f"cannot create or lock train.output_dir {run_dir}: {e}. Give the run a directory this job can "
                    f"write to (train.output_dir=...).")

    def write_config() -> str | None:
        try:
            save_config(exp, run_dir / "config.yaml")
        except OSError as e:  # a full disk
            return f"cannot write {run_dir / 'config.yaml'}: {e}. Free space in train.output_dir or choose another."
        return None

    _on_rank_0(rank, lock)
    C.agree_on_target(target)  # before a rank without one builds a model and trains from step 0 alone
    import deepspeed

    from declip_ds.registry import get_method

    _on_rank_0(rank, write_config)
    if sources is None:
        sources = synthetic_sources(exp)

    # 3. method (towers + heads) and engine; identical initial weights on every rank
    torch.manual_seed(exp.train.seed)
    group = dist.group.WORLD if world > 1 else None
    method = get_method(exp.method.name)(exp, group=group)
    if exp.model.grad_checkpointing:
        method.model.set_grad_checkpointing(True)
    from declip_ds.train.schedule import lr_lambda

    engine, _, _, scheduler = deepspeed.initialize(
        model=method, model_parameters=param_groups(method, exp.train.weight_decay, exp.train.no_decay_embeddings,
                                                    exp.train.decay_attention_in_proj_bias),
        config=ds_cfg, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(exp.train)),
    )
    dtype, device = DTYPES[precision], engine.device
    register_scales(engine, method)
    guard = Guard(exp.train, run_dir, data_stream(exp, world))  # the positions of bad batches mean the same samples in this stream
    guard.agree()  # collective: the same batches are passed over on every rank
    method.defer_commit = True  # forward() leaves its per-step state (DeCLIP's queue) until the guard accepts

    # 4. resume
    def restore(found: C.ResumeTarget) -> tuple[int, int, int, int]:
        """Engine, optimizer, scheduler, RNG and method state of a checkpoint (or, if a file of it cannot
        be read, of the next older complete one); its data position. Newer tags in this run's
        checkpoints/ then belong to an abandoned branch and are moved aside."""
        nonlocal last_stream
        found, client = C.resume_from(engine, method, found, exp.train.seed, to_dict(exp), world, zero_stage,
                                       exp.train.checkpoint_integrity)
        skipped_total.clear()  # the run's skip counts up to the checkpoint, summed over ranks
        skipped_total.update({k: int(client.get("skipped_total", {}).get(k, 0)) for k in SKIP_KINDS})
        C.set_aside_newer(run_dir / "checkpoints", int(client["step"]))
        guard.load_state_dict(client.get("guard"))  # running loss mean and counts, so spike checks resume
        position = (client["step"], client["samples_seen"], client.get("epoch", 0), client.get("epoch_batches", 0))
        cursors.clear()
        data = client.get("data") or {}
        last_stream = None
        if (data.get("epoch"), data.get("epoch_batches"), data.get("workers")) == (*position[2:], exp.data.workers):
            cursors.update(read_cursors(data.get("cursors")))
            last_stream = data.get("last_stream")
        counted = last_stream is not None and counted_cursors(cursors)
        if position[3] and (exp.data.mode == "resampled" or counted):
            log.info("data: resuming at batch %d of epoch %d; %s", position[3], position[2],
                     f"{len(cursors)} loader stream(s) skip the {sum(e for e, _ in cursors.values())} samples they "
                     f"had read, without decoding them" if cursors else
                     "the checkpoint has no stream cursors for this world size and data.workers: the consumed "
                     "batches are decoded again and dropped")
        log.info("resumed from %s at step %d (%d samples seen)%s", found.path, position[0], position[1],
                 " through DeepSpeed's universal checkpoint loader" if found.universal else "")
        saved_world = int(client.get("world_size") or found.world_size or world)
        if saved_world != world:
            position = _position_at_new_world_size(position, saved_world, world)
        # settings that reorder the raw samples: the cursors' sample counts point elsewhere in the new stream
        was, now = data.get("stream") or {}, data_stream(exp, world)
        reordered = [f"data.{k}" if k != "seed" else "train.seed" for k in STREAM_ORDER_KEYS
                     if k in was and was[k] != now[k]]
        if exp.data.mode == "epoch" and position[3] and (reordered or not (counted and saved_world == world)):
            log.warning("data.mode=epoch resumes at the start of epoch %d (%d batches of it are seen again): %s",
                        position[2], position[3],
                        f"{', '.join(reordered)} changed since the checkpoint, so its stream cursors would skip "
                        f"other samples than those it trained on" if reordered else
                        "the checkpoint's stream cursors do not fit this run (a different world size or "
                        "data.workers, or a checkpoint from before they were counted)")
            position = (*position[:3], 0)
            cursors.clear()
            last_stream = None
        elif reordered and position[3]:
            log.info("data: %s changed since the checkpoint; the resumed streams skip as many samples as the old "
                     "ones had read (resampled mode draws with replacement: nothing is lost)", ", ".join(reordered))
        return position

    step, samples_seen, epoch, epoch_batches = 0, 0, 0, 0
    skipped_total = dict.fromkeys(SKIP_KINDS, 0)  # logged skips since the run began, summed over ranks
    # the loader's streams: where their consumed batches end and how many they made (wds "_cursor"), and
    # the stream of the last consumed batch
    cursors: dict[int, tuple[int, int | None]] = {}
    last_stream: int | None = None
    torch.manual_seed(exp.train.seed * 1000 + rank)  # per-rank randomness (dropout, ...) from here on
    if target is None:
        if resume == "none":
            log.info("--resume none: starting at step 0")
        else:
            log.warning(fresh_start_message(run_dir))
        C.set_aside_newer(run_dir / "checkpoints", 0)  # --resume none: an earlier run's tags are kept, aside
    else:
        step, samples_seen, epoch, epoch_batches = restore(target)
    clamp_scales(engine, method, exp.model.logit_scale_bounds)  # the reference raises the init into bounds
    updates = SkippedUpdates(engine, precision, exp.train.max_bad_steps)  # DeepSpeed's own overflow skips

    # 5. steps
    config_yaml = yaml.safe_dump(to_dict(exp), sort_keys=False)
    data_iter = None  # built in fetch() from (epoch, epoch_batches, cursors, last_stream), where an error is shared
    with D.errors_shared(group):  # rank 0's wandb.init failing stops every rank
        logger = Logger(exp, run_dir, rank)
    meter = Meter()
    opened.append(logger)
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=exp.train.steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stdout)
    last, results = {}, {}

    from declip_ds.data.wds import DataError

    def fetch():
        """``data_iter.next()`` on every rank together (the loader built first when there is none): (this rank's
        batch or None, the ranks without one). An error on one rank (a DataError: stalled or unreadable shards,
        an unreadable sizes.json at an epoch's start; a DataLoader worker that died or did not start) stops
        every rank: the others would wait in the next collective for the process-group timeout (30 minutes
        under NCCL), and the job would end with a timeout that names neither the rank nor the cause."""
        nonlocal data_iter
        error = None
        try:
            if data_iter is None:  # the run's first loader, a new epoch's, or the one after a rollback
                if fault("loader_error", step + 1):  # test hook
                    raise DataError(f"test hook: rank {rank}'s loader failed to start at step {step + 1}")
                data_iter = training_batches(
                    exp, build_loader(exp, method, sources, epoch, epoch_batches, cursors, last_stream))
            if fault("data_error", step + 1):  # test hook
                raise DataError(f"test hook: rank {rank}'s data failed at step {step + 1}")
            got = data_iter.next()
        except Exception as e:  # noqa: BLE001 (re-raised below, on this rank and for the others)
            got, error = None, e
        flags = D.all_reduce_ints([int(error is not None and r == rank) for r in range(world)]
                                  + [int(got is None and r == rank) for r in range(world)])
        failed = [r for r in range(world) if flags[r]]
        if error is not None:
            raise error
        if failed:
            raise DataError(f"rank(s) {failed} of {world} stopped on an error in their training data (the "
                            f"message is in their log above); stopping every rank.")
        return got, [r for r in range(world) if flags[world + r]]

    def next_batch():
        """The next micro-batch; when any rank's (virtual) epoch is over, all ranks start the next one
        together (ranks can run dry at different batches in epoch mode; a collective would hang).
        Batches recorded as bad by the guard (this run or an earlier one) are passed over."""
        nonlocal data_iter, epoch, epoch_batches, last_stream
        while True:
            batch, dry = fetch()
            if dry:
                if len(dry) < world and rank == 0:  # epoch mode: the shards are shared out by count
                    log.info("epoch %d ended after %d batches: rank(s) %s ran out of data; the rest of rank(s) %s's "
                             "samples of this epoch are passed over (epoch mode ends an epoch at the rank with the "
                             "fewest batches)", epoch, epoch_batches, dry, [r for r in range(world) if r not in dry])
                epoch, epoch_batches, last_stream = epoch + 1, 0, None
                cursors.clear()
                data_iter = None  # the new epoch's loader, from its first batch
                batch, empty = fetch()
                if empty:  # on every rank: one rank stopping alone would leave the others in a collective
                    raise DataError(
                        f"epoch {epoch} of the training data gives no batch of {exp.train.batch_size} on rank(s) "
                        f"{empty} of {world}. Epoch mode shares the shards out by "
                        f"count, not by samples: those ranks drew only shards with fewer usable samples than a "
                        f"batch (empty, corrupt or very small shards; see the skip counts in the log). Remove or "
                        f"merge them in data.train_shards, or use data.mode=resampled.")
            epoch_batches += 1
            stream, end, made = batch.pop("_cursor")
            cursors[stream], last_stream = (end, made), stream
            if not guard.is_known_bad(epoch, epoch_batches):
                return batch
            log.warning("passing over batch %d of epoch %d: recorded in %s", epoch_batches, epoch, guard.path)

    stop_file = run_dir / exp.train.stop_file if exp.train.stop_file else None  # an absolute path stays itself
    stop, own_norm = StopRequest(exp.train.max_wall_minutes, stop_file), None
    preempted = False
    t_last = time.perf_counter()
    contrastive = exp.train.accumulation == "contrastive"
    bn_stats = BatchStats(method)  # saved before each forward, restored when the guard skips the batch
    rollbacks = [None, 0]  # [checkpoint tag, rollbacks to it in a row] for train.max_rollbacks

    def finish_window(inputs, loss) -> None:
        """Before a rollback: complete DeepSpeed's gradient-accumulation window (the step's earlier
        micro-batches are already back-propagated) with zero-weighted micro-steps, so that DeepSpeed runs
        its own boundary on every ZeRO stage (reduction, optimizer step, gradients zeroed) and the engine
        is at a boundary again; the checkpoint loaded next overwrites whatever that step changed."""
        while engine.micro_steps % engine.gradient_accumulation_steps():
            if loss is None:
                loss = method.total_loss(engine(inputs))
                method.commit_deferred(keep=False)
            engine.backward(loss * 0.0)
            engine.step()
            loss = None

    def on_bad_batch(reason: str, batches: list, finish=None) -> bool:
        """The bad-step policy of both accumulation modes for a batch the guard skipped (``batches``: its
        micro-batches' (epoch, epoch_batch, keys)): count, log, record; after train.max_bad_steps in a row,
        stop (BadStepsError) or roll back to the last complete checkpoint, at most train.max_rollbacks
        times in a row to the same one. True when it rolled back (``finish()`` first)."""
        nonlocal step, samples_seen, epoch, epoch_batches, data_iter
        guard.record(reason, step + 1, batches)
        meter.bad_steps += 1
        log.warning("step %d: %s; %s skipped on every rank (%d in a row, %d in all)", step + 1, reason,
                    "micro-batch" if not contrastive else f"contrastive batch of {len(batches)} micro-batches",
                    guard.in_a_row, guard.total)
        if not guard.too_many():
            return False
        back = None
        if exp.train.on_bad_steps == "rollback":
            try:
                back = C.plan_rollback(run_dir, world, zero_stage)  # collective: every rank is here
            except C.CheckpointError as e:
                raise BadStepsError(f"{guard.in_a_row} bad steps in a row (last: {reason}) at step {step + 1}; "
                                    f"cannot roll back: {e} The batches are listed in {guard.path}.") from None
        if back is None:
            raise BadStepsError(
                f"{guard.in_a_row} bad steps in a row (last: {reason}) at step {step + 1}; stopping"
                f"{'' if exp.train.on_bad_steps == 'stop' else ' (no complete checkpoint to roll back to yet)'}. "
                f"The batches are listed in {guard.path} and are passed over on restart; lower train.lr "
                f"{'or set train.on_bad_steps=rollback' if exp.train.on_bad_steps == 'stop' else 'or save earlier (train.save_every)'}.")
        done = rollbacks[1] if rollbacks[0] == back.tag else 0
        if done >= exp.train.max_rollbacks:
            raise BadStepsError(
                f"{guard.in_a_row} bad steps in a row (last: {reason}) at step {step + 1} after {done} rollbacks "
                f"in a row to {back.path} (train.max_rollbacks={exp.train.max_rollbacks}); stopping. The batches "
                f"are listed in {guard.path} and are passed over on restart; lower train.lr or raise "
                f"train.max_rollbacks.")
        rollbacks[:] = [back.tag, done + 1]
        if finish is not None:
            finish()
        step, samples_seen, epoch, epoch_batches = restore(back)  # also the guard's state (in_a_row = 0)
        data_iter = None  # rebuilt at the restored position by the next fetch()
        meter.sums, meter.count, meter.skips = {}, 0, {}  # the losses and skips of the steps rolled back
        if bar is not None:
            bar.n = step
            bar.refresh()
        log.warning("rolled back to step %d after repeated bad steps (rollback %d of at most %d in a row to this "
                    "checkpoint: train.max_rollbacks)", step, done + 1, exp.train.max_rollbacks)
        return True

    def contrastive_backward(surrogate):
        nonlocal own_norm
        engine.backward(poison_grad(surrogate, step + 1), scale_wrt_gas=False)  # the k surrogates add up to the big batch's gradient
        if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0:
            own_norm = grad_norm(method)
        engine.step()
    key_log = SampleKeyLog(run_dir, rank) if exp.train.log_sample_keys else None
    while step < exp.train.steps:
        micro, step_keys = 0, []
        while micro < exp.train.grad_accum:
            if contrastive:  # all k micro-batches form one contrastive batch
                pending, where, t0 = [], [], time.perf_counter()
                for _ in range(exp.train.grad_accum):
                    b = next_batch()
                    meter.add_skips(b.pop("_skips", None))
                    where.append((epoch, epoch_batches, b.pop("__key__", None)))
                    b.pop("__url__", None)
                    pending.append(to_device(b, device, dtype))
                meter.data_time += time.perf_counter() - t0
                bn_stats.save()
                big = ContrastiveBatch(method, pending, runner=engine)
                bad = guard.check(big.loss, step + 1)
                if bad is not None:
                    bn_stats.restore()  # the no-grad pass's (and the loss heads') statistics
                    on_bad_batch(bad, where)  # no step taken: DeepSpeed is at a boundary
                    continue
                big.backward(contrastive_backward)
                step_keys = [k for _, _, keys in where for k in (keys or [])]
                meter.add({**big.out, "loss": big.loss.detach()})
                samples_seen += exp.train.batch_size * world * exp.train.grad_accum
                break
            t0 = time.perf_counter()
            batch = next_batch()
            meter.data_time += time.perf_counter() - t0
            meter.add_skips(batch.pop("_skips", None))
            keys = batch.pop("__key__", None)
            batch.pop("__url__", None)
            inputs = to_device(batch, device, dtype)
            bn_stats.save()
            out = engine(inputs)
            loss = method.total_loss(out)
            bad = guard.check(loss, step + 1)  # collective: bad on any rank = skipped on every rank
            method.commit_deferred(keep=bad is None)  # DeCLIP's queue: only a batch that is trained on
            if bad is not None:
                bn_stats.restore()  # a skipped micro-batch leaves no trace in the BatchNorm statistics
                if on_bad_batch(bad, [(epoch, epoch_batches, keys)], finish=lambda: finish_window(inputs, loss)):
                    micro, step_keys = 0, []  # rolled back: this step starts again
                continue
            engine.backward(poison_grad(loss, step + 1))
            if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0:
                own_norm = grad_norm(method)  # DeepSpeed reports none for ZeRO 0 without clipping
            engine.step()
            meter.add({**out, "loss": loss.detach()})
            step_keys += keys or []
            samples_seen += exp.train.batch_size * world
            micro += 1
        step += 1
        if key_log is not None:
            key_log.write(step, step_keys)
        updates.after_step(step)
        clamp_scales(engine, method, exp.model.logit_scale_bounds)
        if bar is not None:
            bar.update(1)
        if step % exp.train.log_every == 0 or step == exp.train.steps:
            now = time.perf_counter()
            values = mean_over_ranks({k: v / max(meter.count, 1) for k, v in meter.sums.items()})
            if not all(math.isfinite(v) for v in values.values()):
                log.warning("non-finite loss at step %d: %s", step, values)
            elapsed = now - t_last
            values.update(
                bad_steps=guard.total, skipped_updates=int(engine.skipped_steps), lr=applied_lr(scheduler),
                samples_per_s_per_rank=meter.count * exp.train.batch_size / elapsed,
                data_wait=meter.data_time / elapsed, epoch=epoch,
            )
            gn = engine.get_global_grad_norm()
            gn = own_norm if gn is None else gn
            if gn is not None:
                values["grad_norm"] = float(gn)
            counts = D.all_reduce_ints([meter.skips.get(k, 0) for k in SKIP_KINDS])
            skipped = {f"skipped/{k}": n for k, n in zip(SKIP_KINDS, counts) if k in meter.skips}
            for k, n in zip(SKIP_KINDS, counts):
                skipped_total[k] += n
            values["skipped_samples"] = sum(skipped_total[k] for k in SAMPLE_SKIP_KINDS)  # since the run began
            last = values
            logger.scalars({**values, **skipped}, step)
            if rank == 0:
                parts = " ".join(f"{k}={v:.4g}" for k, v in values.items() if k.endswith("loss") or k == "loss")
                msg = (f"step {step}/{exp.train.steps} {parts} lr={values['lr']:.3g} scale={values.get('logit_scale', 0):.3g} "
                       f"{values['samples_per_s_per_rank']:.1f} samples/s/rank data_wait={100 * values['data_wait']:.0f}%")
                msg += "".join(f" {k}={v}" for k, v in skipped.items() if v)
                (bar.write if bar is not None else log.info)(msg)
            meter, t_last = Meter(), time.perf_counter()
        preempted = stop.should_stop()
        if step % exp.train.save_every == 0 or step == exp.train.steps or preempted:
            client = {"step": step, "samples_seen": samples_seen, "epoch": epoch, "epoch_batches": epoch_batches,
                      "config": to_dict(exp),
                      "config_hash": config_hash(exp), "world_size": world,
                      "zero_stage": engine.zero_optimization_stage(), "precision": precision,
                      "versions": _versions(),
                      # with the skips of the steps since the last log line (collective: every rank saves here)
                      "skipped_total": {k: skipped_total[k] + n for k, n in
                                        zip(SKIP_KINDS, D.all_reduce_ints([meter.skips.get(k, 0) for k in SKIP_KINDS]))}}
            C.save(engine, method, run_dir / "checkpoints", step, client, config_yaml, exp.train.keep_last,
                   guard_state=guard.state_dict(), integrity=exp.train.checkpoint_integrity,
                   data_state={"epoch": epoch, "epoch_batches": epoch_batches, "workers": exp.data.workers,
                               "cursors": {k: list(v) for k, v in cursors.items()}, "last_stream": last_stream,
                               "stream": data_stream(exp, world)})
        if preempted:
            stop.consume()
            log.warning("stopping at step %d (%s): checkpoint saved; exit code %d; rerun the same command to "
                        "resume", step, stop.reason or "another rank was asked to stop", PREEMPTED_EXIT_CODE)
            break
        if exp.train.eval_every and step % exp.train.eval_every == 0 and step != exp.train.steps:
            evaluate(exp, method, step, logger, run_dir)
    if bar is not None:
        bar.close()
    if key_log is not None:
        key_log.close()
    if exp.eval.at_end and not preempted:
        results = evaluate(exp, method, step, logger, run_dir)
    # rank 0 flushes TensorBoard / W&B: a failure there reaches every rank, so that either all of them end
    # normally (and train.py destroys the process group) or none does
    with D.errors_shared(dist.group.WORLD if world > 1 else None):
        logger.close()
    return {"last": last, "zeroshot": results, "step": step, "preempted": preempted}


def _position_at_new_world_size(position: tuple, saved_world: int, world: int) -> tuple:
    """(step, samples_seen, epoch, epoch_batches) of a checkpoint saved at ``saved_world`` ranks, for
    ``world`` ranks: the same share of the current (virtual) epoch. The step, the LR schedule and the
    sample count carry over; which samples come next does not (see the README's "Changing the number
    of GPUs")."""
    epoch_batches = position[3] * saved_world // world
    if D.rank() == 0:
        log.warning("world size changed from %d to %d: every rank's RNGs are reseeded from (seed, rank, step); in "
                    "data.mode=resampled each rank continues its own (seed, epoch, rank, worker) stream after %d "
                    "batches, so the samples drawn from here on differ from a %d-rank run's (same distribution and "
                    "position in the virtual epoch; reproducible when this resume is repeated at %d ranks)",
                    saved_world, world, epoch_batches, saved_world, world)
    return (*position[:3], epoch_batches)


def _set_load_universal(ds_cfg: dict, target, src: str) -> None:
    """DeepSpeed's ``checkpoint.load_universal`` is ours to set: true exactly when the resume target is
    a universal checkpoint (a universal load of a regular tag, or the reverse, fails inside DeepSpeed)."""
    theirs = ds_cfg.get("checkpoint", {}).get("load_universal")
    universal = bool(target is not None and target.universal)
    if theirs and not universal:
        raise ConfigError(f"{src}: checkpoint.load_universal=true, but the resume target "
                          f"{target.path if target else '(none: a fresh start)'} is not a universal checkpoint. "
                          f"Remove the key: the trainer sets it when it resumes from a <tag>_universal "
                          f"directory made by python -m declip_ds.train.universal.")
    ds_cfg.setdefault("checkpoint", {})["load_universal"] = universal


def _versions() -> dict:
    import deepspeed

    import declip_ds

    return {"declip_ds": declip_ds.__version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__}
