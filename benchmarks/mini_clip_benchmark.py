"""Mini CLIP-Benchmark: all five methods, same synthetic shards, towers, steps and seed.

Run:  python benchmarks/mini_clip_benchmark.py [--steps 300] [--methods clip declip slip filip defilip]
                                               [--work-dir benchmarks/out/mini] [--results benchmarks/RESULTS.md]
                                               [key=value ...]   (extra config overrides for every run)
      python benchmarks/mini_clip_benchmark.py --from-json benchmarks/out/mini/results.json --results ...

Each method trains through ``train.py`` on ``experiments/demo_shapes.yaml`` (the demo's tiny towers and
64-px synthetic shards, but with the generator's default rich captions: ``data.synthetic.captions=rich``
comes first among the overrides) with identical overrides, one process on the CPU (or the GPU if there is one).
Then, per run:

* zero-shot top-1 on the three synthetic tasks (shape 8-way, colour 8-way, shape+colour 64-way), read
  from the run's final ``eval/zeroshot_step_*.json`` (the trainer's own evaluation);
* a linear probe (declip_ds.eval.linear_probe: L2-normalised frozen image embeddings, logistic
  regression, weight decay swept on a validation split, refit on train+val) for shape and for colour, on
  a seeded per-class 50/50 split of the corresponding eval split;
* the compute: wall time of the training process, steps x batch (samples seen).

Writes ``<work-dir>/results.json``, a bar chart ``mini_clip_benchmark.png`` (needs matplotlib:
``pip install -e ".[bench]"``; next to FILE with --results, else in the work dir) and, with
``--results FILE``, replaces the section between the markers
``<!-- mini-clip-benchmark:start -->`` / ``<!-- mini-clip-benchmark:end -->`` of FILE with the table
(appending it when the markers are missing). The table is what was measured; ordering between methods
at this scale says nothing certain about YFCC-15M, and the text next to it must say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("clip", "declip", "slip", "filip", "defilip")
DEFAULT_CAPTIONS = "data.synthetic.captions=rich"  # the benchmark's caption style unless overridden
START, END = "<!-- mini-clip-benchmark:start -->", "<!-- mini-clip-benchmark:end -->"
CHANCE = {"shape": 1 / 8, "color": 1 / 8, "shape_color": 1 / 64}


def train(method: str, run_dir: Path, steps: int, data_root: Path, overrides: list[str], log_path: Path) -> float:
    """Train one method to completion; returns the wall time in seconds."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "experiments/demo_shapes.yaml"),
           "--resume", "none", f"method.name={method}", f"train.steps={steps}", f"train.output_dir={run_dir}",
           f"data.synthetic_root={data_root}", "train.eval_every=0", f"train.save_every={steps}",
           "train.keep_last=1", *overrides]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{method}: train.py exited with {rc}; see {log_path}")
    return wall


def zero_shot(run_dir: Path) -> dict:
    files = sorted((run_dir / "eval").glob("zeroshot_step_*.json"))
    if not files:
        raise SystemExit(f"No zero-shot results in {run_dir / 'eval'}; did the run finish?")
    return {task: r["acc1"] for task, r in json.loads(files[-1].read_text())["results"].items()}


def _eval_split(data_root: Path, task: str, transform):
    from declip_ds.eval.datasets import open_dataset

    return open_dataset(data_root / "eval" / task, transform)


def probe(run_dir: Path, data_root: Path, tasks=("shape", "color"), seed: int = 0) -> dict:
    """Linear-probe top-1 per task on a seeded per-class 50/50 split of the task's eval split."""
    import torch

    from declip_ds.eval.linear_probe import extract_features, linear_probe
    from declip_ds.models.pretrained import load_for_eval

    em = load_for_eval(run_dir)
    out = {}
    for task in tasks:
        data = _eval_split(data_root, task, em.transform())
        X, y = extract_features(em.model, data.loader(256), normalize=True)
        g = torch.Generator().manual_seed(seed)
        train_idx, test_idx = [], []
        for c in y.unique().tolist():
            idx = (y == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            train_idx.append(idx[: len(idx) // 2])
            test_idx.append(idx[len(idx) // 2:])
        tr, te = torch.cat(train_idx), torch.cat(test_idx)
        num_classes = int(y.max()) + 1
        r = linear_probe(X[tr], y[tr], X[te], y[te], num_classes, seed=seed)
        out[task] = r["acc1"]
    return out


def table(results: dict, steps: int, batch: int, device: str) -> str:
    head = ("| method | zero-shot shape | zero-shot colour | zero-shot shape+colour | probe shape | probe colour "
            "| train wall (s) | samples seen |")
    lines = [head, "|" + "---|" * 8]
    for m, r in results.items():
        z, p = r["zeroshot"], r["probe"]
        lines.append(f"| `{m}` | {100 * z['shape']:.1f} | {100 * z['color']:.1f} | {100 * z['shape_color']:.1f} | "
                     f"{100 * p['shape']:.1f} | {100 * p['color']:.1f} | {r['wall_s']:.0f} | {steps * batch:,} |")
    lines.append(f"| chance | {100 * CHANCE['shape']:.1f} | {100 * CHANCE['color']:.1f} | "
                 f"{100 * CHANCE['shape_color']:.1f} | 12.5 | 12.5 | | |")
    return "\n".join(lines)


def chart(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cols = [("zeroshot", "shape"), ("zeroshot", "color"), ("zeroshot", "shape_color"), ("probe", "shape"),
            ("probe", "color")]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(results)
    for i, (m, r) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(cols))], [100 * r[a][b] for a, b in cols], width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))])
    ax.set_xticklabels([f"{a}\n{b}" for a, b in cols])
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Mini CLIP-Benchmark (synthetic shapes, same towers / steps / seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_section(results_md: Path, section: str) -> None:
    text = results_md.read_text() if results_md.exists() else "# Measured results\n"
    block = f"{START}\n{section}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    results_md.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks/out/mini"))
    p.add_argument("--data-root", default=None, help="synthetic data dir (default: <work-dir>/data)")
    p.add_argument("--results", default=None, help="Markdown file to write the table into (RESULTS.md)")
    p.add_argument("--from-json", default=None, help="re-render the table / chart / section from a results.json")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        meta = saved["meta"]
        return report(saved["results"], meta, Path(args.from_json).parent, args.results)

    from declip_ds.config import load_config

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data_root) if args.data_root else work / "data"
    # the benchmark's data: rich, alt-text-like captions (the demo trains on plain ones to fit 5 minutes);
    # a user's own data.synthetic.captions=... comes later and wins
    run_overrides = [DEFAULT_CAPTIONS, *args.overrides]
    exp = load_config(ROOT / "experiments/demo_shapes.yaml", list(run_overrides))
    batch = exp.train.batch_size
    results = {}
    for m in args.methods:
        run_dir = work / m
        print(f"[mini] training {m} for {args.steps} steps ...", flush=True)
        wall = train(m, run_dir, args.steps, data_root, list(run_overrides), work / f"{m}.log")
        results[m] = {"wall_s": wall, "zeroshot": zero_shot(run_dir), "probe": probe(run_dir, data_root)}
        print(f"[mini] {m}: {json.dumps(results[m])}", flush=True)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    # "overrides": what the user typed (the command to reproduce); "run_overrides": what every run got
    meta = {"steps": args.steps, "batch_size": batch, "overrides": list(args.overrides),
            "run_overrides": run_overrides, "device": device,
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    (work / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return report(results, meta, work, args.results)


def report(results: dict, meta: dict, work: Path, results_md: str | None) -> int:
    """Print the table; with ``results_md``, write the chart next to it and the section into it."""
    steps, batch, device = meta["steps"], meta["batch_size"], meta["device"]
    tab = table(results, steps, batch, device)
    print(tab)
    png = (Path(results_md).resolve().parent if results_md else work) / "mini_clip_benchmark.png"
    has_png = chart(results, png)
    if results_md:
        typed = list(meta["overrides"])
        if "run_overrides" not in meta and typed[:1] == [DEFAULT_CAPTIONS]:
            typed = typed[1:]  # results.json written before "run_overrides" existed: the default came first
        cmd = "python benchmarks/mini_clip_benchmark.py --steps {} --results benchmarks/RESULTS.md{}".format(
            steps, "".join(f" {o}" for o in typed))
        section = (f"## Mini CLIP-Benchmark (`{cmd}`)\n\n"
                   f"All five methods trained by `train.py` on `experiments/demo_shapes.yaml` (tiny towers, 64-px "
                   f"synthetic shards, seed 0), {steps} steps x batch {batch}, one process on {device}, "
                   f"{meta['date']}. Zero-shot top-1 (%) on the synthetic eval splits; linear probe top-1 (%) "
                   f"on a seeded 50/50 per-class split of the shape / colour eval splits. Wall time includes "
                   f"start-up, the final evaluation and the checkpoint.\n\n{tab}\n")
        if has_png:
            section += f"\n![mini CLIP-Benchmark]({png.name})\n"
        write_section(Path(results_md), section)
        print(f"[mini] wrote the table into {results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
