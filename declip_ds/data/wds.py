"""Webdataset shards -> batches of per-method views, tolerant of bad data, deterministic.

Shards are tar files in webdataset layout: each sample is the members ``key.jpg`` (or
png / jpeg / webp) + ``key.txt`` caption (+ an optional ``key.json``); evaluation shards
carry ``key.cls`` (an integer label). ``sizes.json`` next to the shards maps shard
basename -> sample count.

Per DataLoader worker, ``build_train_loader`` runs (top to bottom in ``_TrainStream``):

    shard urls    resampled: drawn forever, with source weights, by an RNG seeded from
                  worker_seed(seed, rank, worker, epoch); epoch: shuffled by (seed, epoch),
                  split by rank, then by worker, each shard read once
    tar members   webdataset's tar iterator, grouped into samples by key (a resume's
                  fast-forward indexes local tars from their headers instead: the same
                  samples, but the images stay in the file until a sample is decoded)
    filter        image + caption present, non-empty, key not seen before in the shard
                  (raw bytes: no image is decoded yet; the caption is test-decoded, as
                  only decoding tells a caption of non-ASCII whitespace from a real one)
    shuffle       a buffer of raw samples, seeded like the shard RNG
    decode        PIL -> RGB (JPEGs drafted to the size the transform needs)
    transform     SampleTransform(image, caption) -> dict of tensors, under a private
                  torch RNG seeded per worker (the main process's RNG is untouched)
    batch         stacked tensors + "__key__" / "__url__" lists + "_skips" counts

Bad data is skipped, counted per kind and logged (rate-limited, no sleeps), or with
``strict=True`` raises ``DataError`` naming the shard and key. The library's handlers are
not used: they sleep 0.5 s per error, and their counts never reach the trainer.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls as _wds_expand
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from declip_ds.data.prepare import to_rgb

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# one count per skipped sample
SAMPLE_SKIP_KINDS = ("decode_error", "missing_image", "missing_text", "empty_member",
                     "duplicate_key", "transform_error")
# one count per shard: a truncated shard loses its tail, a missing one all of it
SHARD_SKIP_KINDS = ("truncated_shard", "missing_shard")
SKIP_KINDS = SAMPLE_SKIP_KINDS + SHARD_SKIP_KINDS
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://", "hf://", "sftp://", "scp://")
_LOG_FIRST = 5  # per kind and worker, each skip is logged with its url and key ...
_LOG_EVERY = 1000  # ... after that, a summary every this many skips


class DataError(ValueError):
    """Bad shard or sample under ``strict=True``, or a data source that yields nothing."""


# ----------------------------------------------------------------------------- seeds


def worker_seed(seed: int, rank: int, worker: int, epoch: int = 0) -> int:
    """A 63-bit seed that is a pure function of (seed, rank, worker, epoch).

    Stable across processes and Python versions (BLAKE2b, not ``hash()``), different for
    any change of an argument. The loaders derive every RNG of a DataLoader worker from it:
    shard draws, the shuffle buffer and the torch RNG of the augmentations.
    """
    return _mix(f"{seed}/{rank}/{worker}/{epoch}")


def _mix(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _sub_seed(seed: int, stream: str) -> int:
    """Independent seeds for the different RNGs of one worker."""
    return _mix(f"{seed}:{stream}")


# ----------------------------------------------------------------------------- urls


def _is_remote(url: str) -> bool:
    return url.startswith(_REMOTE_PREFIXES)


def _local_path(url: str) -> str:
    """The file a local url names, as webdataset's gopen reads it: a file: URL through urlparse and
    url2pathname ("%20" is a space, "#..." and "?..." are not part of the name), anything else as is."""
    if url.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return url2pathname(urlparse(url).path)
    return url


def _expand_source(source: str) -> list[str]:
    source = source.strip()
    if not source:
        raise DataError("Empty shard source (a stray '::' or an empty string in data.train_shards?).")
    if not _is_remote(source) and any(c in source for c in "*?["):
        urls = sorted(glob.glob(os.path.expanduser(_local_path(source))))
    else:
        urls = _wds_expand(source)  # WDS_ env substitution + brace expansion
    if _is_remote(source):
        return urls
    missing = [u for u in urls if not os.path.isfile(os.path.expanduser(_local_path(u)))]
    if not urls or len(missing) == len(urls):
        shown = ", ".join(missing[:3]) + (f" ... ({len(missing)} in all)" if len(missing) > 3 else "")
        raise FileNotFoundError(f"Shard pattern {source!r} matches no existing file (missing: "
                                f"{shown or 'nothing matched'}). Check data.train_shards (or the eval "
                                "shard path) and the working directory.")
    if missing:
        log.warning("Shard pattern %r: %d of %d files missing (first: %s); they will be counted as "
                    "missing_shard when drawn.", source, len(missing), len(urls), missing[0])
    return [os.path.expanduser(u) for u in urls]


def expand_urls(spec: str | Sequence[str]) -> list[list[str]]:
    """Brace/glob patterns -> one url list per source.

    ``spec``: ``"a/{00000..00015}.tar::b/{000..009}.tar"`` or a list of such strings (a list
    item may itself hold "::"). Local sources must match at least one existing file, else
    ``FileNotFoundError`` naming the pattern; urls starting with pipe:, http(s)://, s3://
    (and other webdataset schemes) are passed through unchecked.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise DataError("No shard source given: data.train_shards is empty.")
    sources = [_expand_source(src) for item in items for src in str(item).split("::")]
    seen, twice = set(), []
    for url in (u for urls in sources for u in urls):
        key = url if _is_remote(url) else os.path.realpath(_local_path(url))
        if key in seen:
            twice.append(url)
        seen.add(key)
    if twice:
        shown = ", ".join(twice[:3]) + (f" ... ({len(twice)} in all)" if len(twice) > 3 else "")
        raise DataError(f"Shard(s) listed more than once by the shard patterns (overlapping ranges or sources?): "
                        f"{shown}. Their samples would be read twice as often (twice per epoch in epoch mode). "
                        f"Remove the overlap from data.train_shards (or the eval shard path); to draw one source "
                        f"more often, give data.train_weights (resampled mode).")
    return sources


def _flatten_urls(urls) -> list[str]:
    """A spec, a flat url list or expand_urls' nested lists -> a flat url list."""
    if isinstance(urls, str):
        return [u for src in expand_urls(urls) for u in src]
    urls = list(urls)
    if urls and all(isinstance(u, (list, tuple)) for u in urls):
        return [u for src in urls for u in src]
    if any(_needs_expansion(u) for u in urls):
        return [u for src in expand_urls(urls) for u in src]
    return urls


def _needs_expansion(url: str) -> bool:
    return "::" in url or "{" in url or (not _is_remote(url) and any(c in url for c in "*?["))


def _load_sizes(directory: str) -> dict[str, int]:
    path = os.path.join(directory, "sizes.json")
    with open(path) as f:
        return json.load(f)


def read_num_samples(urls) -> int:
    """Total sample count of the shards, from ``sizes.json`` in each shard's directory.

    ``urls``: a spec string, a url list or expand_urls' nested lists. Raises ``DataError``
    (a ValueError) when a sizes.json is missing or lacks a shard, saying how to fix it.
    """
    flat = _flatten_urls(urls)
    by_dir: dict[str, list[str]] = collections.defaultdict(list)
    for url in flat:
        by_dir[os.path.dirname(_local_path(url))].append(os.path.basename(url))
    total = 0
    for directory, names in by_dir.items():
        path = os.path.join(directory or ".", "sizes.json")
        try:
            sizes = _load_sizes(directory or ".")
        except (OSError, ValueError) as e:
            raise DataError(f"Cannot read the sample count from {path} ({e}). Set data.num_samples, or "
                            "write sizes.json mapping each shard basename to its sample count.") from None
        missing = [n for n in names if n not in sizes]
        if missing:
            raise DataError(f"{path} has no entry for {len(missing)} shard(s), e.g. {missing[:3]}. Set "
                            "data.num_samples, or add the shards to sizes.json.")
        total += sum(int(sizes[n]) for n in names)
    return total


def _expected_size(url: str) -> int | None:
    """sizes.json's count for one shard, or None (only used to report a lost tail)."""
    try:
        return int(_load_sizes(os.path.dirname(_local_path(url)) or ".")[os.path.basename(url)])
    except Exception:
        return None


def check_epoch_shards(num_shards: int, world_size: int, workers: int) -> None:
    """Epoch mode reads each shard once on one (rank, worker): every reader needs a shard.

    Raises ``DataError`` (a ValueError) before training when ``num_shards < world_size * max(workers, 1)``
    (a reader without shards would leave its rank short of batches and hang the collectives).
    """
    readers = world_size * max(workers, 1)
    if num_shards >= readers:
        return
    fit = max(num_shards // world_size, 0)
    raise DataError(
        f"Epoch mode needs at least one shard per rank and worker: got {num_shards} shards for "
        f"{world_size} ranks x {max(workers, 1)} workers = {readers} readers. Fix: write at least "
        f"{readers} shards, or lower data.workers" + (f" to {fit}" if fit else "")
        + ", or set data.mode=resampled.")


# ----------------------------------------------------------------------------- skips


class _Skips:
    """Per-worker skip counts: ``take()`` returns the counts since the previous call.

    Logs the first few skips of each kind with shard url and key, then a summary every
    ``_LOG_EVERY`` skips; never sleeps. Under strict mode every skip raises ``DataError``.
    """

    def __init__(self, strict: bool, where: str):
        self.strict, self.where = strict, where
        self.total = dict.fromkeys(SKIP_KINDS, 0)
        self.pending = dict.fromkeys(SKIP_KINDS, 0)

    def __call__(self, kind: str, url: str, key: str | None = None, detail: Any = "") -> None:
        what = f"shard {url}" + (f", key {key!r}" if key is not None else "")
        if self.strict:
            raise DataError(f"{kind} in {what}: {detail}. Set data.strict=false to skip and count such "
                            "samples instead.")
        self.total[kind] += 1
        self.pending[kind] += 1
        n = sum(self.total.values())
        if self.total[kind] <= _LOG_FIRST:
            log.warning("[data %s] skipped %s in %s: %s", self.where, kind, what, detail)
        elif n % _LOG_EVERY == 0:
            log.warning("[data %s] %d skips so far: %s", self.where, n, self.summary())

    def take(self) -> dict[str, int]:
        out, self.pending = self.pending, dict.fromkeys(SKIP_KINDS, 0)
        return out

    def summary(self) -> dict[str, int]:
        return {k: v for k, v in self.total.items() if v}


# ----------------------------------------------------------------------------- shard reading


class _TailWatch:
    """File wrapper remembering the first bytes and the last 512 bytes read.

    Python's streaming tar reader ends *silently* when a file is cut at a member boundary;
    an intact uncompressed tar always ends with a zero block, so a non-zero tail tells.
    """

    def __init__(self, f):
        self.f, self.head, self.tail = f, b"", b""

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if data:
            if len(self.head) < 8:
                self.head += data[:8]
            self.tail = (self.tail + data)[-512:]
        return data

    def close(self) -> None:
        try:  # a pipe: stream raises here on a non-zero exit status; the read already told
            self.f.close()
        except Exception as e:
            log.warning("closing shard stream %s: %r", getattr(self.f, "name", self.f), e)

    def cut_short(self) -> bool:
        compressed = self.head.startswith(_COMPRESSED_MAGIC)
        return not compressed and self.tail.count(0) != len(self.tail)


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


def _raise(exn: Exception) -> bool:
    raise exn


def _member_groups(stream, read: list[int], cut: list) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive tar members sharing a key -> (key, {ext: bytes}); ``read[0]`` counts members.

    A repeated extension starts a new group, so a duplicated key surfaces as a second group.
    Truncation errors propagate; the group being read when they occur (held until a member
    of the next key shows up) goes to ``cut``: its members are whole (tarfile raises on a
    short member), but members after the cut may be missing, so the caller decides.
    """
    key, members = None, {}
    try:
        for m in tar_file_iterator(stream, handler=_raise):
            read[0] += 1
            k, ext = base_plus_ext(m["fname"])
            if k is None:
                continue
            ext = ext.lower()
            if k != key or ext in members:
                if key is not None:
                    yield key, members
                key, members = k, {}
            members[ext] = m["data"]
        if key is not None and stream.cut_short():  # cut at a member boundary
            raise _CutShort("the file ends without the tar end marker")
    except Exception:
        if key is not None:
            cut.append((key, members))
        raise
    if key is not None:
        yield key, members


class _CutShort(Exception):
    pass


def _problem(key: str, members: dict[str, bytes], seen: set, text_ext: str) -> tuple[str, str] | None:
    """The skip kind and detail for a raw sample, or None if it may be decoded."""
    if key in seen:
        return "duplicate_key", "key already seen earlier in this shard"
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    if image_ext is None:
        return "missing_image", f"no image member ({'/'.join(IMAGE_EXTS)}); members: {sorted(members)}"
    if text_ext not in members:
        return "missing_text", f"no .{text_ext} member; members: {sorted(members)}"
    if not members[image_ext]:
        return "empty_member", f"member {key}.{image_ext} is empty"
    if _blank(members[text_ext]):
        return "empty_member", f"member {key}.{text_ext} is empty or only whitespace"
    return None


def _blank(text: bytes) -> bool:
    # The decoder strips with str.strip(), which also removes non-ASCII whitespace (U+3000,
    # U+00A0) that bytes.strip() keeps: test what the decoder will see.
    try:
        return not text.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False  # counted as decode_error when decoded


def _whole(members: dict[str, bytes], text_ext: str) -> bool:
    """Has the members the pipeline reads (any other member of the key is never used)."""
    return text_ext in members and any(e in members for e in IMAGE_EXTS)


@dataclass
class _Raw:
    key: str
    url: str
    image: bytes | _Span  # a _Span from a header scan: read (``_member_bytes``) when decoded
    image_ext: str
    text: bytes


def _shard_samples(url: str, skips: _Skips, text_ext: str, scan: bool = False) -> Iterator[_Raw]:
    """Filtered raw samples of one shard; a missing, unreadable or truncated shard is counted.

    ``scan``: a plain local tar is indexed from its member headers (``_indexed_groups``): the same
    samples and skips, but the image bytes stay in the file until decoded (a resume's fast-forward
    never reads those of the samples it passes over)."""
    groups = _indexed_groups(url, text_ext) if scan and HEADER_SCAN else None
    if groups is not None:
        seen: set[str] = set()
        for key, members in groups:
            raw = _checked(url, key, members, seen, skips, text_ext)
            if raw is not None:
                yield raw
        return
    try:
        stream = _TailWatch(gopen(url))
    except Exception as e:
        skips("missing_shard", url, None, f"cannot open: {e!r}")
        return
    seen: set[str] = set()
    groups, members_read, cut = 0, [0], []
    try:
        for key, members in _member_groups(stream, members_read, cut):
            groups += 1
            raw = _checked(url, key, members, seen, skips, text_ext)
            if raw is not None:
                yield raw
        return
    except DataError:
        raise
    except Exception as e:
        error = e
    finally:
        stream.close()
    # tarfile appends " @ <file object>" to its messages; keep the useful part
    reason = str(error) if isinstance(error, _CutShort) else \
        f"{type(error).__name__}: {str(error.args[0] if error.args else '').split(' @ ')[0]}"
    if members_read[0] == 0:  # not a tar at all (or empty, or cut inside its first member)
        skips("missing_shard", url, None, f"unreadable ({reason})")
        return
    # The group cut short is kept when it has an image and a caption: those were read whole,
    # and a member lost after them is one the pipeline never reads. Anything less is lost with
    # the tail (not counted as missing_image / missing_text: the cut took it, not the writer).
    tail = cut[0] if cut and _whole(cut[0][1], text_ext) else None
    expected = _expected_size(url)
    lost = f" (sizes.json: {expected})" if expected is not None else ""
    skips("truncated_shard", url, None, f"{reason}; read {groups + (tail is not None)} samples{lost}, the "
                                        "rest of the shard is lost")
    raw = _checked(url, *tail, seen, skips, text_ext) if tail is not None else None
    if raw is not None:
        yield raw


def _checked(url: str, key: str, members: dict[str, bytes], seen: set, skips: _Skips,
             text_ext: str) -> _Raw | None:
    """The raw sample, or None after counting why it is skipped."""
    problem = _problem(key, members, seen, text_ext)
    seen.add(key)
    if problem:
        skips(problem[0], url, key, problem[1])
        return None
    ext = next(e for e in IMAGE_EXTS if e in members)
    return _Raw(key, url, members[ext], ext, members[text_ext])


# ----------------------------------------------------------------------------- header scan (resume fast-forward)

HEADER_SCAN = True  # False: fast-forwards read every skipped sample's bytes too (benchmarks compare the two)
_TAR_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these members (skip_meta)


# a first block tarfile's "r|*" may take for compressed data (gzip, bzip2, lzma-alone, xz, zstd): a superset,
# so that the scan never reads as a plain tar what the streaming reader would decompress or refuse
_MAYBE_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\x5d\x00\x00\x80", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")
_MAX_TAIL = 1 << 20  # zero padding after the end-of-archive block that the scan checks; longer: stream it


@dataclass(frozen=True)
class _Span:
    """A member left in its shard file by a header scan; ``len`` is its size, as for bytes."""

    path: str
    offset: int
    size: int
    mtime_ns: int  # the file's when it was indexed

    def __len__(self) -> int:
        return self.size

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            changed = os.fstat(f.fileno()).st_mtime_ns != self.mtime_ns
            f.seek(self.offset)
            data = f.read(self.size)
        if changed or len(data) != self.size:
            raise OSError(f"'{self.path}' changed since it was indexed (a shard rewritten during the run?); the "
                          f"member at byte {self.offset} is not read")
        return data


def _member_bytes(data: bytes | _Span) -> bytes:
    return data.read() if isinstance(data, _Span) else data


def _gopen_path(url: str) -> str | None:
    """The local file webdataset's gopen opens for ``url`` (a plain path, or a file: URL the way gopen maps
    it), or None when it would not open a local file by that name (another scheme, "-", a GOPEN_REWRITE
    rule, webdataset's enforce_security)."""
    from urllib.parse import urlparse

    from webdataset import utils as wds_utils

    if url == "-" or "GOPEN_REWRITE" in os.environ or getattr(wds_utils, "enforce_security", False):
        return None
    scheme = urlparse(url).scheme
    return _local_path(url) if scheme in ("", "file") else None


def _indexed_groups(url: str, text_ext: str) -> list[tuple[str, dict[str, bytes | _Span]]] | None:
    """A local shard's samples as ``_member_groups`` yields them, read from the tar headers alone:
    (key, {ext: member}) with the ``text_ext`` members read and the others left in the file as _Span.

    Only for a local file that gopen would open as it is, holding a plain tar that ends as an intact
    one does (from where the headers end to the end of the file nothing but zero blocks, every member
    whole and inside the file, none sparse); for anything else -- remote, compressed, cut short, a
    damaged header, data after the end of the archive -- returns None, and the streaming reader takes
    the shard and counts what is wrong exactly as it would without a scan. The members kept are those
    of webdataset's tar_file_iterator: regular files, not its ``__...__`` meta entries."""
    path = _gopen_path(url)
    if path is None:
        return None
    try:
        st = os.stat(path)
        size = st.st_size
        if size < 1024 or size % tarfile.BLOCKSIZE:
            return None
        with open(path, "rb", buffering=0) as f:
            if f.read(8).startswith(_MAYBE_COMPRESSED):
                return None
            f.seek(size - tarfile.BLOCKSIZE)
            if f.read(tarfile.BLOCKSIZE).count(0) != tarfile.BLOCKSIZE:
                return None  # (an early way out: the end check below would refuse it too)
            f.seek(0)
            tar = tarfile.open(fileobj=f, mode="r:")
            groups, key, members, last = [], None, {}, -1
            while (info := tar.next()) is not None:
                tar.members = []  # (keep no TarInfo list)
                if info.offset <= last or info.size < 0 or info.offset_data + info.size > size:
                    return None  # a header that points backwards or past the end: damaged
                last = info.offset
                name = info.name
                if not info.isreg() or (name.startswith("__") and name.endswith("__") and "/" not in name) \
                        or _TAR_META.match(name):
                    continue
                if info.sparse is not None or info.issparse():
                    return None  # its bytes are not one run in the file: only tarfile's extraction has them
                k, ext = base_plus_ext(name)
                if k is None:
                    continue
                ext = ext.lower()
                if k != key or ext in members:
                    if key is not None:
                        groups.append((key, members))
                    key, members = k, {}
                if ext == text_ext:
                    f.seek(info.offset_data)
                    members[ext] = f.read(info.size)
                    if len(members[ext]) != info.size:
                        return None
                else:
                    members[ext] = _Span(path, info.offset_data, info.size, st.st_mtime_ns)
            # Where the headers ended: the streaming reader stops there too, then calls the shard cut short
            # if the last 512 bytes it read (it reads on, up to 10 KB past) are not all zero. Zero from
            # there to the end of the file, none of them can be; anything else (a damaged or zeroed
            # header, a second archive appended) is left to it.
            tail = size - tar.offset
            if not tarfile.BLOCKSIZE <= tail <= _MAX_TAIL:
                return None
            f.seek(tar.offset)
            rest = f.read(tail)
            if len(rest) != tail or rest.count(0) != tail:
                return None
            if os.stat(path).st_mtime_ns != st.st_mtime_ns:
                return None  # rewritten while being read
    except Exception:
        return None
    if key is not None:
        groups.append((key, members))
    return groups


def decode_image(data: bytes, ext: str = "jpg", draft_size: int | None = None, plain: bool = False) -> Image.Image:
    """Bytes -> PIL RGB image, decoded here (a truncated file fails here, as a decode error). JPEGs are
    DCT-downscaled (``Image.draft``, by a power of two) while the shorter side stays >= draft_size, which is
    much faster than a full decode. Training: other modes as ``prepare`` converts them (``to_rgb``: transparency
    over white, 16-bit grayscale scaled to 8 bits). ``plain`` (evaluation): PIL's ``convert("RGB")``, as
    torchvision's ImageFolder, CLIP_benchmark and open_clip's loaders do, so that scores stay comparable."""
    image = Image.open(io.BytesIO(data))
    if draft_size and ext in ("jpg", "jpeg") and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    image.load()
    return image.convert("RGB") if plain else to_rgb(image)


def _shuffled(items: Iterable, bufsize: int, rng: random.Random) -> Iterator:
    """Shuffle buffer: keep ``bufsize`` items, emit a random one per new item, drain at the end."""
    if bufsize <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(bufsize)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


class _PrivateTorchRNG:
    """Run callables under a worker-private torch RNG stream, restoring the caller's state.

    With workers=0 the pipeline runs in the trainer's process; augmentations must neither
    consume nor depend on the trainer's RNG (dropout masks, init).
    """

    def __init__(self, seed: int):
        # Not torch.manual_seed: it also reseeds every CUDA generator, i.e. the trainer's
        # dropout / drop_path masks on the GPU. The transforms run on the CPU generator.
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the private stream from ``seed`` (the caller's state is not touched)."""
        cpu = torch.default_generator
        outer = cpu.get_state()
        cpu.manual_seed(seed)
        self.state = cpu.get_state()
        cpu.set_state(outer)

    def __call__(self, fn: Callable, *args):
        outer = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            return fn(*args)
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(outer)


class _TransformFailed(Exception):
    """Internal: the sample transform raised (already counted); the cause is chained."""


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _collate(items: list[tuple]) -> dict[str, Any]:
    """(raw, transformed[, ordinal]) items -> one batch dict."""
    names = list(items[0][1])
    batch: dict[str, Any] = {}
    for name in names:
        values = [item[1][name] for item in items]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    batch["__key__"] = [item[0].key for item in items]
    batch["__url__"] = [item[0].url for item in items]
    return batch


# ----------------------------------------------------------------------------- train stream


@dataclass(eq=False)
class _TrainStream(IterableDataset):
    sources: list[list[str]]
    sample_transform: Callable
    batch_size: int
    rank: int
    world_size: int
    seed: int
    epoch: int
    mode: str
    shuffle_buffer: int
    weights: list[float] | None
    strict: bool
    drop_last: bool
    worker_batches: int | None  # resampled: batches per worker per (virtual) epoch; None = forever
    start_batch: int
    draft_size: int | None
    # stream -> (raw samples up to the end of its last consumed batch, batches it made): from the "_cursor"
    # of that batch; lets the stream skip the consumed batches' raw samples without decoding them
    cursors: dict[int, tuple[int, int | None]] | None = None
    last_stream: int | None = None  # epoch mode: the stream of the last consumed batch
    _progress: dict = field(default_factory=dict)
    _scan: bool = False  # fast-forwarding: shards are opened by a header scan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        physical, num_workers = _worker()
        # The DataLoader asks its physical workers in turn, starting at 0, and drops a worker for good
        # when it runs dry (epoch mode: streams end at different batches); the order is round robin
        # over the streams still running. After the batches consumed so far the next one belongs to the
        # stream after the last consumed batch's (resampled: start_batch % num_workers, as no stream
        # ends early), so physical worker p plays stream (p + rotation) % num_workers; a stream that
        # had run dry yields nothing again and is dropped at its first turn, as before.
        rotation = self.start_batch if self.last_stream is None else self.last_stream + 1
        worker = (physical + rotation) % num_workers
        wseed = worker_seed(self.seed, self.rank, worker, self.epoch)
        skips = _Skips(self.strict, f"rank {self.rank} worker {worker}")
        self._progress, self._scan = {"shards": 0, "last_good": 0}, False
        urls = self._resampled(wseed) if self.mode == "resampled" else self._epoch_urls(worker, num_workers)
        raws = (raw for url in urls for raw in self._counted(url, skips))
        # (ordinal, raw): the ordinal of a raw sample in the shuffled stream seeds its augmentations, so a
        # sample's views do not depend on how many samples before it were decoded
        raws = enumerate(_shuffled(raws, self.shuffle_buffer, random.Random(_sub_seed(wseed, "shuffle"))))
        discard, made = self._discard(worker, num_workers), 0
        cursor = (self.cursors or {}).get(worker)
        if discard and cursor is not None:  # fast-forward: skip the consumed batches' raw samples undecoded;
            self._scan = True  # the shards opened meanwhile are read from their headers (their images on use)
            raws = _after(raws, cursor[0], lambda: setattr(self, "_scan", False))
            made = discard
        samples = self._transformed(raws, skips, _PrivateTorchRNG(0), _sub_seed(wseed, "torch"))
        for n, batch in enumerate(_batches(samples, self.batch_size, skips, self.drop_last, self.worker_batches,
                                           discard, made), start=discard + 1):
            batch["_cursor"] = (worker, batch.pop("_last") + 1, n)
            yield batch
        if skips.summary():
            log.info("[data rank %d worker %d] epoch %d done; skips: %s", self.rank, worker, self.epoch,
                     skips.summary())

    def _resampled(self, wseed: int) -> Iterator[str]:
        rng = random.Random(_sub_seed(wseed, "shards"))
        weights = self.weights or [len(src) for src in self.sources]
        limit = max(64, 4 * sum(len(src) for src in self.sources))
        while True:
            if self._progress["shards"] - self._progress["last_good"] > limit:
                raise DataError(f"No usable sample in the last {limit} shards drawn on rank {self.rank} "
                                f"(sources: {[src[0] for src in self.sources]} ...). Check "
                                "data.train_shards: missing, empty or corrupt shards?")
            source = rng.choices(self.sources, weights=weights)[0]
            yield rng.choice(source)

    def _epoch_urls(self, worker: int, num_workers: int) -> list[str]:
        order = [u for src in self.sources for u in src]
        random.Random(_mix(f"{self.seed}/epoch-shards/{self.epoch}")).shuffle(order)
        return order[self.rank::self.world_size][worker::num_workers]

    def _counted(self, url: str, skips: _Skips) -> Iterator[_Raw]:
        self._progress["shards"] += 1
        for raw in _shard_samples(url, skips, "txt", scan=self._scan):
            self._progress["last_good"] = self._progress["shards"]
            yield raw

    def _transformed(self, raws: Iterable[tuple[int, _Raw]], skips: _Skips, rng: _PrivateTorchRNG, seed: int):
        # Tolerance must not hide a broken pipeline: a transform that fails on the first 100
        # decodable samples is a bug, and a resampled stream that yields nothing never ends.
        good, failed_transforms, in_a_row = 0, 0, 0
        for ordinal, raw in raws:
            try:
                rng.reseed(_mix(f"{seed}/{ordinal}"))
                out = self._one(raw, skips, rng)
            except DataError:
                raise
            except _TransformFailed as e:
                failed_transforms, in_a_row = failed_transforms + 1, in_a_row + 1
                if good == 0 and failed_transforms >= 100:
                    raise DataError(f"The sample transform failed on the first {failed_transforms} "
                                    f"samples (last: {e.__cause__!r} on {raw.url}, key {raw.key!r}); "
                                    "a bug in the transform?") from e.__cause__
            except Exception:
                in_a_row += 1
            else:
                good, in_a_row = good + 1, 0
                yield raw, out, ordinal
            if self.mode == "resampled" and in_a_row >= 100_000:
                raise DataError(f"{in_a_row} samples in a row failed to decode or transform on rank "
                                f"{self.rank} (last: {raw.url}, key {raw.key!r}); check the data.")

    def _one(self, raw: _Raw, skips: _Skips, rng: _PrivateTorchRNG) -> dict:
        try:
            image = decode_image(_member_bytes(raw.image), raw.image_ext, self.draft_size)
            text = raw.text.decode("utf-8").strip()
        except Exception as e:
            skips("decode_error", raw.url, raw.key, f"{raw.key}.{raw.image_ext}: {e!r}")
            raise
        try:
            return rng(self.sample_transform, image, text)
        except Exception as e:
            skips("transform_error", raw.url, raw.key, repr(e))
            raise _TransformFailed() from e

    def _discard(self, worker: int, num_workers: int) -> int:
        """How many batches of stream ``worker`` were consumed before this loader started."""
        cursor = (self.cursors or {}).get(worker)
        if cursor is not None and cursor[1] is not None:
            return cursor[1]  # counted: exact whether or not streams ended early
        if self.last_stream is not None:
            return 0  # epoch mode resumes from counted cursors only; a stream without one had made none
        # resampled, round robin from the start: stream `worker` made batches worker, worker + W, ...
        return max(0, (self.start_batch - worker + num_workers - 1) // num_workers)


def _after(items: Iterable, n: int, done: Callable[[], None]) -> Iterator:
    """``items`` from the n-th on (0-based); ``done()`` is called once the first n are passed."""
    it = iter(items)
    collections.deque(itertools.islice(it, n), maxlen=0)
    done()
    yield from it


def _batches(samples: Iterable, batch_size: int, skips: _Skips, drop_last: bool,
             max_batches: int | None, discard: int, made: int = 0) -> Iterator[dict[str, Any]]:
    """Group into batches; ``_skips`` of a batch = skips since the previous batch.

    One batch is held back until the next is complete (or the stream ends), so skips that
    happen after a worker's last batch, or in a dropped partial batch, still reach the
    trainer: summed over all batches of an epoch, ``_skips`` equals the worker's total.
    The first ``discard`` batches are built but not collated or yielded (``made`` of them were
    skipped before ``samples`` started: a fast-forward); the skips up to where batch ``discard``
    was released are dropped, as that batch reported them. ``_last``: the ordinal of the batch's
    last sample (items are (raw, views, ordinal)).
    """
    if max_batches is not None and made >= max_batches:
        skips.take()  # a fast-forward past this stream's share (a resume at the end of a virtual epoch):
        return  # nothing is left; its last batch reported the skips
    held, items = None, []
    for item in samples:
        items.append(item)
        if len(items) < batch_size:
            continue
        made += 1
        batch = None if made <= discard else _collate(items)
        if batch is not None:
            batch["_last"] = items[-1][2]
        items = []
        if held is not None:
            held["_skips"] = skips.take()
            yield held
        elif discard:
            # A replayed batch, or the first one after them: batch `discard` was held before the
            # resume until this one was complete, so its _skips covered everything up to here.
            skips.take()
        held = batch
        if max_batches is not None and made >= max_batches:
            break
    if held is None and discard:
        skips.take()  # batch `discard` was held until the stream ended: it reported these
    last = _collate(items) if items and not drop_last and made >= discard else None
    if last is not None:
        last["_last"] = items[-1][2]
    if held is not None:
        held["_skips"] = skips.take()
        yield held
    if last is not None:
        last["_skips"] = skips.take()
        yield last


def _identity(x):
    return x


# How long a DataLoader worker outlives a SIGTERM (see _ignore_stop_signals): the trainer's step boundary
# comes first; SLURM and the deepspeed launcher follow their SIGTERM with SIGKILL after about 30 s anyway.
WORKER_TERM_GRACE_S = 30


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn. SLURM and the deepspeed launcher send SIGTERM to the whole
    process group, workers included; a worker killed by it makes the trainer's next batch raise
    before the preemption checkpoint is written. The trainer handles SIGTERM / SIGUSR1 (it
    saves at the step boundary, then shuts the workers down), so a worker ignores SIGUSR1 and
    outlives a SIGTERM by WORKER_TERM_GRACE_S, then exits: multiprocessing also SIGTERMs workers
    (at interpreter exit, after an uncaught exception) and joins them, which must not hang."""
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_after_grace)


_term_armed = False


def _exit_after_grace(signum, frame) -> None:
    global _term_armed
    import signal

    if not _term_armed:  # the first SIGTERM sets the deadline; the alarm then ends the process
        _term_armed = True
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(WORKER_TERM_GRACE_S)


def _loader_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    # DataLoader draws its workers' base seed from this generator on every iter(); without
    # one it would consume (and depend on) the trainer's global torch RNG.
    return torch.Generator().manual_seed(_sub_seed(worker_seed(seed, rank, -1, epoch), "loader"))


def build_train_loader(sources, sample_transform: Callable, batch_size: int, *, rank: int, world_size: int,
                       seed: int, mode: str = "resampled", workers: int = 2, shuffle_buffer: int = 1000,
                       weights: Sequence[float] | None = None, strict: bool = False, epoch: int = 0,
                       num_samples: int | None = None, drop_last: bool = False, start_batch: int = 0,
                       cursors: dict | None = None, last_stream: int | None = None,
                       pin_memory: bool = False, jpeg_draft: bool = True) -> DataLoader:
    """Training batches for one rank: dicts of stacked views + "__key__", "__url__", "_skips".

    sources: a spec ("a/{00000..00015}.tar::b/{0..9}.tar"), a list of specs, or expand_urls'
        output. weights (resampled only): probability of each source; default proportional to
        its shard count, i.e. every shard equally likely.
    mode: "resampled" draws shards forever (a pure function of seed, epoch, rank, worker);
        with num_samples, each worker stops after its share of a virtual epoch of
        num_samples samples (ceil(num_samples / (world_size * batch_size * workers)) batches).
        "epoch" reads each shard once (shards shuffled by seed+epoch, split by rank then
        worker); fails fast via check_epoch_shards when there are fewer shards than readers.
    start_batch: batches of this loader already consumed in this epoch; each stream (one per
        worker) skips its share so the batches that follow are those an uninterrupted run would
        have produced. cursors: {stream: (end, made)} from the "_cursor" of each stream's last
        consumed batch, as the trainer keeps them in its checkpoints: a stream with one skips its
        first ``end`` raw samples (tar reading and shuffling only: nothing decoded or transformed).
        Resampled mode: a stream without one replays (decodes and drops) its batches; a bare
        ``end`` (checkpoints from before ``made`` was saved) is accepted. Epoch mode needs the
        counted cursors and last_stream (the stream of the last consumed batch), as its streams
        end at different batches.
    Every batch carries "_cursor" = (stream, raw samples of the stream up to its end, batches of
    the stream up to and including it).
    jpeg_draft: decode JPEGs DCT-downscaled to the transform's ``draft_size`` (``decode_image``); false:
        in full.
    Stall detection (a batch timeout, armed once every worker has delivered): ``Batches``.
    Rebuild the loader with the next ``epoch`` for a new epoch / virtual epoch.
    """
    if mode not in ("resampled", "epoch"):
        raise ValueError(f"Unknown data mode {mode!r}. Known: epoch, resampled.")
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Bad loader geometry: batch_size={batch_size}, rank={rank}, "
                         f"world_size={world_size}.")
    srcs = sources if _is_expanded(sources) else expand_urls(sources)
    weights = _check_weights(weights, srcs, mode)
    if mode == "epoch":
        check_epoch_shards(sum(len(s) for s in srcs), world_size, workers)
    readers = world_size * max(workers, 1)
    worker_batches = None
    if mode == "resampled" and num_samples:
        worker_batches = math.ceil(num_samples / (readers * batch_size))
    cursors = _check_position(start_batch, cursors, last_stream, mode, max(workers, 1))
    dataset = _TrainStream(srcs, sample_transform, batch_size, rank, world_size, seed, epoch, mode,
                           shuffle_buffer, weights, strict, drop_last, worker_batches, start_batch,
                           getattr(sample_transform, "draft_size", None) if jpeg_draft else None, cursors,
                           None if last_stream is None else int(last_stream))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                        pin_memory=pin_memory, prefetch_factor=2 if workers else None,
                        worker_init_fn=_ignore_stop_signals,
                        generator=_loader_generator(seed, rank, epoch))
    loader.num_samples = num_samples
    if worker_batches is not None:
        loader.num_batches = worker_batches * max(workers, 1)
    elif num_samples:
        loader.num_batches = num_samples // (world_size * batch_size)  # an estimate in epoch mode
    else:
        loader.num_batches = None
    return loader


def next_batch(batches, timeout_s: float = 0, what: str = "the training data"):
    """``next(batches, None)``, with a stalled DataLoader (no batch from a worker within the loader's
    ``timeout_s``: a shard read hanging on a network filesystem, a ``pipe:`` source that never ends) as a
    DataError that says so, instead of torch's bare RuntimeError (or, without a timeout, a rank that waits
    until the other ranks' collectives time out with an error that names neither)."""
    try:
        return next(batches, None)
    except RuntimeError as e:
        if not timeout_s or not str(e).startswith("DataLoader timed out"):
            raise
        raise DataError(f"{what}: no batch from a DataLoader worker in {timeout_s:g} s (data.timeout_minutes): a "
                        f"shard read is stuck (a network filesystem, a pipe: or remote source that stopped sending). "
                        f"Check the shards' storage; rerun to resume from the last checkpoint, or raise "
                        f"data.timeout_minutes (0 = no limit).") from None


class Batches:
    """A training loader's batches with stall detection (``next_batch``). The timeout is armed only once every
    worker has delivered a batch: until then a worker may legitimately take long (filling its shuffle buffer
    from remote shards, or fast-forwarding over the samples a resumed run consumed, which can take hours),
    and the DataLoader takes the workers' batches in turn, so the first batch says nothing about the others.
    (torch reads the iterator's ``_timeout`` at every wait, so it can be set on a running iterator.)"""

    def __init__(self, loader, timeout_s: float = 0, what: str = "the training data"):
        self.it, self.timeout_s, self.what = iter(loader), timeout_s, what
        self.arm_after, self.seen = max(getattr(loader, "num_workers", 0), 1), 0

    def next(self):
        """The next batch, or None when the loader is exhausted."""
        batch = next_batch(self.it, self.timeout_s, self.what)  # torch times out only once armed
        self.seen += 1
        if self.seen == self.arm_after and self.timeout_s and hasattr(self.it, "_timeout"):
            self.it._timeout = self.timeout_s
        return batch


def read_cursors(cursors: dict | None) -> dict[int, tuple[int, int | None]]:
    """Stream cursors as {stream: (end, made or None)}, from what a checkpoint holds ({stream: [end, made]},
    string keys after a round trip, or a bare ``end`` from before ``made`` was kept)."""
    out = {}
    for k, v in (cursors or {}).items():
        end, made = (v, None) if isinstance(v, (int, float)) else (v[0], v[1] if len(v) > 1 else None)
        out[int(k)] = (int(end), None if made is None else int(made))
    return out


def counted_cursors(cursors: dict[int, tuple[int, int | None]]) -> bool:
    """Whether every stream's cursor says how many batches it made (what epoch mode resumes from)."""
    return bool(cursors) and all(made is not None for _, made in cursors.values())


def _check_position(start_batch: int, cursors: dict | None, last_stream: int | None, mode: str,
                    streams: int) -> dict[int, tuple[int, int | None]] | None:
    """build_train_loader's resume position, checked; cursors as read_cursors gives them."""
    if start_batch < 0:
        raise ValueError(f"start_batch={start_batch}: a count of consumed batches cannot be negative.")
    if (cursors or last_stream is not None) and not start_batch:
        raise ValueError("cursors and last_stream need start_batch: they locate the batches already consumed.")
    out = read_cursors(cursors)
    for k in out:
        if not 0 <= k < streams:
            raise ValueError(f"cursors name stream {k}, but this loader has {streams} (data.workers); "
                             "cursors only fit the worker count they were saved with.")
    counted = counted_cursors(out)
    if mode == "epoch" and start_batch and (not counted or last_stream is None):
        raise ValueError("Epoch mode resumes mid-epoch only from counted cursors ({stream: (end, made)}) and "
                         "last_stream, as its streams end at different batches; without them start the epoch "
                         "over (start_batch=0).")
    if counted and sum(made for _, made in out.values()) != start_batch:
        raise ValueError(f"cursors count {sum(made for _, made in out.values())} consumed batches, start_batch "
                         f"says {start_batch}: they are not from the same checkpoint.")
    if last_stream is not None and not 0 <= int(last_stream) < streams:
        raise ValueError(f"last_stream={last_stream}, but this loader has {streams} streams (data.workers).")
    return out or None


def _is_expanded(sources) -> bool:
    return (not isinstance(sources, str) and len(sources) > 0
            and all(isinstance(s, (list, tuple)) for s in sources))


def _check_weights(weights, sources: list[list[str]], mode: str) -> list[float] | None:
    if not weights:
        return None
    if mode != "resampled":
        raise ValueError("data.train_weights only apply in resampled mode; epoch mode reads every shard "
                         "once. Remove the weights or set data.mode=resampled.")
    weights = [float(w) for w in weights]
    if len(weights) != len(sources) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"data.train_weights {weights}: need {len(sources)} non-negative weights (one per "
                         "'::'-separated source), not all zero.")
    return weights


# ----------------------------------------------------------------------------- eval stream


@dataclass(eq=False)
class _EvalStream(IterableDataset):
    urls: list[str]
    transform: Callable
    batch_size: int
    rank: int
    world_size: int
    label_key: str
    strict: bool
    draft_size: int | None

    def __iter__(self):
        worker, num_workers = _worker()
        skips = _Skips(self.strict, f"eval rank {self.rank} worker {worker}")
        mine = self.urls[self.rank::self.world_size][worker::num_workers]
        items: list = []
        for raw in (raw for url in mine for raw in _shard_samples(url, skips, self.label_key)):
            try:
                label = int(raw.text.decode("utf-8").strip())
                image = self.transform(decode_image(raw.image, raw.image_ext, self.draft_size, plain=True))
            except Exception as e:
                skips("decode_error", raw.url, raw.key, repr(e))
                continue
            items.append((image, label, raw.key))
            if len(items) == self.batch_size:
                yield _eval_batch(items)
                items = []
        if items:
            yield _eval_batch(items)
        if skips.summary():
            log.warning("[data eval rank %d worker %d] skipped: %s", self.rank, worker, skips.summary())


def _eval_batch(items):
    images, labels, keys = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), list(keys)


def build_eval_loader(urls, transform: Callable, batch_size: int, *, rank: int = 0, world_size: int = 1,
                      label_key: str = "cls", workers: int = 0, strict: bool = False) -> DataLoader:
    """Evaluation batches ``(images (B, 3, H, W), labels (B,) long, keys list[str])``.

    No shuffling; shards (in sorted spec order) are split by rank, then by worker, so across
    ranks every sample is seen once. Ranks may get different batch counts, and a rank
    without shards yields nothing: gather the results after the loop, not per batch.
    """
    flat = _flatten_urls(urls)
    dataset = _EvalStream(flat, transform, batch_size, rank, world_size, label_key, strict,
                          getattr(transform, "draft_size", None))
    return DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                      prefetch_factor=2 if workers else None, worker_init_fn=_ignore_stop_signals,
                      generator=_loader_generator(0, rank, 0))
