"""Image transforms of the CLIP family, and the per-sample multi-view wrapper.

Every random choice goes through torch's global RNG (torchvision v1 transforms use
``torch.rand`` / ``torch.randint``), which the loader in ``wds.py`` seeds per
(seed, rank, worker, epoch); a view that draws from Python's ``random`` or numpy would
escape that seeding and break exact resume.

Recipes (see shared/METHODS.md):
    CLIP / SLIP base view   clip_train_transform: RRC(scale 0.5-1), no flip
    DeCLIP / SLIP SSL views moco_v2_transform:    RRC(0.2-1) + jitter + gray + blur + flip
    SLIP official SSL views simclr_transform:     the same with RRC(0.08-1)
    evaluation              eval_transform:       Resize(size / crop_ratio) + CenterCrop(size) + RGB

Each returned Compose carries ``draft_size``: the shortest source side the transform
needs at full detail. The loader decodes JPEGs at reduced resolution (``Image.draft``)
down to that size, which is much cheaper than a full decode followed by a downscale. The
training views do; ``eval_transform`` has none (a full decode, as the reference evaluates).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

NORMALIZE: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "openai": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}

_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


def _normalize(normalize) -> T.Normalize:
    """``"imagenet"`` / ``"openai"`` or an explicit ``(mean, std)`` pair."""
    if isinstance(normalize, str):
        if normalize not in NORMALIZE:
            raise ValueError(f"Unknown normalize {normalize!r}. Known: {', '.join(sorted(NORMALIZE))} "
                             "(or pass a (mean, std) pair).")
        mean, std = NORMALIZE[normalize]
    else:
        mean, std = normalize
    return T.Normalize(mean=mean, std=std)


def _interpolation(name: str) -> InterpolationMode:
    if name not in _INTERPOLATION:
        raise ValueError(f"Unknown interpolation {name!r}. Known: {', '.join(sorted(_INTERPOLATION))}.")
    return _INTERPOLATION[name]


def _with_draft(transform: T.Compose, draft_size: int | None) -> T.Compose:
    transform.draft_size = draft_size
    return transform


def _rrc_draft_size(image_size: int, min_scale: float, min_ratio: float = 3 / 4) -> int:
    # The smallest crop covers min_scale of the area at aspect ratio (width / height) down to min_ratio
    # (torchvision's default 3/4; the narrow side is sqrt(min_scale * min_ratio) of a square source's side): a
    # source whose short side is image_size / sqrt(min_scale * min_ratio) still gives that crop image_size
    # pixels on its narrow side, so no crop is upsampled from a drafted image.
    return math.ceil(image_size / math.sqrt(min_scale * min(min_ratio, 1 / min_ratio)))


def clip_train_transform(image_size: int, scale: Sequence[float] = (0.5, 1.0), normalize="imagenet",
                         interpolation: str = "bilinear") -> T.Compose:
    """The DeCLIP-repo CLIP/SLIP base view (``STANDARD_SLIP``): RandomResizedCrop, no flip.

    Bilinear by default: the reference builds ``RandomResizedCrop(224, scale=(0.5, 1.0))`` with
    torchvision's default interpolation (open_clip's training view is bicubic).

    PIL image -> (3, image_size, image_size) float32, normalised.
    """
    return _with_draft(T.Compose([
        T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=_interpolation(interpolation)),
        T.ToTensor(),
        _normalize(normalize),
    ]), _rrc_draft_size(image_size, scale[0]))


def moco_v2_transform(image_size: int, scale: Sequence[float] = (0.2, 1.0), normalize="imagenet",
                      interpolation: str = "bilinear") -> T.Compose:
    """MoCo-v2 view: RRC, ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2,
    Gaussian blur sigma in [0.1, 2] p=0.5, horizontal flip. PIL -> (3, S, S) float.

    Bilinear RRC by default, as in the MoCo / SimCLR code the DeCLIP and SLIP repos copy.
    The blur kernel is about 10% of the image side, odd, at least 3.
    """
    kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)
    return _with_draft(T.Compose([
        T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=_interpolation(interpolation)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        _normalize(normalize),
    ]), _rrc_draft_size(image_size, scale[0]))


def simclr_transform(image_size: int, scale: Sequence[float] = (0.08, 1.0), normalize="imagenet",
                     interpolation: str = "bilinear") -> T.Compose:
    """SLIP's official SSL views: the MoCo-v2 pipeline with RRC scale (0.08, 1)."""
    return moco_v2_transform(image_size, scale=scale, normalize=normalize, interpolation=interpolation)


class ToRGB:
    """PIL ``image.convert("RGB")``; other inputs (tensors, arrays) pass through, as open_clip's MaybeConvertMode."""

    def __call__(self, image):
        return image.convert("RGB") if isinstance(image, Image.Image) else image

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def eval_transform(image_size: int, normalize="imagenet", crop_ratio: float = 224 / 256,
                   interpolation: str = "bicubic") -> T.Compose:
    """Resize(round(image_size / crop_ratio)) + CenterCrop(image_size) + RGB. PIL (any mode) -> (3, S, S) float.

    The Resize scales the shortest side. OpenAI / open_clip: crop_ratio=1.0, bicubic, "openai" mean/std.
    The DeCLIP repo's zero-shot protocol: crop_ratio=224/256, bilinear (torchvision's default),
    "imagenet" mean/std. ``EvalModel.transform()`` picks the right one for a loaded checkpoint.

    The RGB conversion comes after the crop, where OpenAI's ``preprocess`` and open_clip's eval transform put it,
    so the transform replaces theirs for L / P / RGBA images too (a palette or an alpha channel resized before the
    conversion gives other pixels than after). Our loaders convert at load time, as CLIP_benchmark does; for
    their RGB images the conversion here changes nothing.
    """
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1] (0.875 = resize to 256 then crop 224; 1.0 = resize the "
                         f"short side to the crop size), got {crop_ratio}.")
    resize = round(image_size / crop_ratio)
    # No JPEG draft decode (draft_size None): the reference decodes in full before the Resize, and a DCT
    # downscale moves pixels (up to ~0.035 after normalisation), so shards and image folders would score
    # the same images differently. Evaluation decodes in full; training views keep the faster draft.
    return _with_draft(T.Compose([
        T.Resize(resize, interpolation=_interpolation(interpolation)),
        T.CenterCrop(image_size),
        ToRGB(),
        T.ToTensor(),
        _normalize(normalize),
    ]), None)


ImageView = Callable[[Image.Image], torch.Tensor]
TextView = Callable[[str], "torch.Tensor | dict[str, torch.Tensor]"]


class SampleTransform:
    """Turn one (image, caption) pair into the named views a method needs.

    image_views: name -> callable(PIL RGB image) -> Tensor, e.g.
        {"image": clip_train_transform(224)} for CLIP, or
        {"image1": moco_v2_transform(224), "image2": moco_v2_transform(224)} for DeCLIP.
    text_views: name -> callable(caption str) -> Tensor, or a dict of tensors that is merged
        into the output under its own keys (e.g. {"text_masked": ..., "mlm_labels": ...}).
        A tokenizer that works on lists returns (1, L): index it, ``lambda s: tok([s])[0]``.

    ``__call__(image, text) -> dict[str, Tensor]``; the loader stacks each key over the batch.
    Views are called in the order given, each drawing from torch's RNG, so two views of the
    same recipe differ. Views must not use Python's ``random`` or numpy's RNG (not seeded).
    """

    def __init__(self, image_views: Mapping[str, ImageView], text_views: Mapping[str, TextView] | None = None):
        if not image_views:
            raise ValueError("SampleTransform needs at least one image view.")
        self.image_views = dict(image_views)
        self.text_views = dict(text_views or {})
        clash = set(self.image_views) & set(self.text_views)
        if clash:
            raise ValueError(f"View names used for both an image and a text view: {sorted(clash)}.")

    @property
    def draft_size(self) -> int | None:
        """Largest ``draft_size`` of the image views; None (full decode) if any view lacks one."""
        sizes = [getattr(view, "draft_size", None) for view in self.image_views.values()]
        return None if any(s is None for s in sizes) else max(sizes)

    def __call__(self, image: Image.Image, text: str) -> dict[str, torch.Tensor]:
        out = {name: view(image) for name, view in self.image_views.items()}
        for name, view in self.text_views.items():
            result = view(text)
            if isinstance(result, Mapping):
                clash = set(result) & set(out)
                if clash:
                    raise ValueError(f"Text view {name!r} returned keys {sorted(clash)} that another view "
                                     "already produced; rename them.")
                out.update(result)
            else:
                out[name] = result
        return out

    def __repr__(self) -> str:
        return (f"SampleTransform(image_views={list(self.image_views)}, "
                f"text_views={list(self.text_views)})")
