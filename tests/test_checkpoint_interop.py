"""Checkpoints in and out: OpenAI / open_clip / DeCLIP-release weights -> our DualEncoder
(load_pretrained), and our checkpoints -> open_clip (declip_ds.export). Small random models, no downloads."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP  # noqa: E402

from declip_ds.config import Experiment, ModelConfig, TextConfig, VisionConfig, save_config  # noqa: E402
from declip_ds.data.tokenizer import Tokenizer  # noqa: E402
from declip_ds.export import ExportError, export, main as export_main, to_openai_state_dict  # noqa: E402
from declip_ds.models import build_model, load_pretrained  # noqa: E402
from declip_ds.models.pretrained import (  # noqa: E402
    RN_NAMES,
    VIT_NAMES,
    CheckpointFormatError,
    _detect,
    _openai_to_ours,
    rename_visual,
)

CTX = 16
CAPTIONS = ["a photo of a cat", "two dogs playing in the snow", "x"]
VIT = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=128, patch_size=8),
           text_cfg=dict(context_length=CTX, vocab_size=49408, width=128, heads=2, layers=2), quick_gelu=True)
# the real RN50 image tower (layers (3, 4, 6, 3), width 64) at 64 px, with a small text tower
RN50 = dict(embed_dim=64, vision_cfg=dict(image_size=64, layers=[3, 4, 6, 3], width=64, patch_size=None),
            text_cfg=dict(context_length=CTX, vocab_size=49408, width=64, heads=1, layers=1), quick_gelu=True)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Perturb every weight and give the BatchNorms non-trivial statistics, so that each tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def vit_ref():
    torch.manual_seed(0)
    return _randomize(CLIP(**VIT), 1)


@pytest.fixture(scope="module")
def rn50_ref():
    torch.manual_seed(0)
    return _randomize(CLIP(**RN50), 2)


def _inputs(size: int):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3)), Tokenizer(CTX)(CAPTIONS)


def _assert_same(ours, ref, size: int, ours_tokens=None):
    images, tokens = _inputs(size)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), ref.encode_image(images), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.encode_text(tokens if ours_tokens is None else ours_tokens),
                                   ref.encode_text(tokens), atol=1e-5, rtol=1e-4)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def _declip_state(ref, text_prefix="encode_text.", rn=False) -> dict[str, torch.Tensor]:
    """The DeCLIP-repo release layout of an open_clip model's weights (METHODS.md §9)."""
    g = torch.Generator().manual_seed(4)
    sd, out = _state(ref), {}
    for k, v in sd.items():
        if k.startswith("visual."):
            if not (rn and k.endswith("num_batches_tracked")):  # DeCLIP RN50s lack these buffers
                out[k] = v
        elif k == "logit_scale":
            out[k] = v.reshape(1)
        elif k == "token_embedding.weight":  # insert <|mask|> at 49406: SOT/EOT move to 49407/49408
            out[text_prefix + k] = torch.cat([v[:49406], torch.randn(1, v.shape[1], generator=g), v[49406:]])
        elif k == "text_projection":  # nn.Linear(width, E): weight (E, width) + bias
            out[text_prefix + "text_projection.weight"] = v.t().contiguous()
            out[text_prefix + "text_projection.bias"] = torch.zeros(v.shape[1])
        else:
            out[text_prefix + k] = v
    width, vis = sd["token_embedding.weight"].shape[1], (2048 if rn else sd["visual.conv1.weight"].shape[0])
    out.update({  # method heads a plain DualEncoder drops ...
        "projector.linear1.weight": torch.randn(16, 8, generator=g),
        "predictor.linear1.weight": torch.randn(8, 16, generator=g),
        "predictor.bn1.running_mean": torch.zeros(8),
        "text_label_predictor.weight": torch.randn(49409, width, generator=g),
        "logit_scale_dense": torch.tensor(2.5),
        # ... and FILIP's token heads, which it keeps
        "image_mapping.weight": torch.randn(16, vis, generator=g), "image_mapping.bias": torch.randn(16, generator=g),
        "text_mapping.weight": torch.randn(16, width, generator=g), "text_mapping.bias": torch.randn(16, generator=g),
    })
    if rn:
        out["visual.fc.weight"], out["visual.fc.bias"] = torch.randn(64, 2048, generator=g), torch.zeros(64)
    return {"module." + k: v for k, v in out.items()}


def _save_declip(path: Path, state: dict) -> Path:
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
                "last_iter": 1234}, path)
    return path


# ----------------------------------------------------------------------------- OpenAI / open_clip layout


def test_open_clip_vit_from_safetensors_matches(vit_ref, tmp_path, caplog):
    path = tmp_path / "vit.safetensors"
    save_file(_state(vit_ref), str(path))
    with caplog.at_level(logging.INFO, logger="declip_ds.models.pretrained"):
        model = load_pretrained(path)
    assert "detected format 'openai'" in caplog.text
    v, t = model.cfg.vision, model.cfg.text
    assert (v.name, v.width, v.layers, v.heads, v.patch_size, v.image_size) == ("vit_custom", 128, 2, 2, 8, 32)
    assert (t.width, t.layers, t.heads, t.context_length, t.proj_bias) == (128, 2, 2, CTX, False)
    assert model.cfg.embed_dim == 32 and not model.training
    torch.testing.assert_close(model.scale(), vit_ref.logit_scale.exp())
    _assert_same(model, vit_ref, 32)
    _assert_same(load_pretrained(path, format="openai"), vit_ref, 32)


def test_open_clip_training_checkpoint_pt_matches(vit_ref, tmp_path, caplog):
    """open_clip's own training checkpoints: {"epoch", "name", "state_dict"} with a DDP module. prefix."""
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "vit", "state_dict": {"module." + k: v for k, v in _state(vit_ref).items()}}, path)
    with caplog.at_level(logging.INFO, logger="declip_ds.models.pretrained"):
        model = load_pretrained(path)
    assert "detected format 'open_clip'" in caplog.text
    _assert_same(model, vit_ref, 32)
    _assert_same(load_pretrained(path, format="open_clip"), vit_ref, 32)


def test_config_next_to_weights_gives_the_heads(vit_ref, tmp_path):
    """The shapes cannot tell the head count; an open_clip JSON next to the weights can."""
    cfg = json.loads(json.dumps(VIT))
    cfg["vision_cfg"]["head_width"] = 32  # 4 heads instead of OpenAI's width // 64 = 2
    cfg["text_cfg"]["heads"] = 4
    ref4 = CLIP(**cfg).eval()
    ref4.load_state_dict(vit_ref.state_dict())
    path = tmp_path / "vit4.safetensors"
    save_file(_state(ref4), str(path))
    (tmp_path / "vit4.json").write_text(json.dumps(cfg))
    model = load_pretrained(path)
    assert (model.cfg.vision.heads, model.cfg.text.heads) == (4, 4)
    _assert_same(model, ref4, 32)
    with pytest.raises(AssertionError):  # the head count matters: OpenAI's default rule gives other outputs
        _assert_same(load_pretrained(path, config=VIT), ref4, 32)


def test_config_argument_in_the_hub_format_is_unwrapped(vit_ref, tmp_path):
    """config= as json.load(open("open_clip_config.json")) gives: the model config under "model_cfg", next to
    "preprocess_cfg". Read as a bare model config it built a GELU model with width // 64 heads."""
    cfg = json.loads(json.dumps(VIT))
    cfg["vision_cfg"]["head_width"], cfg["text_cfg"]["heads"] = 32, 4
    ref4 = CLIP(**cfg).eval()
    ref4.load_state_dict(vit_ref.state_dict())
    path = tmp_path / "vit4.safetensors"  # no config next to it
    save_file(_state(ref4), str(path))
    hub = {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (tmp_path / "hub.json").write_text(json.dumps(hub))
    for config in (cfg, hub, tmp_path / "hub.json"):
        model = load_pretrained(path, config=config)
        assert (model.cfg.quick_gelu, model.cfg.vision.heads, model.cfg.text.heads) == (True, 4, 4), config
        _assert_same(model, ref4, 32)
    from declip_ds.models.pretrained import load_for_eval

    em = load_for_eval(path, config=hub)
    assert em.model.cfg.vision.heads == 4 and em.normalize == ((0.5,) * 3, (0.5,) * 3)
    # a top-level key the hub format does not know is ignored, as open_clip ignores it
    assert load_pretrained(path, config={**hub, "extra": 1}).cfg.vision.heads == 4
    for bad, match in (({"model_cfg": {**cfg, "visual_cfg": {}}}, r"unknown keys \['model_cfg.visual_cfg'\]"),
                       ({"preprocess_cfg": hub["preprocess_cfg"]}, r"unknown keys \['preprocess_cfg'\]"),
                       ({"vision": {"width": 128}}, r"unknown keys \['vision'\]"),
                       ({}, "no model-config keys"), ({"model_cfg": None}, "model_cfg must be a mapping")):
        with pytest.raises(ValueError, match=match + ".*open_clip_config.json"
                           if "mapping" not in match else match):
            load_pretrained(path, config=bad)


def test_open_clip_gelu_model_loads_with_gelu_from_its_config(vit_ref, tmp_path, caplog):
    """Most open_clip models use nn.GELU (quick_gelu absent from their config = false): with the config next to
    the weights, or passed, the towers are built with GELU and match; without one the loader assumes QuickGELU,
    says so with a warning, and its outputs differ."""
    gelu_cfg = {k: v for k, v in VIT.items() if k != "quick_gelu"}  # as open_clip's own configs write it
    ref = CLIP(**gelu_cfg).eval()
    ref.load_state_dict(vit_ref.state_dict())
    assert type(ref.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    hub = tmp_path / "hub"  # the HF-hub / local-dir layout
    hub.mkdir()
    save_file(_state(ref), str(hub / "open_clip_model.safetensors"))
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": gelu_cfg, "preprocess_cfg": {}}))
    for model in (load_pretrained(hub / "open_clip_model.safetensors"),
                  load_pretrained(tmp_path / "hub" / "open_clip_model.safetensors", config={"quick_gelu": False})):
        assert model.cfg.quick_gelu is False
        _assert_same(model, ref, 32)
    bare = tmp_path / "bare.safetensors"
    save_file(_state(ref), str(bare))
    with caplog.at_level(logging.WARNING, logger="declip_ds.models.pretrained"):
        guessed = load_pretrained(bare)
    assert guessed.cfg.quick_gelu and "assuming OpenAI's QuickGELU" in caplog.text and "open_clip_config.json" in caplog.text
    with pytest.raises(AssertionError):
        _assert_same(guessed, ref, 32)


def test_hub_snapshot_folder_loads_its_open_clip_weights(vit_ref, tmp_path):
    """HF hub snapshots (laion/CLIP-*, timm/*.openai) hold HF transformers / timm weights as model.safetensors next to
    open_clip_model.safetensors: the folder's model.safetensors was taken for ours, then not recognised."""
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(_state(vit_ref), str(hub / "open_clip_model.safetensors"))
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": VIT, "preprocess_cfg": {}}))
    save_file({"logit_scale": torch.tensor(4.6), "text_model.embeddings.token_embedding.weight": torch.zeros(4, 4),
               "vision_model.embeddings.class_embedding": torch.zeros(4)}, str(hub / "model.safetensors"))
    assert _detect(hub) == "open_clip"
    _assert_same(load_pretrained(hub), vit_ref, 32)
    from declip_ds.models.pretrained import load_for_eval

    assert load_for_eval(hub).weights == hub
    with pytest.raises(FileNotFoundError, match="neither a config.yaml beside it nor 'model.\\*' keys"):
        load_pretrained(hub, format="ours")
    # a folder whose model.safetensors carries our model. prefix is still ours, config.yaml beside it or not
    tag = _our_tag(tmp_path / "run", _tiny_ours())
    (tag / "config.yaml").rename(tmp_path / "run" / "config.yaml")
    assert _detect(tag) == "ours"


def test_export_of_a_gelu_model_round_trips_through_open_clip(tmp_path):
    tag = _our_tag(tmp_path / "run", _tiny_ours(quick_gelu=False))
    ours = load_pretrained(tmp_path / "run")
    assert ours.cfg.quick_gelu is False and type(ours.text.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    out = tmp_path / "export"
    assert export_main(["--to", "open_clip", str(tag), str(out)]) == 0
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["quick_gelu"] is False
    ref = open_clip.create_model("local-dir:" + str(out)).eval()
    _assert_same(ours, ref, 32)
    _assert_same(load_pretrained(out), ref, 32)
    with pytest.raises(ExportError, match="quick_gelu=false"):
        export(ours, tmp_path / "openai", target="openai")


def test_open_clip_rn50_matches(rn50_ref, tmp_path):
    path = tmp_path / "rn50.safetensors"
    save_file(_state(rn50_ref), str(path))
    model = load_pretrained(path)
    assert (model.cfg.vision.name, model.cfg.vision.image_size, model.cfg.embed_dim) == ("resnet50_clip", 64, 64)
    _assert_same(model, rn50_ref, 64)


def test_clip_paper_probe_features_are_the_penultimate_layer(vit_ref, rn50_ref, tmp_path):
    """The clip-paper probe's "pooled" features of a loaded OpenAI-layout model are what the CLIP paper
    probes: for a ViT the CLS after ln_post, before visual.proj (open_clip's output with proj=None); for the
    ResNet the attention pool's output, which is its embedding."""
    import copy

    from declip_ds.eval import linear_probe as lp

    for ref, size in ((vit_ref, 32), (rn50_ref, 64)):
        path = tmp_path / f"m{size}.safetensors"
        save_file(_state(ref), str(path))
        model = load_pretrained(path)
        images, _ = _inputs(size)
        loader = [(images, torch.tensor([0, 1]))]
        ours, _ = lp.extract_features(model, loader, normalize=False, features="pooled")
        with torch.no_grad():
            if size == 32:
                headless = copy.deepcopy(ref.visual)
                headless.proj = None
                want = headless(images)
                assert want.shape == (2, 128)  # the width, not embed_dim 32
            else:
                want = ref.encode_image(images)  # (2, 64): attnpool output, no separate projection
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-4)


def test_full_size_layouts_map_onto_named_towers():
    """ViT-B/32, ViT-B/16 and RN50 at full size, shapes only (meta device: no memory, no compute)."""
    cases = {"ViT-B-32-quickgelu": "vit_base_patch32_clip_224", "ViT-B-16-quickgelu": "vit_base_patch16_clip_224",
             "RN50-quickgelu": "resnet50_clip", "ViT-B-32": "vit_base_patch32_clip_224"}
    for name, tower in cases.items():
        oc = open_clip.get_model_config(name)
        with torch.device("meta"):
            ref = CLIP(**oc)
        state = dict(ref.state_dict(), logit_scale=torch.tensor(4.6))  # the one value read, not just shaped
        cfg, ours, _ = _openai_to_ours(state, oc, "open_clip")
        assert cfg.quick_gelu == name.endswith("quickgelu"), name
        assert cfg.vision.name == tower, name
        assert (cfg.text.width, cfg.text.heads, cfg.text.layers, cfg.embed_dim) == (
            512, 8, 12, 1024 if "RN50" in name else 512), name
        with torch.device("meta"):
            model = build_model(cfg)
            expected = model.state_dict()
        assert sorted(ours) == sorted(expected), name
        acts = {type(m).__name__ for m in model.modules() if type(m).__name__ in ("GELU", "QuickGELU")}
        assert acts == {"QuickGELU" if cfg.quick_gelu else "GELU"}, name
        assert all(ours[k].shape == expected[k].shape for k in expected), name


# ----------------------------------------------------------------------------- DeCLIP release layout


@pytest.mark.parametrize("text_prefix", ["encode_text.", "text_encoder."])
def test_declip_release_vit_matches_with_standard_tokenizer(vit_ref, tmp_path, caplog, text_prefix):
    path = _save_declip(tmp_path / "declip_vit.pth.tar", _declip_state(vit_ref, text_prefix))
    with caplog.at_level(logging.INFO, logger="declip_ds.models.pretrained"):
        model = load_pretrained(path)
    assert "detected format 'declip'" in caplog.text
    assert "projector" in caplog.text and "mask-token row" in caplog.text
    assert model.cfg.text.proj_bias and not model.cfg.text.mask_token
    assert model.text.token_embedding.weight.shape[0] == 49408
    assert model.cfg.token_dim == 16
    torch.testing.assert_close(model.image_mapping.weight, _declip_state(vit_ref)["module.image_mapping.weight"])
    _assert_same(model, vit_ref, 32)  # Tokenizer() ids: SOT/EOT land on the right rows
    _assert_same(load_pretrained(path, format="declip"), vit_ref, 32)
    # a release that also holds averaged weights: the raw ones load, and the log says so and how to get the others
    both = tmp_path / "with_ema.pth.tar"
    torch.save({"model": _declip_state(vit_ref, text_prefix), "ema": {"module.logit_scale": torch.tensor([1.0])}}, both)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="declip_ds.models.pretrained"):
        _assert_same(load_pretrained(both), vit_ref, 32)
    assert "also holds averaged weights under ['ema']; loading 'model'" in caplog.text
    # the temperature as the reference's forward treats it: clamp [3, 6]; exp capped at 100 except in its SLIP
    state = _declip_state(vit_ref, text_prefix)
    state["module.logit_scale"] = torch.tensor([4.8])  # exp = 121.5
    model = load_pretrained(_save_declip(tmp_path / "scale.pth.tar", state))
    assert model.cfg.logit_scale_bounds == [3.0, 6.0]
    want = 100.0 if text_prefix == "encode_text." else math.exp(4.8)
    assert float(model.scale()) == pytest.approx(want, rel=1e-6)


def test_declip_release_square_text_projection_with_a_bias(tmp_path):
    """METHODS.md §9 with the real model's square text projection (width = embed_dim, so a missing transpose
    would fit the shapes) and a non-zero bias: the text embedding is OpenAI's x @ P plus the bias; the (1,)
    logit_scale becomes the model's scale."""
    cfg = json.loads(json.dumps(VIT))
    cfg["embed_dim"] = cfg["text_cfg"]["width"] = 128
    torch.manual_seed(1)
    ref = _randomize(CLIP(**cfg), 7)
    state = _declip_state(ref)
    bias = torch.randn(128, generator=torch.Generator().manual_seed(8))
    state["module.encode_text.text_projection.bias"] = bias
    state["module.logit_scale"] = torch.tensor([4.2])
    model = load_pretrained(_save_declip(tmp_path / "square.pth.tar", state))
    assert model.cfg.embed_dim == 128 and model.cfg.text.proj_bias
    images, tokens = _inputs(32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), ref.encode_text(tokens) + bias, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.scale(), torch.tensor(4.2).exp().clamp(max=100.0))


def test_filip_family_releases_are_evaluated_as_the_reference_does(vit_ref, tmp_path):
    """A DeCLIP-repo release with FILIP's token heads: FILIP (no SimSiam heads) by token scoring over all
    positions with the per-class norm, DeFILIP by its global embeddings; a plain DeCLIP release carries no
    method settings (global, the default)."""
    from declip_ds.eval.zero_shot import token_settings
    from declip_ds.models.pretrained import load_for_eval

    full = _declip_state(vit_ref)
    filip = {k: v for k, v in full.items() if k.split(".")[1] not in ("projector", "predictor", "text_label_predictor")}
    plain = {k: v for k, v in full.items() if k.split(".")[1] not in ("image_mapping", "text_mapping")}
    ems = {name: load_for_eval(_save_declip(tmp_path / f"{name}.pth.tar", state))
           for name, state in (("filip", filip), ("defilip", full), ("declip", plain))}
    assert (ems["filip"].method.name, ems["filip"].method.zero_shot_scoring) == ("filip", "token")
    assert (ems["defilip"].method.name, ems["defilip"].method.zero_shot_scoring) == ("defilip", "global")
    for name in ("filip", "defilip"):
        assert token_settings(ems[name].method) == {"mask_padding": False, "token_renorm": "class"}
    assert ems["declip"].method is None and ems["declip"].model.cfg.token_dim == 0
    # retrieval, linear probes and exports use the global embeddings, which a FILIP release never trained
    assert [ems[n].warn_if_global_untrained("retrieval") for n in ("filip", "defilip", "declip")] == [True, False, False]


def test_declip_release_rn50_without_bn_counters(rn50_ref, tmp_path):
    path = _save_declip(tmp_path / "declip_rn50.pth.tar", _declip_state(rn50_ref, rn=True))
    model = load_pretrained(path)
    assert model.cfg.vision.name == "resnet50_clip" and model.cfg.token_dim == 16
    _assert_same(model, rn50_ref, 64)


# ----------------------------------------------------------------------------- detection and refusals


# ----------------------------------------------------------------------------- official SLIP checkpoints


class _SlipRef(nn.Module):
    """The official SLIP model's computation (its models.py CLIP): a timm ImageNet ViT, CLS out, times
    image_projection; the text tower is OpenAI's (here the open_clip reference's, QuickGELU)."""

    def __init__(self, text_ref, width=128, layers=2, heads=2, patch=8, size=32, seed=7):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(seed)
        self.visual = VisionTransformer(img_size=size, patch_size=patch, embed_dim=width, depth=layers,
                                        num_heads=heads, num_classes=0)
        embed = text_ref.text_projection.shape[1]
        self.image_projection = nn.Parameter(width ** -0.5 * torch.randn(width, embed))
        self.image_mlp = nn.Sequential(nn.Linear(width, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
        _randomize(self, seed)
        self.text_ref = text_ref

    def encode_image(self, images):
        return self.visual(images) @ self.image_projection

    def encode_text(self, tokens):
        return self.text_ref.encode_text(tokens)

    def slip_state(self) -> dict[str, torch.Tensor]:
        """SLIP's model.state_dict() under DDP: visual.*, image_projection, image_mlp.*, OpenAI text names."""
        sd = {k: v for k, v in _state(self).items() if not k.startswith("text_ref.")}
        sd.update({k: v for k, v in _state(self.text_ref).items() if not k.startswith("visual.")})
        return {"module." + k: v for k, v in sd.items()}


def _save_slip(path: Path, state: dict, **args) -> Path:
    import argparse

    torch.save({"epoch": 25, "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
                "scaler": {"scale": 65536.0}, "best_acc1": 42.8,
                "args": argparse.Namespace(**{"ssl_mlp_dim": 4096, "ssl_emb_dim": 256, "betas": (0.9, 0.98), **args})},
               path)
    return path


@pytest.fixture(scope="module")
def slip_ref(vit_ref):
    return _SlipRef(vit_ref).eval()


def test_official_slip_checkpoint_matches_the_reference(slip_ref, tmp_path, caplog):
    """SLIP's checkpoint_best.pt (its args Namespace included, nothing else unpickled): a timm ViT tower
    (no ln_pre, nn.GELU, eps 1e-6) + image_projection and the QuickGELU text tower give SLIP's embeddings;
    the SimCLR head is dropped; zero-shot preprocessing is SLIP's Resize(224) + CenterCrop(224), ImageNet
    mean/std, bilinear."""
    from declip_ds.models.pretrained import load_for_eval

    path = _save_slip(tmp_path / "checkpoint_best.pt", slip_ref.slip_state(), model="SLIP_TINY")
    assert _detect(path) == "slip"
    with caplog.at_level(logging.INFO, logger="declip_ds.models.pretrained"):
        model = load_pretrained(path)
    assert model.cfg.vision.name == "vit_plain" and model.cfg.vision.heads == 2 and model.cfg.quick_gelu
    assert model.visual.trunk.blocks[0].mlp.act.__class__ is nn.GELU and model.visual.ln_post.eps == 1e-6
    assert "SLIP_TINY" in caplog.text and "image_mlp (9 tensors)" in caplog.text
    _assert_same(model, slip_ref, 32)
    assert model.logit_scale.item() == pytest.approx(slip_ref.text_ref.logit_scale.item())
    em = load_for_eval(path)
    assert _preprocess(em) == ("slip", "imagenet", "bilinear", 1.0)
    from declip_ds.data.transforms import NORMALIZE

    assert _resize_crop(em) == (32, "bilinear", (32, 32), NORMALIZE["imagenet"][0])
    assert load_pretrained(path, format="slip").cfg == model.cfg
    with pytest.raises(CheckpointFormatError, match="looks like 'slip'"):
        load_pretrained(path, format="openai")
    with pytest.raises(ValueError, match="Leave config out"):
        load_pretrained(path, config={"quick_gelu": False})
    evil = _save_slip(tmp_path / "evil.pt", slip_ref.slip_state(), model="SLIP_TINY", trap=_Evil())
    with pytest.raises(CheckpointFormatError, match="Refusing to load"):
        load_pretrained(evil)  # the Namespace is allowed, what it holds is not
    assert EXECUTED == []
    towers = {k: v for k, v in slip_ref.slip_state().items() if k.startswith(("module.visual.", "module.image_"))}
    _save_slip(tmp_path / "image_only.pt", towers, model="SLIP_TINY")
    with pytest.raises(CheckpointFormatError, match="no text tower"):
        load_pretrained(tmp_path / "image_only.pt")


def test_slip_tower_shapes_and_heads_come_from_args_model(caplog):
    """SLIP's ViT-S is MoCo v3's (12 heads of 32), not timm's vit_small (6 of 64): args.model decides; without
    it the shapes pick SLIP's tower (warned); a contradiction is an error."""
    from declip_ds.models.pretrained import _slip_vision

    def vit(width, layers):
        st = {f"visual.blocks.{i}.norm1.weight": torch.empty(width, device="meta") for i in range(layers)}
        st.update({"visual.cls_token": torch.empty(1, 1, width, device="meta"),
                   "visual.pos_embed": torch.empty(1, 197, width, device="meta"),
                   "visual.patch_embed.proj.weight": torch.empty(width, 3, 16, 16, device="meta"),
                   "visual.blocks.0.mlp.fc1.weight": torch.empty(4 * width, width, device="meta"),
                   "image_projection": torch.empty(width, 512, device="meta")})
        return st

    cfg, embed = _slip_vision(vit(384, 12), "SLIP_VITS16")
    assert (cfg.name, cfg.image_size, embed) == ("vit_small_mocov3_patch16_224", 224, 512)
    assert _slip_vision(vit(768, 12), "CLIP_VITB16")[0].name == "vit_base_patch16_224"
    assert _slip_vision(vit(1024, 24), "SLIP_VITL16")[0].name == "vit_large_patch16_224"
    with caplog.at_level(logging.WARNING, logger="declip_ds.models.pretrained"):
        assert _slip_vision(vit(384, 12), None)[0].name == "vit_small_mocov3_patch16_224"
    assert "does not record args.model" in caplog.text and "12 attention heads" in caplog.text
    with pytest.raises(CheckpointFormatError, match="args.model='SLIP_VITB16' names vit_base_patch16_224.*width 384"):
        _slip_vision(vit(384, 12), "SLIP_VITB16")
    from declip_ds.models.vision import build_vision_tower

    tower = build_vision_tower(cfg, 512)
    assert tower.trunk.blocks[0].attn.num_heads == 12 and tower.trunk.embed_dim == 384 and len(tower.trunk.blocks) == 12


def test_plain_vit_tower_is_timms_imagenet_vit():
    """vit_base_patch16_224 (the official SLIP tower) is timm's model of that name: its weights load into our
    trunk (norm -> ln_post) and the pooled output is timm's, bit for bit."""
    import timm

    from declip_ds.models.vision import build_vision_tower

    ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    _randomize(ref, 9)
    tower = build_vision_tower(VisionConfig(name="vit_base_patch16_224", image_size=32), 512).eval()
    sd = {("ln_post." + k[5:]) if k.startswith("norm.") else "trunk." + k: v for k, v in ref.state_dict().items()}
    tower.load_state_dict({**sd, "proj": tower.proj.detach()}, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(tower(x)["pooled"], ref(x))


def test_auto_detection_picks_each_format(vit_ref, tmp_path):
    sd = _state(vit_ref)
    save_file(sd, str(tmp_path / "a.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "b.pt", _use_new_zipfile_serialization=False)  # legacy: no mmap
    _save_declip(tmp_path / "c.pth", _declip_state(vit_ref))
    tag = _our_tag(tmp_path / "run", _tiny_ours())
    assert _detect(tmp_path / "a.safetensors") == "openai"
    assert _detect(tmp_path / "b.pt") == "open_clip"
    _assert_same(load_pretrained(tmp_path / "b.pt"), vit_ref, 32)
    assert _detect(tmp_path / "c.pth") == "declip"
    assert _detect(tag) == _detect(tmp_path / "run") == _detect(tag / "model.safetensors") == "ours"
    with pytest.raises(CheckpointFormatError, match="looks like 'openai'"):
        load_pretrained(tmp_path / "a.safetensors", format="declip")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(CheckpointFormatError, match="Could not recognise.*foo.weight"):
        load_pretrained(tmp_path / "d.safetensors")


def test_open_clip_timm_tower_and_siglip_models_are_refused_plainly(tmp_path):
    """open_clip's timm image towers (SigLIP / SigLIP2, ConvNeXt, EVA) are named visual.trunk.*, as ours are: they were
    taken for a declip_ds state dict ("load the step_XXXXXXXX directory"), and format='open_clip' sent the user back to
    format='auto'. Both now say what the model is; a DualEncoder state dict next to its config.yaml still points to
    the tag dir."""
    from open_clip.model import CustomTextCLIP

    text = dict(context_length=CTX, vocab_size=49408, width=64, heads=1, layers=1)
    timm = dict(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False, image_size=32)
    siglip_cfg = dict(embed_dim=192, init_logit_bias=-10.0, vision_cfg=dict(timm, timm_pool="map", timm_proj="none"),
                      text_cfg=dict(text, no_causal_mask=True, proj_bias=True, pool_type="last"))
    hub = tmp_path / "siglip"  # the hub / local-dir layout, as timm/ViT-*-SigLIP repos hold it
    hub.mkdir()
    save_file(_state(CustomTextCLIP(**siglip_cfg)), str(hub / "open_clip_model.safetensors"))
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": siglip_cfg, "preprocess_cfg": {}}))
    convnext_like = tmp_path / "timm_clip.safetensors"  # a timm tower without SigLIP's bias, no config next to it
    save_file(_state(CLIP(embed_dim=32, vision_cfg=dict(timm, timm_proj="linear"), text_cfg=text)), str(convnext_like))
    for path, why in ((hub, r"\(a logit_bias tensor.*init_logit_bias=-10.0.*timm_model_name='vit_tiny_patch16_224'"),
                      (convnext_like, r"\(a timm image tower under visual.trunk.\*;")):
        for fmt in ("auto", "open_clip", "openai"):
            with pytest.raises(CheckpointFormatError, match=r"^open_clip timm-tower / SigLIP model: not supported "
                                                            + why) as e:
                load_pretrained(path, format=fmt)
            assert "format='auto'" not in str(e.value) and "looks like" not in str(e.value)

    tag = _our_tag(tmp_path / "run", _tiny_ours())  # our DualEncoder's names without the model. prefix, in a tag
    bare = {k[len("model."):]: v for k, v in load_file(str(tag / "model.safetensors")).items()}
    save_file(bare, str(tag / "dual_encoder.safetensors"))
    for fmt in ("auto", "open_clip"):
        with pytest.raises(CheckpointFormatError, match="holds declip_ds DualEncoder names.*load the step_XXXXXXXX"):
            load_pretrained(tag / "dual_encoder.safetensors", format=fmt)


def test_shape_mismatch_lists_the_keys(vit_ref, tmp_path):
    sd = _state(vit_ref)
    sd["text_projection"] = torch.zeros(128, 48)  # embed dim 48, but the image tower says 32
    sd["ln_final.weight"] = torch.ones(64)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointFormatError) as e:
        load_pretrained(tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "shape mismatches (2)" in msg
    assert "text_projection -> text.text_projection: checkpoint (128, 48) vs model (128, 32)" in msg
    assert "ln_final.weight -> text.ln_final.weight: checkpoint (64,) vs model (128,)" in msg


EXECUTED = []


def _payload():
    EXECUTED.append("pwned")


class _Evil:
    def __reduce__(self):
        return (_payload, ())


def test_malicious_pickle_is_refused(vit_ref, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _state(vit_ref), "trap": _Evil()}, path)
    with pytest.raises(CheckpointFormatError, match="Refusing to load .*arbitrary code"):
        load_pretrained(path)
    with pytest.raises(CheckpointFormatError, match="Refusing to load"):
        load_pretrained(path, format="openai")
    assert EXECUTED == []  # the payload never ran
    whole = tmp_path / "module.pt"  # a whole model saved with torch.save(model): the class is named
    torch.save(nn.Linear(2, 2), whole)
    with pytest.raises(CheckpointFormatError, match=r"pickles a torch.nn.modules.linear.Linear object, .*"
                                                    r"torch.save\(model\)\?.*model.state_dict\(\)") as e:
        load_pretrained(whole)
    assert "\x1b" not in str(e.value)
    import pickle

    for name, write in (("random.bin", lambda f: f.write_bytes(bytes(range(256)) * 16)),
                        ("plain.pkl", lambda f: f.write_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=4)))):
        with pytest.raises(CheckpointFormatError, match=f"'{tmp_path / name}' is not a PyTorch checkpoint"):
            write(tmp_path / name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about the pickle protocol first
                load_pretrained(tmp_path / name)

    scripted = tmp_path / "jit.pt"  # OpenAI's own .pt releases are TorchScript archives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in recent torch
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(scripted))
    with pytest.raises(CheckpointFormatError, match="TorchScript"):
        load_pretrained(scripted)


# ----------------------------------------------------------------------------- export


def _tiny_ours(**kw) -> ModelConfig:
    vision = VisionConfig(name="vit_custom", image_size=32, patch_size=8, width=64, layers=2, heads=4)
    text = TextConfig(context_length=CTX, width=64, layers=2, heads=2, **kw.pop("text", {}))
    return ModelConfig(vision=kw.pop("vision", vision), text=text, embed_dim=24, **kw)


def _our_tag(run: Path, cfg: ModelConfig, seed: int = 5, eval_cfg: dict | None = None) -> Path:
    """A declip_ds checkpoint tag dir (model.safetensors with the DualEncoder under model., config.yaml);
    ``eval_cfg`` sets fields of the run's eval section."""
    torch.manual_seed(seed)
    model = _randomize(build_model(cfg), seed)
    tag = run / "checkpoints" / "step_00000010"
    tag.mkdir(parents=True)
    save_file({"model." + k: v.contiguous() for k, v in model.state_dict().items()}, str(tag / "model.safetensors"))
    exp = Experiment(model=cfg)
    exp.data.normalize = "imagenet"
    for k, v in (eval_cfg or {}).items():
        setattr(exp.eval, k, v)
    save_config(exp, tag / "config.yaml")
    (tag / "COMPLETE").write_text("")
    return tag


def test_export_to_open_clip_gives_the_same_outputs(tmp_path):
    """A DeCLIP-style model (mask-token vocabulary, text projection with bias, FILIP heads) -> open_clip."""
    tag = _our_tag(tmp_path / "run", _tiny_ours(text=dict(mask_token=True, proj_bias=True), token_dim=8))
    ours = load_pretrained(tmp_path / "run")
    ours_tokens = Tokenizer(CTX, mask_token=True)(CAPTIONS)

    out = tmp_path / "export"
    assert export_main(["--to", "open_clip", str(tag), str(out)]) == 0
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["proj_bias"] is True
    assert config["preprocess_cfg"]["mean"] == [0.485, 0.456, 0.406]
    ref = open_clip.create_model("local-dir:" + str(out)).eval()  # config + weights from the folder, strict
    _assert_same(ours, ref, 32, ours_tokens)
    _assert_same(load_pretrained(out), ref, 32)  # and back in, through the JSON next to the weights

    # the X.safetensors + X.json variant, loaded the plain way
    files = export(ours, tmp_path / "declip_ds_interop_test.safetensors")
    open_clip.add_model_config(files[1])
    ref2 = open_clip.create_model("declip_ds_interop_test", pretrained=None).eval()
    ref2.load_state_dict(load_file(str(files[0])))
    _assert_same(ours, ref2, 32, ours_tokens)


def test_export_writes_the_capped_logit_scale(tmp_path, caplog):
    """A model with model.logit_scale_exp_cap (the DeCLIP recipes: exp capped at 100) uses min(exp(s), cap); open_clip
    uses exp(s) as it is, so a parameter above ln(cap) is exported as ln(cap), and the log says so."""
    model = build_model(_tiny_ours(logit_scale_exp_cap=100.0, logit_scale_bounds=[3.0, 6.0]))
    for s, want in ((5.5, math.log(100.0)), (4.0, 4.0)):
        with torch.no_grad():
            model.logit_scale.fill_(s)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="declip_ds.export"):
            export(model, tmp_path / f"e{s}")
        ref = open_clip.create_model("local-dir:" + str(tmp_path / f"e{s}"))
        assert float(ref.logit_scale) == pytest.approx(want, abs=1e-6)
        assert float(ref.logit_scale.exp()) == pytest.approx(float(model.scale()), rel=1e-6)
        assert ("above ln(model.logit_scale_exp_cap) = ln(100)" in caplog.text) == (s > 4.7)
    assert float(model.logit_scale) == 4.0  # the model itself is not changed


def test_export_inverts_the_import(vit_ref, rn50_ref, tmp_path):
    for name, ref in (("vit", vit_ref), ("rn50", rn50_ref)):
        sd = _state(ref)
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        back = to_openai_state_dict(load_pretrained(tmp_path / f"{name}.safetensors"))
        assert sorted(back) == sorted(sd), name
        for k in sd:
            assert torch.equal(back[k], sd[k]), k


def test_name_tables_map_every_visual_key_one_to_one_both_ways(vit_ref, rn50_ref):
    """The one table per tower family that import and export both read: every OpenAI visual key of a real
    layout has one name of ours, no two share it, and reading the table backwards gives the key again."""
    for ref, table in ((vit_ref, VIT_NAMES), (rn50_ref, RN_NAMES)):
        keys = [k[len("visual."):] for k in ref.state_dict() if k.startswith("visual.")]
        ours = [rename_visual(k, table, to_ours=True) for k in keys]
        assert None not in ours and len(set(ours)) == len(keys)
        assert [rename_visual(k, table, to_ours=False) for k in ours] == keys
    assert rename_visual("layer5.0.conv1.weight", RN_NAMES, to_ours=True) is None  # ResNets have 4 layers
    assert rename_visual("trunk.stages.4.0.conv1_1x1.conv.weight", RN_NAMES, to_ours=False) is None


def test_export_to_openai_is_read_by_openais_loader(tmp_path):
    """--to openai writes a plain torch state dict next to the safetensors, which OpenAI's clip.load (here open_clip's
    copy of it, load_openai_model, and its build_model) rebuilds as the same model: heads = width // 64."""
    from open_clip.model import build_model_from_openai_state_dict
    from open_clip.openai import load_openai_model

    cfg = ModelConfig(vision=VisionConfig(name="vit_custom", image_size=32, patch_size=8, width=128, layers=2, heads=2),
                      text=TextConfig(context_length=CTX, width=64, layers=2, heads=1), embed_dim=24)
    tag = _our_tag(tmp_path / "run", cfg)
    ours = load_pretrained(tag)
    assert export_main(["--to", "openai", str(tag), str(tmp_path / "out")]) == 0
    ref = load_openai_model(str(tmp_path / "out" / "openai_model.pt"), precision="fp32", device="cpu").eval()
    images, tokens = _inputs(32)
    with torch.no_grad():  # OpenAI's loader rounds the weights through fp16 (wrong heads: differences ~0.4)
        torch.testing.assert_close(ref.encode_image(images), ours.encode_image(images), atol=3e-3, rtol=0)
        torch.testing.assert_close(ref.encode_text(tokens), ours.encode_text(tokens), atol=3e-3, rtol=0)
    files = export(ours, tmp_path / "x.safetensors", target="openai")
    assert files[-1] == tmp_path / "x.pt"
    ref = build_model_from_openai_state_dict(torch.load(files[-1]), cast_dtype=torch.float32).float().eval()
    ref.load_state_dict(torch.load(files[-1]))  # the weights again in fp32, for an exact comparison
    assert (ref.visual.transformer.resblocks[0].attn.num_heads, ref.transformer.resblocks[0].attn.num_heads) == (2, 1)
    _assert_same(ours, ref, 32)
    assert not (tmp_path / "y.pt").exists() and export(ours, tmp_path / "y.safetensors")[-1].suffix == ".json"

    # head widths other than 64 would come back with other heads: refused (the default TextConfig is 128 wide, 4 heads)
    with pytest.raises(ExportError, match=r"vision width 64 with 4 heads \(head width 16\) and text width 64 with 2 "
                                          r"heads \(head width 32\).*width // 64.*--to open_clip"):
        export(build_model(_tiny_ours()), tmp_path / "c", target="openai")
    with pytest.raises(ExportError, match=r"^--to openai: text width 128 with 4 heads \(head width 32\);"):
        export(build_model(dataclasses.replace(cfg, text=TextConfig(context_length=CTX))), tmp_path / "d",
               target="openai")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_export_refuses_what_open_clip_cannot_hold(tmp_path):
    tiny_rn = build_model(_tiny_ours(vision=VisionConfig(name="resnet_tiny_clip", image_size=32, width=16)))
    with pytest.raises(ExportError, match="model.vision.name='resnet_tiny_clip'"):
        export(tiny_rn, tmp_path / "a")
    with pytest.raises(ExportError, match="model.text.proj_bias"):
        export(build_model(_tiny_ours(text=dict(proj_bias=True))), tmp_path / "b", target="openai")
    plain = VisionConfig(name="vit_plain", image_size=32, patch_size=8, width=64, layers=1, heads=2)  # SLIP's kind
    with pytest.raises(ExportError, match="model.vision.name='vit_plain'.*no ln_pre"):
        export(build_model(_tiny_ours(vision=plain)), tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_export_cli_reports_errors(tmp_path):
    tag = _our_tag(tmp_path / "run", _tiny_ours(vision=VisionConfig(name="resnet_tiny_clip", image_size=32, width=16)))
    r = subprocess.run([sys.executable, "-m", "declip_ds.export", "--to", "open_clip", str(tag), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2
    assert "error: model.vision.name='resnet_tiny_clip'" in r.stderr


# ----------------------------------------------------------------------------- evaluation preprocessing

VIT224 = dict(VIT, vision_cfg=dict(image_size=224, layers=1, width=64, patch_size=32))


@pytest.fixture(scope="module")
def vit224_ref():
    torch.manual_seed(0)
    return _randomize(CLIP(**VIT224), 6)


def _preprocess(em):
    return em.format, em.normalize, em.interpolation, em.crop_ratio


def _resize_crop(em):
    """(Resize size, its interpolation, CenterCrop size, Normalize mean) of an EvalModel's transform."""
    t = em.transform().transforms
    return t[0].size, t[0].interpolation.value, t[1].size, tuple(t[-1].mean)


def test_config_hash_of_a_checkpoint_is_the_one_its_run_recorded(tmp_path):
    """The eval record's config_hash of one of our checkpoints is the hash of the config.yaml it was saved
    with, as the trainer recorded it, also when this toolkit has keys that config lacks (an older run)."""
    import yaml

    from declip_ds.config import config_hash, from_dict, to_dict
    from declip_ds.models.pretrained import load_for_eval

    tag = _our_tag(tmp_path / "run", _tiny_ours())
    exp = from_dict(yaml.safe_load((tag / "config.yaml").read_text()))  # resolved, as the trainer's
    save_config(exp, tag / "config.yaml")  # as the trainer saves it
    assert load_for_eval(tag).config_hash == config_hash(exp)  # what the trainer recorded
    saved = yaml.safe_load((tag / "config.yaml").read_text())
    # a run saved before train.checkpoint_integrity existed
    del saved["train"]["checkpoint_integrity"]
    (tag / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    em = load_for_eval(tag)
    assert em.config_hash == config_hash(saved)
    assert em.config_hash != config_hash(to_dict(from_dict(saved)))  # re-parsed, the new defaults appear


def test_eval_preprocessing_per_checkpoint_format(vit224_ref, tmp_path):
    """OpenAI / open_clip: Resize(224) bicubic + CenterCrop(224), OpenAI mean/std; DeCLIP releases:
    Resize(256) bilinear + CenterCrop(224), ImageNet mean/std (METHODS.md §7, §9); ours: the run's config;
    explicit arguments win."""
    from declip_ds.data.transforms import NORMALIZE
    from declip_ds.models.pretrained import load_for_eval

    sd = _state(vit224_ref)
    save_file(sd, str(tmp_path / "clip.safetensors"))
    torch.save({"epoch": 1, "state_dict": sd}, tmp_path / "epoch_1.pt")
    _save_declip(tmp_path / "declip.pth.tar", _declip_state(vit224_ref))
    openai_mean, imagenet_mean = NORMALIZE["openai"][0], NORMALIZE["imagenet"][0]
    for name, fmt in (("clip.safetensors", "openai"), ("epoch_1.pt", "open_clip")):
        em = load_for_eval(tmp_path / name)
        assert _preprocess(em) == (fmt, "openai", "bicubic", 1.0)
        assert _resize_crop(em) == (224, "bicubic", (224, 224), openai_mean)
        assert em.preprocess()["resize"] == 224 and "format's default" in em.preprocess()["source"]
    em = load_for_eval(tmp_path / "declip.pth.tar")
    assert _preprocess(em) == ("declip", "imagenet", "bilinear", 224 / 256)
    assert _resize_crop(em) == (256, "bilinear", (224, 224), imagenet_mean)

    tag = _our_tag(tmp_path / "run", _tiny_ours(), eval_cfg=dict(interpolation="bilinear", crop_ratio=0.5))
    em = load_for_eval(tag)
    assert _preprocess(em) == ("ours", "imagenet", "bilinear", 0.5)
    assert _resize_crop(em) == (64, "bilinear", (32, 32), imagenet_mean)

    em = load_for_eval(tmp_path / "declip.pth.tar", normalize="openai", interpolation="bicubic", crop_ratio=1.0)
    assert _preprocess(em) == ("declip", "openai", "bicubic", 1.0)
    assert _resize_crop(em) == (224, "bicubic", (224, 224), openai_mean)
    assert em.preprocess()["source"].startswith("arguments")
    assert _preprocess(load_for_eval(tag, crop_ratio=1)) == ("ours", "imagenet", "bilinear", 1.0)
    with pytest.raises(ValueError, match="interpolation='nearest' is not allowed. Choose one of: bicubic, bilinear"):
        load_for_eval(tag, interpolation="nearest")
    with pytest.raises(ValueError, match="crop_ratio: must be a number with 0 < crop_ratio <= 1"):
        load_for_eval(tag, crop_ratio=0)


def test_export_round_trip_keeps_the_eval_preprocessing(tmp_path):
    from torchvision.transforms import InterpolationMode

    from declip_ds.models.pretrained import load_for_eval

    tag = _our_tag(tmp_path / "run", _tiny_ours(), eval_cfg=dict(interpolation="bilinear", crop_ratio=0.875))
    out = tmp_path / "export"
    assert export_main(["--to", "open_clip", str(tag), str(out)]) == 0
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                        "interpolation": "bilinear", "resize_mode": "shortest"}
    assert config["declip_ds"] == {"crop_ratio": 0.875}
    # open_clip reads preprocess_cfg and ignores our top-level key
    _, _, val = open_clip.create_model_and_transforms("local-dir:" + str(out))
    assert val.transforms[0].interpolation == InterpolationMode.BILINEAR
    assert tuple(val.transforms[-1].mean) == (0.485, 0.456, 0.406)
    assert _preprocess(load_for_eval(out)) == ("open_clip", "imagenet", "bilinear", 0.875)
    assert _preprocess(load_for_eval(out, normalize="openai", interpolation="bicubic", crop_ratio=1.0)) == (
        "open_clip", "openai", "bicubic", 1.0)  # explicit arguments win over the sidecar

    # X.safetensors: X.json stays open_clip's bare model config; X.preprocess.json holds the preprocessing
    files = export(load_for_eval(tag), tmp_path / "x.safetensors")
    assert [f.name for f in files] == ["x.safetensors", "x.json", "x.preprocess.json"]
    assert set(json.loads(files[1].read_text())) == {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
    assert _preprocess(load_for_eval(files[0]))[1:] == ("imagenet", "bilinear", 0.875)

    # crop ratio 1 (open_clip's own protocol): no declip_ds key, resize_mode "shortest" reads back as 1.0
    assert export_main(["--to", "open_clip", "--normalize", "openai", "--interpolation", "bicubic",
                        "--crop-ratio", "1", str(tag), str(tmp_path / "e1")]) == 0
    assert "declip_ds" not in json.loads((tmp_path / "e1" / "open_clip_config.json").read_text())
    assert _preprocess(load_for_eval(tmp_path / "e1"))[1:] == ("openai", "bicubic", 1.0)

    # any other mean/std goes through as a (mean, std) pair
    config["preprocess_cfg"].update(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    (out / "open_clip_config.json").write_text(json.dumps(config))
    em = load_for_eval(out)
    assert em.normalize == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert tuple(em.transform().transforms[-1].std) == (0.25, 0.25, 0.25)
    assert em.preprocess()["normalize"] == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def test_eval_scripts_run_on_a_released_checkpoint(vit_ref, tmp_path, capsys):
    """eval_zeroshot.py / linear probe / retrieval take an open_clip file directly: architecture from the
    weights, CLIP's preprocessing, and the same zero-shot numbers as open_clip computes itself."""
    import numpy as np
    from PIL import Image

    import eval_zeroshot
    from declip_ds.data.transforms import eval_transform
    from declip_ds.eval import linear_probe as lp
    from declip_ds.eval import retrieval
    from declip_ds.eval.report import load_record
    from declip_ds.models.pretrained import load_for_eval

    path = tmp_path / "open_clip_model.safetensors"
    save_file(_state(vit_ref), str(path))
    rng = np.random.default_rng(0)
    classes = ["cat", "dog", "bird"]
    for split in ("train", "test"):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for j in range(4):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{j}.png")
    em = load_for_eval(path)
    assert (em.format, em.normalize, em.image_size, em.context_length) == ("openai", "openai", 32, CTX)  # same layout
    assert em.name.startswith("openai/") and len(em.config_hash) == 12

    assert eval_zeroshot.main(["--checkpoint", str(path), "--data", str(tmp_path / "test"), "--templates", "simple",
                               "--out", str(tmp_path / "zs.json")]) == 0
    rec = load_record(tmp_path / "zs.json")
    assert rec["model"] == em.name and rec["config_hash"] == em.config_hash
    assert {k: rec["preprocess"][k] for k in ("resize", "crop", "interpolation", "normalize")} == {
        "resize": 32, "crop": 32, "interpolation": "bicubic", "normalize": "openai"}
    # the same number straight from open_clip: mean of normalised prompt embeddings, CLIP's transform
    # (Resize(32) bicubic + CenterCrop(32), OpenAI mean/std)
    tf = eval_transform(32, normalize="openai", crop_ratio=1.0, interpolation="bicubic")
    tok = Tokenizer(CTX)
    with torch.no_grad():
        W = torch.nn.functional.normalize(vit_ref.encode_text(tok([f"a photo of a {c}." for c in classes])), dim=-1)
        correct = n = 0
        for y, c in enumerate(classes):
            for f in sorted((tmp_path / "test" / c).iterdir()):
                x = tf(Image.open(f).convert("RGB"))[None]
                pred = int((torch.nn.functional.normalize(vit_ref.encode_image(x), dim=-1) @ W.T).argmax())
                correct, n = correct + (pred == y), n + 1
    (metrics,) = rec["metrics"].values()
    assert metrics["n"] == n == 12
    assert metrics["acc1"] == pytest.approx(correct / n)

    assert lp.main(["--checkpoint", str(path), "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
                    "--cache-dir", str(tmp_path / "cache"), "--max-iter", "20", "--out", str(tmp_path / "lp.json")]) == 0
    rec = load_record(tmp_path / "lp.json")
    assert rec["model"] == em.name and (rec["protocol"], rec["normalize"], rec["val_fraction"]) == (lp.PROTOCOL, True, 0.2)
    assert lp.main(["--checkpoint", str(path), "--train", str(tmp_path / "train"), "--val", str(tmp_path / "test"),
                    "--test", str(tmp_path / "test"), "--protocol", "clip-paper", "--cache-dir", str(tmp_path / "cache"),
                    "--max-iter", "20", "--out", str(tmp_path / "lp_paper.json")]) == 0
    rec = load_record(tmp_path / "lp_paper.json")
    (m,) = rec["metrics"].values()
    assert (rec["protocol"], rec["normalize"], rec["val"], rec["val_fraction"]) == ("clip-paper", False,
                                                                                   str(tmp_path / "test"), None)
    assert (m["features"], m["val_split"], m["n_train"], m["n_val"]) == ("pooled", "official", 12, 12)
    assert m["C"] in lp.C_GRID and m["weight_decay"] == pytest.approx(1 / (m["C"] * 24))
    (tmp_path / "caps.tsv").write_text("test/cat/0.png\ta cat\tcat photo\ntest/dog/0.png\ta dog\n")
    assert retrieval.main(["--checkpoint", str(path), "--data", str(tmp_path / "caps.tsv"),
                           "--out", str(tmp_path / "ret.json")]) == 0
    assert load_record(tmp_path / "ret.json")["metrics"]
    # a file that is no checkpoint: exit 2 with the reason
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    assert eval_zeroshot.main(["--checkpoint", str(tmp_path / "junk.safetensors"), "--data", str(tmp_path / "test"),
                               "--templates", "simple"]) == 2
    assert "junk.safetensors" in capsys.readouterr().err


def test_a_run_with_only_an_incomplete_tag_says_so(tmp_path):
    tag = _our_tag(tmp_path / "run", _tiny_ours())
    (tag / "COMPLETE").unlink()  # the save was interrupted
    with pytest.raises(FileNotFoundError, match=r"\['step_00000010'\] have no COMPLETE marker.*pass its model.safetensors"):
        load_pretrained(tmp_path / "run")
    assert load_pretrained(tag / "model.safetensors") is not None  # named explicitly, it loads
