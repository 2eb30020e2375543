"""Zero-shot evaluation of a checkpoint on labelled shard directories.

    python eval_zeroshot.py --checkpoint runs/demo_shapes --data data/shapes/eval --out results.json

--data is either one task directory (classnames.txt, templates.txt, *.tar with a "cls" label), a
directory of such task directories (all are evaluated), or an image folder (one subfolder of images
per class, ImageNet-val layout, optional classnames.txt / classnames.json class index: see
declip_ds/eval/datasets.py; ImageNet wnid folders (n01440764, ...) are named with OpenAI's class names;
pass --templates simple|imagenet80|FILE unless it holds a templates.txt).
Images: Resize + CenterCrop as the checkpoint format evaluates (ours: the run's data.normalize,
eval.interpolation, eval.crop_ratio; OpenAI / open_clip: Resize(224) bicubic, OpenAI mean/std; DeCLIP
releases: Resize(256) bilinear, ImageNet mean/std; see load_for_eval), or --normalize / --interpolation /
--crop-ratio.
Several ranks (torchrun / deepspeed launcher, or mpirun / srun with MASTER_ADDR and MASTER_PORT exported)
split the shards (or the images of a folder) and sum the counts, which gives exactly the single-process
numbers. An error on one rank (an unreadable image, a path missing on its node) stops every rank with exit
code 2, each naming the rank that failed; only rank 0 prints the table and writes --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def task_dirs(data: Path, tasks: list[str] | None) -> dict[str, Path]:
    from declip_ds.eval.datasets import is_image_folder
    from declip_ds.eval.report import dataset_name

    if is_image_folder(data):  # imagenet/val -> "imagenet", as the linear probe names it
        return {dataset_name(data): data}
    if (data / "classnames.txt").is_file():
        return {data.name: data}
    found = {p.name: p for p in sorted(data.iterdir()) if (p / "classnames.txt").is_file()} if data.is_dir() else {}
    if tasks:
        missing = [t for t in tasks if t not in found]
        if missing:
            raise FileNotFoundError(f"tasks {missing} not found in {data} (found: {sorted(found)}).")
        found = {t: found[t] for t in tasks}
    if not found:
        raise FileNotFoundError(f"No evaluation data in '{data}': expected classnames.txt and *.tar there or in its "
                                "subfolders, or an image folder (one subfolder of images per class).")
    return found


def evaluate_image_folder(model, tokenizer, root: Path, *, templates: str, image_size: int, normalize,
                          batch_size: int, rank: int, world_size: int, group, workers: int,
                          interpolation: str = "bicubic", crop_ratio: float = 224 / 256, scoring: str = "global",
                          mask_padding: bool = True, token_renorm: str = "position") -> dict:
    """Zero-shot on an image folder (class names from its class index, ImageNet wnids or folder names);
    ``scoring`` global (embeddings) or token (FILIP's token classifier, ``mask_padding`` / ``token_renorm``)."""
    from declip_ds.data.transforms import eval_transform
    from declip_ds.eval.datasets import open_dataset
    from declip_ds.eval.zero_shot import (load_templates, zero_shot_classifier, zero_shot_evaluate,
                                          zero_shot_token_classifier)
    from declip_ds.train.dist import errors_shared

    with errors_shared(group):  # the files, read on every rank: one rank's error stops them all here
        data = open_dataset(root, eval_transform(image_size, normalize=normalize, crop_ratio=crop_ratio,
                                                 interpolation=interpolation))
        prompts = load_templates(templates, root)
        loader = data.loader(batch_size, rank=rank, world_size=world_size, workers=workers)
    if scoring == "token":
        W = zero_shot_token_classifier(model, tokenizer, data.classnames, prompts, mask_padding=mask_padding,
                                       renorm=token_renorm)
    else:
        W = zero_shot_classifier(model, tokenizer, data.classnames, prompts)
    result = zero_shot_evaluate(model, W, loader, group=group, image_size=image_size)
    from declip_ds.eval.report import dataset_name
    from declip_ds.eval.zero_shot import check_imagenet_task

    check_imagenet_task(dataset_name(root), data.classnames, result["n"])
    return result


def evaluate(model, tokenizer, d: Path, *, scoring: str, token: dict, **kw) -> dict:
    from declip_ds.eval.datasets import is_image_folder
    from declip_ds.eval.zero_shot import evaluate_task_dir

    if is_image_folder(d):
        return evaluate_image_folder(model, tokenizer, d, scoring=scoring, **token, **kw)
    return evaluate_task_dir(model, tokenizer, d, scoring=scoring, **token, **kw)


def main(argv=None) -> int:
    from declip_ds.models.pretrained import FORMATS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, step_XXXXXXXX dir or model.safetensors")
    p.add_argument("--data", "--dataset", dest="data", required=True, help="task dir or dir of task dirs")
    p.add_argument("--tasks", nargs="*", default=None, help="subset of task names")
    p.add_argument("--templates", default="synthetic", help="synthetic (the task's templates.txt) | simple | imagenet80 | FILE")
    p.add_argument("--scoring", default=None, choices=["global", "token"],
                   help="global embeddings, or FILIP token-wise scoring (default: what the method trained for)")
    p.add_argument("--format", default="auto", choices=list(FORMATS),
                   help="checkpoint format (auto-detected by default)")
    from declip_ds.eval.zero_shot import add_token_args
    from declip_ds.models.pretrained import add_preprocess_args

    add_token_args(p)

    add_preprocess_args(p)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)

    from declip_ds.train.dist import run_eval_script

    return run_eval_script(lambda rank, world, group: run(args, rank, world, group))


def run(args, rank: int, world: int, group) -> int:
    """main's work on this rank: every task on this rank's share of the data, the table and the record on rank
    0. An error on any rank is raised on every rank (declip_ds.train.dist.share_error), not only where it
    happened: the others would wait in the next collective for the process-group timeout."""
    from declip_ds.data.tokenizer import Tokenizer
    from declip_ds.eval.zero_shot import format_table, token_settings
    from declip_ds.models.pretrained import load_for_eval
    from declip_ds.train.dist import errors_shared, init_eval_ranks

    with errors_shared(group):  # a rank-local path problem (data, checkpoint) stops every rank here
        tasks = task_dirs(Path(args.data), args.tasks)
        em = load_for_eval(args.checkpoint, args.format, normalize=args.normalize,
                           interpolation=args.interpolation, crop_ratio=args.crop_ratio)
    model, weights = em.model, em.weights
    scoring = args.scoring or getattr(em.method, "zero_shot_scoring", "global")
    if scoring == "global":
        em.warn_if_global_untrained("zero-shot with --scoring global")
    model, rank, world, group = init_eval_ranks(model)  # the group joined in main; the model to this rank's GPU
    tok = Tokenizer(context_length=em.context_length, mask_token=em.mask_token)
    if rank == 0:
        print(f"preprocessing: {em.describe_preprocess()}", file=sys.stderr)
    results = {
        name: evaluate(model, tok, d, templates=args.templates, image_size=em.image_size,
                       normalize=em.normalize, interpolation=em.interpolation, crop_ratio=em.crop_ratio,
                       batch_size=args.batch_size, rank=rank,
                       world_size=world, group=group, workers=args.workers,
                       scoring=scoring, token=token_settings(em.method, args))
        for name, d in tasks.items()
    }
    if rank == 0:
        print(format_table(results))
        if args.out:
            from declip_ds.eval.report import make_record, write_record

            token = token_settings(em.method, args) if scoring == "token" else {}
            write_record(make_record(model=em.name, checkpoint=str(weights),
                                     dataset=str(args.data), task="zeroshot", templates=args.templates,
                                     scoring=scoring, **token,
                                     preprocess=em.preprocess(), metrics=results, config_hash=em.config_hash),
                         args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
