"""Convert a checkpoint to DeepSpeed's universal format, so it resumes at another world size or ZeRO stage.

    python -m declip_ds.train.universal RUN_DIR | CHECKPOINTS_DIR | TAG_DIR [--out DIR] [--workers N]

A run dir or ``checkpoints`` dir means its newest complete tag. The result is written next to the
tag as ``<tag>_universal`` (or to ``--out``): DeepSpeed's ``ds_to_universal`` layout
(``zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt``, ``zero/optimizer_state.pt`` and the model-states
file) plus our ``rank_*.pt``, ``model.safetensors`` and ``config.yaml``, their ``SHA256SUMS`` (the
source tag's own sums are checked first: a damaged tag is refused), and a ``COMPLETE`` marker
(``"universal": true``) written last: the conversion goes to ``<out>.tmp`` and is renamed into place,
so an interrupted conversion is never resumed from. Then rerun the training command at the new size;
``--resume auto`` picks up ``<tag>_universal`` when the world size or stage differs from the tag's, and
sets DeepSpeed's ``checkpoint.load_universal`` for it. Runs on CPU: no GPU, no process group.

A ZeRO-1/2 conversion resumes at ZeRO stage 1, 2 or 3 (two small files are added for DeepSpeed's ZeRO-3
loader, see ``_loadable_by_zero3``); a ZeRO-3 conversion resumes at ZeRO-3 only (DeepSpeed 0.19.8
writes its fragments in a form only that loader reads).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from declip_ds.train import checkpoint as C

OURS = ("model.safetensors", "config.yaml")


def convert(src: str | Path, out: str | Path | None = None, workers: int = 4, force: bool = False) -> Path:
    """Convert the tag ``src`` (or the newest complete tag under it) and return the universal tag dir."""
    found = C.resolve_resume(str(src), Path(src), what="checkpoint")
    if found is None:  # resolve_resume raises for any explicit path without a complete tag
        raise C.CheckpointError(f"{src}: no complete checkpoint found.")
    tag_dir = found[0] / found[1]
    marker = C.read_marker(tag_dir)
    if marker.get("universal"):
        raise C.CheckpointError(f"{tag_dir} is already a universal checkpoint; resume from it directly.")
    problems = C.verify_tag(tag_dir, "fallback")  # a damaged tag would convert into a clean-looking one
    if problems:
        raise C.CheckpointError(f"{tag_dir} does not match its {C.CHECKSUMS}: {problems}. Convert an older tag "
                                f"instead (pass its step_XXXXXXXX dir), or restore the file(s) from a copy.")
    stage = C.saved_zero_stage(tag_dir, marker)
    if stage == 0:
        raise C.CheckpointError(
            f"{tag_dir} was saved with ZeRO stage 0: its optimizer state is not partitioned, so it already "
            f"resumes at any world size with a stage-0 --ds_config, and DeepSpeed's converter (which reads ZeRO "
            f"partitions) cannot convert it.")
    out = Path(out) if out else tag_dir.with_name(tag_dir.name + C.UNIVERSAL_SUFFIX)
    if (out / C.MARKER).is_file() and not force:
        print(f"{out} already exists and is complete; pass --force to convert again.")
        return out
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():  # left by an interrupted conversion
        shutil.rmtree(tmp)
    _ds_to_universal(tag_dir, tmp, workers)
    if stage is None:  # a marker from before zero_stage was recorded: ask DeepSpeed's optimizer file
        from deepspeed.checkpoint.ds_to_universal import _get_optim_files, _get_zero_stage

        stage = int(_get_zero_stage(_get_optim_files(str(tag_dir))))
    if stage != 3:
        _loadable_by_zero3(tmp)
    for f in [*OURS, *(p.name for p in tag_dir.glob("rank_*.pt"))]:
        if (tag_dir / f).is_file():
            _link_or_copy(tag_dir / f, tmp / f)
    C.write_checksums(tmp)  # checked like any tag's when a run resumes from the conversion
    marker = {**marker, "zero_stage": stage, "universal": True, "source": str(tag_dir)}
    C._atomic_write(tmp / C.MARKER, json.dumps(marker))  # last: the conversion is complete
    if out.exists():  # --force, or an incomplete earlier output: replaced only once the new one is whole
        shutil.rmtree(out)
    os.replace(tmp, out)
    # ds_to_universal names its output in <parent>/latest_universal; point it at the final name
    if (out.parent / "latest_universal").is_file():
        C._atomic_write(out.parent / "latest_universal", out.name)
    return out


def _ds_to_universal(tag_dir: Path, out: Path, workers: int) -> None:
    from declip_ds.train.dist import use_cpu_accelerator_if_no_gpu

    use_cpu_accelerator_if_no_gpu()
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=workers,
        num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
        # checkpoints of declip_ds before universal_checkpoint_info was saved: plain data parallel, so
        # the default info DeepSpeed injects is the right one
        inject_missing_state=True,
    )
    ds_to_universal.main(args)


def _loadable_by_zero3(out: Path) -> None:
    """DeepSpeed 0.19.8 writes the universal files of a ZeRO-1/2 checkpoint in the form its ZeRO-1/2
    loader reads; its ZeRO-3 loader (same fragments) also looks for a ZeRO-3-named model-states file
    and for the Adam step and param groups under ``optimizer_state_dict`` in ``zero/optimizer_state.pt``.
    Add both, so one conversion resumes at ZeRO stage 1, 2 or 3."""
    import torch
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS

    for f in out.glob("mp_rank_*_model_states.pt"):
        _link_or_copy(f, out / f"zero_pp_rank_0_{f.name}")
    path = out / "zero" / "optimizer_state.pt"
    sd = torch.load(path, map_location="cpu", weights_only=False)
    if OPTIMIZER_STATE_DICT in sd:
        return
    steps = sorted(out.glob("zero/*/step.pt"))
    step = torch.load(steps[0], map_location="cpu", weights_only=False) if steps else None
    sd[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}} if step is not None else {},
                                "param_groups": sd[PARAM_GROUPS]}
    torch.save(sd, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link costs no space (and the original can still be deleted by retention); a copy where
    the filesystem has none."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run dir, its checkpoints/ dir (newest complete tag) or a step_XXXXXXXX dir")
    p.add_argument("--out", default=None, help="output tag dir (default: <tag>_universal next to the tag)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes for DeepSpeed's extraction (default: min(4, CPUs))")
    p.add_argument("--force", action="store_true", help="convert again even if the output is complete")
    args = p.parse_args(argv)
    try:
        out = convert(args.checkpoint, args.out, workers=args.workers, force=args.force)
    except C.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"universal checkpoint: {out}\nrerun the training command at the new world size (--resume auto uses it, "
          f"or pass --resume {out}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
