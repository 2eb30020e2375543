"""Fill the DeepSpeed JSON with the fields our experiment config owns; refuse contradictions.

Ours: micro-batch size, gradient accumulation, global batch, precision, optimizer, gradient
clipping. The schedule is ours too (a LambdaLR handed to ``deepspeed.initialize``), so a
``scheduler`` section in the JSON is an error. The JSON keeps ZeRO stage, offload, communication
and everything else.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from declip_ds.config import ConfigError, Experiment

KNOWN_TOP_LEVEL = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "amp", "zero_optimization", "gradient_clipping", "steps_per_print",
    "wall_clock_breakdown", "activation_checkpointing", "communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "checkpoint", "data_types", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comms_logger",
    "dump_state", "memory_breakdown", "seq_parallel_communication_data_type", "torch_autocast",
    "compile", "elasticity", "aio", "sparse_gradients", "disable_allgather", "load_universal_checkpoint",
}


def read_ds_config(path: str | None) -> dict:
    if path is None:
        return {"zero_optimization": {"stage": 0}}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--ds_config {path}: file not found. Use one of ds_configs/*.json.")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {path}: not valid JSON ({e}).") from None
    unknown = sorted(set(data) - KNOWN_TOP_LEVEL)
    if unknown:  # DeepSpeed silently ignores unknown keys; a typo would silently change the run
        raise ConfigError(f"--ds_config {path}: unknown top-level key(s) {unknown}. Known: {sorted(KNOWN_TOP_LEVEL)}.")
    _check_zero_section(data.get("zero_optimization"), path)
    _check_checkpoint_section(data.get("checkpoint"), path)
    return data


# what the JSON's "checkpoint" section may set: the trainer's crash-safe save (every rank's files on disk,
# then checksums, then the COMPLETE marker, in one shared train.output_dir) needs DeepSpeed's synchronous
# writer into that directory, so the decoupled / mock writers and node-local storage are refused
CHECKPOINT_KEYS = {"tag_validation": ("Ignore", "Warn", "Fail"), "load_universal": None, "parallel_write": None}
# DeepSpeed's defaults of the refused keys: spelled out, they change nothing and pass
CHECKPOINT_DEFAULTS = {"writer": None, "use_node_local_storage": False, "checkpoint_serialization": True}
CHECKPOINT_REFUSED = {
    "writer": "DeepSpeed's alternative writers save from a side process (decoupled) or not at all (mock), so "
              "the trainer could mark a checkpoint COMPLETE before its files exist",
    "use_node_local_storage": "each node would keep its own part of every checkpoint, and no rank could "
                              "verify or resume a tag from the shared train.output_dir",
    "checkpoint_serialization": "the resume checks open DeepSpeed's files in torch's zip format",
}


def _check_checkpoint_section(ckpt, path: str) -> None:
    if ckpt is None:
        return
    if not isinstance(ckpt, dict):
        raise ConfigError(f"--ds_config {path}: checkpoint must be a mapping, got {ckpt!r}.")
    for key, value in ckpt.items():
        if key in CHECKPOINT_REFUSED:
            if value != CHECKPOINT_DEFAULTS[key]:
                raise ConfigError(f"--ds_config {path}: checkpoint.{key} is not supported: {CHECKPOINT_REFUSED[key]}. "
                                  f"Remove it (the trainer writes its checkpoints itself, under train.output_dir).")
            continue
        if key not in CHECKPOINT_KEYS:
            raise ConfigError(f"--ds_config {path}: unknown key checkpoint.{key}. Known: {sorted(CHECKPOINT_KEYS)}.")
        allowed = CHECKPOINT_KEYS[key]
        if allowed and str(value).lower() not in {a.lower() for a in allowed}:
            raise ConfigError(f"--ds_config {path}: checkpoint.{key}={value!r} is not allowed. Choose one of: "
                              f"{', '.join(allowed)}.")


def _check_zero_section(zero, path: str) -> None:
    """The ``zero_optimization`` section through DeepSpeed's own model of it, before anything is built
    (DeepSpeed would raise its validation error from inside ``deepspeed.initialize``)."""
    if zero is None:
        return
    if not isinstance(zero, dict):
        raise ConfigError(f"--ds_config {path}: zero_optimization must be a mapping, got {zero!r}.")
    import pydantic
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**zero)
    except pydantic.ValidationError as e:
        problems = "; ".join(f"zero_optimization.{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})"
                             for err in e.errors())
        raise ConfigError(f"--ds_config {path}: {problems}.") from None


def resolve_precision(exp: Experiment, ds: dict, src: str = "the DeepSpeed config") -> str:
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    if bf16 and fp16:
        raise ConfigError(f"{src}: bf16.enabled and fp16.enabled are both true; enable one of them.")
    ds_prec = "bf16" if bf16 else "fp16" if fp16 else None
    ours = exp.train.precision
    if ours == "auto":
        return ds_prec or "fp32"
    explicit = "bf16" in ds or "fp16" in ds
    if explicit and (ds_prec or "fp32") != ours:
        raise ConfigError(
            f"train.precision={ours} contradicts {src} (which enables {ds_prec or 'neither bf16 nor fp16'}). "
            f"Set train.precision=auto or change the JSON."
        )
    return ours


def _same(ours, theirs, key: str, src: str):
    if theirs is not None and theirs != "auto" and theirs != ours:
        raise ConfigError(f"{src}: {key}={theirs!r} contradicts our config's value {ours!r}. Remove it from the JSON "
                          f"(train.* sets it) or make them agree.")


def build_ds_config(exp: Experiment, ds: dict, world_size: int, src: str = "the DeepSpeed config") -> dict:
    """A copy of ``ds`` with our fields filled in; raises ConfigError on a contradiction."""
    t = exp.train
    out = copy.deepcopy(ds)
    micro, accum = t.batch_size, t.grad_accum
    _same(micro, ds.get("train_micro_batch_size_per_gpu"), "train_micro_batch_size_per_gpu", src)
    _same(accum, ds.get("gradient_accumulation_steps"), "gradient_accumulation_steps", src)
    if "train_batch_size" in ds and ds["train_batch_size"] != "auto" and ds["train_batch_size"] != micro * accum * world_size:
        raise ConfigError(
            f"{src}: train_batch_size={ds['train_batch_size']} but train.batch_size ({micro}) x train.grad_accum "
            f"({accum}) x world size ({world_size}) = {micro * accum * world_size}. Remove train_batch_size from the JSON."
        )
    out.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
               train_batch_size=micro * accum * world_size)
    if "scheduler" in ds:
        raise ConfigError(f"{src}: has a 'scheduler' section, but the schedule belongs to train.lr, "
                          f"train.warmup_steps, train.warmup_init_lr and train.min_lr. Remove it from the JSON.")
    prec = resolve_precision(exp, ds, src)
    out["bf16"] = {**ds.get("bf16", {}), "enabled": prec == "bf16"}
    out["fp16"] = {**ds.get("fp16", {}), "enabled": prec == "fp16"}
    if ds.get("gradient_clipping") and t.grad_clip:
        _same(t.grad_clip, ds["gradient_clipping"], "gradient_clipping", src)
    elif ds.get("gradient_clipping"):
        raise ConfigError(f"{src}: gradient_clipping={ds['gradient_clipping']} but train.grad_clip is 0. "
                          f"Set train.grad_clip instead and remove it from the JSON.")
    out["gradient_clipping"] = t.grad_clip
    out["optimizer"] = _optimizer_section(exp, ds, src)
    out.setdefault("steps_per_print", 10**9)  # our logger reports; keep DeepSpeed's quiet
    out.setdefault("wall_clock_breakdown", False)
    return out


def _offloads_optimizer(ds: dict) -> bool:
    dev = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return dev not in (None, "none")


def _optimizer_section(exp: Experiment, ds: dict, src: str) -> dict:
    t = exp.train
    ours = {"lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay}
    if "optimizer" in ds:
        theirs = ds["optimizer"]
        if str(theirs.get("type", "")).lower() not in ("adam", "adamw"):
            raise ConfigError(f"{src}: optimizer.type={theirs.get('type')!r}; declip_ds trains with AdamW "
                              f"(train.lr, train.betas, train.eps, train.weight_decay). Remove the optimizer section.")
        for k, v in theirs.get("params", {}).items():
            if k in ours:
                _same(ours[k], list(v) if isinstance(v, tuple) else v, f"optimizer.params.{k}", src)
    params = dict(ours, adam_w_mode=True)
    if not _offloads_optimizer(ds):
        params["torch_adam"] = True  # torch's AdamW (fused on CUDA); DeepSpeedCPUAdam when offloading
    return {"type": "AdamW", "params": params}
