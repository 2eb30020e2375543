"""Linear probe on frozen image features, fitted with L-BFGS, under one of two protocols
(``--protocol``; see "Protocols" below).

    python -m declip_ds.eval.linear_probe --checkpoint CKPT --train DIR [--val DIR] --test DIR \
        [--protocol lbfgs-l2-wd-grid|clip-paper] [--val-fraction 0.2] [--cache-dir DIR] --out results.json

DIR is any dataset ``open_dataset`` reads (an image folder or labelled shards). Steps:

1. Features of every image under the eval transform: the protocol's kind (the projected embedding or the
   tower's output before the projection), L2-normalised or not. Computed once per (checkpoint, dataset
   files, split, transform, kind, normalisation) and cached as ``<cache-dir>/<split>-<hash>.pt``; a later run
   with the same key loads the file and never runs the model.
2. Regularisation sweep (CLIP paper appendix A.3's coarse-to-fine search) on a validation split: the one
   given (``--val``; a dataset's official val split) or else a stratified ``val_fraction`` of the train
   split. The grid has 97 log-spaced points; every 16th (7 points) is fitted first, then, around the best so
   far, the points 8, 4, 2 and 1 grid steps to each side. A choice at either end of the grid is logged as a
   warning and recorded (``at_grid_edge``): the optimum may lie outside it. Best = highest validation top-1,
   ties broken by lower validation cross-entropy (so among equally accurate values the better-calibrated one
   wins), then by the earlier grid point.
3. The chosen value is refitted on train+val; the test split gives top-1, top-5 (> 5 classes) and mean
   per-class recall.

Classifier and regularisation convention
----------------------------------------
Multinomial logistic regression, W (D, C) and bias b (C,), fitted full-batch with L-BFGS (strong-Wolfe
line search, float64, zero init, so the result is deterministic) to the minimum of

    L(W, b) = mean_i CE(x_i W + b, y_i) + (weight_decay / 2) * ||W||_F^2        (the bias is not penalised)

scikit-learn's ``LogisticRegression(C=C)`` (lbfgs, multinomial, intercept not penalised) minimises
``C * sum_i CE_i + ||W||_F^2 / 2``, which is L multiplied by C * N. Both have the same minimiser when

    weight_decay = 1 / (C * N)        <=>        C = 1 / (weight_decay * N)

with N the number of samples the classifier is fitted on. Two classes are the exception: scikit-learn then
fits one weight vector w (logit w.x + b) where the softmax here fits two, w1 = -w0 = w/2 at the optimum, so
the penalty here is (weight_decay / 4) ||w||^2 and the same minimiser needs weight_decay = 2 / (C * N). Fits stop when the largest gradient entry of L is
below 1e-7 or after ``max_iter`` (1000) iterations: tighter than scikit-learn's default tol of 1e-4.

Protocols
---------
``lbfgs-l2-wd-grid`` (default; ``PROTOCOL``): L2-normalised projected embeddings (CLIP_benchmark's
default features); the grid is CLIP_benchmark's weight-decay grid, 1e-6 to 1e2 at 12 points per decade, read
as the per-sample L2 coefficient above. The weight decay chosen on the sweep's train part carries over to
the train+val refit unchanged (the equivalent C then changes with N; the results report both). The least
regularised point is C = 1e6 / N (about 0.8 on ImageNet-1k's 1.28M images). CLIP_benchmark itself trains
the layer with AdamW over this grid, so these numbers are comparable between models probed here, not with
CLIP_benchmark's tables.

``clip-paper`` (``CLIP_PAPER``): the CLIP paper's appendix A.3 -- scikit-learn-style L-BFGS on the features
of the penultimate layer, unnormalised: for ViTs the CLS token after ln_post, before the projection to the
embedding space (I_f of the paper's Figure 3); for the CLIP ResNets the attention pool's output, which is
their embedding (no separate projection). The grid is sklearn's C from 1e-6 to 1e6 at 8 points per decade
(the paper's 96 steps; its start points 1e-6, 1e-4, ..., 1e6 are the 7 coarse points), and the chosen C is
refitted on train+val as sklearn would refit it (C fixed, so the per-sample weight decay shrinks with the
larger N). Validation: the dataset's own val split where there is one, else a split of train, as the paper.
Differences left: the paper does not say what share of train it held out (``val_fraction``), and fits to
sklearn's tolerance, not ours; numbers are meant to be comparable with the paper's linear-probe tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

GRID = torch.logspace(-6, 2, 97, dtype=torch.float64).tolist()  # weight decay, 12 points per decade
C_GRID = torch.logspace(-6, 6, 97, dtype=torch.float64).tolist()  # sklearn's C, 8 points per decade (CLIP paper)
COARSE_STEP = 16  # grid indices 0, 16, ..., 96: GRID 1e-6, 10^-4.67, ..., 1e2; C_GRID 1e-6, 1e-4, ..., 1e6
REFINE_SPANS = (8, 4, 2, 1)


@dataclass(frozen=True)
class Protocol:
    """What a probe fits on and what it sweeps (the module docstring's "Protocols")."""

    name: str
    features: str  # "embedding": the projected embedding | "pooled": the image tower's output before it
    normalize: bool  # L2-normalise the features
    param: str  # what the grid holds and the refit keeps: "weight_decay" (per sample) | "C" (sklearn's)
    grid: tuple[float, ...]  # ascending

    def weight_decay(self, value: float, n: int, num_classes: int) -> float:
        """The objective's weight decay for grid value ``value`` on a fit of n samples."""
        return value if self.param == "weight_decay" else weight_decay_from_C(value, n, num_classes)


PROTOCOL = "lbfgs-l2-wd-grid"  # the default: L-BFGS, per-sample L2 over CLIP_benchmark's wd grid
CLIP_PAPER = "clip-paper"
PROTOCOLS = {
    PROTOCOL: Protocol(PROTOCOL, features="embedding", normalize=True, param="weight_decay", grid=tuple(GRID)),
    CLIP_PAPER: Protocol(CLIP_PAPER, features="pooled", normalize=False, param="C", grid=tuple(C_GRID)),
}
FEATURES = ("embedding", "pooled")


def get_protocol(protocol: str | Protocol) -> Protocol:
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown linear-probe protocol '{protocol}'; choose one of {sorted(PROTOCOLS)} "
                         "(--protocol).")
    return PROTOCOLS[protocol]
log = logging.getLogger(__name__)
DEFAULT_CACHE = Path(os.environ.get("DECLIP_DS_CACHE", Path.home() / ".cache" / "declip_ds")) / "features"


def _binary_factor(num_classes: int | None) -> float:
    return 2.0 if num_classes == 2 else 1.0  # see the module docstring: sklearn's binary model has one vector


def sklearn_C(weight_decay: float, n: int, num_classes: int | None = None) -> float:
    """scikit-learn's C for our weight decay on n samples: C = 1 / (weight_decay * n), 2 / (...) for 2 classes."""
    return _binary_factor(num_classes) / (weight_decay * n)


def weight_decay_from_C(C: float, n: int, num_classes: int | None = None) -> float:
    """Our weight decay for scikit-learn's C on n samples (the inverse of ``sklearn_C``)."""
    return _binary_factor(num_classes) / (C * n)


# ----------------------------------------------------------------------------- the classifier


@dataclass
class LinearClassifier:
    W: torch.Tensor  # (D, C)
    b: torch.Tensor  # (C,)
    weight_decay: float

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, X.to(self.W.device, self.W.dtype), self.W)  # (N, C)

    def predict_proba(self, X: torch.Tensor) -> torch.Tensor:
        return self.logits(X).softmax(dim=-1)


# rows per block of the objective: a block's (rows, C) logits stay near 2^24 entries (128 MB in float64), so
# an ImageNet-sized probe (1.28M x 1000) never holds the N x C one-hot, logit and softmax tensors at once
BLOCK_ENTRIES = 1 << 24


@torch.no_grad()
def objective_and_grad(X, y, W, b, weight_decay, block_rows: int | None = None):
    """L(W, b) of the module docstring and its gradient, computed over row blocks.

    X (N, D), y (N,) long, W (D, C), b (C,). Returns (loss 0-d, dL/dW (D, C), dL/db (C,)). The gradient
    is written out (softmax minus one-hot, then two matmuls) rather than taken by autograd: no N x C
    tensor is kept for a backward, and nothing scatters with atomics (deterministic on CUDA)."""
    n, num_classes = X.shape[0], W.shape[1]
    rows = block_rows or max(1, BLOCK_ENTRIES // num_classes)
    loss = torch.zeros((), dtype=W.dtype, device=W.device)
    gW, gb = torch.zeros_like(W), torch.zeros_like(b)
    for s in range(0, n, rows):
        x, lab = X[s:s + rows], y[s:s + rows, None]
        z = torch.addmm(b, x, W)  # (r, C)
        lse = z.logsumexp(dim=-1, keepdim=True)  # (r, 1)
        loss += (lse - z.gather(1, lab)).sum()
        p = (z - lse).exp_()  # softmax (r, C)
        p.scatter_(1, lab, p.gather(1, lab) - 1)  # minus the one-hot: one write per row, no accumulation
        gW.addmm_(x.T, p)
        gb += p.sum(dim=0)
    loss = loss / n + 0.5 * weight_decay * W.pow(2).sum()
    return loss, gW / n + weight_decay * W, gb / n


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fit_logistic_regression(X: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, *,
                            max_iter: int = 1000, tol: float = 1e-7, device=None,
                            dtype: torch.dtype = torch.float64, block_rows: int | None = None) -> LinearClassifier:
    """Minimise mean CE + weight_decay/2 ||W||^2 (see the module docstring) by full-batch L-BFGS.

    X (N, D) features, y (N,) labels in [0, num_classes). Stops when the largest gradient entry is
    below ``tol`` or after ``max_iter`` iterations. Memory: X and O(block_rows * C) besides W."""
    if weight_decay <= 0:
        raise ValueError(f"weight_decay must be > 0 (got {weight_decay}); separable data has no minimum without it.")
    device = torch.device(device) if device is not None else default_device()
    X = X.to(device, dtype)
    y = y.to(device).long()
    W = torch.zeros(X.shape[1], num_classes, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(num_classes, device=device, dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, max_eval=max_iter * 5 // 4, tolerance_grad=tol,
                            tolerance_change=1e-14 if dtype == torch.float64 else 1e-9, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        loss, W.grad, b.grad = objective_and_grad(X, y, W.detach(), b.detach(), weight_decay, block_rows)
        return loss

    opt.step(closure)
    return LinearClassifier(W.detach(), b.detach(), float(weight_decay))


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """top-1, top-5 (None under 5 classes), mean per-class recall (over the classes present) and n."""
    labels = labels.to(logits.device).long()
    top = logits.topk(min(5, num_classes), dim=-1).indices  # (N, k)
    hit1 = top[:, 0] == labels
    total = torch.bincount(labels, minlength=num_classes)
    correct = torch.bincount(labels[hit1], minlength=num_classes)
    seen = total > 0
    n = int(total.sum())
    return {
        "acc1": float(hit1.double().mean()) if n else 0.0,
        # with <= 5 classes top-5 is trivially 1: reported from 6 classes on, as CLIP_benchmark does
        "acc5": float((top == labels[:, None]).any(dim=-1).double().mean()) if num_classes > 5 and n else None,
        "mean_per_class_recall": float((correct[seen].double() / total[seen].double()).mean()) if n else 0.0,
        "n": n,
    }


# ----------------------------------------------------------------------------- the sweep


def split_train_val(y: torch.Tensor, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split: per class, round(val_fraction * n_c) samples to val (a class keeps at least one
    training sample). Deterministic for a seed; returns sorted index tensors."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(int(round(val_fraction * len(idx))), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def sweep(Xtr, ytr, Xval, yval, num_classes: int, *, protocol: str | Protocol = PROTOCOL, max_iter: int = 1000,
          device=None, verbose: bool = False) -> tuple[float, list[dict]]:
    """The value of the protocol's grid (a weight decay or a C) with the best validation score, searched
    coarse-to-fine; each point is fitted on (Xtr, ytr) and scored on (Xval, yval).

    Returns (best grid value, the evaluated points in grid order: weight_decay, C, val_acc1, val_loss)."""
    proto = get_protocol(protocol)
    grid, n = proto.grid, len(ytr)
    scores: dict[int, tuple[float, float]] = {}

    def score(i: int) -> tuple[float, float]:
        if i not in scores:
            clf = fit_logistic_regression(Xtr, ytr, num_classes, proto.weight_decay(grid[i], n, num_classes),
                                          max_iter=max_iter, device=device)
            logits = clf.logits(Xval)
            labels = yval.to(logits.device).long()
            acc = float((logits.argmax(dim=-1) == labels).double().mean())
            loss = float(F.cross_entropy(logits, labels))
            scores[i] = (acc, loss)
            if verbose:
                print(f"  {proto.param} {grid[i]:.3g}: val acc1 {100 * acc:.2f}, val loss {loss:.4f}", file=sys.stderr)
        return scores[i]

    def best(idxs) -> int:  # highest accuracy, then lowest loss, then the first listed
        return max(idxs, key=lambda i: (score(i)[0], -score(i)[1], -idxs.index(i)))

    peak = best(list(range(0, len(grid), COARSE_STEP)))
    for span in REFINE_SPANS:
        peak = best([max(peak - span, 0), peak, min(peak + span, len(grid) - 1)])
    history = []
    for i, (acc, loss) in sorted(scores.items()):
        wd = proto.weight_decay(grid[i], n, num_classes)
        point = {"weight_decay": wd, "C": sklearn_C(wd, n, num_classes), proto.param: grid[i]}  # grid value exact
        history.append({**point, "val_acc1": acc, "val_loss": loss})
    return grid[peak], history


def sweep_weight_decay(Xtr, ytr, Xval, yval, num_classes: int, *, max_iter: int = 1000, device=None,
                       verbose: bool = False) -> tuple[float, list[dict]]:
    """``sweep`` under the default protocol: (best weight decay of ``GRID``, the evaluated points)."""
    return sweep(Xtr, ytr, Xval, yval, num_classes, protocol=PROTOCOL, max_iter=max_iter, device=device,
                 verbose=verbose)


def linear_probe(Xtrain, ytrain, Xtest, ytest, num_classes: int, *, val_fraction: float = 0.2, seed: int = 0,
                 weight_decay: float | None = None, max_iter: int = 1000, device=None, verbose: bool = False,
                 protocol: str | Protocol = PROTOCOL, val: tuple | None = None, C: float | None = None) -> dict:
    """Sweep the protocol's grid on a validation split (unless ``weight_decay`` or sklearn's ``C`` is given),
    refit on train+val, score the test features. ``val = (Xval, yval)``: an official validation split, swept
    against with all of train, then refitted on train+val; without it a stratified ``val_fraction`` of train
    is held out for the sweep and the refit is on all of train. Returns the test metrics and the choice made."""
    proto = get_protocol(protocol)
    if weight_decay is not None and C is not None:
        raise ValueError("Give a weight decay or a C to skip the sweep, not both (--weight-decay / --C).")
    out = {}
    if val is not None:
        Xfit, yfit = torch.cat([Xtrain, val[0]]), torch.cat([ytrain, val[1]])
    else:
        Xfit, yfit = Xtrain, ytrain
    if C is not None:
        weight_decay, out = weight_decay_from_C(C, len(yfit), num_classes), {"C": C}
    elif weight_decay is None:
        if val is not None:
            (Xs, ys), (Xv, yv), how = (Xtrain, ytrain), val, "official"
        else:
            tr, va = split_train_val(ytrain, val_fraction, seed)
            if len(va) == 0:
                raise ValueError(f"val_fraction={val_fraction} leaves no validation sample (classes have too few "
                                 "samples); raise it or pass a fixed weight decay.")
            (Xs, ys), (Xv, yv), how = (Xtrain[tr], ytrain[tr]), (Xtrain[va], ytrain[va]), f"{val_fraction:g} of train"
        value, history = sweep(Xs, ys, Xv, yv, num_classes, protocol=proto, max_iter=max_iter, device=device,
                               verbose=verbose)
        chosen = next(h for h in history if h[proto.param] == value)
        edge = value in (proto.grid[0], proto.grid[-1])
        if edge:
            log.warning("linear probe: the chosen %s %.3g is at the %s end of the grid [%.0e, %.0e]; the optimum may "
                        "lie beyond it", proto.param, value, "low" if value == proto.grid[0] else "high",
                        proto.grid[0], proto.grid[-1])
        weight_decay = proto.weight_decay(value, len(yfit), num_classes)  # C kept (clip-paper) or wd (default)
        out = {proto.param: value,  # exactly the grid's value (the other one is derived from it below)
               "n_train": len(ys), "n_val": len(yv), "val_acc1": chosen["val_acc1"], "val_split": how,
               "at_grid_edge": edge, "sweep": history}
    clf = fit_logistic_regression(Xfit, yfit, num_classes, weight_decay, max_iter=max_iter, device=device)
    metrics = classification_metrics(clf.logits(Xtest), ytest, num_classes)
    derived = {"weight_decay": weight_decay, "C": sklearn_C(weight_decay, len(yfit), num_classes)}
    return {**metrics, **derived, "protocol": proto.name, **out}  # (out's C or grid value is the exact one)


# ----------------------------------------------------------------------------- features


@torch.no_grad()
def extract_features(model, loader, *, normalize: bool = True,
                     features: str = "embedding") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, E) float32 on CPU, labels (N,) long) of a loader of (images, labels[, keys]).

    ``features``: "embedding" = ``model.encode_image`` (projected); "pooled" = the image tower's output before
    the projection (``model.image_features(...)["pooled"]``: a ViT's CLS after ln_post, (N, width); a CLIP
    ResNet's attention-pool output, its embedding)."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got '{features}'.")
    p = next(model.parameters())
    feats, labels = [], []
    for images, y, *_ in loader:
        images = images.to(p.device, p.dtype)
        if features == "pooled":
            f = model.image_features(images)["pooled"].float()  # (B, Wv)
        else:
            f = model.encode_image(images).float()  # (B, E)
        feats.append((F.normalize(f, dim=-1) if normalize else f).cpu())
        labels.append(y.long().cpu())
    if not feats:
        raise ValueError("The dataset yielded no images (all samples skipped?); nothing to extract features from.")
    return torch.cat(feats), torch.cat(labels)


def checkpoint_id(weights: str | Path) -> str:
    """Identifies a weights file for the cache: resolved path, size and modification time."""
    st = Path(weights).stat()
    return f"{Path(weights).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def feature_cache_path(cache_dir: str | Path, *, model_id: str, data, split: str, normalize: bool,
                       features: str = "embedding") -> Path:
    key = {"model": model_id, "data": data.fingerprint(), "split": split, "normalize": normalize,
           "transform": repr(data.transform), "draft_size": getattr(data.transform, "draft_size", None)}  # JPEG decode
    if features != "embedding":  # (embedding keys as before the choice existed: their caches stay valid)
        key["features"] = features
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{split}-{digest}.pt"


def cached_features(model, data, *, model_id: str, split: str, cache_dir: str | Path = DEFAULT_CACHE,
                    batch_size: int = 256, normalize: bool = True, workers: int = 0,
                    features: str = "embedding") -> tuple[torch.Tensor, torch.Tensor]:
    """Features of ``data`` (an ``open_dataset`` result), from the cache when present, else computed
    and saved there. The key covers ``model_id`` (e.g. ``checkpoint_id(weights)``), the dataset's files,
    the split name, the transform, ``features`` and ``normalize``."""
    path = feature_cache_path(cache_dir, model_id=model_id, data=data, split=split, normalize=normalize,
                              features=features)
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        return cached["features"], cached["labels"]
    X, y = extract_features(model, data.loader(batch_size, workers=workers), normalize=normalize, features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"features": X, "labels": y, "model": model_id, "split": split, "kind": features}, tmp)
    os.replace(tmp, path)  # a reader never sees half a file
    return X, y


def evaluate_linear_probe(model, train_root, test_root, *, model_id: str, cache_dir=DEFAULT_CACHE,
                          image_size: int = 224, normalize_images="imagenet", normalize: bool | None = None,
                          val_fraction: float = 0.2, seed: int = 0, weight_decay: float | None = None,
                          batch_size: int = 256, workers: int = 0, label_key: str = "cls", max_iter: int = 1000,
                          device=None, verbose: bool = False, interpolation: str = "bicubic",
                          crop_ratio: float = 224 / 256, protocol: str | Protocol = PROTOCOL,
                          val_root=None, C: float | None = None) -> dict:
    """The whole protocol on dataset directories (image folders or labelled shards); images through
    ``eval_transform(image_size, normalize_images, crop_ratio, interpolation)``. ``val_root``: an official
    validation split to sweep on (then refitted on train+val); ``normalize`` None = the protocol's."""
    from declip_ds.data.transforms import eval_transform
    from declip_ds.eval.datasets import open_dataset

    proto = get_protocol(protocol)
    normalize = proto.normalize if normalize is None else normalize
    transform = eval_transform(image_size, normalize=normalize_images, crop_ratio=crop_ratio,
                               interpolation=interpolation)
    roots = {"train": train_root, "val": val_root, "test": test_root}
    data = {s: open_dataset(r, transform, label_key=label_key) for s, r in roots.items() if r is not None}
    for s, d in data.items():
        if d.classnames != data["train"].classnames:
            raise ValueError(f"The train split '{train_root}' has {len(data['train'].classnames)} classes and the {s} "
                             f"split '{roots[s]}' {len(d.classnames)}, or they are in another order; all splits must "
                             "share one class index.")
    kw = dict(model_id=model_id, cache_dir=cache_dir, batch_size=batch_size, normalize=normalize, workers=workers,
              features=proto.features)
    feats = {s: cached_features(model, d, split=s, **kw) for s, d in data.items()}
    out = linear_probe(*feats["train"], *feats["test"], len(data["train"].classnames), val_fraction=val_fraction,
                       seed=seed, weight_decay=weight_decay, max_iter=max_iter, device=device, verbose=verbose,
                       protocol=proto, val=feats.get("val"), C=C)
    return {**out, "features": proto.features, "normalized": normalize}


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    from declip_ds.models.pretrained import FORMATS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, step_XXXXXXXX dir or model.safetensors")
    p.add_argument("--train", required=True, help="train split: image folder or labelled shard dir")
    p.add_argument("--test", required=True, help="test split: image folder or labelled shard dir")
    p.add_argument("--val", default=None, help="an official validation split to sweep on (then refitted on "
                                               "train+val); default: --val-fraction of the train split")
    p.add_argument("--protocol", default=PROTOCOL, choices=list(PROTOCOLS),
                   help="features and grid (module docstring): %(default)s (normalised embeddings, weight-decay "
                        "grid) or clip-paper (the CLIP paper's: pre-projection features, C in [1e-6, 1e6])")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the train split held out for the sweep")
    p.add_argument("--weight-decay", type=float, default=None, help="skip the sweep and use this weight decay")
    p.add_argument("--C", type=float, default=None, help="skip the sweep and use scikit-learn's C (on train+val)")
    p.add_argument("--name", default=None, help="dataset name in the results (default: from --test)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="feature cache (default: %(default)s)")
    p.add_argument("--no-normalize", action="store_true",
                   help="probe unnormalised features (the default protocol L2-normalises; clip-paper never does)")
    p.add_argument("--label-key", default="cls", help="label member of shards")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--format", default="auto", choices=list(FORMATS),
                   help="checkpoint format (auto-detected by default)")
    from declip_ds.models.pretrained import add_preprocess_args

    add_preprocess_args(p, normalize_flag="--normalize-images")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit")
    p.add_argument("--verbose", action="store_true", help="print every point of the sweep")
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)

    from declip_ds.train.dist import one_process_only

    if one_process_only("the linear probe"):  # under a launcher: rank 0 alone, so one writer of --out and the cache
        return 0
    from declip_ds.eval.report import dataset_name, make_record, write_record
    from declip_ds.models.pretrained import load_for_eval

    try:
        em = load_for_eval(args.checkpoint, args.format, normalize=args.normalize_images,
                           interpolation=args.interpolation, crop_ratio=args.crop_ratio)
        em.warn_if_global_untrained("a linear probe")
        model = em.model.to(default_device())
        result = evaluate_linear_probe(
            model, args.train, args.test, val_root=args.val, protocol=args.protocol,
            model_id=checkpoint_id(em.weights), cache_dir=args.cache_dir,
            image_size=em.image_size, normalize_images=em.normalize, interpolation=em.interpolation,
            crop_ratio=em.crop_ratio,
            normalize=False if args.no_normalize else None, val_fraction=args.val_fraction, seed=args.seed,
            weight_decay=args.weight_decay, C=args.C, batch_size=args.batch_size, workers=args.workers,
            label_key=args.label_key, max_iter=args.max_iter, verbose=args.verbose)
    except (FileNotFoundError, NotADirectoryError, ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.name or dataset_name(args.test)
    acc5 = f"{100 * result['acc5']:.2f}" if result["acc5"] is not None else "-"
    print(f"{name}: acc1 {100 * result['acc1']:.2f}  acc5 {acc5}  mean per-class recall "
          f"{100 * result['mean_per_class_recall']:.2f}  weight decay {result['weight_decay']:.3g} "
          f"(sklearn C {result['C']:.3g})  n_test {result['n']}")
    if args.out:
        write_record(make_record(model=em.name, checkpoint=str(em.weights),
                                 dataset=str(args.test), task="linear_probe", metrics={name: result},
                                 config_hash=em.config_hash, train=str(args.train),
                                 val=args.val, val_fraction=None if args.val else args.val_fraction,
                                 protocol=args.protocol, normalize=result["normalized"],
                                 preprocess=em.preprocess()), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
