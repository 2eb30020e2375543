"""declip_ds.models: tower shapes, EOT pooling, causality, checkpointing, freezing, temperature."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from declip_ds.config import ModelConfig, TextConfig, VisionConfig
from declip_ds.models import DualEncoder, build_model

SOT, EOT = 49406, 49407  # OpenAI vocabulary


def tiny_cfg(**kw) -> ModelConfig:
    text = TextConfig(context_length=16, width=64, layers=2, heads=4, **kw.pop("text", {}))
    vision = VisionConfig(**kw.pop("vision", {}))  # vit_tiny: 64 px, patch 8, width 128, 4 layers, 4 heads
    return ModelConfig(vision=vision, text=text, embed_dim=48, **kw)


def captions(b: int, length: int, eot_at: int | list[int], eot: int = EOT) -> torch.Tensor:
    """(b, length) ids: SOT, random words, EOT at eot_at, zero padding after."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(b, length, dtype=torch.long)
    positions = [eot_at] * b if isinstance(eot_at, int) else eot_at
    for i, p in enumerate(positions):
        tokens[i, 0] = SOT
        tokens[i, 1:p] = torch.randint(1, 40000, (p - 1,), generator=g)
        tokens[i, p] = eot
    return tokens


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(tiny_cfg(token_dim=32)).eval()


def test_vit_tiny_encode_shapes_and_dtypes(tiny):
    images, tokens = torch.randn(3, 3, 64, 64), captions(3, 16, [5, 9, 15])
    with torch.no_grad():
        outs = {
            "image": (tiny.encode_image(images), (3, 48)),
            "image_norm": (tiny.encode_image(images, normalize=True), (3, 48)),
            "text": (tiny.encode_text(tokens), (3, 48)),
            "text_norm": (tiny.encode_text(tokens, normalize=True), (3, 48)),
            "image_tokens": (tiny.encode_image_tokens(images), (3, 64, 32)),  # (64 / 8)^2 patches, no CLS
            "text_tokens": (tiny.encode_text_tokens(tokens), (3, 16, 32)),
        }
    for name, (x, shape) in outs.items():
        assert x.shape == shape, name
        assert x.dtype == torch.float32, name
    for name in ("image_norm", "text_norm"):
        torch.testing.assert_close(outs[name][0].norm(dim=-1), torch.ones(3))


def test_vit_tiny_feature_dicts(tiny):
    images, tokens = torch.randn(2, 3, 64, 64), captions(2, 16, 7)
    with torch.no_grad():
        img, txt = tiny.image_features(images), tiny.text_features(tokens)
        assert img["pooled"].shape == (2, 128) and img["tokens"].shape == (2, 64, 128)
        assert img["embedding"].shape == (2, 48)
        assert txt["pooled"].shape == (2, 64) and txt["tokens"].shape == (2, 16, 64)
        assert txt["embedding"].shape == (2, 48)
        torch.testing.assert_close(img["embedding"], tiny.encode_image(images))
        torch.testing.assert_close(txt["embedding"], tiny.encode_text(tokens))
        # ViT: pooled = ln_post(CLS); tokens are the patch tokens BEFORE ln_post
        trunk = tiny.visual.trunk
        x = trunk.blocks(trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(images))))  # (2, 65, 128)
        torch.testing.assert_close(img["tokens"], x[:, 1:])
        torch.testing.assert_close(img["pooled"], tiny.visual.ln_post(x[:, 0]))
    assert tiny.visual.pooled_dim == 128 and tiny.visual.token_dim == 128
    assert type(trunk.blocks[0].mlp.act).__name__ == "QuickGELU"
    assert trunk.patch_embed.proj.bias is None  # OpenAI conv1 has no bias


def test_public_attributes_and_names(tiny):
    assert isinstance(tiny, DualEncoder)
    assert (tiny.embed_dim, tiny.vocab_size, tiny.context_length, tiny.image_size) == (48, 49408, 16, 64)
    sd = tiny.state_dict()
    for key in (
        "text.token_embedding.weight",
        "text.positional_embedding",
        "text.transformer.resblocks.0.ln_1.weight",
        "text.transformer.resblocks.0.attn.in_proj_weight",
        "text.transformer.resblocks.0.attn.in_proj_bias",
        "text.transformer.resblocks.0.attn.out_proj.weight",
        "text.transformer.resblocks.1.mlp.c_fc.weight",
        "text.transformer.resblocks.1.mlp.c_proj.bias",
        "text.transformer.resblocks.1.ln_2.bias",
        "text.ln_final.weight",
        "text.text_projection",
        "visual.proj",
        "visual.ln_post.weight",
        "visual.trunk.patch_embed.proj.weight",
        "image_mapping.weight",
        "text_mapping.bias",
        "logit_scale",
    ):
        assert key in sd, key
    assert sd["text.positional_embedding"].shape == (16, 64)
    assert sd["text.text_projection"].shape == (64, 48)  # OpenAI (width, embed_dim), used as x @ P
    assert sd["visual.proj"].shape == (128, 48)
    assert sd["logit_scale"].shape == (1,)
    assert sd["image_mapping.weight"].shape == (32, 128) and sd["text_mapping.weight"].shape == (32, 64)


def test_attention_matches_multihead_attention_with_causal_mask(tiny):
    """Our SDPA forward computes what nn.MultiheadAttention does with OpenAI's causal mask."""
    attn = tiny.text.transformer.resblocks[0].attn
    x = torch.randn(2, 16, 64)
    mask = torch.full((16, 16), float("-inf")).triu(1)  # OpenAI build_attention_mask
    with torch.no_grad():
        ref = nn.MultiheadAttention.forward(attn, x, x, x, attn_mask=mask, need_weights=False)[0]
        torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_eot_pooling_and_causality(tiny):
    tokens = captions(2, 16, 6)
    changed = tokens.clone()
    changed[:, 7:] = torch.randint(1, 40000, (2, 9))  # after EOT (position 6); ids stay below EOT
    with torch.no_grad():
        a, b = tiny.text_features(tokens), tiny.text_features(changed)
    torch.testing.assert_close(a["pooled"], a["tokens"][:, 6])  # pooled = the EOT position
    torch.testing.assert_close(a["pooled"], b["pooled"])
    torch.testing.assert_close(a["tokens"][:, :7], b["tokens"][:, :7])  # causal: positions <= 6 unchanged
    assert not torch.allclose(a["tokens"][:, 7:], b["tokens"][:, 7:])
    # changing a token before EOT changes the pooled output
    changed[:, 3] = (tokens[:, 3] + 1) % 40000
    with torch.no_grad():
        assert not torch.allclose(tiny.text_features(changed)["pooled"], a["pooled"])


def test_mask_token_vocabulary():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(text={"mask_token": True}))
    assert model.vocab_size == 49409 and model.text.token_embedding.num_embeddings == 49409
    tokens = captions(2, 16, 5, eot=49408)  # DeCLIP: mask 49406, sot 49407, eot 49408
    tokens[:, 0], tokens[:, 2] = 49407, 49406
    with torch.no_grad():
        out = model.text_features(tokens)
    torch.testing.assert_close(out["pooled"], out["tokens"][:, 5])


def _loss(model, images, tokens):
    img, txt = model.image_features(images), model.text_features(tokens)
    loss = img["embedding"].square().mean() + txt["embedding"].square().mean()
    if model.image_mapping is not None:
        loss = loss + model.map_image_tokens(img["tokens"]).square().mean()
        loss = loss + model.map_text_tokens(txt["tokens"]).square().mean()
    return loss + model.scale()


def test_grad_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(token_dim=16))
    images, tokens = torch.randn(2, 3, 64, 64), captions(2, 16, [4, 11])
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        loss = _loss(model, images, tokens)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert model.visual.trunk.grad_checkpointing and model.text.transformer.grad_checkpointing
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, msg=name)
    assert build_model(tiny_cfg(grad_checkpointing=True)).text.transformer.grad_checkpointing


def test_gradients_reach_every_parameter_except_frozen():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(token_dim=16, vision={"freeze_patch_embed": True}))
    conv = model.visual.trunk.patch_embed.proj.weight
    assert not conv.requires_grad
    _loss(model, torch.randn(2, 3, 64, 64), captions(2, 16, [4, 11])).backward()
    assert conv.grad is None
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing


def test_freeze_patch_embed_is_vit_only():
    with pytest.raises(ValueError, match="only defined for ViTs"):
        build_model(tiny_cfg(vision={"name": "resnet50_clip", "image_size": 64, "freeze_patch_embed": True}))


def test_scale_cap_and_clamp():
    model = build_model(tiny_cfg(logit_scale_exp_cap=100.0, logit_scale_bounds=[3.0, 6.0]))
    assert model.logit_scale.shape == (1,) and isinstance(model.logit_scale, nn.Parameter)
    assert model.scale().shape == ()
    torch.testing.assert_close(model.scale(), torch.tensor(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # e^5 = 148 > cap
    capped = model.scale()
    assert capped.item() == pytest.approx(100.0)
    # the reference caps the value only (logit_scale.data = clamp(..., max=100)): the parameter still gets
    # the uncapped exp's gradient, so it can come back under the cap
    capped.mul(2.0).backward()
    assert model.logit_scale.grad.item() == pytest.approx(2.0 * math.exp(5.0), rel=1e-6)
    ref = model.logit_scale.detach().clone().requires_grad_(True)
    ref_scale = ref.exp()
    ref_scale.data = torch.clamp(ref_scale.data, max=100)  # the DeCLIP reference's lines
    ref_scale.mul(2.0).sum().backward()
    torch.testing.assert_close(model.logit_scale.grad, ref.grad)
    model.logit_scale.grad = None
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 5.0
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 6.0 and model.logit_scale.requires_grad
    with torch.no_grad():
        model.logit_scale.fill_(1.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 3.0
    s = model.scale()  # differentiable below the cap
    s.backward()
    assert model.logit_scale.grad.item() == pytest.approx(math.exp(3.0))
    uncapped = build_model(tiny_cfg(logit_scale_init=5.0))
    assert uncapped.scale().item() == pytest.approx(math.exp(5.0), rel=1e-6)


def test_text_projection_linear_with_bias():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(text={"proj_bias": True}))
    proj = model.text.text_projection
    assert isinstance(proj, nn.Linear) and proj.bias is not None
    assert proj.weight.shape == (48, 64)  # DeCLIP reference: nn.Linear(512, E)
    sd = model.state_dict()
    assert "text.text_projection.weight" in sd and "text.text_projection.bias" in sd
    tokens = captions(2, 16, 5)
    with torch.no_grad():
        out = model.text_features(tokens)
        torch.testing.assert_close(out["embedding"], out["pooled"] @ proj.weight.T + proj.bias)
    assert model.encode_text(tokens).shape == (2, 48)
    # the reference re-initialises the weight only; the bias keeps nn.Linear's U(-1/sqrt(64), 1/sqrt(64))
    assert proj.bias.abs().max() <= 64**-0.5 and proj.bias.std() > 0.3 * 64**-0.5


def test_no_token_heads_error_and_unknown_tower():
    model = build_model(tiny_cfg())
    assert model.image_mapping is None
    with pytest.raises(RuntimeError, match="model.token_dim"):
        model.encode_image_tokens(torch.randn(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="model.token_dim"):
        model.encode_text_tokens(captions(1, 16, 3))
    with pytest.raises(ValueError, match="Unknown vision tower 'vit_huge'.*resnet50_clip.*vit_tiny"):
        build_model(tiny_cfg(vision={"name": "vit_huge"}))
    with pytest.raises(ValueError, match="not divisible by 8"):
        build_model(tiny_cfg(vision={"image_size": 60}))
    with pytest.raises(ValueError, match="context_length is 16"):
        model.encode_text(torch.zeros(1, 17, dtype=torch.long))


def test_vit_custom_reads_config_fields():
    model = build_model(
        tiny_cfg(
            vision={"name": "vit_custom", "image_size": 32, "patch_size": 16, "width": 96, "layers": 1, "heads": 3}
        )
    )
    assert len(model.visual.trunk.blocks) == 1
    with torch.no_grad():
        out = model.image_features(torch.randn(1, 3, 32, 32))
    assert out["tokens"].shape == (1, 4, 96) and out["pooled"].shape == (1, 96)


# ---------------------------------------------------------------------------- full-size towers (batch 1)

BIG = {
    # name: (embed_dim, tokens, token width, pooled dim)
    "vit_base_patch32_clip_224": (512, 49, 768, 768),
    "vit_base_patch16_clip_224": (512, 196, 768, 768),
    "resnet50_clip": (1024, 49, 2048, 1024),
}


@pytest.fixture(scope="module")
def big_models():
    torch.manual_seed(0)
    models = {}
    for name, (embed_dim, *_rest) in BIG.items():
        vision = VisionConfig(name=name, image_size=224)
        cfg = ModelConfig(vision=vision, text=TextConfig(), embed_dim=embed_dim, token_dim=8)
        models[name] = build_model(cfg).eval()
    return models


@pytest.mark.parametrize("name", list(BIG))
def test_full_size_tower_shapes(big_models, name):
    embed_dim, n_tokens, token_width, pooled_dim = BIG[name]
    model = big_models[name]
    assert model.visual.pooled_dim == pooled_dim and model.visual.token_dim == token_width
    with torch.no_grad():
        out = model.image_features(torch.randn(1, 3, 224, 224))
        assert out["tokens"].shape == (1, n_tokens, token_width)
        assert out["pooled"].shape == (1, pooled_dim)
        assert out["embedding"].shape == (1, embed_dim)
        assert model.map_image_tokens(out["tokens"]).shape == (1, n_tokens, 8)
    if name == "resnet50_clip":
        assert "visual.proj" not in model.state_dict()  # attnpool c_proj maps 2048 -> embed_dim directly
        assert model.visual.trunk.head.proj.out_features == embed_dim
        assert model.visual.trunk.head.num_heads == 32  # OpenAI RN50: width * 32 // 64
        torch.testing.assert_close(out["pooled"], out["embedding"])
    else:
        assert model.state_dict()["visual.proj"].shape == (768, embed_dim)
        assert model.visual.trunk.pos_embed.shape == (1, n_tokens + 1, 768)
        assert type(model.visual.trunk.blocks[0].mlp.act).__name__ == "QuickGELU"


def test_resnet_tiny_clip_shapes_and_gradients():
    cfg = ModelConfig(vision=VisionConfig(name="resnet_tiny_clip", image_size=64, width=32), embed_dim=24,
                      text=TextConfig(context_length=16, width=32, layers=1, heads=2), token_dim=8)
    model = build_model(cfg)
    out = model.image_features(torch.randn(2, 3, 64, 64))
    assert out["pooled"].shape == (2, 24) and out["embedding"].shape == (2, 24)
    assert out["tokens"].shape == (2, 16, 128)  # total stride 16 -> 4x4 map, 4 * width channels
    assert model.encode_image_tokens(torch.randn(2, 3, 64, 64)).shape == (2, 16, 8)
    model.encode_image(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.visual.parameters())
    with pytest.raises(ValueError, match="divisible by 16"):
        build_model(ModelConfig(vision=VisionConfig(name="resnet_tiny_clip", image_size=40)))


def test_resnet_batchnorms_run_in_fp32_under_bf16_parameters():
    """DeepSpeed's bf16 casts parameters but not buffers; BN must still run (in fp32)."""
    cfg = ModelConfig(vision=VisionConfig(name="resnet_tiny_clip", image_size=32, width=16), embed_dim=8,
                      text=TextConfig(context_length=8, width=16, layers=1, heads=2))
    model = build_model(cfg)
    ref = model.encode_image(torch.randn(2, 3, 32, 32))  # fp32 works as before
    for p in model.parameters():
        p.data = p.data.bfloat16()
    out = model.encode_image(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all() and out.shape == ref.shape
    bn = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert bn.running_mean.dtype == torch.float32


def _std(t: torch.Tensor) -> float:
    return float(t.detach().float().std())


def test_reference_init_of_the_vit_tower():
    """model.vision.init=reference (auto's choice for the CLIP ViTs) initialises as the DeCLIP reference's
    visual_transformer.py: CLS and proj N(0, w^-1/2), positions N(0, 0.01), qkv N(0, w^-1/2), attention out and
    fc2 N(0, w^-1/2 (2L)^-1/2), fc1 N(0, (2w)^-1/2), attention biases 0, MLP biases nn.Linear's U(+-fan_in^-1/2),
    LayerNorms 1/0, the patch conv torch's default; timm keeps timm's 0.02; the plain (SLIP) ViTs default to timm."""
    vision = {"name": "vit_custom", "width": 256, "layers": 6, "heads": 4, "patch_size": 8, "image_size": 64}
    torch.manual_seed(0)
    ref = build_model(tiny_cfg(vision=vision)).visual
    assert build_model(tiny_cfg(vision={**vision, "init": "reference"})).visual.trunk.cls_token.std() > 0.03
    w, L = 256, 6
    attn_std, fc_std, proj_std = w**-0.5, (2 * w) ** -0.5, w**-0.5 * (2 * L) ** -0.5
    t = ref.trunk
    assert _std(t.cls_token) == pytest.approx(w**-0.5, rel=0.15)
    assert _std(t.pos_embed) == pytest.approx(0.01, rel=0.05) and _std(ref.proj) == pytest.approx(w**-0.5, rel=0.05)
    conv = t.patch_embed.proj.weight
    assert _std(conv) == pytest.approx((3 * conv[0].numel()) ** -0.5, rel=0.05)  # torch's kaiming-uniform default
    for blk in t.blocks:
        assert _std(blk.attn.qkv.weight) == pytest.approx(attn_std, rel=0.05)
        assert _std(blk.attn.proj.weight) == pytest.approx(proj_std, rel=0.05)
        assert _std(blk.mlp.fc1.weight) == pytest.approx(fc_std, rel=0.05)
        assert _std(blk.mlp.fc2.weight) == pytest.approx(proj_std, rel=0.05)
        assert not blk.attn.qkv.bias.any() and not blk.attn.proj.bias.any()
        for fc in (blk.mlp.fc1, blk.mlp.fc2):
            bound = fc.in_features**-0.5
            assert fc.bias.abs().max() <= bound and _std(fc.bias) == pytest.approx(bound / 3**0.5, rel=0.15)
        assert torch.equal(blk.norm1.weight, torch.ones(w)) and not blk.norm2.bias.any()

    timm_tower = build_model(tiny_cfg(vision={**vision, "init": "timm"})).visual
    assert _std(timm_tower.trunk.blocks[0].attn.proj.weight) == pytest.approx(0.02, rel=0.05)
    assert not timm_tower.trunk.blocks[0].mlp.fc1.bias.any() and _std(timm_tower.trunk.cls_token) < 1e-4
    plain = build_model(tiny_cfg(vision={**vision, "name": "vit_plain"})).visual  # auto -> timm for SLIP's ViTs
    assert _std(plain.trunk.blocks[0].attn.proj.weight) == pytest.approx(0.02, rel=0.05)
    with pytest.raises(Exception, match=r"model.vision.init: 'openai' is not allowed. Choose one of: auto, reference, timm"):
        from declip_ds.config import from_dict

        from_dict({"model": {"vision": {"init": "openai"}}})


def test_reference_init_of_the_resnet_tower():
    """init=reference for the ModifiedResNets as the reference's modified_resnet.py: convs torch's default,
    BatchNorms 1/0 with each bottleneck's last one 0, attention-pool q/k/v/out N(0, in^-1/2) with nn.Linear's
    default biases, positional table N(0, in^-1/2)."""
    torch.manual_seed(0)
    trunk = build_model(tiny_cfg(vision={"name": "resnet_tiny_clip", "width": 64})).visual.trunk
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(_std(c.weight) == pytest.approx((3 * c.weight[0].numel()) ** -0.5, rel=0.2) for c in convs)
    bns = dict((n, m) for n, m in trunk.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    last = [n for n in bns if n.endswith("conv3_1x1.bn")]
    assert last and all(not bns[n].weight.any() for n in last)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
               for n, m in bns.items() if n not in last)
    head, d = trunk.head, trunk.head.q.in_features
    for lin in (head.q, head.k, head.v, head.proj):
        assert _std(lin.weight) == pytest.approx(d**-0.5, rel=0.05) and 0 < lin.bias.abs().max() <= d**-0.5
    assert _std(head.pos_embed) == pytest.approx(d**-0.5, rel=0.1)
