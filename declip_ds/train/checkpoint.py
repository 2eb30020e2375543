"""Crash-safe checkpoints around DeepSpeed's engine checkpoint.

Layout of ``<output_dir>/checkpoints``::

    step_00000500/            DeepSpeed's files (model, optimizer / ZeRO partitions, scheduler)
        rank_00000.pt         per-rank state: RNG states and method state (e.g. DeCLIP's queue)
        model.safetensors     the full model weights (fp32), for evaluation and export
        config.yaml           the resolved experiment config
        COMPLETE              written by rank 0 after a barrier: the commit marker
    latest                    the newest complete tag, replaced atomically after COMPLETE

A tag without ``COMPLETE`` is never resumed from and never counts for retention, so a rank that
dies mid-save loses nothing: the previous complete tag is still there and ``latest`` still names it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from declip_ds.train import dist as D
from declip_ds.train.guard import fault

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step_(\d{8})$")
MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete tags in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / MARKER).is_file()]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------- save


def _full_state_dict(engine) -> dict[str, torch.Tensor]:
    """All parameters and buffers on rank 0 in fp32 (gathers ZeRO-3 partitions; collective)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if D.rank() == 0 else {}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if D.rank() == 0 else {}


def save(engine, method, ckpt_dir: Path, step: int, client_state: dict, config_yaml: str, keep_last: int) -> Path:
    """Save ``step`` on every rank (collective), commit it, then apply retention."""
    from safetensors.torch import save_file

    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if D.rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # a leftover incomplete save of the same step: start clean
            shutil.rmtree(tag_dir)
    D.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if fault("crash_in_save", step):  # test hook: this rank dies half way through the save
        os._exit(9)
    per_rank = {"rng": rng_state(), "method": method.extra_state(), "step": step, "world_size": D.world_size()}
    rank_file = tag_dir / f"rank_{D.rank():05d}.pt"
    torch.save(per_rank, rank_file.with_suffix(".tmp"))
    os.replace(rank_file.with_suffix(".tmp"), rank_file)
    weights = _full_state_dict(engine)
    if D.rank() == 0:
        # "model." keys of the method hold the DualEncoder; method heads keep their own names
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tag_dir / "model.safetensors"))
        _atomic_write(tag_dir / "config.yaml", config_yaml)
    D.barrier()  # every rank's files are on disk
    if D.rank() == 0:
        _atomic_write(tag_dir / MARKER, json.dumps({"step": step, "time": time.time(), "world_size": D.world_size()}))
        _atomic_write(ckpt_dir / "latest", tag)
        _retain(ckpt_dir, keep_last, keep=tag)
    D.barrier()
    return tag_dir


def _retain(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    """Delete all but the ``keep_last`` newest complete tags (0 = keep everything); incomplete ones
    older than the newest complete tag are leftovers of crashed saves and go too."""
    if keep_last <= 0:
        return
    tags = complete_tags(ckpt_dir)
    doomed = [t for t in tags[:-keep_last] if t != keep]
    newest = int(TAG_RE.match(tags[-1]).group(1)) if tags else -1
    for p in ckpt_dir.iterdir():
        m = TAG_RE.match(p.name)
        if m and not (p / MARKER).is_file() and int(m.group(1)) < newest:
            doomed.append(p.name)
    for t in doomed:
        try:
            shutil.rmtree(ckpt_dir / t)
        except OSError as e:  # never fatal: an extra old checkpoint is harmless
            log.warning("could not delete old checkpoint %s: %s", ckpt_dir / t, e)


# ----------------------------------------------------------------------------- resume


def resolve_resume(resume: str, run_dir: Path) -> tuple[Path, str] | None:
    """``auto`` -> newest complete tag under ``run_dir`` (None: start fresh); ``none`` -> None;
    otherwise a path to a run dir, its ``checkpoints`` dir or a tag dir, which must exist."""
    if resume == "none":
        return None
    if resume == "auto":
        tags = complete_tags(run_dir / "checkpoints")
        return (run_dir / "checkpoints", tags[-1]) if tags else None
    p = Path(resume)
    if not p.exists():
        raise CheckpointError(f"--resume {resume}: no such file or directory. Pass an existing checkpoint "
                              f"directory, or --resume auto to continue from the newest one in train.output_dir.")
    if TAG_RE.match(p.name):
        if not (p / MARKER).is_file():
            raise CheckpointError(f"--resume {p}: this checkpoint is incomplete (no {MARKER} marker; its save "
                                  f"was interrupted). Resume from an older tag in {p.parent}.")
        return p.parent, p.name
    for d in (p / "checkpoints", p):
        tags = complete_tags(d)
        if tags:
            return d, tags[-1]
    raise CheckpointError(f"--resume {p}: no complete checkpoint (step_XXXXXXXX/{MARKER}) found there.")


def load(engine, method, ckpt_dir: Path, tag: str) -> dict:
    """Load engine state (+ optimizer and scheduler), this rank's RNG and method state; returns client state."""
    per_rank_file = ckpt_dir / tag / f"rank_{D.rank():05d}.pt"
    if not per_rank_file.is_file():
        saved = json.loads((ckpt_dir / tag / MARKER).read_text()).get("world_size")
        raise CheckpointError(
            f"{ckpt_dir / tag} was saved by {saved} ranks but this run has {D.world_size()}: "
            f"{per_rank_file.name} is missing. Resume with the same number of ranks."
        )
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}.")
    per_rank = torch.load(per_rank_file, map_location="cpu", weights_only=True)
    set_rng_state(per_rank["rng"])
    method.load_extra_state(per_rank["method"])
    return client or {}
