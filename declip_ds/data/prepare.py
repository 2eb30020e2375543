"""Image-caption tables or folders -> webdataset shards that ``build_train_loader`` reads.

Usage::

    python -m declip_ds.data.prepare --input TABLE_OR_DIR --out DIR \
        [--format auto|csv|tsv|parquet|jsonl|yfcc|cc3m|folder] [--image-col COL] \
        [--caption-col COL[,COL...]] [--image-template TEMPLATE] [--base-dir DIR] \
        [--shard-size 10000] [--resize-shorter 0] [--jpeg-quality 90] [--workers N] [--quiet]

Input formats (``--format auto`` picks by extension: .csv, .tsv, .parquet, .jsonl / .json,
a directory = folder; yfcc and cc3m must be named):

    csv / tsv   a header row; the image column is --image-col or the first of
                filepath, image_path, image, path, file, filename, img, jpg; the caption
                column is --caption-col or the first of caption, title, text, txt
                (open_clip's CsvDataset layout, ``filepath`` + ``title``, works as is).
    parquet     the same columns; needs pyarrow (or pandas with a parquet engine).
    jsonl       one JSON object per line, the same columns; DeCLIP's meta files
                ({"filename": ..., "caption": ...}) work as is. A list-valued caption
                contributes its first non-empty string.
    yfcc        YFCC100M metadata, as used to build YFCC-15M (OpenAI's subset, DeCLIP,
                SLIP): a headerless TSV in the dataset's column order, 25 fields
                (line number, photoid, photo_hash, uid, unickname, datetaken, dateuploaded,
                capturedevice, title, description, usertags, machinetags, longitude,
                latitude, accuracy, pageurl, downloadurl, licensename, licenseurl, serverid,
                farmid, secret, secretoriginal, ext, marker) or the 23 without the first
                (line number) and third (photo_hash); or any table with a header naming
                ``title`` / ``description`` (e.g. the dalle-mini/HF export). Caption =
                cleaned title, then cleaned description ("title. description"); cleaning
                decodes URL encoding (``unquote_plus``), removes HTML tags and entities and
                URLs, and collapses whitespace (SLIP's make_dataset.py and the dalle-mini
                YFCC100M_OpenAI_subset ``clean_text``). --caption-col title picks one.
                Images: --image-col if given or a filepath/path/... column exists, else
                --image-template, default ``{photoid}.jpg`` (the AWS multimedia-commons
                layout is ``{photo_hash_dir}/{photo_hash}.jpg``).
    cc3m        Conceptual Captions' Train_GCC-training.tsv: headerless ``caption TAB url``
                (a ``caption``/``url`` header is also accepted). Images: --image-template,
                default ``{index:08d}.jpg`` = the 0-based row number, zero-padded to 8
                (the naming of the common download scripts); ``{url_crc32}`` gives
                DownloadConceptualCaptions' crc32-of-url names.
    folder      a directory tree of images (jpg, jpeg, png, webp, bmp, gif, tif, tiff),
                each with a sidecar caption ``<stem>.txt`` next to it; walked in sorted order.

Templates are Python format strings over the row's columns plus ``index`` (0-based data
row), ``url_crc32`` (when there is a ``url``) and ``photo_hash_dir`` (``abc/def`` for a
``photo_hash`` starting ``abcdef``). Relative image paths are taken relative to
--base-dir, default the directory holding the table.

Output (the layout ``build_train_loader`` reads)::

    DIR/00000.tar ...        <key>.jpg  <key>.txt  <key>.json    key = 9-digit input row index
    DIR/sizes.json           shard basename -> sample count   (written when all shards are done)
    DIR/skipped.jsonl        one line per skipped row: index, source, reason, detail
    DIR/prepare.json         the arguments, then the summary (counts, skips, duplicates)
    DIR/.prepare/            per-shard records (count, skips, input hash) for resuming

Shard ``s`` holds rows ``s * shard_size ... (s + 1) * shard_size - 1`` of the rows that
reading accepts, in input order: malformed rows and rows without an image path or caption go
to skipped.jsonl and take no place, so shard ``s`` need not start at input row
``s * shard_size`` and its keys (input row indices) may have gaps. Rows skipped while writing
(missing file, unreadable image, empty sidecar caption) keep their place and leave the shard
short. The trainer mixes samples only within a loader worker's shuffle buffer (a few thousand), so shuffle
a table that is sorted or grouped (by uploader, date, source) first. ``key.json`` holds the source path, the stored and original sizes, whether the image
was re-encoded and the row's other columns.

Duplicates are counted, not dropped (several captions per image is legitimate, and shards
keep their rows); the summary's ``duplicates`` holds, over the rows reading accepts (those
skipped while writing included, table skips not): ``same_image``, rows whose image file (the
path read: joined to --base-dir, normalised by ``os.path.normpath``, symlinks not followed) an
earlier row also uses, whatever the captions; ``same_image_and_caption``, those of them that
also repeat that earlier row's caption exactly (they weight the sample more); ``examples``,
up to 5 ``{index, first_index, source}`` (row, the first row it repeats, its image path as
the input names it) of the earliest exact repeats, or of the earliest same-image rows when
there are none. A rerun that keeps shards reads every row again and counts the same. Rows are
compared by 8-byte hashes: a collision (chance ~6e-6 at 15M rows) counts one row too many.

Images: a JPEG whose shorter side is at most --resize-shorter (or with --resize-shorter 0,
the default) and without an EXIF rotation is copied byte for byte after a test decode;
anything else is decoded (JPEG drafting for speed), rotated upright, flattened to RGB over
white, shrunk so the shorter side is --resize-shorter (never enlarged) and saved as JPEG at
--jpeg-quality. Output bytes depend only on the input and the arguments (fixed tar
metadata), not on --workers.

Resuming: each shard is written to ``NNNNN.tar.tmp`` and renamed when complete. A rerun with
the same arguments keeps finished shards (after checking that their input rows are
unchanged) and writes the rest; a deleted shard is rewritten. Different arguments, or
changed input rows under a finished shard, are an error: use a new --out or delete DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import html
import io
import json
import multiprocessing as mp
import os
import re
import sys
import tarfile
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator
from urllib.parse import unquote_plus

from PIL import Image, ImageOps

if TYPE_CHECKING:
    import numpy as np

__all__ = ["PREPARE_VERSION", "FORMATS", "SKIP_REASONS", "PrepareError", "prepare", "clean_yfcc_text", "main"]

# Bump when the bytes written for the same input and arguments change: a rerun then errors
# instead of mixing shards of two versions.
PREPARE_VERSION = "1"
FORMATS = ("auto", "csv", "tsv", "parquet", "jsonl", "yfcc", "cc3m", "folder")
SKIP_REASONS = ("bad_row", "missing_path", "empty_caption", "missing_caption", "missing_file",
                "unreadable_file", "unreadable_image", "bad_path")
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed tar metadata -> byte-identical shards
STATE_DIR = ".prepare"

IMAGE_COLUMNS = ("filepath", "image_path", "image", "path", "file", "filename", "img", "jpg")
CAPTION_COLUMNS = ("caption", "title", "text", "txt")
FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
YFCC_COLUMNS_23 = ("photoid", "uid", "unickname", "datetaken", "dateuploaded", "capturedevice", "title",
                   "description", "usertags", "machinetags", "longitude", "latitude", "accuracy", "pageurl",
                   "downloadurl", "licensename", "licenseurl", "serverid", "farmid", "secret",
                   "secretoriginal", "ext", "marker")
YFCC_COLUMNS_25 = ("line", "photoid", "photo_hash") + YFCC_COLUMNS_23[1:]
CC3M_COLUMNS = ("caption", "url")
DEFAULT_TEMPLATES = {"yfcc": "{photoid}.jpg", "cc3m": "{index:08d}.jpg"}
_EXT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
                ".json": "jsonl"}


class PrepareError(ValueError):
    """Bad arguments, unreadable input or an output directory that doesn't match."""


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class _Row:
    index: int  # 0-based data row of the input (header excluded): the sample key
    source: str  # the image path as the input names it
    path: str  # the path to read
    caption: str | None  # None: read caption_file in the worker (folder format)
    caption_file: str | None = None
    meta: dict = field(default_factory=dict)  # the row's other columns, kept in key.json


@dataclass(frozen=True)
class _Skip:
    index: int
    source: str | None
    reason: str
    detail: str = ""

    def record(self) -> dict:
        return {"index": self.index, "source": self.source, "reason": self.reason, "detail": self.detail}


_YFCC_HTML = re.compile(r"<[^<]+?>")
_YFCC_URL = re.compile(r"(?:https?://|www\.)\S+")


def clean_yfcc_text(text: str) -> str:
    """YFCC title/description -> plain text: URL-decoded (``+`` = space), HTML tags, entities
    and URLs removed, whitespace collapsed (SLIP / dalle-mini preprocessing)."""
    text = unquote_plus(text or "")
    text = _YFCC_HTML.sub(" ", text)
    text = html.unescape(text)
    text = _YFCC_URL.sub(" ", text)
    return " ".join(text.split())


def _join_caption(parts: list[str]) -> str:
    """Title + description -> one caption; a sentence break only where the title lacks one."""
    parts = [p for p in parts if p]
    out = ""
    for p in parts:
        if not out:
            out = p
        else:
            out += (" " if out[-1] in ".!?:;,-" else ". ") + p
    return out


def _text(value: Any) -> str:
    """A cell -> str: None -> "", a list (DeCLIP captions) -> its first non-empty string."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return next((str(v).strip() for v in value if v is not None and str(v).strip()), "")
    if isinstance(value, float) and value != value:  # pandas NaN
        return ""
    return str(value).strip()


class _TemplateFields(dict):
    """A row's columns plus the derived fields image templates may use."""

    def __init__(self, record: dict, index: int):
        super().__init__(record)
        self["index"] = index

    def __missing__(self, key):
        if key == "url_crc32" and "url" in self:
            return zlib.crc32(str(self["url"]).encode("utf-8")) & 0xFFFFFFFF
        if key == "photo_hash_dir" and "photo_hash" in self:
            h = str(self["photo_hash"])
            return f"{h[:3]}/{h[3:6]}"
        raise KeyError(key)


@dataclass
class _RowMaker:
    """One input record (a dict) -> a _Row or a _Skip, for table formats."""

    fmt: str
    image_col: str | None
    caption_cols: list[str]
    template: str | None
    base_dir: str

    def __call__(self, index: int, record: dict) -> _Row | _Skip:
        try:
            source = self.source(index, record)
        except (KeyError, IndexError, ValueError) as e:
            return _Skip(index, None, "bad_path", f"image template {self.template!r}: {e!r}")
        if not source:
            return _Skip(index, None, "missing_path", f"empty image path ({self.image_col or self.template})")
        parts = [_text(record.get(c)) for c in self.caption_cols]
        if self.fmt == "yfcc":
            parts = [clean_yfcc_text(p) for p in parts]
        caption = _join_caption(parts)
        if not caption:
            return _Skip(index, source, "empty_caption", f"empty {'/'.join(self.caption_cols)}")
        path = os.path.join(self.base_dir, os.path.expanduser(source))
        used = set(self.caption_cols) | {self.image_col}
        meta = {k: v for k, v in record.items() if k not in used}
        if self.fmt == "yfcc":  # keep the cleaned parts: SLIP samples title or description
            meta.update(zip(self.caption_cols, parts))
        return _Row(index, source, path, caption, None, meta)

    def source(self, index: int, record: dict) -> str:
        if self.image_col is not None:
            return _text(record.get(self.image_col))
        return self.template.format_map(_TemplateFields(record, index))

    def check(self, record: dict) -> None:
        """Fail before any work when a named column or template field is not there."""
        columns = sorted(record)
        for name, col in [("--image-col", self.image_col)] + [("--caption-col", c) for c in self.caption_cols]:
            if col is not None and col not in record:
                raise PrepareError(f"{name} {col!r} is not a column of the input. Columns: {columns}.")
        if self.image_col is None:
            try:
                self.source(0, record)
            except (KeyError, IndexError, ValueError) as e:
                raise PrepareError(f"--image-template {self.template!r} does not fit the input ({e!r}). Fields: "
                                   f"{columns + ['index']}" + (" + url_crc32" if "url" in record else "")
                                   + (" + photo_hash_dir" if "photo_hash" in record else "") + ".") from None


# ----------------------------------------------------------------------------- readers


def _guess_format(path: str) -> str:
    if os.path.isdir(path):
        return "folder"
    ext = os.path.splitext(path)[1].lower()
    if ext in _EXT_FORMATS:
        return _EXT_FORMATS[ext]
    raise PrepareError(f"Cannot tell the format of {path!r} from its extension {ext or '(none)'!r}. Pass --format "
                       f"(one of {', '.join(FORMATS[1:])}).")


def _open_text(path: str):
    # errors="replace": one stray byte must not end a 15M-row run; the row keeps a U+FFFD
    return open(path, "r", encoding="utf-8-sig", errors="replace", newline="")  # -sig: drop an Excel BOM


def _delimited(path: str, delimiter: str, quoting: int, header_rule: Callable[[list[str]], tuple | None]):
    """(index, record | _Skip) of a CSV/TSV; ``header_rule(first_row)`` -> column names for a
    headerless file, or None when the first row is the header."""
    csv.field_size_limit(sys.maxsize)
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        first = next(reader, None)
        if first is None:
            return
        names = header_rule(first)
        rows = reader if names is None else _chain([first], reader)
        names = names or tuple(c.strip() for c in first)
        index = 0
        for row in rows:
            if not row:
                continue  # blank line
            if len(row) != len(names):
                yield index, _Skip(index, None, "bad_row", f"{len(row)} fields, expected {len(names)}")
            else:
                yield index, dict(zip(names, row))
            index += 1


def _chain(*iterables):
    for it in iterables:
        yield from it


def _header_required(first: list[str]) -> None:
    return None


def _yfcc_header(first: list[str]) -> tuple | None:
    lowered = {c.strip().lower() for c in first}
    if lowered & {"title", "description", "photoid"}:
        return None
    if len(first) == len(YFCC_COLUMNS_25):
        return YFCC_COLUMNS_25
    if len(first) == len(YFCC_COLUMNS_23):
        return YFCC_COLUMNS_23
    raise PrepareError(f"--format yfcc: the first row has {len(first)} tab-separated fields; expected the YFCC100M "
                       "metadata (25 fields with line number and photo hash, or 23) or a header row naming "
                       "title/description.")


def _cc3m_header(first: list[str]) -> tuple | None:
    if {c.strip().lower() for c in first} >= {"caption", "url"}:
        return None
    return CC3M_COLUMNS


def _parquet(path: str) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536):
            for record in batch.to_pylist():
                yield index, record
                index += 1
        return
    try:
        import pandas as pd
        frame = pd.read_parquet(path)
    except ImportError as e:
        raise PrepareError(f"Reading parquet ({path}) needs pyarrow (pip install pyarrow) or pandas with a parquet "
                           f"engine ({e}). Or convert the table to CSV/TSV and pass that.") from None
    yield from enumerate(frame.to_dict("records"))


def _jsonl(path: str) -> Iterator[tuple[int, dict | _Skip]]:
    with _open_text(path) as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":  # a JSON array rather than JSON lines
            for index, record in enumerate(json.load(f)):
                yield index, (record if isinstance(record, dict) else
                              _Skip(index, None, "bad_row", f"JSON: a {type(record).__name__}, not an object"))
            return
        index = 0
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"a {type(record).__name__}, not an object")
            except ValueError as e:
                yield index, _Skip(index, None, "bad_row", f"JSON: {e}")
            else:
                yield index, record
            index += 1


def _records(path: str, fmt: str, table_format: str) -> Iterator[tuple[int, dict | _Skip]]:
    if table_format == "parquet":
        return _parquet(path)
    if table_format == "jsonl":
        return _jsonl(path)
    if fmt == "yfcc" and table_format == "tsv":
        return _delimited(path, "\t", csv.QUOTE_NONE, _yfcc_header)
    if fmt == "cc3m" and table_format == "tsv":
        return _delimited(path, "\t", csv.QUOTE_NONE, _cc3m_header)
    delimiter = "\t" if table_format == "tsv" else ","
    return _delimited(path, delimiter, csv.QUOTE_MINIMAL, _header_required)


def _pick_column(given: str | None, candidates: Iterable[str], record: dict) -> str | None:
    if given:
        return given
    return next((c for c in candidates if c in record), None)


def _row_maker(fmt: str, record: dict, opts: dict) -> _RowMaker:
    """Resolve the columns / template against the first record; errors name the choices."""
    columns = sorted(record)
    captions = [c.strip() for c in opts["caption_col"].split(",")] if opts["caption_col"] else None
    if fmt == "yfcc":
        captions = captions or [c for c in ("title", "description") if c in record]
    elif fmt == "cc3m":
        captions = captions or ["caption"]
    else:
        captions = captions or [c for c in [_pick_column(None, CAPTION_COLUMNS, record)] if c]
    if not captions:
        expected = ["title", "description"] if fmt == "yfcc" else list(CAPTION_COLUMNS)
        raise PrepareError(f"No caption column: none of {expected} in the input. Columns: {columns}. "
                           "Pass --caption-col.")
    template = opts["image_template"]
    image_col = None if template else _pick_column(opts["image_col"], IMAGE_COLUMNS, record)
    if image_col is None and template is None:
        template = DEFAULT_TEMPLATES.get(fmt)
        if template is None:
            raise PrepareError(f"No image column: none of {list(IMAGE_COLUMNS)} in the input. Columns: {columns}. "
                               "Pass --image-col (or --image-template).")
    maker = _RowMaker(fmt, image_col, captions, template, opts["base_dir"])
    maker.check(record)
    return maker


def _table_rows(opts: dict) -> Iterator[_Row | _Skip]:
    """Rows of a table input. The first record is read eagerly (by the caller's first next())."""
    fmt, path = opts["format"], opts["input"]
    table_format = opts["table_format"]
    maker = None
    for index, record in _records(path, fmt, table_format):
        if isinstance(record, _Skip):
            yield record
            continue
        if maker is None:
            maker = _row_maker(fmt, record, opts)
        yield maker(index, record)


def _folder_rows(opts: dict) -> Iterator[_Row | _Skip]:
    root, out = opts["input"], os.path.realpath(opts["out"])
    index = 0
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(directory, d)) != out)
        names = set(files)
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in FOLDER_IMAGE_EXTS:
                continue
            path = os.path.join(directory, name)
            # a name that is not valid UTF-8 (os.walk escapes its bytes as surrogates) is opened as it is and
            # recorded with those bytes shown as \xNN
            source = os.path.relpath(path, root).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            if stem + ".txt" not in names:
                yield _Skip(index, source, "missing_caption", f"no {stem}.txt next to the image")
            else:
                yield _Row(index, source, path, None, os.path.join(directory, stem + ".txt"))
            index += 1


def _count_rows(opts: dict) -> int | None:
    """A cheap estimate of the input rows for the progress bar (None: unknown)."""
    path, fmt = opts["input"], opts["table_format"]
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq
            return pq.ParquetFile(path).metadata.num_rows
        if os.path.getsize(path) > (2 << 30):
            return None
        with open(path, "rb") as f:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        has_header = opts["format"] in ("csv", "tsv")
        return max(0, lines - has_header)
    except Exception:
        return None


# ----------------------------------------------------------------------------- images


class _RowSkipped(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit / 32-bit integer or float grayscale image -> mode L. PIL's own conversion clips these at 255
    (a mid-gray 16-bit PNG becomes white). 16-bit values are scaled by 255/65535; 32-bit integers likewise,
    unless they fit in 8 bits, or are scaled by their maximum when larger; floats in [0, 1] by 255."""
    import numpy as np

    a = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(a.max()) if a.size else 0.0
    if image.mode.startswith("I;16") or 255 < top <= 65535:
        a = a * (255 / 65535)
    elif top > 65535:
        a = a * (255 / top)
    elif image.mode == "F" and top <= 1.0:
        a = a * 255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image, keep_gray: bool = False) -> Image.Image:
    """Any PIL mode -> RGB (``keep_gray``: L stays L), as the trainer's loader and ``prepare`` both decode:
    transparency is flattened over white, not black (what img2dataset does, so the same PNG trains alike
    from either kind of shard), and 16-bit / float grayscale is scaled to 8 bits (``_to_8bit``)."""
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:  # a PNG tRNS colour: a mask
        image = image.convert("RGBA")
    if image.mode == "RGB" or (keep_gray and image.mode == "L"):
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
        return image if keep_gray else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if image.mode == "La":  # premultiplied; PIL has no La -> RGBA conversion
            image = image.convert("LA")
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _shrink(image: Image.Image, shorter: int) -> Image.Image:
    w, h = image.size
    if not shorter or min(w, h) <= shorter:
        return image
    scale = shorter / min(w, h)
    size = (shorter, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), shorter)
    return image.resize(size, Image.Resampling.BICUBIC)


def _image_bytes(data: bytes, resize_shorter: int, quality: int) -> tuple[bytes, dict]:
    """Image file bytes -> (JPEG bytes, size info); raises _RowSkipped for unreadable images."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
            info = {"original_width": w, "original_height": h}
            rotated = image.format == "JPEG" and image.getexif().get(0x0112, 1) not in (1, None)
            if image.format == "JPEG" and not rotated and not (resize_shorter and min(w, h) > resize_shorter):
                image.draft(image.mode, (max(1, w // 8), max(1, h // 8)))  # a cheap full-stream test decode
                image.load()
                return data, dict(info, width=w, height=h, reencoded=False)
            if image.format == "JPEG" and resize_shorter:
                image.draft("RGB", (resize_shorter, resize_shorter))  # DCT-downscale, shorter side stays >= target
            image.load()
            out = _shrink(to_rgb(ImageOps.exif_transpose(image), keep_gray=True), resize_shorter)
            buf = io.BytesIO()
            out.save(buf, "JPEG", quality=quality)
            return buf.getvalue(), dict(info, width=out.size[0], height=out.size[1], reencoded=True)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the file", str(e))  # no addresses
        raise _RowSkipped("unreadable_image", f"{type(e).__name__}: {detail}") from None


def _read_caption(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace").strip()


def _sample(row: _Row, resize_shorter: int, quality: int) -> list[tuple[str, bytes]]:
    caption = row.caption
    if caption is None:
        try:
            caption = _read_caption(row.caption_file)
        except OSError as e:
            raise _RowSkipped("missing_caption", f"{row.caption_file}: {e.strerror or e}") from None
        if not caption:
            raise _RowSkipped("empty_caption", f"{os.path.basename(row.caption_file)} is empty")
    try:
        with open(row.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise _RowSkipped("missing_file", row.path) from None
    except OSError as e:
        raise _RowSkipped("unreadable_file", f"{row.path}: {e.strerror or e}") from None
    image, info = _image_bytes(data, resize_shorter, quality)
    key = _key(row.index)
    meta = dict({"key": key, "index": row.index, "source": row.source}, **info)
    if row.meta:
        meta["row"] = row.meta
    return [("jpg", image), ("txt", caption.encode("utf-8")), ("json", _json_bytes(meta))]


def _key(index: int) -> str:
    return f"{index:09d}"


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      default=str).encode("utf-8", "backslashreplace")  # never fails on a lone surrogate


# ----------------------------------------------------------------------------- shards


@dataclass
class _ShardJob:
    out: str
    shard: int
    rows: list[_Row]
    resize_shorter: int
    jpeg_quality: int
    rows_sha256: str

    @property
    def name(self) -> str:
        return f"{self.shard:05d}.tar"


_TICK: Callable[[int], None] | None = None  # progress: pbar.update in-process, queue.put in a worker
_TICK_EVERY = 32


def _init_worker(queue) -> None:
    global _TICK
    _TICK = queue.put


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    tf.addfile(info, io.BytesIO(data))


def _write_shard(job: _ShardJob) -> dict:
    """Write one shard (temp name, then rename) and its record; return the record."""
    final = os.path.join(job.out, job.name)
    tmp = f"{final}.tmp{os.getpid()}"
    count, skipped, pending = 0, [], 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for row in job.rows:
                try:
                    members = _sample(row, job.resize_shorter, job.jpeg_quality)
                except _RowSkipped as e:
                    skipped.append(_Skip(row.index, row.source, e.reason, e.detail).record())
                else:
                    for ext, data in members:
                        _add_member(tf, f"{_key(row.index)}.{ext}", data)
                    count += 1
                pending += 1
                if pending == _TICK_EVERY and _TICK is not None:
                    _TICK(pending)
                    pending = 0
        record = {"shard": job.name, "count": count, "rows": len(job.rows), "rows_sha256": job.rows_sha256,
                  "skipped": skipped}
        _write_json(os.path.join(job.out, STATE_DIR, job.name + ".json"), record)
        os.replace(tmp, final)  # the commit point: a present shard is complete
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if pending and _TICK is not None:
        _TICK(pending)
    return record


def _rows_sha256(rows: list[_Row]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(_json_bytes([row.index, row.source, row.caption, row.meta]) + b"\n")
    return h.hexdigest()


def _finished(job: _ShardJob) -> dict | None:
    """The record of a shard finished by an earlier run, or None if it must be written."""
    record_path = os.path.join(job.out, STATE_DIR, job.name + ".json")
    if not (os.path.isfile(os.path.join(job.out, job.name)) and os.path.isfile(record_path)):
        return None
    try:
        with open(record_path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if record.get("rows_sha256") != job.rows_sha256:
        raise PrepareError(f"{os.path.join(job.out, job.name)} was written from other input rows than the input has "
                           f"now (rows {job.rows[0].index if job.rows else '?'}...): the input changed since. Use a "
                           "new --out, or delete the output directory to start over.")
    return record


def _jobs(rows: Iterable[_Row | _Skip], opts: dict, table_skips: list[dict], duplicates: _Duplicates,
          progress) -> Iterator[_ShardJob]:
    """Group rows into shards of shard_size; skips found while reading go to table_skips, the rows
    it accepts to ``duplicates`` (every row, also under shards a rerun keeps)."""
    shard, chunk = 0, []
    for item in rows:
        if isinstance(item, _Skip):
            table_skips.append(item.record())
            progress.update(1)
            continue
        duplicates.add(item)
        chunk.append(item)
        if len(chunk) == opts["shard_size"]:
            yield _job(opts, shard, chunk)
            shard, chunk = shard + 1, []
    if chunk or shard == 0:
        yield _job(opts, shard, chunk)


def _job(opts: dict, shard: int, rows: list[_Row]) -> _ShardJob:
    if shard >= 100000:
        raise PrepareError("More than 100,000 shards would not fit 5-digit names; raise --shard-size.")
    return _ShardJob(opts["out"], shard, rows, opts["resize_shorter"], opts["jpeg_quality"], _rows_sha256(rows))


class _Duplicates:
    """Rows (those reading accepts) that repeat an earlier row's image file, or its image and caption.

    Memory: 16 bytes a row (+ up to 1/8 that bytearrays over-allocate), two 8-byte blake2b digests:
    240 MB at 15M rows, where a set of the path strings would take ~1.5 GB. ``summary`` sorts each
    once, needing ~18 bytes a row more for a moment (int64 argsort indices, a sorted copy, two boolean
    masks; 8 more per duplicate; ~4 s per 15M). Hashing costs ~2-3 us a row in the reading process.
    Two different paths (or pairs) sharing a digest would count one row too many: the chance is
    ~n**2 / 2**65, 6e-6 at 15M rows.
    """

    def __init__(self):
        self.paths, self.pairs = bytearray(), bytearray()  # row i of the accepted rows: bytes 8*i..8*i+7

    def add(self, row: _Row) -> None:
        path, pair = _digests(row)
        self.paths += path
        self.pairs += pair

    def summary(self, opts: dict, progress: bool = False) -> dict:
        import numpy as np

        paths, pairs = np.frombuffer(self.paths, dtype="<u8"), np.frombuffer(self.pairs, dtype="<u8")
        same_image = _repeats(paths)
        exact = _repeats(pairs) & same_image  # a subset, even were two pairs' digests to collide
        n = int(same_image.sum())
        shown, digests = (exact, pairs) if exact.any() else (same_image, paths)
        positions = np.flatnonzero(shown)[:5].tolist()
        if positions and progress:
            print(f"{n} {'row repeats' if n == 1 else 'rows repeat'} an earlier row's image: reading the input again "
                  f"for a few examples", file=sys.stderr, flush=True)
        firsts = [int(np.argmax(digests == digests[p])) for p in positions]  # argmax: the first True
        return {"same_image": n, "same_image_and_caption": int(exact.sum()),
                "examples": _duplicate_examples(opts, positions, firsts, digests, exact.any())}


def _digests(row: _Row) -> tuple[bytes, bytes]:
    """8-byte digests of the row's image file and of (image file, caption)."""
    # normpath: img/./a.jpg and img//a.jpg are img/a.jpg (symlinks are not followed: no stat per row)
    h = hashlib.blake2b(os.path.normpath(row.path).encode("utf-8", "surrogatepass"), digest_size=8)
    path = h.digest()
    # a path holds no NUL, so path + NUL + caption tells the pairs apart. Folder rows (caption None: read
    # from the sidecar later) each have their own image and never repeat.
    h.update(b"\0" + (row.caption or "").encode("utf-8", "surrogatepass"))
    return path, h.digest()


def _repeats(digests: np.ndarray) -> np.ndarray:
    """A boolean array: True where the digest occurred at an earlier position."""
    import numpy as np

    order = np.argsort(digests, kind="stable")  # stable: equal digests keep their positions' order
    ordered = digests[order]
    same = ordered[1:] == ordered[:-1]
    del ordered
    repeat = np.zeros(len(digests), dtype=bool)
    repeat[order[1:][same]] = True
    return repeat


def _duplicate_examples(opts: dict, positions: list[int], firsts: list[int], digests: np.ndarray,
                        exact: bool) -> list[dict]:
    """{index, first_index, source} of the accepted rows at ``positions`` and of the earlier rows
    they repeat (at ``firsts``); ``digests`` are the pair digests if ``exact``, else the image ones.
    Rows are kept nowhere, so the input is read again, up to the last of them: little, unless the
    earliest repeats come late (at worst one more read of the input, no images). A row whose digest
    differs now (the input changed during the run) gives no example; an input that cannot be read
    again gives none at all (the counts stand)."""
    wanted, found = set(positions) | set(firsts), {}
    if not wanted:
        return []
    try:
        for position, row in enumerate(item for item in _rows(opts) if isinstance(item, _Row)):
            if position in wanted:
                found[position] = row
                if len(found) == len(wanted):
                    break
    except Exception:  # noqa: BLE001 (gone or changed since: JSONDecodeError, ArrowInvalid...; examples are extra)
        return []
    examples = []
    for p, first in zip(positions, firsts):
        rows = [found.get(p), found.get(first)]
        if all(r is not None and _digests(r)[int(exact)] == digests[i].tobytes() for r, i in zip(rows, (p, first))):
            examples.append({"index": rows[0].index, "first_index": rows[1].index, "source": rows[0].source})
    return examples


class _Progress:
    def __init__(self, total: int | None, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, disable=not enabled, desc="prepare", unit="row", dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _run_jobs(jobs: Iterator[_ShardJob], workers: int, progress: _Progress) -> tuple[list[dict], int]:
    """Write the unfinished shards (in ``workers`` processes); return (records by shard, kept)."""
    records: dict[int, dict] = {}
    kept = 0
    global _TICK
    if workers <= 1:
        _TICK = progress.update
        try:
            for job in jobs:
                record = _finished(job)
                kept += record is not None
                records[job.shard] = record or _write_shard(job)
                if record is not None:
                    progress.update(len(job.rows))
        finally:
            _TICK = None
        return [records[i] for i in sorted(records)], kept
    ctx = mp.get_context()
    queue = ctx.Queue()
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,))
    pending: dict = {}
    try:
        for job in jobs:
            record = _finished(job)
            if record is not None:
                kept += 1
                records[job.shard] = record
                progress.update(len(job.rows))
                continue
            pending[pool.submit(_write_shard, job)] = job.shard
            while len(pending) >= 2 * workers:  # bounded: rows are read as shards are written
                _collect(pending, records, queue, progress)
        while pending:
            _collect(pending, records, queue, progress)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    _drain(queue, progress)
    return [records[i] for i in sorted(records)], kept


def _collect(pending: dict, records: dict, queue, progress: _Progress) -> None:
    done, _ = wait(list(pending), timeout=0.2, return_when=FIRST_COMPLETED)
    _drain(queue, progress)
    for future in done:
        shard = pending.pop(future)
        try:
            records[shard] = future.result()
        except Exception as e:
            raise RuntimeError(f"Writing shard {shard:05d}.tar failed: {e!r}") from e


def _drain(queue, progress: _Progress) -> None:
    while True:
        try:
            progress.update(queue.get_nowait())
        except Exception:  # queue.Empty
            return


# ----------------------------------------------------------------------------- output directory


def _write_json(path: str, obj, indent: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _manifest_args(opts: dict) -> dict:
    keys = ("input", "format", "table_format", "image_col", "caption_col", "image_template", "base_dir",
            "shard_size", "resize_shorter", "jpeg_quality")
    return dict({k: opts[k] for k in keys}, version=PREPARE_VERSION)


_FLAGS = {"input": "--input", "format": "--format", "table_format": "--format", "image_col": "--image-col",
          "caption_col": "--caption-col", "image_template": "--image-template", "base_dir": "--base-dir",
          "shard_size": "--shard-size", "resize_shorter": "--resize-shorter", "jpeg_quality": "--jpeg-quality",
          "version": "prepare version"}


def _check_out(opts: dict) -> bool:
    """Check that an existing output directory was made with these arguments (writes nothing).

    Returns True when the directory is new (or empty of shards) and needs a manifest."""
    out = opts["out"]
    manifest_path = os.path.join(out, "prepare.json")
    args = _manifest_args(opts)
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path) as f:
                before = json.load(f)["args"]
        except (OSError, ValueError, KeyError) as e:
            raise PrepareError(f"{manifest_path} is unreadable ({e!r}); delete the output directory to start over.")
        diffs = [f"{_FLAGS.get(k, k)}: {before.get(k)!r} before, {args.get(k)!r} now"
                 for k in sorted(set(args) | set(before)) if before.get(k) != args.get(k)]
        if diffs:
            raise PrepareError(f"{out} holds shards prepared with other arguments ({'; '.join(diffs)}). Rerun with "
                               "the same arguments to resume, use a new --out, or delete the directory.")
        return False
    if os.path.isdir(out) and any(n.endswith(".tar") or n == "sizes.json" for n in os.listdir(out)):
        raise PrepareError(f"{out} already holds shards that prepare did not write (no prepare.json). Use an empty "
                           "or new --out.")
    return True


@contextlib.contextmanager
def _lock(out: str):
    """One prepare per output directory at a time."""
    os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(os.path.join(out, STATE_DIR, "lock"), "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrepareError(f"Another prepare is writing to {out} (lock held). Wait for it, or use another "
                               "--out.") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_temp_files(out: str) -> None:
    """Shards and records half-written by a killed run (we hold the lock: nobody else writes)."""
    for directory in (out, os.path.join(out, STATE_DIR)):
        for name in os.listdir(directory):
            if re.fullmatch(r"\d{5}\.tar(\.json)?\.tmp\d+", name):
                os.unlink(os.path.join(directory, name))


def _finish(opts: dict, records: list[dict], table_skips: list[dict], duplicates: _Duplicates, kept: int,
            start: float, progress: bool) -> dict:
    out = opts["out"]
    sizes = {r["shard"]: r["count"] for r in records}
    stale = sorted(n for n in os.listdir(out) if re.fullmatch(r"\d{5}\.tar", n) and n not in sizes)
    if stale:
        raise PrepareError(f"{out} holds shards beyond the {len(sizes)} this input makes ({stale[:3]}...): the input "
                           "has fewer rows than when they were written. Use a new --out, or delete the directory.")
    repeats = duplicates.summary(opts, progress)
    skipped = sorted(table_skips + [s for r in records for s in r["skipped"]], key=lambda s: s["index"])
    with open(os.path.join(out, "skipped.jsonl.tmp"), "w", encoding="utf-8") as f:
        for s in skipped:
            f.write(json.dumps(s, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(os.path.join(out, "skipped.jsonl.tmp"), os.path.join(out, "skipped.jsonl"))
    _write_json(os.path.join(out, "sizes.json"), sizes, indent=1)
    by_reason: dict[str, int] = {}
    for s in skipped:
        by_reason[s["reason"]] = by_reason.get(s["reason"], 0) + 1
    names = list(sizes)
    summary = {
        "rows": sum(r["rows"] for r in records) + len(table_skips),
        "samples": sum(sizes.values()),
        "shards": len(records),
        "shards_written": len(records) - kept,
        "shards_kept": kept,
        "empty_shards": [n for n, c in sizes.items() if c == 0],
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "duplicates": repeats,
        "pattern": os.path.join(out, names[0] if len(names) == 1 else f"{{{names[0][:-4]}..{names[-1][:-4]}}}.tar"),
        "seconds": round(time.perf_counter() - start, 2),
    }
    _write_json(os.path.join(out, "prepare.json"), {"args": _manifest_args(opts), "summary": summary}, indent=1)
    return summary


# ----------------------------------------------------------------------------- entry points


def _options(input, out, format, image_col, caption_col, image_template, base_dir, shard_size, resize_shorter,
             jpeg_quality, workers) -> dict:
    if format not in FORMATS:
        raise PrepareError(f"Unknown format {format!r}. Known: {', '.join(FORMATS)}.")
    for name, value, low, high in (("--shard-size", shard_size, 1, None), ("--resize-shorter", resize_shorter, 0, None),
                                   ("--jpeg-quality", jpeg_quality, 1, 100), ("--workers", workers, 0, None)):
        if value is not None and (not isinstance(value, int) or value < low or (high and value > high)):
            raise PrepareError(f"{name} must be an integer >= {low}" + (f" and <= {high}" if high else "")
                               + f"; got {value!r}.")
    if not input or not os.path.exists(input):
        raise PrepareError(f"--input {input!r} does not exist.")
    if not out:
        raise PrepareError("--out is required.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"--out {out!r} exists and is not a directory.")
    input = os.path.abspath(os.path.expanduser(input))
    fmt = _guess_format(input) if format == "auto" else format
    if (fmt == "folder") != os.path.isdir(input):
        raise PrepareError(f"--format {fmt} needs {'a directory' if fmt == 'folder' else 'a table file'}; "
                           f"--input {input!r} is {'a directory' if os.path.isdir(input) else 'a file'}.")
    table_format = fmt
    if fmt in ("yfcc", "cc3m"):
        ext = os.path.splitext(input)[1].lower()
        table_format = _EXT_FORMATS.get(ext, "tsv")  # .tsv, .txt or no extension: the datasets' TSVs
    if fmt == "folder" and (image_col or caption_col or image_template):
        raise PrepareError("--image-col / --caption-col / --image-template apply to tables, not --format folder "
                           "(captions come from <stem>.txt next to each image).")
    if image_col and image_template:
        raise PrepareError("Pass either --image-col or --image-template, not both.")
    if base_dir is not None and not os.path.isdir(base_dir):
        raise PrepareError(f"--base-dir {base_dir!r} is not a directory.")
    base = os.path.abspath(os.path.expanduser(base_dir)) if base_dir else (
        input if fmt == "folder" else os.path.dirname(input))
    return {"input": input, "out": os.path.abspath(os.path.expanduser(out)), "format": fmt,
            "table_format": table_format, "image_col": image_col, "caption_col": caption_col,
            "image_template": image_template, "base_dir": base, "shard_size": shard_size,
            "resize_shorter": resize_shorter, "jpeg_quality": jpeg_quality,
            "workers": (os.cpu_count() or 1) if workers is None else workers}


def _rows(opts: dict) -> Iterator[_Row | _Skip]:
    """The input's rows; the first one is read now, so column errors come before any writing."""
    rows = _folder_rows(opts) if opts["format"] == "folder" else _table_rows(opts)
    first = next(rows, None)
    if first is None:
        what = "no images (" + "/".join(FOLDER_IMAGE_EXTS) + ")" if opts["format"] == "folder" else "no data rows"
        raise PrepareError(f"--input {opts['input']} has {what}.")
    return _chain([first], rows)


def prepare(input: str, out: str, *, format: str = "auto", image_col: str | None = None,
            caption_col: str | None = None, image_template: str | None = None, base_dir: str | None = None,
            shard_size: int = 10000, resize_shorter: int = 0, jpeg_quality: int = 90, workers: int | None = None,
            progress: bool = True) -> dict:
    """Write webdataset shards of ``input`` to ``out`` (see the module docstring); return the summary.

    Raises ``PrepareError`` (a ValueError) for bad arguments, an unreadable input, missing
    columns, or an ``out`` holding shards made with other arguments or other input rows.
    ``workers``: processes writing shards (default: all CPUs; 0 or 1: this process).
    """
    opts = _options(input, out, format, image_col, caption_col, image_template, base_dir, shard_size,
                    resize_shorter, jpeg_quality, workers)
    start = time.perf_counter()
    rows = _rows(opts)
    _check_out(opts)  # before the lock, which creates the directory
    with _lock(opts["out"]):
        if _check_out(opts):  # again under the lock: another run may have just started here
            _write_json(os.path.join(opts["out"], "prepare.json"), {"args": _manifest_args(opts)}, indent=1)
        _remove_temp_files(opts["out"])
        table_skips: list[dict] = []
        duplicates = _Duplicates()
        bar = _Progress(None if opts["format"] == "folder" else _count_rows(opts), progress)
        try:
            records, kept = _run_jobs(_jobs(rows, opts, table_skips, duplicates, bar), opts["workers"], bar)
        finally:
            bar.close()
        return _finish(opts, records, table_skips, duplicates, kept, start, progress)


def _format_summary(summary: dict, out: str) -> str:
    lines = [f"{summary['rows']} rows -> {summary['samples']} samples in {summary['shards']} shards "
             f"({summary['shards_written']} written, {summary['shards_kept']} kept from an earlier run) "
             f"in {summary['seconds']:.1f}s",
             f"shards: {summary['pattern']}  (counts in {os.path.join(out, 'sizes.json')})"]
    if summary["skipped"]:
        reasons = ", ".join(f"{k} {v}" for k, v in summary["skipped_by_reason"].items())
        lines.append(f"skipped {summary['skipped']} rows: {reasons}  (details: {os.path.join(out, 'skipped.jsonl')})")
    else:
        lines.append("skipped 0 rows")
    if summary["empty_shards"]:
        lines.append(f"warning: shards without samples (every row skipped): {summary['empty_shards']}")
    duplicates = summary["duplicates"]
    exact, other = duplicates["same_image_and_caption"], duplicates["same_image"] - duplicates["same_image_and_caption"]
    eg = next((f" (e.g. row {x['index']} = row {x['first_index']}, {x['source']})" for x in duplicates["examples"]), "")
    see = f"See duplicates in {os.path.join(out, 'prepare.json')}."

    def count(n: int, one: str, many: str) -> str:
        return f"{n} {one if n == 1 else many}"

    if exact:
        more = (f"; {count(other, 'more row shares', 'more rows share')} an image with an earlier row, with another "
                f"caption" if other else "")
        lines.append(f"warning: {count(exact, 'row repeats', 'rows repeat')} an earlier row's image and caption "
                     f"exactly{eg}{more}. Exact repeats are trained on more often than the rest"
                     f"{'; several captions per image is fine' if other else ''}. {see}")
    elif other:
        lines.append(f"note: {count(other, 'row shares', 'rows share')} an image with an earlier row, with another "
                     f"caption{eg}: fine for several captions per image, as in COCO; otherwise those images are "
                     f"trained on more often. {see}")
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    details = __doc__[__doc__.index("Input formats"):]  # formats, output layout, images, resuming
    p = argparse.ArgumentParser(prog="python -m declip_ds.data.prepare", epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Turn an image-caption table or folder into webdataset shards.")
    p.add_argument("--input", required=True, help="table file (csv/tsv/parquet/jsonl/yfcc/cc3m) or image folder")
    p.add_argument("--out", required=True, help="output directory for {00000..}.tar + sizes.json")
    p.add_argument("--format", default="auto", choices=FORMATS, help="input format (default: by extension)")
    p.add_argument("--image-col", help="column with the image path (default: filepath, image_path, image, ...)")
    p.add_argument("--caption-col", help="caption column, or several joined with commas (default: caption, "
                                         "title, text, txt; yfcc: title,description)")
    p.add_argument("--image-template", help="image path from a format string over the row, e.g. "
                                            "'{index:08d}.jpg' (cc3m default) or '{photoid}.jpg' (yfcc default)")
    p.add_argument("--base-dir", help="relative image paths are under this directory (default: the table's)")
    p.add_argument("--shard-size", type=int, default=10000,
                   help="rows per shard, counting only rows with an image path and a caption; rows "
                        "failing later (unreadable image) leave it short (default 10000)")
    p.add_argument("--resize-shorter", type=int, default=0,
                   help="shrink images whose shorter side is larger to this many pixels (default 0: keep size)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--workers", type=int, default=None, help="processes, one shard each (default: CPU count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def main(argv=None) -> int:
    parser = _build_parser()
    ns = parser.parse_args(argv)
    try:
        summary = prepare(ns.input, ns.out, format=ns.format, image_col=ns.image_col, caption_col=ns.caption_col,
                          image_template=ns.image_template, base_dir=ns.base_dir, shard_size=ns.shard_size,
                          resize_shorter=ns.resize_shorter, jpeg_quality=ns.jpeg_quality, workers=ns.workers,
                          progress=not ns.quiet)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not ns.quiet:
        print(_format_summary(summary, os.path.abspath(ns.out)))
    if summary["samples"] == 0:
        print(f"error: no sample was written: {_why_nothing(summary, os.path.abspath(ns.out), ns.base_dir)}",
              file=sys.stderr)
        return 2
    return 0


def _why_nothing(summary: dict, out: str, base_dir: str | None) -> str:
    """Why a run wrote no sample, from its most common skip reason and that reason's first row."""
    if not summary["rows"]:
        return "the input has no data rows (a table with one line has only its header)."
    reason = max(summary["skipped_by_reason"].items(), key=lambda kv: kv[1])[0] if summary["skipped_by_reason"] else "?"
    first = None
    try:
        with open(os.path.join(out, "skipped.jsonl")) as f:
            first = next((r for r in map(json.loads, f) if r.get("reason") == reason), None)
    except OSError:
        pass
    text = f"every row was skipped, most for {reason}"
    if first is not None:
        text += f" (first: row {first.get('index')}, {first.get('detail')})"
    if reason == "missing_file":
        where = base_dir or "default: the table's directory"
        text += f". Relative image paths are resolved against --base-dir ({where}); set it to the folder they start from"
    return text + f". All skipped rows: {os.path.join(out, 'skipped.jsonl')}."


if __name__ == "__main__":
    sys.exit(main())
