"""Image-text retrieval: recall@1/5/10 in both directions, several captions per image.

    python -m declip_ds.eval.retrieval --checkpoint CKPT --data DIR --out results.json
    python -m declip_ds.eval.retrieval --checkpoint CKPT --data dataset_coco.json --split test \
        --images /data/coco --out coco.json                   # COCO 5k test (Karpathy split)

DIR is one of
    shards          DIR/*.tar, each sample an image + ``txt`` (one caption per line) and/or ``json``
                    with a ``captions`` list (which wins when present)
    a captions file captions.tsv: ``image_path<TAB>caption[<TAB>caption...]`` per line (a path repeated on
                    several lines collects all its captions; a first line "image<TAB>caption..." is a
                    header); or captions.json: ``[{"image": path, "captions": [...]}, ...]`` (``caption``:
                    str also accepted) or ``{path: [captions]}``. --data may name the file, or a directory
                    holding captions.tsv / captions.json.
    a Karpathy split file  ``dataset_coco.json`` / ``dataset_flickr30k.json`` (Karpathy & Fei-Fei's splits,
                    the ones the CLIP, ALIGN, FILIP and ALBEF papers report): ``{"images": [{"filepath",
                    "filename", "split", "sentences": [{"raw": ...}]}], "dataset": ...}``. ``--split``
                    picks the images (default ``test``: COCO's 5,000 images with their 25,010 captions,
                    Flickr30k's 1,000 with 5,000); every caption of an image is kept (as CLIP_benchmark).
                    An image is ``--images``/filepath/filename (COCO: ``val2014/COCO_val2014_...jpg``;
                    Flickr30k has no filepath: point --images at the folder of its jpgs).
Image paths in a captions file are relative to ``--images`` (default: the file's folder); every listed
image is checked before anything is embedded, and a missing one is an error that names it.

Scoring (``--scoring``, default: what the checkpoint's method trained for, as zero-shot):
    global  cosine similarity of the L2-normalised global embeddings (CLIP, DeCLIP, SLIP, DeFILIP)
    token   FILIP's token-wise late interaction (Yao et al. 2021, its retrieval protocol): image->text
            ranks captions by s_i2t (each image token's best caption token, averaged over the image
            tokens), text->image ranks images by s_t2i (each caption token's best
            image token, averaged over the caption's tokens); tokens L2-normalised after the token
            projections, as in training. ``--mask-padding`` (default: the method's ``mask_padding``;
            ``false`` for DeCLIP-repo FILIP releases) scores only caption positions up to the EOT, else
            all context positions. The gallery's token embeddings are held in float32 on the CPU
            (COCO 5k, token_dim 256, ViT-B/32: 0.26 GB of image tokens, at most 2 GB of caption tokens,
            25,010 x 77 x 256; with --mask-padding true the positions past the longest caption are dropped)
            and scored on the model's device, one block of queries at a time.

Metrics (on the scores above):
    image->text  R@k: an image is a hit when any of its captions is among its k best-scored captions
    text->image  R@k: a caption is a hit when its image is among its k best-scored images
    mean_recall: the mean of the six numbers (the retrieval column of the report table).
Ties count against the query: a candidate scored equal to the best true match ranks above it, so a
degenerate model (all embeddings equal) scores 0, not 1. Images without a caption are skipped, with a warning.

Embeddings are computed in batches; under several ranks (torchrun, the deepspeed launcher, or mpirun / srun
with MASTER_ADDR and MASTER_PORT exported) each rank embeds its own shards or file entries, the embeddings are
gathered on rank 0 alone, which scores them (only rank 0 holds the whole gallery), and every rank gets its
metrics. An error on one rank (an unreadable image, a path missing on its node) stops every rank with exit code
2, each naming the rank that failed; only rank 0 prints and writes --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

KS = (1, 5, 10)
CAPTION_FILES = ("captions.tsv", "captions.json")
_HEADER_FIELDS = {"image", "image_path", "filepath", "file", "path", "filename"}


# ----------------------------------------------------------------------------- metrics


def _i2t_ranks(scores: torch.Tensor, image_ids: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """scores (b, Nt) of b images -> (b,) rank of each image's best caption (0 = first)."""
    positive = text_to_image[None, :] == image_ids[:, None]  # (b, Nt)
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1)  # (b,)
    return ((scores >= best[:, None]) & ~positive).sum(dim=1)


def _t2i_ranks(scores: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
    """scores (b, Ni) of b captions -> (b,) rank of each caption's own image."""
    own = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, owners[:, None], True)  # (b, Ni)
    true = scores.gather(1, owners[:, None])  # (b, 1)
    return ((scores >= true) & ~own).sum(dim=1)


def _recalls(ranks: torch.Tensor, prefix: str, ks) -> dict:
    return {f"{prefix}_R@{k}": float((ranks < k).double().mean()) if len(ranks) else 0.0 for k in ks}


def recall_from_scores(scores: torch.Tensor, text_to_image: torch.Tensor, ks=KS) -> dict:
    """Recalls of a full similarity matrix ``scores`` (Ni, Nt); ``text_to_image`` (Nt,) = image of each text."""
    text_to_image = text_to_image.long().to(scores.device)
    i2t = _i2t_ranks(scores, torch.arange(scores.shape[0], device=scores.device), text_to_image)
    t2i = _t2i_ranks(scores.t(), text_to_image)
    out = {**_recalls(i2t, "i2t", ks), **_recalls(t2i, "t2i", ks)}
    out["mean_recall"] = sum(out.values()) / len(out)
    return {**out, "n_images": scores.shape[0], "n_texts": scores.shape[1]}


@torch.no_grad()
def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, ks=KS,
                      chunk: int = 1024) -> dict:
    """Recalls of embeddings (Ni, E), (Nt, E), L2-normalised here, scored ``chunk`` queries at a time so
    the (Ni, Nt) matrix is never held whole."""
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    t2img = text_to_image.long().to(img.device)
    i2t = torch.cat([_i2t_ranks(img[s:s + chunk] @ txt.t(), torch.arange(s, min(s + chunk, len(img)), device=img.device),
                                t2img) for s in range(0, len(img), chunk)])
    t2i = torch.cat([_t2i_ranks(txt[s:s + chunk] @ img.t(), t2img[s:s + chunk]) for s in range(0, len(txt), chunk)])
    out = {**_recalls(i2t, "i2t", ks), **_recalls(t2i, "t2i", ks)}
    out["mean_recall"] = sum(out.values()) / len(out)
    return {**out, "n_images": len(img), "n_texts": len(txt)}


class TokenEmbeddings(NamedTuple):
    """A gallery's FILIP token embeddings, each token L2-normalised (float32, CPU)."""

    image_tokens: torch.Tensor         # (Ni, Ti, d)
    text_tokens: torch.Tensor          # (Nt, Lt, d)
    text_mask: torch.Tensor | None     # bool (Nt, Lt), True = a position scored; None = all Lt
    text_to_image: torch.Tensor        # (Nt,) the image of each caption


def token_block_size(Ti: int, Tt: int, device) -> int:
    """Samples per side of one filip_similarity block: 2^22 similarities on the CPU (16 MB), 2^26 on a GPU."""
    budget = (1 << 26) if torch.device(device).type == "cuda" else (1 << 22)
    return max(1, int(math.sqrt(budget / max(1, Ti * Tt))))


@torch.no_grad()
def token_retrieval_metrics(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_to_image: torch.Tensor,
                            text_mask: torch.Tensor | None = None, ks=KS, *, chunk: int = 256, device=None,
                            similarity=None) -> dict:
    """Recalls under FILIP's token-wise scoring: image->text by s_i2t, text->image by s_t2i.

    image_tokens (Ni, Ti, d), text_tokens (Nt, Lt, d), L2-normalised per token; text_mask bool (Nt, Lt) or
    None; text_to_image (Nt,). ``chunk`` queries are scored against the whole gallery at a time on
    ``device`` (default: where the tokens are), so no (Ni, Nt) matrix is held whole. ``similarity``: a
    function with filip_similarity's signature and ``direction`` keyword (default filip_similarity)."""
    from declip_ds.losses.filip import filip_similarity

    dev = torch.device(device) if device is not None else image_tokens.device
    x, y = image_tokens.to(dev, torch.float32), text_tokens.to(dev, torch.float32)  # (Ni, Ti, d), (Nt, Lt, d)
    mask = None if text_mask is None else text_mask.to(dev, torch.bool)  # (Nt, Lt)
    t2img = text_to_image.long().to(dev)
    if similarity is None:
        block = token_block_size(x.shape[1], y.shape[1], dev)
        similarity = functools.partial(filip_similarity, chunk_size=block)
    i2t = []
    for s in range(0, len(x), chunk):
        scores, _ = similarity(x[s:s + chunk], y, None, mask, direction="i2t")  # (c, Nt)
        i2t.append(_i2t_ranks(scores, torch.arange(s, s + len(scores), device=dev), t2img).cpu())
    t2i = []
    for s in range(0, len(y), chunk):
        part = None if mask is None else mask[s:s + chunk]
        _, scores = similarity(x, y[s:s + chunk], None, part, direction="t2i")  # (Ni, c)
        t2i.append(_t2i_ranks(scores.t(), t2img[s:s + chunk]).cpu())
    i2t = torch.cat(i2t) if i2t else torch.zeros(0, dtype=torch.long)
    t2i = torch.cat(t2i) if t2i else torch.zeros(0, dtype=torch.long)
    out = {**_recalls(i2t, "i2t", ks), **_recalls(t2i, "t2i", ks)}
    out["mean_recall"] = sum(out.values()) / len(out)
    return {**out, "n_images": len(x), "n_texts": len(y)}


# ----------------------------------------------------------------------------- data


def split_captions(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def sample_captions(members: dict[str, bytes]) -> list[str]:
    """A shard sample's captions: ``json["captions"]`` when present, else the lines of ``txt``."""
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
            return [str(c).strip() for c in meta["captions"] if str(c).strip()]
    if "txt" in members:
        return split_captions(members["txt"].decode("utf-8", errors="replace"))
    return []


KARPATHY_SPLITS = ("train", "restval", "val", "test")


def is_karpathy(data) -> bool:
    """Whether parsed JSON is a Karpathy split file (``{"images": [{"filename", "split", "sentences"}]}``)."""
    images = data.get("images") if isinstance(data, dict) else None
    return isinstance(images, list) and bool(images) and isinstance(images[0], dict) and "sentences" in images[0]


def _karpathy_entries(data: dict, path: Path, split: str) -> list[tuple[str, list[str]]]:
    """(filepath/filename, raw captions) of the images of ``split``, in file order."""
    counts = Counter(str(d.get("split")) for d in data["images"])
    if split not in counts:
        have = ", ".join(f"{k} ({n} images)" for k, n in sorted(counts.items()))
        raise ValueError(f"{path} is a Karpathy split file without a '{split}' split; it has {have}. Pick one "
                         f"with --split.")
    entries = []
    for d in data["images"]:
        if str(d.get("split")) != split:
            continue
        if not d.get("filename"):
            raise ValueError(f"{path}: an image of split '{split}' (imgid {d.get('imgid', '?')}) has no 'filename'.")
        caps = [str(c.get("raw") or " ".join(c.get("tokens") or [])).strip() for c in d.get("sentences") or []]
        entries.append((str(Path(d.get("filepath") or "") / d["filename"]), [c for c in caps if c]))
    return entries


def karpathy_name(data: dict, path: Path, split: str) -> str:
    """The results' column name of a Karpathy split: the dataset ("coco", "flickr30k") for its test split,
    "<dataset>_<split>" otherwise."""
    dataset = str(data.get("dataset") or Path(path).stem.removeprefix("dataset_"))
    return dataset if split == "test" else f"{dataset}_{split}"


def read_captions_file(path: str | Path, *, split: str | None = None,
                       images: str | Path | None = None) -> list[tuple[Path, list[str]]]:
    """(image path, captions) per image of a TSV, JSON or Karpathy captions file, in file order.

    split: the Karpathy split to read (default "test"); other files have no splits and refuse one.
    images: the folder image paths are relative to (default: the file's folder)."""
    return _read_captions(path, split=split, images=images)[0]


def _read_captions(path, *, split=None, images=None) -> tuple[list[tuple[Path, list[str]]], str | None]:
    """read_captions_file's entries and the results' default name (Karpathy files; None otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Captions file '{path}' does not exist.")
    entries: dict[str, list[str]] = {}
    name = None
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if is_karpathy(data):
            split = split or "test"
            items, name = _karpathy_entries(data, path, split), karpathy_name(data, path, split)
        elif isinstance(data, dict):
            items = data.items()
        else:
            items = ((d.get("image") or d.get("filepath") or d.get("file_name"), d.get("captions", d.get("caption")))
                     for d in data)
        for image, caps in items:
            if image is None:
                raise ValueError(f"{path}: an entry has no 'image' field; expected {{'image': path, 'captions': [...]}}.")
            caps = [caps] if isinstance(caps, str) else list(caps or [])
            entries.setdefault(str(image), []).extend(str(c).strip() for c in caps if str(c).strip())
    else:
        lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if lines and lines[0].split("\t", 1)[0].strip().lower() in _HEADER_FIELDS:
            lines = lines[1:]
        for n, line in enumerate(lines, 1):
            fields = line.split("\t")
            if len(fields) < 2:
                raise ValueError(f"{path}, line {n}: expected 'image_path<TAB>caption', got {line[:80]!r}.")
            entries.setdefault(fields[0].strip(), []).extend(c.strip() for c in fields[1:] if c.strip())
    if split is not None and name is None:
        raise ValueError(f"--split {split} applies to Karpathy split files (dataset_coco.json, "
                         f"dataset_flickr30k.json); {path} has no splits: drop --split.")
    base = Path(images) if images is not None else path.parent
    return [(Path(image) if Path(image).is_absolute() else base / image, caps) for image, caps in entries.items()], name


class Source(NamedTuple):
    """What --data names: ``kind`` "shards" (items: urls) or "file" (items: (image path, captions));
    ``name``: the results' default column name when the source knows it (Karpathy files), else None."""

    kind: str
    items: list
    name: str | None = None


def resolve_source(data: str | Path, *, split: str | None = None, images: str | Path | None = None) -> Source:
    """The shards or captions-file entries of --data (split / images: see read_captions_file); every image
    a captions file lists must exist. Errors name what was expected where."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"Retrieval data '{data}' does not exist. Expected a directory of *.tar shards "
                                f"(image + txt/json captions), a captions file (.tsv/.json, or a Karpathy "
                                f"dataset_coco.json) or a directory holding {' or '.join(CAPTION_FILES)}.")
    urls = [] if data.is_file() else sorted(str(p) for p in data.glob("*.tar"))
    if urls:
        if split is not None or images is not None:
            raise ValueError(f"--split / --images apply to captions files; '{data}' holds *.tar shards: drop them.")
        return Source("shards", urls)
    file = data if data.is_file() else next((data / n for n in CAPTION_FILES if (data / n).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"No retrieval data in '{data}': expected *.tar shards there, or "
                                f"{' or '.join(str(data / n) for n in CAPTION_FILES)}.")
    entries, name = _read_captions(file, split=split, images=images)
    missing = [str(image) for image, caps in entries if caps and not image.is_file()]
    if missing:
        base = Path(images) if images is not None else file.parent
        raise FileNotFoundError(
            f"{len(missing)} of {len(entries)} images listed in {file} are not under {base} (e.g. {missing[0]}). "
            f"Point --images at the folder the file's paths are relative to (COCO: the folder holding val2014/; "
            f"Flickr30k: the folder of its jpgs).")
    return Source("file", entries, name)


# ----------------------------------------------------------------------------- named retrieval datasets


_KARPATHY_ZIP = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"


@dataclass(frozen=True)
class RetrievalSpec:
    """A standard retrieval benchmark under the suite's data root: Karpathy's split file and the folder its
    image paths are relative to, or a webdataset copy ``DIR/<name>_wds/test/*.tar``."""

    name: str
    title: str
    file: str     # the split file, relative to the data root
    images: str   # the folder the file's paths are relative to, relative to the data root
    get: str      # how to obtain the files, for the error message

    def source(self, root: str | Path, split: str = "test") -> Source:
        """The test split's Source; FileNotFoundError naming the expected files when neither copy is there."""
        root = Path(root)
        if (root / self.file).is_file():
            return resolve_source(root / self.file, split=split, images=root / self.images)._replace(name=self.name)
        shards = root / f"{self.name}_wds" / split
        if shards.is_dir() and any(shards.glob("*.tar")):
            return resolve_source(shards)._replace(name=self.name)
        raise FileNotFoundError(f"{self.title} is not under '{root}': expected {root / self.file} with its images "
                                f"under {root / self.images}/ (or shards {shards}/*.tar). Get them: {self.get}.")


RETRIEVAL_REGISTRY: dict[str, RetrievalSpec] = {s.name: s for s in [
    RetrievalSpec("flickr30k", "Flickr30k (1k test)", "flickr30k/dataset_flickr30k.json", "flickr30k/flickr30k-images",
                  f"dataset_flickr30k.json from Karpathy's {_KARPATHY_ZIP} into DIR/flickr30k, and the Flickr30k "
                  "images (flickr30k-images/, on request from https://shannon.cs.illinois.edu/DenotationGraph/) "
                  "into DIR/flickr30k"),
    RetrievalSpec("coco", "MSCOCO (5k test)", "coco/dataset_coco.json", "coco",
                  f"dataset_coco.json from Karpathy's {_KARPATHY_ZIP} into DIR/coco, and COCO 2014's val images "
                  "(http://images.cocodataset.org/zips/val2014.zip, the Karpathy test split's source) as "
                  "DIR/coco/val2014"),
]}


class _CaptionStream(IterableDataset):
    """(image tensor, captions, key) of this rank's (and worker's) part of the source."""

    def __init__(self, kind: str, items: list, transform: Callable, rank: int, world_size: int):
        self.kind, self.items, self.transform = kind, items, transform
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = self.items[self.rank::self.world_size][worker::workers]
        yield from (self._shards(mine) if self.kind == "shards" else self._files(mine))

    def _files(self, entries) -> Iterator:
        for image, caps in entries:
            if not caps:
                log.warning("retrieval: skipped %s (no caption)", image)
                continue
            if not image.is_file():
                raise FileNotFoundError(f"Image '{image}' listed in the captions file does not exist.")
            try:
                with Image.open(image) as im:
                    rgb = im.convert("RGB")
            except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable or truncated files
                from declip_ds.eval.datasets import UnreadableImage

                raise UnreadableImage(f"Cannot read the image {image} ({type(e).__name__}: {e}). Replace or remove "
                                      f"it: retrieval scores every listed image.") from None
            yield self.transform(rgb), caps, str(image)

    def _shards(self, urls) -> Iterator:
        from declip_ds.data.wds import IMAGE_EXTS, decode_image, _member_groups, _TailWatch
        from webdataset.gopen import gopen

        draft = getattr(self.transform, "draft_size", None)
        for url in urls:
            stream = _TailWatch(gopen(url))
            groups = _member_groups(stream, [0], [])  # a cut tail raises below: no partial gallery
            try:
                while True:
                    try:
                        key, members = next(groups)
                    except StopIteration:
                        break
                    except Exception as e:  # a lost tail would silently shrink the gallery: stop instead
                        raise ValueError(f"Cannot read retrieval shard {url}: {e}") from None
                    ext = next((e for e in IMAGE_EXTS if members.get(e)), None)
                    caps = sample_captions(members)
                    if ext is None or not caps:
                        log.warning("retrieval: skipped %s in %s (%s)", key, url,
                                    "no image" if ext is None else "no caption")
                        continue
                    yield self.transform(decode_image(members[ext], ext, draft, plain=True)), caps, f"{url}:{key}"
            finally:
                stream.close()


def _collate(items):
    images, caps, keys = zip(*items)
    return torch.stack(images), list(caps), list(keys)


def build_loader(data, transform: Callable, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 workers: int = 0, split: str | None = None, images: str | Path | None = None) -> DataLoader:
    """Batches ``(images (B, 3, H, W), captions: list of B lists, keys)`` of this rank's part of ``data``
    (a path, see resolve_source, or a resolved ``Source``)."""
    kind, items, _ = data if isinstance(data, Source) else resolve_source(data, split=split, images=images)
    return DataLoader(_CaptionStream(kind, items, transform, rank, world_size), batch_size=batch_size,
                      num_workers=workers, collate_fn=_collate)


# ----------------------------------------------------------------------------- embeddings


@torch.no_grad()
def _encode_gallery(model, tokenizer, loader, encode_images: Callable, encode_texts: Callable, *,
                    text_batch: int = 256, group=None, image_size: int = 224) -> tuple[list, list, list[int]]:
    """The loader's images through ``encode_images(images)`` and its captions, ``text_batch`` at a time, through
    ``encode_texts(ids)``: (image outputs, text outputs, the image index of every caption).

    Under ``group`` every rank runs the same number of image and text forwards: a rank out of data, or with
    fewer caption chunks in a step, runs throwaway forwards (a blank image, an empty caption), so a ZeRO-3
    model, whose every module forward gathers its parameters collectively, cannot hang on unequal shards; an
    error in one rank's loader is raised on every rank (``RankFailed`` on the others) in the same collective."""
    from declip_ds.train.dist import share_error

    p = next(model.parameters())
    flag_device = p.device if p.device.type == "cuda" else torch.device("cpu")
    images_out, texts_out, owners, n_images = [], [], [], 0
    it, failed = iter(loader), None
    while True:
        error, batch = failed, None
        if error is None:
            try:
                batch = next(it, None)
            except Exception as e:  # noqa: BLE001 (an unreadable image or shard: share_error raises it on every rank)
                error = e
        flat = [] if batch is None else [c for caps in batch[1] for c in caps]
        chunks = [flat[s:s + text_batch] for s in range(0, len(flat), text_batch)]
        busy, n_chunks = share_error(error, group, values=[int(batch is not None), len(chunks)],
                                     op=dist.ReduceOp.MAX, tensor_device=flag_device)
        if busy == 0:
            return images_out, texts_out, owners
        try:
            if batch is None:  # out of data while another rank is not
                encode_images(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
            else:
                images, captions = batch[0], batch[1]
                images_out.append(encode_images(images.to(p.device, p.dtype)))
                owners += [n_images + i for i, caps in enumerate(captions) for _ in caps]
                n_images += len(images)
            for c in range(n_chunks):
                if c < len(chunks):
                    texts_out.append(encode_texts(tokenizer(chunks[c]).to(p.device)))
                else:
                    encode_texts(tokenizer([""]).to(p.device))
        except Exception as e:  # noqa: BLE001 (out of memory in this rank's forward: shared in the next round's
            failed = e          # collective, where the others are; a ZeRO-3 forward is itself collective)


@torch.no_grad()
def embed(model, tokenizer, loader, *, text_batch: int = 256, group=None,
          image_size: int = 224) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_emb (Ni, E), text_emb (Nt, E), text_to_image (Nt,)), normalised, float32 on CPU; ``group`` /
    ``image_size``: see _encode_gallery (every rank then runs the same forwards)."""
    images, texts, owners = _encode_gallery(
        model, tokenizer, loader, lambda x: F.normalize(model.encode_image(x).float(), dim=-1).cpu(),
        lambda ids: F.normalize(model.encode_text(ids).float(), dim=-1).cpu(), text_batch=text_batch, group=group,
        image_size=image_size)
    E = getattr(model, "embed_dim", 0)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, E)
    return cat(images), cat(texts), torch.tensor(owners, dtype=torch.long)


def _require_token_heads(model) -> None:
    if getattr(model, "image_mapping", None) is None:
        raise ValueError("Token scoring (--scoring token) needs a FILIP-family model with token projections; this "
                         "checkpoint has none (model.token_dim 0): use --scoring global.")


def _cat_tokens(parts: list[torch.Tensor], masks: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate (n_i, L_i, d) token blocks along samples, zero-padding L to the longest (the padding
    masked out); empty blocks are skipped."""
    keep = [i for i, t in enumerate(parts) if t.numel()]
    if not keep:
        return torch.zeros(0, 0, 0), (None if masks is None else torch.zeros(0, 0, dtype=torch.bool))
    L = max(parts[i].shape[1] for i in keep)
    tokens = torch.cat([F.pad(parts[i], (0, 0, 0, L - parts[i].shape[1])) for i in keep])  # (N, L, d)
    if masks is None:
        return tokens, None
    return tokens, torch.cat([F.pad(masks[i], (0, L - masks[i].shape[1]), value=False) for i in keep])  # (N, L)


@torch.no_grad()
def embed_tokens(model, tokenizer, loader, *, mask_padding: bool = True, text_batch: int = 256, group=None,
                 image_size: int = 224) -> TokenEmbeddings:
    """The gallery's FILIP token embeddings, each token L2-normalised after the token projections (as the
    loss sees them), float32 on CPU. mask_padding: caption positions past the EOT are masked, and those
    past every caption's EOT dropped (exact: they score nothing); else all context positions are kept.
    ``group`` / ``image_size``: see _encode_gallery (every rank then runs the same forwards)."""
    from declip_ds.methods.filip import text_token_mask

    _require_token_heads(model)

    def texts(ids):  # (n, L) -> tokens (n, L', d), mask (n, L') or None
        y = F.normalize(model.encode_text_tokens(ids).float(), dim=-1)  # (n, L, d)
        if not mask_padding:
            return y.cpu(), None
        m = text_token_mask(ids)  # (n, L) True up to each caption's EOT
        keep = int(m.sum(dim=1).max())
        return y[:, :keep].cpu(), m[:, :keep].cpu()

    images, text_parts, owners = _encode_gallery(
        model, tokenizer, loader, lambda x: F.normalize(model.encode_image_tokens(x).float(), dim=-1).cpu(),
        texts, text_batch=text_batch, group=group, image_size=image_size)
    image_tokens, _ = _cat_tokens(images, None)
    text_tokens, text_mask = _cat_tokens([t for t, _ in text_parts],
                                         [m for _, m in text_parts] if mask_padding else None)
    return TokenEmbeddings(image_tokens, text_tokens, text_mask, torch.tensor(owners, dtype=torch.long))


def _gather_on_first(obj, group) -> list | None:
    """Every rank's ``obj`` in rank order on the group's rank 0, None on the others (collective)."""
    first = dist.get_rank(group) == 0
    parts = [None] * dist.get_world_size(group) if first else None
    dist.gather_object(obj, parts, dst=dist.get_global_rank(group, 0), group=group)
    return parts


def gather_embeddings(image_emb, text_emb, text_to_image, group=None):
    """On the group's rank 0: all ranks' embeddings concatenated in rank order, text owners offset to the global
    image index; on the other ranks None (only rank 0 scores: the gallery is held once, not on every rank).
    Without a group (or in a world of one) the arguments themselves. Collective under a group."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return image_emb, text_emb, text_to_image
    parts = _gather_on_first((image_emb, text_emb, text_to_image), group)
    if parts is None:
        return None
    offset, owners = 0, []
    for img, _, own in parts:
        owners.append(own + offset)
        offset += len(img)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat(owners)


def gather_token_embeddings(emb: TokenEmbeddings, group=None) -> TokenEmbeddings | None:
    """On the group's rank 0: all ranks' token embeddings in rank order (caption lengths padded to the longest,
    masked), text owners offset to the global image index; on the other ranks None (the token gallery, COCO 5k
    up to a few GB, is held by rank 0 alone, which scores it). Without a group (or in a world of one) ``emb``
    itself. Collective under a group."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return emb
    parts = _gather_on_first(tuple(emb), group)
    if parts is None:
        return None
    offset, owners = 0, []
    for img, _, _, own in parts:
        owners.append(own + offset)
        offset += len(img)
    image_tokens, _ = _cat_tokens([q[0] for q in parts], None)
    masked = emb.text_mask is not None
    text_tokens, text_mask = _cat_tokens([q[1] for q in parts], [q[2] for q in parts] if masked else None)
    return TokenEmbeddings(image_tokens, text_tokens, text_mask, torch.cat(owners))


def _gathered(embed: Callable, gather: Callable, group):
    """(``gather(embed())``, None) or (None, the error): the gallery gathered on rank 0 of ``group``. An error
    while this rank embeds its part (a local concatenation out of memory; the loop's own errors are already
    shared) is shared before the gather, so that no rank waits in it alone; one in rank 0's concatenation of
    the gathered parts (its memory peak) is returned, for ``_scored_on_first`` to share."""
    from declip_ds.train.dist import share_error, was_shared

    try:
        part = embed()
    except Exception as e:  # noqa: BLE001 (shared below, or already raised on every rank)
        if was_shared(e):
            raise
        share_error(e, group)
    share_error(None, group)  # every rank has its part: the gather starts together
    try:
        return gather(part), None
    except Exception as e:  # noqa: BLE001 (after the collective: rank 0 alone concatenates)
        return None, e


def _scored_on_first(gathered, score: Callable, data, group, error: BaseException | None = None) -> dict:
    """``score(gathered)`` where the gathered gallery is (rank 0 of ``group``; the only process without one),
    its metrics on every rank (broadcast), or its error (or ``error``, from gathering) raised on every rank
    (``RankFailed`` on the others)."""
    from declip_ds.train.dist import share_error

    metrics = None
    if gathered is not None and error is None:
        try:
            if len(gathered[0]) == 0:
                raise ValueError(f"No captioned image in '{data}'; nothing to evaluate.")
            metrics = score(gathered)
        except Exception as e:  # noqa: BLE001 (the others wait for the metrics: raised on every rank)
            error = e
    share_error(error, group)
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        metrics = box[0]
    return metrics


SCORINGS = ("global", "token")


def evaluate_retrieval(model, tokenizer, data, *, image_size: int = 224, normalize="imagenet", batch_size: int = 64,
                       rank: int = 0, world_size: int = 1, group=None, workers: int = 0, ks=KS,
                       interpolation: str = "bicubic", crop_ratio: float = 224 / 256, scoring: str = "global",
                       mask_padding: bool = True, split: str | None = None, images: str | Path | None = None,
                       transform: Callable | None = None) -> dict:
    """Recall@k both ways on ``data`` (shard dir, captions file / dir or Karpathy split file; ``split`` and
    ``images`` as read_captions_file); images through ``transform``, by default ``eval_transform(image_size,
    normalize, crop_ratio, interpolation)``. scoring: ``global`` cosine of the global embeddings, or ``token`` (FILIP's token-wise
    similarities, ``mask_padding`` as the method's): see the module docstring. Under ``group`` each rank embeds
    its part, rank 0 gathers and scores the whole gallery, and every rank returns its metrics (an error on any
    rank, or in rank 0's scoring, is raised on every rank)."""
    from declip_ds.data.transforms import eval_transform

    if scoring not in SCORINGS:
        raise ValueError(f"Unknown retrieval scoring '{scoring}': use one of {', '.join(SCORINGS)}.")
    if scoring == "token":
        _require_token_heads(model)
    if transform is None:
        transform = eval_transform(image_size, normalize=normalize, crop_ratio=crop_ratio,
                                   interpolation=interpolation)
    from declip_ds.train.dist import errors_shared

    with errors_shared(group):  # a path (and its images) missing on one rank stops every rank here
        loader = build_loader(data, transform, batch_size, rank=rank, world_size=world_size, workers=workers,
                              split=split, images=images)
    if scoring == "token":
        emb, error = _gathered(lambda: embed_tokens(model, tokenizer, loader, mask_padding=mask_padding, group=group,
                                                    image_size=image_size),
                               lambda part: gather_token_embeddings(part, group), group)
        device = next(model.parameters()).device
        return _scored_on_first(emb, lambda e: token_retrieval_metrics(
            e.image_tokens, e.text_tokens, e.text_to_image, e.text_mask, ks=ks, device=device), data, group, error)
    gathered, error = _gathered(lambda: embed(model, tokenizer, loader, group=group, image_size=image_size),
                                lambda part: gather_embeddings(*part, group=group), group)
    return _scored_on_first(gathered, lambda g: retrieval_metrics(*g, ks=ks), data, group, error)


def main(argv=None) -> int:
    from declip_ds.models.pretrained import FORMATS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, step_XXXXXXXX dir or model.safetensors")
    p.add_argument("--data", required=True,
                   help="shard dir, captions file (.tsv/.json) or dir holding one, or a Karpathy dataset_*.json")
    p.add_argument("--split", default=None, choices=KARPATHY_SPLITS,
                   help="the split of a Karpathy file (default: test)")
    p.add_argument("--images", default=None,
                   help="the folder a captions file's image paths are relative to (default: the file's folder)")
    p.add_argument("--scoring", default=None, choices=SCORINGS,
                   help="global embeddings, or FILIP's token-wise similarities (default: what the method trained "
                        "for, as zero-shot)")
    p.add_argument("--mask-padding", choices=["true", "false"], default=None,
                   help="token scoring: score caption positions up to the EOT only (true) or all context positions "
                        "(false, the DeCLIP reference's FILIP); default: the checkpoint's method")
    p.add_argument("--name", default=None, help="dataset name in the results (default: from --data)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--format", default="auto", choices=list(FORMATS),
                   help="checkpoint format (auto-detected by default)")
    from declip_ds.models.pretrained import add_preprocess_args

    add_preprocess_args(p)
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)

    from declip_ds.train.dist import run_eval_script

    return run_eval_script(lambda rank, world, group: _run(args, rank, world, group))


def _run(args, rank: int, world: int, group) -> int:
    """main's work on this rank (its share of the gallery embedded; the line and the record on rank 0)."""
    from declip_ds.data.tokenizer import Tokenizer
    from declip_ds.eval.report import dataset_name, make_record, write_record
    from declip_ds.models.pretrained import load_for_eval
    from declip_ds.train.dist import errors_shared, init_eval_ranks

    with errors_shared(group):  # a rank-local path problem (data, images, checkpoint) stops every rank here
        source = resolve_source(args.data, split=args.split, images=args.images)
        em = load_for_eval(args.checkpoint, args.format, normalize=args.normalize,
                           interpolation=args.interpolation, crop_ratio=args.crop_ratio)
        scoring = args.scoring or getattr(em.method, "zero_shot_scoring", "global")
        mask_padding = getattr(em.method, "mask_padding", True) if args.mask_padding is None \
            else args.mask_padding == "true"
        if scoring == "token":
            _require_token_heads(em.model)
        else:
            em.warn_if_global_untrained("retrieval with --scoring global")
    model, rank, world, group = init_eval_ranks(em.model)  # the group joined in main; the model to this rank's GPU
    tok = Tokenizer(context_length=em.context_length, mask_token=em.mask_token)
    result = evaluate_retrieval(model, tok, source, image_size=em.image_size,
                                normalize=em.normalize, interpolation=em.interpolation, crop_ratio=em.crop_ratio,
                                batch_size=args.batch_size, rank=rank, world_size=world, group=group,
                                workers=args.workers, scoring=scoring, mask_padding=mask_padding)
    if rank == 0:
        name = args.name or source.name or dataset_name(args.data)
        how = "token-wise scoring" + ("" if mask_padding else ", all positions") if scoring == "token" else "global"
        cells = "  ".join(f"{k} {100 * v:.2f}" for k, v in result.items() if "@" in k)
        print(f"{name}: {cells}  mean {100 * result['mean_recall']:.2f}  "
              f"({result['n_images']} images, {result['n_texts']} captions; {how})")
        if args.out:
            extra = {"scoring": scoring, **({"mask_padding": mask_padding} if scoring == "token" else {}),
                     **({"split": args.split or "test"} if source.name else {})}
            write_record(make_record(model=em.name, checkpoint=str(em.weights),
                                     dataset=str(args.data), task="retrieval", metrics={name: result},
                                     preprocess=em.preprocess(), config_hash=em.config_hash, **extra), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
