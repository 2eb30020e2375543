"""SLIP: simclr_loss against an independent float64 reference, self-masking, 2 gloo ranks against one
process; the method's views, one forward/backward, where its gradients go; the benchmark recipes."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from declip_ds.config import ConfigError, from_dict, load_config
from declip_ds.losses import simclr_loss
from declip_ds.registry import get_method
from tests.distributed import run_ranks

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the loss


def reference_simclr_loss(z1, z2, tau):
    """NT-Xent written out sample by sample (float64): row i of view a against every b-view sample
    (positive: b-view i) and every a-view sample except a-view i itself; both directions averaged."""
    q1 = z1 / z1.norm(dim=1, keepdim=True)
    q2 = z2 / z2.norm(dim=1, keepdim=True)
    B = z1.shape[0]
    total = 0.0
    for qa, qb in ((q1, q2), (q2, q1)):
        for i in range(B):
            candidates = [qa[i] @ qb[j] / tau for j in range(B)]
            candidates += [qa[i] @ qa[j] / tau for j in range(B) if j != i]
            total = total + torch.logsumexp(torch.stack(candidates), 0) - qa[i] @ qb[i] / tau
    return total / (2 * B)


def views(B, D, seed=0, dtype=torch.float64):
    """Two unnormalised views whose rows are correlated, with norms far from 1."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, D, generator=g, dtype=dtype)
    z1 = 3.0 * (base + 0.5 * torch.randn(B, D, generator=g, dtype=dtype))
    z2 = 0.2 * (base + 0.5 * torch.randn(B, D, generator=g, dtype=dtype))
    return z1, z2


@pytest.mark.parametrize("B,D,tau", [(1, 4, 0.1), (5, 8, 0.1), (12, 6, 0.5)])
def test_matches_float64_reference_values_and_grads(B, D, tau):
    z1, z2 = views(B, D, seed=B)
    a = [t.clone().requires_grad_() for t in (z1, z2)]
    b = [t.clone().requires_grad_() for t in (z1, z2)]
    loss = simclr_loss(*a, tau)
    ref = reference_simclr_loss(*b, tau)
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, ref, rtol=1e-10, atol=1e-12)
    loss.backward()
    ref.backward()
    for x, y in zip(a, b):
        assert torch.allclose(x.grad, y.grad, rtol=1e-8, atol=1e-12)


def test_fp32_and_bf16_inputs_give_fp32_loss_close_to_reference():
    z1, z2 = views(9, 16, seed=1)
    ref = reference_simclr_loss(z1, z2, 0.1)
    loss32 = simclr_loss(z1.float(), z2.float(), 0.1)
    assert loss32.dtype == torch.float32 and torch.isclose(loss32.double(), ref, rtol=1e-5)
    z1b, z2b = z1.bfloat16().requires_grad_(), z2.bfloat16().requires_grad_()
    loss16 = simclr_loss(z1b, z2b, 0.1)
    assert loss16.dtype == torch.float32 and torch.isclose(loss16.double(), ref, rtol=5e-2)
    loss16.backward()
    assert z1b.grad.dtype == torch.bfloat16 and torch.isfinite(z1b.grad.float()).all()


def test_self_masking_hand_checked():
    # identical orthonormal views: the positive scores 1/tau, every other candidate 0. With the own
    # a-view copy excluded, each row has the positive plus 2(B-1) zeros: loss = log(e^10 + 2(B-1)) - 10.
    # Counting the copy as a negative would add another e^10 (loss >= log 2); as a positive, -log 2 off.
    B, tau = 4, 0.1
    z = torch.eye(B, 6, dtype=torch.float64)
    expected = math.log1p(2 * (B - 1) * math.exp(-1 / tau))  # = log(e^10 + 2(B-1)) - 10
    loss, acc = simclr_loss(z, z.clone(), tau, return_accuracy=True)
    assert torch.isfinite(loss) and math.isclose(float(loss), expected, rel_tol=1e-9)
    assert float(acc) == 1.0
    # one sample: the only candidate left is its positive, so the loss is exactly 0
    assert float(simclr_loss(z[:1], z[:1].clone(), tau)) == 0.0


def test_identical_random_views_give_finite_loss_and_gradients():
    # the masked self-similarity (-inf) must not turn into NaN in the loss or its gradient
    z = views(6, 8, seed=2)[0]
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = simclr_loss(z1, z2, 0.1)
    ref = reference_simclr_loss(z.clone(), z.clone(), 0.1)
    assert torch.isfinite(loss) and torch.isclose(loss, ref, rtol=1e-10)
    loss.backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    for dtype in (torch.float32, torch.bfloat16):  # and in the training dtypes
        w = z.to(dtype).requires_grad_()
        simclr_loss(w, w, 0.1).backward()
        assert torch.isfinite(w.grad.float()).all()


def test_accuracy_counts_both_directions():
    z1, z2 = views(8, 16, seed=3)
    _, acc = simclr_loss(z1, z2, 0.1, return_accuracy=True)
    q1, q2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    mask = torch.eye(8, dtype=torch.bool)
    hits = 0
    for qa, qb in ((q1, q2), (q2, q1)):
        logits = torch.cat([qa @ qb.t(), (qa @ qa.t()).masked_fill(mask, -math.inf)], dim=1)
        hits += int((logits.argmax(1) == torch.arange(8)).sum())
    assert math.isclose(float(acc), hits / 16)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same"):
        simclr_loss(torch.zeros(3, 4), torch.zeros(2, 4))


def _rank_fn(rank, world, z1, z2, tau):
    b = z1.shape[0] // world
    l1 = z1[rank * b : (rank + 1) * b].clone().requires_grad_()
    l2 = z2[rank * b : (rank + 1) * b].clone().requires_grad_()
    loss = simclr_loss(l1, l2, tau, group=dist.group.WORLD)
    loss.backward()
    return loss.detach(), l1.grad, l2.grad


@pytest.mark.dist
def test_two_ranks_equal_global_batch_loss_and_gradient():
    W, B, D, tau = 2, 8, 16, 0.1
    z1, z2 = views(B, D, seed=4, dtype=torch.float32)
    results = run_ranks(_rank_fn, world=W, args=(z1, z2, tau))
    g1, g2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref = simclr_loss(g1, g2, tau)
    ref.backward()
    assert torch.isclose(ref.double(), reference_simclr_loss(z1.double(), z2.double(), tau), rtol=1e-5)
    # DeepSpeed averages gradients over ranks: the mean of per-rank losses is the global loss and each
    # rank's gradient of its own rows is W times the global one
    assert torch.isclose(torch.stack([r[0] for r in results]).mean(), ref, atol=1e-6)
    b = B // W
    for rank, (_, grad1, grad2) in enumerate(results):
        assert torch.allclose(grad1, W * g1.grad[rank * b : (rank + 1) * b], atol=1e-6)
        assert torch.allclose(grad2, W * g2.grad[rank * b : (rank + 1) * b], atol=1e-6)


# ----------------------------------------------------------------------------- the method

TINY = {
    "model": {"vision": {"name": "vit_tiny", "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
              "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}, "embed_dim": 16},
    "train": {"batch_size": 6},
}
CAPTIONS = ["a small red circle on the left", "two blue squares and a yellow star", "crimson disk, top right",
            "a large green triangle in the middle", "a white heart", "an orange cross at the bottom"]


def tiny_slip(vision=None, **method):
    cfg = {**TINY, "method": {"name": "slip", "ssl_mlp_dim": 64, "ssl_emb_dim": 16, **method}}
    if vision is not None:
        cfg["model"] = {**TINY["model"], "vision": vision}
    return get_method("slip")(from_dict(cfg))


def make_batch(method, n=6):
    rng = np.random.default_rng(0)
    transform = method.sample_transform()
    samples = [transform(Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)), CAPTIONS[i % 6])
               for i in range(n)]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def _crop_and_flip(view):
    rrc = [t for t in view.transforms if isinstance(t, T.RandomResizedCrop)]
    flips = [t for t in view.transforms if isinstance(t, T.RandomHorizontalFlip)]
    return rrc[0].scale, bool(flips)


@pytest.mark.parametrize("ssl_views,ssl_scale", [("moco_v2", (0.2, 1.0)), ("simclr", (0.08, 1.0))])
def test_views(ssl_views, ssl_scale):
    method = tiny_slip(ssl_views=ssl_views)
    transform = method.sample_transform()
    assert list(transform.image_views) == ["image", "image_ssl1", "image_ssl2"]
    assert list(transform.text_views) == ["text"]
    assert _crop_and_flip(transform.image_views["image"]) == ((0.5, 1.0), False)  # data.rrc_scale, no flip
    for k in ("image_ssl1", "image_ssl2"):
        assert _crop_and_flip(transform.image_views[k]) == (ssl_scale, True)
    torch.manual_seed(0)
    batch = make_batch(method, n=2)
    for k in ("image", "image_ssl1", "image_ssl2"):
        assert batch[k].shape == (2, 3, 32, 32) and batch[k].dtype == torch.float32
    assert batch["text"].shape == (2, 16) and batch["text"].dtype == torch.long
    assert not torch.equal(batch["image_ssl1"], batch["image_ssl2"])  # two independent draws


def test_forward_backward_and_where_the_gradients_go():
    torch.manual_seed(0)
    method = tiny_slip()
    method.train()
    assert method.ssl_feature == "pooled" and method.predictor_sim.linear1.in_features == 32  # ViT width
    batch = make_batch(method)
    out = method(batch)
    assert set(out) == {"clip_loss", "ssl_loss", "ssl_acc", "logit_scale"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values()), out
    assert 0.0 <= float(out["ssl_acc"]) <= 1.0
    assert method.loss_weights() == {"clip_loss": 1.0, "ssl_loss": 1.0}

    # the SSL term alone trains predictor_sim and the image trunk, but not the projection or the text
    # tower: the head reads the pre-projection feature
    out["ssl_loss"].backward(retain_graph=True)
    grads = {n: p.grad for n, p in method.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
               for n, g in grads.items() if n.startswith("predictor_sim."))
    assert grads["model.visual.proj"] is None or grads["model.visual.proj"].abs().sum() == 0
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("model.visual.trunk."))
    assert all(g is None for n, g in grads.items() if n.startswith("model.text."))

    method.zero_grad(set_to_none=True)
    method.total_loss(out).backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, missing
    for prefix in ("predictor_sim.", "model.visual.", "model.text.", "model.logit_scale"):
        assert any(p.grad.abs().sum() > 0 for n, p in method.named_parameters() if n.startswith(prefix) and p.requires_grad)


def test_resnet_tower_reads_the_pooled_trunk_map_by_default():
    vision = {"name": "resnet_tiny_clip", "image_size": 32, "width": 32}
    method = tiny_slip(vision=vision)
    assert method.ssl_feature == "token_mean"
    assert method.predictor_sim.linear1.in_features == method.model.visual.token_dim
    pooled = tiny_slip(vision=vision, ssl_feature="pooled")
    assert pooled.predictor_sim.linear1.in_features == pooled.model.visual.pooled_dim
    torch.manual_seed(0)
    method.train()
    out = method(make_batch(method, n=4))
    method.total_loss(out).backward()
    assert torch.isfinite(out["ssl_loss"]) and method.predictor_sim.linear1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("key,value,match", [("ssl_views", "byol", "moco_v2, simclr"), ("ssl_temperature", 0.0, "> 0"),
                                             ("ssl_feature", "cls", "auto, pooled, token_mean"),
                                             ("ssl_scale", -1.0, ">= 0"), ("ssl_mlp_dim", 0, "> 0")])
def test_config_errors(key, value, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({**TINY, "method": {"name": "slip", key: value}})


def test_official_slip_clip_gather_without_grad():
    """method.clip_gather_grad=false takes the torch loss with gather_grad=False, whatever loss.impl auto picks;
    an explicit Triton choice is refused, as the fused kernel always sends the columns' gradients back."""
    method = tiny_slip(clip_gather_grad=False)
    assert method.contrastive.func.__name__ == "clip_loss" and method.contrastive.keywords == {"gather_grad": False}
    assert tiny_slip().contrastive.__name__ in ("clip_loss", "fused_clip_loss")
    with pytest.raises(ConfigError, match="method.clip_gather_grad=false .* loss.impl=auto or torch"):
        from_dict({**TINY, "method": {"name": "slip", "clip_gather_grad": False}, "loss": {"impl": "triton"}})


# ----------------------------------------------------------------------------- the recipes


@pytest.mark.parametrize("name", ["clip_vit_b32", "clip_rn50", "slip_vit_b32", "slip_rn50"])
def test_recipes_load(name):
    exp = load_config(ROOT / "experiments" / f"{name}_yfcc15m.yaml")
    m, t, d = exp.model, exp.train, exp.data
    method, arch = name.split("_", 1)
    assert exp.method.name == method
    assert m.vision.name == ("resnet50_clip" if arch == "rn50" else "vit_base_patch32_clip_224")
    assert m.vision.freeze_patch_embed == (arch != "rn50")
    assert m.embed_dim == (1024 if arch == "rn50" else 512)
    assert (m.text.width, m.text.layers, m.text.heads, m.text.context_length, m.text.proj_bias) == (512, 12, 8, 77, True)
    assert m.logit_scale_bounds == [3.0, 6.0]
    assert (t.betas, t.eps, t.batch_size, t.warmup_steps, t.warmup_init_lr, t.steps, t.min_lr) == (
        [0.9, 0.98], 1e-8, 128, 2500, 1e-4, 128001, 0.0)
    assert d.normalize == "imagenet" and d.rrc_scale == [0.5, 1.0] and d.num_samples == 15388848
    if method == "clip":
        assert (t.lr, t.weight_decay, m.logit_scale_exp_cap) == (1e-3, 0.1, 100.0)
    else:
        assert (t.lr, t.weight_decay, m.logit_scale_exp_cap) == (5e-4, 0.5, 0.0)
        assert (exp.method.ssl_scale, exp.method.ssl_temperature, exp.method.ssl_views) == (1.0, 0.1, "moco_v2")
        assert (exp.method.ssl_mlp_dim, exp.method.ssl_emb_dim) == (4096, 256)
        assert exp.method.ssl_feature == ("token_mean" if arch == "rn50" else "pooled")
