"""Zero-shot evaluation of a checkpoint on labelled shard directories.

    python eval_zeroshot.py --checkpoint runs/demo_shapes --data data/shapes/eval --out results.json

--data is either one task directory (classnames.txt, templates.txt, *.tar with a "cls" label) or a
directory of such task directories (all are evaluated). Several ranks (torchrun / deepspeed
launcher) split the shards and sum the counts, which gives exactly the single-process numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path


def task_dirs(data: Path, tasks: list[str] | None) -> dict[str, Path]:
    if (data / "classnames.txt").is_file():
        return {data.name: data}
    found = {p.name: p for p in sorted(data.iterdir()) if (p / "classnames.txt").is_file()} if data.is_dir() else {}
    if tasks:
        missing = [t for t in tasks if t not in found]
        if missing:
            raise FileNotFoundError(f"tasks {missing} not found in {data} (found: {sorted(found)}).")
        found = {t: found[t] for t in tasks}
    if not found:
        raise FileNotFoundError(f"No evaluation data in '{data}': expected classnames.txt and *.tar there or in its subfolders.")
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, step_XXXXXXXX dir or model.safetensors")
    p.add_argument("--data", "--dataset", dest="data", required=True, help="task dir or dir of task dirs")
    p.add_argument("--tasks", nargs="*", default=None, help="subset of task names")
    p.add_argument("--templates", default="synthetic", help="synthetic (the task's templates.txt) | simple | imagenet80 | FILE")
    p.add_argument("--scoring", default=None, choices=["global", "token"],
                   help="global embeddings, or FILIP token-wise scoring (default: what the method trained for)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from declip_ds.data.tokenizer import Tokenizer
    from declip_ds.eval.zero_shot import evaluate_task_dir, format_table
    from declip_ds.models.pretrained import load_experiment, load_pretrained

    try:
        tasks = task_dirs(Path(args.data), args.tasks)
        exp, weights = load_experiment(args.checkpoint)
        model = load_pretrained(args.checkpoint)
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank, world, group = 0, 1, None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        model = model.cuda()
    tok = Tokenizer(context_length=exp.model.text.context_length, mask_token=exp.model.text.mask_token)
    results = {
        name: evaluate_task_dir(model, tok, d, templates=args.templates, image_size=exp.model.vision.image_size,
                                normalize=exp.data.normalize, batch_size=args.batch_size, rank=rank,
                                world_size=world, group=group, workers=args.workers,
                                scoring=args.scoring or getattr(exp.method, "zero_shot_scoring", "global"),
                                mask_padding=getattr(exp.method, "mask_padding", True))
        for name, d in tasks.items()
    }
    if rank == 0:
        print(format_table(results))
        if args.out:
            from declip_ds.config import config_hash

            record = {"model": f"{exp.method.name}/{exp.model.vision.name}", "checkpoint": str(weights),
                      "dataset": str(args.data), "task": "zeroshot", "templates": args.templates,
                      "metrics": results, "config_hash": config_hash(exp),
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(record, indent=2))
    if group is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
