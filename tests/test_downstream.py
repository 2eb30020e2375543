"""Downstream transfer suite: the dataset registry (class names, templates, splits, metrics), missing data
and --download handling, and the suite runner on fixtures written in each dataset's on-disk format
(MNIST / Fashion-MNIST IDX files, CIFAR pickles, the ImageNet val folder, DTD, SUN397, a webdataset copy)
or, where the format is binary with checksums, torchvision's FakeData through the same code path."""

import dataclasses
import hashlib
import json
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

from declip_ds.data import transforms
from declip_ds.eval import downstream as D
from declip_ds.eval import linear_probe as lp
from declip_ds.eval import report, suite
from tests.test_eval_suite import image_bytes, save_checkpoint, tiny_model, write_tar

# name -> (classes, templates): the CLIP paper's counts (Caltech-101 with its background class)
COUNTS = {
    "cifar10": (10, 18), "cifar100": (100, 18), "food101": (101, 1), "pets": (37, 1), "flowers": (102, 1),
    "sun397": (397, 2), "cars": (196, 8), "dtd": (47, 8), "caltech101": (102, 34), "aircraft": (100, 2),
    "imagenet": (1000, 80), "mnist": (10, 1), "fashion_mnist": (10, 4), "stl10": (10, 2), "svhn": (10, 6),
    "gtsrb": (43, 3), "eurosat": (10, 3), "country211": (211, 5), "rendered_sst2": (2, 1), "fer2013": (7, 6),
    "pcam": (2, 2), "imagenet_v2": (1000, 80), "imagenet_sketch": (1000, 80), "imagenet_a": (200, 80),
    "imagenet_r": (200, 80), "imagenet_v2_top": (1000, 80), "imagenet_v2_threshold": (1000, 80),
}
SHIFTS = ("imagenet_v2", "imagenet_v2_top", "imagenet_v2_threshold", "imagenet_sketch", "imagenet_a", "imagenet_r")
PER_CLASS = {"pets", "flowers", "caltech101", "aircraft"}


# ----------------------------------------------------------------------------- fixtures in on-disk formats


def write_idx(folder, prefix, n, classes=10, size=8, seed=0):
    """MNIST's IDX files: big-endian magic, dims, then uint8 data."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    labels = (np.arange(n) % classes).astype(np.uint8)
    images = (rng.integers(0, 50, (n, size, size)) + labels[:, None, None] * 20).astype(np.uint8)
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, size, size) + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def write_mnist(root, folder="MNIST", n_train=20, n_test=10):
    write_idx(root / folder / "raw", "train", n_train)
    write_idx(root / folder / "raw", "t10k", n_test, seed=1)


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root, monkeypatch, hundred=False, per_batch=4, n_test=8):
    """CIFAR pickles; torchvision checks their md5, so its expected checksums are patched to the fixture's."""
    spec = D.get_spec("cifar100" if hundred else "cifar10")
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key = "fine_labels" if hundred else "labels"
    names = [c.replace(" ", "_") for c in spec.classnames]

    def batch(name, n, seed):
        rng = np.random.default_rng(seed)
        labels = [int(x) for x in rng.integers(0, 4, n)]  # a few classes, so that the probe has a val split
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), label_key: labels}, f)
        return [name, md5(folder / name)]

    cls = tvd.CIFAR100 if hundred else tvd.CIFAR10
    train = [batch("train", 5 * per_batch, 0)] if hundred else [batch(f"data_batch_{i}", per_batch, i) for i in range(1, 6)]
    test = [batch("test" if hundred else "test_batch", n_test, 9)]
    meta_name, meta_key = ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: names}, f)
    monkeypatch.setattr(cls, "train_list", train)
    monkeypatch.setattr(cls, "test_list", test)
    monkeypatch.setattr(cls, "meta", {"filename": meta_name, "key": meta_key, "md5": md5(folder / meta_name)})


def write_imagenet_val(root, per_class=1):
    """The ImageNet val layout: 1000 wnid folders (sorted = the standard class order)."""
    from declip_ds.eval.templates import imagenet_wnid_classnames

    for c, wnid in enumerate(sorted(imagenet_wnid_classnames())):
        d = root / "imagenet" / "val" / wnid
        d.mkdir(parents=True)
        for j in range(per_class):
            (d / f"ILSVRC2012_val_{c:05d}{j}.png").write_bytes(image_bytes(c + j, size=8))


def write_dtd(root, per_split=1):
    """DTD: dtd/dtd/images/<texture>/<file>.jpg and labels/{train,val,test}1.txt listing '<texture>/<file>'."""
    base = root / "dtd" / "dtd"
    (base / "labels").mkdir(parents=True)
    lines = {s: [] for s in ("train", "val", "test")}
    for c, name in enumerate(D.get_spec("dtd").classnames):
        (base / "images" / name).mkdir(parents=True)
        for s_i, s in enumerate(lines):
            for j in range(per_split):
                f = f"{name}_{s_i}{j}.jpg"
                (base / "images" / name / f).write_bytes(image_bytes(c + 4 * s_i + j, fmt="JPEG", size=8))
                lines[s].append(f"{name}/{f}")
    for s, ls in lines.items():
        (base / "labels" / f"{s}1.txt").write_text("\n".join(ls) + "\n")


def use_fakedata(monkeypatch, root, name, size=24, seeded=None):
    """Replace a dataset's torchvision class by FakeData (same splits, class count, split logic and wrapper) and
    create its expected files as placeholders, for formats a test can't write cheaply (.mat, md5-checked)."""
    spec = D.get_spec(name)
    for entry in {e for v in spec.files.values() for e in v}:
        path = root / (entry[0] if isinstance(entry, tuple) else entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch() if "." in path.name else path.mkdir(exist_ok=True)

    def build(tv_root, tv_split, download):
        assert download is False
        offset = {None: 0, "train": 0, "trainval": 0, "val": 10_000, "test": 20_000}[tv_split]
        return tvd.FakeData(size=size, image_size=(3, 12, 12), num_classes=len(spec.classnames), random_offset=offset,
                            target_transform=lambda y: y % 4)  # labels of a few classes: a val split for the probe

    new = dataclasses.replace(spec, build=build, seeded=seeded or spec.seeded)
    monkeypatch.setitem(D.REGISTRY, name, new)


@pytest.fixture
def no_downloads(monkeypatch):
    """Every torchvision download entry point of the registry's classes raises; returns the calls seen."""
    calls = []
    classes = {getattr(s.build, "tv_class", None) for s in D.REGISTRY.values()} - {None}
    for cls_name in classes:
        cls = getattr(tvd, cls_name)
        for method in ("download", "_download"):
            if hasattr(cls, method):
                def boom(self, _c=cls_name, _m=method):
                    calls.append((_c, _m))
                    raise AssertionError(f"{_c}.{_m} called without --download")
                monkeypatch.setattr(cls, method, boom)
    return calls


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    exp, model = tiny_model()
    return save_checkpoint(model, exp, tmp_path_factory.mktemp("run") / "step_00000001")


def run_suite(ckpt, root, out, *extra):
    return suite.main(["--checkpoint", str(ckpt), "--data-root", str(root), "--out", str(out), "--workers", "0",
                       "--batch-size", "64", "--max-iter", "30", "--cache-dir", str(out / "cache"), *extra])


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_class_names_and_templates(name):
    spec = D.get_spec(name)
    n_classes, n_templates = COUNTS[name]
    assert len(spec.classnames) == n_classes
    # distinct names, except OpenAI's ImageNet list, which names 'missile' and 'sunglasses' twice
    assert len(set(spec.classnames)) == n_classes - (2 if n_classes == 1000 else 0)
    assert len(spec.templates) == n_templates and all("{}" in t for t in spec.templates)
    assert spec.metric == ("mean_per_class_recall" if name in PER_CLASS else "acc1")
    assert "test" in spec.splits and ("train" in spec.splits) == (name not in SHIFTS)


def test_suites_and_names():
    assert D.SUITES["declip11"] == ("cifar10", "cifar100", "food101", "pets", "flowers", "sun397", "cars", "dtd",
                                    "caltech101", "aircraft", "imagenet")
    assert set(COUNTS) == set(D.REGISTRY) and D.suite_datasets("all") == [*D.REGISTRY, "flickr30k", "coco"]
    assert D.suite_datasets("fgvc_aircraft,MNIST") == ["aircraft", "mnist"]
    assert D.get_spec("imagenet1k").name == "imagenet"
    assert [n for n in D.REGISTRY if D.get_spec(n).has_split("val")] == [
        "flowers", "dtd", "aircraft", "eurosat", "country211", "rendered_sst2", "pcam"]
    with pytest.raises(ValueError, match="Unknown suite 'declip12'. Known suites: declip11, quick, robustness, declip_robustness, retrieval, all"):
        D.suite_datasets("declip12")
    with pytest.raises(ValueError, match="Unknown dataset 'flower'. Known: cifar10, cifar100"):
        D.get_spec("flower")
    about = json.loads(D.PROMPTS_FILE.read_text())["_about"]
    assert "CLIP_benchmark" in about and "MIT" in about and D.PROMPTS_FILE.with_name("DOWNSTREAM_PROMPTS_LICENSE.txt").is_file()


def test_per_class_split_is_seeded_disjoint_and_sized():
    labels = [0] * 40 + [1] * 35 + [2] * 3
    out = D.per_class_split(labels, D.SeededSplit(train=30), seed=0)
    assert sorted(out["train"] + out["test"]) == list(range(78)) and not out["val"]
    counts = lambda idx: np.bincount([labels[i] for i in idx], minlength=3).tolist()  # noqa: E731
    assert counts(out["train"]) == [30, 30, 3] and counts(out["test"]) == [10, 5, 0]
    assert out == D.per_class_split(labels, D.SeededSplit(train=30), seed=0)
    assert out["train"] != D.per_class_split(labels, D.SeededSplit(train=30), seed=1)["train"]
    fr = D.per_class_split(labels, D.SeededSplit(train=0.6, val=0.2), seed=0)
    assert counts(fr["train"]) == [24, 21, 2] and counts(fr["val"]) == [8, 7, 1] and counts(fr["test"]) == [8, 7, 0]
    capped = D.per_class_split(labels, D.SeededSplit(train=2, test=3), seed=0)
    assert counts(capped["test"]) == [3, 3, 1]


def test_class_names_checked_against_the_dataset():
    spec = D.get_spec("cifar10")
    raw = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert D.resolve_classnames(spec, raw, "x") == (spec.classnames, "registry")
    with pytest.warns(UserWarning, match="10 of 10 class names differ"):
        names, source = D.resolve_classnames(spec, [f"class {n}" for n in raw[::-1]], "x")
    assert names == [f"class {n}" for n in raw[::-1]] and source == "dataset (x)"  # keep labels and prompts aligned
    with pytest.warns(UserWarning, match="the registry's in another order"):
        names, source = D.resolve_classnames(spec, raw[::-1], "x")
    assert names == spec.classnames[::-1] and source == "registry, in the order of the dataset (x)"
    # CLIP_benchmark's FER2013 copy (an ImageFolder: alphabetical labels) against torchvision's CSV order, whose
    # names the registry keeps unchecked (check_names=False): still realigned, with the registry's names
    fer = D.get_spec("fer2013")
    cb = ["angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised"]
    with pytest.warns(UserWarning, match="label 4 is 'neutral', the registry's class 4 is 'sad'"):
        assert D.resolve_classnames(fer, cb, "wds_fer2013")[0] == cb
    assert D.resolve_classnames(fer, list(fer.classnames), "x") == (fer.classnames, "registry")
    with pytest.raises(ValueError, match="has 9 classes; the standard release has 10"):
        D.resolve_classnames(spec, raw[:9], "x")
    flowers = D.get_spec("flowers")  # CLIP renamed two of torchvision's names: still the registry's
    assert D.resolve_classnames(flowers, list(tvd.Flowers102.classes), "x")[0] == flowers.classnames


# ----------------------------------------------------------------------------- missing data, --download


def test_missing_dataset_error_says_what_and_how(tmp_path):
    with pytest.raises(D.DatasetUnavailable) as e:
        D.open_split("flowers", "test", tmp_path, None)
    msg = str(e.value)
    assert "Flowers-102 (flowers) test split not found under" in msg
    assert str(tmp_path / "flowers-102" / "setid.mat") in msg and "--download" in msg
    assert "robots.ox.ac.uk/~vgg/data/flowers/102" in msg and str(tmp_path / "flowers_wds" / "test") in msg
    with pytest.raises(D.DatasetUnavailable, match="can no longer download it"):
        D.open_split("cars", "test", tmp_path, None, download=True)  # not downloadable: no attempt either
    with pytest.raises(D.DatasetUnavailable, match=r"fer2013\.csv or .*icml_face_data\.csv"):
        D.open_split("fer2013", "train", tmp_path, None)
    with pytest.raises(ValueError, match="CIFAR-10 has no 'val' split; it has train, test"):
        D.open_split("cifar10", "val", tmp_path, None)


def test_download_only_with_the_flag(tmp_path, checkpoint, no_downloads, monkeypatch, capsys):
    root = tmp_path / "data"
    write_mnist(root)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert run_suite(checkpoint, root, tmp_path / "out", "--suite", "all") == 0
    assert no_downloads == []  # nothing fetched, and nothing created in the data root
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    rec = report.load_record(tmp_path / "out" / "zeroshot.json")
    assert [n for n in rec["metrics"] if n not in rec["skipped"]] == ["mnist"]
    assert set(rec["skipped"]) == set(D.REGISTRY) - {"mnist"}
    assert "FashionMNIST/raw/train" not in rec["skipped"]["fashion_mnist"]  # zero-shot needs the test files only
    assert str(root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte") in rec["skipped"]["fashion_mnist"]
    out = capsys.readouterr().out
    assert f"zeroshot: skipped {len(D.REGISTRY) - 1} of {len(D.REGISTRY)} datasets:" in out and "  cars: Stanford Cars (cars) test split" in out

    fetched = []
    monkeypatch.setattr(tvd.FashionMNIST, "download", lambda self: fetched.append(self.root) or write_mnist(root, "FashionMNIST"))
    assert run_suite(checkpoint, root, tmp_path / "out2", "--suite", "fashion_mnist", "--download") == 0
    assert fetched == [str(root)]
    assert report.load_record(tmp_path / "out2" / "zeroshot.json")["metrics"]["fashion_mnist"]["n"] == 10


def test_suite_uses_the_checkpoints_preprocessing_and_records_it(tmp_path, checkpoint, no_downloads, monkeypatch):
    root = tmp_path / "data"
    write_mnist(root, n_train=60)  # 6 per class: the probe's 20 % validation split has one of each
    seen = []
    real = D.open_split
    monkeypatch.setattr(D, "open_split", lambda name, split, r, transform, **k: seen.append(transform) or
                        real(name, split, r, transform, **k))
    assert run_suite(checkpoint, root, tmp_path / "out", "--suite", "mnist") == 0  # the run's eval config
    assert run_suite(checkpoint, root, tmp_path / "out2", "--suite", "mnist", "--task", "both",
                     "--interpolation", "bilinear", "--crop-ratio", "0.5") == 0
    got = [(t.transforms[0].size, t.transforms[0].interpolation.value, t.transforms[1].size) for t in seen]
    assert got == [(37, "bicubic", (32, 32))] + [(64, "bilinear", (32, 32))] * 3  # zero-shot; zero-shot, train, test
    assert report.load_record(tmp_path / "out" / "zeroshot.json")["preprocess"]["crop_ratio"] == 0.875
    for task in ("zeroshot", "linear_probe"):
        rec = report.load_record(tmp_path / "out2" / f"{task}.json")["preprocess"]
        assert (rec["resize"], rec["crop"], rec["interpolation"], rec["normalize"]) == (64, 32, "bilinear", "imagenet")


def test_suite_probe_protocol_is_chosen_and_recorded(tmp_path, checkpoint, no_downloads):
    """--probe-protocol clip-paper: the probe fits the pre-projection features unnormalised over the C grid,
    and the record and each dataset's metrics say so; the default protocol is recorded as well."""
    root = tmp_path / "data"
    write_mnist(root, n_train=60)
    assert run_suite(checkpoint, root, tmp_path / "paper", "--suite", "mnist", "--task", "linear_probe",
                     "--probe-protocol", "clip-paper") == 0
    rec = report.load_record(tmp_path / "paper" / "linear_probe.json")
    m = rec["metrics"]["mnist"]
    assert rec["protocol"] == m["protocol"] == "clip-paper" and (m["features"], m["normalized"]) == ("pooled", False)
    assert m["C"] in lp.C_GRID and {h["C"] for h in m["sweep"]} >= set(lp.C_GRID[::lp.COARSE_STEP])
    assert run_suite(checkpoint, root, tmp_path / "default", "--suite", "mnist", "--task", "linear_probe") == 0
    rec = report.load_record(tmp_path / "default" / "linear_probe.json")
    m = rec["metrics"]["mnist"]
    assert rec["protocol"] == m["protocol"] == lp.PROTOCOL and (m["features"], m["normalized"]) == ("embedding", True)
    assert m["weight_decay"] in lp.GRID


def test_a_dataset_that_fails_is_not_taken_for_a_missing_one(tmp_path, checkpoint, no_downloads, monkeypatch, capsys):
    """A dataset that is there but whose evaluation raises (here a RuntimeError, e.g. out of memory) is listed as
    FAILED, the others still run and are written, and the suite exits 1: not a quiet 'skipped' and a smaller
    average."""
    root = tmp_path / "data"
    write_mnist(root)
    write_mnist(root, "FashionMNIST")
    real = D.open_split

    def open_split(name, split, r, transform, **k):
        if name == "fashion_mnist":
            raise RuntimeError("CUDA out of memory (injected)")
        return real(name, split, r, transform, **k)

    monkeypatch.setattr(D, "open_split", open_split)
    assert run_suite(checkpoint, root, tmp_path / "out", "--suite", "mnist,fashion_mnist,cifar10") == 1
    rec = report.load_record(tmp_path / "out" / "zeroshot.json")
    assert rec["failed"] == ["fashion_mnist"] and "n" in rec["metrics"]["mnist"]
    assert rec["skipped"]["fashion_mnist"].startswith("FAILED: RuntimeError: CUDA out of memory")
    assert not rec["skipped"]["cifar10"].startswith("FAILED")  # absent: skipped as before
    captured = capsys.readouterr()
    assert "fashion_mnist: FAILED" in captured.err and "the evaluation of 1 dataset(s) failed (zeroshot/fashion_mnist" in captured.err


def test_nothing_found_is_an_error_not_a_crash(tmp_path, checkpoint, no_downloads, capsys):
    (tmp_path / "empty").mkdir()
    assert run_suite(checkpoint, tmp_path / "empty", tmp_path / "out", "--suite", "quick") == 2
    err = capsys.readouterr().err
    assert "none of the 4 datasets of 'quick' could be evaluated" in err
    assert suite.main(["--checkpoint", str(checkpoint), "--data-root", str(tmp_path / "nope")]) == 2
    assert "--data-root '" in capsys.readouterr().err
    assert suite.main(["--checkpoint", str(checkpoint), "--data-root", str(tmp_path), "--suite", "x"]) == 2
    assert "Unknown suite 'x'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- formats


def test_sun397_folder_with_and_without_the_official_partition(tmp_path, monkeypatch):
    base = tmp_path / "SUN397"
    spec = D.get_spec("sun397")
    lines = []
    for c, name in enumerate(spec.classnames):
        folder = name.replace(" ", "_")
        lines.append(f"/{folder[0]}/{folder}")
        if c < 3:
            (base / folder[0] / folder).mkdir(parents=True)
            for j in range(4):
                (base / folder[0] / folder / f"sun_{c}{j}.jpg").write_bytes(image_bytes(c + j, fmt="JPEG", size=8))
    (base / "ClassName.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setitem(D.REGISTRY, "sun397", dataclasses.replace(spec, seeded=D.SeededSplit(train=1, test=2)))
    train = D.open_split("sun397", "train", tmp_path, lambda im: torch.zeros(1))
    test = D.open_split("sun397", "test", tmp_path, lambda im: torch.zeros(1))
    assert train.classnames == spec.classnames and (len(train), len(test)) == (3, 6)
    assert sorted(label for _, label in test) == [0, 0, 1, 1, 2, 2] and not set(train.indices) & set(test.indices)
    (base / "Training_01.txt").write_text("/a/abbey/sun_00.jpg\n/a/airplane_cabin/sun_10.jpg\n")
    (base / "Testing_01.txt").write_text("/a/abbey/sun_01.jpg\n")
    official = D.open_split("sun397", "train", tmp_path, lambda im: torch.zeros(1))
    assert sorted(label for _, label in official) == [0, 1]
    assert len(D.open_split("sun397", "test", tmp_path, lambda im: torch.zeros(1))) == 1


def test_caltech101_keeps_the_background_class(tmp_path, monkeypatch):
    top = tmp_path / "caltech101" / "101_ObjectCategories"
    for c, folder in enumerate(["BACKGROUND_Google", "Faces", "Faces_easy", *[f"c{i:03d}" for i in range(99)]]):
        (top / folder).mkdir(parents=True)
        for j in range(1, 4):  # torchvision's naming: image_0001.jpg ...
            (top / folder / f"image_{j:04d}.jpg").write_bytes(image_bytes(c + j, fmt="JPEG", size=8))
    spec = D.get_spec("caltech101")
    monkeypatch.setitem(D.REGISTRY, "caltech101", dataclasses.replace(spec, seeded=D.SeededSplit(train=2)))
    train = D.open_split("caltech101", "train", tmp_path, lambda im: torch.zeros(1))
    test = D.open_split("caltech101", "test", tmp_path, lambda im: torch.zeros(1))
    assert (len(train), len(test)) == (204, 102) and test.classnames[:3] == ["background", "off-center face", "centered face"]
    assert sorted(label for _, label in test) == list(range(102))  # label 0 = BACKGROUND_Google


def test_webdataset_copy_reads_like_the_raw_files(tmp_path, checkpoint, no_downloads):
    folder = tmp_path / "data" / "cifar10_wds" / "test"
    folder.mkdir(parents=True)
    write_tar(folder / "00000.tar", [m for i in range(6) for m in ((f"k{i}.png", image_bytes(i, size=8)),
                                                                     (f"k{i}.cls", str(i % 10).encode()))])
    data = D.open_split("cifar10", "test", tmp_path / "data", lambda im: torch.zeros(1))
    assert data.layout == "shards" and data.classnames == D.get_spec("cifar10").classnames
    assert run_suite(checkpoint, tmp_path / "data", tmp_path / "out", "--suite", "cifar10") == 0
    m = report.load_record(tmp_path / "out" / "zeroshot.json")["metrics"]["cifar10"]
    assert m["n"] == 6 and m["layout"] == "shards" and m["n_templates"] == 18
    (folder / "classnames.txt").write_text("\n".join(f"class {i}" for i in range(10)))  # another order: its names win
    with pytest.warns(UserWarning, match="class names differ"):
        assert D.open_split("cifar10", "test", tmp_path / "data", None).classnames[0] == "class 0"


# ----------------------------------------------------------------------------- the suite


def test_declip11_suite_zero_shot_and_linear_probe(tmp_path, checkpoint, no_downloads, monkeypatch, capsys):
    root = tmp_path / "data"
    write_cifar(root, monkeypatch)
    write_cifar(root, monkeypatch, hundred=True)
    write_imagenet_val(root)  # val only: the linear probe lacks ImageNet's train split
    write_dtd(root)
    for name in ("food101", "pets", "flowers", "aircraft"):
        use_fakedata(monkeypatch, root, name)
    use_fakedata(monkeypatch, root, "sun397", size=40, seeded=D.SeededSplit(train=5, test=3))
    use_fakedata(monkeypatch, root, "caltech101", size=40, seeded=D.SeededSplit(train=5))
    # Stanford Cars is not there at all
    out = tmp_path / "out"
    assert run_suite(checkpoint, root, out, "--suite", "declip11", "--task", "both", "--templates", "simple") == 0
    assert no_downloads == []
    zs, probe = (report.load_record(out / f"{t}.json") for t in ("zeroshot", "linear_probe"))
    for rec in (zs, probe):
        assert list(rec["metrics"]) == list(D.SUITES["declip11"]) and rec["suite"] == "declip11"
        assert rec["model"] == "clip/vit_tiny" and rec["templates" if rec is zs else "val_fraction"] is not None
        assert "stanford_cars/cars_" in rec["skipped"]["cars"] and "can no longer download" in rec["skipped"]["cars"]
        for name, m in rec["metrics"].items():
            if name not in rec["skipped"]:
                assert m["headline_metric"] == ("mean_per_class_recall" if name in PER_CLASS else "acc1")
                assert 0 <= m["acc1"] <= 1 and 0 <= m["mean_per_class_recall"] <= 1
    assert set(zs["skipped"]) == {"cars"} and set(probe["skipped"]) == {"cars", "imagenet"}
    assert "imagenet/train" in probe["skipped"]["imagenet"]
    assert zs["metrics"]["imagenet"]["n"] == 1000 and zs["metrics"]["imagenet"]["layout"] == "folder"
    assert (zs["metrics"]["cifar10"]["n"], zs["metrics"]["dtd"]["n"]) == (8, 47)
    assert probe["metrics"]["dtd"]["val_split"] == "official" and probe["metrics"]["dtd"]["n_val"] == 47
    assert probe["metrics"]["cifar100"]["val_split"] == "0.2 of train"
    assert probe["metrics"]["cifar10"]["n_train"] + probe["metrics"]["cifar10"]["n_val"] == 20
    sun, caltech = probe["metrics"]["sun397"], probe["metrics"]["caltech101"]
    assert sun["n_train"] + sun["n_val"] == 20 and zs["metrics"]["sun397"]["n"] == sun["n"] <= 12  # 4 classes: 5 / 3
    assert caltech["n_train"] + caltech["n_val"] + caltech["n"] == 40
    # the table: datasets as columns in the paper's order, the average over what was found, the metric note
    text = (out / "table.txt").read_text()
    header = next(line for line in text.splitlines() if line.startswith("model"))
    assert header.split() == ["model", *D.SUITES["declip11"], "average"]
    row = next(line for line in text.splitlines() if line.startswith("clip/vit_tiny")).split()
    assert row[7] == "-" and row[-1].endswith("*")  # cars
    found = [n for n in D.SUITES["declip11"] if n != "cars"]
    avg = np.mean([zs["metrics"][n][zs["metrics"][n]["headline_metric"]] for n in found])
    assert row[-1] == f"{100 * avg:.2f}*"
    assert "pets, flowers, caltech101, aircraft: mean_per_class_recall (not acc1)" in text
    assert "linear_probe: skipped 2 of 11 datasets:" in text and "| model | cifar10 |" in (out / "table.md").read_text()
    printed = capsys.readouterr().out
    assert "zero-shot top-1 (%)" in printed and "linear-probe top-1 (%)" in printed


def test_headline_is_mean_per_class_where_the_literature_reports_it():
    # hand-checked: 4 images of class 0 (3 right), 1 of class 1 (wrong), 1 of class 2 (right)
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1, 0, 2]), 3).float()
    m = lp.classification_metrics(logits, labels, 3)
    assert m["acc1"] == pytest.approx(4 / 6) and m["mean_per_class_recall"] == pytest.approx((3 / 4 + 0 + 1) / 3)
    rec = report.make_record(model="m", checkpoint="c", dataset="d", task="zeroshot", config_hash="h", metrics={
        "pets": {**m, "headline_metric": "mean_per_class_recall"}, "cifar10": {**m, "headline_metric": "acc1"}})
    table = report.build_tables([rec])["zeroshot"]
    assert table["cells"] == {("m", "pets"): pytest.approx(7 / 12), ("m", "cifar10"): pytest.approx(4 / 6)}
    text = report.format_table("zeroshot", table)
    assert text.splitlines()[3].split() == ["m", "58.33", "66.67", "62.50"]
    assert text.splitlines()[-1] == "pets: mean_per_class_recall (not acc1)"


def test_probe_with_official_val_refits_on_train_and_val():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 4, generator=g) * 3
    draw = lambda n: (centers.repeat_interleave(n, 0) + torch.randn(3 * n, 4, generator=g),  # noqa: E731
                      torch.arange(3).repeat_interleave(n))
    (Xtr, ytr), (Xva, yva), (Xte, yte) = draw(10), draw(5), draw(5)
    out = lp.linear_probe(Xtr, ytr, Xte, yte, 3, val=(Xva, yva), device="cpu", max_iter=100)
    assert (out["n_train"], out["n_val"], out["n"]) == (30, 15, 15) and out["val_split"] == "official"
    assert out["weight_decay"] in lp.GRID and out["C"] == pytest.approx(1 / (out["weight_decay"] * 45))
    assert out["acc1"] > 0.8


# ----------------------------------------------------------------------------- ImageNet shifts


def write_class_folders(base, folders, per_class=1):
    for c, name in enumerate(folders):
        (base / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            (base / name / f"{j}.png").write_bytes(image_bytes(c + j, size=8))
    return base


def test_imagenet_shifts_are_read_with_imagenets_classes(tmp_path, checkpoint, no_downloads):
    """ImageNet-V2 (numbered folders, numeric order), -Sketch (1000 wnid folders, under either release path),
    -A and -R (their 200 wnid folders) get OpenAI's ImageNet names in label order; another folder set is
    refused, a short copy warned about; the robustness suite zero-shots them and the probe leaves them out."""
    from declip_ds.eval.templates import imagenet_subset_wnids, imagenet_wnid_classnames

    table = imagenet_wnid_classnames()
    root = tmp_path / "data"
    write_class_folders(root / "imagenetv2-matched-frequency-format-val", [str(i) for i in range(1000)])
    write_class_folders(root / "imagenet-sketch" / "sketch", sorted(table))
    a = write_class_folders(root / "imagenet-a", imagenet_subset_wnids("a"))
    (a / "README.txt").write_text("ImageNet-A\n")
    tf = transforms.eval_transform(32)
    with pytest.warns(UserWarning, match="ImageNet-V2 at .* has 1,000 images; the release has 10,000"):
        v2 = D.open_split("imagenetv2", "test", root, tf)
    assert v2.folders[:3] == ["0", "1", "2"] and v2.folders[10] == "10" and v2.classnames[:2] == ["tench", "goldfish"]
    assert v2.classnames_source == "registry" and v2.samples[10][1] == 10
    with pytest.warns(UserWarning, match="has 200 images; the release has 7,500"):
        ia = D.open_split("imagenet_a", "test", root, tf)
    assert len(ia.classnames) == 200 and ia.classnames[0] == "stingray" == table["n01498041"]
    assert ia.folders == list(imagenet_subset_wnids("a")) and ia.classnames == D.get_spec("imagenet_a").classnames
    (root / "imagenetv2-matched-frequency-format-val").rename(root / "imagenetv2-top-images-format-val")
    with pytest.warns(UserWarning, match="ImageNet-V2 top-images at .* has 1,000 images; the release has 10,000"):
        assert D.open_split("imagenet_v2_top", "test", root, tf).classnames_source == "registry"
    (root / "imagenetv2-top-images-format-val").rename(root / "imagenetv2-matched-frequency-format-val")
    with pytest.warns(UserWarning, match="ImageNet-Sketch"):
        assert len(D.open_split("imagenet-sketch", "test", root, tf).classnames) == 1000
    with pytest.raises(D.DatasetUnavailable, match=r"imagenet-r.*hendrycks/imagenet-r.tar"):
        D.open_split("imagenet_r", "test", root, tf)
    # ImageNet-A's folder holding ImageNet-R's classes: refused, not scored against the wrong labels
    write_class_folders(root / "imagenet-r", imagenet_subset_wnids("a"))
    with pytest.raises(ValueError, match=r"ImageNet-R test folder .* has 200 class folders; expected the 200 "
                                         r"ImageNet-R class folders \(n01443537, ...\); missing"):
        D.open_split("imagenet_r", "test", root, tf)
    out = tmp_path / "out"
    with pytest.warns(UserWarning):
        rc = run_suite(checkpoint, root, out, "--suite", "robustness", "--task", "both", "--templates", "simple")
    assert rc == 1  # imagenet-r is there but wrong: FAILED, the others still ran
    zs, probe = (report.load_record(out / f"{t}.json") for t in ("zeroshot", "linear_probe"))
    assert zs["datasets"] == list(D.SUITES["robustness"]) and probe["datasets"] == ["imagenet"]
    assert set(zs["skipped"]) == {"imagenet", "imagenet_r"} and zs["failed"] == ["imagenet_r"]
    assert [zs["metrics"][n]["n"] for n in ("imagenet_v2", "imagenet_sketch", "imagenet_a")] == [1000, 1000, 200]
    assert zs["metrics"]["imagenet_a"]["n_classes"] == 200 and zs["metrics"]["imagenet_a"]["acc5"] is not None


def test_imagenet_v2_with_a_plain_classnames_txt_names_folder_i_as_class_i(tmp_path):
    """A classnames.txt of plain lines (ImageNet's names in index order) next to ImageNetV2's folders 0 ... 999 names
    them in numeric order: folder 10 gets IMAGENET_CLASSNAMES[10] ('brambling'), not line 2's (sorted as text, the
    10 would be the third folder)."""
    from declip_ds.eval.templates import IMAGENET_CLASSNAMES

    folder = write_class_folders(tmp_path / "imagenetv2-matched-frequency-format-val", [str(i) for i in range(1000)])
    (folder / "classnames.txt").write_text("\n".join(IMAGENET_CLASSNAMES) + "\n")
    with pytest.warns(UserWarning, match="has 1,000 images; the release has 10,000"):
        v2 = D.open_split("imagenet_v2", "test", tmp_path, lambda im: torch.zeros(1))
    assert v2.folders[10] == "10" and v2.classnames[10] == IMAGENET_CLASSNAMES[10]
    assert v2.classnames == list(IMAGENET_CLASSNAMES) and v2.classnames_source.startswith("class index")
    assert [label for path, label in v2.samples if path.parent.name == "10"] == [10]


def test_an_expected_imagenet_class_folder_without_images_is_an_error(tmp_path):
    """ImageNet-A's 200 class folders with one of them empty, and a stray lost+found: the stray folder is named in
    a warning, the empty class in the error (a 199-class copy is not ImageNet-A)."""
    from declip_ds.eval.templates import imagenet_subset_wnids

    wnids = list(imagenet_subset_wnids("a"))
    folder = write_class_folders(tmp_path / "imagenet-a", wnids)
    for f in (folder / wnids[3]).iterdir():
        f.unlink()
    (folder / "lost+found").mkdir()
    with pytest.warns(UserWarning, match=r"'lost\+found' \(no images\)"), \
            pytest.raises(ValueError, match=rf"has 199 class folders; .* without images \['{wnids[3]}'\]"):
        D.open_split("imagenet_a", "test", tmp_path, None)


def test_list_says_how_to_get_each_dataset():
    text = suite.list_datasets()
    assert "get:   --download, or extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into DIR" in text
    assert "get:   ImageNet can't be downloaded automatically" in text and "wds_vtab-<name>/test/" in text


# ----------------------------------------------------------------------------- webdataset copies


def _items(data):
    loader = data.loader(16)
    return [(img, int(label)) for images, labels, _ in loader for img, label in zip(images, labels)]


def test_make_shards_copies_score_like_the_raw_files(tmp_path, monkeypatch, capsys):
    """make_shards writes <name>_wds/<split>/ copies that the suite reads instead of the raw files, with the same
    pixels, labels, class names and order (torchvision archives as PNG, image files copied), and retrieval
    copies with every caption; partial and existing copies are handled; a missing dataset is skipped."""
    from declip_ds.data.tokenizer import Tokenizer
    from declip_ds.eval import make_shards
    from declip_ds.eval.retrieval import RETRIEVAL_REGISTRY, evaluate_retrieval
    from declip_ds.eval.templates import imagenet_subset_wnids
    from tests.test_retrieval import _karpathy

    root, out = tmp_path / "raw", tmp_path / "copies"
    write_cifar(root, monkeypatch)
    for c, wnid in enumerate(imagenet_subset_wnids("a")):  # JPEG files, as the release ships them
        (root / "imagenet-a" / wnid).mkdir(parents=True, exist_ok=True)
        (root / "imagenet-a" / wnid / f"{c}.jpg").write_bytes(image_bytes(c, fmt="JPEG", size=12))
    _karpathy(root / "coco")
    (out / "cifar10_wds" / "test.partial").mkdir(parents=True)  # a crashed earlier run's leftover
    args = ["--data-root", str(root), "--out", str(out), "--shard-size", "7"]
    with pytest.warns(UserWarning, match="ImageNet-A"):
        assert make_shards.main([*args, "--suite", "cifar10,imagenet_a,coco,cars"]) == 0
    err = capsys.readouterr().err
    assert "cifar10/train: 20 samples" in err and "imagenet_a/test: 200 samples" in err and "coco/test: 2 samples" in err
    assert "skipped cars/train: Stanford Cars" in err
    assert sorted(p.name for p in (out / "imagenet_a_wds" / "test").iterdir())[:2] == [
        "classnames.txt", "imagenet_a-test-00000.tar"]
    assert len(list((out / "imagenet_a_wds" / "test").glob("*.tar"))) == 29  # 200 / 7
    assert not list(out.rglob("*.partial"))
    tf = transforms.eval_transform(16)
    for name, split in (("cifar10", "train"), ("cifar10", "test"), ("imagenet_a", "test")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw, copy = D.open_split(name, split, root, tf), D.open_split(name, split, out, tf)
        assert copy.layout == "shards" and copy.classnames == raw.classnames
        a, b = _items(raw), _items(copy)
        assert len(a) == len(b) and all(la == lb and torch.equal(x, y) for (x, la), (y, lb) in zip(a, b)), name
    _, model = tiny_model()
    tok = Tokenizer(context_length=16)
    raw, copy = (evaluate_retrieval(model, tok, RETRIEVAL_REGISTRY["coco"].source(r), image_size=32)
                 for r in (root, out))
    assert copy == raw and copy["n_texts"] == 11
    # an existing copy is kept unless --overwrite; a suite with nothing under the root is an error
    stamp = (out / "coco_wds" / "test" / "coco-test-00000.tar").stat().st_mtime_ns
    assert make_shards.main([*args, "--suite", "coco"]) == 0
    assert "exists, kept" in capsys.readouterr().err
    assert (out / "coco_wds" / "test" / "coco-test-00000.tar").stat().st_mtime_ns == stamp
    assert make_shards.main([*args, "--suite", "cars"]) == 2
    assert make_shards.main([*args, "--suite", "cifar10", "--splits", "tset"]) == 2
    assert "--splits: tset is not a split" in capsys.readouterr().err


def test_other_tools_copies_of_seeded_split_datasets_warn(tmp_path):
    """EuroSAT, Caltech-101 and SUN397 have no official split here (a seeded per-class one): a CLIP_benchmark-style
    copy (wds_<name>) carries that tool's split, which the suite says; our own <name>_wds copies do not warn."""
    import shutil
    import warnings

    for folder in ("wds_eurosat", "eurosat_wds"):
        (tmp_path / folder / "test").mkdir(parents=True)
        (tmp_path / folder / "test" / "0.tar").write_bytes(b"")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = D.open_split("eurosat", "test", tmp_path, None)
        assert data.root == tmp_path / folder / "test"
        assert any("not this registry's seeded per-class split" in str(w.message) for w in caught) == (
            folder == "wds_eurosat"), [str(w.message) for w in caught]
        shutil.rmtree(tmp_path / folder)
    (tmp_path / "wds_cifar10" / "test").mkdir(parents=True)  # an official split: nothing to say
    (tmp_path / "wds_cifar10" / "test" / "0.tar").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D.open_split("cifar10", "test", tmp_path, None)


def test_partial_webdataset_copy_of_imagenet_is_warned_about(tmp_path, checkpoint, no_downloads):
    """CLIP_benchmark's wds_imagenet1k copy with 3 of ImageNet val's 50,000 images (one of its 4 listed shards):
    opening it warns about the missing shards, scoring it about the count, and the record and the table say so."""
    from declip_ds.eval.templates import IMAGENET_CLASSNAMES

    copy = tmp_path / "data" / "wds_imagenet1k"
    (copy / "test").mkdir(parents=True)
    (copy / "classnames.txt").write_text("\n".join(IMAGENET_CLASSNAMES) + "\n")
    (copy / "test" / "nshards.txt").write_text("4\n")
    write_tar(copy / "test" / "0.tar", [m for i in range(3) for m in ((f"k{i}.png", image_bytes(i, size=8)),
                                                                        (f"k{i}.cls", str(i).encode()))])
    with pytest.warns(UserWarning, match=r"holds 1 shard\(s\) \(\*\.tar\), but its nshards.txt lists 4"):
        D.open_split("imagenet", "test", tmp_path / "data", None)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="ImageNet at .*wds_imagenet1k/test' has 3 images; the release has 50,000"):
        assert run_suite(checkpoint, tmp_path / "data", out, "--suite", "imagenet", "--templates", "simple") == 0
    m = report.load_record(out / "zeroshot.json")["metrics"]["imagenet"]
    assert m["n"] == 3 and m["layout"] == "shards" and "the release has 50,000" in m["warning"]
    assert "zeroshot/imagenet: WARNING ImageNet at" in (out / "table.txt").read_text()


def test_clip_benchmark_vtab_copies_are_read_for_the_test_split(tmp_path):
    """DIR/wds_vtab-<name>/test (CLIP_benchmark's VTAB copies, classnames.txt above the split) is a test split
    for the datasets whose VTAB test split and labels are ours; its Caltech-101 names, ours in tfds' order, are
    prompted in that order (and its split is VTAB's: warned); VTAB's train splits are not ours, so not read."""
    def copy(name, classnames):
        (tmp_path / f"wds_vtab-{name}" / "test").mkdir(parents=True)
        (tmp_path / f"wds_vtab-{name}" / "test" / "0.tar").write_bytes(b"")
        (tmp_path / f"wds_vtab-{name}" / "classnames.txt").write_text("\n".join(classnames) + "\n")

    copy("cifar10", ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
    data = D.open_split("cifar10", "test", tmp_path, None)
    assert data.root == tmp_path / "wds_vtab-cifar10" / "test" and data.classnames == D.get_spec("cifar10").classnames
    with pytest.raises(D.DatasetUnavailable):
        D.open_split("cifar10", "train", tmp_path, None)
    ours = D.get_spec("caltech101").classnames
    vtab_order = sorted(ours)
    copy("caltech101", vtab_order)
    with pytest.warns(UserWarning) as caught:
        data = D.open_split("caltech101", "test", tmp_path, None)
    assert data.classnames == vtab_order
    messages = " | ".join(str(w.message) for w in caught)
    assert "another order" in messages and "not this registry's seeded per-class split" in messages
    copy("food101", D.get_spec("food101").classnames)  # VTAB's Food-101 is not one of CLIP_benchmark's copies
    with pytest.raises(D.DatasetUnavailable):
        D.open_split("food101", "test", tmp_path, None)
