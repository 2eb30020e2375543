"""YAML -> nested dataclasses, dotted ``key=value`` overrides, validation at load time.

Every section is a dataclass; unknown keys and wrong types fail at load with the dotted
path and the allowed keys. The ``method`` section is parsed with the chosen method's own
``Config`` class (from the registry), so each method validates its own fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


# ----------------------------------------------------------------------------- sections


@dataclass
class VisionConfig:
    # timm model name ("vit_base_patch32_clip_224", "vit_base_patch16_clip_224", "resnet50_clip"), one of
    # our tiny CPU flavours ("vit_tiny", "vit_custom" with the fields below), or a plain timm ImageNet ViT as
    # the official SLIP trains ("vit_small_mocov3_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
    # "vit_small_patch16_224", or "vit_plain" with the fields below): no ln_pre, nn.GELU whatever quick_gelu says
    name: str = "vit_tiny"
    image_size: int = 64
    patch_size: int = 8  # vit_custom / vit_tiny / vit_plain only
    width: int = 128  # vit_custom / vit_tiny / vit_plain only
    layers: int = 4  # vit_custom / vit_tiny / vit_plain only
    heads: int = 4  # vit_custom / vit_tiny / vit_plain only
    freeze_patch_embed: bool = False  # the reference code's frozen conv1 (MoCo-v3 trick)
    drop_path: float = 0.0
    # random init of the tower: reference (the DeCLIP reference code's: depth-scaled normal ViT block weights
    # as OpenAI's text tower, CLS and projection width^-0.5; OpenAI's ResNet: torch-default convs, attention
    # pool in^-0.5) | timm (timm's: truncated normal 0.02, zero biases) | auto (reference for the CLIP towers,
    # timm for the plain ViTs, which the official SLIP builds with timm). Only a fresh run's step 0 depends on it.
    init: str = "auto"


@dataclass
class TextConfig:
    context_length: int = 77
    width: int = 128
    layers: int = 4
    heads: int = 4
    # vocabulary follows the tokenizer: 49,408 (OpenAI) or 49,409 with DeCLIP's <|mask|>
    mask_token: bool = False
    proj_bias: bool = False  # DeCLIP reference: text_projection is nn.Linear with bias


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128
    token_dim: int = 0  # FILIP token projection width (256 in the papers); 0 = no token heads
    logit_scale_init: float = math.log(1 / 0.07)
    # the parameter is clamped to these bounds after every step (open_clip: [0, ln 100];
    # DeCLIP reference: [3, 6], also before the first step)
    logit_scale_bounds: list[float] = field(default_factory=lambda: [0.0, math.log(100.0)])
    logit_scale_exp_cap: float = 0.0  # cap on exp(logit_scale) in the forward; 0 = none (reference: 100)
    grad_checkpointing: bool = False
    # the transformer MLPs' activation: OpenAI's QuickGELU x*sigmoid(1.702x) (OpenAI CLIP, the DeCLIP reference)
    # or nn.GELU (false: most open_clip / LAION / DataComp models; open_clip's config key of the same name)
    quick_gelu: bool = True

    @property
    def vocab_size(self) -> int:
        return 49409 if self.text.mask_token else 49408


@dataclass
class MethodConfig:
    """Base of every method's Config; each method subclasses it with its own fields."""

    name: str = "clip"


@dataclass
class SyntheticConfig:
    generate_if_missing: bool = True  # write the synthetic shapes shards when data.root has none
    num_samples: int = 8192
    shard_size: int = 512
    eval_samples_per_class: int = 8
    noise: float = 0.1
    seed: int = 0
    captions: str = "rich"  # rich (alt-text-like) | plain ("a red circle and two squares"; the demo's)


@dataclass
class DataConfig:
    # brace patterns ("data/shapes/train/{00000..00015}.tar"); several sources joined with "::"
    # or given as a list; weights apply in resampled mode.
    # "synthetic" = the generated shapes shards under data.synthetic_root (made on first use)
    train_shards: list[str] = field(default_factory=lambda: ["synthetic"])
    train_weights: list[float] = field(default_factory=list)
    num_samples: int = 0  # 0 = read sizes.json next to the shards
    mode: str = "resampled"  # resampled | epoch
    shuffle_buffer: int = 1000
    workers: int = 2
    # a DataLoader worker that delivers no batch for this long stops the run (exit 2, naming the rank) rather
    # than leaving the other ranks to the process group's 30-minute timeout; 0 = wait forever. Only with
    # workers > 0 (with 0 the trainer reads the shards itself), and once every worker has delivered a batch
    timeout_minutes: float = 15.0
    strict: bool = False  # raise on a corrupt sample instead of skipping it
    # training JPEGs decoded DCT-downscaled (PIL's draft, by a power of two) while the shorter side stays at
    # least what the views' smallest crop needs at full resolution: much faster on large images, pixels close
    # to (not equal to) a full decode + resize. false: decode in full, as the reference code does (shards
    # already resized to the training size, e.g. prepare --resize-shorter 256, are never drafted anyway)
    jpeg_draft: bool = True
    # batches in page-locked host memory (a DataLoader thread), so the copies to the GPU overlap compute; CUDA only
    pin_memory: bool = True
    normalize: str = "imagenet"  # imagenet | openai
    rrc_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    synthetic_root: str = "data/shapes"  # where the demo shards live (train/ and eval/)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    steps: int = 1000
    batch_size: int = 64  # per rank, per micro-batch
    grad_accum: int = 1
    # standard: average grad_accum micro-batch losses; contrastive: the grad_accum micro-batches form
    # ONE contrastive batch (GradCache), for methods that support it
    accumulation: str = "standard"
    lr: float = 1e-3
    warmup_steps: int = 100
    warmup_init_lr: float = 0.0
    min_lr: float = 0.0
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0 = off
    # auto = what the DeepSpeed JSON enables (bf16/fp16), else fp32; an explicit value that the
    # JSON contradicts is an error
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    seed: int = 0
    log_every: int = 10
    # each rank appends the __key__s of the samples it trained on, one JSON line per step ({"step", "rank",
    # "keys"}), to <output_dir>/sample_keys/rank_XXXXX.jsonl: which samples the run saw, in order (a resumed
    # or rolled-back run appends the steps it redoes again: the last line of a step counts)
    log_sample_keys: bool = False
    save_every: int = 500
    keep_last: int = 2
    # checkpoint files carry SHA-256 sums, checked on resume: fallback (a damaged tag is skipped with a
    # warning for the next older one) | strict (a damaged or unverifiable tag stops the run, naming the
    # file) | none (no sums written or checked)
    checkpoint_integrity: str = "fallback"
    eval_every: int = 0  # 0 = only at the end
    no_decay_embeddings: bool = True  # no weight decay on token/positional embeddings
    # the DeCLIP reference exempts the biases of Linear/Conv/norm layers only, so nn.MultiheadAttention's
    # in_proj_bias is decayed there: true decays the attention input-projection biases of the transformer
    # blocks (text attn.in_proj_bias, timm ViT attn.qkv.bias); false exempts every 1-D tensor
    decay_attention_in_proj_bias: bool = False
    max_wall_minutes: float = 0.0  # save and exit (code 75) after this long; 0 = no limit
    # a file whose appearance makes every rank save at the next step boundary and exit 75 (removed once
    # saved): a stop request that works under any launcher; relative to output_dir; "" = none
    stop_file: str = "STOP"
    # bad-step guard: a non-finite loss, or one above spike_factor x its running mean (0 = no spike
    # check), is skipped on every rank; max_bad_steps in a row -> on_bad_steps (stop | rollback)
    spike_factor: float = 0.0
    max_bad_steps: int = 5
    on_bad_steps: str = "stop"
    # rollback: at most this many rollbacks to the same checkpoint; one more -> stop (exit 3)
    max_rollbacks: int = 3
    wandb: bool = False
    wandb_project: str = "declip_ds"


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["shape", "color", "shape_color"])
    data_root: str = ""  # "" = <data.synthetic_root>/eval
    templates: str = "synthetic"  # synthetic | simple | imagenet80 | path to a file
    batch_size: int = 128
    at_end: bool = True
    # eval images: Resize(round(image_size / crop_ratio), interpolation) + CenterCrop(image_size);
    # 0.875 = 224/256 (DeCLIP's protocol, with bilinear); 1.0 = resize the short side to the crop (OpenAI's)
    interpolation: str = "bicubic"  # bicubic | bilinear
    crop_ratio: float = 0.875
    # image-text retrieval at every evaluation (declip_ds.eval.retrieval): shard dirs, captions files or
    # Karpathy split files (their test split), scored like the zero-shot tasks (the method's scoring)
    retrieval: list[str] = field(default_factory=list)


@dataclass
class LossConfig:
    impl: str = "auto"  # auto | torch | triton (auto = triton on CUDA, torch elsewhere)
    # most samples per block on each side of the pure-torch FILIP similarity (lower = less memory; a block
    # also stays under 2^22 similarities, which is what the default 4096 amounts to)
    chunk_size: int = 4096
    # FILIP kernel backward: recompute (default; nothing of size B^2*T kept) | save (keep the uint8 arg-max
    # indices, Bi*Bt*(Ti+Tt) bytes, and skip the recomputed scores; same result)
    filip_argmax: str = "recompute"


@dataclass
class Experiment:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)


# ----------------------------------------------------------------------------- parsing


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _yaml(text: str, where: str):
    """``yaml.safe_load`` with its errors as a ConfigError naming ``where`` and the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}.") from None


def _coerce(value: Any, tp, path: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for section '{path}', got {type(value).__name__} {value!r}.")
        return _build(tp, value, path)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, (str, int, float)) and item_tp is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list of {_type_name(item_tp)}, got {value!r}.")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None) and value is None:
                return None
            try:
                return _coerce(value, arm, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} matches none of {_type_name(tp)}.")
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}.")
        return value
    raise ConfigError(f"{path}: unsupported annotation {tp!r}")  # a bug in a Config class


def _build(cls, data: dict, path: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        owner = f" (the {data['name']} method's)" if path == "method" and isinstance(data.get("name"), str) else ""
        raise ConfigError(
            f"Unknown config key '{where}'." + (f" Did you mean '{close[0]}'?" if close else "")
            + f" Allowed keys{' in ' + path if path else ''}{owner}: {', '.join(names)}."
        )
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _method_class(name: str):
    from declip_ds.registry import get_method

    try:
        return get_method(name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None


def _get_dotted(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _apply_model_defaults(exp: Experiment, data: dict, mcls) -> None:
    """A method's model defaults (e.g. DeCLIP's mask token, FILIP's token width), filled in where
    the config is silent; an explicit value is kept and the method's ``validate`` judges it."""
    for dotted, value in getattr(mcls, "model_defaults", {}).items():
        if _get_dotted(data.get("model") or {}, dotted) is not _MISSING:
            continue
        node = exp.model
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)


def from_dict(data: dict) -> Experiment:
    """Build and validate an Experiment from a plain (YAML-loaded) dict."""
    data = dict(data or {})
    method = dict(data.pop("method", None) or {})
    exp = _build(Experiment, data, "")
    mcls = _method_class(method.get("name", "clip"))
    exp.method = _build(mcls.Config, method, "method")
    _apply_model_defaults(exp, data, mcls)
    validate(exp)
    return exp


def parse_value(text: str):
    """A CLI override value: YAML scalars and lists (``3e-4``, ``true``, ``[0.9,0.98]``)."""
    try:
        value = _yaml(text, f"the value '{text}'")
    except ConfigError as e:
        raise ConfigError(f"{e} Quote list items that hold YAML's special characters ({{}}, :, #), e.g. "
                          f"data.train_shards='[\"/data/{{00000..00009}}.tar\"]', or give one item without "
                          f"brackets.") from None
    if isinstance(value, str):  # yaml reads "3e-4" as a string; accept it as a float
        try:
            return float(value) if any(c in value for c in ".eE") and not value.isalpha() else value
        except ValueError:
            return value
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place, returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form key=value (e.g. train.lr=3e-4).")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override '{key}': '{p}' is a value, not a section.")
        try:
            node[parts[-1]] = parse_value(text)
        except ConfigError as e:
            raise ConfigError(f"Override '{key}': {e}") from None
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Experiment:
    """Read a YAML file (or start from defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file '{p}' does not exist. Pass --config with a YAML from experiments/.")
        data = _yaml(p.read_text(), f"Config file '{p}'")
        if data is None:
            raise ConfigError(f"Config file '{p}' is empty (or only comments): it would train the built-in "
                              f"defaults. Pass a recipe from experiments/ (e.g. experiments/demo_shapes.yaml).")
        if not isinstance(data, dict):
            raise ConfigError(f"Config file '{p}' must hold a mapping with the sections {', '.join(f.name for f in dataclasses.fields(Experiment))} at the "
                              f"top level, not a {type(data).__name__}.")
    apply_overrides(data, overrides or [])
    exp = from_dict(data)
    _note_unused_rrc_scale(exp)
    return exp


def _note_unused_rrc_scale(exp: Experiment) -> None:
    """data.rrc_scale set away from its default for a method whose views do not read it (DeCLIP's, FILIP's
    MoCo-v2 view): said once when a run's YAML is loaded (not for configs read back from checkpoints)."""
    import warnings

    why = getattr(exp.method, "rrc_scale_unused", lambda: None)()
    if why and list(exp.data.rrc_scale) != DataConfig().rrc_scale:
        warnings.warn(f"data.rrc_scale={list(exp.data.rrc_scale)} is not used by method '{exp.method.name}': {why}.",
                      stacklevel=3)


def to_dict(exp: Experiment) -> dict:
    return dataclasses.asdict(exp)


def config_hash(exp: Experiment | dict) -> str:
    """12 hex digits of the SHA-256 of the resolved config (sorted-key JSON). A checkpoint's hash is taken
    over the mapping its ``config.yaml`` holds (``pass the dict``), not over that file re-parsed by this
    version, which fills in keys added since: the eval records of one checkpoint then carry the hash its
    training run recorded, whatever toolkit version evaluates it."""
    data = to_dict(exp) if isinstance(exp, Experiment) else exp
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def save_config(exp: Experiment, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(exp), sort_keys=False))


# ----------------------------------------------------------------------------- validation


def _choice(value, allowed, key):
    if value not in allowed:
        raise ConfigError(f"{key}: '{value}' is not allowed. Choose one of: {', '.join(map(str, allowed))}.")


EVAL_INTERPOLATIONS = ("bicubic", "bilinear")


def check_crop_ratio(value, key: str = "eval.crop_ratio") -> None:
    """0 < crop_ratio <= 1 (the crop's share of the resized short side)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
        raise ConfigError(f"{key}: must be a number with 0 < {key.rsplit('.', 1)[-1]} <= 1 (0.875 = resize to "
                          f"256 then crop 224; 1.0 = resize the short side to the crop size), got {value!r}.")


def _positive(value, key, allow_zero=False):
    if not (value > 0 or (allow_zero and value == 0)):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}.")


def validate(exp: Experiment) -> None:
    """Cross-field checks that need no files, process groups or loaders."""
    m, t, d = exp.model, exp.train, exp.data
    for k in ("logit_scale_init",):
        if not math.isfinite(getattr(m, k)):
            raise ConfigError(f"model.{k}: must be finite, got {getattr(m, k)}.")
    b = m.logit_scale_bounds
    if len(b) != 2 or not all(math.isfinite(x) for x in b) or b[0] > b[1]:
        raise ConfigError(f"model.logit_scale_bounds: need [low, high] finite with low <= high, got {b}.")
    _positive(m.logit_scale_exp_cap, "model.logit_scale_exp_cap", allow_zero=True)
    _positive(m.embed_dim, "model.embed_dim")
    _positive(m.token_dim, "model.token_dim", allow_zero=True)
    if m.text.width % m.text.heads:
        raise ConfigError(f"model.text.width ({m.text.width}) must be divisible by model.text.heads ({m.text.heads}).")
    _choice(t.precision, ("auto", "fp32", "bf16", "fp16"), "train.precision")
    for k in ("steps", "batch_size", "grad_accum", "log_every", "save_every"):
        _positive(getattr(t, k), f"train.{k}")
    _positive(t.lr, "train.lr")
    _positive(t.warmup_steps, "train.warmup_steps", allow_zero=True)
    _positive(t.keep_last, "train.keep_last", allow_zero=True)
    if len(t.betas) != 2 or not all(0 <= x < 1 for x in t.betas):
        raise ConfigError(f"train.betas: need two values in [0, 1), got {t.betas}.")
    _choice(t.on_bad_steps, ("stop", "rollback"), "train.on_bad_steps")
    _choice(t.checkpoint_integrity, ("fallback", "strict", "none"), "train.checkpoint_integrity")
    _choice(t.accumulation, ("standard", "contrastive"), "train.accumulation")
    if t.accumulation == "contrastive":
        from declip_ds.registry import get_method

        if not get_method(exp.method.name).supports_contrastive_accumulation:
            raise ConfigError(f"train.accumulation=contrastive is not supported by method '{exp.method.name}' "
                              f"(its losses need per-micro-batch state); use train.accumulation=standard.")
    _positive(t.spike_factor, "train.spike_factor", allow_zero=True)
    _positive(t.max_bad_steps, "train.max_bad_steps", allow_zero=True)
    _positive(t.max_rollbacks, "train.max_rollbacks", allow_zero=True)
    _choice(d.mode, ("resampled", "epoch"), "data.mode")
    _choice(d.normalize, ("imagenet", "openai"), "data.normalize")
    _choice(d.synthetic.captions, ("rich", "plain"), "data.synthetic.captions")
    _positive(d.workers, "data.workers", allow_zero=True)
    if not (math.isfinite(d.timeout_minutes) and d.timeout_minutes >= 0):
        raise ConfigError(f"data.timeout_minutes: must be a finite number >= 0 (0 = no limit), got {d.timeout_minutes}.")
    if len(d.rrc_scale) != 2 or not 0 < d.rrc_scale[0] <= d.rrc_scale[1] <= 1:
        raise ConfigError(f"data.rrc_scale: need [low, high] with 0 < low <= high <= 1, got {d.rrc_scale}.")
    if d.train_weights:
        n_sources = sum(len(str(item).split("::")) for item in d.train_shards)  # as wds.expand_urls counts them
        if len(d.train_weights) != n_sources:
            raise ConfigError(
                f"data.train_weights has {len(d.train_weights)} entries but data.train_shards has {n_sources} "
                f"sources (list items, and '::'-separated parts of an item); give one weight per source or none.")
        if d.mode != "resampled":
            raise ConfigError("data.train_weights only apply in resampled mode; epoch mode reads every shard once. "
                              "Remove the weights or set data.mode=resampled.")
        if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in d.train_weights) \
                or sum(d.train_weights) <= 0:
            raise ConfigError(f"data.train_weights: need finite numbers >= 0, not all zero; got {d.train_weights}.")
    _choice(exp.eval.interpolation, EVAL_INTERPOLATIONS, "eval.interpolation")
    check_crop_ratio(exp.eval.crop_ratio, "eval.crop_ratio")
    _choice(exp.loss.impl, ("auto", "torch", "triton"), "loss.impl")
    _choice(exp.loss.filip_argmax, ("recompute", "save"), "loss.filip_argmax")
    _positive(exp.loss.chunk_size, "loss.chunk_size")
    from declip_ds.models.vision import SUPPORTED

    _choice(m.vision.name, SUPPORTED, "model.vision.name")
    _choice(m.vision.init, ("auto", "reference", "timm"), "model.vision.init")
    for f in dataclasses.fields(exp.method):  # every method's loss weights (filip_weight, mvs_weight, ...)
        v = getattr(exp.method, f.name)
        if f.name.endswith("_weight") and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ConfigError(f"method.{f.name}: a loss weight must be a finite number >= 0, got {v}.")
    validate_method = getattr(exp.method, "validate", None)
    if validate_method is not None:
        validate_method(exp)
