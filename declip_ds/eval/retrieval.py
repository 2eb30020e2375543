"""Image-text retrieval: recall@1/5/10 in both directions, several captions per image.

    python -m declip_ds.eval.retrieval --checkpoint CKPT --data DIR --out results.json

DIR is one of
    shards          DIR/*.tar, each sample an image + ``txt`` (one caption per line) and/or ``json``
                    with a ``captions`` list (which wins when present)
    a captions file captions.tsv: ``image_path<TAB>caption[<TAB>caption...]`` per line (a path repeated on
                    several lines collects all its captions; a first line "image<TAB>caption..." is a
                    header); or captions.json: ``[{"image": path, "captions": [...]}, ...]`` (``caption``:
                    str also accepted) or ``{path: [captions]}``. Paths are relative to the file's folder.
                    --data may name the file, or a directory holding captions.tsv / captions.json.

Metrics (cosine similarities of the L2-normalised embeddings):
    image->text  R@k: an image is a hit when any of its captions is among its k best-scored captions
    text->image  R@k: a caption is a hit when its image is among its k best-scored images
    mean_recall: the mean of the six numbers (the retrieval column of the report table).
Ties count against the query: a candidate scored equal to the best true match ranks above it, so a
degenerate model (all embeddings equal) scores 0, not 1. Images without a caption are skipped, with a warning.

Embeddings are computed in batches; under several ranks (torchrun) each rank embeds its own shards or
file entries, the embeddings are gathered and every rank computes the same metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Iterator

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


def read_captions_file(path: str | Path) -> list[tuple[Path, list[str]]]:
    """(image path, captions) per image of a TSV or JSON captions file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Captions file '{path}' does not exist.")
    entries: dict[str, list[str]] = {}
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        items = data.items() if isinstance(data, dict) else \
            ((d.get("image") or d.get("filepath") or d.get("file_name"), d.get("captions", d.get("caption"))) for d in data)
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
    return [(Path(image) if Path(image).is_absolute() else path.parent / image, caps) for image, caps in entries.items()]


def resolve_source(data: str | Path) -> tuple[str, list]:
    """("shards", urls) or ("file", entries) for --data; errors name what was expected where."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"Retrieval data '{data}' does not exist. Expected a directory of *.tar shards "
                                f"(image + txt/json captions), a captions file (.tsv/.json) or a directory holding "
                                f"{' or '.join(CAPTION_FILES)}.")
    if data.is_file():
        return "file", read_captions_file(data)
    urls = sorted(str(p) for p in data.glob("*.tar"))
    if urls:
        return "shards", urls
    for name in CAPTION_FILES:
        if (data / name).is_file():
            return "file", read_captions_file(data / name)
    raise FileNotFoundError(f"No retrieval data in '{data}': expected *.tar shards there, or "
                            f"{' or '.join(str(data / n) for n in CAPTION_FILES)}.")


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
            with Image.open(image) as im:
                yield self.transform(im.convert("RGB")), caps, str(image)

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
                    yield self.transform(decode_image(members[ext], ext, draft)), caps, f"{url}:{key}"
            finally:
                stream.close()


def _collate(items):
    images, caps, keys = zip(*items)
    return torch.stack(images), list(caps), list(keys)


def build_loader(data, transform: Callable, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 workers: int = 0) -> DataLoader:
    """Batches ``(images (B, 3, H, W), captions: list of B lists, keys)`` of this rank's part of ``data``."""
    kind, items = resolve_source(data)
    return DataLoader(_CaptionStream(kind, items, transform, rank, world_size), batch_size=batch_size,
                      num_workers=workers, collate_fn=_collate)


# ----------------------------------------------------------------------------- embeddings


@torch.no_grad()
def embed(model, tokenizer, loader, *, text_batch: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_emb (Ni, E), text_emb (Nt, E), text_to_image (Nt,)), normalised, float32 on CPU."""
    p = next(model.parameters())
    images, texts, owners = [], [], []
    for batch_images, captions, _ in loader:
        base = sum(len(x) for x in images)
        images.append(F.normalize(model.encode_image(batch_images.to(p.device, p.dtype)).float(), dim=-1).cpu())
        flat = [c for caps in captions for c in caps]
        owners += [base + i for i, caps in enumerate(captions) for _ in caps]
        for s in range(0, len(flat), text_batch):
            tokens = tokenizer(flat[s:s + text_batch]).to(p.device)
            texts.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    E = getattr(model, "embed_dim", 0)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, E)
    return cat(images), cat(texts), torch.tensor(owners, dtype=torch.long)


def gather_embeddings(image_emb, text_emb, text_to_image, group=None):
    """All ranks' embeddings concatenated in rank order, text owners offset to the global image index."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return image_emb, text_emb, text_to_image
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, (image_emb, text_emb, text_to_image), group=group)
    offset, owners = 0, []
    for img, _, own in parts:
        owners.append(own + offset)
        offset += len(img)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat(owners)


def evaluate_retrieval(model, tokenizer, data, *, image_size: int = 224, normalize="imagenet", batch_size: int = 64,
                       rank: int = 0, world_size: int = 1, group=None, workers: int = 0, ks=KS,
                       interpolation: str = "bicubic", crop_ratio: float = 224 / 256) -> dict:
    """Recall@k both ways on ``data`` (shard dir or captions file / dir); images through
    ``eval_transform(image_size, normalize, crop_ratio, interpolation)``."""
    from declip_ds.data.transforms import eval_transform

    transform = eval_transform(image_size, normalize=normalize, crop_ratio=crop_ratio, interpolation=interpolation)
    loader = build_loader(data, transform, batch_size, rank=rank, world_size=world_size, workers=workers)
    img, txt, owners = gather_embeddings(*embed(model, tokenizer, loader), group=group)
    if len(img) == 0:
        raise ValueError(f"No captioned image in '{data}'; nothing to evaluate.")
    return retrieval_metrics(img, txt, owners, ks=ks)


def main(argv=None) -> int:
    from declip_ds.models.pretrained import FORMATS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, step_XXXXXXXX dir or model.safetensors")
    p.add_argument("--data", required=True, help="shard dir, captions file (.tsv/.json) or dir holding one")
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

    from declip_ds.data.tokenizer import Tokenizer
    from declip_ds.eval.report import dataset_name, make_record, write_record
    from declip_ds.models.pretrained import load_for_eval

    try:
        resolve_source(args.data)
        em = load_for_eval(args.checkpoint, args.format, normalize=args.normalize,
                           interpolation=args.interpolation, crop_ratio=args.crop_ratio)
        em.warn_if_global_untrained("retrieval")
        model = em.model
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from declip_ds.train.dist import init_eval_ranks

    model, rank, world, group = init_eval_ranks(model)
    tok = Tokenizer(context_length=em.context_length, mask_token=em.mask_token)
    result = evaluate_retrieval(model, tok, args.data, image_size=em.image_size,
                                normalize=em.normalize, interpolation=em.interpolation, crop_ratio=em.crop_ratio,
                                batch_size=args.batch_size, rank=rank,
                                world_size=world, group=group, workers=args.workers)
    if rank == 0:
        name = args.name or dataset_name(args.data)
        cells = "  ".join(f"{k} {100 * v:.2f}" for k, v in result.items() if "@" in k)
        print(f"{name}: {cells}  mean {100 * result['mean_recall']:.2f}  "
              f"({result['n_images']} images, {result['n_texts']} captions)")
        if args.out:
            write_record(make_record(model=em.name, checkpoint=str(em.weights),
                                     dataset=str(args.data), task="retrieval", metrics={name: result},
                                     preprocess=em.preprocess(), config_hash=em.config_hash), args.out)
    if group is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
