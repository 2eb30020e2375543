"""clip_loss against an independent float64 reference, and 2 gloo ranks against one process."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from declip_ds.losses import clip_loss
from tests.distributed import run_ranks


def reference_clip_loss(img, txt, scale):
    """The global-batch loss written out with explicit sums (float64)."""
    B = img.shape[0]
    total = 0.0
    logits = scale * img @ txt.t()  # (B, B)
    for i in range(B):
        total = total + (torch.logsumexp(logits[i], 0) - logits[i, i])  # image i vs all texts
        total = total + (torch.logsumexp(logits[:, i], 0) - logits[i, i])  # text i vs all images
    return total / (2 * B)


def features(B, D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=-1)
    return img, txt


@pytest.mark.parametrize("B,D", [(1, 4), (7, 16), (33, 8)])
def test_matches_float64_reference_values_and_grads(B, D):
    img, txt = features(B, D)
    scale = torch.tensor(math.exp(2.0), dtype=torch.float64)
    a = [t.clone().requires_grad_() for t in (img, txt, scale)]
    b = [t.clone().requires_grad_() for t in (img, txt, scale)]
    loss = clip_loss(*a)
    ref = reference_clip_loss(*b)
    # clip_loss computes logits in fp32 on purpose; compare at fp32 accuracy
    assert torch.allclose(loss.double(), ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    for x, y in zip(a, b):
        assert torch.allclose(x.grad, y.grad, rtol=1e-4, atol=1e-6)


def test_hand_checked_cases():
    # identical features: every logit equal, loss = log B
    B = 5
    x = F.normalize(torch.ones(B, 3), dim=-1)
    assert torch.isclose(clip_loss(x, x, torch.tensor(10.0)), torch.tensor(math.log(B)))
    # orthonormal pairs with a large scale: loss -> 0
    e = torch.eye(4)
    assert clip_loss(e, e, torch.tensor(100.0)) < 1e-6


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same"):
        clip_loss(torch.zeros(3, 4), torch.zeros(2, 4), torch.tensor(1.0))


def _rank_fn(rank, world, img, txt, scale):
    b = img.shape[0] // world
    li = img[rank * b : (rank + 1) * b].clone().requires_grad_()
    lt = txt[rank * b : (rank + 1) * b].clone().requires_grad_()
    s = scale.clone().requires_grad_()
    loss = clip_loss(li, lt, s, group=dist.group.WORLD)
    loss.backward()
    return loss.detach(), li.grad, lt.grad, s.grad


def test_two_ranks_equal_global_batch_loss_and_gradient():
    W, B, D = 2, 8, 16
    img, txt = features(B, D, seed=3, dtype=torch.float32)
    scale = torch.tensor(14.0)
    results = run_ranks(_rank_fn, world=W, args=(img, txt, scale))
    gi, gt, gs = img.clone().requires_grad_(), txt.clone().requires_grad_(), scale.clone().requires_grad_()
    ref = clip_loss(gi, gt, gs)
    ref.backward()
    # DeepSpeed averages gradients over ranks: the mean of per-rank losses is the global loss, and
    # each rank's gradient of its own rows is W times the global one (the average over ranks of
    # J_r^T g_r then equals the global-batch parameter gradient).
    assert torch.isclose(torch.stack([r[0] for r in results]).mean(), ref, atol=1e-6)
    b = B // W
    for rank, (_, g_img, g_txt, g_s) in enumerate(results):
        assert torch.allclose(g_img, W * gi.grad[rank * b : (rank + 1) * b], atol=1e-6)
        assert torch.allclose(g_txt, W * gt.grad[rank * b : (rank + 1) * b], atol=1e-6)
    assert torch.isclose(sum(r[3] for r in results) / W, gs.grad, atol=1e-6)


def _rank_fn_modes(rank, world, img, txt, scale):
    out = {}
    for gather_grad in (True, False):
        b = img.shape[0] // world
        li = img[rank * b : (rank + 1) * b].clone().requires_grad_()
        lt = txt[rank * b : (rank + 1) * b].clone().requires_grad_()
        s = scale.clone().requires_grad_()
        loss = clip_loss(li, lt, s, group=dist.group.WORLD, gather_grad=gather_grad)
        loss.backward()
        out[gather_grad] = (loss.detach(), li.grad, lt.grad, s.grad)
    return out


def official_slip_rank_loss(img, txt, scale, rank, b):
    """The official SLIP CLIPLoss on one rank, written out (float64): its own rows against every rank's
    columns, the columns detached (utils.all_gather_batch has no gradient)."""
    li, lt = img[rank * b : (rank + 1) * b], txt[rank * b : (rank + 1) * b]
    total = 0.0
    for i in range(b):
        row_i2t = scale * txt.detach() @ li[i]  # image i vs every text
        row_t2i = scale * img.detach() @ lt[i]  # text i vs every image
        j = rank * b + i
        total = total + torch.logsumexp(row_i2t, 0) - row_i2t[j] + torch.logsumexp(row_t2i, 0) - row_t2i[j]
    return total / (2 * b)


def test_two_ranks_gather_without_grad_is_the_official_slip_loss():
    W, B, D = 2, 8, 16
    img, txt = features(B, D, seed=5, dtype=torch.float32)
    scale = torch.tensor(14.0)
    results = run_ranks(_rank_fn_modes, world=W, args=(img, txt, scale))
    b = B // W
    for rank, r in enumerate(results):
        gi, gt, gs = img.double().requires_grad_(), txt.double().requires_grad_(), scale.double().requires_grad_()
        ref = official_slip_rank_loss(gi, gt, gs, rank, b)
        ref.backward()
        loss, g_img, g_txt, g_s = r[False]
        assert torch.isclose(loss.double(), ref, atol=1e-5) and torch.isclose(loss, r[True][0])  # the same value
        assert torch.allclose(g_img.double(), gi.grad[rank * b : (rank + 1) * b], atol=1e-5)
        assert torch.allclose(g_txt.double(), gt.grad[rank * b : (rank + 1) * b], atol=1e-5)
        assert gi.grad[(1 - rank) * b : (2 - rank) * b].abs().max() == 0  # nothing reaches the other rank's rows
        assert torch.isclose(g_s.double(), gs.grad, atol=1e-4) and torch.isclose(g_s, r[True][3])
        # ... and the features' gradients differ from the with-gradient gather's (the column terms)
        assert (g_img - r[True][1]).abs().max() > 1e-2 and (g_txt - r[True][2]).abs().max() > 1e-2


def test_gather_without_grad_on_one_process_is_the_plain_loss():
    img, txt = features(6, 8)
    scale = torch.tensor(10.0, dtype=torch.float64)
    a = [t.clone().requires_grad_() for t in (img, txt)]
    b = [t.clone().requires_grad_() for t in (img, txt)]
    clip_loss(*a, scale, gather_grad=False).backward()
    clip_loss(*b, scale).backward()
    assert torch.equal(a[0].grad, b[0].grad) and torch.equal(a[1].grad, b[1].grad)
