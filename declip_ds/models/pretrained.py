"""Load a DualEncoder from a checkpoint, never unpickling arbitrary objects.

Formats (``load_pretrained(path, format=...)``):

ours        ``<run>/checkpoints/step_XXXXXXXX/``: ``model.safetensors`` (the method's full state in
            fp32; the DualEncoder under the ``model.`` prefix) and ``config.yaml``. ``path`` may be
            the run dir, its ``checkpoints`` dir, a tag dir or the ``model.safetensors`` file.
openai      OpenAI CLIP's state-dict names: ``visual.*`` (ViT or ModifiedResNet), the text tower at the
open_clip   top level (``token_embedding``, ``positional_embedding``, ``transformer.resblocks.*``,
            ``ln_final``, ``text_projection`` (width, E)), a 0-d ``logit_scale``. open_clip's
            checkpoints use the same names (also accepted: its CustomTextCLIP ``text.*`` layout, a
            ``text_projection`` Linear with bias, a ``module.`` prefix).
declip      the DeCLIP repo's releases (shared/METHODS.md §9): ``{"model": ..., "optimizer": ...,
            "last_iter": ...}``, keys under ``module.``, the text tower under ``encode_text.``
            (``text_encoder.`` in SLIP), a 49,409-row token embedding (the mask token at 49406 is
            removed here so the standard tokenizer works), ``text_projection`` an ``nn.Linear`` with
            bias (kept: ``TextConfig.proj_bias=True``), method heads (dropped, logged), FILIP's
            ``image_mapping`` / ``text_mapping`` (kept as our token heads).
slip        the official SLIP repo's checkpoints (``checkpoint_best.pt``: ``{"state_dict": ..., "args":
            Namespace(model="SLIP_VITB16", ...), ...}``, keys under ``module.``): a timm ImageNet ViT under
            ``visual.*`` (no ln_pre, nn.GELU; ViT-S is MoCo v3's, 12 heads), ``image_projection`` (width, E),
            OpenAI's text names (QuickGELU), and the SimCLR head ``image_mlp.*`` (dropped, logged). The
            ``args`` Namespace is the one object besides tensors and containers that is unpickled; its
            ``model`` names the tower (heads included).

Files: safetensors, or torch files that ``torch.load(weights_only=True)`` reads (a state dict, or a
dict holding it under ``state_dict`` / ``model``). A pickle that holds anything else (custom
classes, functions) or a TorchScript archive (OpenAI's own ``.pt`` release) is refused: unpickling
it could run arbitrary code.

What the tensor shapes cannot tell (attention heads, the activation) comes from an open_clip model
config JSON when one sits next to the weights (``<weights stem>.json`` or ``open_clip_config.json``,
as ``declip_ds.export`` writes them) or is passed as ``config=``: its ``quick_gelu`` (absent = false, as in
open_clip) picks QuickGELU or nn.GELU. Otherwise OpenAI's rules apply (heads = width // 64, QuickGELU), with
a warning (DeCLIP releases: QuickGELU, their reference's activation).

``load_for_eval`` adds the evaluation preprocessing (``EvalModel.transform()``): the run's config for
ours, OpenAI's Resize(224) bicubic + CenterCrop(224) with OpenAI mean/std for openai / open_clip, the
DeCLIP repo's Resize(256) bilinear + CenterCrop(224) with ImageNet mean/std for declip, SLIP's
Resize(224) bilinear + CenterCrop(224) with ImageNet mean/std for slip, overridden by a
``preprocess_cfg`` next to the weights and then by explicit arguments.

The architecture is inferred from the shapes: ViT (any width / depth / patch / image size; the
B/32 and B/16 shapes map onto timm's named towers) or the standard RN50 ModifiedResNet
(``resnet50_clip``); the other ModifiedResNets (RN101, RN50x4, ...) are refused, and so are open_clip's
timm-tower and SigLIP models (``visual.trunk.*``, ``logit_bias``: SigLIP / SigLIP2, ConvNeXt, EVA).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import re
import warnings
import dataclasses
import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

log = logging.getLogger(__name__)

FORMATS = ("auto", "ours", "openai", "open_clip", "declip", "slip")
FAMILY = {"ours": "ours", "openai": "openai", "open_clip": "openai", "declip": "declip", "slip": "slip"}

OPENAI_VOCAB = 49408  # OpenAI's BPE vocabulary (SOT 49406, EOT 49407)
DECLIP_MASK_ROW = 49406  # DeCLIP inserts <|mask|> here (mask 49406, SOT 49407, EOT 49408)
# DeCLIP-repo method heads that plain CLIP use does not need (METHODS.md §9); others are dropped too,
# but logged as unrecognised
DECLIP_HEADS = ("projector", "predictor", "text_label_predictor", "predictor_sim", "logit_scale_dense",
                "projector_text", "predictor_text", "projector_nn_text", "predictor_nn_text",
                "projector_d", "predictor_d", "nn_replacer_img", "nn_replacer_text")
TOKEN_HEADS = ("image_mapping", "text_mapping")  # FILIP token projections: same names as ours
# the official SLIP repo's model names (args.model = "SLIP_VITB16", "CLIP_VITL16", ...) -> our plain ViT towers
SLIP_TOWERS = {"VITS16": "vit_small_mocov3_patch16_224", "VITB16": "vit_base_patch16_224",
               "VITL16": "vit_large_patch16_224"}
SLIP_HEADS = ("image_mlp",)  # the SimCLR head, not needed for the towers
# preferred weight files inside a directory holding an exported / open_clip model
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                "pytorch_model.bin", "model.pt", "model.pth")


class CheckpointFormatError(ValueError):
    """A checkpoint cannot be read safely, is not of the expected layout, or does not fit the model."""


# ============================================================================ ours


def find_our_checkpoint(path: str | Path) -> Path:
    """The ``model.safetensors`` for a file, a tag dir, a ``checkpoints`` dir or a run dir
    (the newest complete tag)."""
    from declip_ds.train.checkpoint import complete_tags

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Checkpoint '{p}' does not exist.")
    if p.is_file():
        return p
    if (p / "model.safetensors").is_file() and _is_ours(p / "model.safetensors"):
        return p / "model.safetensors"
    for d in (p / "checkpoints", p):
        tags = complete_tags(d)
        if tags:
            return d / tags[-1] / "model.safetensors"
    foreign = (" (its model.safetensors has neither a config.yaml beside it nor 'model.*' keys: another library's "
               "weights, e.g. an HF hub snapshot's)") if (p / "model.safetensors").is_file() else ""
    raise FileNotFoundError(
        f"No declip_ds checkpoint under '{p}'{foreign}: expected model.safetensors in it, or complete "
        f"step_XXXXXXXX/ directories in it or in its checkpoints/ folder." + _incomplete_hint(p)
    )


def _is_ours(weights: Path) -> bool:
    """A folder's ``model.safetensors`` is ours with a config.yaml beside it or our ``model.`` prefix: HF hub snapshots
    (laion/CLIP-*, timm/*) hold HF transformers / timm weights under that name, next to open_clip_model.safetensors."""
    return (weights.parent / "config.yaml").is_file() or any(k.startswith("model.") for k in _safetensors_keys(weights))


def saved_config(weights: Path) -> dict:
    """The mapping in the ``config.yaml`` a checkpoint's weights file was saved with (the tag's, else the
    run's), as written: keys added to the toolkit since are not filled in."""
    for cfg_path in (weights.parent / "config.yaml", weights.parent.parent.parent / "config.yaml"):
        if cfg_path.is_file():
            data = yaml.safe_load(cfg_path.read_text())
            if not isinstance(data, dict):
                raise CheckpointFormatError(f"{cfg_path} does not hold a config mapping; restore it from the run "
                                            f"directory's config.yaml.")
            return data
    raise FileNotFoundError(f"No config.yaml next to {weights}; it records the model's architecture.")


def load_experiment(path: str | Path):
    """The Experiment a checkpoint was trained with (its ``config.yaml``) and its weights file."""
    from declip_ds.config import from_dict

    weights = find_our_checkpoint(path)
    return from_dict(saved_config(weights)), weights


def _check_sum(weights: Path) -> None:
    """A tag's ``model.safetensors`` against the tag's ``SHA256SUMS`` (when it has one): numbers must not
    come from weights damaged after training saved them."""
    from declip_ds.train import checkpoint as C

    try:
        sums = C.read_checksums(weights.parent)
    except C.CheckpointError as e:
        raise CheckpointFormatError(str(e)) from None
    if sums and weights.name in sums:
        problems = C.verify_files(weights.parent, sums, [weights.name])
        if problems:
            raise CheckpointFormatError(f"{problems[0]}. Evaluate another tag of the run (pass its step_XXXXXXXX "
                                        f"dir), or restore the file from a copy.")


def _load_ours(path: Path):
    from safetensors.torch import load_file

    from declip_ds.models import build_model

    exp, weights = load_experiment(path)
    _check_sum(weights)
    state = load_file(str(weights))
    model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if not model_state:
        raise CheckpointFormatError(f"{weights} holds no 'model.*' tensors; is it a declip_ds checkpoint?")
    model = build_model(exp.model)
    load_strict(model, model_state, f"{weights} (for the model of its config.yaml)")
    return model.eval()


# ============================================================================ reading files safely


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects."""

    def load(mmap: bool):
        with warnings.catch_warnings():  # torch warns before refusing a TorchScript archive
            warnings.simplefilter("ignore")
            # the official SLIP checkpoints keep their argparse Namespace under "args" (plain attributes)
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(mmap=True)  # no copy of a multi-GB optimizer state we do not need
        except RuntimeError as e:
            if "mmap" not in str(e) or "TorchScript" in str(e):
                raise
            return load(mmap=False)  # a legacy (non-zip) torch file
    except pickle.UnpicklingError as e:
        raise CheckpointFormatError(_unpickling_message(path, str(e))) from None
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise CheckpointFormatError(
                f"Refusing to load '{path}': it is a TorchScript archive (like OpenAI's own CLIP .pt "
                f"files), which cannot be read as plain weights. In a trusted environment, save its "
                f"state dict: safetensors.torch.save_file({{k: v.contiguous() for k, v in "
                f"torch.jit.load(path, map_location='cpu').state_dict().items()}}, 'clip.safetensors'), "
                f"or use open_clip's non-JIT state dicts."
            ) from None
        raise


def _unpickling_message(path: Path, said: str) -> str:
    """What torch.load(weights_only=True)'s refusal means for this file: a pickled class (e.g. a whole model
    saved with torch.save(model)), or no torch checkpoint at all (an unknown pickle opcode)."""
    glob = re.search(r"Unsupported global: GLOBAL (\S+)", said)
    if glob:
        return (f"Refusing to load '{path}': it pickles a {glob.group(1)} object, not only tensors and plain "
                f"containers (a whole model saved with torch.save(model)?), and unpickling it could run arbitrary "
                f"code. If you trust the file, re-save its state dict in a trusted environment, e.g. "
                f"safetensors.torch.save_file(model.state_dict(), 'weights.safetensors'), and load that.")
    operand = re.search(r"Unsupported operand (\d+)", said)
    if operand:
        return (f"'{path}' is not a PyTorch checkpoint: neither safetensors nor a torch.save file (torch's "
                f"unpickler met an unknown instruction, byte {operand.group(1)}: another format, a plain pickle or "
                f"a damaged file). Pass a model.safetensors, a torch.save state dict, or a run / tag dir.")
    reason = re.sub(r"\x1b\[[0-9;]*m", "", said).strip().replace("\n", " ")[:400] or "no reason given"
    return (f"Refusing to load '{path}': torch.load(weights_only=True) could not read it as tensors and plain "
            f"containers ({reason}). If you trust the file, re-save its state dict in a trusted environment, e.g. "
            f"safetensors.torch.save_file(state_dict, 'weights.safetensors'), and load that.")


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # SafetensorError: truncated or not a safetensors file at all
        raise CheckpointFormatError(f"'{path}' is not a readable safetensors file ({e}); is the file complete "
                                    "(compare its size with the original) and really a checkpoint?") from e


@dataclass
class _Source:
    """A flat state dict read from a file, and what was found around it (for logging and checks)."""

    path: Path
    state: dict[str, torch.Tensor]
    wrapper: str | None = None  # "state_dict" / "model" when the tensors sat inside a dict
    extra_keys: list[str] = field(default_factory=list)  # the wrapper's other entries
    stripped_module: bool = False
    meta: dict = field(default_factory=dict)  # e.g. {"model": "SLIP_VITB16"} from a SLIP checkpoint's args


def _read_state(path: Path) -> _Source:
    """The tensors of a safetensors or weights-only torch file, unwrapped and without a DDP ``module.``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        _safetensors_keys(path)  # a clear error for a truncated / foreign file
        obj: Any = load_file(str(path))
    else:
        obj = _torch_load(path)
    wrapper, extra, meta = None, [], {}
    if isinstance(obj, dict):
        args = obj.get("args")
        if isinstance(args, argparse.Namespace) and isinstance(getattr(args, "model", None), str):
            meta["model"] = args.model
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                wrapper, extra = key, sorted(str(k) for k in obj if k != key)
                averaged = [k for k in extra if "ema" in k.lower() and isinstance(obj[k], dict)
                            and any(isinstance(v, torch.Tensor) for v in obj[k].values())]
                if averaged:  # e.g. a prototype-style trainer's model EMA next to the raw weights
                    log.warning("'%s' also holds averaged weights under %s; loading '%s' (the raw weights). To "
                                "evaluate the averaged ones, save that entry on its own (torch.save(ckpt[%r], "
                                "'ema.pth')) and load that file.", path, averaged, key, averaged[0])
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"'{path}' holds a {type(obj).__name__}, not a state dict (a dict of tensors).")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointFormatError(
            f"'{path}' holds no tensors at its top level nor under 'state_dict' / 'model' "
            f"(keys: {sorted(map(str, obj))[:10]})."
        )
    stripped = all(k.startswith("module.") for k in state)
    if stripped:  # DistributedDataParallel / the DeCLIP repo's DistModule wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return _Source(path, state, wrapper, extra, stripped, meta)


def _weights_in_dir(d: Path) -> Path:
    for name in WEIGHT_FILES:
        if (d / name).is_file():
            return d / name
    found = sorted(p for ext in ("*.safetensors", "*.pt", "*.pth", "*.bin") for p in d.glob(ext))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(
        f"'{d}' is neither a declip_ds checkpoint (model.safetensors + config.yaml, or step_XXXXXXXX/ "
        f"tags) nor a folder with one weights file (found {[p.name for p in found]}); pass the file."
        + _incomplete_hint(d)
    )


def _incomplete_hint(d: Path) -> str:
    """A sentence on the checkpoint tags under ``d`` (or its checkpoints/) that lack the completion marker."""
    from declip_ds.train.checkpoint import MARKER

    tags = sorted(t for base in (d, d / "checkpoints") if base.is_dir() for t in base.glob("step_*")
                  if t.is_dir() and not (t / MARKER).exists())
    if not tags:
        return ""
    return (f" Its checkpoint tag(s) {[t.name for t in tags]} have no {MARKER} marker: their save did not finish "
            f"(a crash or a kill mid-save); to evaluate one anyway, pass its model.safetensors.")


# ============================================================================ format detection


def _family_of_keys(keys) -> str | None:
    keys = list(keys)
    if any(k.startswith(("encode_text.", "text_encoder.")) for k in keys):
        return "declip"
    if any(k.startswith(("model.visual.", "model.text.", "visual.trunk.")) for k in keys):
        return "ours"
    if "image_projection" in keys and any(k.startswith("visual.blocks.") for k in keys):
        return "slip"
    has_text = "token_embedding.weight" in keys or "text.token_embedding.weight" in keys
    if has_text and any(k.startswith("visual.") for k in keys):
        return "openai"
    return None


def _refuse_timm_or_siglip(src: _Source, hints: dict | None) -> None:
    """Refuse the open_clip models our towers cannot represent, before any layout is matched: their timm image
    tower (every SigLIP / SigLIP2, ConvNeXt and EVA config) is named ``visual.trunk.*``, as our own towers are."""
    hints, reasons = hints or {}, []
    if "logit_bias" in src.state:
        reasons.append("a logit_bias tensor, SigLIP's sigmoid loss")
    if hints.get("init_logit_bias") is not None:
        reasons.append(f"init_logit_bias={hints['init_logit_bias']} in its config")
    timm_name = (hints.get("vision_cfg") or {}).get("timm_model_name")
    if timm_name:
        reasons.append(f"vision_cfg.timm_model_name={timm_name!r} in its config")
    trunk_only = not reasons
    if any(k.startswith("visual.trunk.") for k in src.state) and not (src.path.parent / "config.yaml").is_file():
        reasons.append("a timm image tower under visual.trunk.*")
    if reasons:
        ours = (" (If it is a declip_ds DualEncoder state dict without the 'model.' prefix, load its step_XXXXXXXX "
                "directory instead: its config.yaml records the architecture.)") if trunk_only else ""
        raise CheckpointFormatError(
            f"open_clip timm-tower / SigLIP model: not supported ({'; '.join(reasons)}; '{src.path}'). Our towers "
            f"hold CLIP models with open_clip's own image towers (VisionTransformer: visual.conv1 / "
            f"visual.transformer.*; ModifiedResNet: visual.layer1.*) and a softmax contrastive loss.{ours}")


def _ours_without_prefix(path: Path) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"'{path}' holds declip_ds DualEncoder names (visual.trunk.*) but is not a declip_ds checkpoint "
        f"file; load the step_XXXXXXXX directory (its config.yaml records the architecture)."
    )


def _inspect(path: Path) -> tuple[str, _Source | None, str]:
    """(format, the read source or None for 'ours', a description for the log)."""
    if path.is_dir():
        try:
            path = find_our_checkpoint(path)
        except FileNotFoundError:
            path = _weights_in_dir(path)
    if path.suffix == ".safetensors" and any(k.startswith("model.") for k in _safetensors_keys(path)):
        return "ours", None, f"declip_ds checkpoint {path} ('model.*' keys)"
    src = _read_state(path)
    _refuse_timm_or_siglip(src, _sidecar_config(path, quiet=True))
    family = _family_of_keys(src.state)
    if family == "ours":  # visual.trunk.* next to a config.yaml
        raise _ours_without_prefix(path)
    if family == "declip":
        text = "encode_text" if _declip_text_prefix(src.state) == "encode_text." else "text_encoder (SLIP)"
        return "declip", src, f"DeCLIP-repo release ({text}.*, wrapper '{src.wrapper}', other entries {src.extra_keys})"
    if family == "slip":
        return "slip", src, (f"official SLIP checkpoint (timm ViT visual.*, image_projection; args.model "
                             f"{src.meta.get('model', 'not recorded')!r}, other entries {src.extra_keys})")
    if family == "openai":
        open_clip_marks = src.wrapper == "state_dict" or "text.token_embedding.weight" in src.state or (
            _sidecar_config(path, quiet=True) is not None)
        fmt = "open_clip" if open_clip_marks else "openai"
        return fmt, src, "OpenAI/open_clip CLIP state dict (visual.*, token_embedding, transformer.resblocks)"
    sample = sorted(src.state)[:8]
    raise CheckpointFormatError(
        f"Could not recognise the checkpoint format of '{path}' (first keys: {sample}). Known: declip_ds "
        f"checkpoints (format='ours'), OpenAI/open_clip CLIP state dicts ('openai' / 'open_clip': visual.*, "
        f"token_embedding.weight, ...), DeCLIP-repo releases ('declip': module.visual.*, module.encode_text.*), "
        f"official SLIP checkpoints ('slip': module.visual.blocks.*, module.image_projection, text names as OpenAI's)."
    )


def _detect(path: Path) -> str:
    """The format of ``path`` (see the module docstring)."""
    return _inspect(Path(path))[0]


# ============================================================================ open_clip model configs


def _sidecar_config(weights: Path, quiet: bool = False) -> dict | None:
    """An open_clip model config next to a weights file: ``<stem>.json`` (open_clip's model_configs
    format) or ``open_clip_config.json`` (its hub / local-dir format, ``{"model_cfg": ...}``)."""
    for p in (weights.with_suffix(".json"), weights.parent / "open_clip_config.json"):
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except json.JSONDecodeError:
                continue
            cfg = data.get("model_cfg", data) if isinstance(data, dict) else None
            if isinstance(cfg, dict) and "vision_cfg" in cfg and "text_cfg" in cfg:
                if not quiet:
                    log.info("%s: using the open_clip model config %s", weights, p)
                return cfg
    return None


# the keys of open_clip's model configs (model_configs/*.json; the CLIP / CustomTextCLIP / CoCa arguments)
MODEL_CFG_KEYS = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                  "nonscalar_logit_scale", "custom_text", "multimodal_cfg", "cast_dtype", "output_dict")
# the top-level keys of its hub / local-dir open_clip_config.json, plus ours (see SIDECAR_KEY); others are ignored
HUB_CFG_KEYS = ("model_cfg", "preprocess_cfg", "declip_ds")


def model_config_arg(config: dict | str | Path) -> dict:
    """The open_clip model config in ``config=`` (a dict or a JSON file): open_clip's model_configs format, or
    its hub / local-dir format ``{"model_cfg": ..., "preprocess_cfg": ...}`` (unwrapped). A dict that is
    neither is refused: read as a model config, every field it lacks would silently take a default (nn.GELU,
    heads = width // 64) and build another model than the weights were trained as."""
    where = "config="
    if isinstance(config, (str, Path)):
        where = f"config='{config}'"
        try:
            config = json.loads(Path(config).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not a JSON file ({e}); pass open_clip's model config JSON.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where} must be a dict or a path to a JSON file, got a {type(config).__name__}.")
    cfg, unknown, prefix = config, [], ""
    if "model_cfg" in config:  # the hub format
        cfg, prefix = config["model_cfg"], "model_cfg."  # other top-level keys are ignored, as open_clip does
        if not isinstance(cfg, dict):
            raise ValueError(f"{where}: model_cfg must be a mapping (open_clip's model config), got "
                             f"{type(cfg).__name__}.")
    unknown += [f"{prefix}{k}" for k in cfg if k not in MODEL_CFG_KEYS]
    if unknown or not cfg:
        what = f"unknown keys {unknown}" if unknown else "no model-config keys"
        raise ValueError(
            f"{where} has {what}. Pass open_clip's model config (keys among {', '.join(MODEL_CFG_KEYS)}: the "
            f"format of open_clip/model_configs/*.json), or its hub / local-dir open_clip_config.json as read "
            f"({{'model_cfg': {{...}}, 'preprocess_cfg': {{...}}}}; top-level keys among {', '.join(HUB_CFG_KEYS)}).")
    return cfg


# open_clip config fields our towers cannot represent, with the only value they can
_FIXED_VISION = {"mlp_ratio": 4.0, "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                 "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
                 "act_kwargs": None, "norm_kwargs": None, "timm_model_name": None, "qk_norm": False,
                 "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                 "scale_attn": False, "scale_fc": False}
_FIXED_TEXT = {"mlp_ratio": 4.0, "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
               "final_ln_after_pool": False, "pool_type": "argmax", "act_kwargs": None, "norm_kwargs": None,
               "hf_model_name": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
               "scale_attn_inner": False, "scale_attn": False, "scale_fc": False}


def _check_open_clip_config(cfg: dict) -> None:
    bad = []
    if cfg.get("init_logit_bias") is not None:
        bad.append(f"init_logit_bias={cfg['init_logit_bias']} (a SigLIP model)")
    for section, fixed in (("vision_cfg", _FIXED_VISION), ("text_cfg", _FIXED_TEXT)):
        sub = cfg.get(section) or {}
        for name, allowed in fixed.items():
            if name in sub and sub[name] != allowed:
                bad.append(f"{section}.{name}={sub[name]!r} (supported: {allowed!r})")
        if sub.get("block_type") not in (None, "default"):
            bad.append(f"{section}.block_type={sub['block_type']!r} (supported: 'default')")
    if cfg.get("text_cfg", {}).get("proj_type", "linear") not in ("linear", None):
        bad.append(f"text_cfg.proj_type={cfg['text_cfg']['proj_type']!r} (supported: 'linear')")
    if bad:
        raise CheckpointFormatError("The open_clip model config describes a model our towers cannot represent: "
                                    + "; ".join(bad) + ".")


# ============================================================================ name maps (OpenAI <-> ours)

# One table per tower family, read both ways (import: OpenAI -> ours, export: ours -> OpenAI). Each row
# is (OpenAI name, our name) inside visual.*, with {field} placeholders; a field has a pattern on each
# side and a conversion between them (OpenAI's 1-based ResNet layer is our 0-based stage, say).
# ModifiedResNet <-> timm ByobNet resnet50_clip as timm's own _convert_openai_clip (byobnet.py) maps it.
_RN_CONV = {"1": "conv1_1x1", "2": "conv2_kxk", "3": "conv3_1x1"}
_RN_POOL = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "c_proj": "proj"}


def _same(x: str) -> str:
    return x


def _table_lookup(table: dict):
    back = {v: k for k, v in table.items()}
    return table.__getitem__, back.__getitem__


_FIELDS = {  # name: (OpenAI pattern, our pattern, OpenAI -> ours, ours -> OpenAI)
    "wb": (r"weight|bias", r"weight|bias", _same, _same),
    "bn": (r"weight|bias|running_mean|running_var|num_batches_tracked",) * 2 + (_same, _same),
    "block": (r"\d+", r"\d+", _same, _same),
    "i": (r"[123]", r"[123]", _same, _same),
    "ln": (r"[12]", r"[12]", _same, _same),
    "stage": (r"[1-4]", r"[0-3]", lambda x: str(int(x) - 1), lambda x: str(int(x) + 1)),
    "conv": (r"[123]", r"conv[123]_(?:1x1|kxk)", *_table_lookup(_RN_CONV)),
    "pool": (r"[qkvc]_proj", r"[qkv]|proj", *_table_lookup(_RN_POOL)),
}

VIT_NAMES = [
    ("conv1.weight", "trunk.patch_embed.proj.weight"),
    ("class_embedding", "trunk.cls_token"),
    ("positional_embedding", "trunk.pos_embed"),
    ("ln_pre.{wb}", "trunk.norm_pre.{wb}"),
    ("transformer.resblocks.{block}.ln_{ln}.{wb}", "trunk.blocks.{block}.norm{ln}.{wb}"),
    ("transformer.resblocks.{block}.attn.in_proj_{wb}", "trunk.blocks.{block}.attn.qkv.{wb}"),
    ("transformer.resblocks.{block}.attn.out_proj.{wb}", "trunk.blocks.{block}.attn.proj.{wb}"),
    ("transformer.resblocks.{block}.mlp.c_fc.{wb}", "trunk.blocks.{block}.mlp.fc1.{wb}"),
    ("transformer.resblocks.{block}.mlp.c_proj.{wb}", "trunk.blocks.{block}.mlp.fc2.{wb}"),
    ("ln_post.{wb}", "ln_post.{wb}"),
    ("proj", "proj"),
]
RN_NAMES = [
    ("conv{i}.weight", "trunk.stem.conv{i}.conv.weight"),
    ("bn{i}.{bn}", "trunk.stem.conv{i}.bn.{bn}"),
    ("layer{stage}.{block}.conv{conv}.weight", "trunk.stages.{stage}.{block}.{conv}.conv.weight"),
    ("layer{stage}.{block}.bn{conv}.{bn}", "trunk.stages.{stage}.{block}.{conv}.bn.{bn}"),
    ("layer{stage}.{block}.downsample.0.weight", "trunk.stages.{stage}.{block}.shortcut.conv.conv.weight"),
    ("layer{stage}.{block}.downsample.1.{bn}", "trunk.stages.{stage}.{block}.shortcut.conv.bn.{bn}"),
    ("attnpool.positional_embedding", "trunk.head.pos_embed"),
    ("attnpool.{pool}.{wb}", "trunk.head.{pool}.{wb}"),
]


@functools.lru_cache(maxsize=None)
def _compiled(template: str, side: int) -> re.Pattern:
    """A name template as a regex with one named group per field, on side 0 (OpenAI) or 1 (ours)."""
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, ...
    return re.compile("".join(re.escape(x) if n % 2 == 0 else f"(?P<{x}>{_FIELDS[x][side]})"
                              for n, x in enumerate(parts)))


def rename_visual(key: str, table: list, to_ours: bool) -> str | None:
    """A name inside visual.* translated through ``table`` (VIT_NAMES or RN_NAMES): OpenAI -> ours when
    ``to_ours``, else ours -> OpenAI; None when no row matches."""
    src, dst = (0, 1) if to_ours else (1, 0)
    for row in table:
        m = _compiled(row[src], src).fullmatch(key)
        if m:
            return row[dst].format(**{k: _FIELDS[k][2 if to_ours else 3](v) for k, v in m.groupdict().items()})
    return None


TEXT_KEYS = re.compile(
    r"token_embedding\.weight|positional_embedding|ln_final\.(weight|bias)|text_projection(\.(weight|bias))?"
    r"|transformer\.resblocks\.\d+\.(ln_[12]\.(weight|bias)|attn\.in_proj_(weight|bias)"
    r"|attn\.out_proj\.(weight|bias)|mlp\.c_(fc|proj)\.(weight|bias))"
)


# ============================================================================ architecture from shapes


def _count_blocks(state: dict, prefix: str) -> int:
    idx = {int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if idx != set(range(len(idx))):
        raise CheckpointFormatError(f"Non-contiguous block indices under '{prefix}': {sorted(idx)}.")
    return len(idx)


def _infer_vision(state: dict, hints: dict):
    """(VisionConfig, embed_dim) from the OpenAI-named visual.* tensors."""
    from declip_ds.config import VisionConfig

    if "visual.conv1.weight" in state and "visual.class_embedding" in state:  # ViT
        conv = state["visual.conv1.weight"]  # (W, 3, P, P)
        width, patch = conv.shape[0], conv.shape[-1]
        n = state["visual.positional_embedding"].shape[0] - 1
        grid = math.isqrt(n)
        if conv.shape[-2] != patch or grid * grid != n:
            raise CheckpointFormatError(f"Non-square ViT patches or grid: conv1 {tuple(conv.shape)}, "
                                        f"positional_embedding {tuple(state['visual.positional_embedding'].shape)}.")
        layers = _count_blocks(state, "visual.transformer.resblocks.")
        fc = state.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
        if fc is not None and fc.shape[0] != 4 * width:
            raise CheckpointFormatError(f"visual.transformer.resblocks.0.mlp.c_fc.weight {tuple(fc.shape)}: an MLP "
                                        f"ratio other than 4 is not supported (width {width}).")
        head_width = hints.get("head_width")
        heads = width // head_width if head_width else max(1, width // 64)
        if not head_width:
            log.info("ViT attention heads not recorded in the checkpoint: using OpenAI's width // 64 = %d", heads)
        name = "vit_custom"
        if (width, layers, heads, grid * patch) == (768, 12, 12, 224) and patch in (16, 32):
            name = f"vit_base_patch{patch}_clip_224"
        cfg = VisionConfig(name=name, image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                           heads=heads)
        return cfg, state["visual.proj"].shape[1] if "visual.proj" in state else None
    if "visual.layer1.0.conv1.weight" in state:  # ModifiedResNet
        layers = tuple(_count_blocks(state, f"visual.layer{i}.") for i in range(1, 5))
        width = state["visual.conv3.weight"].shape[0] if "visual.conv3.weight" in state else None
        if layers != (3, 4, 6, 3) or width != 64:
            raise CheckpointFormatError(
                f"ModifiedResNet with layers {layers} and width {width}: only the standard RN50 (layers "
                f"(3, 4, 6, 3), width 64) maps onto our towers (timm resnet50_clip); RN101 / RN50x4 / ... are "
                f"not supported."
            )
        if hints.get("head_width", 64) != 64:
            raise CheckpointFormatError(f"vision_cfg.head_width={hints['head_width']}: resnet50_clip's attention "
                                        f"pool has 32 heads of width 64.")
        n = state["visual.attnpool.positional_embedding"].shape[0] - 1
        grid = math.isqrt(n)
        if grid * grid != n:
            raise CheckpointFormatError(
                f"visual.attnpool.positional_embedding has {n + 1} rows, not a square grid + 1.")
        return VisionConfig(name="resnet50_clip", image_size=grid * 32), state["visual.attnpool.c_proj.weight"].shape[0]
    sample = sorted(k for k in state if k.startswith("visual."))[:6]
    raise CheckpointFormatError(
        f"Unrecognised image tower (keys like {sample}): expected OpenAI's ViT (visual.conv1.weight, "
        f"visual.class_embedding, ...) or ModifiedResNet (visual.layer1.0.conv1.weight, ...) names. (timm ViT "
        f"names with an image_projection are the official SLIP layout: format='slip'.)"
    )


def _infer_text(state: dict, hints: dict):
    """(TextConfig, embed_dim) from the OpenAI-named text tensors (top level)."""
    from declip_ds.config import TextConfig

    vocab, width = state["token_embedding.weight"].shape
    if vocab != OPENAI_VOCAB:
        raise CheckpointFormatError(f"token_embedding.weight has {vocab} rows; our text tower uses OpenAI's "
                                    f"{OPENAI_VOCAB}-token BPE vocabulary.")
    heads = hints.get("heads")
    if not heads:
        heads = max(1, width // 64)
        log.info("Text attention heads not recorded in the checkpoint: using OpenAI's width // 64 = %d", heads)
    bias = "text_projection.weight" in state
    proj = state.get("text_projection.weight", state.get("text_projection"))
    embed_dim = None if proj is None else (proj.shape[0] if bias else proj.shape[1])
    cfg = TextConfig(context_length=state["positional_embedding"].shape[0], width=width,
                     layers=_count_blocks(state, "transformer.resblocks."), heads=heads, proj_bias=bias)
    return cfg, embed_dim


# ============================================================================ conversion


def _declip_text_prefix(state) -> str:
    """Where a DeCLIP-repo release keeps its text tower: ``encode_text.``, or ``text_encoder.`` in its SLIP models."""
    return "encode_text." if any(k.startswith("encode_text.") for k in state) else "text_encoder."


def _declip_to_openai(state: dict) -> dict:
    """A DeCLIP-repo model state (``module.`` already stripped) -> OpenAI names (+ FILIP token heads)."""
    text_prefix = _declip_text_prefix(state)
    if any(k.startswith(text_prefix + "text_transformer.") for k in state):
        raise CheckpointFormatError(f"'{text_prefix}text_transformer.*': DeCLIP's BERT / GPT-2 / RoBERTa text "
                                    f"encoders are not supported, only its CLIP text transformer.")
    out, dropped = {}, Counter()
    for k, v in state.items():
        if k.startswith("visual.fc."):  # the RN50's unused average-pool classifier
            dropped["visual.fc"] += 1
        elif k.startswith("visual.") or k == "logit_scale" or k.split(".")[0] in TOKEN_HEADS:
            out[k] = v
        elif k.startswith(text_prefix):
            out[k[len(text_prefix):]] = v
        else:
            dropped[k.split(".")[0]] += 1
    if dropped:
        unknown = sorted(g for g in dropped if g not in DECLIP_HEADS and g != "visual.fc")
        log.info("DeCLIP checkpoint: dropped method heads not needed for the towers: %s",
                 ", ".join(f"{g} ({n} tensors)" for g, n in sorted(dropped.items())))
        if unknown:
            log.warning("DeCLIP checkpoint: dropped unrecognised entries %s", unknown)
    tok = out.get("token_embedding.weight")
    if tok is not None and tok.shape[0] == OPENAI_VOCAB + 1:
        # rows 0..49405 are OpenAI's; 49406 = <|mask|>; 49407 / 49408 = SOT / EOT -> 49406 / 49407
        out["token_embedding.weight"] = torch.cat([tok[:DECLIP_MASK_ROW], tok[DECLIP_MASK_ROW + 1:]])
        log.info("DeCLIP checkpoint: removed the mask-token row %d of token_embedding (49409 -> 49408 rows), so "
                 "the standard tokenizer's SOT/EOT (49406/49407) work", DECLIP_MASK_ROW)
    return out


def _rename_to_ours(state: dict, vit: bool) -> tuple[dict, dict]:
    """OpenAI names -> ours, reshaping where the layouts differ; returns (our state, {our key: source key}).
    Keys without a counterpart stay in, marked, so the strict load lists them as unexpected."""
    table = VIT_NAMES if vit else RN_NAMES
    ours, origin = {}, {}
    for k, v in state.items():
        new = None
        if k.startswith("visual."):
            sub = k[len("visual."):]
            new = rename_visual(sub, table, to_ours=True)
            if new is not None:
                new = "visual." + new
                if new == "visual.trunk.cls_token":
                    v = v.reshape(1, 1, -1)  # (W,) -> (1, 1, W)
                elif new == "visual.trunk.pos_embed":
                    v = v.unsqueeze(0)  # (N + 1, W) -> (1, N + 1, W)
        elif TEXT_KEYS.fullmatch(k):
            new = "text." + k
        elif k == "logit_scale":
            new, v = k, v.reshape(1)  # OpenAI 0-d / DeCLIP (1,) -> ours (1,)
        elif k.split(".")[0] in TOKEN_HEADS:
            new = k
        name = new if new is not None else f"<unmapped> {k}"
        ours[name], origin[name] = v, k
    return ours, origin


def _openai_to_ours(state: dict, hints: dict | None, family: str):
    """(ModelConfig, our state dict, {our key: source key}) from an OpenAI-named state dict."""
    from declip_ds.config import ModelConfig

    state = dict(state)
    for k in ("input_resolution", "context_length", "vocab_size"):  # OpenAI JIT state-dict extras
        state.pop(k, None)
    state.pop("attn_mask", None)
    if "text.token_embedding.weight" in state and "token_embedding.weight" not in state:
        # open_clip CustomTextCLIP: the text tower under text.*
        state = {(k[len("text."):] if k.startswith("text.") else k): v for k, v in state.items()}
    if "logit_bias" in state:
        raise CheckpointFormatError("The checkpoint has a logit_bias (a SigLIP model); our models are "
                                    "softmax-contrastive CLIP models without one.")
    hints = hints or {}
    if hints:
        _check_open_clip_config(hints)
    elif family != "declip":
        log.warning("No open_clip model config next to the weights: assuming OpenAI's QuickGELU activation and "
                    "heads = width // 64. Weights trained with nn.GELU (most open_clip / LAION / DataComp models, "
                    "whose open_clip names lack '-quickgelu') give lower accuracy that way, silently: put the "
                    "model's open_clip_config.json next to the weights, or pass config={'quick_gelu': False}.")
    vision, e_img = _infer_vision(state, hints.get("vision_cfg") or {})
    text, e_txt = _infer_text(state, hints.get("text_cfg") or {})
    embed_dim = e_img or e_txt
    if not embed_dim:
        raise CheckpointFormatError("Neither visual.proj / visual.attnpool.c_proj nor text_projection found: "
                                    "cannot tell the embedding width.")
    token_dim = state["image_mapping.weight"].shape[0] if "image_mapping.weight" in state else 0
    # open_clip configs say quick_gelu only when it is true (absent = nn.GELU); no config = OpenAI's QuickGELU
    quick_gelu = bool(hints.get("quick_gelu", False)) if hints and family != "declip" else True
    cfg = ModelConfig(vision=vision, text=text, embed_dim=embed_dim, token_dim=token_dim, quick_gelu=quick_gelu)
    if family == "declip":  # the reference's temperature handling (clamp [3, 6], cap exp at 100)
        cfg.logit_scale_bounds, cfg.logit_scale_exp_cap = [3.0, 6.0], 100.0
    if "logit_scale" in state:
        cfg.logit_scale_init = float(state["logit_scale"].reshape(-1)[0])

    ours, origin = _rename_to_ours(state, vit=vision.name.startswith("vit"))
    if text.proj_bias and "text.text_projection.bias" not in ours:
        ours["text.text_projection.bias"] = torch.zeros(embed_dim)
        log.info("text_projection is a Linear without a bias in the checkpoint: using a zero bias")
    return cfg, ours, origin


def _slip_vision(state: dict, model: str | None):
    """(VisionConfig, embed_dim) of an official SLIP checkpoint's timm ViT; ``model``: its args.model."""
    from declip_ds.config import VisionConfig
    from declip_ds.models.vision import PLAIN_VITS

    width = state["visual.cls_token"].shape[-1]
    layers = _count_blocks(state, "visual.blocks.")
    patch = state["visual.patch_embed.proj.weight"].shape[-1]
    n = state["visual.pos_embed"].shape[1] - 1
    grid = math.isqrt(n)
    if grid * grid != n or state["visual.patch_embed.proj.weight"].shape[-2] != patch:
        raise CheckpointFormatError(f"Non-square ViT patches or grid: visual.pos_embed "
                                    f"{tuple(state['visual.pos_embed'].shape)}, patch {patch}.")
    fc = state.get("visual.blocks.0.mlp.fc1.weight")
    if fc is not None and fc.shape[0] != 4 * width:
        raise CheckpointFormatError(f"visual.blocks.0.mlp.fc1.weight {tuple(fc.shape)}: an MLP ratio other than 4 "
                                    f"is not supported (width {width}).")
    def dims(name):  # (width, blocks, patch) of a named tower
        w, blocks, _, p = PLAIN_VITS[name]
        return w, blocks, p

    tower = SLIP_TOWERS.get((model or "").rsplit("_", 1)[-1])
    if tower is not None and dims(tower) != (width, layers, patch):
        w, blocks, p = dims(tower)
        raise CheckpointFormatError(f"args.model={model!r} names {tower} (width {w}, {blocks} blocks, patch {p}), "
                                    f"but visual.* has width {width}, {layers} blocks, patch {patch}: the "
                                    f"checkpoint is inconsistent.")
    if tower is None:
        candidates = [k for k in SLIP_TOWERS.values() if dims(k) == (width, layers, patch)]
        if candidates:
            tower = candidates[0]
            log.warning("The SLIP checkpoint does not record args.model (%r): %s from the shapes (width %d, %d "
                        "blocks), with %d attention heads as SLIP builds it", model, tower, width, layers,
                        PLAIN_VITS[tower][2])
    if tower is not None:
        return VisionConfig(name=tower, image_size=grid * patch), state["image_projection"].shape[1]
    heads = max(1, width // 64)
    log.warning("SLIP checkpoint with a ViT SLIP never released (width %d, %d blocks, patch %d; args.model %r): "
                "vit_plain with heads = width // 64 = %d", width, layers, patch, model, heads)
    cfg = VisionConfig(name="vit_plain", image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                       heads=heads)
    return cfg, state["image_projection"].shape[1]


def _slip_to_ours(state: dict, meta: dict):
    """(ModelConfig, our state dict, {our key: source key}) from an official SLIP model state (``module.``
    stripped): visual.norm -> ln_post, visual.* -> visual.trunk.*, image_projection -> visual.proj, the
    text tower by OpenAI's names; the SimCLR head is dropped."""
    from declip_ds.config import ModelConfig

    if "token_embedding.weight" not in state:
        raise CheckpointFormatError("The SLIP checkpoint has no text tower (a SIMCLR_* model?): zero-shot "
                                    "evaluation needs one; evaluate its image tower by linear probing elsewhere.")
    vision, embed_dim = _slip_vision(state, meta.get("model"))
    text, e_txt = _infer_text(state, {})
    if e_txt is not None and e_txt != embed_dim:
        raise CheckpointFormatError(f"image_projection gives embed_dim {embed_dim}, text_projection {e_txt}.")
    cfg = ModelConfig(vision=vision, text=text, embed_dim=embed_dim, quick_gelu=True)  # SLIP's text: QuickGELU
    if "logit_scale" in state:
        cfg.logit_scale_init = float(state["logit_scale"].reshape(-1)[0])
    ours, origin, dropped = {}, {}, Counter()
    for k, v in state.items():
        if k.split(".")[0] in SLIP_HEADS:
            dropped[k.split(".")[0]] += 1
            continue
        if k.startswith("visual.norm."):
            new = "visual.ln_post." + k[len("visual.norm."):]
        elif k.startswith("visual."):
            new = "visual.trunk." + k[len("visual."):]
        elif k == "image_projection":
            new = "visual.proj"
        elif TEXT_KEYS.fullmatch(k):
            new = "text." + k
        elif k == "logit_scale":
            new, v = k, v.reshape(1)
        else:
            new = f"<unmapped> {k}"
        ours[new], origin[new] = v, k
    if dropped:
        log.info("SLIP checkpoint: dropped the SimCLR head, not needed for the towers: %s",
                 ", ".join(f"{g} ({n} tensors)" for g, n in sorted(dropped.items())))
    return cfg, ours, origin


def _describe(cfg) -> str:
    v, t = cfg.vision, cfg.text
    vis = f"{v.name} {v.image_size}px"
    if v.name in ("vit_custom", "vit_plain"):
        vis += f" (width {v.width}, {v.layers} layers, {v.heads} heads, patch {v.patch_size})"
    return (f"{vis}; text width {t.width}, {t.layers} layers, {t.heads} heads, context {t.context_length}"
            f"{', projection with bias' if t.proj_bias else ''}; embed_dim {cfg.embed_dim}"
            f"{f', token_dim {cfg.token_dim}' if cfg.token_dim else ''}; {'QuickGELU' if cfg.quick_gelu else 'GELU'}")


def load_strict(model, state: dict, what: str, origin: dict | None = None) -> None:
    """``model.load_state_dict(state, strict=True)``, after listing every missing, unexpected and
    shape-mismatched key in one error. Missing BatchNorm ``num_batches_tracked`` buffers (the DeCLIP
    RN50 releases lack them) are filled with 0."""
    origin = origin or {}
    expected = model.state_dict()
    filled = [k for k in expected if k not in state and k.endswith("num_batches_tracked")
              and k.replace("num_batches_tracked", "running_mean") in state]
    for k in filled:
        state[k] = torch.zeros((), dtype=torch.long)
    if filled:
        log.info("Filled %d missing BatchNorm num_batches_tracked buffers with 0", len(filled))

    def src(k):
        return f"{origin[k]} -> {k}" if k in origin and origin[k] != k else k

    mismatched = [f"{src(k)}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in state]
    unexpected = [origin.get(k, k) for k in state if k not in expected]
    if mismatched or missing or unexpected:
        parts = []
        for title, items in (("shape mismatches", mismatched), ("missing", missing), ("unexpected", unexpected)):
            if items:
                more = f" ... and {len(items) - 20} more" if len(items) > 20 else ""
                parts.append(f"{title} ({len(items)}): " + "; ".join(items[:20]) + more)
        raise CheckpointFormatError(f"{what} does not fit the model: " + " | ".join(parts))
    model.load_state_dict(state, strict=True)


def load_pretrained(path: str | Path, format: str = "auto", *, config: dict | str | Path | None = None):
    """A DualEncoder (eval mode) with the weights of ``path``; see the module docstring for the formats.

    format: auto | ours | openai | open_clip | declip | slip. ``auto`` detects the format from the keys and
    logs what it found. config: an open_clip model config (dict or JSON path; open_clip's model_configs
    format, or its hub open_clip_config.json ``{"model_cfg": ..., "preprocess_cfg": ...}``) for the fields the
    shapes cannot tell (attention heads, activation); by default one next to the weights is used.
    The returned model uses the standard OpenAI token layout (a DeCLIP release's mask-token row is
    removed), so ``Tokenizer()`` works with any loaded model.
    """
    fmt, src = _resolve_format(path, format)
    if fmt == "ours":
        return _load_ours(Path(path))
    return _load_external(fmt, src, config)


def _resolve_format(path: str | Path, format: str) -> tuple[str, _Source | None]:
    """(format, the already-read source for an auto-detected external checkpoint, else None)."""
    if format not in FORMATS:
        raise ValueError(f"Unknown checkpoint format '{format}'. Choose one of: {', '.join(FORMATS)}.")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint '{path}' does not exist.")
    if format == "auto":
        fmt, src, description = _inspect(path)
        log.info("%s: detected format '%s': %s", path, fmt, description)
        return fmt, src
    if format != "ours":
        return format, _read_state(_weights_in_dir(path) if path.is_dir() else path)
    return format, None


def _load_external(fmt: str, src: _Source, config: dict | str | Path | None):
    """A DualEncoder from an OpenAI / open_clip / DeCLIP-release state dict already read into ``src``."""
    from declip_ds.models import build_model

    hints = None
    if FAMILY[fmt] == "slip":
        if config is not None:
            raise ValueError("config= describes open_clip models; an official SLIP checkpoint's architecture comes "
                             "from its args.model and the shapes. Leave config out.")
    else:
        hints = model_config_arg(config) if config is not None else _sidecar_config(src.path)
    _refuse_timm_or_siglip(src, hints)
    found = _family_of_keys(src.state)
    if found == "ours":
        raise _ours_without_prefix(src.path)
    if found != FAMILY[fmt]:  # only possible when the format was named, not detected
        raise CheckpointFormatError(
            f"format='{fmt}' was requested, but '{src.path}' does not have that layout"
            f"{f' (it looks like {found!r})' if found else ''}; use format='auto' to detect it."
        )
    if FAMILY[fmt] == "slip":
        cfg, ours, origin = _slip_to_ours(src.state, src.meta)
    else:
        state = _declip_to_openai(src.state) if FAMILY[fmt] == "declip" else src.state
        cfg, ours, origin = _openai_to_ours(state, hints, FAMILY[fmt])
        if FAMILY[fmt] == "declip" and _declip_text_prefix(src.state) == "text_encoder.":
            cfg.logit_scale_exp_cap = 0.0  # the reference's SLIP forward does not cap exp(scale) at 100
    log.info("%s (%s): %s", src.path, fmt, _describe(cfg))
    model = build_model(cfg)
    load_strict(model, ours, f"'{src.path}' (format '{fmt}', inferred {_describe(cfg)})", origin)
    return model.eval()


# ============================================================================ evaluation preprocessing

INTERPOLATIONS = ("bicubic", "bilinear")
# per external format, when nothing next to the weights says otherwise: (normalize, interpolation, crop_ratio)
FORMAT_PREPROCESS = {
    "openai": ("openai", "bicubic", 1.0),      # OpenAI's clip.load: Resize(224, bicubic) + CenterCrop(224)
    "open_clip": ("openai", "bicubic", 1.0),   # open_clip's PreprocessCfg defaults (resize_mode "shortest")
    "declip": ("imagenet", "bilinear", 224 / 256),  # the DeCLIP repo: Resize(256) + CenterCrop(224) (METHODS §7, §9)
    "slip": ("imagenet", "bilinear", 1.0),  # SLIP's eval_zeroshot.py: Resize(224) + CenterCrop(224) (METHODS §3)
}
# our top-level key in open_clip_config.json (open_clip reads only model_cfg / preprocess_cfg): what
# open_clip's preprocess_cfg cannot say, i.e. {"crop_ratio": 0.875} for Resize(256) + CenterCrop(224)
SIDECAR_KEY = "declip_ds"


def preprocess_sidecar_path(weights: str | Path) -> Path:
    """``X.preprocess.json`` next to ``X.safetensors``: the export's preprocessing when open_clip's
    model_configs JSON (``X.json``) cannot hold it (open_clip passes that file's keys to ``CLIP(...)``)."""
    return Path(weights).with_suffix(".preprocess.json")


def normalize_name(mean, std):
    """``"imagenet"`` / ``"openai"`` when (mean, std) are those constants (within 1e-6), else the pair."""
    from declip_ds.data.transforms import NORMALIZE

    mean, std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
    for name, (m, s) in NORMALIZE.items():
        if len(mean) == len(m) and len(std) == len(s) and all(
                abs(a - b) <= 1e-6 for a, b in zip(mean + std, m + s)):
            return name
    return mean, std


def _read_preprocess(data: dict, where: str) -> dict:
    """{normalize, interpolation, crop_ratio} (those given) from open_clip's ``preprocess_cfg`` and our
    ``declip_ds`` key."""
    pp, ours, out = data.get("preprocess_cfg") or {}, data.get(SIDECAR_KEY) or {}, {}
    if "mean" in pp or "std" in pp:
        from declip_ds.data.transforms import NORMALIZE

        mean, std = pp.get("mean", NORMALIZE["openai"][0]), pp.get("std", NORMALIZE["openai"][1])
        if not all(isinstance(v, (list, tuple)) and len(v) == 3 for v in (mean, std)):
            raise CheckpointFormatError(f"{where}: preprocess_cfg.mean / std must be lists of 3 numbers, got "
                                        f"{mean!r} / {std!r}.")
        out["normalize"] = normalize_name(mean, std)
    interp = pp.get("interpolation")
    if interp == "random":  # open_clip's training-only choice; its eval transform uses bicubic
        interp = "bicubic"
    if interp in INTERPOLATIONS:
        out["interpolation"] = interp
    elif interp is not None:
        log.warning("%s: preprocess_cfg.interpolation=%r is not supported (allowed: %s); ignored", where, interp,
                    ", ".join(INTERPOLATIONS))
    mode = pp.get("resize_mode")
    if mode is not None:
        if mode != "shortest":
            log.warning("%s: preprocess_cfg.resize_mode=%r is not supported; evaluating with 'shortest' (resize the "
                        "short side, then center-crop)", where, mode)
        out["crop_ratio"] = 1.0  # open_clip's eval: Resize(size) + CenterCrop(size)
    if "crop_ratio" in ours:
        r = ours["crop_ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise CheckpointFormatError(f"{where}: {SIDECAR_KEY}.crop_ratio must be a number in (0, 1], got {r!r}.")
        out["crop_ratio"] = float(r)
    return out


def _sidecar_preprocess(weights: Path, config) -> tuple[dict, str | None]:
    """(preprocessing hints, where from): the ``config=`` argument when it holds a preprocess_cfg, else
    ``X.preprocess.json``, ``X.json`` or ``open_clip_config.json`` next to the weights."""
    candidates = []
    if isinstance(config, dict):
        candidates.append((config, "the config= argument"))
    elif isinstance(config, (str, Path)):
        candidates.append((Path(config), str(config)))
    for p in (preprocess_sidecar_path(weights), weights.with_suffix(".json"), weights.parent / "open_clip_config.json"):
        candidates.append((p, str(p)))
    for item, where in candidates:
        if isinstance(item, Path):
            if not item.is_file():
                continue
            try:
                item = json.loads(item.read_text())
            except json.JSONDecodeError:
                continue
        if isinstance(item, dict) and ("preprocess_cfg" in item or SIDECAR_KEY in item):
            return _read_preprocess(item, where), where
    return {}, None


def _check_preprocess_args(interpolation, crop_ratio) -> None:
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is not allowed. Choose one of: {', '.join(INTERPOLATIONS)}.")
    if crop_ratio is not None:
        from declip_ds.config import check_crop_ratio

        check_crop_ratio(crop_ratio, "crop_ratio")


# ============================================================================ evaluation entry points


@dataclass
class EvalModel:
    """A model with what the evaluation scripts need to feed it (any checkpoint format)."""

    model: Any                  # DualEncoder in eval mode
    weights: Path               # the weights file (or directory) that was read
    format: str                 # ours | openai | open_clip | declip | slip
    name: str                   # "<method>/<vision>" for ours, "<format>/<vision>" otherwise
    config_hash: str            # ours: the run config's hash; otherwise the inferred architecture's
    image_size: int
    normalize: Any              # "imagenet" | "openai" | a (mean, std) pair (see load_for_eval)
    context_length: int
    mask_token: bool
    method: Any = None          # ours: the MethodConfig (zero-shot scoring, padding mask); else None
    interpolation: str = "bicubic"   # of the eval Resize: bicubic | bilinear
    crop_ratio: float = 224 / 256    # Resize(round(image_size / crop_ratio)) + CenterCrop(image_size)
    preprocess_source: str = ""      # where the preprocessing came from (logged, recorded in the results)

    def transform(self):
        """The evaluation transform for this checkpoint: PIL image -> (3, S, S) float tensor."""
        from declip_ds.data.transforms import eval_transform

        return eval_transform(self.image_size, normalize=self.normalize, crop_ratio=self.crop_ratio,
                              interpolation=self.interpolation)

    def warn_if_global_untrained(self, what: str) -> bool:
        """Warn (log) when ``what`` uses global embeddings this model never trained: a FILIP model
        whose loss was the token-wise term alone (clip_weight 0, the reference's recipe, and every DeCLIP-repo
        FILIP release), whose global projections got no gradient and were shrunk by weight decay."""
        m = self.method
        if getattr(m, "name", None) != "filip" or getattr(m, "clip_weight", 0.0):
            return False
        msg = (f"{self.weights} is a FILIP model trained on its token-wise loss alone (clip_weight 0): its "
               f"global embeddings got no gradient, so {what} on them does not measure the model (zero-shot and "
               f"retrieval: use --scoring token)")
        log.warning(msg)
        return True

    def preprocess(self) -> dict:
        """The preprocessing, as the results JSON records it (``"preprocess"``)."""
        norm = self.normalize if isinstance(self.normalize, str) else \
            {"mean": list(self.normalize[0]), "std": list(self.normalize[1])}
        return {"resize": round(self.image_size / self.crop_ratio), "crop": self.image_size,
                "crop_ratio": self.crop_ratio, "interpolation": self.interpolation, "normalize": norm,
                "source": self.preprocess_source}

    def describe_preprocess(self) -> str:
        p = self.preprocess()
        norm = p["normalize"] if isinstance(p["normalize"], str) else f"mean {p['normalize']['mean']} std " \
                                                                    f"{p['normalize']['std']}"
        return (f"Resize({p['resize']}, {p['interpolation']}) + CenterCrop({p['crop']}), {norm} normalisation "
                f"(from {p['source']})")


def add_preprocess_args(p, normalize_flag: str = "--normalize") -> None:
    """The eval-preprocessing overrides every evaluation CLI takes (``normalize_flag``, ``--interpolation``,
    ``--crop-ratio``; None = the checkpoint's, see ``load_for_eval``)."""
    p.add_argument(normalize_flag, default=None, choices=["imagenet", "openai"],
                   help="image normalisation (default: the run's data.normalize; 'imagenet' for DeCLIP releases, "
                        "'openai' for OpenAI / open_clip ones, or what an open_clip_config.json next to them says)")
    p.add_argument("--interpolation", default=None, choices=["bicubic", "bilinear"],
                   help="resize interpolation (default: the run's eval.interpolation; bilinear for DeCLIP releases, "
                        "bicubic for OpenAI / open_clip)")
    p.add_argument("--crop-ratio", type=float, default=None,
                   help="Resize(size / ratio) + CenterCrop(size), 0 < ratio <= 1 (default: the run's eval.crop_ratio; "
                        "0.875 for DeCLIP releases, 1.0 for OpenAI / open_clip)")


@dataclass
class ReleaseMethod:
    """The zero-shot settings of a DeCLIP-repo FILIP-family release (it carries FILIP's token heads), as the
    reference evaluates it: FILIP by token scoring over all 77 positions with each class's matrix divided by its
    Frobenius norm (filip_solver.evaluate); DeFILIP by its global embeddings (its FILIP branch is off)."""

    name: str
    zero_shot_scoring: str
    mask_padding: bool = False
    zero_shot_token_renorm: str = "class"


def _release_method(fmt: str, state: dict) -> ReleaseMethod | None:
    heads = {k.removeprefix("module.").split(".")[0] for k in state}
    if fmt != "declip" or "image_mapping" not in heads:
        return None
    defilip = bool(heads & {"projector", "predictor"})  # DeCLIP's SimSiam heads too
    release = ReleaseMethod("defilip", "global") if defilip else ReleaseMethod("filip", "token")
    log.info("A DeCLIP-repo %s release (FILIP token heads%s): zero-shot by %s scoring by default, token scoring "
             "over all positions with the per-class norm, as the reference", release.name.upper(),
             ", SimSiam heads" if defilip else "", release.zero_shot_scoring)
    return release


def load_for_eval(path: str | Path, format: str = "auto", *, normalize=None, interpolation: str | None = None,
                  crop_ratio: float | None = None, config: dict | str | Path | None = None) -> EvalModel:
    """Load any supported checkpoint for the evaluation scripts.

    Architecture: ours from the run's config, others inferred from the weights; the standard tokenizer
    for released checkpoints. Preprocessing (``EvalModel.transform()``), lowest priority first:
      ours        the run's data.normalize, eval.interpolation and eval.crop_ratio
      openai /    "openai" mean/std, bicubic, crop_ratio 1.0 (Resize(224) + CenterCrop(224), as OpenAI)
      open_clip
      declip      "imagenet" mean/std, bilinear, crop_ratio 224/256 (Resize(256) + CenterCrop(224))
      slip        "imagenet" mean/std, bilinear, crop_ratio 1.0 (Resize(224) + CenterCrop(224), as SLIP)
      sidecar     an external checkpoint's preprocess_cfg (open_clip_config.json, X.json, or the export's
                  X.preprocess.json, or ``config=``): mean/std ("imagenet"/"openai" when they match, else the
                  pair), interpolation, resize_mode "shortest" = crop_ratio 1.0 unless our "declip_ds":
                  {"crop_ratio": r} key says otherwise
      arguments   ``normalize`` / ``interpolation`` / ``crop_ratio`` override everything
    """
    import hashlib

    from declip_ds.config import config_hash

    _check_preprocess_args(interpolation, crop_ratio)
    p = Path(path)
    fmt, src = _resolve_format(p, format)  # an external file is read once, here
    if fmt == "ours":
        from declip_ds.config import from_dict

        weights = find_our_checkpoint(p)
        saved = saved_config(weights)  # read once: the Experiment and the hash its run recorded
        exp = from_dict(saved)
        model = _load_ours(p)
        em = EvalModel(model, weights, "ours", f"{exp.method.name}/{exp.model.vision.name}", config_hash(saved),
                       exp.model.vision.image_size, exp.data.normalize, exp.model.text.context_length,
                       exp.model.text.mask_token, exp.method, exp.eval.interpolation, exp.eval.crop_ratio,
                       "the run config (data.normalize, eval.interpolation, eval.crop_ratio)")
    else:
        release = _release_method(fmt, src.state)  # read before _load_external drops the method heads
        model = _load_external(fmt, src, config)
        arch = json.dumps(dataclasses.asdict(model.cfg), sort_keys=True, default=str)
        norm, interp, ratio = FORMAT_PREPROCESS[fmt]
        em = EvalModel(model, p, fmt, f"{fmt}/{model.cfg.vision.name}", hashlib.sha256(arch.encode()).hexdigest()[:12],
                       model.cfg.vision.image_size, norm, model.cfg.text.context_length, False, release, interp, ratio,
                       f"the {fmt} format's default")
        hints, where = _sidecar_preprocess(src.path, config)
        if hints:
            em.normalize = hints.get("normalize", em.normalize)
            em.interpolation = hints.get("interpolation", em.interpolation)
            em.crop_ratio = hints.get("crop_ratio", em.crop_ratio)
            em.preprocess_source = f"{where} ({', '.join(sorted(hints))}; the rest: {em.preprocess_source})"
    given = {k: v for k, v in (("normalize", normalize), ("interpolation", interpolation),
                               ("crop_ratio", crop_ratio)) if v is not None}
    for k, v in given.items():
        setattr(em, k, float(v) if k == "crop_ratio" else v)
    if given:
        em.preprocess_source = f"arguments ({', '.join(given)}); the rest: {em.preprocess_source}"
    log.info("%s: evaluation preprocessing %s", em.weights, em.describe_preprocess())
    return em
