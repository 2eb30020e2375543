"""filip_similarity / filip_loss against an independent float64 brute force, masks, chunking, memory
bound, and 2 gloo ranks against one process."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from declip_ds.losses import filip_loss, filip_similarity
from declip_ds.losses.filip import DEFAULT_BLOCK_ELEMENTS, default_chunk_size
from tests.distributed import run_ranks


def brute_force_similarity(x, y, x_mask, y_mask):
    """Pair by pair, on the valid tokens only (float64, autograd through torch.max)."""
    zero = x.new_zeros(())
    rows_i2t, rows_t2i = [], []
    for i in range(x.shape[0]):
        xi = x[i][x_mask[i]]  # (n_i, D)
        r1, r2 = [], []
        for j in range(y.shape[0]):
            yj = y[j][y_mask[j]]  # (n_j, D)
            if len(xi) == 0 or len(yj) == 0:
                r1.append(zero)
                r2.append(zero)
                continue
            sim = xi @ yj.t()  # (n_i, n_j)
            r1.append(sim.max(dim=1).values.mean())  # mean over image tokens of the max over text tokens
            r2.append(sim.max(dim=0).values.mean())  # mean over text tokens of the max over image tokens
        rows_i2t.append(torch.stack(r1))
        rows_t2i.append(torch.stack(r2))
    return torch.stack(rows_i2t), torch.stack(rows_t2i)


def tokens(B, T, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, T, D, generator=g, dtype=dtype), dim=-1)


def random_mask(B, T, seed, min_len=1):
    """True for the first n tokens of each sample, n uniform in [min_len, T] (a text-like mask)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(min_len, T + 1, (B,), generator=g)
    return torch.arange(T)[None, :] < n[:, None]


def scattered_mask(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, T, generator=g) > 0.4
    m[:, 0] = True
    return m


@pytest.mark.parametrize("Bi,Bt,Ti,Tt,D", [(1, 1, 3, 4, 5), (3, 5, 6, 4, 8), (7, 7, 5, 9, 16)])
def test_matches_brute_force_values_and_grads(Bi, Bt, Ti, Tt, D):
    x, y = tokens(Bi, Ti, D, 0), tokens(Bt, Tt, D, 1)
    xm, ym = scattered_mask(Bi, Ti, 2), random_mask(Bt, Tt, 3)
    w1, w2 = torch.randn(Bi, Bt, dtype=torch.float64), torch.randn(Bi, Bt, dtype=torch.float64)
    a = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    b = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    s1, s2 = filip_similarity(a[0], a[1], xm, ym, chunk_size=2)
    r1, r2 = brute_force_similarity(b[0], b[1], xm, ym)
    assert s1.dtype == torch.float64 and s1.shape == (Bi, Bt)
    torch.testing.assert_close(s1, r1, rtol=0, atol=1e-12)
    torch.testing.assert_close(s2, r2, rtol=0, atol=1e-12)
    ((s1 * w1).sum() + (s2 * w2).sum()).backward()
    ((r1 * w1).sum() + (r2 * w2).sum()).backward()
    for u, v in zip(a, b):
        torch.testing.assert_close(u.grad, v.grad, rtol=0, atol=1e-12)


def test_gradcheck_tiny():
    x, y = tokens(2, 3, 4, 5).requires_grad_(), tokens(3, 2, 4, 6).requires_grad_()
    ym = torch.tensor([[True, True], [True, False], [False, True]])
    assert torch.autograd.gradcheck(lambda a, b: filip_similarity(a, b, None, ym, chunk_size=2), (x, y))


def test_float32_inputs_give_float32_and_match():
    x, y = tokens(4, 5, 8, 7), tokens(3, 6, 8, 8)
    s64 = filip_similarity(x, y)
    s32 = filip_similarity(x.float(), y.float())
    s16 = filip_similarity(x.half(), y.half())
    for a, b in zip(s32, s64):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-6)
    assert s16[0].dtype == torch.float32


def test_padded_tokens_change_nothing_and_get_no_gradient():
    Bi, Bt, Ti, Tt, D = 4, 5, 6, 7, 8
    x, y = tokens(Bi, Ti, D, 10), tokens(Bt, Tt, D, 11)
    xm, ym = scattered_mask(Bi, Ti, 12), random_mask(Bt, Tt, 13)
    x2, y2 = x.clone(), y.clone()
    x2[~xm] = tokens(Bi, Ti, D, 14)[~xm] * 5  # garbage (even un-normalised) in the padding
    y2[~ym] = tokens(Bt, Tt, D, 15)[~ym] * 5
    res = []
    for a, b in ((x, y), (x2, y2)):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        s1, s2 = filip_similarity(a, b, xm, ym, chunk_size=3)
        (s1.sum() + 2 * s2.sum()).backward()
        res.append((s1, s2, a.grad, b.grad))
    for u, v in zip(res[0], res[1]):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)
    assert res[0][2][~xm].abs().max() == 0 and res[0][3][~ym].abs().max() == 0
    # and the padding does change the result when it is not masked
    assert not torch.allclose(filip_similarity(x, y)[0], filip_similarity(x2, y2)[0])


def test_sample_without_valid_tokens_scores_zero():
    x, y = tokens(2, 3, 4, 20), tokens(2, 3, 4, 21)
    ym = torch.tensor([[True, True, False], [False, False, False]])
    s1, s2 = filip_similarity(x.requires_grad_(), y, None, ym)
    assert torch.isfinite(s1).all() and (s1[:, 1] == 0).all() and (s2[:, 1] == 0).all()
    s1.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_directions_differ_and_single_direction_matches():
    x, y = tokens(3, 5, 8, 30), tokens(4, 7, 8, 31)
    s1, s2 = filip_similarity(x, y)
    assert (s1 - s2).abs().max() > 1e-3  # the two FILIP scores are different quantities
    o1, n1 = filip_similarity(x, y, direction="i2t")
    n2, o2 = filip_similarity(x, y, direction="t2i")
    assert n1 is None and n2 is None
    torch.testing.assert_close(o1, s1, rtol=0, atol=0)
    torch.testing.assert_close(o2, s2, rtol=0, atol=0)
    # swapping the roles transposes and swaps the two scores
    t1, t2 = filip_similarity(y, x)
    torch.testing.assert_close(t1, s2.t(), rtol=0, atol=1e-14)
    torch.testing.assert_close(t2, s1.t(), rtol=0, atol=1e-14)


def test_chunking_gives_the_same_result_as_one_chunk():
    Bi, Bt, Ti, Tt, D = 7, 6, 5, 4, 8
    x, y = tokens(Bi, Ti, D, 40), tokens(Bt, Tt, D, 41)
    xm, ym = scattered_mask(Bi, Ti, 42), random_mask(Bt, Tt, 43)
    w = torch.randn(2, Bi, Bt, dtype=torch.float64)
    outs = []
    for c in (1, 3, 100):
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        s1, s2 = filip_similarity(a, b, xm, ym, chunk_size=c)
        ((s1 * w[0]).sum() + (s2 * w[1]).sum()).backward()
        outs.append((s1, s2, a.grad, b.grad))
    for other in outs[:2]:
        for u, v in zip(other, outs[2]):
            torch.testing.assert_close(u, v, rtol=0, atol=1e-13)


def test_ties_put_the_gradient_on_one_token_the_lowest():
    D = 4
    y = F.normalize(torch.randn(1, 1, D, dtype=torch.float64), dim=-1)
    x = y.repeat(1, 3, 1).clone().requires_grad_()  # three identical image tokens: a 3-way tie for t2i
    yy = y.clone().requires_grad_()
    _, s2 = filip_similarity(x, yy)
    s2.sum().backward()
    norms = x.grad[0].norm(dim=-1)
    assert norms[0] > 0 and norms[1] == 0 and norms[2] == 0


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def naive_similarity(x, y):
    s = torch.einsum("ikd,jrd->ijkr", x, y)  # (Bi, Bt, Ti, Tt): what the reference must never build
    return s.max(3).values.mean(2), s.max(2).values.mean(2)


@pytest.mark.parametrize("B", [12, 48])
def test_largest_intermediate_is_one_block_not_b2_t2(B):
    Ti, Tt, D, c = 6, 5, 4, 4
    x, y = tokens(B, Ti, D, 50).requires_grad_(), tokens(B, Tt, D, 51).requires_grad_()
    bound = max(c * c * Ti * Tt, B * B, B * max(Ti, Tt) * D)  # one block, the outputs, the inputs
    with LargestTensor() as mode:
        s1, s2 = filip_similarity(x, y, chunk_size=c)
        (s1.sum() + s2.sum()).backward()
    assert mode.largest <= bound, (mode.largest, bound)
    with LargestTensor() as naive:  # the check can fail: the materialising formula exceeds it
        sum(t.sum() for t in naive_similarity(x.detach(), y.detach()))
    assert naive.largest == B * B * Ti * Tt > bound


def test_default_chunk_bounds_the_block():
    for Ti, Tt in ((197, 77), (50, 77), (49, 16), (1, 1)):
        c = default_chunk_size(Ti, Tt)
        assert c >= 1 and (c * c * Ti * Tt <= DEFAULT_BLOCK_ELEMENTS or c == 1)


def reference_filip_loss(x, y, scale, xm, ym):
    s1, s2 = brute_force_similarity(x, y, xm, ym)
    labels = torch.arange(x.shape[0])
    return 0.5 * (F.cross_entropy(scale * s1, labels) + F.cross_entropy(scale * s2.t(), labels))


def test_filip_loss_matches_reference():
    B, Ti, Tt, D = 5, 4, 6, 8
    x, y = tokens(B, Ti, D, 60), tokens(B, Tt, D, 61)
    xm, ym = scattered_mask(B, Ti, 62), random_mask(B, Tt, 63)
    scale = torch.tensor(math.exp(3.0), dtype=torch.float64)
    a = [t.clone().requires_grad_() for t in (x, y, scale)]
    b = [t.clone().requires_grad_() for t in (x, y, scale)]
    loss = filip_loss(a[0], a[1], a[2], xm, ym)
    ref = reference_filip_loss(b[0], b[1], b[2], xm, ym)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    loss.backward()
    ref.backward()
    for u, v in zip(a, b):
        torch.testing.assert_close(u.grad, v.grad, rtol=0, atol=1e-12)
    # float32 tokens: the loss is fp32
    assert filip_loss(x.float(), y.float(), scale.float(), xm, ym).dtype == torch.float32


def _rank_fn(rank, world, x, y, xm, ym, scale):
    b = x.shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    lx, ly = x[sl].clone().requires_grad_(), y[sl].clone().requires_grad_()
    s = scale.clone().requires_grad_()
    loss = filip_loss(lx, ly, s, xm[sl], ym[sl], group=dist.group.WORLD, chunk_size=3)
    loss.backward()
    return loss.detach(), lx.grad, ly.grad, s.grad


@pytest.mark.dist
def test_two_ranks_equal_global_batch_loss_and_gradient():
    W, B, Ti, Tt, D = 2, 8, 5, 6, 8
    x, y = tokens(B, Ti, D, 70, torch.float32), tokens(B, Tt, D, 71, torch.float32)
    xm, ym = scattered_mask(B, Ti, 72), random_mask(B, Tt, 73)
    scale = torch.tensor(20.0)
    results = run_ranks(_rank_fn, world=W, args=(x, y, xm, ym, scale))
    gx, gy, gs = x.clone().requires_grad_(), y.clone().requires_grad_(), scale.clone().requires_grad_()
    ref = filip_loss(gx, gy, gs, xm, ym)
    ref.backward()
    # as in test_clip_loss: the mean of per-rank losses is the global loss, each rank's gradient of its
    # own rows is W times the global one, the mean of the per-rank scale gradients is the global one
    torch.testing.assert_close(torch.stack([r[0] for r in results]).mean(), ref.detach(), rtol=0, atol=1e-6)
    b = B // W
    for rank, (_, g_x, g_y, _) in enumerate(results):
        torch.testing.assert_close(g_x, W * gx.grad[rank * b:(rank + 1) * b], rtol=0, atol=1e-6)
        torch.testing.assert_close(g_y, W * gy.grad[rank * b:(rank + 1) * b], rtol=0, atol=1e-6)
    torch.testing.assert_close(sum(r[3] for r in results) / W, gs.grad, rtol=0, atol=1e-6)


def test_clear_errors():
    with pytest.raises(ValueError, match="same D"):
        filip_similarity(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="text_mask"):
        filip_similarity(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), None, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="as many images as texts"):
        filip_loss(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4), torch.tensor(1.0))


def test_loss_chunk_size_caps_the_torch_blocks(monkeypatch):
    """loss.chunk_size reaches the pure-torch similarity as the most samples per block; the default block
    size (at most 2**22 similarities) still applies when it is the smaller one."""
    import declip_ds.losses.filip as filip_mod
    from declip_ds.losses.select import get_filip_similarity

    seen = []
    real = filip_mod.filip_similarity
    monkeypatch.setattr(filip_mod, "filip_similarity", lambda *a, **kw: seen.append(kw["chunk_size"]) or real(*a, **kw))
    x = F.normalize(torch.randn(5, 4, 8, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(6, 3, 8, dtype=torch.float64), dim=-1)
    ref = real(x, y)
    for chunk, expect in ((2, 2), (4096, default_chunk_size(4, 3))):
        got = get_filip_similarity("torch", chunk_size=chunk)(x, y, direction="both")
        assert seen[-1] == expect
        torch.testing.assert_close(got[0], ref[0])
        torch.testing.assert_close(got[1], ref[1])
