"""Tests for declip_ds.data.synthetic (CPU only, small datasets)."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from declip_ds.data import synthetic as syn

REPO = Path(__file__).resolve().parents[1]

# 100 samples / shard 32 -> 4 shards (32, 32, 32, 4)
BASE = dict(num_samples=100, shard_size=32, seed=0, image_size=32, noise=0.0, eval_per_class=2)


def _gen(path, **overrides):
    kwargs = dict(BASE, **overrides)
    return syn.generate(path, progress=False, **kwargs)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_a")
    manifest = _gen(root)
    return root, manifest


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, preserving member order."""
    samples: dict[str, dict[str, bytes]] = collections.OrderedDict()
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            assert m.isfile()
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def _read_dir(d: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for tar in sorted(d.glob("*.tar")):
        out.update(_read_tar(tar))
    return out


def _mentions(text: str, synonyms) -> bool:
    text = text.lower()
    return any(w in text for w in synonyms)


def _shape_words(shape):
    return [w for pair in syn.SHAPE_SYNONYMS[shape] for w in pair]


# --------------------------------------------------------------------------- determinism


def test_same_seed_byte_identical(ds, tmp_path):
    root, _ = ds
    _gen(tmp_path / "b")
    a, b = _hashes(root), _hashes(tmp_path / "b")
    assert a.keys() == b.keys()
    assert "manifest.json" in a and "train/00000.tar" in a
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, f"files differ between two runs with the same seed: {diff}"


def test_different_seed_differs(ds, tmp_path):
    root, _ = ds
    _gen(tmp_path / "c", seed=1)
    a, c = _hashes(root), _hashes(tmp_path / "c")
    for name in ("train/00000.tar", "eval/shape/00000.tar", "eval/shape_color/00000.tar"):
        assert a[name] != c[name]


def test_sharding_does_not_change_content(tmp_path):
    m1 = _gen(tmp_path / "s7", num_samples=20, shard_size=7, eval_per_class=1)
    m2 = _gen(tmp_path / "s32", num_samples=20, shard_size=32, eval_per_class=1)
    assert m1["counts"]["train_shards"] == 3 and m2["counts"]["train_shards"] == 1
    assert _read_dir(tmp_path / "s7" / "train") == _read_dir(tmp_path / "s32" / "train")
    assert _read_dir(tmp_path / "s7" / "eval" / "color") == _read_dir(tmp_path / "s32" / "eval" / "color")


def test_tar_members_have_fixed_metadata(ds):
    root, _ = ds
    with tarfile.open(root / "train" / "00000.tar") as tf:
        infos = tf.getmembers()
    assert {(i.mtime, i.uid, i.gid, i.uname, i.mode) for i in infos} == {
        (syn.TAR_MTIME, 0, 0, "root", 0o644)
    }


# --------------------------------------------------------------------------- layout


def test_shard_naming_and_sizes(ds):
    root, manifest = ds
    shards = sorted(p.name for p in (root / "train").glob("*.tar"))
    assert shards == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    sizes = json.loads((root / "train" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 32, "00001.tar": 32, "00002.tar": 32, "00003.tar": 4}
    for name, n in sizes.items():
        assert len(_read_tar(root / "train" / name)) == n
    assert manifest["counts"]["train"] == 100
    assert manifest["counts"]["train_shards"] == 4
    assert manifest["train"]["shards"] == shards
    assert manifest["train"]["pattern"] == "train/{00000..00003}.tar"
    assert manifest["tasks"] == list(syn.TASKS) == ["shape", "color", "shape_color"]
    assert manifest["version"] == syn.GENERATOR_VERSION
    assert manifest["args"] == dict(BASE, captions="rich")
    assert json.loads((root / "manifest.json").read_text()) == manifest


def test_training_samples(ds):
    root, _ = ds
    samples = _read_dir(root / "train")
    assert len(samples) == 100
    jpg_hashes = set()
    for key, parts in samples.items():
        assert key.startswith("train_")
        assert set(parts) == {"jpg", "txt", "json"}
        img = Image.open(io.BytesIO(parts["jpg"]))
        img.load()
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
        jpg_hashes.add(hashlib.sha256(parts["jpg"]).hexdigest())
        caption = parts["txt"].decode("utf-8")
        assert caption.strip() == caption and caption
        meta = json.loads(parts["json"])
        assert meta["key"] == key
        assert meta["caption"] == caption
        assert meta["caption_noised"] is False and meta["noise_ops"] == []
        assert 1 <= len(meta["objects"]) <= 3
        for o in meta["objects"]:
            assert o["shape"] in syn.SHAPES
            assert o["color"] in syn.COLORS
            assert o["size"] in syn.SIZES
            assert o["position"] in syn.POSITIONS
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    assert len(jpg_hashes) == len(samples), "two training images are identical"
    counts = collections.Counter(len(json.loads(p["json"])["objects"]) for p in samples.values())
    assert set(counts) == {1, 2, 3}


def test_clean_captions_mention_shapes_and_colors(ds):
    root, _ = ds
    captions, objects, coloured = [], 0, 0
    for parts in _read_dir(root / "train").values():
        caption = parts["txt"].decode()
        captions.append(caption)
        for o in json.loads(parts["json"])["objects"]:
            assert _mentions(caption, _shape_words(o["shape"])), (caption, o)
            objects += 1
            coloured += _mentions(caption, syn.COLOR_SYNONYMS[o["color"]])
    # the colour is named unless the caption leaves it out (P_COLOR_OMITTED per object group)
    assert 0.3 < coloured / objects < 0.75
    # varied wording
    assert len(set(captions)) >= 95
    starts = collections.Counter(c.split()[0].lower() for c in captions)
    assert len(starts) >= 5


def test_plain_captions(ds, tmp_path):
    """captions=plain: the same images, captions of canonical shape words with a count and sometimes
    the colour, and no size, position, background or synonym."""
    root, _ = ds
    manifest = _gen(tmp_path / "p", captions="plain")
    assert manifest["args"]["captions"] == "plain"
    rich, plain = _read_dir(root / "train"), _read_dir(tmp_path / "p" / "train")
    assert rich.keys() == plain.keys()
    extra = {w for ws in syn.SIZE_SYNONYMS.values() for w in ws} | {"left", "right", "top", "bottom", "center",
                                                                  "middle", "background", "picture", "photo"}
    extra |= {w for s in syn.SHAPE_SYNONYMS.values() for pair in s[1:] for w in pair}  # no synonyms
    colours, objects = 0, 0
    for key, parts in plain.items():
        assert parts["jpg"] == rich[key]["jpg"]  # the image does not depend on the caption style
        caption = parts["txt"].decode()
        meta = json.loads(parts["json"])
        assert meta["caption"] == caption
        words = set(caption.lower().rstrip(".").split())
        assert not words & extra, caption
        assert words <= ({"a", "an", "and", "two", "three"} | set(syn.COLORS)
                         | {w for s in syn.SHAPES for w in syn.SHAPE_SYNONYMS[s][0]}), caption
        for o in meta["objects"]:
            assert syn.SHAPE_SYNONYMS[o["shape"]][0][0] in caption.lower(), (caption, o)
            objects += 1
            colours += o["color"] in words
    assert 0.1 < colours / objects < 0.45  # 1 - P_COLOR_OMITTED_PLAIN = 0.25 per object group
    assert _hashes(tmp_path / "p") == _hashes(_gen(tmp_path / "p2", captions="plain") and tmp_path / "p2")
    with pytest.raises(ValueError, match="--captions"):
        _gen(tmp_path / "x", captions="fancy")


def test_noisy_captions(tmp_path):
    _gen(tmp_path / "n", num_samples=60, noise=1.0, image_size=16, eval_per_class=1)
    ops = collections.Counter()
    held = {tuple(p) for p in syn.held_out_pairs(0)}
    for parts in _read_dir(tmp_path / "n" / "train").values():
        meta = json.loads(parts["json"])
        assert parts["txt"].decode().strip()
        assert meta["caption_noised"] is True and meta["noise_ops"]
        ops.update(op.split("_")[0] for op in meta["noise_ops"])
        assert not {(o["shape"], o["color"]) for o in meta["objects"]} & held
    assert set(ops) == {"drop", "swap", "filler", "truncate"}


def test_held_out_pairs(ds):
    root, manifest = ds
    pairs = [tuple(p) for p in manifest["held_out_pairs"]]
    assert pairs == syn.held_out_pairs(0)
    assert len(pairs) == syn.NUM_HELD_OUT == 8
    assert sorted(s for s, _ in pairs) == sorted(syn.SHAPES)
    assert sorted(c for _, c in pairs) == sorted(syn.COLORS)
    assert manifest["held_out_classnames"] == [f"{c} {s}" for s, c in pairs]
    seen = set()
    for parts in _read_dir(root / "train").values():
        for o in json.loads(parts["json"])["objects"]:
            seen.add((o["shape"], o["color"]))
    assert not seen & set(pairs)
    assert any(syn.held_out_pairs(s) != pairs for s in (1, 2, 3))


def test_eval_splits(ds):
    root, manifest = ds
    expected_classes = {"shape": 8, "color": 8, "shape_color": 64}
    all_keys = set(_read_dir(root / "train"))
    for task in syn.TASKS:
        d = root / "eval" / task
        names = (d / "classnames.txt").read_text().splitlines()
        assert len(names) == expected_classes[task] == len(set(names))
        assert names == syn.classnames(task) == manifest["eval"][task]["classnames"]
        tmpl = (d / "templates.txt").read_text().splitlines()
        assert tmpl and all("{}" in t for t in tmpl)
        sizes = json.loads((d / "sizes.json").read_text())
        samples = _read_dir(d)
        assert sum(sizes.values()) == len(samples) == 2 * len(names)
        assert manifest["counts"]["eval"][task] == len(samples)
        for name, n in sizes.items():
            assert len(_read_tar(d / name)) == n
        labels = collections.Counter()
        for key, parts in samples.items():
            assert key.startswith(f"eval_{task}_") and key not in all_keys
            all_keys.add(key)
            assert set(parts) == {"jpg", "cls", "json"}
            label = int(parts["cls"].decode())
            assert 0 <= label < len(names)
            labels[label] += 1
            meta = json.loads(parts["json"])
            assert meta["label"] == label and meta["classname"] == names[label]
            assert len(meta["objects"]) == 1
            o = meta["objects"][0]
            assert names[label] == {"shape": o["shape"], "color": o["color"],
                                    "shape_color": f"{o['color']} {o['shape']}"}[task]
            assert Image.open(io.BytesIO(parts["jpg"])).size == (32, 32)
        assert labels == {i: 2 for i in range(len(names))}


def test_regenerating_smaller_removes_stale_shards(tmp_path):
    _gen(tmp_path, num_samples=40, shard_size=10, eval_per_class=1)
    assert len(list((tmp_path / "train").glob("*.tar"))) == 4
    _gen(tmp_path, num_samples=15, shard_size=10, eval_per_class=1)
    assert sorted(p.name for p in (tmp_path / "train").glob("*")) == ["00000.tar", "00001.tar", "sizes.json"]


def test_image_size_64(tmp_path):
    _gen(tmp_path, num_samples=4, image_size=64, eval_per_class=1)
    for parts in _read_dir(tmp_path / "train").values():
        assert Image.open(io.BytesIO(parts["jpg"])).size == (64, 64)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "override, flag",
    [
        ({"num_samples": 0}, "--num-samples"),
        ({"num_samples": -5}, "--num-samples"),
        ({"shard_size": 0}, "--shard-size"),
        ({"shard_size": -1}, "--shard-size"),
        ({"image_size": 8}, "--image-size"),
        ({"noise": -0.1}, "--noise"),
        ({"noise": 1.5}, "--noise"),
        ({"noise": math.nan}, "--noise"),
        ({"eval_per_class": 0}, "--eval-per-class"),
        ({"seed": -1}, "--seed"),
        ({"num_samples": 2.5}, "--num-samples"),
    ],
)
def test_bad_arguments(tmp_path, override, flag):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=flag) as exc:
        _gen(out, **override)
    assert "pass e.g." in str(exc.value)
    assert not out.exists()
    with pytest.raises(ValueError, match=flag):
        syn.ensure_dataset(out, progress=False, **dict(BASE, **override))


# --------------------------------------------------------------------------- CLI


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "declip_ds.data.synthetic", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_cli(tmp_path):
    out = tmp_path / "cli"
    r = _cli("--out", str(out), "--num-samples", "10", "--shard-size", "4", "--seed", "3",
             "--image-size", "16", "--noise", "0.2", "--eval-per-class", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["args"] == dict(num_samples=10, shard_size=4, seed=3, image_size=16,
                                    noise=0.2, eval_per_class=1, captions="rich")
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    # the CLI and the API produce the same bytes
    api = tmp_path / "api"
    syn.generate(api, 10, 4, 3, image_size=16, noise=0.2, eval_per_class=1, progress=False)
    assert _hashes(out) == _hashes(api)


def test_cli_bad_argument(tmp_path):
    r = _cli("--out", str(tmp_path / "x"), "--num-samples", "0", "--quiet")
    assert r.returncode != 0
    assert "--num-samples" in r.stderr and "pass e.g." in r.stderr
    r = _cli("--out", str(tmp_path / "x"), "--noise", "2", "--quiet")
    assert r.returncode != 0 and "--noise" in r.stderr
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- ensure_dataset


def test_ensure_dataset(tmp_path, monkeypatch):
    kwargs = dict(BASE, num_samples=12, shard_size=5, eval_per_class=1)
    root = syn.ensure_dataset(tmp_path / "e", progress=False, **kwargs)
    assert root == tmp_path / "e"
    files = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise AssertionError("ensure_dataset regenerated a matching dataset")

    monkeypatch.setattr(syn, "generate", boom)
    assert syn.ensure_dataset(root, progress=False, **kwargs) == root
    assert syn.ensure_dataset(str(root), progress=True, **kwargs) == root  # progress is not an arg of the data
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == files

    # different arguments -> regenerate
    calls = []
    monkeypatch.setattr(syn, "generate", lambda *a, **k: calls.append(k))
    syn.ensure_dataset(root, progress=False, **dict(kwargs, seed=5))
    assert calls and calls[0]["seed"] == 5
    calls.clear()
    syn.ensure_dataset(root, progress=False, **dict(kwargs, captions="plain"))
    assert calls and calls[0]["captions"] == "plain"
    monkeypatch.undo()

    # a missing shard -> regenerate for real
    (root / "train" / "00001.tar").unlink()
    syn.ensure_dataset(root, progress=False, **kwargs)
    assert (root / "train" / "00001.tar").is_file()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["args"] == dict(kwargs, captions="rich")

    # a dataset made before the caption option existed (no "captions" in its manifest) is rich: kept
    del manifest["args"]["captions"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(syn, "generate", boom)
    assert syn.ensure_dataset(root, progress=False, **kwargs) == root
