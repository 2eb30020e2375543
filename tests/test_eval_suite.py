"""Evaluation suite: datasets, linear probe (against scikit-learn), retrieval recall, the report table,
and the three command lines on a tiny random DualEncoder with images written to tmp_path."""

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from declip_ds.eval import linear_probe as lp
from declip_ds.eval import report, retrieval
from declip_ds.eval.datasets import open_dataset

TINY = {"model": {"vision": {"name": "vit_tiny", "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
                  "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}, "embed_dim": 16}}
COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40)]


# ----------------------------------------------------------------------------- helpers


def tiny_model():
    from declip_ds.config import from_dict
    from declip_ds.models import build_model

    torch.manual_seed(0)
    exp = from_dict(TINY)
    return exp, build_model(exp.model).eval()


def image_bytes(i: int, fmt="PNG", size=40) -> bytes:
    rng = np.random.default_rng(i)
    base = np.array(COLORS[i % len(COLORS)], dtype=np.uint8)
    pixels = np.clip(base + rng.integers(-25, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def write_folder(root, folders, per_class=3, start=0):
    for c, folder in enumerate(folders):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            (root / folder / f"img{j}.png").write_bytes(image_bytes(start + c + len(COLORS) * j))
    return root


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def save_checkpoint(model, exp, directory):
    from safetensors.torch import save_file

    from declip_ds.config import save_config

    directory.mkdir(parents=True)
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    save_config(exp, directory / "config.yaml")
    return directory


class Counting(nn.Module):
    """Counts encode_image calls of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def encode_image(self, images):
        self.calls += 1
        return self.model.encode_image(images)


# ----------------------------------------------------------------------------- linear probe


def blobs(n_per_class=40, dim=8, classes=5, seed=0, spread=1.5):
    """Gaussian blobs around fixed centres; ``seed`` draws the samples (a train or a test set)."""
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * spread
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centers[y] + torch.randn(len(y), dim, generator=g), y


def log_loss(y, proba):
    import numpy as np

    return float(-np.log(proba[np.arange(len(y)), y]).mean())


@pytest.mark.parametrize("C", [1e-3, 1e-1, 10.0])
def test_two_class_probe_matches_sklearns_binary_model(C):
    """With two classes scikit-learn fits one weight vector (w0 = -w1 here), so its C needs twice our
    weight decay per sample: weight_decay_from_C / sklearn_C account for it, and the probe equals sklearn."""
    from sklearn.linear_model import LogisticRegression

    X, y = blobs(classes=2, spread=0.7)
    wd = lp.weight_decay_from_C(C, len(y), 2)
    assert wd == pytest.approx(2 / (C * len(y))) and lp.sklearn_C(wd, len(y), 2) == pytest.approx(C)
    ours = lp.fit_logistic_regression(X, y, 2, wd, device="cpu").predict_proba(X).numpy()
    sk = LogisticRegression(C=C, max_iter=10000, tol=1e-10).fit(X.double().numpy(), y.numpy())
    assert abs(ours - sk.predict_proba(X.double().numpy())).max() < 1e-4


@pytest.mark.parametrize("weight_decay", [1e-3, 1e-1, 3.0])
def test_logistic_regression_matches_sklearn(weight_decay):
    from sklearn.linear_model import LogisticRegression

    X, y = blobs()
    Xt, yt = blobs(seed=1)
    clf = lp.fit_logistic_regression(X, y, 5, weight_decay, device="cpu")
    C = lp.sklearn_C(weight_decay, len(y))
    assert lp.weight_decay_from_C(C, len(y)) == pytest.approx(weight_decay)
    sk = LogisticRegression(C=C, max_iter=10000, tol=1e-10).fit(X.double().numpy(), y.numpy())
    ours, theirs = clf.predict_proba(Xt).numpy(), sk.predict_proba(Xt.double().numpy())
    assert np.abs(ours - theirs).max() < 1e-4
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    assert np.abs(clf.W.numpy().T - sk.coef_).max() < 1e-3  # same minimiser, not just the same predictions


def test_logistic_objective_in_row_blocks_equals_autograd():
    """The probe's objective and hand-written gradient, over row blocks of any size, equal autograd on the
    whole N x C problem (what the blocks avoid holding at ImageNet size)."""
    X, y = blobs(n_per_class=9, classes=5)  # N = 45
    X = X.double()
    W = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ref = -(F.one_hot(y, 5).double() * torch.addmm(b, X, W).log_softmax(-1)).sum(-1).mean() + 0.05 * W.pow(2).sum()
    gW, gb = torch.autograd.grad(ref, [W, b])
    for rows in (1, 7, 45, None):
        loss, ourW, ourb = lp.objective_and_grad(X, y, W.detach(), b.detach(), 0.1, rows)
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ourW, gW, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ourb, gb, rtol=1e-10, atol=1e-12)
    small = lp.fit_logistic_regression(X, y, 5, 0.01, device="cpu", block_rows=7)
    whole = lp.fit_logistic_regression(X, y, 5, 0.01, device="cpu")
    torch.testing.assert_close(small.W, whole.W, rtol=1e-5, atol=1e-6)  # both stop at gradient tol 1e-7


def shortcut_data(seed=4, n_train=6, n_val=40, scale=0.02):
    """5 noisy informative dims + 5 tiny dims that encode the label in the train split only: fitting them
    needs huge weights, which heavy regularisation forbids and which turn into noise on validation."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, 5, generator=g)

    def draw(n, train):
        y = torch.arange(5).repeat_interleave(n)
        X = centers[y] + torch.randn(len(y), 5, generator=g)
        code = y if train else torch.randint(0, 5, (len(y),), generator=g)
        return torch.cat([X, scale * F.one_hot(code, 5).float()], dim=1), y

    return draw(n_train, True), draw(n_val, False)


def correlated_data(seed=0, n_train=100, n_val=40):
    """Plenty of samples, one noise direction 30x stronger than the rest: only a sharp (lightly
    regularised) boundary undoes it."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, 10, generator=g)
    scale = torch.full((10,), 0.1)
    scale[0] = 3.0

    def draw(n):
        y = torch.arange(5).repeat_interleave(n)
        return centers[y] + torch.randn(len(y), 10, generator=g) * scale, y

    return draw(n_train), draw(n_val)


def test_sweep_picks_heavy_regularisation_on_a_tiny_spurious_dataset():
    (Xtr, ytr), (Xv, yv) = shortcut_data()
    wd, history = lp.sweep_weight_decay(Xtr, ytr, Xv, yv, 5, device="cpu")
    assert wd >= 1e-2
    by_wd = {h["weight_decay"]: h["val_acc1"] for h in history}
    assert by_wd[wd] >= by_wd[lp.GRID[0]] + 0.05  # clearly better than (almost) no regularisation
    assert len(history) <= 7 + 2 * len(lp.REFINE_SPANS)  # coarse grid + two new points per refinement


def test_sweep_picks_light_regularisation_when_data_is_plentiful():
    (Xtr, ytr), (Xv, yv) = correlated_data()
    wd, history = lp.sweep_weight_decay(Xtr, ytr, Xv, yv, 5, device="cpu")
    assert wd <= 1e-4
    assert next(h["val_acc1"] for h in history if h["weight_decay"] == wd) == 1.0


def test_a_choice_at_the_grid_edge_is_flagged(caplog):
    """Plentiful, separable data wants (almost) no regularisation: the lowest grid point wins, which the record
    and the log say (the optimum may lie beyond the grid); the record names the protocol."""
    (Xtr, ytr), (Xv, yv) = correlated_data()
    with caplog.at_level(logging.WARNING, logger="declip_ds.eval.linear_probe"):
        out = lp.linear_probe(torch.cat([Xtr, Xv]), torch.cat([ytr, yv]), Xv, yv, 5, device="cpu")
    assert out["weight_decay"] == lp.GRID[0] and out["at_grid_edge"] is True and out["protocol"] == lp.PROTOCOL
    assert "at the low end of the grid" in caplog.text
    X, y = blobs(n_per_class=20)
    assert lp.linear_probe(X, y, X, y, 5, device="cpu")["at_grid_edge"] is False


def test_split_is_stratified_and_deterministic():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    tr, va = lp.split_train_val(y, 0.2, seed=3)
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(16))
    assert torch.bincount(y[va], minlength=3).tolist() == [2, 1, 0]  # the singleton class stays in train
    assert torch.equal(va, lp.split_train_val(y, 0.2, seed=3)[1])


def test_linear_probe_reports_chosen_weight_decay_and_metrics():
    X, y = blobs(n_per_class=20)
    Xt, yt = blobs(n_per_class=10, seed=1)
    out = lp.linear_probe(X, y, Xt, yt, 5, device="cpu")
    assert out["weight_decay"] in lp.GRID and out["C"] == pytest.approx(1 / (out["weight_decay"] * 100))
    assert out["n_train"] + out["n_val"] == 100 and out["n_val"] == 20 and out["n"] == 50
    assert out["acc1"] > 0.8 and 0 < out["mean_per_class_recall"] <= 1
    assert out["acc5"] is None  # 5 classes: top-5 would be 1 whatever the model (CLIP_benchmark: from 6 on)
    logits = torch.eye(6)[torch.tensor([0, 1, 2, 3, 4, 5, 5])] - torch.arange(6) * 0.01  # 6 classes
    six = lp.classification_metrics(logits, torch.tensor([0, 1, 2, 3, 4, 5, 0]), 6)
    assert six["acc1"] == pytest.approx(6 / 7) and six["acc5"] == pytest.approx(1.0)  # the last: rank 2 of 6


def test_feature_cache_is_reused_without_calling_the_model(tmp_path):
    _, model = tiny_model()
    train = write_folder(tmp_path / "pets" / "train", ["cat", "dog"], per_class=4)
    test = write_folder(tmp_path / "pets" / "test", ["cat", "dog"], per_class=2, start=1)
    counting = Counting(model)
    kw = dict(model_id="tiny", cache_dir=tmp_path / "cache", image_size=32, val_fraction=0.25, batch_size=3,
              device="cpu", max_iter=50)
    first = lp.evaluate_linear_probe(counting, train, test, **kw)
    assert counting.calls == 3 + 2  # ceil(8 / 3) train batches + ceil(4 / 3) test batches
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    second = lp.evaluate_linear_probe(counting, train, test, **kw)
    assert counting.calls == 5 and second == first
    lp.evaluate_linear_probe(counting, train, test, **{**kw, "model_id": "another checkpoint"})
    assert counting.calls == 10  # another checkpoint: another key
    (train / "cat" / "img9.png").write_bytes(image_bytes(9))
    lp.evaluate_linear_probe(counting, train, test, **kw)
    assert counting.calls == 10 + 3  # the train split changed, the test split's features are reused


def test_clip_paper_protocol_sweeps_sklearns_C_and_refits_with_it():
    """clip-paper: the grid is sklearn's C over [1e-6, 1e6] at 8 per decade, started at the paper's 7 points
    1e-6, 1e-4, ..., 1e6; each point is sklearn's LogisticRegression(C) on the sweep's train part, and the
    chosen C (not the weight decay) is what the train+val refit keeps."""
    from sklearn.linear_model import LogisticRegression

    proto = lp.PROTOCOLS[lp.CLIP_PAPER]
    assert len(proto.grid) == 97 and proto.grid[0] == pytest.approx(1e-6) and proto.grid[-1] == pytest.approx(1e6)
    assert proto.grid[8] == pytest.approx(10.0 ** -5)  # 8 points per decade
    assert [proto.grid[i] for i in range(0, 97, lp.COARSE_STEP)] == pytest.approx([10.0 ** k for k in range(-6, 7, 2)])
    (Xtr, ytr), (Xv, yv) = shortcut_data()
    Xte, yte = shortcut_data(seed=9)[1]
    out = lp.linear_probe(Xtr, ytr, Xte, yte, 5, protocol=lp.CLIP_PAPER, val=(Xv, yv), device="cpu")
    assert out["protocol"] == "clip-paper" and out["val_split"] == "official"
    assert (out["n_train"], out["n_val"]) == (30, 200)
    Cs = [h["C"] for h in out["sweep"]]
    assert set(proto.grid[::lp.COARSE_STEP]) <= set(Cs) and len(Cs) <= 7 + 2 * len(lp.REFINE_SPANS)
    best = max(out["sweep"], key=lambda h: (h["val_acc1"], -h["val_loss"]))
    assert out["C"] == best["C"] and out["val_acc1"] == best["val_acc1"]  # the best swept C itself, refitted
    peak = proto.grid.index(out["C"])
    assert {proto.grid[i] for i in (peak - 1, peak + 1) if 0 <= i < 97} <= set(Cs)  # refined to one grid step
    assert out["weight_decay"] == pytest.approx(1 / (out["C"] * 230))  # ... on train + val (N = 30 + 200)
    for h in out["sweep"]:  # each point: sklearn's fit with that C on the 30 train samples, scored on val
        sk = LogisticRegression(C=h["C"], max_iter=10000, tol=1e-10).fit(Xtr.double().numpy(), ytr.numpy())
        if h["C"] <= 1:  # (beyond, 30 separable samples want huge weights: both solvers stop short, differently)
            assert h["val_loss"] == pytest.approx(log_loss(yv.numpy(), sk.predict_proba(Xv.double().numpy())),
                                                  rel=1e-4)
        assert h["val_acc1"] == pytest.approx(sk.score(Xv.double().numpy(), yv.numpy()), abs=1 / 200 + 1e-9)
        assert h["weight_decay"] == pytest.approx(1 / (h["C"] * 30))
    X, y = torch.cat([Xtr, Xv]), torch.cat([ytr, yv])
    sk = LogisticRegression(C=out["C"], max_iter=10000, tol=1e-10).fit(X.double().numpy(), y.numpy())
    assert out["acc1"] == pytest.approx(sk.score(Xte.double().numpy(), yte.numpy()), abs=1 / 200 + 1e-9)
    fixed = lp.linear_probe(Xtr, ytr, Xte, yte, 5, protocol=lp.CLIP_PAPER, val=(Xv, yv), C=out["C"], device="cpu")
    assert fixed["C"] == out["C"] and fixed["acc1"] == out["acc1"] and "sweep" not in fixed  # --C skips the sweep
    with pytest.raises(ValueError, match="not both"):
        lp.linear_probe(Xtr, ytr, Xte, yte, 5, C=1.0, weight_decay=0.1)
    # the default protocol instead keeps the weight decay: its C changes with N
    default = lp.linear_probe(Xtr, ytr, Xte, yte, 5, val=(Xv, yv), device="cpu")
    assert default["protocol"] == lp.PROTOCOL and default["weight_decay"] in lp.GRID
    with pytest.raises(ValueError, match="Unknown linear-probe protocol 'sklearn'.*--protocol"):
        lp.linear_probe(Xtr, ytr, Xte, yte, 5, protocol="sklearn")


def test_clip_paper_probe_reads_unnormalised_pre_projection_features(tmp_path):
    """clip-paper features are the tower's output before the projection (a ViT's CLS after ln_post), not
    normalised, cached under their own key; the default protocol's stay the normalised embeddings."""
    _, model = tiny_model()
    train = write_folder(tmp_path / "pets" / "train", ["cat", "dog"], per_class=4)
    val = write_folder(tmp_path / "pets" / "val", ["cat", "dog"], per_class=2, start=2)
    test = write_folder(tmp_path / "pets" / "test", ["cat", "dog"], per_class=2, start=1)
    data = open_dataset(train, lp_transform())
    pooled, labels = lp.extract_features(model, data.loader(3), normalize=False, features="pooled")
    assert pooled.shape == (8, 32) and labels.tolist() == [0] * 4 + [1] * 4  # (N, width 32), not (N, embed 16)
    with torch.no_grad():
        x = next(iter(data.loader(8)))[0]  # (8, 3, 32, 32), the same images in one batch
        want = model.visual.ln_post(model.visual.trunk(x)[:, 0])
    torch.testing.assert_close(pooled, want)
    assert not torch.allclose(pooled.norm(dim=-1), torch.ones(8))
    embedded, _ = lp.extract_features(model, data.loader(3))
    torch.testing.assert_close(embedded, F.normalize(want @ model.visual.proj, dim=-1))
    with pytest.raises(ValueError, match="features must be one of"):
        lp.extract_features(model, data.loader(3), features="tokens")

    kw = dict(model_id="tiny", cache_dir=tmp_path / "cache", image_size=32, batch_size=4, device="cpu", max_iter=50)
    paper = lp.evaluate_linear_probe(model, train, test, val_root=val, protocol="clip-paper", **kw)
    assert (paper["features"], paper["normalized"], paper["protocol"]) == ("pooled", False, "clip-paper")
    assert (paper["n_train"], paper["n_val"], paper["n"], paper["val_split"]) == (8, 4, 4, "official")
    default = lp.evaluate_linear_probe(model, train, test, val_root=val, **kw)
    assert (default["features"], default["normalized"]) == ("embedding", True)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 6  # 3 splits x 2 kinds of features
    cached = {torch.load(f, weights_only=True)["kind"] for f in (tmp_path / "cache").glob("train-*.pt")}
    assert cached == {"pooled", "embedding"}
    # the key tells the kinds apart at either normalisation, and the embeddings' key is the one older versions
    # computed (their caches stay valid)
    import hashlib
    import json

    keys = {(f, n): lp.feature_cache_path("c", model_id="m", data=data, split="s", normalize=n, features=f)
            for f in lp.FEATURES for n in (True, False)}
    assert len(set(keys.values())) == 4
    legacy = json.dumps({"model": "m", "data": data.fingerprint(), "split": "s", "normalize": True,
                         "transform": repr(data.transform), "draft_size": None}, sort_keys=True)
    assert keys["embedding", True].name == f"s-{hashlib.sha256(legacy.encode()).hexdigest()[:16]}.pt"
    wrong = write_folder(tmp_path / "other" / "val", ["cat", "dog", "bird"], per_class=1)
    with pytest.raises(ValueError, match="the val split .* all splits must share one class index"):
        lp.evaluate_linear_probe(model, train, test, val_root=wrong, **kw)


def lp_transform():
    from declip_ds.data.transforms import eval_transform

    return eval_transform(32, normalize="imagenet", crop_ratio=224 / 256, interpolation="bicubic")


# ----------------------------------------------------------------------------- zero-shot metrics


class Identity(nn.Module):
    """encode_image returns the "image" as its embedding."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def encode_image(self, x):
        return x


def test_zero_shot_mean_per_class_recall_on_an_unbalanced_case():
    from declip_ds.eval.zero_shot import zero_shot_evaluate

    W = torch.eye(4)  # (E, C): an image embedded as e_k is predicted as class k; class 3 never occurs
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 2])
    predicted = torch.tensor([0, 0, 0, 1, 2, 1, 1])  # class 0: 3 of 5 right, class 1: 1 of 1, class 2: 0 of 1
    images = F.one_hot(predicted, 4).float()
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    out = zero_shot_evaluate(Identity(), W, batches)
    assert out["acc1"] == pytest.approx(4 / 7)  # dominated by the big class
    assert out["mean_per_class_recall"] == pytest.approx((3 / 5 + 1 + 0) / 3)  # absent class 3 not counted
    assert out["n"] == 7 and out["acc5"] is None  # top-5 needs more than 5 classes
    mine = lp.classification_metrics(images @ W, labels, 4)
    assert (mine["acc1"], mine["mean_per_class_recall"]) == pytest.approx((out["acc1"], out["mean_per_class_recall"]))


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_recall_with_several_captions_per_image():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, captions 3,4 -> image 2
    t2i = torch.tensor([0, 0, 1, 2, 2])
    S = torch.tensor([[0.1, 0.9, 0.5, 0.0, 0.2],   # image 0: its caption 1 is best            -> rank 0
                      [0.8, 0.1, 0.7, 0.3, 0.0],   # image 1: caption 0 (image 0's) beats 2     -> rank 1
                      [0.9, 0.8, 0.7, 0.1, 0.6]])  # image 2: its best (0.6) after 0, 1, 2      -> rank 3
    out = retrieval.recall_from_scores(S, t2i, ks=(1, 2, 5))
    assert out["i2t_R@1"] == pytest.approx(1 / 3) and out["i2t_R@2"] == pytest.approx(2 / 3)
    assert out["i2t_R@5"] == 1.0
    # text -> image, per column: c0 (image 0 at 0.1; images 1, 2 above): rank 2; c1: rank 0;
    # c2 (image 1 at 0.7, image 2 also 0.7: a tie counts against): rank 1; c3 (0.1 < 0.3): rank 1; c4: rank 0
    assert out["t2i_R@1"] == pytest.approx(2 / 5)  # c1, c4
    assert out["t2i_R@2"] == pytest.approx(4 / 5)  # + c2, c3
    assert out["t2i_R@5"] == 1.0
    assert out["mean_recall"] == pytest.approx((1 / 3 + 2 / 3 + 1 + 2 / 5 + 4 / 5 + 1) / 6)


def test_retrieval_from_embeddings_in_chunks_matches_the_full_matrix():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(7, 4, generator=g), torch.randn(12, 4, generator=g)
    t2i = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 6])
    full = retrieval.recall_from_scores(F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t(), t2i)
    assert retrieval.retrieval_metrics(img, txt, t2i, chunk=3) == pytest.approx(full)
    # perfect embeddings: every caption equals its image
    perfect = retrieval.retrieval_metrics(img, img[t2i], t2i)
    assert perfect["mean_recall"] == 1.0
    degenerate = retrieval.retrieval_metrics(torch.ones(7, 4), torch.ones(12, 4), t2i, ks=(1,))
    assert degenerate["i2t_R@1"] == 0.0 and degenerate["t2i_R@1"] == 0.0  # ties count against


def test_retrieval_reads_shards_and_captions_files(tmp_path):
    from declip_ds.data.tokenizer import Tokenizer

    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "00000.tar", [
        ("a.png", image_bytes(0)), ("a.txt", b"a red square\na crimson box\n"),
        ("b.png", image_bytes(1)), ("b.txt", b"ignored"), ("b.json", json.dumps({"captions": ["green", "leaf", "moss"]}).encode()),
        ("c.png", image_bytes(2)), ("c.txt", b"a blue thing"),
    ])
    _, model = tiny_model()
    tok = Tokenizer(context_length=16)
    out = retrieval.evaluate_retrieval(model, tok, shards, image_size=32, batch_size=2)
    assert (out["n_images"], out["n_texts"]) == (3, 6)
    assert out["i2t_R@10"] == 1.0 and out["t2i_R@5"] == 1.0  # 6 captions, 3 images: everything within reach
    assert all(0 <= v <= 1 for k, v in out.items() if "@" in k)
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(image_bytes(i))
    (tmp_path / "captions.tsv").write_text("image\tcaption\nimgs/0.png\ta red square\ta scarlet tile\n"
                                           "imgs/1.png\tgreen\nimgs/0.png\ta crimson box\nimgs/2.png\tblue\n")
    entries = retrieval.read_captions_file(tmp_path / "captions.tsv")
    assert [(e.name, c) for e, c in entries] == [("0.png", ["a red square", "a scarlet tile", "a crimson box"]),
                                                 ("1.png", ["green"]), ("2.png", ["blue"])]
    (tmp_path / "captions.json").write_text(json.dumps([{"image": "imgs/0.png", "captions": ["x", "y"]},
                                                        {"image": "imgs/1.png", "caption": "z"}]))
    js = retrieval.evaluate_retrieval(model, tok, tmp_path / "captions.json", image_size=32)
    assert (js["n_images"], js["n_texts"]) == (2, 3)


# ----------------------------------------------------------------------------- datasets


def test_image_folder_with_class_index(tmp_path):
    root = write_folder(tmp_path / "val", ["n02", "n01", "n03"], per_class=2)
    plain = open_dataset(root, image_size=32)
    assert plain.layout == "folder" and plain.classnames == ["n01", "n02", "n03"]  # sorted folders
    (root / "classnames.txt").write_text("n03\tgolden retriever\nn01\ttabby cat\nn02\tgoldfish\n")
    ds = open_dataset(root, image_size=32)
    assert ds.folders == ["n03", "n01", "n02"] and ds.classnames == ["golden retriever", "tabby cat", "goldfish"]
    samples = list(ds)
    assert len(samples) == 6 and samples[0][0].shape == (3, 32, 32)
    assert [label for _, label in samples] == [0, 0, 1, 1, 2, 2]
    images, labels, keys = next(iter(ds.loader(4, rank=1, world_size=2)))
    assert labels.tolist() == [0, 1, 2] and keys == ["n03/img1.png", "n01/img1.png", "n02/img1.png"]
    (root / "classnames.txt").unlink()
    (root / "classnames.json").write_text(json.dumps({"n02": "goldfish", "n01": "tabby cat", "n03": "retriever"}))
    assert open_dataset(root, image_size=32).folders == ["n02", "n01", "n03"]
    index = tmp_path / "imagenet_class_index.json"
    index.write_text(json.dumps({"1": ["n02", "goldfish"], "0": ["n01", "cat"], "2": ["n03", "dog"]}))
    assert open_dataset(root, image_size=32, class_index=index).classnames == ["cat", "goldfish", "dog"]
    (root / "classnames.json").write_text(json.dumps(["cat", "goldfish", "dog"]))  # names of the sorted folders
    assert open_dataset(root, image_size=32).classnames == ["cat", "goldfish", "dog"]


def test_imagenet_wnid_folders_get_class_names(tmp_path):
    """ImageNet val folders without a class index are named with OpenAI's class names, not the wnids."""
    root = write_folder(tmp_path / "imagenet" / "val", ["n01443537", "n01440764"], per_class=1)
    ds = open_dataset(root, image_size=32)
    assert ds.folders == ["n01440764", "n01443537"] and ds.classnames == ["tench", "goldfish"]
    assert ds.classnames_source.startswith("ImageNet wnids")
    write_folder(root, ["n99999999"], per_class=1)  # wnid-like, but not an ILSVRC-2012 class
    with pytest.warns(UserWarning, match=r"look like WordNet ids .* not ILSVRC-2012 classes \(\['n99999999'\]\)"):
        ds = open_dataset(root, image_size=32)
    assert ds.classnames == ["n01440764", "n01443537", "n99999999"]


def test_imagenetv2_numbered_folders_are_imagenet_classes_in_numeric_order(tmp_path):
    """ImageNetV2's release names its class folders 0 ... 999 (the ILSVRC-2012 indices): sorted as numbers and
    named with OpenAI's ImageNet names, never 'a photo of a 10.'; other numbered folders need a class index."""
    from declip_ds.eval.templates import IMAGENET_CLASSNAMES

    root = write_folder(tmp_path / "v2", [str(i) for i in range(1000)], per_class=1)
    ds = open_dataset(root, image_size=32)
    assert ds.folders[:12] == [str(i) for i in range(12)] and ds.classnames == list(IMAGENET_CLASSNAMES)
    assert ds.classnames_source.startswith("ImageNet class indices")
    assert [label for path, label in ds.samples if path.parent.name == "10"] == [10]
    few = write_folder(tmp_path / "few", ["0", "1", "2", "10"], per_class=1)
    with pytest.raises(ValueError, match=r"are numbers \(0, 1, 2, \.\.\.; 4 of them\).*classnames\.txt"):
        open_dataset(few, image_size=32)
    (few / "classnames.txt").write_text("0\tcat\n1\tdog\n10\tfox\n2\tcow\n")  # an index names them
    assert open_dataset(few, image_size=32).classnames == ["cat", "dog", "fox", "cow"]


def test_numbered_folders_with_a_plain_class_list_are_in_numeric_order(tmp_path):
    """Plain classnames.txt lines (and a JSON list) name numbered class folders in numeric order, as ImageNetV2's
    folder i is ImageNet class i: sorted as text, line 2 would name folder '10'."""
    root = write_folder(tmp_path / "v2", [str(i) for i in range(12)], per_class=1)
    (root / "classnames.txt").write_text("".join(f"class {i}\n" for i in range(12)))
    with pytest.warns(UserWarning, match=r"plain list for 12 numbered folders: .* numeric order .*'folder<TAB>name'"):
        ds = open_dataset(root, image_size=32)  # said, since a list in torchvision's text order would be misread
    assert ds.folders == [str(i) for i in range(12)] and ds.classnames[10] == "class 10"
    assert [label for path, label in ds.samples if path.parent.name == "10"] == [10]
    (root / "classnames.txt").unlink()
    (root / "classnames.json").write_text(json.dumps([f"class {i}" for i in range(12)]))
    with pytest.warns(UserWarning, match="plain list for 12 numbered folders"):
        assert open_dataset(root, image_size=32).classnames[2] == "class 2"
    mixed = write_folder(tmp_path / "mixed", ["2", "10", "b"], per_class=1)  # not all numbers: text order
    assert open_dataset(mixed, image_size=32).folders == ["10", "2", "b"]


def test_stray_and_empty_folders_are_not_classes(tmp_path):
    """lost+found (no images), __MACOSX and .ipynb_checkpoints (hidden) in a wnid-folder layout are left out and
    named in a warning; the five wnid folders keep OpenAI's names; hidden files in a class are not its images; a
    class folder that the class index lists without images is an error naming it."""
    wnids = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
    root = write_folder(tmp_path / "val", wnids, per_class=2)
    (root / "lost+found").mkdir()
    write_folder(root, ["__MACOSX", ".ipynb_checkpoints"], per_class=1)
    (root / wnids[0] / "._img0.png").write_bytes(b"\x00\x05\x16\x07")  # macOS's AppleDouble file: no image
    with pytest.warns(UserWarning, match=r"3 subfolder\(s\) left out, not classes: '\.ipynb_checkpoints' \(hidden\), "
                                         r"'__MACOSX' \(hidden\), 'lost\+found' \(no images\)") as caught:
        ds = open_dataset(root, image_size=32)
    assert not any("WordNet ids" in str(w.message) for w in caught)
    assert ds.folders == wnids and ds.classnames == ["tench", "goldfish", "great white shark", "tiger shark",
                                                     "hammerhead shark"]
    assert len(ds) == 10 and len(list(ds)) == 10
    (root / "classnames.txt").write_text("".join(f"{w}\tclass {i}\n" for i, w in enumerate([*wnids, "lost+found"])))
    with pytest.raises(FileNotFoundError, match=r"lists 1 class folder\(s\) of .* without images .*lost\+found"):
        open_dataset(root, image_size=32)


def test_eval_zeroshot_prompts_imagenet_folders_with_class_names(tmp_path, monkeypatch):
    import eval_zeroshot
    from declip_ds.eval import zero_shot

    exp, model = tiny_model()
    ckpt = save_checkpoint(model, exp, tmp_path / "run" / "step_00000001")
    root = write_folder(tmp_path / "imagenet" / "val", ["n01440764", "n01443537"], per_class=1)
    seen = []
    real = zero_shot.zero_shot_classifier
    monkeypatch.setattr(zero_shot, "zero_shot_classifier",
                        lambda m, tok, names, templates: seen.append(names) or real(m, tok, names, templates))
    assert eval_zeroshot.main(["--checkpoint", str(ckpt), "--data", str(root), "--templates", "simple"]) == 0
    assert seen == [["tench", "goldfish"]]


def test_preprocessing_flags_reach_the_transform_and_the_record(tmp_path, monkeypatch):
    """--interpolation / --crop-ratio override the run's eval config in every command line; the results
    JSON records the preprocessing used."""
    import eval_zeroshot
    from declip_ds.data import transforms

    exp, model = tiny_model()
    exp.eval.interpolation, exp.eval.crop_ratio = "bilinear", 0.5
    ckpt = save_checkpoint(model, exp, tmp_path / "run" / "step_00000001")
    test = write_folder(tmp_path / "colors" / "test", ["red", "green"], per_class=2)
    made = []
    real = transforms.eval_transform
    monkeypatch.setattr(transforms, "eval_transform", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    out = tmp_path / "out"
    assert eval_zeroshot.main(["--checkpoint", str(ckpt), "--data", str(test), "--templates", "simple",
                               "--out", str(out / "run.json")]) == 0  # the run's eval config
    assert report.load_record(out / "run.json")["preprocess"] == {
        "resize": 64, "crop": 32, "crop_ratio": 0.5, "interpolation": "bilinear", "normalize": "imagenet",
        "source": "the run config (data.normalize, eval.interpolation, eval.crop_ratio)"}
    flags = ["--interpolation", "bicubic", "--crop-ratio", "1.0"]
    assert eval_zeroshot.main(["--checkpoint", str(ckpt), "--data", str(test), "--templates", "simple",
                               "--out", str(out / "zs.json"), *flags]) == 0
    assert lp.main(["--checkpoint", str(ckpt), "--train", str(test), "--test", str(test), "--val-fraction", "0.5",
                    "--cache-dir", str(tmp_path / "cache"), "--max-iter", "5", "--out", str(out / "lp.json"),
                    *flags]) == 0
    (tmp_path / "captions.tsv").write_text("colors/test/red/img0.png\tred\n")
    assert retrieval.main(["--checkpoint", str(ckpt), "--data", str(tmp_path / "captions.tsv"),
                           "--out", str(out / "ret.json"), *flags]) == 0
    sizes = [(t.transforms[0].size, t.transforms[0].interpolation.value) for t in made]
    assert sizes == [(64, "bilinear")] + [(32, "bicubic")] * (len(made) - 1) and len(made) == 4
    for f in ("zs.json", "lp.json", "ret.json"):
        rec = report.load_record(out / f)["preprocess"]
        assert (rec["resize"], rec["crop_ratio"], rec["interpolation"]) == (32, 1.0, "bicubic"), f
        assert rec["source"].startswith("arguments (interpolation, crop_ratio)")
    assert eval_zeroshot.main(["--checkpoint", str(ckpt), "--data", str(test), "--crop-ratio", "1.5"]) == 2


def test_trainer_zero_shot_uses_the_eval_config(tmp_path, monkeypatch):
    """The trainer's periodic / end-of-run zero-shot evaluates with exp.eval.interpolation / crop_ratio."""
    from declip_ds.eval import zero_shot
    from declip_ds.train import engine

    exp, model = tiny_model()
    exp.eval.interpolation, exp.eval.crop_ratio = "bilinear", 0.5
    exp.eval.data_root, exp.eval.tasks = str(tmp_path), ["colors"]
    (tmp_path / "colors").mkdir()
    (tmp_path / "colors" / "classnames.txt").write_text("red\ngreen\n")
    calls = []
    result = {"acc1": 1.0, "acc5": None, "mean_per_class_recall": 1.0, "n": 1}
    monkeypatch.setattr(zero_shot, "evaluate_task_dir", lambda *a, **k: calls.append(k) or result)

    class Method:
        def __init__(self):
            self.cfg, self.model = exp.method, model

        def tokenizer(self):
            return None

        def eval(self):
            pass

        train = eval

    class Logger:
        def scalars(self, *a):
            pass

    engine.evaluate(exp, Method(), 1, Logger(), tmp_path)
    assert [(k.get("interpolation"), k.get("crop_ratio")) for k in calls] == [("bilinear", 0.5)]


def test_shard_dataset_and_synthetic_split_layout(tmp_path):
    root = tmp_path / "shapes"
    root.mkdir()
    write_tar(root / "00000.tar", [m for i in range(3) for m in ((f"k{i}.png", image_bytes(i)), (f"k{i}.cls", str(i % 2).encode()))])
    with pytest.raises(FileNotFoundError, match=r"shapes/classnames.txt' not found"):
        open_dataset(root, image_size=32)
    (root / "classnames.txt").write_text("circle\nsquare\n")
    ds = open_dataset(root, image_size=32)
    assert ds.layout == "shards" and ds.classnames == ["circle", "square"]
    assert [label for _, label in ds] == [0, 1, 0]


def test_clear_errors_for_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*nope' does not exist. Expected there an image folder"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No evaluation data in '.*empty': expected an image folder"):
        open_dataset(tmp_path / "empty")
    root = write_folder(tmp_path / "val", ["a", "b"], per_class=1)
    (root / "classnames.txt").write_text("a\tant\nb\tbee\nc\tcat\n")
    with pytest.raises(FileNotFoundError, match=r"expected class folders \['.*val/c'\] \(missing\)"):
        open_dataset(root)
    (root / "classnames.txt").write_text("ant\n")
    with pytest.raises(ValueError, match="lists 1 names for 2 class folders"):
        open_dataset(root)
    with pytest.raises(FileNotFoundError, match="Retrieval data '.*nope' does not exist"):
        retrieval.resolve_source(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"expected \*.tar shards there, or .*empty/captions.tsv"):
        retrieval.resolve_source(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="Results file"):
        report.load_record(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- report


def record(model, task, metrics, checkpoint="ckpt"):
    return report.make_record(model=model, checkpoint=checkpoint, dataset="data", task=task, metrics=metrics,
                              config_hash="abc")


def test_report_table_values_and_average(tmp_path, capsys):
    recs = [
        record("clip/vit", "zeroshot", {"shape": {"acc1": 0.5, "acc5": 0.9}, "color": {"acc1": 0.25}}),
        record("declip/vit", "zeroshot", {"shape": {"acc1": 0.75}, "color": {"acc1": 0.5}}),
        record("clip/vit", "linear_probe", {"pets": {"acc1": 0.8, "weight_decay": 1e-3}}),
        record("declip/vit", "retrieval", {"coco": {"mean_recall": 0.4}}),
    ]
    tables = report.build_tables(recs)
    zs = tables["zeroshot"]
    assert zs["rows"] == ["clip/vit", "declip/vit"] and zs["columns"] == ["shape", "color"]
    assert report.row_average(zs, "clip/vit") == (pytest.approx(0.375), True)
    assert report.row_average(zs, "declip/vit") == (pytest.approx(0.625), True)
    assert tables["retrieval"]["cells"] == {("declip/vit", "coco"): 0.4}
    paths = []
    for i, r in enumerate(recs[:3]):
        paths.append(tmp_path / f"r{i}.json")
        report.write_record(r, paths[-1])
    paths.append(tmp_path / "partial.json")
    report.write_record(record("slip/vit", "zeroshot", {"shape": {"acc1": 0.1}}), paths[-1])
    assert report.main([*map(str, paths), "--markdown", str(tmp_path / "t.md")]) == 0
    text = capsys.readouterr().out
    assert "zero-shot top-1 (%)" in text and "linear-probe top-1 (%)" in text
    line = next(x for x in text.splitlines() if x.startswith("clip/vit") and "25.00" in x)
    assert line.split() == ["clip/vit", "50.00", "25.00", "37.50"]
    assert next(x for x in text.splitlines() if x.startswith("slip/vit")).split() == ["slip/vit", "10.00", "-", "10.00*"]
    md = (tmp_path / "t.md").read_text()
    assert "| model | shape | color | average |" in md and "| declip/vit | 75.00 | 50.00 | 62.50 |" in md


def test_report_rejects_records_missing_fields(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"model": "x", "task": "zeroshot"}))
    with pytest.raises(ValueError, match=r"lacks \['checkpoint', 'dataset', 'metrics', 'config_hash', 'date'\]"):
        report.load_record(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="Unknown task 'segmentation'"):
        record("m", "segmentation", {})


# ----------------------------------------------------------------------------- command lines


def test_command_lines_write_one_schema(tmp_path, capsys):
    import eval_zeroshot

    exp, model = tiny_model()
    ckpt = save_checkpoint(model, exp, tmp_path / "run" / "step_00000001")
    train = write_folder(tmp_path / "colors" / "train", ["red", "green"], per_class=3)
    test = write_folder(tmp_path / "colors" / "test", ["red", "green"], per_class=2, start=2)
    out = tmp_path / "out"
    assert lp.main(["--checkpoint", str(ckpt), "--train", str(train), "--test", str(test), "--val-fraction", "0.34",
                    "--cache-dir", str(tmp_path / "cache"), "--max-iter", "30", "--out", str(out / "lp.json")]) == 0
    assert eval_zeroshot.main(["--checkpoint", str(ckpt), "--data", str(test), "--templates", "simple",
                               "--out", str(out / "zs.json")]) == 0
    (tmp_path / "captions.tsv").write_text("colors/test/red/img0.png\tred\tscarlet\ncolors/test/green/img0.png\tgreen\n")
    assert retrieval.main(["--checkpoint", str(ckpt), "--data", str(tmp_path / "captions.tsv"),
                           "--out", str(out / "ret.json")]) == 0
    records = [report.load_record(out / f) for f in ("lp.json", "zs.json", "ret.json")]
    assert [r["task"] for r in records] == ["linear_probe", "zeroshot", "retrieval"]
    for r in records:
        assert list(report.REQUIRED) == [k for k in r if k in report.REQUIRED]
        assert r["model"] == "clip/vit_tiny" and r["checkpoint"].endswith("model.safetensors")
    assert list(records[0]["metrics"]) == ["colors"] and "weight_decay" in records[0]["metrics"]["colors"]
    assert list(records[1]["metrics"]) == ["colors"] and records[1]["metrics"]["colors"]["n"] == 4
    assert records[2]["metrics"] == {tmp_path.name: pytest.approx(records[2]["metrics"][tmp_path.name])}
    assert records[2]["metrics"][tmp_path.name]["n_texts"] == 3
    capsys.readouterr()
    assert report.main([str(out / f) for f in ("lp.json", "zs.json", "ret.json")]) == 0
    assert "retrieval mean recall (%)" in capsys.readouterr().out
    # errors: exit 2 and a message naming the missing directory
    assert lp.main(["--checkpoint", str(ckpt), "--train", str(tmp_path / "missing"), "--test", str(test)]) == 2
    assert "missing' does not exist" in capsys.readouterr().err
    assert eval_zeroshot.main(["--checkpoint", str(ckpt), "--data", str(test)]) == 2  # no templates.txt there
    assert "templates.txt" in capsys.readouterr().err


@pytest.mark.dist
def test_eval_zeroshot_on_two_ranks_equals_one_process(tmp_path):
    """Two gloo ranks split the images (and, separately, the shards) and sum the counts: the same
    numbers as one process, for an image folder and for label-keyed shards."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    exp, model = tiny_model()
    ckpt = save_checkpoint(model, exp, tmp_path / "run" / "step_00000001")
    folder = write_folder(tmp_path / "colors" / "test", ["red", "green", "blue", "yellow"], per_class=5)
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):  # uneven: 7 + 7 + 6 samples over 3 shards for 2 ranks
        write_tar(shards / f"{s:05d}.tar", [m for i in range(s * 7, min(20, s * 7 + 7))
                                             for m in ((f"k{i:03d}.png", image_bytes(i)), (f"k{i:03d}.cls", str(i % 4).encode()))])
    (shards / "classnames.txt").write_text("red\ngreen\nblue\nyellow\n")
    (shards / "templates.txt").write_text("a {} image.\na photo of {}.\n")
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    results = {}
    for ranks in (1, 2):
        for name, data in (("folder", folder), ("shards", shards)):
            out = tmp_path / f"{name}_{ranks}.json"
            cmd = [sys.executable, str(root / "eval_zeroshot.py"), "--checkpoint", str(ckpt), "--data", str(data),
                   "--templates", "simple" if name == "folder" else "synthetic", "--batch-size", "3", "--out", str(out)]
            if ranks == 1:  # in this process
                import eval_zeroshot

                assert eval_zeroshot.main(cmd[2:]) == 0
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                       "--master_port", str(29650 + os.getpid() % 200), *cmd[1:]]
                p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
                assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
            (results[(name, ranks)],) = json.loads(out.read_text())["metrics"].values()
    for name in ("folder", "shards"):
        assert results[(name, 1)]["n"] == 20
        assert results[(name, 2)] == pytest.approx(results[(name, 1)])


def test_eval_zeroshot_refuses_a_task_with_no_readable_sample(tmp_path, capsys):
    """A task dir whose shards yield no labelled image (garbage bytes; samples without .cls) exits 2 naming
    it, and writes no results JSON: a 0 % row would read as a result. An unreadable image in an image folder
    exits 2 naming the file."""
    import eval_zeroshot

    exp, model = tiny_model()
    ckpt = save_checkpoint(model, exp, tmp_path / "run" / "step_00000001")
    for name, write in (("garbage", lambda p: p.write_bytes(b"not a tar" * 100)),
                        ("unlabelled", lambda p: write_tar(p, [("k0.png", image_bytes(0)), ("k0.txt", b"red")]))):
        task = tmp_path / name
        task.mkdir()
        write(task / "00000.tar")
        (task / "classnames.txt").write_text("red\ngreen\n")
        out = tmp_path / f"{name}.json"
        assert eval_zeroshot.main(["--checkpoint", str(ckpt), "--data", str(task), "--templates", "simple",
                                   "--out", str(out)]) == 2
        assert f"No labelled image could be read from the 1 shard(s) in {task}" in capsys.readouterr().err
        assert not out.exists()
    folder = write_folder(tmp_path / "folder", ["red", "green"], per_class=2)
    (folder / "green" / "img1.png").write_bytes(image_bytes(1)[:60])  # truncated
    assert eval_zeroshot.main(["--checkpoint", str(ckpt), "--data", str(folder), "--templates", "simple"]) == 2
    assert f"Cannot read the image {folder / 'green' / 'img1.png'}" in capsys.readouterr().err


def test_eval_zeroshot_token_scoring_on_an_image_folder_with_flags(tmp_path, monkeypatch, caplog):
    """A FILIP run scores an image folder (ImageNet val layout) by tokens, as it trained for; --mask-padding and
    --token-renorm override the method's settings, and the record says which were used."""
    import eval_zeroshot
    from declip_ds.config import from_dict
    from declip_ds.eval import zero_shot
    from declip_ds.models import build_model

    torch.manual_seed(0)
    exp = from_dict({"model": {**TINY["model"], "token_dim": 8}, "method": {"name": "filip", "mlm_mask_text": False}})
    ckpt = save_checkpoint(build_model(exp.model).eval(), exp, tmp_path / "run" / "step_00000001")
    root = write_folder(tmp_path / "imagenet" / "val", ["n01440764", "n01443537"], per_class=2)
    seen = []
    real = zero_shot.zero_shot_token_classifier
    monkeypatch.setattr(zero_shot, "zero_shot_token_classifier",
                        lambda *a, **k: seen.append(k) or real(*a, **k))
    out = tmp_path / "r.json"
    base = ["--checkpoint", str(ckpt), "--data", str(root), "--templates", "simple", "--out", str(out)]
    assert eval_zeroshot.main(base) == 0
    assert seen[-1] == {"mask_padding": True, "renorm": "position"}  # the method's defaults
    rec = json.loads(out.read_text())
    assert (rec["scoring"], rec["mask_padding"], rec["token_renorm"]) == ("token", True, "position")
    assert rec["metrics"]["imagenet"]["n"] == 4
    assert eval_zeroshot.main([*base, "--mask-padding", "false", "--token-renorm", "class"]) == 0
    assert seen[-1] == {"mask_padding": False, "renorm": "class"}
    assert (json.loads(out.read_text())["mask_padding"], json.loads(out.read_text())["token_renorm"]) == (False, "class")
    assert "got no gradient" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="declip_ds.models.pretrained"):
        assert eval_zeroshot.main([*base, "--scoring", "global"]) == 0 and len(seen) == 2
    assert json.loads(out.read_text())["scoring"] == "global"
    assert "FILIP model trained on its token-wise loss alone (clip_weight 0)" in caplog.text  # global: untrained


def test_imagenet_prompts_and_names_are_openais():
    """The 80 ImageNet templates and 1000 class names, string for string and in order, as open_clip ships OpenAI's
    (METHODS.md §7: prompt80 = OpenAI's 80; DeCLIP's prompt80 is the same list); 'simple' is DeCLIP's prompt1."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES as OC_NAMES
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from declip_ds.eval.templates import IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES, SIMPLE_TEMPLATES

    assert list(IMAGENET_TEMPLATES) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] and len(IMAGENET_TEMPLATES) == 80
    assert list(IMAGENET_CLASSNAMES) == list(OC_NAMES) and len(IMAGENET_CLASSNAMES) == 1000
    assert SIMPLE_TEMPLATES == ("a photo of a {}.",)


def test_imagenet_task_checks_its_class_names_and_image_count(caplog):
    """A 1000-class task named imagenet* is the standard benchmark only with OpenAI's class names and the 50,000
    val images; otherwise the warnings say why its number is not comparable. Other tasks are not checked."""
    from declip_ds.eval.templates import IMAGENET_CLASSNAMES
    from declip_ds.eval.zero_shot import check_imagenet_task

    names = list(IMAGENET_CLASSNAMES)
    assert check_imagenet_task("imagenet", names, 50_000) == []
    renamed = names[:2] + ["great_white_shark"] + names[3:]
    with caplog.at_level(logging.WARNING, logger="declip_ds.eval.zero_shot"):
        got = check_imagenet_task("imagenet", renamed, 49_990)
    assert len(got) == 2 and "1 of its 1000 class names differ" in got[0] and "'great_white_shark'" in got[0]
    assert "49990 images scored, not ImageNet val's 50000" in got[1] and got[1] in caplog.text
    assert check_imagenet_task("shapes", renamed, 10) == [] and check_imagenet_task("imagenet_a", names[:200], 7) == []
    # the shifts with 1000 classes are held to their own release's size
    assert check_imagenet_task("imagenetv2-matched-frequency-format-val", names, 10_000) == []
    assert check_imagenet_task("imagenet-sketch", names, 50_889) == []
    assert "10 images scored, not ImageNet-V2's 10000" in check_imagenet_task("ImageNetV2", names, 10)[0]


def test_declip_style_prompt_files_with_positional_slots_give_the_same_classifier(tmp_path):
    """The DeCLIP repo's prompt files write the class slot as '{0}': the classifier equals the '{}' one;
    a template with no slot or two is refused."""
    from declip_ds.data.tokenizer import Tokenizer
    from declip_ds.eval.zero_shot import load_templates, zero_shot_classifier

    _, model = tiny_model()
    tok = Tokenizer(16)
    (tmp_path / "declip.txt").write_text("a photo of a {0}.\na drawing of the {0}.\n")
    positional = zero_shot_classifier(model, tok, ["cat", "dog"], load_templates(str(tmp_path / "declip.txt")))
    auto = zero_shot_classifier(model, tok, ["cat", "dog"], ["a photo of a {}.", "a drawing of the {}."])
    assert torch.equal(positional, auto)
    for bad in (["a photo."], ["a {} and a {0}."]):
        with pytest.raises(ValueError, match="one '\\{\\}' \\(or '\\{0\\}'\\)"):
            zero_shot_classifier(model, tok, ["cat"], bad)
