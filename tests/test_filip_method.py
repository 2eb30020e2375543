"""FILIP as the DeCLIP reference computes it (top-k tokens before the gather), padding masks by
position, and token-level zero-shot scoring."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from declip_ds.losses.filip import filip_loss, filip_topk_loss, select_pair_tokens
from declip_ds.methods.filip import text_token_mask
from tests.distributed import run_ranks


def tokens(b, T, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, T, D, generator=g, dtype=dtype), dim=-1)


def reference_topk_loss(x, y, scale, k):
    """Loops over pairs: per sample the k tokens with the largest summed similarity to its own pair."""
    b = x.shape[0]
    xs = [x[i, (x[i] @ y[i].t()).sum(1).topk(k).indices.sort().values] for i in range(b)]  # (k, D) each
    ys = [y[i, (y[i] @ x[i].t()).sum(1).topk(k).indices.sort().values] for i in range(b)]
    i2t = torch.stack([torch.stack([(x[i] @ ys[j].t()).max(1).values.mean() for j in range(b)]) for i in range(b)])
    t2i = torch.stack([torch.stack([(y[j] @ xs[i].t()).max(1).values.mean() for i in range(b)]) for j in range(b)])
    labels = torch.arange(b)
    return 0.5 * (F.cross_entropy(scale * i2t, labels) + F.cross_entropy(scale * t2i, labels))


def test_topk_loss_matches_a_loop_reference_values_and_grads():
    x, y = tokens(5, 7, 8, 0), tokens(5, 6, 8, 1)
    scale = torch.tensor(9.0, dtype=torch.float64)
    a = [t.clone().requires_grad_() for t in (x, y)]
    r = [t.clone().requires_grad_() for t in (x, y)]
    loss = filip_topk_loss(a[0], a[1], scale, k=3)
    ref = reference_topk_loss(r[0], r[1], scale, k=3)
    assert torch.allclose(loss, ref, atol=1e-10)
    loss.backward()
    ref.backward()
    for p, q in zip(a, r):
        assert torch.allclose(p.grad, q.grad, atol=1e-10)


def test_topk_with_k_at_least_the_token_count_is_plain_filip():
    x, y = tokens(4, 5, 8, 2), tokens(4, 6, 8, 3)
    s = torch.tensor(5.0, dtype=torch.float64)
    assert torch.allclose(filip_topk_loss(x, y, s, k=16), filip_loss(x, y, s), atol=1e-12)


def test_selection_never_prefers_padding():
    x, y = tokens(2, 6, 4, 4), tokens(2, 5, 4, 5)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    sel, sel_mask = select_pair_tokens(x, y, 3, mask)
    assert sel.shape == (2, 3, 4) and sel_mask[1].sum() == 2 and sel_mask[0].all()


def test_text_mask_is_by_position_not_by_id():
    ids = torch.tensor([[49406, 0, 320, 49407, 0, 0]])  # id 0 is also the BPE token "!"
    assert text_token_mask(ids).tolist() == [[True, True, True, True, False, False]]


def _ranks(rank, world, x, y, scale, k):
    b = x.shape[0] // world
    lx = x[rank * b:(rank + 1) * b].clone().requires_grad_()
    ly = y[rank * b:(rank + 1) * b].clone().requires_grad_()
    loss = filip_topk_loss(lx, ly, scale, k, group=dist.group.WORLD)
    loss.backward()
    return loss.detach(), lx.grad, ly.grad


def test_topk_two_ranks_equal_one_process():
    W, B = 2, 6
    x, y = tokens(B, 5, 8, 6, torch.float32), tokens(B, 7, 8, 7, torch.float32)
    scale = torch.tensor(7.0)
    res = run_ranks(_ranks, world=W, args=(x, y, scale, 3))
    gx, gy = x.clone().requires_grad_(), y.clone().requires_grad_()
    ref = filip_topk_loss(gx, gy, scale, 3)
    ref.backward()
    assert torch.isclose(torch.stack([r[0] for r in res]).mean(), ref, atol=1e-6)
    b = B // W
    for rank, (_, g1, g2) in enumerate(res):
        assert torch.allclose(g1, W * gx.grad[rank * b:(rank + 1) * b], atol=1e-6)
        assert torch.allclose(g2, W * gy.grad[rank * b:(rank + 1) * b], atol=1e-6)


def test_token_zero_shot_classifier_scores_image_to_text():
    from declip_ds.config import from_dict
    from declip_ds.data.tokenizer import Tokenizer
    from declip_ds.eval.zero_shot import zero_shot_token_classifier

    exp = from_dict({"model": {"vision": {"name": "vit_tiny", "image_size": 32, "width": 32, "layers": 1, "heads": 2},
                               "text": {"context_length": 12, "width": 32, "layers": 1, "heads": 2},
                               "embed_dim": 16}, "method": {"name": "filip"}})
    from declip_ds.models import build_model

    model = build_model(exp.model).eval()
    tok = Tokenizer(context_length=12)
    clf = zero_shot_token_classifier(model, tok, ["circle", "red square"], ["a {}.", "a photo of a {}."])
    assert clf.tokens.shape == (2, 12, 256) and clf.mask.shape == (2, 12)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = clf.logits(model, images)  # (3, 2)
        x = F.normalize(model.encode_image_tokens(images), dim=-1)  # (3, Ti, d)
        for c in range(2):
            ids = tok([t.format(["circle", "red square"][c]) for t in ["a {}.", "a photo of a {}."]])
            y = F.normalize(F.normalize(model.encode_text_tokens(ids), dim=-1).mean(0), dim=-1)  # (L, d)
            valid = text_token_mask(ids).any(0)
            manual = (x @ y[valid].t()).max(-1).values.mean(-1)  # (3,)
            assert torch.allclose(logits[:, c], manual, atol=1e-5)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_token_zero_shot_class_renorm_is_the_reference_eval(mask_padding):
    """renorm="class": per class, the prompt-averaged (L, d) token matrix divided by its Frobenius norm
    (the DeCLIP reference's FILIP evaluate: ``label_text_pred /= label_text_pred.norm()``), scored as its
    ``get_logits``: mean over image tokens of the max over the class's positions; not the per-position
    renormalisation."""
    from declip_ds.config import ConfigError, from_dict
    from declip_ds.data.tokenizer import Tokenizer
    from declip_ds.eval.zero_shot import zero_shot_token_classifier
    from declip_ds.models import build_model

    model_cfg = {"vision": {"name": "vit_tiny", "image_size": 32, "width": 32, "layers": 1, "heads": 2},
                 "text": {"context_length": 12, "width": 32, "layers": 1, "heads": 2}, "embed_dim": 16}
    torch.manual_seed(0)
    model = build_model(from_dict({"model": model_cfg, "method": {"name": "filip"}}).model).eval()
    tok, names = Tokenizer(context_length=12), ["circle", "red square", "tiny blue star"]
    prompts = ["a {}.", "a photo of a {}.", "there is a {} in the picture"]
    clf = zero_shot_token_classifier(model, tok, names, prompts, mask_padding=mask_padding, renorm="class")
    per_position = zero_shot_token_classifier(model, tok, names, prompts, mask_padding=mask_padding)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits, logits_pos = clf.logits(model, images), per_position.logits(model, images)  # (4, 3)
        x = F.normalize(model.encode_image_tokens(images), dim=-1)  # (4, Ti, d)
        for c, name in enumerate(names):
            ids = tok([t.format(name) for t in prompts])
            y = F.normalize(model.encode_text_tokens(ids), dim=-1).mean(0)  # (L, d)
            if mask_padding:
                y = y[text_token_mask(ids).any(0)]
            y = y / y.norm()  # one scalar for the whole matrix
            assert torch.allclose(logits[:, c], (x @ y.t()).max(-1).values.mean(-1), atol=1e-5)
    assert not torch.allclose(logits, logits_pos, atol=1e-3)
    with pytest.raises(ConfigError, match="method.zero_shot_token_renorm: 'frobenius'.*position, class"):
        from_dict({"model": model_cfg, "method": {"name": "filip", "zero_shot_token_renorm": "frobenius"}})


@pytest.mark.parametrize("topk,mask_padding", [(0, True), (4, False)])
def test_defilip_token_term_pairs_image_view_1_with_the_masked_caption(topk, mask_padding):
    """METHODS.md §5: DeFILIP's FILIP term is image view 1's tokens against the tokens of T1 (the MLM-masked
    caption), weighted 0.2 on top of DeCLIP's terms: it equals the FILIP loss recomputed from those two tower
    passes, does not move when image view 2 or the EDA caption change, and does when view 1 does."""
    from declip_ds.registry import get_method
    from tests.test_methods import make_batch, tiny_experiment

    torch.manual_seed(0)
    method = get_method("defilip")(tiny_experiment("defilip", topk=topk, mask_padding=mask_padding,
                                                   contrastive_text="masked")).double().eval()  # the reference's T1
    batch = make_batch(method, n=6)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    masked = batch["mlm_labels"] != -100
    assert (batch["text"][masked] == 49406).any() and not torch.equal(batch["text"], batch["text2"])  # <|mask|>
    with torch.no_grad():
        out = method(batch)
        m = method.model
        x, y = m.image_features(batch["image"])["tokens"], m.text_features(batch["text"])["tokens"]
        expected = method.filip(m, x, y, batch["text"], None)
        assert out["filip_loss"] == pytest.approx(float(expected), rel=1e-12, abs=0)
        weights = method.loss_weights()
        assert {k: weights[k] for k in ("mvs_loss", "simsiam_loss", "mlm_loss", "nn_loss", "filip_loss")} == {
            "mvs_loss": 0.4, "simsiam_loss": 0.2, "mlm_loss": 0.2, "nn_loss": 0.2, "filip_loss": 0.2}
        total = sum(weights[k] * out[k] for k in out if k.endswith("_loss") and weights[k])
        assert float(method.total_loss(out)) == pytest.approx(float(total), rel=1e-12)

        other = dict(batch, image2=batch["image2"].flip(0), text2=batch["text2"].flip(0))
        assert float(method(other)["filip_loss"]) == pytest.approx(float(out["filip_loss"]), rel=1e-12, abs=0)
        moved = dict(batch, image=batch["image2"])
        assert float(method(moved)["filip_loss"]) != pytest.approx(float(out["filip_loss"]), rel=1e-6)


def _token_eval_rank(rank, world, n_batches):
    """zero_shot_evaluate with FILIP token scoring on ``n_batches[rank]`` batches: which modules ran per loop."""
    from declip_ds.eval.zero_shot import TokenClassifier, zero_shot_evaluate
    from declip_ds.registry import get_method
    from tests.test_methods import tiny_experiment

    torch.manual_seed(0)
    model = get_method("filip")(tiny_experiment("filip", mlm_mask_text=False)).model.eval()
    calls = []
    real = model.map_image_tokens
    model.map_image_tokens = lambda t: calls.append(t.shape[0]) or real(t)
    W = TokenClassifier(F.normalize(torch.randn(3, 16, model.cfg.token_dim), dim=-1), None)
    g = torch.Generator().manual_seed(rank)
    loader = [(torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 1])) for _ in range(n_batches[rank])]
    res = zero_shot_evaluate(model, W, loader, group=dist.group.WORLD, image_size=32)
    return res["n"], calls


def test_token_scoring_rank_out_of_data_runs_the_same_modules():
    """Uneven eval data on 2 ranks with FILIP token scoring: the rank that is out of data runs its throwaway
    forward through the token mapping too (under ZeRO-3 its parameter gather is a collective the other rank
    waits in), and the counts are summed."""
    res = run_ranks(_token_eval_rank, world=2, args=((3, 1),), timeout=120)
    assert [n for n, _ in res] == [8, 8]
    assert [len(c) for _, c in res] == [3, 3] and res[1][1] == [2, 1, 1]  # one real batch, then two throwaways
