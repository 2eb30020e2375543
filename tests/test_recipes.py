"""Every recipe in experiments/ loads and validates; the YFCC-15M ones say how to launch them and what
they should reach."""

from pathlib import Path

import pytest

from declip_ds.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads(path):
    exp = load_config(path)
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    if path.stem.endswith("_yfcc15m") and "_official_" in path.stem:  # a method's own repo: its own test
        assert exp.method.name == path.stem.split("_")[0]
        assert "deepspeed --hostfile hosts train.py" in header and "Expected" in header
    elif path.stem.endswith("_yfcc15m"):
        method, arch = path.stem.split("_")[0], path.stem.split("_", 1)[1].rsplit("_", 1)[0]
        assert exp.method.name == method
        assert ("vit_base_patch32" in exp.model.vision.name) == (arch == "vit_b32")
        assert "deepspeed --hostfile hosts train.py" in header and "4 nodes x 8 GPUs" in header
        assert "Expected" in header and exp.train.batch_size == 128 and exp.train.steps == 128001
        assert exp.model.logit_scale_bounds == [3.0, 6.0]
        # the DeCLIP repo's zero-shot protocol: Resize(256) + CenterCrop(224), bilinear (METHODS.md §7)
        assert (exp.eval.interpolation, exp.eval.crop_ratio) == ("bilinear", 0.875)
        assert "Resize(256) + CenterCrop(224)" in path.read_text()
    else:
        assert (exp.eval.interpolation, exp.eval.crop_ratio) == ("bicubic", 0.875)  # the demo keeps the default


def test_every_method_has_its_benchmark_recipes():
    names = {p.stem for p in RECIPES}
    for method in ("clip", "declip", "slip", "filip"):
        assert {f"{method}_vit_b32_yfcc15m", f"{method}_rn50_yfcc15m"} <= names
    assert "defilip_vit_b32_yfcc15m" in names


def _shared_reference_setup(exp, tower, embed):
    """METHODS.md §0 / §11: what every DeCLIP-repo YFCC-15M recipe shares."""
    import math

    m, t = exp.model, exp.train
    assert (m.vision.name, m.vision.image_size, m.embed_dim, m.vocab_size) == (tower, 224, embed, 49409)
    assert m.vision.freeze_patch_embed == tower.startswith("vit")  # conv1 frozen at its random init
    assert m.vision.init == "reference"  # the reference's (OpenAI's) tower init, not timm's
    assert exp.data.jpeg_draft is False  # training JPEGs decoded in full, as the reference
    assert (m.text.width, m.text.layers, m.text.heads, m.text.context_length) == (512, 12, 8, 77)
    assert m.text.mask_token and m.text.proj_bias  # <|mask|> in the vocabulary; Linear text projection with bias
    assert m.logit_scale_bounds == [3.0, 6.0] and m.logit_scale_exp_cap == 100.0
    assert math.isclose(m.logit_scale_init, math.log(1 / 0.07))
    assert (t.warmup_steps, t.warmup_init_lr, t.min_lr, t.steps, t.batch_size, t.grad_accum) == (
        2500, 1e-4, 0.0, 128001, 128, 1)
    assert (t.betas, t.eps, t.grad_clip) == ([0.9, 0.98], 1e-8, 0.0)
    assert not t.no_decay_embeddings and t.decay_attention_in_proj_bias  # the reference's param_group_all
    assert exp.data.num_samples == 15388848 and exp.data.normalize == "imagenet"
    assert (exp.eval.templates, exp.eval.interpolation, exp.eval.crop_ratio) == ("imagenet80", "bilinear", 0.875)


@pytest.mark.parametrize("name,tower,embed", [("clip_vit_b32_yfcc15m", "vit_base_patch32_clip_224", 512),
                                              ("clip_rn50_yfcc15m", "resnet50_clip", 1024)])
def test_clip_recipes_have_the_reference_hyperparameters(name, tower, embed):
    """METHODS.md §1: one RandomResizedCrop(224, 0.5-1) view, weight 1, peak LR 1e-3, wd 0.1."""
    exp = load_config(RECIPES[0].parent / f"{name}.yaml")
    _shared_reference_setup(exp, tower, embed)
    assert exp.method.name == "clip" and exp.method.clip_weight == 1.0
    assert exp.data.rrc_scale == [0.5, 1.0]
    assert (exp.train.lr, exp.train.weight_decay) == (1e-3, 0.1)


@pytest.mark.parametrize("name,tower,embed", [("filip_vit_b32_yfcc15m", "vit_base_patch32_clip_224", 768),
                                              ("filip_rn50_yfcc15m", "resnet50_clip", 1024)])
def test_filip_recipes_have_the_reference_hyperparameters(name, tower, embed):
    """METHODS.md §4 (DeCLIP-repo FILIP): the dense loss alone (clip weight 0), top-16 tokens with padding
    kept, 256-d tokens, MLM-masked (15%) training text, view 1 of MoCo-v2, embed 768 / 1024, LR 5e-4, wd 0.5;
    zero-shot by token scoring with the per-class (Frobenius) renormalisation."""
    exp = load_config(RECIPES[0].parent / f"{name}.yaml")
    _shared_reference_setup(exp, tower, embed)
    c = exp.method
    assert c.name == "filip" and (c.filip_weight, c.clip_weight) == (1.0, 0.0)
    assert (c.topk, c.mask_padding, exp.model.token_dim) == (16, False, 256)
    assert (c.mlm_mask_text, c.mlm_prob, c.image_view) == (True, 0.15, "moco_v2")
    assert (c.zero_shot_scoring, c.zero_shot_token_renorm) == ("token", "class")
    assert (exp.train.lr, exp.train.weight_decay) == (5e-4, 0.5)


def test_defilip_recipe_has_the_reference_hyperparameters():
    """METHODS.md §5: DeCLIP's terms (MVS 0.4, SimSiam 0.2, MLM 0.2, NN 0.2) plus FILIP 0.2 with top-16 tokens,
    padding kept, 256-d tokens; ViT-B/32, embed 512, LR 1e-3, wd 0.1; zero-shot on the global embeddings."""
    exp = load_config(RECIPES[0].parent / "defilip_vit_b32_yfcc15m.yaml")
    _shared_reference_setup(exp, "vit_base_patch32_clip_224", 512)
    c = exp.method
    assert c.name == "defilip"
    assert (c.mvs_weight, c.simsiam_weight, c.mlm_weight, c.nn_weight, c.filip_weight) == (0.4, 0.2, 0.2, 0.2, 0.2)
    assert (c.mlm_prob, c.mlm_random_excludes_special, c.queue_size, c.eda) == (0.15, False, 65536, True)
    assert (c.projector_hidden_dim, c.projector_out_dim, c.predictor_hidden_dim) == (1024, 1024, 512)
    assert (c.topk, c.mask_padding, exp.model.token_dim) == (16, False, 256)
    assert c.contrastive_text == "masked"  # the token term and the contrastive terms see the masked caption
    assert c.view_scale == [0.2, 1.0] and c.zero_shot_scoring == "global"
    assert (exp.train.lr, exp.train.weight_decay) == (1e-3, 0.1)


def test_official_slip_recipe_has_the_slip_repos_hyperparameters():
    """METHODS.md §3 (official repo): timm ViT-B/16 + image_projection, OpenAI text tower and vocabulary,
    SimCLR views, CLIP features gathered without gradient, LR 3e-3, wd 0.1 with SLIP's exemptions, 25 epochs
    with 1 warmup epoch from 1e-6 and cosine to 1e-5 at a global batch of 4,096, logit scale in [0, ln 100],
    Resize(224) + CenterCrop(224) zero-shot."""
    import math

    import torch

    from declip_ds.registry import get_method
    from declip_ds.train.engine import param_groups

    path = next(p for p in RECIPES if p.stem == "slip_official_vit_b16_yfcc15m")
    exp = load_config(path)
    m, t, meth, d = exp.model, exp.train, exp.method, exp.data
    assert (m.vision.name, m.vision.image_size, m.vision.freeze_patch_embed) == ("vit_base_patch16_224", 224, False)
    assert m.vision.init == "timm"  # SLIP builds its ViT with timm.create_model
    assert exp.data.jpeg_draft is False
    assert (m.text.width, m.text.layers, m.text.heads, m.text.context_length, m.embed_dim) == (512, 12, 8, 77, 512)
    assert m.vocab_size == 49408 and not m.text.proj_bias and m.quick_gelu
    assert m.logit_scale_bounds[0] == 0.0 and math.isclose(m.logit_scale_bounds[1], math.log(100), abs_tol=1e-4)
    assert m.logit_scale_exp_cap == 0.0 and math.isclose(m.logit_scale_init, math.log(1 / 0.07))
    assert (meth.ssl_views, meth.ssl_feature, meth.clip_gather_grad) == ("simclr", "pooled", False)
    assert (meth.clip_weight, meth.ssl_scale, meth.ssl_temperature, meth.ssl_mlp_dim, meth.ssl_emb_dim) == (
        1.0, 1.0, 0.1, 4096, 256)
    assert d.rrc_scale == [0.5, 1.0] and d.normalize == "imagenet" and d.num_samples == 15388848
    ranks = 32  # "4 nodes x 8 GPUs"
    assert "4 nodes x 8 GPUs = 32 ranks" in path.read_text() and t.batch_size * t.grad_accum * ranks == 4096
    # SLIP's DataLoader drops the last partial batch: an epoch is N // 4096 steps, 25 of them in all
    assert t.steps == 25 * (d.num_samples // 4096) == 93925 and t.warmup_steps == d.num_samples // 4096
    assert (t.lr, t.warmup_init_lr, t.min_lr, t.weight_decay) == (3e-3, 1e-6, 1e-5, 0.1)
    assert (t.betas, t.eps, t.grad_clip) == ([0.9, 0.98], 1e-8, 0.0)
    assert (exp.eval.templates, exp.eval.interpolation, exp.eval.crop_ratio) == ("imagenet80", "bilinear", 1.0)
    # SLIP's weight-decay rule (main.py: p.ndim < 2 or 'bias' / 'ln' / 'bn' in the name -> no decay) picks the
    # same parameters as ours under this recipe
    with torch.device("meta"):
        method = get_method("slip")(exp)
    groups = param_groups(method, t.weight_decay, t.no_decay_embeddings, t.decay_attention_in_proj_bias)
    decayed = {id(p) for p in groups[0]["params"]}
    named = list(method.named_parameters())
    slip_rule = {n for n, p in named if p.ndim < 2 or any(s in n for s in ("bias", "ln", "bn"))}
    assert {n for n, p in named if id(p) not in decayed} == slip_rule
    assert "model.visual.trunk.cls_token" not in slip_rule and method.model.visual.trunk.blocks[0].attn.num_heads == 12
