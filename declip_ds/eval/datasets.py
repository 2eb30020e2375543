"""Labelled image datasets for evaluation, behind one function: ``open_dataset(root, transform)``.

Two layouts, told apart by what ``root`` holds:

    image folder   root/<class folder>/<image>         the ImageNet-val layout, one subfolder per class.
                   Class order and names: an optional class index in root,
                     classnames.txt   one line per class. "folder<TAB>name" lines give the order and
                                      names explicitly; plain lines name the folders in class order
                                      (line i = the i-th folder; see below; for 11 or more numbered
                                      folders, other than ImageNetV2's 1000, a warning says so)
                     classnames.json  {"folder": "name", ...} (file order = class order),
                                      {"0": ["folder", "name"], ...} (the imagenet_class_index.json
                                      layout, ordered by the integer key) or ["name", ...] (class order)
                   or ``class_index=PATH`` with one of these formats. Class order: folders named by
                   number in numeric order (ImageNetV2's 0, 1, 2, ..., 10: folder i is ImageNet class i),
                   others sorted as text (as torchvision's ImageFolder numbers them). Without an index the
                   folders are named after the folder with "_" read as a space, except ImageNet WordNet-id
                   folders (n01440764, ...), which get OpenAI's class names ('tench', ...); wnid-like
                   folders that are not ILSVRC-2012 classes give a warning. Hidden folders ('.x', '__x':
                   .ipynb_checkpoints, __MACOSX) and folders without images (lost+found) are not classes
                   and are named in a warning; hidden files and folders inside a class folder (macOS's
                   '._x.jpg') are not its images. A class folder the index lists must hold images.
    shards         root/*.tar + root/classnames.txt     webdataset shards, each sample an image and an
                   integer label member (``cls`` by default); line i of classnames.txt names label i.
                   Our synthetic eval splits (``data/shapes/eval/<task>``) are of this kind.

Every dataset iterates as ``(image_tensor, label)`` per sample (the transform applied) and gives
batches ``(images (B, 3, H, W), labels (B,), keys)`` from ``.loader(batch_size, rank=, world_size=)``,
the input ``zero_shot_evaluate`` and the linear probe take. Under several ranks every sample is seen
by exactly one rank.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from declip_ds.eval.templates import WNID, imagenet_wnid_classnames

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INDEX_FILES = ("classnames.txt", "classnames.json")
LAYOUTS = ("folder", "shards")

_EXPECTED = ("an image folder (one subfolder of images per class, ImageNet-val layout) or webdataset "
             "shards (*.tar with a label member, plus classnames.txt)")


def detect_layout(root: str | Path) -> str:
    """``"shards"`` (root holds *.tar) or ``"folder"`` (root holds subfolders with images)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"Dataset directory '{root}' does not exist. Expected there {_EXPECTED}.")
    if not root.is_dir():
        raise NotADirectoryError(f"Dataset path '{root}' is a file, not a directory. Expected a directory "
                                 f"holding {_EXPECTED}.")
    if any(root.glob("*.tar")):
        return "shards"
    if any(_images_in(d) for d in _subdirs(root)):
        return "folder"
    found = sorted(p.name for p in root.iterdir())[:8]
    raise FileNotFoundError(f"No evaluation data in '{root}': expected {_EXPECTED}; found {found or 'nothing'}.")


def is_image_folder(root: str | Path) -> bool:
    try:
        return detect_layout(root) == "folder"
    except (FileNotFoundError, NotADirectoryError):
        return False


def open_dataset(root: str | Path, transform: Callable | None = None, *, image_size: int = 224,
                 normalize="imagenet", label_key: str = "cls", class_index: str | Path | None = None,
                 interpolation: str = "bicubic", crop_ratio: float = 224 / 256):
    """The labelled dataset at ``root`` (an ``ImageFolderData`` or a ``ShardData``).

    ``transform``: PIL image -> tensor; by default ``eval_transform(image_size, normalize, crop_ratio,
    interpolation)`` (pass ``EvalModel.transform()`` for a loaded checkpoint's protocol).
    ``label_key``: the label member of shards. ``class_index``: a class index file for an image folder
    (default: classnames.txt / classnames.json in ``root`` when present).
    """
    if transform is None:
        from declip_ds.data.transforms import eval_transform

        transform = eval_transform(image_size, normalize=normalize, crop_ratio=crop_ratio, interpolation=interpolation)
    layout = detect_layout(root)
    if layout == "shards":
        if class_index is not None:
            raise ValueError("class_index applies to image folders; shards name their labels in "
                             f"{Path(root) / 'classnames.txt'}.")
        return ShardData(Path(root), transform, label_key=label_key)
    return ImageFolderData(Path(root), transform, class_index=class_index)


# ----------------------------------------------------------------------------- image folder


def _hidden(name: str) -> bool:
    """Not data: '.ipynb_checkpoints', '.DS_Store', macOS's '__MACOSX' folders and '._x.jpg' resource forks."""
    return name.startswith((".", "__"))


def _subdirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not _hidden(p.name)), key=lambda p: p.name)


def _images_in(folder: Path) -> list[Path]:
    """Image files of a class folder, recursively (some datasets nest them), in sorted order; hidden files and
    folders are left out ('._x.jpg' does not decode, '.ipynb_checkpoints' holds copies)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(_hidden(part) for part in p.relative_to(folder).parts))


def _numbered(folders: list[str]) -> bool:
    return bool(folders) and all(re.fullmatch(r"[0-9]+", f) for f in folders)


def class_order(folders: list[str]) -> list[str]:
    """Numbered folders in numeric order (as text, "10" would come before "2": ImageNetV2's folder i is ImageNet
    class i), others sorted as text (torchvision's ImageFolder order)."""
    return sorted(folders, key=int) if _numbered(folders) else sorted(folders)


def scan_class_folders(root: Path) -> tuple[list[str], dict[str, list[Path]], dict[str, str]]:
    """(class folders in class order, {folder: its images}, {folder that is no class: why}). A hidden folder or
    one without images is no class: as one, it would take a label (and a prompt) that no image has."""
    images, ignored = {}, {}
    for p in sorted(d for d in root.iterdir() if d.is_dir()):
        if _hidden(p.name):  # not scanned: .git or __MACOSX can be large
            ignored[p.name] = "hidden"
            continue
        images[p.name] = _images_in(p)
        if not images[p.name]:
            ignored[p.name] = "no images"
    return class_order([f for f in images if f not in ignored]), images, ignored


def read_class_index(path: str | Path, folders: list[str]) -> tuple[list[str], list[str]]:
    """(folders in class order, class names) from a class index file; see the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Class index '{path}' does not exist (expected a classnames.txt or a JSON "
                                "{folder: name} mapping).")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list):
            pairs = list(zip(folders, map(str, data))) if len(data) == len(folders) else None
        elif isinstance(data, dict) and data and all(isinstance(v, list) and len(v) == 2 for v in data.values()):
            pairs = [tuple(map(str, data[k])) for k in sorted(data, key=int)]  # {"0": [folder, name]}
        elif isinstance(data, dict):
            pairs = [(str(k), str(v)) for k, v in data.items()]
        else:
            raise ValueError(f"Class index '{path}': expected a JSON object {{folder: name}} or a list of names.")
    else:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if lines and all("\t" in line for line in lines):
            pairs = [tuple(s.strip() for s in line.split("\t", 1)) for line in lines]
        else:
            pairs = list(zip(folders, lines)) if len(lines) == len(folders) else None
        data = lines
    if pairs is not None and isinstance(data, list) and _numbered(folders) and 10 < len(folders) != 1000 \
            and sorted(folders) != folders:
        # numeric and text order differ from 11 folders on; 1000 numbered folders are ImageNetV2's classes
        warnings.warn(f"Class index '{path}' is a plain list for {len(folders)} numbered folders: line i names "
                      f"folder {folders[1]!r} ... in numeric order (folder i = class i). If the list follows "
                      f"torchvision's ImageFolder order ('0', '1', '10', '100', ...), write 'folder<TAB>name' lines "
                      f"instead.", stacklevel=3)
    if pairs is None:
        raise ValueError(f"Class index '{path}' lists {len(data)} names for {len(folders)} class folders; a plain "
                         "list must name every folder (in class order: numbered folders numerically, others "
                         "sorted), or give 'folder<TAB>name' lines / a JSON {folder: name} mapping.")
    return [f for f, _ in pairs], [n for _, n in pairs]


def folder_classnames(folders: list[str], root: Path) -> tuple[list[str], str]:
    """(class names, where from) for class folders without a class index: OpenAI's ImageNet names for
    ILSVRC-2012 wnid folders, else the folder names ("_" read as a space)."""
    plain = [f.replace("_", " ") for f in folders], "folder names"
    looks_like_wnids = [f for f in folders if WNID.fullmatch(f)]
    if not looks_like_wnids:
        return plain
    table = imagenet_wnid_classnames()
    unknown = [f for f in folders if f not in table]
    if not unknown:
        return [table[f] for f in folders], "ImageNet wnids (OpenAI's class names)"
    warnings.warn(
        f"The class folders of '{root}' look like WordNet ids ({looks_like_wnids[0]}, ...), but {len(unknown)} of "
        f"{len(folders)} are not ILSVRC-2012 classes ({unknown[:5]}), so they keep their folder names and the "
        f"prompts will read like 'a photo of a {looks_like_wnids[0]}.' (zero-shot accuracy near chance). Name the "
        f"classes with a classnames.txt ('wnid<TAB>name' lines) or classnames.json ({{wnid: name}}) in the folder, "
        f"or pass a class index.", stacklevel=3)
    return plain


def numbered_classes(folders: list[str], root: Path) -> tuple[list[str], list[str], str]:
    """(folders in class order, class names, where from) for class folders named by number: ImageNetV2's
    release layout (0 ... 999 = the ILSVRC-2012 class indices) gets OpenAI's ImageNet names in numeric order
    (sorted as text, "10" would come before "2"); any other numbering cannot be named."""
    from declip_ds.eval.templates import IMAGENET_CLASSNAMES

    ordered = class_order(folders)
    if [int(f) for f in ordered] == list(range(len(IMAGENET_CLASSNAMES))):
        return ordered, list(IMAGENET_CLASSNAMES), "ImageNet class indices (ImageNetV2 layout; OpenAI's class names)"
    raise ValueError(
        f"The class folders of '{root}' are numbers ({', '.join(ordered[:3])}, ...; {len(ordered)} of them) but not "
        f"ImageNet's 0 ... 999: the prompts would read 'a photo of a {ordered[0]}.'. Name the classes with a "
        f"classnames.txt ('folder<TAB>name' lines) or classnames.json ({{folder: name}}) in the folder, or pass a "
        f"class index.")


class UnreadableImage(ValueError):
    """An image file of an evaluation folder that PIL cannot decode."""


class ImageFolderData(Dataset):
    """``root/<class>/<image>``; ``self[i] -> (image_tensor, label)``. ``wnid_names=False``: name wnid
    folders after the folder, for a caller that names the classes itself."""

    layout = "folder"

    def __init__(self, root: Path, transform: Callable, class_index: str | Path | None = None, *,
                 wnid_names: bool = True):
        self.root, self.transform = Path(root), transform
        present, images, ignored = scan_class_folders(self.root)
        index = Path(class_index) if class_index is not None else \
            next((self.root / f for f in INDEX_FILES if (self.root / f).is_file()), None)
        if index is not None:
            self.folders, self.classnames = read_class_index(index, present)
            self._check_index(index, present)
            self.classnames_source = f"class index ({index})"
        elif wnid_names and _numbered(present):
            self.folders, self.classnames, self.classnames_source = numbered_classes(present, self.root)
        else:
            self.folders = present
            self.classnames, self.classnames_source = folder_classnames(present, self.root) if wnid_names else \
                ([f.replace("_", " ") for f in present], "folder names")
        self.class_index = index
        self.ignored_folders = {f: why for f, why in ignored.items() if f not in self.folders}
        if self.ignored_folders:
            shown = ", ".join(f"'{f}' ({why})" for f, why in list(self.ignored_folders.items())[:8])
            warnings.warn(f"'{self.root}': {len(self.ignored_folders)} subfolder(s) left out, not classes: {shown}. "
                          "Remove leftovers (lost+found, __MACOSX, ...); a class folder without images needs its "
                          "images, or the class set differs from the dataset's.", stacklevel=3)
        per_class = {f: images[f] if f in images else _images_in(self.root / f) for f in self.folders}
        empty = [f for f in self.folders if not per_class[f]]
        if empty:  # only a class index lists folders without images: torchvision's ImageFolder refuses them too
            raise FileNotFoundError(
                f"Class index '{index}' lists {len(empty)} class folder(s) of '{self.root}' without images "
                f"({', '.join(IMAGE_SUFFIXES)}): {[str(self.root / f) for f in empty[:5]]}. Put the class's images "
                "there (a class that no image has still takes part in every prediction), or drop it from the index.")
        self.samples = [(p, label) for label, f in enumerate(self.folders) for p in per_class[f]]
        if not self.samples:
            raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of '{self.root}'.")

    def _check_index(self, index: Path, present: list[str]) -> None:
        """The index's class folders must be the folders with images."""
        missing = [f for f in self.folders if not (self.root / f).is_dir()]
        extra = sorted(set(present) - set(self.folders))
        if missing or extra:
            raise FileNotFoundError(
                f"Class index '{index}' does not match the folders of '{self.root}': "
                + (f"expected class folders {[str(self.root / f) for f in missing[:5]]} (missing)" if missing else "")
                + ("; " if missing and extra else "")
                + (f"folders {extra[:5]} are not in the index" if extra else "") + ".")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable or truncated files
            raise UnreadableImage(f"Cannot read the image {path} ({type(e).__name__}: {e}). Replace or remove it: "
                                  f"the evaluation scores every image of {self.root}, as published numbers "
                                  f"assume.") from None
        return self.transform(image), label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        return (self[i] for i in range(len(self)))

    def key(self, i: int) -> str:
        return self.samples[i][0].relative_to(self.root).as_posix()

    def loader(self, batch_size: int, *, rank: int = 0, world_size: int = 1, workers: int = 0) -> DataLoader:
        """Batches ``(images, labels, keys)`` of the samples ``rank::world_size``, in order."""
        part = Subset(_Keyed(self), range(rank, len(self), world_size))
        return DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate)

    def fingerprint(self) -> str:
        """Changes when the files, their sizes or times, or the class order change."""
        h = hashlib.sha256(json.dumps([self.layout, str(self.root.resolve()), self.folders, self.classnames]).encode())
        for p, _ in self.samples:
            st = p.stat()
            h.update(f"{p.relative_to(self.root).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


class _Keyed(Dataset):
    def __init__(self, data: ImageFolderData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        image, label = self.data[i]
        return image, label, self.data.key(i)


def _collate(items):
    images, labels, keys = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), list(keys)


# ----------------------------------------------------------------------------- shards


class ShardData:
    """``root/*.tar`` + ``root/classnames.txt``, read with ``build_eval_loader``."""

    layout = "shards"

    def __init__(self, root: Path, transform: Callable, label_key: str = "cls"):
        self.root, self.transform, self.label_key = Path(root), transform, label_key
        names = self.root / "classnames.txt"
        if not names.is_file():
            raise FileNotFoundError(f"'{names}' not found: webdataset evaluation shards need a class-name file "
                                    "next to the *.tar shards (one name per line, line i names label i).")
        self.classnames = [line.strip() for line in names.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.urls = sorted(str(p) for p in self.root.glob("*.tar"))

    def loader(self, batch_size: int, *, rank: int = 0, world_size: int = 1, workers: int = 0):
        """Batches ``(images, labels, keys)``; shards split by rank (then by worker)."""
        from declip_ds.data.wds import build_eval_loader

        return build_eval_loader(self.urls, self.transform, batch_size, rank=rank, world_size=world_size,
                                 label_key=self.label_key, workers=workers)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for images, labels, _ in self.loader(64):
            yield from zip(images, labels.tolist())

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.layout, str(self.root.resolve()), self.label_key, self.classnames]).encode())
        for url in self.urls:
            st = Path(url).stat()
            h.update(f"{Path(url).name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]
