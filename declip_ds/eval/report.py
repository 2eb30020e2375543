"""One results-JSON schema for every evaluation task, and a CLIP-Benchmark-style table of many results.

A results JSON (what ``eval_zeroshot.py``, ``linear_probe`` and ``retrieval`` write)::

    {"model": "declip/vit_base_patch32_clip_224",   # method/vision tower (a row of the table)
     "checkpoint": "runs/x/checkpoints/step_00001000/model.safetensors",
     "dataset": "data/shapes/eval",                  # what --data / --test pointed at
     "task": "zeroshot" | "linear_probe" | "retrieval",
     "metrics": {"<dataset name>": {"acc1": ..., ...}, ...},   # one entry per evaluated dataset
     "config_hash": "1a2b3c4d5e6f", "date": "2025-01-01T00:00:00+00:00",
     "preprocess": {"resize": 256, "crop": 224, "crop_ratio": 0.875, "interpolation": "bilinear",
                    "normalize": "imagenet", "source": "..."},  # the eval images (EvalModel.preprocess())
     ...}                                            # task-specific extras (templates, ...)

    python -m declip_ds.eval.report results/*.json [--markdown OUT.md]

prints one table per task: rows = models, columns = datasets, cells = the task's headline metric
in % (zero-shot top-1, linear-probe top-1, retrieval mean recall), plus the row average. A dataset's
metric dict may name another headline with ``"headline_metric"`` (the downstream suite's
``mean_per_class_recall`` for Pets, Flowers, Caltech-101 and Aircraft); the table then says so below.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

REQUIRED = ("model", "checkpoint", "dataset", "task", "metrics", "config_hash", "date")
# task -> (headline metric, what the table calls it)
HEADLINE = {
    "zeroshot": ("acc1", "zero-shot top-1 (%)"),
    "linear_probe": ("acc1", "linear-probe top-1 (%)"),
    "retrieval": ("mean_recall", "retrieval mean recall (%)"),
}
_SPLIT_NAMES = {"train", "test", "val", "valid", "validation", "eval", "images", "shards"}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def dataset_name(path: str | Path) -> str:
    """A column name for a data path: its folder name, or the parent's for split folders (cifar10/test)."""
    p = Path(path)
    if p.suffix.lower() in (".tsv", ".json", ".csv", ".txt"):  # a captions file: coco/captions.tsv -> coco
        p = p.parent if p.stem.lower() in _SPLIT_NAMES | {"captions"} else p.with_suffix("")
    if p.name.lower() in _SPLIT_NAMES and p.parent.name:
        return p.parent.name
    return p.name or str(path)


def make_record(*, model: str, checkpoint: str, dataset: str, task: str, metrics: dict, config_hash: str,
                date: str | None = None, **extra) -> dict:
    """A results record in the shared schema; ``metrics`` maps dataset name -> metric dict."""
    if task not in HEADLINE:
        raise ValueError(f"Unknown task '{task}'. Known: {', '.join(HEADLINE)}.")
    record = {"model": model, "checkpoint": str(checkpoint), "dataset": str(dataset), "task": task, **extra,
              "metrics": metrics, "config_hash": config_hash, "date": date or now()}
    return record


def write_record(record: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))


def load_record(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Results file '{path}' does not exist.")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"Results file '{path}' is not valid JSON ({e}).") from None
    missing = [k for k in REQUIRED if k not in record] if isinstance(record, dict) else list(REQUIRED)
    if missing:
        raise ValueError(f"Results file '{path}' lacks {missing}; a results JSON has {list(REQUIRED)}.")
    if record["task"] not in HEADLINE:
        raise ValueError(f"Results file '{path}': unknown task '{record['task']}'. Known: {', '.join(HEADLINE)}.")
    return record


def _per_dataset(record: dict) -> dict[str, dict]:
    """metrics as {dataset: metric dict}; a flat metric dict is read as one dataset."""
    metrics, key = record["metrics"], HEADLINE[record["task"]][0]
    if key in metrics and not isinstance(metrics[key], dict):
        return {dataset_name(record["dataset"]): metrics}
    return {name: m for name, m in metrics.items() if isinstance(m, dict)}


def build_tables(records: list[dict]) -> dict[str, dict]:
    """task -> {"rows": [model], "columns": [dataset], "cells": {(row, col): value in [0, 1]}}.

    A model with several checkpoints in one task gets one row per checkpoint; a later record for the
    same (row, dataset) replaces an earlier one."""
    tables: dict[str, dict] = {}
    for task in HEADLINE:
        recs = [r for r in records if r["task"] == task]
        if not recs:
            continue
        ckpts: dict[str, set] = {}
        for r in recs:
            ckpts.setdefault(r["model"], set()).add(r["checkpoint"])
        rows, columns, cells, metric_of = [], [], {}, {}
        for r in recs:
            row = r["model"] if len(ckpts[r["model"]]) == 1 else f"{r['model']} @ {r['checkpoint']}"
            rows += [row] if row not in rows else []
            for col, m in _per_dataset(r).items():
                columns += [col] if col not in columns else []
                key = m.get("headline_metric", HEADLINE[task][0])  # e.g. mean per-class accuracy for Pets
                if key != HEADLINE[task][0]:
                    metric_of[col] = key
                value = m.get(key)
                if value is not None:
                    cells[(row, col)] = float(value)
        tables[task] = {"rows": rows, "columns": columns, "cells": cells, "metric_of": metric_of}
    return tables


def row_average(table: dict, row: str) -> tuple[float | None, bool]:
    """(mean of the row's cells, whether every column has a value)."""
    values = [table["cells"][(row, c)] for c in table["columns"] if (row, c) in table["cells"]]
    return (sum(values) / len(values) if values else None), len(values) == len(table["columns"])


def format_table(task: str, table: dict, *, markdown: bool = False) -> str:
    """The table with values in %, two decimals; an average over fewer columns is marked '*'."""
    header = ["model", *table["columns"], "average"]
    body = []
    for row in table["rows"]:
        cells = [f"{100 * table['cells'][(row, c)]:.2f}" if (row, c) in table["cells"] else "-"
                 for c in table["columns"]]
        avg, full = row_average(table, row)
        body.append([row, *cells, "-" if avg is None else f"{100 * avg:.2f}" + ("" if full else "*")])
    title = HEADLINE[task][1]
    if markdown:
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
    else:
        widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
        fmt = lambda r: "  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(r, widths)))
        lines = [title, fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)]
    if any(not row_average(table, r)[1] for r in table["rows"]):
        lines.append(("" if not markdown else "\n") + "* average over the datasets this model has results for")
    by_metric: dict[str, list[str]] = {}
    for col, key in table.get("metric_of", {}).items():
        by_metric.setdefault(key, []).append(col)
    for key, cols in by_metric.items():  # columns whose results name another headline metric
        lines.append(("" if not markdown else "\n") + f"{', '.join(cols)}: {key} (not {HEADLINE[task][0]})")
    return "\n".join(lines)


def report(records: list[dict], *, markdown: bool = False) -> str:
    tables = build_tables(records)
    return "\n\n".join(format_table(task, t, markdown=markdown) for task, t in tables.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results JSON files (any of the three tasks)")
    p.add_argument("--markdown", default=None, help="also write the tables as Markdown to this file")
    args = p.parse_args(argv)
    try:
        records = [load_record(path) for path in args.results]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(records))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(report(records, markdown=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
