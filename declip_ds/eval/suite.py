"""Zero-shot, linear-probe and retrieval transfer of one checkpoint over a suite of downstream datasets.

    python -m declip_ds.eval.suite --checkpoint CKPT --suite declip11 --data-root DIR \
        --task zeroshot|linear_probe|both|retrieval|all [--out DIR] [--download]
    python -m declip_ds.eval.suite --checkpoint CKPT --suite retrieval --data-root DIR --task retrieval
    python -m declip_ds.eval.suite --list          # the datasets, their splits, metrics, files and how to get them

Every dataset of the suite found under DIR (raw files, or a webdataset copy DIR/<name>_wds/<split>/*.tar)
is evaluated; the others are skipped and listed with the reason (which files were expected where, and
how to get them). A dataset that is there but whose evaluation fails is listed as FAILED (the record's
``failed``), the others still run, and the suite exits 1. Suites: declip11 (the DeCLIP paper's transfer table: CIFAR-10, CIFAR-100, Food-101,
Oxford Pets, Flowers-102, SUN397, Stanford Cars, DTD, Caltech-101, FGVC-Aircraft, ImageNet), quick,
robustness (ImageNet and its shifts V2, Sketch, A, R: zero-shot only), retrieval (Flickr30k 1k and MSCOCO
5k test, Karpathy splits), all, or a comma-separated list of dataset names. Classification datasets, splits and metrics: declip_ds/eval/downstream.py; retrieval datasets:
``RETRIEVAL_REGISTRY`` in declip_ds/eval/retrieval.py. Each task evaluates the suite's datasets of its
kind (zero-shot and linear probe the classification ones, retrieval the retrieval ones); ``both`` is
zero-shot + linear probe, ``all`` adds retrieval.

A test split scored with another number of images than the release has (a partly downloaded webdataset
copy, a partial folder) is warned about, and the metrics carry the warning (``"warning"``, also printed
under the table): its number is not comparable with published ones.

Zero-shot: the test split, the dataset's CLIP prompt templates (``--templates`` overrides them for all
datasets: simple | imagenet80 | FILE), ``zero_shot_classifier`` + ``zero_shot_evaluate``.
Linear probe: linear_probe.py's protocol (``--probe-protocol``: the default weight-decay grid on normalised
embeddings, or clip-paper, the CLIP paper's) on cached features; the regularisation is swept on the official
val split where the dataset has one (Flowers, DTD, Aircraft, ...) and refitted on train+val, else on a
stratified ``--val-fraction`` of train (refitted on all of train).
Retrieval: recall@1/5/10 both ways on the test split, every caption kept, mean recall as the headline;
``--scoring`` / ``--mask-padding`` as for zero-shot (FILIP-family models token-wise by default).

Output (``--out DIR``): ``DIR/<task>.json`` per task in the report schema
(declip_ds/eval/report.py; skipped datasets appear as ``{"skipped": reason}``), and ``DIR/table.txt`` /
``DIR/table.md``: the report tool's table, datasets as columns plus the average. The headline is top-1
except mean per-class accuracy for Pets, Flowers, Caltech-101 and Aircraft, as the literature reports.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings
from pathlib import Path

TASKS = ("zeroshot", "linear_probe", "retrieval")
TASK_SETS = {"both": ("zeroshot", "linear_probe"), "all": TASKS}
# the dataset (or a library to read it) is not there: skipped and listed
UNAVAILABLE = (FileNotFoundError, NotADirectoryError, ImportError)
# it is there but evaluating it failed (a corrupt file, out of memory, a bug): listed as failed, the other
# datasets still run, and the suite exits 1 so that a partial table is not taken for a complete one
FAILURES = (RuntimeError, ValueError, OSError)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _reason(e: Exception) -> str:
    from declip_ds.eval.downstream import DatasetUnavailable

    return str(e) if isinstance(e, DatasetUnavailable) else f"{type(e).__name__}: {e}"


def _count_check(spec, data, n: int) -> dict:
    """``{"warning": ...}`` for the record when the test split scored another number of images than the release
    has (a partly downloaded webdataset copy, a partial folder), else {}. Shards are counted only as they are
    scored, so they are warned about here; image folders and torchvision splits were when opened."""
    from declip_ds.eval.downstream import count_warning

    message = count_warning(spec, "test", n, getattr(data, "root", "?"), getattr(data, "layout", ""))
    if message and getattr(data, "layout", "") == "shards":
        warnings.warn(message, stacklevel=3)
    return {"warning": message} if message else {}


def _extras(spec, data, split: str) -> dict:
    return {"headline_metric": spec.metric, "split": split, "layout": getattr(data, "layout", "?"),
            "n_classes": len(data.classnames), "classnames_source": getattr(data, "classnames_source", "registry")}


# ----------------------------------------------------------------------------- zero-shot


def zeroshot_one(model, tokenizer, name: str, *, root, transform, templates: str, image_size: int, batch_size: int,
                 workers: int, download: bool, seed: int, label_key: str, scoring: str = "global",
                 mask_padding: bool = True, token_renorm: str = "position") -> dict:
    """Zero-shot metrics of one dataset's test split (plus the headline metric's name and provenance)."""
    from declip_ds.eval.downstream import get_spec, open_split
    from declip_ds.eval.zero_shot import (load_templates, zero_shot_classifier, zero_shot_evaluate,
                                          zero_shot_token_classifier)

    spec = get_spec(name)
    data = open_split(name, "test", root, transform, download=download, seed=seed, label_key=label_key)
    prompts = spec.templates if templates == "default" else load_templates(templates)
    if scoring == "token":
        W = zero_shot_token_classifier(model, tokenizer, data.classnames, prompts, mask_padding=mask_padding,
                                       renorm=token_renorm)
    else:
        W = zero_shot_classifier(model, tokenizer, data.classnames, prompts)
    metrics = zero_shot_evaluate(model, W, data.loader(batch_size, workers=workers), image_size=image_size)
    if metrics["n"] == 0:
        raise ValueError(f"{spec.title}'s test split yielded no images.")
    return {**metrics, **_extras(spec, data, "test"), "n_templates": len(prompts),
            **_count_check(spec, data, metrics["n"])}


# ----------------------------------------------------------------------------- linear probe


def linear_probe_one(model, name: str, *, root, transform, model_id: str, cache_dir, batch_size: int, workers: int,
                     download: bool, seed: int, label_key: str, val_fraction: float, max_iter: int,
                     device=None, verbose: bool = False, protocol: str = "lbfgs-l2-wd-grid") -> dict:
    """Linear-probe metrics of one dataset: features of train (+ val) and test, sweep, refit, score."""
    from declip_ds.eval import linear_probe as lp
    from declip_ds.eval.downstream import get_spec, open_split

    spec = get_spec(name)
    proto = lp.get_protocol(protocol)
    kw = dict(download=download, seed=seed, label_key=label_key)
    splits = {s: open_split(name, s, root, transform, **kw) for s in ("train", "val", "test") if spec.has_split(s)}
    if len({tuple(d.classnames) for d in splits.values()}) != 1:
        raise ValueError(f"{spec.title}'s splits name their classes differently; they must share one label order.")
    feats = {s: lp.cached_features(model, d, model_id=model_id, split=f"{name}-{s}", cache_dir=cache_dir,
                                   batch_size=batch_size, workers=workers, normalize=proto.normalize,
                                   features=proto.features) for s, d in splits.items()}
    out = lp.linear_probe(*feats["train"], *feats["test"], len(splits["test"].classnames), val_fraction=val_fraction,
                          seed=seed, max_iter=max_iter, device=device, verbose=verbose, protocol=proto,
                          val=feats.get("val"))
    return {**out, **_extras(spec, splits["test"], "test"), "features": proto.features, "normalized": proto.normalize,
            **_count_check(spec, splits["test"], out["n"])}


# ----------------------------------------------------------------------------- retrieval


def retrieval_one(model, tokenizer, name: str, *, root, transform, batch_size: int, workers: int,
                  scoring: str = "global", mask_padding: bool = True, **_) -> dict:
    """Recall@1/5/10 both ways on one retrieval dataset's test split (mean recall the headline)."""
    from declip_ds.eval.retrieval import RETRIEVAL_REGISTRY, evaluate_retrieval

    source = RETRIEVAL_REGISTRY[name].source(root)
    metrics = evaluate_retrieval(model, tokenizer, source, transform=transform, batch_size=batch_size, workers=workers,
                                 scoring=scoring, mask_padding=mask_padding)
    return {**metrics, "headline_metric": "mean_recall", "n": metrics["n_images"], "split": "test",
            "layout": "shards" if source.kind == "shards" else "karpathy"}


def task_datasets(names: list[str], task: str) -> list[str]:
    """The datasets of ``names`` that ``task`` evaluates: retrieval ones for retrieval, the classification ones
    otherwise (for the linear probe those with a train split: not the test-only ImageNet shifts)."""
    from declip_ds.eval.downstream import get_spec, is_retrieval

    if task == "retrieval":
        return [n for n in names if is_retrieval(n)]
    return [n for n in names if not is_retrieval(n) and (task != "linear_probe" or get_spec(n).has_split("train"))]


# ----------------------------------------------------------------------------- the suite


def run_suite(names: list[str], task: str, evaluate_one) -> tuple[dict, dict, list]:
    """({name: metrics or {"skipped": reason}}, {name: reason}, [failed names]) of ``evaluate_one(name)``
    over ``names``: a dataset that is not there is skipped; one whose evaluation fails is skipped too, with
    the reason starting "FAILED", and listed as failed."""
    metrics, skipped, failed = {}, {}, []
    for name in names:
        t0 = time.time()
        try:
            result = evaluate_one(name)
        except (*UNAVAILABLE, *FAILURES) as e:
            bad = not isinstance(e, UNAVAILABLE)
            skipped[name] = ("FAILED: " if bad else "") + _reason(e)
            metrics[name] = {"skipped": skipped[name]}
            if bad:
                failed.append(name)
            log(f"[{task}] {name}: {'FAILED' if bad else 'skipped'} ({skipped[name].splitlines()[0][:200]})")
            continue
        metrics[name] = result
        key = result["headline_metric"]
        log(f"[{task}] {name}: {key} {100 * result[key]:.2f}  (n={result['n']}, {time.time() - t0:.1f}s)")
    return metrics, skipped, failed


def format_skipped(records: list[dict]) -> str:
    """The skipped datasets of each record, with the reasons."""
    lines = []
    for rec in records:
        if rec["skipped"]:
            lines.append(f"{rec['task']}: skipped {len(rec['skipped'])} of {len(rec['metrics'])} datasets:")
            lines += [f"  {n}: {r}" for n, r in rec["skipped"].items()]
    return "\n".join(lines)


def format_warnings(records: list[dict]) -> str:
    """The evaluated datasets whose numbers are not the standard protocol's (``"warning"`` of their metrics)."""
    lines = [f"{rec['task']}/{n}: WARNING {m['warning']}" for rec in records for n, m in rec["metrics"].items()
             if isinstance(m, dict) and m.get("warning")]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from declip_ds.eval.linear_probe import DEFAULT_CACHE
    from declip_ds.models.pretrained import FORMATS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="run dir, checkpoints dir, step dir, model.safetensors, or an OpenAI / "
                                        "open_clip / DeCLIP checkpoint")
    p.add_argument("--suite", default="declip11", help="declip11 | quick | all | name,name,... (default: %(default)s)")
    p.add_argument("--data-root", help="the folder holding the datasets (torchvision's root)")
    p.add_argument("--task", default="zeroshot", choices=[*TASKS, *TASK_SETS],
                   help="zeroshot | linear_probe | retrieval, both (zero-shot + linear probe) or all three")
    p.add_argument("--out", default=None, help="write <task>.json and table.txt / table.md here")
    p.add_argument("--download", action="store_true", help="let torchvision download missing datasets into "
                                                           "--data-root (off by default)")
    p.add_argument("--templates", default="default",
                   help="default (each dataset's CLIP templates) | simple | imagenet80 | FILE")
    p.add_argument("--scoring", default=None, choices=["global", "token"],
                   help="zero-shot and retrieval scoring (default: what the method trained for; token = FILIP's)")
    from declip_ds.eval.zero_shot import add_token_args

    add_token_args(p)
    p.add_argument("--format", default="auto", choices=list(FORMATS))
    from declip_ds.models.pretrained import add_preprocess_args

    add_preprocess_args(p)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class splits and of --val-fraction")
    p.add_argument("--label-key", default="cls", help="label member of webdataset copies")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="linear probe: share of train held out for the sweep when there is no official val split")
    p.add_argument("--max-iter", type=int, default=1000, help="linear probe: L-BFGS iterations per fit")
    from declip_ds.eval.linear_probe import PROTOCOL, PROTOCOLS

    p.add_argument("--probe-protocol", default=PROTOCOL, choices=list(PROTOCOLS),
                   help="linear probe: %(default)s (normalised embeddings, weight-decay grid) or clip-paper (the CLIP "
                        "paper's appendix A.3: pre-projection features, C in [1e-6, 1e6]); see linear_probe.py")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="linear probe feature cache (default: %(default)s)")
    p.add_argument("--list", action="store_true", help="list the datasets and suites, then exit")
    return p


def list_datasets() -> str:
    from declip_ds.eval.downstream import REGISTRY, SUITES, VTAB_COPIES, describe

    lines = ["datasets (name, title, classes, templates, splits, headline metric):"]
    for name, spec in REGISTRY.items():
        lines.append("  " + describe(name))
        lines.append("      files: " + ", ".join(" or ".join(e) if isinstance(e, tuple) else e
                                                 for e in dict.fromkeys(x for v in spec.files.values() for x in v)))
        size = f" (its test split: {spec.n_images:,} images)" if spec.n_images else ""
        lines.append(f"      get:   {spec.get}{size}")
    from declip_ds.eval.retrieval import RETRIEVAL_REGISTRY

    lines.append("retrieval datasets (name, title; recall@1/5/10 both ways, headline mean_recall):")
    for spec in RETRIEVAL_REGISTRY.values():
        lines.append(f"  {spec.name:<14}{spec.title}")
        lines.append(f"      files: {spec.file}, {spec.images}/ (or {spec.name}_wds/test/*.tar)")
        lines.append(f"      get:   {spec.get}")
    lines.append("DIR is --data-root. Webdataset copies: DIR/<name>_wds/<split>/*.tar (python -m "
                 "declip_ds.eval.make_shards), CLIP_benchmark's DIR/wds_<name>/<split>/ and, for the test split of "
                 f"{', '.join(VTAB_COPIES)}, DIR/wds_vtab-<name>/test/.")
    lines.append("suites: " + "; ".join(f"{k} = {', '.join(v)}" for k, v in SUITES.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print(list_datasets())
        return 0
    from declip_ds.train.dist import one_process_only

    if one_process_only("the suite"):  # under a launcher: rank 0 alone, so one writer of --out and the cache
        return 0
    missing = [f"--{a.replace('_', '-')}" for a in ("checkpoint", "data_root") if getattr(args, a) is None]
    if missing:
        print(f"error: {' and '.join(missing)} required (or --list).", file=sys.stderr)
        return 2
    from declip_ds.eval.downstream import suite_datasets
    from declip_ds.models.pretrained import load_for_eval

    try:
        names = suite_datasets(args.suite)
        if not Path(args.data_root).is_dir():
            raise FileNotFoundError(f"--data-root '{args.data_root}' is not a directory; pass the folder holding "
                                    "the datasets (see --list for the layout).")
        tasks = TASK_SETS.get(args.task, (args.task,))
        if not any(task_datasets(names, t) for t in tasks):
            kind = "retrieval" if args.task == "retrieval" else "classification"
            raise ValueError(f"Suite '{args.suite}' has no {kind} dataset for --task {args.task}"
                             + (" (use --task retrieval for retrieval datasets, or a classification suite)"
                                if kind == "classification" else " (try --suite retrieval)") + ".")
        em = load_for_eval(args.checkpoint, args.format, normalize=args.normalize,
                           interpolation=args.interpolation, crop_ratio=args.crop_ratio)
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records = evaluate_all(em, names, args)
    return finish(records, args, names)


def evaluate_all(em, names: list[str], args) -> list[dict]:
    """One results record per task, in the report schema."""
    from declip_ds.data.tokenizer import Tokenizer
    from declip_ds.eval.linear_probe import checkpoint_id, default_device
    from declip_ds.eval.report import make_record
    from declip_ds.eval.zero_shot import token_settings

    device = default_device()
    model = em.model.to(device).eval()
    transform = em.transform()
    log(f"preprocessing: {em.describe_preprocess()}")
    common = dict(root=Path(args.data_root), transform=transform, batch_size=args.batch_size, workers=args.workers,
                  download=args.download, seed=args.seed, label_key=args.label_key)
    records = []
    tok = Tokenizer(context_length=em.context_length, mask_token=em.mask_token)
    scoring = args.scoring or getattr(em.method, "zero_shot_scoring", "global")
    tokens = token_settings(em.method, args)
    for task in TASK_SETS.get(args.task, (args.task,)):
        task_names = task_datasets(names, task)
        if not task_names:
            log(f"[{task}] suite '{args.suite}' has no dataset for this task; no {task} record")
            continue
        if task == "zeroshot":
            if scoring == "global":
                em.warn_if_global_untrained("zero-shot with --scoring global")
            one = functools.partial(zeroshot_one, model, tok, templates=args.templates, image_size=em.image_size,
                                    scoring=scoring, **tokens, **common)
            extra = {"templates": args.templates, "scoring": scoring, **(tokens if scoring == "token" else {})}
        elif task == "retrieval":
            if scoring == "global":
                em.warn_if_global_untrained("retrieval with --scoring global")
            one = functools.partial(retrieval_one, model, tok, scoring=scoring, mask_padding=tokens["mask_padding"],
                                    **common)
            extra = {"scoring": scoring, **({"mask_padding": tokens["mask_padding"]} if scoring == "token" else {})}
        else:
            em.warn_if_global_untrained("a linear probe")
            one = functools.partial(linear_probe_one, model, model_id=checkpoint_id(em.weights),
                                    cache_dir=args.cache_dir, val_fraction=args.val_fraction, max_iter=args.max_iter,
                                    device=device, protocol=args.probe_protocol, **common)
            extra = {"val_fraction": args.val_fraction, "protocol": args.probe_protocol}
        metrics, skipped, failed = run_suite(task_names, task, one)
        records.append(make_record(model=em.name, checkpoint=str(em.weights), dataset=str(args.data_root), task=task,
                                   metrics=metrics, config_hash=em.config_hash, suite=args.suite, datasets=task_names,
                                   skipped=skipped, failed=failed, seed=args.seed, preprocess=em.preprocess(), **extra))
    return records


def finish(records: list[dict], args, names: list[str]) -> int:
    """Print (and write) the table and the skipped datasets; exit 1 when a dataset's evaluation failed, 2 when
    nothing could be evaluated."""
    from declip_ds.eval.report import report, write_record

    text = report(records)
    notes = "".join("\n\n" + part for part in (format_warnings(records), format_skipped(records)) if part)
    print(text + notes)
    if args.out:
        out = Path(args.out)
        for rec in records:
            write_record(rec, out / f"{rec['task']}.json")
        (out / "table.txt").write_text(text + notes + "\n")
        (out / "table.md").write_text(report(records, markdown=True) + "\n")
    evaluated = [n for rec in records for n in rec["metrics"] if n not in rec["skipped"]]
    failed = [f"{rec['task']}/{n}" for rec in records for n in rec.get("failed", [])]
    if failed:
        print(f"error: the evaluation of {len(failed)} dataset(s) failed ({', '.join(failed)}; reasons above); the "
              f"averages leave them out. Fix the cause and rerun those (--suite NAME,...).", file=sys.stderr)
        return 1
    if not evaluated:
        print(f"error: none of the {len(names)} datasets of '{args.suite}' could be evaluated under "
              f"'{args.data_root}' (reasons above; python -m declip_ds.eval.suite --list shows the expected files).",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
