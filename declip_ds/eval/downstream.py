"""Downstream transfer datasets by name: the DeCLIP paper's 11 transfer datasets, ImageNet and others
torchvision reads, each with its protocol splits, class names, prompt templates and reported metric.

    from declip_ds.eval.downstream import get_spec, open_split, SUITES
    data = open_split("flowers", "test", DIR, transform)   # .classnames, .loader(batch_size), .fingerprint()

Where the files are
-------------------
``DIR`` (``--data-root``) is one folder shared by all datasets, the ``root`` torchvision's dataset
classes take: each dataset keeps its files in its own subfolder of it (``DIR/cifar-10-batches-py``,
``DIR/flowers-102``, ``DIR/dtd/dtd``, ... as listed per dataset in ``REGISTRY`` and in the error a
missing dataset gives). Nothing is downloaded unless ``download=True`` (``--download``); torchvision then
fetches the dataset into that same layout. ImageNet and Stanford Cars can't be downloaded this way:
ImageNet is read as image folders ``DIR/imagenet/val/<wnid>/*.JPEG`` (and ``DIR/imagenet/train`` for the
linear probe) by ``declip_ds.eval.datasets`` -- exactly what ``torchvision.datasets.ImageNet(DIR/imagenet)``
leaves after it sorts the official tarballs.

Webdataset copies (for clusters without the raw files; ``python -m declip_ds.eval.make_shards`` writes them
from the raw files): ``DIR/<name>_wds/<split>/*.tar`` (or CLIP_benchmark's
``DIR/wds_<name>/<split>/*.tar``, and its VTAB copies ``DIR/wds_vtab-<name>/test/*.tar`` for the
``VTAB_COPIES``), each sample an image (jpg/png/webp) and an integer label member
(``cls`` unless ``label_key`` says otherwise), labels numbered as torchvision numbers them. A
``classnames.txt`` in the split folder or above it, if present, names the labels (one per line); it
must match the registry's class names (compared case- and punctuation-insensitively; the registry's
names in another order are prompted in the copy's order), otherwise its own names are used and the
result says so. The raw files are preferred when both exist. A copy's images are counted as they are
scored: a test split of another size than the release's (``n_images``, e.g. a partly downloaded copy)
is warned about, and a CLIP_benchmark copy with fewer shards than its ``nshards.txt`` when opened.

Splits (the standard protocols; ``test`` is what zero-shot evaluates; the linear probe fits on ``train``
and sweeps its weight decay on ``val`` where the dataset has an official one, else on a held-out
fraction of ``train``):

    official train/test          CIFAR-10/100, Food-101, Stanford Cars, MNIST, Fashion-MNIST, STL-10,
                                 SVHN, GTSRB, FER2013; Oxford Pets (train = its "trainval" split);
                                 ImageNet (train folder / val folder)
    official train/val/test      Flowers-102, DTD (partition 1), FGVC-Aircraft (variants),
                                 Country211, Rendered SST2, PCam
    seeded per-class split       torchvision defines no split, so (like CLIP_benchmark's VTAB variants)
                                 each class's images, in sorted order, are permuted with a
                                 torch.Generator seeded with ``seed`` (0 by default) and cut:
                                 Caltech-101  30 train images per class (the CLIP/VTAB protocol,
                                              background class kept: 102 classes), the rest test
                                 SUN397       50 train + 50 test per class (the size of the official
                                              partitions); if DIR/SUN397/Training_01.txt and
                                              Testing_01.txt (Partitions.zip) are there, that
                                              official partition 1 is used instead
                                 EuroSAT      60 % train, 20 % val, 20 % test per class (VTAB's sizes)

Metric (what the literature reports and the table shows): top-1 accuracy, except mean per-class
accuracy (``mean_per_class_recall``) for Oxford Pets, Flowers-102, Caltech-101 and FGVC-Aircraft.

Class names and templates: per-dataset prompt templates and cleaned class names from
``downstream_prompts.json`` (copied from CLIP_benchmark and openai/CLIP's prompts.md, both MIT: see
DOWNSTREAM_PROMPTS_LICENSE.txt), each entry naming its sources: mostly the CLIP paper's, not all (PCam's
two templates are CLIP_benchmark's, where prompts.md has one; Fashion-MNIST's are ours) and, for
ImageNet, OpenAI's in ``templates.py``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from declip_ds.eval.retrieval import RETRIEVAL_REGISTRY
from declip_ds.eval.templates import imagenet_subset_wnids, imagenet_wnid_classnames

PROMPTS_FILE = Path(__file__).with_name("downstream_prompts.json")
SPLITS = ("train", "val", "test")
METRICS = ("acc1", "mean_per_class_recall")


class DatasetUnavailable(FileNotFoundError):
    """A dataset (or one of its splits) is not under the data root; the message says what to put where."""


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class SeededSplit:
    """Per-class split sizes: an int is a number of images, a float a fraction of the class;
    ``test=None`` means every image not in train or val."""

    train: int | float
    val: int | float = 0
    test: int | float | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """One downstream dataset: how torchvision builds each protocol split, which files it needs, how to
    get them, and the metric the literature reports. Class names and templates come from the JSON."""

    name: str
    title: str
    build: Callable | None  # (root, torchvision split or None, download) -> torchvision dataset
    splits: dict            # protocol split -> torchvision split (None: the whole dataset, cut by ``seeded``)
    files: dict             # protocol split or "*" -> paths under the root that must exist (a tuple: any of them)
    get: str                # how to obtain the files, for the error message
    metric: str = "acc1"
    seeded: SeededSplit | None = None
    partition: dict = field(default_factory=dict)  # optional official split files (SUN397)
    subdir: str = ""        # torchvision's root is DIR/subdir
    downloadable: bool = True
    check_names: bool = True  # compare our class names with the dataset's own (catches a label-order mismatch)
    requires: tuple = ()    # Python packages torchvision needs for it
    aliases: tuple = ()
    # "1k" / "a" / "r": image folders of ImageNet classes (all 1000, or ImageNet-A's / -R's 200), read by
    # _imagenet_split and named with OpenAI's ImageNet class names and templates
    imagenet_classes: str = ""
    n_images: int = 0       # the release's test images, where known: another count is warned about (count_warning)

    def __post_init__(self):
        if self.metric not in METRICS or "test" not in self.splits or not set(self.splits) <= set(SPLITS):
            raise ValueError(f"Dataset spec '{self.name}': metric must be one of {METRICS} (got '{self.metric}') and "
                             f"splits a subset of {SPLITS} with 'test' (got {list(self.splits)}).")

    @property
    def classnames(self) -> list[str]:
        if self.imagenet_classes == "1k":
            from declip_ds.eval.templates import IMAGENET_CLASSNAMES

            return list(IMAGENET_CLASSNAMES)
        if self.imagenet_classes:
            table = imagenet_wnid_classnames()
            return [table[w] for w in self.wnids]
        return list(_prompts()[self.name]["classnames"])

    @property
    def wnids(self) -> list[str]:
        """The class folders, in label order, of an ImageNet-family dataset."""
        if self.imagenet_classes == "1k":
            return sorted(imagenet_wnid_classnames())
        return list(imagenet_subset_wnids(self.imagenet_classes))

    @property
    def templates(self) -> list[str]:
        if self.imagenet_classes:
            from declip_ds.eval.templates import IMAGENET_TEMPLATES

            return list(IMAGENET_TEMPLATES)
        return list(_prompts()[self.name]["templates"])

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def expected(self, split: str) -> list:
        return [*self.files.get("*", ()), *self.files.get(split, ())]


@functools.lru_cache(maxsize=1)
def _prompts() -> dict:
    if not PROMPTS_FILE.is_file():
        raise FileNotFoundError(f"'{PROMPTS_FILE}' (the downstream class names and templates) is missing from this "
                                "installation of declip_ds; reinstall it (pip install -e .), with the file listed in "
                                "setup.py's package_data.")
    return json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))["datasets"]


def _tv(cls: str, split_arg: str | None = "split", download_arg: bool = True, **fixed) -> Callable:
    """Builder calling ``torchvision.datasets.<cls>(root, ..., **fixed)``; ``split_arg="train"`` for the
    classes that take ``train=True/False`` (CIFAR, MNIST), None for those without splits."""

    def build(root, tv_split, download):
        import torchvision.datasets as D

        kw = dict(fixed)
        if split_arg == "train":
            kw["train"] = tv_split == "train"
        elif split_arg is not None:
            kw["split"] = tv_split
        if download_arg:
            kw["download"] = download
        return getattr(D, cls)(str(root), **kw)

    build.tv_class = cls
    return build


def _caltech101(root, tv_split, download):
    """torchvision's Caltech101 with the BACKGROUND_Google class kept, as CLIP and VTAB evaluate it
    (102 classes, sorted folder order: BACKGROUND_Google, Faces, Faces_easy, Leopards, ...)."""
    import torchvision.datasets as D

    ds = D.Caltech101(str(root), target_type="category", download=download)
    top = Path(ds.root) / "101_ObjectCategories"
    ds.categories = sorted(p.name for p in top.iterdir() if p.is_dir())
    ds.index, ds.y = [], []
    for i, c in enumerate(ds.categories):
        n = len(os.listdir(top / c))  # torchvision's convention: image_0001.jpg ... image_{n:04d}.jpg
        ds.index.extend(range(1, n + 1))
        ds.y.extend([i] * n)
    return ds


_caltech101.tv_class = "Caltech101"


def _imagenet_files() -> dict:
    return {"train": ("imagenet/train",), "test": ("imagenet/val",)}


def _mnist_files(folder: str) -> dict:
    raw = f"{folder}/raw"
    return {"train": (f"{raw}/train-images-idx3-ubyte", f"{raw}/train-labels-idx1-ubyte"),
            "test": (f"{raw}/t10k-images-idx3-ubyte", f"{raw}/t10k-labels-idx1-ubyte")}


_CIFAR10 = "cifar-10-batches-py"
_AIR = "fgvc-aircraft-2013b/data"
_MPC = "mean_per_class_recall"
_TTS = {"train": "train", "test": "test"}
_TVT = {"train": "train", "val": "val", "test": "test"}
_WHOLE = {"train": None, "test": None}

REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("cifar10", "CIFAR-10", _tv("CIFAR10", "train"), _TTS,
                {"*": (f"{_CIFAR10}/batches.meta",), "train": tuple(f"{_CIFAR10}/data_batch_{i}" for i in range(1, 6)),
                 "test": (f"{_CIFAR10}/test_batch",)},
                "--download, or extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into DIR",
                n_images=10_000),
    DatasetSpec("cifar100", "CIFAR-100", _tv("CIFAR100", "train"), _TTS,
                {"*": ("cifar-100-python/meta",), "train": ("cifar-100-python/train",), "test": ("cifar-100-python/test",)},
                "--download, or extract https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into DIR",
                n_images=10_000),
    DatasetSpec("food101", "Food-101", _tv("Food101"), _TTS,
                {"*": ("food-101/images",), "train": ("food-101/meta/train.json",), "test": ("food-101/meta/test.json",)},
                "--download, or extract http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz into DIR", n_images=25_250),
    DatasetSpec("pets", "Oxford-IIIT Pets", _tv("OxfordIIITPet", target_types="category"),
                {"train": "trainval", "test": "test"},
                {"*": ("oxford-iiit-pet/images",), "train": ("oxford-iiit-pet/annotations/trainval.txt",),
                 "test": ("oxford-iiit-pet/annotations/test.txt",)},
                "--download, or extract images.tar.gz and annotations.tar.gz from "
                "https://www.robots.ox.ac.uk/~vgg/data/pets/ into DIR/oxford-iiit-pet",
                metric=_MPC, aliases=("oxford_pets", "oxford_iiit_pet"), n_images=3_669),
    DatasetSpec("flowers", "Flowers-102", _tv("Flowers102"), _TVT,
                {"*": ("flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat")},
                "--download, or put 102flowers.tgz (extracted), imagelabels.mat and setid.mat from "
                "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ into DIR/flowers-102",
                metric=_MPC, requires=("scipy",), aliases=("flowers102", "oxford_flowers102"), n_images=6_149),
    DatasetSpec("sun397", "SUN397", _tv("SUN397", None), _WHOLE, {"*": ("SUN397/ClassName.txt",)},
                "--download, or extract http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz into DIR "
                "(optionally Partitions.zip's Training_01.txt and Testing_01.txt into DIR/SUN397 for the "
                "official partition 1)",
                seeded=SeededSplit(train=50, test=50),
                partition={"train": "SUN397/Training_01.txt", "test": "SUN397/Testing_01.txt"}),
    DatasetSpec("cars", "Stanford Cars", _tv("StanfordCars"), _TTS,
                {"*": ("stanford_cars/devkit/cars_meta.mat",),
                 "train": ("stanford_cars/devkit/cars_train_annos.mat", "stanford_cars/cars_train"),
                 "test": ("stanford_cars/cars_test_annos_withlabels.mat", "stanford_cars/cars_test")},
                "torchvision can no longer download it (the original URL is gone): get cars_train/, cars_test/, "
                "devkit/ and cars_test_annos_withlabels.mat from a mirror of the Stanford release and place them "
                "in DIR/stanford_cars",
                downloadable=False, requires=("scipy",), aliases=("stanford_cars",), n_images=8_041),
    DatasetSpec("dtd", "DTD", _tv("DTD", partition=1), _TVT,
                {"*": ("dtd/dtd/images",), "train": ("dtd/dtd/labels/train1.txt",), "val": ("dtd/dtd/labels/val1.txt",),
                 "test": ("dtd/dtd/labels/test1.txt",)},
                "--download, or extract https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz "
                "into DIR/dtd", n_images=1_880),
    DatasetSpec("caltech101", "Caltech-101", _caltech101, _WHOLE, {"*": ("caltech101/101_ObjectCategories",)},
                "--download (needs the gdown package), or extract 101_ObjectCategories.tar.gz from "
                "https://data.caltech.edu/records/20086 into DIR/caltech101",
                metric=_MPC, seeded=SeededSplit(train=30), check_names=False),
    DatasetSpec("aircraft", "FGVC-Aircraft", _tv("FGVCAircraft", annotation_level="variant"), _TVT,
                {"*": (f"{_AIR}/variants.txt", f"{_AIR}/images"), "train": (f"{_AIR}/images_variant_train.txt",),
                 "val": (f"{_AIR}/images_variant_val.txt",), "test": (f"{_AIR}/images_variant_test.txt",)},
                "--download, or extract https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/"
                "fgvc-aircraft-2013b.tar.gz into DIR",
                metric=_MPC, aliases=("fgvc_aircraft",), n_images=3_333),
    DatasetSpec("imagenet", "ImageNet", None, {"train": "train", "test": "val"}, _imagenet_files(),
                "ImageNet can't be downloaded automatically: get ILSVRC2012 from https://image-net.org and sort "
                "the validation images into one folder per wnid (torchvision.datasets.ImageNet('DIR/imagenet', "
                "split='val') does it from ILSVRC2012_img_val.tar + ILSVRC2012_devkit_t12.tar.gz)",
                downloadable=False, aliases=("imagenet1k", "imagenet-1k"), imagenet_classes="1k", n_images=50_000),
    # natural distribution shifts of ImageNet (the CLIP paper's robustness table): test sets only, zero-shot
    DatasetSpec("imagenet_v2", "ImageNet-V2", None, {"test": "test"},
                {"test": ("imagenetv2-matched-frequency-format-val",)},
                "download https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
                "imagenetv2-matched-frequency.tar.gz and extract it into DIR (class folders 0 ... 999)",
                downloadable=False, aliases=("imagenetv2", "imagenet-v2"), imagenet_classes="1k", n_images=10_000),
    # ImageNet-V2's two other sampling strategies; the DeCLIP repo's 88M configs report top-images
    DatasetSpec("imagenet_v2_top", "ImageNet-V2 top-images", None, {"test": "test"},
                {"test": ("imagenetv2-top-images-format-val",)},
                "download https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
                "imagenetv2-top-images.tar.gz and extract it into DIR (class folders 0 ... 999)",
                downloadable=False, imagenet_classes="1k", n_images=10_000),
    DatasetSpec("imagenet_v2_threshold", "ImageNet-V2 threshold-0.7", None, {"test": "test"},
                {"test": ("imagenetv2-threshold0.7-format-val",)},
                "download https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
                "imagenetv2-threshold0.7.tar.gz and extract it into DIR (class folders 0 ... 999)",
                downloadable=False, imagenet_classes="1k", n_images=10_000),
    DatasetSpec("imagenet_sketch", "ImageNet-Sketch", None, {"test": "test"},
                {"test": (("sketch", "imagenet-sketch/sketch"),)},
                "get ImageNet-Sketch.zip from https://github.com/HaohanWang/ImageNet-Sketch and extract it into "
                "DIR (it unpacks to sketch/<wnid>/)",
                downloadable=False, aliases=("imagenet-sketch",), imagenet_classes="1k", n_images=50_889),
    DatasetSpec("imagenet_a", "ImageNet-A", None, {"test": "test"}, {"test": ("imagenet-a",)},
                "extract https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar into DIR",
                downloadable=False, aliases=("imagenet-a",), imagenet_classes="a", n_images=7_500),
    DatasetSpec("imagenet_r", "ImageNet-R", None, {"test": "test"}, {"test": ("imagenet-r",)},
                "extract https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar into DIR",
                downloadable=False, aliases=("imagenet-r",), imagenet_classes="r", n_images=30_000),
    DatasetSpec("mnist", "MNIST", _tv("MNIST", "train"), _TTS, _mnist_files("MNIST"),
                "--download (torchvision fetches the four IDX files into DIR/MNIST/raw)", check_names=False,
                n_images=10_000),
    DatasetSpec("fashion_mnist", "Fashion-MNIST", _tv("FashionMNIST", "train"), _TTS, _mnist_files("FashionMNIST"),
                "--download (torchvision fetches the four IDX files into DIR/FashionMNIST/raw)",
                check_names=False, aliases=("fashionmnist", "fashion-mnist"), n_images=10_000),
    DatasetSpec("stl10", "STL-10", _tv("STL10"), _TTS,
                {"*": ("stl10_binary/class_names.txt",), "train": ("stl10_binary/train_X.bin", "stl10_binary/train_y.bin"),
                 "test": ("stl10_binary/test_X.bin", "stl10_binary/test_y.bin")},
                "--download, or extract http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz into DIR",
                n_images=8_000),
    DatasetSpec("svhn", "SVHN", _tv("SVHN"), _TTS, {"train": ("svhn/train_32x32.mat",), "test": ("svhn/test_32x32.mat",)},
                "--download, or put train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ "
                "into DIR/svhn", subdir="svhn", requires=("scipy",), n_images=26_032),
    DatasetSpec("gtsrb", "GTSRB", _tv("GTSRB"), _TTS,
                {"train": ("gtsrb/GTSRB/Training",), "test": ("gtsrb/GTSRB/Final_Test/Images", "gtsrb/GT-final_test.csv")},
                "--download (torchvision fetches the GTSRB archives into DIR/gtsrb)", n_images=12_630),
    DatasetSpec("eurosat", "EuroSAT", _tv("EuroSAT", None), {"train": None, "val": None, "test": None},
                {"*": ("eurosat/2750",)}, "--download, or extract EuroSAT.zip (RGB) into DIR/eurosat",
                seeded=SeededSplit(train=0.6, val=0.2), check_names=False),
    DatasetSpec("country211", "Country211", _tv("Country211"), {"train": "train", "val": "valid", "test": "test"},
                {"train": ("country211/train",), "val": ("country211/valid",), "test": ("country211/test",)},
                "--download, or extract https://openaipublic.azureedge.net/clip/data/country211.tgz into DIR",
                check_names=False, n_images=21_100),
    DatasetSpec("rendered_sst2", "Rendered SST2", _tv("RenderedSST2"), _TVT,
                {"train": ("rendered-sst2/train",), "val": ("rendered-sst2/valid",), "test": ("rendered-sst2/test",)},
                "--download, or extract https://openaipublic.azureedge.net/clip/data/rendered-sst2.tgz into DIR",
                aliases=("renderedsst2",), n_images=1_821),
    DatasetSpec("fer2013", "FER2013", _tv("FER2013", download_arg=False), _TTS,
                {"*": (("fer2013/fer2013.csv", "fer2013/icml_face_data.csv"),)},
                "torchvision can't download it: put fer2013.csv (or icml_face_data.csv, which label the test "
                "images) from https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-"
                "recognition-challenge into DIR/fer2013", downloadable=False, check_names=False),
    DatasetSpec("pcam", "PatchCamelyon", _tv("PCAM"), _TVT,
                {s: tuple(f"pcam/camelyonpatch_level_2_split_{f}_{xy}.h5" for xy in "xy")
                 for s, f in (("train", "train"), ("val", "valid"), ("test", "test"))},
                "--download (needs gdown), or put the six camelyonpatch_level_2_split_*.h5 files from "
                "https://github.com/basveeling/pcam into DIR/pcam", requires=("h5py",), check_names=False,
                n_images=32_768),
]}

DECLIP11 = ("cifar10", "cifar100", "food101", "pets", "flowers", "sun397", "cars", "dtd", "caltech101", "aircraft",
            "imagenet")
# image-text retrieval benchmarks (declip_ds.eval.retrieval.RETRIEVAL_REGISTRY): the suite's retrieval task
RETRIEVAL = tuple(RETRIEVAL_REGISTRY)
SUITES: dict[str, tuple[str, ...]] = {
    "declip11": DECLIP11,  # the DeCLIP paper's transfer table (11 datasets incl. ImageNet)
    "quick": ("cifar10", "cifar100", "mnist", "fashion_mnist"),  # small, all downloadable by torchvision
    # ImageNet and its natural distribution shifts (zero-shot; the CLIP paper's robustness table without
    # ObjectNet and the video sets)
    "robustness": ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"),
    # what the DeCLIP repo's 88M configs report besides ImageNet (less ObjectNet, not supported yet)
    "declip_robustness": ("imagenet", "imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2_top"),
    "retrieval": RETRIEVAL,  # Flickr30k 1k / MSCOCO 5k test (Karpathy splits): the CLIP and FILIP tables
    "all": (*REGISTRY, *RETRIEVAL),
}


def get_spec(name: str) -> DatasetSpec:
    key = name.strip().lower()
    for spec in REGISTRY.values():
        if key == spec.name or key in spec.aliases:
            return spec
    raise ValueError(f"Unknown dataset '{name}'. Known: {', '.join(REGISTRY)}"
                     + (f"; retrieval: {', '.join(RETRIEVAL)}" if key not in RETRIEVAL else
                        f"; '{key}' is a retrieval dataset (the suite's --task retrieval)") + ".")


def is_retrieval(name: str) -> bool:
    return name.strip().lower() in RETRIEVAL


def suite_datasets(suite: str) -> list[str]:
    """The dataset names of a suite, or of a comma-separated list of dataset names (classification datasets
    of REGISTRY and retrieval datasets of RETRIEVAL alike)."""
    if suite in SUITES:
        return list(SUITES[suite])
    try:
        return [n.strip().lower() if is_retrieval(n) else get_spec(n).name for n in suite.split(",") if n.strip()]
    except ValueError:
        raise ValueError(f"Unknown suite '{suite}'. Known suites: {', '.join(SUITES)}; or dataset names separated "
                         f"by commas (known: {', '.join((*REGISTRY, *RETRIEVAL))}).") from None


# ----------------------------------------------------------------------------- seeded per-class splits


def per_class_split(labels: list[int], sizes: SeededSplit, seed: int = 0,
                    order: list[int] | None = None) -> dict[str, list[int]]:
    """Indices of train / val / test: per class (in label order), the class's indices (in ``order``,
    default index order) permuted by a torch.Generator seeded with ``seed``, then cut by ``sizes``."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in (order if order is not None else range(len(labels))):
        by_class[int(labels[i])].append(i)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in sorted(by_class):
        idx = [by_class[c][j] for j in torch.randperm(len(by_class[c]), generator=g).tolist()]
        n = len(idx)
        k_train = _count(sizes.train, n)
        k_val = min(_count(sizes.val, n), n - k_train)
        rest = idx[k_train + k_val:]
        out["train"] += idx[:k_train]
        out["val"] += idx[k_train:k_train + k_val]
        out["test"] += rest if sizes.test is None else rest[:_count(sizes.test, n)]
    return {s: sorted(v) for s, v in out.items()}


def _count(size: int | float, n: int) -> int:
    return min(n, int(round(size * n)) if isinstance(size, float) else int(size))


def _labels_of(ds) -> list[int]:
    """Labels of a torchvision dataset without decoding its images where it keeps them in an attribute."""
    for attr in ("targets", "_labels", "labels", "y"):
        if hasattr(ds, attr) and getattr(ds, attr) is not None:
            return [int(v) for v in getattr(ds, attr)]
    for attr in ("_samples", "samples"):
        if hasattr(ds, attr):
            return [int(s[1]) for s in getattr(ds, attr)]
    return [int(ds[i][1]) for i in range(len(ds))]


def _stable_order(ds) -> list[int] | None:
    """Index order that doesn't depend on the file system's listing order (SUN397 finds files by rglob)."""
    files = getattr(ds, "_image_files", None)
    if files is None:
        return None
    return sorted(range(len(files)), key=lambda i: str(files[i]))


def _partition_indices(spec: DatasetSpec, ds, root: Path, split: str) -> list[int] | None:
    """Indices of an official partition file (SUN397's Training_01.txt / Testing_01.txt) when present."""
    paths = {s: root / p for s, p in spec.partition.items()}
    if not paths or not all(p.is_file() for p in paths.values()) or split not in paths:
        return None
    wanted = {line.strip() for line in paths[split].read_text().splitlines() if line.strip()}
    base = Path(ds._data_dir)
    return [i for i, f in enumerate(ds._image_files) if "/" + Path(f).relative_to(base).as_posix() in wanted]


# ----------------------------------------------------------------------------- class names


def _norm(name: str) -> str:
    return " ".join(re.sub(r"[_/\-]", " ", str(name)).lower().split())


def _dataset_classes(ds) -> list[str] | None:
    classes = getattr(ds, "classes", getattr(ds, "categories", None))  # Caltech-101 calls them categories
    return [str(c) for c in classes] if classes is not None else None


def resolve_classnames(spec: DatasetSpec, found: list[str] | None, where: str) -> tuple[list[str], str]:
    """(class names to prompt with, where they come from). ``found``: the dataset's own names, if any.

    The registry's names are CLIP's cleaned versions of the dataset's, so a few differ by design
    (Flowers' 'ball moss' is CLIP's 'air plant'); more than 10 % differing means another label order,
    and then the dataset's own names are used so that labels and prompts stay aligned."""
    names = spec.classnames
    if found is None:
        return names, "registry"
    if len(found) != len(names):
        raise ValueError(f"{spec.title} at '{where}' has {len(found)} classes; the standard release has "
                         f"{len(names)}. Check that the files are the standard release (python -m "
                         "declip_ds.eval.suite --list shows the expected layout).")
    differ = [i for i, (a, b) in enumerate(zip(found, names)) if _norm(a) != _norm(b)]
    ours = {_norm(n): n for n in names}
    if differ and len(ours) == len(names) and sorted(map(_norm, found)) == sorted(ours):
        # the registry's classes in another label order (CLIP_benchmark's FER2013 copy is an ImageFolder:
        # alphabetical, where torchvision's CSV order puts 'neutral' last): prompt in the dataset's order
        warnings.warn(f"{spec.title} at '{where}': its class names are the registry's in another order (label "
                      f"{differ[0]} is '{found[differ[0]]}', the registry's class {differ[0]} is '{names[differ[0]]}'); "
                      "prompting in the dataset's label order.")
        return [ours[_norm(n)] for n in found], f"registry, in the order of the dataset ({where})"
    if not spec.check_names or len(differ) <= len(names) // 10:
        return names, "registry"
    i = differ[0]
    warnings.warn(f"{spec.title} at '{where}': {len(differ)} of {len(names)} class names differ from the registry's "
                  f"(class {i} is '{found[i]}', the registry says '{names[i]}'); prompting with the dataset's own "
                  "class names to keep labels aligned.")
    return [str(n).replace("_", " ").replace("/", " ") for n in found], f"dataset ({where})"


# ----------------------------------------------------------------------------- splits as evaluation datasets


class _RGB:
    """PIL image -> RGB -> the eval transform (torchvision gives grayscale for MNIST, some Caltech images...)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image.convert("RGB"))

    def __repr__(self) -> str:
        return f"RGB({self.transform!r})"


class TorchvisionSplit(Dataset):
    """One protocol split of a torchvision dataset: ``self[i] -> (image_tensor, label)``, and the
    ``loader`` / ``fingerprint`` interface of ``declip_ds.eval.datasets`` (so the linear probe caches it)."""

    layout = "torchvision"

    def __init__(self, spec: DatasetSpec, split: str, dataset, indices: list[int] | None, classnames: list[str],
                 transform: Callable, root: Path, classnames_source: str = "registry"):
        self.spec, self.split, self.dataset, self.root = spec, split, dataset, Path(root)
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self.classnames, self.classnames_source = classnames, classnames_source
        self.transform = transform
        self._rgb = _RGB(transform)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[self.indices[i]]
        return self._rgb(image), int(label)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        return (self[i] for i in range(len(self)))

    def loader(self, batch_size: int, *, rank: int = 0, world_size: int = 1, workers: int = 0) -> DataLoader:
        """Batches ``(images, labels, keys)`` of the samples ``rank::world_size``, in order."""
        return DataLoader(_KeyedSplit(self, range(rank, len(self), world_size)), batch_size=batch_size,
                          shuffle=False, num_workers=workers, collate_fn=_collate)

    def fingerprint(self) -> str:
        """Changes with the dataset's files (sizes, times), the split's indices and the class names."""
        h = hashlib.sha256(json.dumps([self.layout, self.spec.name, self.split, str(self.root.resolve()),
                                       self.classnames]).encode())
        h.update(hashlib.sha256(str(self.indices).encode()).digest())
        for entry in self.spec.expected(self.split):
            for rel in (entry if isinstance(entry, tuple) else (entry,)):
                p = self.root / rel
                if p.exists():
                    st = p.stat()
                    h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


class _KeyedSplit(Dataset):
    def __init__(self, data: TorchvisionSplit, positions):
        self.data, self.positions = data, list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: int):
        i = self.positions[j]
        image, label = self.data[i]
        return image, label, f"{self.data.split}/{self.data.indices[i]}"


def _collate(items):
    images, labels, keys = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), list(keys)


def _shard_split(spec: DatasetSpec, folder: Path, transform: Callable, label_key: str):
    """A webdataset copy's split folder as a ``declip_ds.eval.datasets.ShardData``."""
    from declip_ds.eval.datasets import ShardData

    data = ShardData.__new__(ShardData)
    data.root, data.transform, data.label_key = folder, transform, label_key
    data.urls = sorted(str(p) for p in folder.glob("*.tar"))
    _check_shard_count(spec, folder, len(data.urls))
    index = next((p for p in (folder / "classnames.txt", folder.parent / "classnames.txt") if p.is_file()), None)
    found = None if index is None else [line.strip() for line in index.read_text(encoding="utf-8").splitlines()
                                        if line.strip()]
    data.classnames, data.classnames_source = resolve_classnames(spec, found, str(index or folder))
    return data


def _check_shard_count(spec: DatasetSpec, folder: Path, found: int) -> None:
    """Warns when a CLIP_benchmark copy holds another number of shards than its nshards.txt lists: a partial
    download scores a smaller test set, and its number would still read as the dataset's."""
    listed = folder / "nshards.txt"
    try:
        expected = int(listed.read_text().strip()) if listed.is_file() else None
    except ValueError:  # not CLIP_benchmark's file; the image count is still checked when scored
        return
    if expected is not None and expected != found:
        warnings.warn(f"{spec.title}: '{folder}' holds {found} shard(s) (*.tar), but its nshards.txt lists {expected}: "
                      f"a partial (or mixed) copy scores another test set than the dataset's. Download the copy's "
                      f"shards 0.tar ... {expected - 1}.tar again.", stacklevel=3)


def count_warning(spec: DatasetSpec, split: str, n: int, where, layout: str = "") -> str | None:
    """The warning for a test split with ``n`` images where the release has another number (``spec.n_images``,
    where known), or None: a partial or modified copy's number is not comparable with published ones."""
    if split != "test" or not spec.n_images or n == spec.n_images:
        return None
    hint = (" For a webdataset copy, check that every shard is there and readable (the skip warnings say which "
            "samples were dropped)." if layout == "shards" else "")
    return (f"{spec.title} at '{where}' has {n:,} images; the release has {spec.n_images:,}. Numbers on a partial or "
            f"modified copy are not comparable with published ones.{hint}")


# ----------------------------------------------------------------------------- finding and opening a split


def _missing(root: Path, entries) -> list[str]:
    out = []
    for entry in entries:
        alternatives = entry if isinstance(entry, tuple) else (entry,)
        if not any((root / rel).exists() for rel in alternatives):
            out.append(" or ".join(str(root / rel) for rel in alternatives))
    return out


# CLIP_benchmark's webdataset copies of its VTAB variants (DIR/wds_vtab-<name>/test, the HuggingFace
# djghosh/wds_vtab-<name>_test repositories) whose test split and label order we could check: VTAB's test
# split is the official one for CIFAR, Pets, Flowers, DTD (partition 1), PCam and SVHN; Caltech-101 and
# EuroSAT carry VTAB's own (warned about, as any other tool's copy of a seeded split). The labels are
# tensorflow_datasets', which number these classes as torchvision does (Pets: class id - 1, SVHN: digit,
# EuroSAT: sorted folders) except Caltech-101 (lower-cased folders sorted), whose classnames.txt lists our
# names in that order and is prompted in it; for CIFAR, DTD and Flowers classnames.txt holds tfds' names,
# checked against ours as any copy's. Test only: VTAB's train splits are subsets (90 % of CIFAR's train).
VTAB_COPIES = ("caltech101", "cifar10", "cifar100", "dtd", "eurosat", "flowers", "pcam", "pets", "svhn")


def wds_folder(spec: DatasetSpec, root: Path, split: str) -> Path | None:
    """``DIR/<name>_wds/<split>`` or ``DIR/wds_<name>/<split>`` (also under an alias) holding *.tar, or for the
    test split of a ``VTAB_COPIES`` dataset CLIP_benchmark's ``DIR/wds_vtab-<name>/test``."""
    names = (spec.name, *spec.aliases)
    split_names = {"val": ("val", "valid", "validation")}.get(split, (split,))
    vtab = [root / f"wds_vtab-{spec.name}"] if split == "test" and spec.name in VTAB_COPIES else []
    for base in [root / f"{n}_wds" for n in names] + [root / f"wds_{n}" for n in names] + vtab:
        for s in split_names:
            if any((base / s).glob("*.tar")):
                return base / s
    return None


def unavailable_message(spec: DatasetSpec, root: Path, split: str) -> str:
    missing = _missing(root, spec.expected(split))
    return (f"{spec.title} ({spec.name}) {split} split not found under '{root}': expected "
            + "; ".join(missing) + f". To get it: {spec.get.replace('DIR', str(root))}. Or put a webdataset copy "
            f"(an image and an integer label member per sample) in {root / (spec.name + '_wds') / split}/*.tar.")


def _check_requires(spec: DatasetSpec) -> None:
    for module in spec.requires:
        try:
            importlib.import_module(module)
        except ImportError:
            raise DatasetUnavailable(f"{spec.title} needs the '{module}' package to read its files: "
                                     f"pip install {module}.") from None


def open_split(name: str, split: str, root: str | Path, transform: Callable, *, download: bool = False,
               seed: int = 0, label_key: str = "cls"):
    """The ``split`` (train / val / test) of dataset ``name`` under ``root``: a ``TorchvisionSplit``, an
    ``ImageFolderData`` (ImageNet) or a ``ShardData`` (webdataset copy), each with ``.classnames``.

    Raises ``DatasetUnavailable`` naming the expected files when neither the raw files nor a webdataset
    copy are there (and ``download`` is off or impossible)."""
    spec, root = get_spec(name), Path(root)
    if not spec.has_split(split):
        raise ValueError(f"{spec.title} has no '{split}' split; it has {', '.join(spec.splits)}.")
    raw_here = not _missing(root, spec.expected(split))
    if not raw_here:
        folder = wds_folder(spec, root, split)
        if folder is not None:
            if spec.seeded is not None and not folder.parent.name.endswith("_wds"):
                warnings.warn(f"{spec.title}: reading '{folder}', a copy another tool made (CLIP_benchmark names its "
                              f"copies wds_<name>): its {split} split is that tool's, not this registry's seeded "
                              "per-class split, so the numbers compare with that tool's, not with ours on the raw "
                              "files. python -m declip_ds.eval.make_shards writes <name>_wds copies with the "
                              "registry's split.")
            return _shard_split(spec, folder, transform, label_key)
        if not (download and spec.downloadable):
            raise DatasetUnavailable(unavailable_message(spec, root, split))
    _check_requires(spec)
    if spec.imagenet_classes:
        return _imagenet_split(spec, root, split, transform)
    return _torchvision_split(spec, root, split, transform, download=download and not raw_here, seed=seed)


def _torchvision_split(spec: DatasetSpec, root: Path, split: str, transform: Callable, *, download: bool,
                       seed: int) -> TorchvisionSplit:
    tv_root = root / spec.subdir if spec.subdir else root
    try:
        ds = spec.build(tv_root, spec.splits[split], download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted ..."
        raise DatasetUnavailable(f"torchvision could not read {spec.title} under '{tv_root}' ({e}). "
                                 + unavailable_message(spec, root, split)) from None
    indices = None
    if spec.seeded is not None:
        indices = _partition_indices(spec, ds, root, split)
        if indices is None:
            indices = per_class_split(_labels_of(ds), spec.seeded, seed, _stable_order(ds))[split]
    found = _dataset_classes(ds)
    classnames, source = resolve_classnames(spec, found, str(tv_root))
    data = TorchvisionSplit(spec, split, ds, indices, classnames, transform, root, source)
    _warn_count(spec, split, len(data), tv_root, data.layout)
    return data


def _warn_count(spec: DatasetSpec, split: str, n: int, where, layout: str) -> None:
    message = count_warning(spec, split, n, where, layout)
    if message:
        warnings.warn(message, stacklevel=3)


def _imagenet_split(spec: DatasetSpec, root: Path, split: str, transform: Callable):
    """An image folder of ImageNet classes: ImageNet's train / val, ImageNet-V2 (folders 0 ... 999),
    ImageNet-Sketch (1000 wnid folders), ImageNet-A / -R (their 200 wnid folders). Class folders in the
    standard order get OpenAI's class names; a class index in the folder (classnames.txt / .json) wins;
    anything else is refused, since labels and prompts would not line up. A test split with another number
    of images than the release's is warned about (a partial copy is not comparable with published numbers)."""
    from declip_ds.eval.datasets import ImageFolderData

    entry = spec.files[split][0]
    folder = next((root / rel for rel in (entry if isinstance(entry, tuple) else (entry,)) if (root / rel).is_dir()),
                  root / (entry[0] if isinstance(entry, tuple) else entry))
    if not folder.is_dir():
        raise DatasetUnavailable(unavailable_message(spec, root, split))
    numbered = [f.name for f in folder.iterdir() if f.is_dir() and f.name.isdigit()]
    # wnid folders are named below (their standard order = the label order); ImageNet-V2's numbered folders by
    # ImageFolderData (numeric order = ImageNet's class indices)
    data = ImageFolderData(folder, transform, wnid_names=bool(numbered))
    expected = [str(i) for i in range(1000)] if numbered and spec.imagenet_classes == "1k" else spec.wnids
    if data.class_index is None and data.folders == expected:
        data.classnames, data.classnames_source = spec.classnames, "registry"
    elif data.class_index is not None and sorted(data.folders) == sorted(expected):
        data.classnames_source = f"class index ({data.class_index})"
    else:
        extra = sorted(set(data.folders) - set(expected))
        absent = sorted(set(expected) - set(data.folders))
        empty = [f for f in absent if data.ignored_folders.get(f) == "no images"]  # expected classes without images
        missing = [f for f in absent if f not in empty]
        kind = "ILSVRC2012" if spec.imagenet_classes == "1k" else spec.title
        raise ValueError(f"{spec.title} {split} folder '{folder}' has {len(data.folders)} class folders; expected the "
                         f"{len(expected)} {kind} class folders ({expected[0]}, ...)"
                         + (f"; missing {missing[:3]}" if missing else "")
                         + (f"; without images {empty[:3]}" if empty else "")
                         + (f"; unexpected {extra[:3]}" if extra else "")
                         + ". Check that it is the standard release, fully extracted. For another image folder use "
                         "eval_zeroshot.py --data.")
    _warn_count(spec, split, len(data), folder, data.layout)
    return data


def describe(name: str) -> str:
    """One line per dataset for --list: name, title, classes, templates, splits, metric."""
    spec = get_spec(name)
    splits = "/".join(spec.splits) + (" (seeded per-class)" if spec.seeded else "")
    return (f"{spec.name:<14}{spec.title:<18}{len(spec.classnames):>5} classes {len(spec.templates):>3} templates  "
            f"{splits:<34} {spec.metric}")
