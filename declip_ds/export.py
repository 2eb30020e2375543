"""Export a trained DualEncoder in open_clip's / OpenAI's state-dict layout (safetensors + JSON config).

    python -m declip_ds.export --to open_clip CKPT OUT

CKPT   our run dir, its ``checkpoints`` dir, a ``step_XXXXXXXX`` tag dir or its ``model.safetensors``
       (these hold the full fp32 weights, ZeRO-3 runs included), or any checkpoint ``load_pretrained``
       reads (``--from openai|open_clip|declip``, default auto).
OUT    a directory -> ``OUT/open_clip_model.safetensors`` + ``OUT/open_clip_config.json``
                      (open_clip's local-dir / hub format ``{"model_cfg": ..., "preprocess_cfg": ...}``):
                      ``open_clip.create_model("local-dir:OUT")`` builds the model and loads the weights.
       ``X.safetensors`` -> ``X.safetensors`` + ``X.json`` (open_clip's model_configs format:
                      ``embed_dim``, ``quick_gelu``, ``vision_cfg``, ``text_cfg``):
                      ``open_clip.add_model_config("X.json")`` then
                      ``open_clip.create_model("X", pretrained="X.safetensors")``, or create_model with
                      ``pretrained=None`` and ``load_state_dict(safetensors.torch.load_file(...))``.

Targets: ``open_clip`` (open_clip's CLIP names; a DeCLIP-style text projection with bias is written
as open_clip's ``text_cfg.proj_bias``) and ``openai`` (strictly OpenAI's names: refuses the bias). With
``--to openai`` the same weights are also written as a plain ``torch.save`` state dict, ``X.pt`` next to
``X.safetensors`` (or ``OUT/openai_model.pt``): OpenAI's ``clip.load(path, jit=False)`` (and open_clip's
``load_openai_model(path)``) read only torch files. Neither OpenAI's layout nor its build_model records the
attention heads (it rebuilds heads = width // 64), so --to openai refuses head widths other than 64.
What neither target can represent is refused naming the config field (the tiny ResNet, a non-CLIP ViT;
GELU for --to openai). The mask-token row of a DeCLIP vocabulary is removed (standard tokenizer ids), and
FILIP token heads (``image_mapping`` / ``text_mapping``) are left out with a warning: open_clip has no
slot for them. ``load_pretrained`` reads the export back (the JSON next to it gives the heads). A model that caps
exp(logit_scale) (``model.logit_scale_exp_cap``, the DeCLIP recipes: 100) exports a logit_scale above ln(cap) as
ln(cap): open_clip and OpenAI use exp(logit_scale) without a cap.

Preprocessing: the model's evaluation protocol (the run's data.normalize, eval.interpolation and
eval.crop_ratio; a released checkpoint's per-format default, see ``load_for_eval``) is written as
open_clip's ``preprocess_cfg`` (mean, std, interpolation, resize_mode "shortest"). open_clip has no crop
ratio: when it is not 1 (e.g. 0.875 = Resize(256) + CenterCrop(224)) it goes under our own top-level key
``"declip_ds": {"crop_ratio": r}``, which ``load_for_eval`` reads and open_clip ignores (it reads only
``model_cfg`` and ``preprocess_cfg``), so open_clip's own transform then crops at ratio 1. For an
``X.safetensors`` export, ``X.json`` must stay a bare model config (open_clip passes its keys to
``CLIP(...)``), so the same ``preprocess_cfg`` / ``declip_ds`` keys go to ``X.preprocess.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path

import torch

from declip_ds.models.pretrained import (
    DECLIP_MASK_ROW,
    FORMATS,
    OPENAI_VOCAB,
    RN_NAMES,
    VIT_NAMES,
    SIDECAR_KEY,
    EvalModel,
    load_for_eval,
    preprocess_sidecar_path,
    rename_visual,
)

log = logging.getLogger(__name__)
TARGETS = ("open_clip", "openai")
OPENAI_PT = "openai_model.pt"  # --to openai into a directory: the state dict OpenAI's clip.load reads


class ExportError(ValueError):
    """The model cannot be written in the requested layout."""


# ----------------------------------------------------------------------------- configs


def _vision_cfg(model) -> dict:
    from declip_ds.models.vision import ResNetTower, ViTTower

    cfg = model.cfg.vision
    tower = model.visual
    if isinstance(tower, ViTTower):
        trunk = tower.trunk
        width, heads = trunk.embed_dim, trunk.blocks[0].attn.num_heads
        act = type(trunk.blocks[0].mlp.act).__name__
        problems = []
        if act != ("QuickGELU" if model.cfg.quick_gelu else "GELU"):
            problems.append(f"activation {act} (open_clip's models use QuickGELU or GELU, as quick_gelu says)")
        if trunk.blocks[0].mlp.fc1.out_features != 4 * width:
            problems.append(f"MLP width {trunk.blocks[0].mlp.fc1.out_features} != 4 x {width}")
        no_ln_pre = isinstance(trunk.norm_pre, torch.nn.Identity)
        if no_ln_pre or getattr(trunk, "num_reg_tokens", 0) or trunk.cls_token is None:
            problems.append("no ln_pre / register tokens / no CLS token")
        if problems:
            raise ExportError(f"model.vision.name='{cfg.name}': {'; '.join(problems)}; open_clip's VisionTransformer "
                              f"cannot represent it.")
        patch = trunk.patch_embed.patch_size[0]
        return {"image_size": cfg.image_size, "layers": len(trunk.blocks), "width": width, "patch_size": patch,
                "head_width": width // heads}
    if isinstance(tower, ResNetTower) and cfg.name == "resnet50_clip":
        return {"image_size": cfg.image_size, "layers": [3, 4, 6, 3], "width": 64, "patch_size": None}
    raise ExportError(
        f"model.vision.name='{cfg.name}' has no open_clip/OpenAI counterpart (open_clip's ModifiedResNet doubles "
        f"the width every stage with total stride 32; the tiny ResNet does not). Exportable towers: vit_tiny, "
        f"vit_custom, vit_base_patch32_clip_224, vit_base_patch16_clip_224, resnet50_clip."
    )


def _open_clip_supports_proj_bias() -> bool:
    try:
        from open_clip.model import CLIPTextCfg
    except ImportError:  # not installed here: the target open_clip must be >= 2.24 (proj_bias)
        return True
    return "proj_bias" in {f.name for f in dataclasses.fields(CLIPTextCfg)}


def open_clip_config(model, target: str = "open_clip") -> dict:
    """open_clip's model config (model_configs format) for ``model``; raises ExportError when the
    target layout cannot represent it."""
    t = model.cfg.text
    text_cfg = {"context_length": t.context_length, "vocab_size": OPENAI_VOCAB, "width": t.width, "heads": t.heads,
                "layers": t.layers}
    if t.proj_bias:
        if target == "openai":
            raise ExportError(
                "model.text.proj_bias=true: the text projection is a Linear with a bias (the DeCLIP layout), and "
                "OpenAI's layout has only a bare (width, embed_dim) matrix. Use --to open_clip (open_clip's "
                "text_cfg.proj_bias) or a model trained with model.text.proj_bias=false."
            )
        if not _open_clip_supports_proj_bias():
            raise ExportError("model.text.proj_bias=true: the installed open_clip has no text_cfg.proj_bias (needs "
                              ">= 2.24); upgrade open_clip or export a model trained with proj_bias=false.")
        text_cfg["proj_bias"] = True
    if target == "openai" and not model.cfg.quick_gelu:
        raise ExportError("model.quick_gelu=false (nn.GELU): OpenAI's CLIP is QuickGELU only. Use --to open_clip "
                          "(its config records quick_gelu).")
    vision_cfg = _vision_cfg(model)
    if target == "openai":
        _check_openai_heads(vision_cfg, text_cfg)
    return {"embed_dim": model.cfg.embed_dim, "quick_gelu": bool(model.cfg.quick_gelu), "vision_cfg": vision_cfg,
            "text_cfg": text_cfg}


def _check_openai_heads(vision_cfg: dict, text_cfg: dict) -> None:
    """OpenAI's layout records no head count: its build_model (clip.load, open_clip's load_openai_model) rebuilds
    heads = width // 64, so any other head width would come back with the wrong heads and other outputs."""
    bad = []
    head_width = vision_cfg.get("head_width", 64)  # resnet50_clip: OpenAI's attention pool, 64 wide heads
    if head_width != 64:
        bad.append(f"vision width {vision_cfg['width']} with {vision_cfg['width'] // head_width} heads (head "
                   f"width {head_width})")
    if text_cfg["width"] != 64 * text_cfg["heads"]:
        bad.append(f"text width {text_cfg['width']} with {text_cfg['heads']} heads (head width "
                   f"{text_cfg['width'] / text_cfg['heads']:g})")
    if bad:
        raise ExportError(f"--to openai: {' and '.join(bad)}; OpenAI's layout has no head count, and its build_model "
                          f"(clip.load) rebuilds heads = width // 64, i.e. 64-wide heads, so the model would come "
                          f"back with other outputs. Use --to open_clip (its config records the heads).")


# ----------------------------------------------------------------------------- weights


def _capped_logit_scale(model, s: torch.Tensor) -> torch.Tensor:
    """The logit scale open_clip / OpenAI should read: they use exp(logit_scale) as it is, while our model caps it at
    model.logit_scale_exp_cap (the DeCLIP recipes: 100), so a parameter above ln(cap) is written as ln(cap)."""
    cap = model.cfg.logit_scale_exp_cap
    if cap <= 0 or float(s) <= math.log(cap):
        return s
    log.info("logit_scale %.4f (exp %.2f) is above ln(model.logit_scale_exp_cap) = ln(%g): exported as %.4f, so that "
             "exp(logit_scale), which open_clip / OpenAI use without a cap, is the model's capped scale %g",
             float(s), math.exp(float(s)), cap, math.log(cap), cap)
    return torch.tensor(math.log(cap), dtype=s.dtype)


def to_openai_state_dict(model, target: str = "open_clip") -> dict[str, torch.Tensor]:
    """Our DualEncoder's weights under OpenAI / open_clip names (fresh contiguous fp32 tensors)."""
    open_clip_config(model, target)  # refuse what the layout cannot hold before converting
    vit = model.cfg.vision.name.startswith("vit")
    out: dict[str, torch.Tensor] = {}
    dropped = []
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if k == "logit_scale":
            name, v = "logit_scale", _capped_logit_scale(model, v.reshape(()))  # ours (1,) -> OpenAI / open_clip 0-d
        elif k.startswith("visual."):
            sub = k[len("visual."):]
            name = rename_visual(sub, VIT_NAMES if vit else RN_NAMES, to_ours=False)
            if name is None:
                raise ExportError(f"No OpenAI name for '{k}' (model.vision.name='{model.cfg.vision.name}').")
            name = "visual." + name
            if name == "visual.class_embedding":
                v = v.reshape(-1)  # (1, 1, W) -> (W,)
            elif name == "visual.positional_embedding":
                v = v.reshape(v.shape[-2], v.shape[-1])  # (1, N + 1, W) -> (N + 1, W)
        elif k.startswith("text."):
            name = k[len("text."):]
            if name == "token_embedding.weight" and model.cfg.text.mask_token:
                # DeCLIP vocabulary: drop <|mask|> so SOT/EOT sit at OpenAI's 49406/49407
                v = torch.cat([v[:DECLIP_MASK_ROW], v[DECLIP_MASK_ROW + 1:]])
        elif k.split(".")[0] in ("image_mapping", "text_mapping"):
            dropped.append(k)
            continue
        else:
            raise ExportError(f"No OpenAI name for '{k}'.")
        out[name] = (v.float() if v.is_floating_point() else v).clone().contiguous()
    if model.cfg.text.mask_token:
        log.info("Removed the mask-token row %d of the token embedding (49409 -> 49408 rows): the export uses the "
                 "standard tokenizer's ids", DECLIP_MASK_ROW)
    if dropped:
        log.warning("model.token_dim=%d: the FILIP token heads (%s) have no open_clip slot and are not exported",
                    model.cfg.token_dim, ", ".join(dropped))
    return out


def _verify_with_open_clip(cfg: dict, state: dict) -> None:
    """Build open_clip's model for ``cfg`` on the meta device (no memory, no init cost) and compare names
    and shapes, so an export open_clip would not load is never written."""
    try:
        from open_clip.model import CLIP
    except ImportError:
        log.info("open_clip is not installed: skipped checking the export against its model")
        return
    with torch.device("meta"):
        expected = CLIP(**cfg).state_dict()
    bad = [f"{k}: missing" for k in expected if k not in state]
    bad += [f"{k}: unexpected" for k in state if k not in expected]
    bad += [f"{k}: {tuple(v.shape)} vs open_clip {tuple(expected[k].shape)}" for k, v in state.items()
            if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ExportError("The converted weights do not fit open_clip's model for this config: " + "; ".join(bad[:20]))


def _atomic_save(write, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def preprocess_config(normalize="openai", interpolation: str = "bicubic", crop_ratio: float = 1.0) -> dict:
    """``{"preprocess_cfg": ..., ["declip_ds": {"crop_ratio": r}]}``: open_clip's preprocess keys, plus
    the crop ratio open_clip cannot express (only when it is not 1)."""
    from declip_ds.data.transforms import NORMALIZE

    mean, std = NORMALIZE[normalize] if isinstance(normalize, str) else normalize
    out = {"preprocess_cfg": {"mean": [float(x) for x in mean], "std": [float(x) for x in std],
                              "interpolation": interpolation, "resize_mode": "shortest"}}
    if crop_ratio != 1:
        out[SIDECAR_KEY] = {"crop_ratio": float(crop_ratio)}
    return out


def export(model, out: str | Path, target: str = "open_clip", normalize=None, *, interpolation: str | None = None,
           crop_ratio: float | None = None) -> list[Path]:
    """Write ``model`` to ``out`` (a directory, or a ``.safetensors`` path); returns the files written.

    ``model``: a DualEncoder, or an ``EvalModel`` (``load_for_eval``), whose preprocessing is then the
    default. The preprocessing recorded (see the module docstring) defaults to open_clip's: "openai"
    mean/std, bicubic, crop_ratio 1.0."""
    from safetensors.torch import save_file

    if isinstance(model, EvalModel):
        normalize = normalize if normalize is not None else model.normalize
        interpolation = interpolation or model.interpolation
        crop_ratio = crop_ratio if crop_ratio is not None else model.crop_ratio
        model = model.model
    if target not in TARGETS:
        raise ExportError(f"Unknown export target '{target}'. Choose one of: {', '.join(TARGETS)}.")
    cfg = open_clip_config(model, target)
    state = to_openai_state_dict(model, target)
    _verify_with_open_clip(cfg, state)
    preprocess = preprocess_config(normalize or "openai", interpolation or "bicubic",
                                   1.0 if crop_ratio is None else crop_ratio)
    out = Path(out)
    if out.suffix == ".safetensors":  # open_clip's model_configs JSON must hold the model config only
        weights = out
        configs = {out.with_suffix(".json"): cfg, preprocess_sidecar_path(out): preprocess}
    else:
        weights = out / "open_clip_model.safetensors"
        configs = {out / "open_clip_config.json": {"model_cfg": cfg, **preprocess}}
    weights.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "exported_by": "declip_ds", "layout": target}
    _atomic_save(lambda p: save_file(state, str(p), metadata=metadata), weights)
    for path, data in configs.items():
        _atomic_save(lambda p, data=data: p.write_text(json.dumps(data, indent=2) + "\n"), path)
    log.info("Wrote %s (%d tensors) and %s", weights, len(state), ", ".join(map(str, configs)))
    if target != "openai":
        return [weights, *configs]
    # OpenAI's clip.load reads only torch files (torch.jit.load, else torch.load of a state dict)
    pt = out.with_suffix(".pt") if out.suffix == ".safetensors" else out / OPENAI_PT
    _atomic_save(lambda p: torch.save(state, p), pt)
    log.info("Wrote %s: the same weights as a plain state dict for OpenAI's clip.load(%r, jit=False) (or open_clip's "
             "load_openai_model), which cannot read safetensors", pt, str(pt))
    return [weights, *configs, pt]


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m declip_ds.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", choices=TARGETS, required=True,
                        help="output layout. openai also writes the weights as a plain torch state dict (X.pt next "
                             f"to X.safetensors, or OUT/{OPENAI_PT}) for OpenAI's clip.load(PATH, jit=False), which "
                             "rebuilds heads = width // 64 (other head widths are refused: use open_clip)")
    parser.add_argument("--from", dest="source", choices=FORMATS, default="auto", help="input format (default: auto)")
    parser.add_argument("--normalize", choices=("imagenet", "openai"), default=None,
                        help="preprocess mean/std recorded in the export (default: the checkpoint's, as load_for_eval "
                             "reads it: the run's data.normalize, 'imagenet' for DeCLIP releases, else 'openai')")
    parser.add_argument("--interpolation", choices=("bicubic", "bilinear"), default=None,
                        help="eval resize interpolation recorded (default: the checkpoint's, e.g. the run's "
                             "eval.interpolation)")
    parser.add_argument("--crop-ratio", type=float, default=None,
                        help="eval crop ratio recorded (default: the checkpoint's, e.g. the run's eval.crop_ratio)")
    parser.add_argument("ckpt", help="run / checkpoints / step_XXXXXXXX dir, or a weights file")
    parser.add_argument("out", help="output directory, or a .safetensors path (a .json config is written next to it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        em = load_for_eval(args.ckpt, args.source, normalize=args.normalize, interpolation=args.interpolation,
                           crop_ratio=args.crop_ratio)
        em.warn_if_global_untrained("an export (open_clip / OpenAI have no slot for FILIP's token heads)")
        files = export(em, args.out, args.to)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
