"""Crash-safe checkpoints around DeepSpeed's engine checkpoint.

Layout of ``<output_dir>/checkpoints``::

    step_00000500/            DeepSpeed's files (model, optimizer / ZeRO partitions, scheduler)
        rank_00000.pt         per-rank state: RNG states, method state (e.g. DeCLIP's queue), the bad-step
                              guard's and where each loader stream's consumed batches end
        model.safetensors     the full model weights (fp32), for evaluation and export
        config.yaml           the resolved experiment config
        SHA256SUMS            the SHA-256 of every file above (``sha256sum -c SHA256SUMS`` checks
                              them by hand); hashed by all ranks, a share each, before the commit
        COMPLETE              written by rank 0 after a barrier: the commit marker (JSON: step,
                              world_size, zero_stage, precision)
    step_00000500_universal/  optional: the same step converted by ``python -m declip_ds.train.universal``
                              (DeepSpeed's universal layout ``zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt``
                              plus our per-rank, weight, config and COMPLETE files); resumable at any
                              world size and ZeRO stage >= 1
    latest                    the newest complete tag, replaced atomically after COMPLETE
    abandoned_<time>/         complete tags newer than the step a run resumed from (another branch, or
                              tags that could not be loaded), moved here by ``set_aside_newer``; never
                              resumed from, rolled back to or deleted automatically

A tag without ``COMPLETE`` is never resumed from and never counts for retention, so a rank that
dies mid-save loses nothing: the previous complete tag is still there and ``latest`` still names it.
A complete tag whose files cannot be read on some rank is skipped by every rank together (``_agree``),
with a warning naming the files, for the next older one (``resume_from``; not for a tag named with
--resume PATH, and never back to step 0). Before loading, ``check_config`` compares the tag's
``config.yaml`` with the run's: changes are logged, the optimizer settings of the run's config win
(``OPTIMIZER_KEYS``), and changes that alter the parameters fail naming the keys. Test hook:
``DECLIP_DS_FAULTS=load_fails@STEP:RANK`` fails the load of tag STEP after DeepSpeed restored it.

World size and ZeRO stage are part of a ZeRO checkpoint: each rank's optimizer partition is its own
file. ``plan_resume`` compares them with the run's before any process group exists; a different
world size or stage resumes from the tag's universal conversion (DeepSpeed's
``checkpoint.load_universal``) or fails naming the command that makes it. Per-rank RNG states only
apply at the world size that saved them; at another one every rank is reseeded from
(seed, rank, step) instead (see ``load``).

Integrity (``train.checkpoint_integrity``). A truncated file fails to unpickle, but a flipped bit in a
tensor's bytes loads silently (torch does not check the zip CRCs) and would resume a run from damaged
weights or Adam moments. So every save writes ``SHA256SUMS`` and every load first checks the files it
lists (each rank a share, largest files spread first): ``fallback`` (default) treats a mismatch like an
unreadable file (warning naming it, next older complete tag); ``strict`` refuses any tag that fails a
check or has no ``SHA256SUMS`` (CheckpointError naming the file, no fallback: the user decides);
``none`` neither writes nor checks checksums (the readability checks stay).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from declip_ds.train import dist as D
from declip_ds.train.guard import fault

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step_(\d{8})$")
UNIVERSAL_SUFFIX = "_universal"
MARKER = "COMPLETE"
CHECKSUMS = "SHA256SUMS"
CONVERT_CMD = "python -m declip_ds.train.universal"


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


def read_marker(tag_dir: Path) -> dict:
    """The COMPLETE marker's JSON: step, time, world_size, zero_stage, precision, config_hash and the
    declip_ds / torch / deepspeed versions (older markers lack the last four)."""
    try:
        marker = json.loads((tag_dir / MARKER).read_text() or "{}")
        if not isinstance(marker, dict):
            raise ValueError(f"a JSON {type(marker).__name__}, not an object")
        return marker
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{tag_dir / MARKER}: unreadable commit marker ({e}). Resume from another tag.") from None


def saved_zero_stage(tag_dir: Path, marker: dict | None = None) -> int | None:
    """The ZeRO stage a tag was saved with: from its marker, else from DeepSpeed's file names
    (3: per-rank model states; 0: no optimizer partitions; None: stage 1 or 2, undecidable by name)."""
    marker = read_marker(tag_dir) if marker is None else marker
    if marker.get("zero_stage") is not None:
        return int(marker["zero_stage"])
    if any(tag_dir.glob("*zero_pp_rank_*_model_states.pt")):
        return 3
    if not any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        return 0
    return None


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


def reseed(seed: int, rank: int, step: int) -> None:
    """Python, NumPy and torch RNGs as a pure function of (seed, rank, step): used when the saved
    per-rank RNG states do not apply (a resume at another world size)."""
    s = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# ----------------------------------------------------------------------------- save


def _full_state_dict(engine) -> dict[str, torch.Tensor]:
    """All parameters and buffers on rank 0 in fp32 (gathers ZeRO-3 partitions; collective)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if D.rank() == 0 else {}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if D.rank() == 0 else {}


def mark_universal(module) -> None:
    """Make DeepSpeed write ``universal_checkpoint_info`` into the checkpoint, which its
    ``ds_to_universal`` converter asserts. DeepSpeed takes it from this module attribute (on its MoE
    save path the client-state key of that name is reserved). Our models are plain data parallel
    (no tensor / pipeline slicing), so the version alone describes them."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    if getattr(module, UNIVERSAL_CHECKPOINT_INFO, None) is None:
        info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        setattr(module, UNIVERSAL_CHECKPOINT_INFO, info)


def save(engine, method, ckpt_dir: Path, step: int, client_state: dict, config_yaml: str, keep_last: int,
         guard_state: dict | None = None, integrity: str = "fallback", data_state: dict | None = None) -> Path:
    """Save ``step`` on every rank (collective), checksum its files (unless ``integrity`` is "none"),
    commit it, then apply retention. Kept in this rank's file: ``guard_state`` (the bad-step guard's
    running loss mean and counts) and ``data_state`` (where its loader's streams are)."""
    from safetensors.torch import save_file

    mark_universal(engine.module)

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
    per_rank = {"rng": rng_state(), "method": method.extra_state(), "step": step, "world_size": D.world_size(),
                "guard": guard_state or {}, "data": data_state or {}}
    rank_file = tag_dir / f"rank_{D.rank():05d}.pt"
    torch.save(per_rank, rank_file.with_suffix(".tmp"))
    os.replace(rank_file.with_suffix(".tmp"), rank_file)
    weights = _full_state_dict(engine)
    if D.rank() == 0:
        # "model." keys of the method hold the DualEncoder; method heads keep their own names
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tag_dir / "model.safetensors"))
        _atomic_write(tag_dir / "config.yaml", config_yaml)
    D.barrier()  # every rank's files are on disk
    if integrity != "none":
        write_checksums(tag_dir)
    if D.rank() == 0:
        marker = {"step": step, "time": time.time(), "world_size": D.world_size(),
                  "zero_stage": engine.zero_optimization_stage(), "precision": client_state.get("precision"),
                  "config_hash": client_state.get("config_hash"), "versions": client_state.get("versions")}
        _atomic_write(tag_dir / MARKER, json.dumps(marker))
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
        for d in (ckpt_dir / (t + UNIVERSAL_SUFFIX), ckpt_dir / t):  # a conversion goes with its tag
            if not d.exists():
                continue
            try:
                # the commit marker first: a delete that fails half way (a busy file on NFS) leaves an
                # incomplete tag, never one that still counts as complete with files missing
                (d / MARKER).unlink(missing_ok=True)
                shutil.rmtree(d)
            except OSError as e:  # never fatal: an extra old checkpoint is harmless
                log.warning("could not delete old checkpoint %s: %s", d, e)


# ----------------------------------------------------------------------------- checksums


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _tag_files(tag_dir: Path) -> list[tuple[str, int]]:
    """(path relative to ``tag_dir``, size) of every file a checksum covers: all but the marker, the
    manifest itself and temporary files, sorted by name."""
    out = []
    for p in sorted(tag_dir.rglob("*")):
        rel = p.relative_to(tag_dir).as_posix()
        if p.is_file() and rel not in (MARKER, CHECKSUMS) and ".tmp" not in p.name:
            out.append((rel, p.stat().st_size))
    return out


def share(files: list[tuple[str, int]], world: int, rank: int) -> list[str]:
    """This rank's share of ``files`` to hash: largest first, each onto the least loaded rank (ties: lowest
    rank), so every file is hashed by exactly one rank and the bytes spread evenly."""
    load = [0] * world
    mine = []
    for name, size in sorted(files, key=lambda f: (-f[1], f[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += size
        if r == rank:
            mine.append(name)
    return mine


def write_checksums(tag_dir: Path) -> None:
    """Collective: every rank hashes its share of rank 0's listing of ``tag_dir``; rank 0 writes
    ``SHA256SUMS`` (``sha256sum``'s format). A file that cannot be read back fails the save on every
    rank (the tag stays uncommitted; the previous one is untouched)."""
    files = D.gather_objects(_tag_files(tag_dir) if D.rank() == 0 else None)[0]
    digests, err = {}, None
    try:
        for name in share(files, D.world_size(), D.rank()):
            digests[name] = sha256_file(tag_dir / name)
    except OSError as e:
        err = f"{e.filename or tag_dir}: cannot read it back to checksum it ({e.strerror or e})"
    every = D.gather_objects((digests, err))
    bad = [e for _, e in every if e]
    if bad:
        raise CheckpointError(f"saving {tag_dir} failed: {'; '.join(bad)}. The tag is left uncommitted; the "
                              f"previous complete checkpoint is unchanged. Check the filesystem of train.output_dir.")
    if D.rank() == 0:
        merged = {k: v for d, _ in every for k, v in d.items()}
        _atomic_write(tag_dir / CHECKSUMS, "".join(f"{merged[n]}  {n}\n" for n, _ in files))


def read_checksums(tag_dir: Path) -> dict[str, str] | None:
    """``SHA256SUMS`` of a tag as {relative path: hex digest}; None when the tag has none (saved before
    checksums, or with train.checkpoint_integrity=none)."""
    path = tag_dir / CHECKSUMS
    if not path.is_file():
        return None
    out = {}
    try:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            digest, sep, name = line.partition("  ")
            if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"line {i} is not '<sha256>  <file>'")
            out[name.lstrip("*")] = digest
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checksum list ({e})") from None
    return out


def verify_files(tag_dir: Path, sums: dict[str, str], names: list[str]) -> list[str]:
    """Problems with ``names`` (keys of ``sums``) in ``tag_dir``: missing, unreadable or a digest that
    differs from ``SHA256SUMS``, each naming the file."""
    problems = []
    for name in names:
        path = tag_dir / name
        try:
            found = sha256_file(path)
        except FileNotFoundError:
            problems.append(f"{path}: missing (listed in {CHECKSUMS})")
            continue
        except OSError as e:
            problems.append(f"{path}: unreadable ({e.strerror or e})")
            continue
        if found != sums[name]:
            problems.append(f"{path}: SHA-256 checksum mismatch (saved {sums[name][:16]}..., now {found[:16]}...): "
                            f"the file changed after it was saved (disk, copy or transfer damage)")
    return problems


def verify_tag(tag_dir: Path, integrity: str, rank: int = 0, world: int = 1) -> str | None:
    """Check this rank's share of ``tag_dir``'s ``SHA256SUMS`` (all of it for rank 0 of 1); returns the
    problems as one message, or None. A tag without the list passes unless ``integrity`` is "strict"."""
    if integrity == "none":
        return None
    sums = read_checksums(tag_dir)
    if sums is None:
        if integrity == "strict":
            return (f"{tag_dir / CHECKSUMS} is missing (the tag was saved before checksums, or with "
                    f"train.checkpoint_integrity=none), and train.checkpoint_integrity=strict only resumes from "
                    f"verified checkpoints")
        return None
    sizes = []
    for name in sums:
        try:
            sizes.append((name, (tag_dir / name).stat().st_size))
        except OSError:
            sizes.append((name, 0))
    problems = verify_files(tag_dir, sums, share(sizes, world, rank))
    return "; ".join(problems) or None


# ----------------------------------------------------------------------------- resume


def _is_tag_dir(p: Path) -> bool:
    name = p.name[: -len(UNIVERSAL_SUFFIX)] if p.name.endswith(UNIVERSAL_SUFFIX) else p.name
    return bool(TAG_RE.match(name)) or (p / MARKER).is_file()


def resolve_resume(resume: str, run_dir: Path, what: str = "--resume") -> tuple[Path, str] | None:
    """``auto`` -> newest complete tag under ``run_dir`` (None: start fresh); ``none`` -> None;
    otherwise a path to a run dir, its ``checkpoints`` dir or a tag dir (a universal one too),
    which must exist. ``what``: how errors name the path's source ("--resume", or another command's)."""
    if resume == "none":
        return None
    if resume == "auto":
        tags = complete_tags(run_dir / "checkpoints")
        if tags and fault("hide_newest", tag_step(tags[-1])):  # test hook: this rank misses the newest tag
            tags = tags[:-1]
        return (run_dir / "checkpoints", tags[-1]) if tags else None
    p = Path(resume)
    if not p.exists():
        raise CheckpointError(f"{what} {resume}: no such file or directory. Pass an existing checkpoint directory"
                              + (", or --resume auto to continue from the newest one in train.output_dir."
                                 if what == "--resume" else "."))
    if _is_tag_dir(p):
        if not (p / MARKER).is_file():
            raise CheckpointError(f"{what} {p}: this checkpoint is incomplete (no {MARKER} marker; its save "
                                  f"was interrupted). Use an older tag in {p.parent}.")
        return p.parent, p.name
    for d in (p / "checkpoints", p):
        tags = complete_tags(d)
        if tags:
            return d, tags[-1]
    raise CheckpointError(f"{what} {p}: no complete checkpoint (step_XXXXXXXX/{MARKER}) found there.")


@dataclass(frozen=True)
class ResumeTarget:
    """A complete tag to resume from; ``universal``: through DeepSpeed's ``load_universal`` path.
    ``world_size`` / ``zero_stage``: what saved it (None when the marker does not say)."""

    ckpt_dir: Path
    tag: str
    universal: bool = False
    world_size: int | None = None
    zero_stage: int | None = None
    explicit: bool = False  # the user named this tag (--resume PATH): no fallback to an older one

    @property
    def path(self) -> Path:
        return self.ckpt_dir / self.tag

    @property
    def step(self) -> int:
        return tag_step(self.tag)


def tag_step(tag: str) -> int:
    """The step of ``step_XXXXXXXX`` or ``step_XXXXXXXX_universal`` (-1 for any other name)."""
    m = TAG_RE.match(tag[: -len(UNIVERSAL_SUFFIX)] if tag.endswith(UNIVERSAL_SUFFIX) else tag)
    return int(m.group(1)) if m else -1


def plan_resume(resume: str, run_dir: Path, world_size: int, zero_stage: int) -> ResumeTarget | None:
    """``resolve_resume``, then fit the checkpoint to this run's world size and ZeRO stage (no process
    group needed, so a mismatch fails before anything starts):

    - same world size and stage, or ZeRO 0 on both sides (its optimizer state is not partitioned):
      resume the tag as it is;
    - a universal conversion (given, or ``<tag>_universal`` next to the tag): resume through
      DeepSpeed's ``load_universal``, which re-partitions to any world size and ZeRO stage >= 1;
    - otherwise: CheckpointError naming both sizes and the conversion command.
    """
    found = resolve_resume(resume, run_dir)
    if found is None:
        return None
    ckpt_dir, tag = found
    if resume != "auto" and _is_tag_dir(Path(resume)):  # the user named this tag: it or nothing
        return _fit(ckpt_dir, tag, world_size, zero_stage, read_marker(ckpt_dir / tag), explicit=True)
    failures: list[str] = []
    target = next_target(ckpt_dir, tag_step(tag) + 1, world_size, zero_stage, failures)
    if target is None:
        raise CheckpointError(f"no complete checkpoint in {ckpt_dir} can be read: {'; '.join(failures)}. Refusing to "
                              f"start from step 0: repair or move them away, or pass --resume none to start over.")
    return target


def next_target(ckpt_dir: Path, below: int, world_size: int, zero_stage: int,
                failures: list[str]) -> ResumeTarget | None:
    """The newest complete tag in ``ckpt_dir`` before step ``below``, fitted to this run (``plan_resume``);
    tags whose commit marker cannot be read are skipped with a warning and added to ``failures``."""
    for tag in reversed(complete_tags(ckpt_dir)):
        if tag_step(tag) >= below:
            continue
        try:
            marker = read_marker(ckpt_dir / tag)
        except CheckpointError as e:
            log.warning("%s; trying the next older complete checkpoint", e)
            failures.append(str(e))
            continue
        return _fit(ckpt_dir, tag, world_size, zero_stage, marker)
    return None


def _fit(ckpt_dir: Path, tag: str, world_size: int, zero_stage: int, marker: dict,
         explicit: bool = False) -> ResumeTarget:
    """``tag`` as a ResumeTarget for this world size and ZeRO stage (see ``plan_resume``)."""
    saved_world, saved_stage = marker.get("world_size"), saved_zero_stage(ckpt_dir / tag, marker)
    if marker.get("universal"):
        _check_universal_stage(ckpt_dir / tag, zero_stage, saved_stage)
        return ResumeTarget(ckpt_dir, tag, True, saved_world, saved_stage, explicit)
    same_world = saved_world is None or int(saved_world) == world_size
    same_stage = saved_stage == zero_stage or (saved_stage is None and zero_stage in (1, 2))
    if (same_world and same_stage) or (saved_stage == 0 and zero_stage == 0):
        return ResumeTarget(ckpt_dir, tag, False, saved_world, saved_stage, explicit)
    what = (f"{saved_world} rank(s), ZeRO stage {_stage_str(saved_stage)}",
            f"{world_size} rank(s), ZeRO stage {zero_stage}")
    if saved_stage == 0:
        raise CheckpointError(
            f"{ckpt_dir / tag} was saved with {what[0]} but this run has {what[1]}. A ZeRO-0 checkpoint holds "
            f"the whole optimizer state and resumes at any world size, but only with ZeRO stage 0 (DeepSpeed's "
            f"universal converter needs ZeRO partitions): rerun with a stage-0 --ds_config (ds_configs/zero0.json).")
    sibling = ckpt_dir / (tag + UNIVERSAL_SUFFIX)
    if (sibling / MARKER).is_file():
        _check_universal_stage(sibling, zero_stage, saved_stage)
        log.info("%s was saved with %s; this run has %s: resuming from its universal conversion %s",
                 ckpt_dir / tag, *what, sibling)
        return ResumeTarget(ckpt_dir, sibling.name, True, saved_world, saved_stage, explicit)
    raise CheckpointError(
        f"{ckpt_dir / tag} was saved with {what[0]} but this run has {what[1]}. ZeRO checkpoints hold one "
        f"optimizer partition per rank, so they only load at the world size and stage that saved them. "
        f"Convert it once to a universal checkpoint (written next to it as {sibling.name}):\n"
        f"    {CONVERT_CMD} {ckpt_dir / tag}\n"
        f"then rerun this command; it resumes from the conversion. Or resume with the original "
        f"{saved_world} rank(s) and ZeRO stage {_stage_str(saved_stage)}.")


def _stage_str(stage: int | None) -> str:
    return "1 or 2" if stage is None else str(stage)


def _check_universal_stage(tag_dir: Path, zero_stage: int, saved_stage: int | None) -> None:
    if zero_stage == 0:
        raise CheckpointError(
            f"{tag_dir} is a universal checkpoint, which DeepSpeed loads into ZeRO stage 1, 2 or 3 only, but "
            f"this run uses ZeRO stage 0. Rerun with a ZeRO --ds_config (e.g. ds_configs/zero1.json).")
    if saved_stage == 3 and zero_stage != 3:
        raise CheckpointError(
            f"{tag_dir} was converted from a ZeRO-3 checkpoint; DeepSpeed writes those universal files in a form "
            f"only its ZeRO-3 loader reads, and this run uses ZeRO stage {zero_stage}. Resume with a stage-3 "
            f"--ds_config (any world size).")


def _set_load_universal(engine, universal: bool) -> None:
    """DeepSpeed reads ``checkpoint.load_universal`` (engine._config) only inside load_checkpoint; the
    trainer sets it in the DS config for its first resume, and a later rollback may target the
    other kind of tag."""
    engine._config.load_universal_checkpoint = universal


def load(engine, method, target: ResumeTarget, seed: int = 0, integrity: str = "fallback") -> dict:
    """Load engine state (+ optimizer and scheduler), this rank's RNG and method state; returns
    client state. First the ranks check the tag's ``SHA256SUMS`` together (``verify_tag``, a share
    each; ``integrity``: see the module docstring). At another world size than the one that saved
    ``target`` (a universal or a ZeRO-0 checkpoint), rank r takes the method state of saved rank
    ``r % saved_world`` and reseeds its RNGs from (seed, rank, step): saved RNG streams belong to ranks
    that no longer exist."""
    tag_dir = target.path
    saved_world = int(target.world_size or D.world_size())
    same_world = saved_world == D.world_size()
    per_rank_file = tag_dir / f"rank_{D.rank() % saved_world:05d}.pt"
    per_rank, err = None, None
    try:
        err = verify_tag(tag_dir, integrity, D.rank(), D.world_size())
    except CheckpointError as e:
        err = str(e)
    if err is None:  # then open what this rank will read, so a damaged file is found before anything is loaded
        try:
            per_rank = _preflight(tag_dir, per_rank_file, saved_world, None if target.universal else target.zero_stage)
        except Exception as e:  # noqa: BLE001 - any failure to read is reported, then the ranks agree
            err = str(e) if isinstance(e, CheckpointError) else f"{per_rank_file}: {type(e).__name__}: {e}"
    _agree(err)  # one collective for both checks
    _set_load_universal(engine, target.universal)
    try:
        path, client = engine.load_checkpoint(str(target.ckpt_dir), tag=target.tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no model states file in {tag_dir}")
        client = client or {}
        if target.universal:
            _after_universal_load(engine, tag_dir)
        if fault("load_fails", target.step):  # test hook: the load fails after DeepSpeed restored the engine
            raise RuntimeError("injected load failure (DECLIP_DS_FAULTS=load_fails)")
        if same_world:
            set_rng_state(per_rank["rng"])
        else:
            reseed(seed, D.rank(), int(client.get("step", per_rank.get("step", 0))))
        method.load_extra_state(per_rank["method"])
        client["guard"] = per_rank.get("guard")  # the bad-step guard's state (Guard.load_state_dict)
        # this rank's loader streams: only where this rank's stream is the saved rank's (same world size)
        client["data"] = per_rank.get("data") if same_world else None
    except Exception as e:  # noqa: BLE001
        err = f"{tag_dir}: loading failed ({type(e).__name__}: {e})"
    _agree(err)
    return client


class UnreadableCheckpoint(CheckpointError):
    """A file of the tag could not be read or loaded on at least one rank (raised on every rank)."""


def _preflight(tag_dir: Path, per_rank_file: Path, saved_world: int, zero_stage: int | None = None) -> dict:
    """Open every file of ``tag_dir`` that this rank reads: DeepSpeed's model states and this rank's
    optimizer partition (their pickles only: ``mmap`` leaves the tensor bytes on disk; a truncated
    file has no zip directory and fails here) and our per-rank file (returned). The safetensors header is
    read by ``check_config``, which runs first. ``zero_stage`` (of a non-universal tag, when known): the
    DeepSpeed files that stage writes must be there (without checksums DeepSpeed's own load would fail
    on a missing one with a bare assertion)."""
    if not per_rank_file.is_file():
        raise CheckpointError(f"{per_rank_file} is missing ({tag_dir} was saved by {saved_world} ranks)")
    same_world, r = saved_world == D.world_size(), D.rank()
    needed = {}  # what -> the file name DeepSpeed gave it
    if zero_stage is not None and zero_stage < 3:
        needed["DeepSpeed's model states"] = "mp_rank_00_model_states.pt"
    elif zero_stage == 3 and same_world:
        needed[f"rank {r}'s ZeRO-3 model states"] = f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
    if zero_stage and same_world:
        needed[f"rank {r}'s ZeRO optimizer partition"] = f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
    for what, name in needed.items():
        if not any(tag_dir.glob(f"*{name}")):  # a bf16 run's partitions are named bf16_zero_pp_rank_...
            raise CheckpointError(f"{tag_dir / name} ({what}) is missing: restore it from a copy, or resume "
                                  f"from an older tag")
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if same_world:
        files += sorted(tag_dir.glob(f"*zero_pp_rank_{r}_mp_rank_*_states.pt"))
    for f in files:
        try:
            torch.load(f, map_location="cpu", mmap=True, weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{f}: {type(e).__name__}: {e}") from None
    try:
        return torch.load(per_rank_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{per_rank_file}: {type(e).__name__}: {e}") from None


def _agree(err: str | None) -> None:
    """Collective: UnreadableCheckpoint on every rank as soon as one rank has an error, naming each
    rank's, so all ranks go on to the same tag."""
    errors = D.gather_objects(err)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        raise UnreadableCheckpoint("; ".join(e if len(errors) == 1 else f"rank {r}: {e}" for r, e in bad))


LOCK_FILE = "train.lock"
_held_locks: dict[str, object] = {}  # run dir -> the open lock file, held until the process exits


def lock_run_dir(run_dir: Path) -> str | None:
    """Take the run directory's lock for this process's lifetime (rank 0 calls it): two trainings in one
    output_dir (a requeued job overlapping the old one, a double submit) would delete and move each other's
    checkpoints and interleave their logs. A POSIX record lock (``fcntl.lockf``): the kernel drops it when the
    process dies, even by SIGKILL, DataLoader workers do not inherit it, and NFS v3/v4 carries it between
    hosts. Returns an error naming the holder, or None (also where the filesystem has no locks: a warning)."""
    import fcntl
    import socket
    import sys

    if str(run_dir.resolve()) in _held_locks:  # this process has it (a second train() call in one process)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    f = open(path, "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # ENOLCK, EOPNOTSUPP: a filesystem without locks
            f.close()
            log.warning("cannot lock %s (%s): another training in this output_dir would not be detected", path, e)
            return None
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        return (f"{run_dir.resolve()} is in use by another training ({holder}; lock {path}). Two runs in one "
                f"train.output_dir would delete each other's checkpoints: wait for it to end or stop it (touch "
                f"{run_dir / 'STOP'} saves and exits), or give this run another train.output_dir. (If that host "
                f"is down and no such process runs, an NFS server may keep its lock for a while: delete {path}.)")
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "command": " ".join(sys.argv)[:500]}) + "\n")
    f.flush()
    _held_locks[str(run_dir.resolve())] = f
    return None


def agree_on_target(target: ResumeTarget | None) -> None:
    """Collective: every rank must have chosen the same checkpoint (or none). Each rank picks its tag from
    what it sees in train.output_dir before the process group exists; ranks that see different files (a
    node-local output_dir, a network filesystem's stale cache right after a save) would otherwise resume
    from different steps and train on mixed state, or hang in collectives only some of them call."""
    views = D.gather_objects(None if target is None else (str(target.path), target.universal))
    if len(set(views)) == 1:
        return
    shown = "; ".join(f"rank {r}: {'no complete checkpoint (would start at step 0)' if v is None else v[0]}"
                      for r, v in enumerate(views))
    raise CheckpointError(
        f"the ranks do not see the same checkpoints, so they would resume from different states ({shown}). Every "
        f"rank must see one shared train.output_dir with the same files: a node-local directory gives each node "
        f"its own checkpoints, and a network filesystem can show a stale listing for a while after a save (rerun "
        f"in a minute). To choose the tag yourself, pass --resume PATH naming one complete step_XXXXXXXX "
        f"directory that every rank can read. Nothing was loaded or moved.")


def plan_rollback(run_dir: Path, world_size: int, zero_stage: int) -> ResumeTarget | None:
    """Collective (every rank calls it: the guard's rollback decision is already shared): the checkpoint a
    rollback goes back to, ``plan_resume("auto", ...)`` on each rank, then agreed. None when no rank sees a
    complete checkpoint. A rank that cannot plan (an unreadable marker, a size mismatch) or sees another tag
    than the others (a node-local output_dir, a network filesystem's stale listing) raises CheckpointError
    on every rank, naming each rank's view: deciding alone, one rank would stop while the others went on
    into the load's collectives and waited there for the process-group timeout."""
    try:
        target, err = plan_resume("auto", run_dir, world_size, zero_stage), None
    except CheckpointError as e:
        target, err = None, f"{type(e).__name__}: {e}"
    views = D.gather_objects((None if target is None else (target.tag, target.universal), err))
    if len(set(views)) == 1 and err is None:
        return target
    shown = "; ".join(f"rank {r}: {e or ('no complete checkpoint' if v is None else v[0])}"
                      for r, (v, e) in enumerate(views))
    raise CheckpointError(f"the ranks cannot agree on a checkpoint in {run_dir / 'checkpoints'} to roll back to "
                          f"({shown}). Every rank must see one shared train.output_dir with the same complete "
                          f"checkpoints.")


def resume_from(engine, method, target: ResumeTarget, seed: int, config: dict, world_size: int,
                zero_stage: int, integrity: str = "fallback") -> tuple[ResumeTarget, dict]:
    """``load`` ``target``, checking first that the current config fits it; if a file of a tag cannot be
    read or fails its checksum on any rank, every rank warns and goes on to the next older complete tag
    together (not for a tag the user named, not with ``integrity="strict"``, and never back to step 0:
    when no tag loads, CheckpointError naming the files). A later load overwrites all that a failed one
    may have restored (module, optimizer, scheduler, counters, RNG, method state). Returns the tag
    loaded and its client state."""
    hparams = _hparams(engine)  # this run's optimizer settings, from its config
    failures = []
    while True:
        agree_on_target(target)  # the first target, a fallback or a rollback: each rank chose it on its own
        try:
            changed = check_config(engine, target, config)
            client = load(engine, method, target, seed, integrity)
            break
        except UnreadableCheckpoint as e:
            if target.explicit:
                raise CheckpointError(f"--resume {target.path}: cannot load this checkpoint: {e}. Name an older "
                                      f"tag, or use --resume auto to fall back to one automatically.") from None
            if integrity == "strict":
                raise CheckpointError(
                    f"{target.path} failed verification: {e}. train.checkpoint_integrity=strict does not fall back "
                    f"to an older checkpoint by itself: restore the file(s) from a copy, or resume from an older "
                    f"tag (--resume {target.ckpt_dir}/step_XXXXXXXX), or set train.checkpoint_integrity=fallback "
                    f"to take the next older complete one automatically.") from None
            failures.append(str(e))
            if D.rank() == 0:  # the message holds every rank's errors
                log.warning("checkpoint %s cannot be loaded: %s; trying the next older complete checkpoint",
                            target.tag, e)
            older = next_target(target.ckpt_dir, target.step, world_size, zero_stage, failures)
            if older is None:
                raise CheckpointError(f"no complete checkpoint in {target.ckpt_dir} could be loaded: "
                                      f"{'; '.join(failures)}. Refusing to start from step 0: repair or move "
                                      f"them away, or pass --resume none to start over.") from None
            target = older
    if changed:
        optim = [k for k in changed if k in OPTIMIZER_KEYS]
        if optim:
            _apply_hparams(engine, hparams)
        if D.rank() == 0:
            log.warning("the config differs from the one %s was saved with: %s.%s", target.tag,
                        ", ".join(f"{k}: {_show(o)} -> {_show(n)}" for k, (o, n) in changed.items()),
                        f" This run's {', '.join(optim)} win{'s' if len(optim) == 1 else ''}: the learning rate "
                        f"schedule and every param group's lr, weight_decay, betas and eps were reset from the "
                        f"current config after the load." if optim else "")
    return target, client


# the optimizer and schedule settings our config owns: the current config wins over the checkpoint's
OPTIMIZER_KEYS = ("train.lr", "train.weight_decay", "train.betas", "train.eps", "train.warmup_steps",
                  "train.warmup_init_lr", "train.min_lr", "train.steps")
# settings that change which parameters exist or train (and so the optimizer's groups): a resume with
# another value fails, or would load the wrong state into the wrong parameters
FIXED_KEYS = ("method.name", "model.quick_gelu", "train.no_decay_embeddings", "train.decay_attention_in_proj_bias",
              "model.vision.freeze_patch_embed")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _show(v) -> str:
    return "(absent)" if v is _ABSENT else repr(v)


_ABSENT = object()


def config_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """Dotted key -> (saved value, current value) for every setting that differs."""
    a, b = _flatten(saved), _flatten(current)
    return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


# defaults that changed: key -> (the methods it applies to, old default, new default, why). A config saved
# without the key ran with the old one (``_with_defaults``); a resume that would switch a run from the old to
# the new one (a YAML that does not set the key) changes the training objective mid-run without the user
# asking, and is refused naming the override that continues the run as it trained (``check_config``)
DEFAULT_CHANGES = {"method.contrastive_text": (("declip", "defilip"), "masked", "raw", "2026-11-29: the paper's "
                                               "views; the *_yfcc15m recipes set masked, the reference code's")}


def _with_defaults(saved: dict) -> dict:
    """A saved config with the keys added to the toolkit since filled in with the values the version that
    saved it ran with (their defaults, or the old ones of ``DEFAULT_CHANGES``), so that they do not read as changes; as saved if
    it no longer parses."""
    from declip_ds.config import ConfigError, from_dict, to_dict

    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for dotted, (methods, old, _, _) in DEFAULT_CHANGES.items():
        section, key = dotted.split(".")
        sec = saved.get(section)
        if isinstance(sec, dict) and key not in sec and (saved.get("method") or {}).get("name") in methods:
            sec[key] = old
    try:
        return to_dict(from_dict(saved))
    except (ConfigError, TypeError, ValueError):
        return saved


def check_config(engine, target: ResumeTarget, config: dict) -> dict[str, tuple]:
    """Compare the tag's ``config.yaml`` and weights with this run before loading. Changed keys that
    fix the parameters (``FIXED_KEYS``, or any whose change alters a tensor's name or shape) raise
    CheckpointError naming them; the other changes are returned (key -> (old, new))."""
    import yaml
    from safetensors import safe_open

    tag_dir, saved, shapes, err = target.path, None, None, None
    try:
        if (tag_dir / "config.yaml").is_file():
            saved = yaml.safe_load((tag_dir / "config.yaml").read_text())
        if (tag_dir / "model.safetensors").is_file():
            with safe_open(str(tag_dir / "model.safetensors"), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        err = f"{tag_dir}: {type(e).__name__}: {e}"
    _agree(err)
    changed = config_changes(_with_defaults(saved), config) if isinstance(saved, dict) else {}
    switched = {k: c for k, c in DEFAULT_CHANGES.items() if changed.get(k) == c[1:3]}  # (old, new)
    if switched:
        raise CheckpointError(
            f"{tag_dir} trained with " + ", ".join(f"{k}={old}" for k, (_, old, _, _) in switched.items())
            + ", and this config has the new default ("
            + "; ".join(f"{k}={new}, since {why}" for k, (_, _, new, why) in switched.items())
            + "): resuming would change the training objective mid-run. To continue the run as it trained, add "
            + " ".join(f"{k}={old}" for k, (_, old, _, _) in switched.items())
            + " to the command (or the YAML); for the new behaviour, train a new run in another train.output_dir.")
    fixed = [k for k in FIXED_KEYS if k in changed]
    mismatch = _shape_mismatch(engine.module, shapes) if shapes is not None else []
    if mismatch:
        fixed += [k for k in changed if k.startswith(("model.", "method.")) and k not in fixed]
    if fixed or mismatch:
        keys = ", ".join(f"{k}: {_show(changed[k][0])} -> {_show(changed[k][1])}" for k in fixed)
        raise CheckpointError(
            f"{tag_dir} cannot be resumed with this config"
            + (f": {keys} changed since it was saved" if keys else "")
            + (f"; its tensors do not fit the model ({'; '.join(mismatch[:5])}"
               f"{'; ...' if len(mismatch) > 5 else ''})" if mismatch else "")
            + f". Resume with the saved values (see {tag_dir / 'config.yaml'}), or train a new run in another "
              f"train.output_dir.")
    return changed


def _shape_mismatch(module, saved: dict[str, tuple]) -> list[str]:
    """Tensor names / shapes of ``module``'s state dict that differ from ``saved`` (ZeRO-3: full shapes)."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    now = {}
    for k, v in module.state_dict().items():
        if isinstance(v, torch.Tensor):
            full = getattr(tensors.get(k), "ds_shape", None)  # a ZeRO-3 partition's full shape
            now[k] = tuple(v.shape if full is None else full)
    out = [f"{k}: saved {list(saved[k])}, now {list(now[k])}" for k in sorted(set(now) & set(saved)) if saved[k] != now[k]]
    out += [f"{k}: not in the checkpoint" for k in sorted(set(now) - set(saved))]
    out += [f"{k}: not in the model" for k in sorted(set(saved) - set(now))]
    return out


def _param_group_lists(engine) -> list:
    """The param-group lists an optimizer step reads (DeepSpeed's wrapper and the scheduler's optimizer)."""
    lists = [engine.optimizer.param_groups]
    sched = getattr(engine, "lr_scheduler", None)
    if sched is not None and sched.optimizer.param_groups is not lists[0]:
        lists.append(sched.optimizer.param_groups)
    return lists


def _hparams(engine) -> dict:
    sched = getattr(engine, "lr_scheduler", None)
    groups = [{k: (list(g[k]) if k == "betas" else g[k]) for k in ("weight_decay", "betas", "eps") if k in g}
              for g in engine.optimizer.param_groups]
    return {"groups": groups, "base_lrs": list(sched.base_lrs) if sched is not None else None}


def _apply_hparams(engine, hp: dict) -> None:
    """Put this run's optimizer settings back after a load restored the checkpoint's: weight decay,
    betas and eps per param group, and the LR schedule (LambdaLR base_lrs; its multipliers come from
    the current config already) with each group's lr for the restored step."""
    sched = getattr(engine, "lr_scheduler", None)
    for groups in _param_group_lists(engine):
        for g, saved in zip(groups, hp["groups"]):
            g.update({k: (tuple(v) if k == "betas" and isinstance(g.get(k), tuple) else v) for k, v in saved.items()})
    if sched is None or hp["base_lrs"] is None or not hasattr(sched, "lr_lambdas"):
        return
    sched.base_lrs = list(hp["base_lrs"])
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for groups in _param_group_lists(engine):
        for g, base, lr in zip(groups, sched.base_lrs, lrs):
            g["initial_lr"], g["lr"] = base, lr
    sched._last_lr = lrs


def set_aside_newer(ckpt_dir: Path, step: int) -> Path | None:
    """Collective. Complete tags in ``ckpt_dir`` newer than ``step`` (the step this run resumed from, 0
    for a fresh start) belong to a branch this run abandoned, or could not be loaded: rank 0 moves them
    (with their universal conversions) into ``ckpt_dir/abandoned_<time>/``, where --resume auto,
    rollback and retention never look, and says how to get them back. Nothing is deleted."""
    D.barrier()  # every rank has loaded its checkpoint
    dest = None
    if D.rank() == 0:
        newer = [t for t in complete_tags(ckpt_dir) if tag_step(t) > step]
        if newer:
            dest = ckpt_dir / f"abandoned_{time.strftime('%Y%m%d-%H%M%S')}"
            n = 1
            while dest.exists():
                n += 1
                dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
            dest.mkdir()
            for t in newer:
                for name in (t, t + UNIVERSAL_SUFFIX):
                    if (ckpt_dir / name).exists():
                        os.replace(ckpt_dir / name, dest / name)
            remaining = complete_tags(ckpt_dir)
            if remaining:
                _atomic_write(ckpt_dir / "latest", remaining[-1])
            elif (ckpt_dir / "latest").is_file():
                (ckpt_dir / "latest").unlink()
            log.warning("this run continues from step %d, but %s held newer checkpoints (%s): moved to %s so that "
                        "--resume auto, rollback and train.keep_last leave them alone. To go back to them, move "
                        "them back into %s (after moving this run's newer ones aside) or pass --resume %s.",
                        step, ckpt_dir, ", ".join(newer), dest, ckpt_dir, dest / newer[-1])
    D.barrier()
    return dest


@torch.no_grad()
def _after_universal_load(engine, tag_dir: Path) -> None:
    """Fill the two gaps of DeepSpeed's universal load (0.19.8):

    - it restores only the parameters the optimizer owns, from ``zero/``: buffers (BatchNorm running
      statistics in DeCLIP's and SLIP's heads) and frozen parameters would silently keep their fresh
      initial values, so they are copied from the tag's ``model.safetensors``;
    - its ZeRO-3 loader gives every param group the hyperparameters of group 0, which would put weight
      decay on the no-decay group: each group gets its own back from ``zero/optimizer_state.pt``.
    """
    from deepspeed.checkpoint.constants import PARAM_GROUPS
    from safetensors import safe_open

    module = engine.module
    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    names = [n for n, _ in module.named_buffers()] + [n for n, _ in frozen]
    if names:
        with safe_open(str(tag_dir / "model.safetensors"), framework="pt") as f:
            have = set(f.keys())
            missing = [n for n in names if n not in have]
            if missing:
                raise CheckpointError(f"{tag_dir / 'model.safetensors'} lacks {missing}; cannot restore them after "
                                      f"a universal load.")
            saved = {n: f.get_tensor(n) for n in names}
        for n, b in module.named_buffers():
            b.copy_(saved[n].to(b.dtype))
        _copy_frozen(engine, frozen, saved)
    optim = torch.load(tag_dir / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    groups = optim.get(PARAM_GROUPS)
    live = engine.optimizer.param_groups
    if groups is not None and len(groups) == len(live):
        for g, saved_group in zip(live, groups):
            g.update({k: v for k, v in saved_group.items() if k != "params"})


def _copy_frozen(engine, frozen, saved) -> None:
    if not frozen:
        return
    if engine.zero_optimization_stage() == 3:  # partitioned: gather, set on rank 0, re-partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=0):
            if D.rank() == 0:
                for n, p in frozen:
                    p.copy_(saved[n].to(p.dtype))
        return
    for n, p in frozen:
        p.copy_(saved[n].to(p.dtype))
