"""Webdataset copies of the suite's evaluation datasets, for clusters that cannot hold the raw files.

    python -m declip_ds.eval.make_shards --data-root DIR --suite declip11 --out OUT [--splits test]
    python -m declip_ds.eval.make_shards --data-root DIR --suite robustness,retrieval --out OUT

Run it where the raw files are (``--data-root``, the suite's layout, see ``python -m declip_ds.eval.suite
--list``); copy OUT to the cluster and evaluate there with ``--data-root OUT``: the suite, the linear probe
and retrieval read ``OUT/<name>_wds/<split>/*.tar`` exactly as they read the raw files.

    classification  OUT/<name>_wds/<split>/<name>-<split>-NNNNN.tar: per sample ``<key>.<ext>`` (the image)
                    and ``<key>.cls`` (the integer label), plus OUT/<name>_wds/<split>/classnames.txt (line
                    i names label i: the names the raw split was scored with)
    retrieval       OUT/<name>_wds/test/<name>-test-NNNNN.tar: per image ``<key>.<ext>``, ``<key>.json``
                    ({"captions": [...], "image": its path in the split file}) and ``<key>.txt`` (the captions)

Pixels are kept exactly: an image file the dataset reads from disk (ImageNet and its shifts, Karpathy
retrieval sets) is copied byte for byte when it is a JPEG, PNG or WebP, otherwise re-encoded as PNG; an
image torchvision decodes from an archive (CIFAR, MNIST, ...) is stored as PNG, lossless. Samples keep
the split's order (the seeded splits of Caltech-101, SUN397 and EuroSAT use ``--seed``, as the suite),
so a copy scores what the raw files score. A split folder is written to a temporary name and renamed
when complete, so an interrupted run leaves no partial copy; an existing one is kept unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

from PIL import Image

from declip_ds.data.wds import IMAGE_EXTS

SHARD_SIZE = 1000


def _identity(image):
    return image


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def _file_member(path: Path) -> tuple[str, bytes]:
    """(extension, bytes) of an image file: the file itself when the readers decode its format, else PNG."""
    ext = path.suffix.lower().lstrip(".")
    if ext in IMAGE_EXTS:
        return ext, path.read_bytes()
    with Image.open(path) as im:
        return "png", _png(im)


def _samples(data):
    """(key, {ext: image bytes, "cls": label}) of an opened classification split, in its order."""
    if hasattr(data, "samples"):  # an image folder (ImageNet family): copy the files
        for i, (path, label) in enumerate(data.samples):
            ext, image = _file_member(Path(path))
            yield f"{i:08d}", {ext: image, "cls": str(int(label)).encode()}
    else:  # a torchvision split: its transform is the identity, so items are RGB PIL images
        for i in range(len(data)):
            image, label = data[i]
            yield f"{i:08d}", {"png": _png(image), "cls": str(int(label)).encode()}


def _write(folder: Path, prefix: str, samples, shard_size: int, extra_files: dict[str, str]) -> int:
    """Write ``samples`` as shards under ``folder`` (via a temporary sibling, renamed at the end)."""
    import tarfile

    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    n, tar = 0, None
    try:
        for key, members in samples:
            if n % shard_size == 0:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(tmp / f"{prefix}-{n // shard_size:05d}.tar", "w")
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                tar.addfile(info, io.BytesIO(data))
            n += 1
    finally:
        if tar is not None:
            tar.close()
    if n == 0:
        shutil.rmtree(tmp)
        raise ValueError(f"nothing to write for {folder}: the split has no samples.")
    for name, text in extra_files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return n


def copy_classification(name: str, split: str, root: Path, out: Path, *, shard_size: int = SHARD_SIZE,
                        seed: int = 0, download: bool = False) -> int:
    """Write OUT/<name>_wds/<split>/ from the raw files of ``name``'s ``split``; returns the sample count."""
    from declip_ds.eval.downstream import get_spec, open_split

    spec = get_spec(name)
    data = open_split(name, split, root, _identity, download=download, seed=seed)
    if getattr(data, "layout", "") == "shards":
        raise ValueError(f"{spec.title} {split} under '{root}' is already a webdataset copy ({data.root}): copy "
                         f"that folder as it is.")
    return _write(out / f"{spec.name}_wds" / split, f"{spec.name}-{split}", _samples(data), shard_size,
                  {"classnames.txt": "\n".join(data.classnames) + "\n"})


def copy_retrieval(name: str, root: Path, out: Path, *, shard_size: int = SHARD_SIZE) -> int:
    """Write OUT/<name>_wds/test/ from a retrieval dataset's Karpathy file and images."""
    from declip_ds.eval.retrieval import RETRIEVAL_REGISTRY

    spec = RETRIEVAL_REGISTRY[name]
    source = spec.source(root)
    if source.kind == "shards":
        raise ValueError(f"{spec.title} under '{root}' is already a webdataset copy: copy that folder as it is.")
    base = root / spec.images

    def samples():
        for i, (path, caps) in enumerate(source.items):
            if not caps:
                continue
            ext, image = _file_member(path)
            rel = path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)
            meta = json.dumps({"captions": caps, "image": rel}, ensure_ascii=False).encode("utf-8")
            yield f"{i:08d}", {ext: image, "json": meta, "txt": "\n".join(caps).encode("utf-8")}

    return _write(out / f"{name}_wds" / "test", f"{name}-test", samples(), shard_size, {})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="the folder holding the raw datasets (the suite's layout)")
    p.add_argument("--suite", required=True, help="a suite (declip11, robustness, retrieval, ...) or name,name,...")
    p.add_argument("--out", required=True, help="write <name>_wds/<split>/ folders here")
    p.add_argument("--splits", default=None,
                   help="comma-separated splits of the classification datasets (default: every split each has)")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="samples per shard (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class splits (as the suite's --seed)")
    p.add_argument("--download", action="store_true", help="let torchvision download missing datasets first")
    p.add_argument("--overwrite", action="store_true", help="rewrite copies that already exist in --out")
    return p


def main(argv=None) -> int:
    from declip_ds.eval.downstream import SPLITS, get_spec, is_retrieval, suite_datasets
    from declip_ds.eval.suite import UNAVAILABLE

    args = build_parser().parse_args(argv)
    root, out = Path(args.data_root), Path(args.out)
    try:
        names = suite_datasets(args.suite)
        wanted = None if args.splits is None else [s.strip() for s in args.splits.split(",") if s.strip()]
        if wanted is not None and not set(wanted) <= set(SPLITS):
            raise ValueError(f"--splits: {', '.join(sorted(set(wanted) - set(SPLITS)))} is not a split; use "
                             f"{', '.join(SPLITS)}.")
        if args.shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {args.shard_size}.")
        if not root.is_dir():
            raise FileNotFoundError(f"--data-root '{root}' is not a directory.")
        if out.resolve() == root.resolve():
            raise ValueError("--out must differ from --data-root (the copies would shadow nothing and mix with "
                             "the raw files); pick another folder.")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = []
    for name in names:
        if is_retrieval(name):
            jobs.append((name, "test"))
        else:
            splits = get_spec(name).splits
            jobs += [(name, s) for s in splits if wanted is None or s in wanted]
    written, skipped, failed = 0, [], []
    for name, split in jobs:
        folder = out / f"{name}_wds" / split
        if folder.exists() and not args.overwrite:
            print(f"{name}/{split}: {folder} exists, kept (--overwrite rewrites it)", file=sys.stderr)
            continue
        try:
            n = (copy_retrieval(name, root, out, shard_size=args.shard_size) if is_retrieval(name) else
                 copy_classification(name, split, root, out, shard_size=args.shard_size, seed=args.seed,
                                     download=args.download))
        except UNAVAILABLE as e:
            skipped.append(f"{name}/{split}: {e}")
            continue
        except (ValueError, OSError, RuntimeError) as e:
            failed.append(f"{name}/{split}: {type(e).__name__}: {e}")
            continue
        written += 1
        print(f"{name}/{split}: {n} samples -> {folder}", file=sys.stderr)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    if failed:
        return 1
    if not written and skipped:
        print(f"error: none of the datasets of '{args.suite}' is under '{root}' (reasons above).", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
