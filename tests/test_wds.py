"""Webdataset loader: url expansion, epoch/resampled modes, skips, strict mode, eval split.

Shards are written to tmp_path: 16-px JPEGs + captions with unique keys. Most tests use
workers=0; workers=2 only where the worker split itself is under test.
"""

import io
import itertools
import json
import logging
import os
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from declip_ds.data import wds
from declip_ds.data.transforms import SampleTransform, clip_train_transform, eval_transform

SIZE = 8


def _jpeg(i, size=16):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (i * 37 % 256, i * 11 % 256, 90)).save(buf, "JPEG")
    return buf.getvalue()


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _sample(key, i, label=None):
    out = [(f"{key}.jpg", _jpeg(i)), (f"{key}.txt", f"caption of {key}".encode())]
    if label is not None:
        out.append((f"{key}.cls", str(label).encode()))
    return out


def make_shards(root, n_shards=6, per_shard=8, extra=None):
    """``{00000..}.tar`` + sizes.json; per_shard: a count or one per shard; extra: shard index -> list of
    members appended."""
    root.mkdir(parents=True, exist_ok=True)
    keys, sizes = [], {}
    counts = list(per_shard) if isinstance(per_shard, (list, tuple)) else [per_shard] * n_shards
    for s in range(n_shards):
        members = []
        for j in range(counts[s]):
            key = f"s{s}k{j}"
            keys.append(key)
            members += _sample(key, sum(counts[:s]) + j)
        members += (extra or {}).get(s, [])
        _write_tar(root / f"{s:05d}.tar", members)
        sizes[f"{s:05d}.tar"] = counts[s]
    (root / "sizes.json").write_text(json.dumps(sizes))
    return f"{root}/{{00000..{n_shards - 1:05d}}}.tar", keys


def _transform():
    return SampleTransform({"image": clip_train_transform(SIZE)})


def _loader(spec, **kw):
    args = dict(rank=0, world_size=1, seed=0, workers=0, shuffle_buffer=16)
    args.update(kw)
    batch_size = args.pop("batch_size", 4)
    return wds.build_train_loader(spec, _transform(), batch_size, **args)


def _run(loader, max_batches=None):
    keys, totals, shapes = [], dict.fromkeys(wds.SKIP_KINDS, 0), set()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        keys += batch["__key__"]
        shapes.add(tuple(batch["image"].shape[1:]))
        for kind, n in batch["_skips"].items():
            totals[kind] += n
    return keys, totals, shapes


# ----------------------------------------------------------------------------- urls and sizes


def test_expand_urls_braces_sources_and_errors(tmp_path):
    a, _ = make_shards(tmp_path / "a", n_shards=3, per_shard=1)
    b, _ = make_shards(tmp_path / "b", n_shards=2, per_shard=1)
    expanded = wds.expand_urls(f"{a}::{b}")
    assert [len(s) for s in expanded] == [3, 2]
    assert expanded[0][0].endswith("a/00000.tar") and expanded[1][1].endswith("b/00001.tar")
    assert wds.expand_urls([a, b]) == expanded
    assert wds.expand_urls(f"{tmp_path}/a/*.tar") == expanded[:1]
    assert wds.expand_urls("pipe:curl -s http://x/{000..002}.tar") == [
        [f"pipe:curl -s http://x/{i:03d}.tar" for i in range(3)]]
    bad = f"{tmp_path}/nope/{{00000..00001}}.tar"
    with pytest.raises(FileNotFoundError) as e:
        wds.expand_urls(f"{a}::{bad}")
    assert bad in str(e.value) and "nope/00000.tar" in str(e.value) and "data.train_shards" in str(e.value)
    # a shard listed twice would be read twice as often: overlapping ranges, the same file under another path
    overlap = f"{tmp_path}/a/{{00001..00002}}.tar"
    (tmp_path / "also_a").symlink_to(tmp_path / "a")
    for spec in (f"{a}::{overlap}", [a, f"{tmp_path}/also_a/00000.tar"], f"{tmp_path}/a/{{00000..00002}}.tar::{a}"):
        with pytest.raises(wds.DataError, match=r"listed more than once .*00000?[012]\.tar.*data\.train_weights"):
            wds.expand_urls(spec)
    with pytest.raises(wds.DataError, match="Empty shard source"):
        wds.expand_urls(f"{a}::")
    # a file: URL names the file webdataset's gopen reads: "%20" is a space, "#..." is not part of the name
    (tmp_path / "c d").mkdir()
    (tmp_path / "c d" / "00000.tar").write_bytes((tmp_path / "a" / "00000.tar").read_bytes())
    (tmp_path / "h#1.tar").write_bytes((tmp_path / "a" / "00000.tar").read_bytes())
    assert wds.expand_urls(f"file://{tmp_path}/c%20d/00000.tar") == [[f"file://{tmp_path}/c%20d/00000.tar"]]
    with pytest.raises(FileNotFoundError, match="matches no existing file"):
        wds.expand_urls(f"file://{tmp_path}/h#1.tar")
    with pytest.raises(wds.DataError, match="listed more than once"):
        wds.expand_urls([f"{tmp_path}/c d/00000.tar", f"file://{tmp_path}/c%20d/00000.tar"])


def test_read_num_samples(tmp_path):
    a, _ = make_shards(tmp_path / "a", n_shards=3, per_shard=5)
    b, _ = make_shards(tmp_path / "b", n_shards=2, per_shard=4)
    assert wds.read_num_samples(f"{a}::{b}") == 23
    assert wds.read_num_samples(wds.expand_urls(a)) == 15
    (tmp_path / "b" / "sizes.json").write_text(json.dumps({"00000.tar": 4}))
    with pytest.raises(wds.DataError, match="00001.tar.*data.num_samples"):
        wds.read_num_samples(b)
    (tmp_path / "b" / "sizes.json").unlink()
    with pytest.raises(ValueError, match="data.num_samples.*sizes.json"):
        wds.read_num_samples(b)


def test_worker_seed_is_pure_and_distinct():
    assert wds.worker_seed(1, 2, 3, 4) == wds.worker_seed(1, 2, 3, 4)
    seeds = {wds.worker_seed(0, r, w, e) for r in range(3) for w in range(3) for e in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)


# ----------------------------------------------------------------------------- epoch mode


def test_epoch_mode_two_ranks_two_workers_sees_every_sample_once(tmp_path):
    spec, keys = make_shards(tmp_path, n_shards=6, per_shard=8)
    seen = []
    for rank in range(2):
        loader = _loader(spec, rank=rank, world_size=2, workers=2, mode="epoch", batch_size=3)
        ds = loader.dataset
        assignment = {w: set(ds._epoch_urls(w, 2)) for w in range(2)}
        for batch in loader:
            urls = set(batch["__url__"])
            assert any(urls <= shards for shards in assignment.values()), "a batch crossed workers"
            assert batch["image"].shape[1:] == (3, SIZE, SIZE)
            seen += batch["__key__"]
    assert sorted(seen) == sorted(keys) and len(seen) == len(set(seen))


def test_epoch_mode_reshuffles_per_epoch_and_drop_last(tmp_path):
    spec, keys = make_shards(tmp_path, n_shards=4, per_shard=8)
    e0, _, _ = _run(_loader(spec, mode="epoch", epoch=0))
    e1, _, _ = _run(_loader(spec, mode="epoch", epoch=1))
    assert sorted(e0) == sorted(e1) == sorted(keys) and e0 != e1
    assert e0 == _run(_loader(spec, mode="epoch", epoch=0))[0]
    kept = [len(b["__key__"]) for b in _loader(spec, mode="epoch", batch_size=5, drop_last=True)]
    assert kept == [5] * 6
    assert sum(len(b["__key__"]) for b in _loader(spec, mode="epoch", batch_size=5)) == 32


def test_check_epoch_shards_fails_before_training(tmp_path):
    with pytest.raises(ValueError) as e:
        wds.check_epoch_shards(3, world_size=2, workers=2)
    msg = str(e.value)
    assert "3 shards" in msg and "2 ranks" in msg and "2 workers" in msg and "resampled" in msg
    wds.check_epoch_shards(4, world_size=2, workers=2)
    spec, _ = make_shards(tmp_path, n_shards=3, per_shard=2)
    with pytest.raises(ValueError, match="3 shards"):
        _loader(spec, mode="epoch", rank=0, world_size=2, workers=2)
    with pytest.raises(ValueError, match="resampled"):
        _loader(f"{spec}::{spec}", mode="epoch", weights=[1, 2])


# ----------------------------------------------------------------------------- resampled mode


def test_resampled_is_deterministic_per_rank_and_epoch(tmp_path):
    spec, _ = make_shards(tmp_path, n_shards=6, per_shard=8)

    def first(k=6, **kw):
        batches = []
        for i, b in enumerate(_loader(spec, **kw)):
            batches.append(b)
            if i + 1 == k:
                return batches

    a, b = first(), first()
    assert [x["__key__"] for x in a] == [x["__key__"] for x in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))  # augmentations too
    keys = [x["__key__"] for x in a]
    assert [x["__key__"] for x in first(rank=1, world_size=2)] != keys
    assert [x["__key__"] for x in first(epoch=1)] != keys
    assert [x["__key__"] for x in first(seed=1)] != keys


def test_resampled_leaves_the_callers_torch_rng_alone(tmp_path):
    spec, _ = make_shards(tmp_path, n_shards=2, per_shard=8)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _run(_loader(spec), max_batches=3)
    assert torch.equal(torch.get_rng_state(), before)


def test_loader_leaves_the_cuda_rng_alone(tmp_path, monkeypatch):
    # workers=0 runs the augmentations in the trainer's process: reseeding CUDA there would
    # change the trainer's dropout / drop_path masks on the GPU
    spec, _ = make_shards(tmp_path, n_shards=2, per_shard=8)
    torch.manual_seed(7)
    calls = []
    for name in ("manual_seed", "manual_seed_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _name=name: calls.append(_name))
    before = torch.get_rng_state()
    _run(_loader(spec, workers=0), max_batches=3)
    assert calls == []
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_resume_with_start_batch(tmp_path, workers):
    spec, _ = make_shards(tmp_path, n_shards=6, per_shard=8)
    loader = _loader(spec, workers=workers, num_samples=48, batch_size=4)
    assert loader.num_batches == 12  # virtual epoch: ceil(48 / (1 * 4 * max(workers, 1))) per worker
    full = list(loader)
    assert sum(len(b["__key__"]) for b in full) == 48
    again = list(_loader(spec, workers=workers, num_samples=48, batch_size=4))
    assert [b["__key__"] for b in again] == [b["__key__"] for b in full]  # not seeded by pid or time
    resumed = list(_loader(spec, workers=workers, num_samples=48, batch_size=4, start_batch=5))
    assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[5:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[5:]))  # same augmentations


def _cursors(batches, counted=True):
    """What the trainer keeps of consumed batches: each stream's last "_cursor" (counted=False: the raw
    sample count alone, as checkpoints before the batch count was kept)."""
    out = {}
    for b in batches:
        stream, end, made = b["_cursor"]
        out[stream] = (end, made) if counted else end
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_cursors_skips_consumed_samples_undecoded(tmp_path, workers, monkeypatch):
    # bad samples inside the skipped region (a corrupt JPEG, a missing caption) must not shift the batches
    extra = {s: [(f"bad{s}.jpg", b"not a jpeg"), (f"bad{s}.txt", b"broken")] for s in range(0, 6, 2)}
    extra.update({s: [(f"nocap{s}.jpg", _jpeg(s))] for s in range(1, 6, 2)})
    spec, _ = make_shards(tmp_path, n_shards=6, per_shard=8, extra=extra)
    kw = dict(workers=workers, num_samples=64, batch_size=4)
    full = list(_loader(spec, **kw))
    assert _skip_totals(full)["decode_error"] >= 1 and _skip_totals(full)["missing_text"] >= 1
    for start in ((1, 5, 9) if workers == 0 else (3, 6)):
        resumed = list(_loader(spec, start_batch=start, cursors=_cursors(full[:start], counted=start != 5), **kw))
        assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[start:]], f"start_batch={start}"
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[start:]))  # same views
        assert [b["_skips"] for b in resumed] == [b["_skips"] for b in full[start:]]
        assert [b["_cursor"] for b in resumed] == [b["_cursor"] for b in full[start:]]
    if workers == 0:  # nothing of the consumed batches is decoded again
        decoded = []
        real = wds.decode_image
        monkeypatch.setattr(wds, "decode_image", lambda data, *a: decoded.append(data) or real(data, *a))
        start = 9
        resumed = list(_loader(spec, start_batch=start, cursors=_cursors(full[:start]), **kw))
        n_after = sum(len(b["__key__"]) for b in full[start:])
        assert len([d for d in decoded if d != b"not a jpeg"]) == n_after  # (+ the corrupt ones among them)
        decoded.clear()
        list(_loader(spec, start_batch=start, **kw))  # without cursors: the consumed batches are replayed
        assert len(decoded) >= sum(len(b["__key__"]) for b in full)
    # resumes in the last round of the virtual epoch, and at its very end: each stream stops at its share
    # (a stream fast-forwarded to its last batch used to make one more)
    for start in range(len(full) - max(workers, 1), len(full) + 1):
        resumed = list(_loader(spec, start_batch=start, cursors=_cursors(full[:start]), **kw))
        assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[start:]], f"start_batch={start}"
        assert [b["_cursor"] for b in resumed] == [b["_cursor"] for b in full[start:]]
    with pytest.raises(ValueError, match="cursors and last_stream need start_batch"):
        _loader(spec, cursors={0: 4}, **kw)
    with pytest.raises(ValueError, match="not from the same checkpoint"):
        _loader(spec, start_batch=4, cursors={0: (40, 3)}, **kw)
    with pytest.raises(ValueError, match="data.workers"):
        _loader(spec, start_batch=4, cursors={5: (40, 4)}, **kw)


@pytest.mark.parametrize("workers", [0, 3])
def test_epoch_mode_resumes_at_the_exact_batch(tmp_path, workers):
    """Epoch mode's streams end at different batches (uneven shards, bad samples); the DataLoader then
    asks the streams still running in turn. A resume from the trainer's cursors (each stream's last
    "_cursor") and the last consumed batch's stream gives the rest of the epoch batch for batch, views,
    skip reports and cursors included, before and after a stream has run dry."""
    extra = {0: [("bad0.jpg", b"not a jpeg"), ("bad0.txt", b"x")], 2: [("nocap2.jpg", _jpeg(2))]}
    spec, keys = make_shards(tmp_path, n_shards=5, per_shard=[3, 6, 13, 10, 20], extra=extra)
    kw = dict(mode="epoch", workers=workers, batch_size=3, drop_last=True)
    full = list(_loader(spec, **kw))
    made = {}
    for b in full:
        made[b["_cursor"][0]] = b["_cursor"][2]
    assert sum(made.values()) == len(full) and len(set(sum((b["__key__"] for b in full), []))) == 3 * len(full)
    if workers:
        streams = [b["_cursor"][0] for b in full]
        assert sorted(made.values())[0] < sorted(made.values())[-1] - 1  # one stream ran dry well before the other
        dry = next(i for i in range(len(full)) if streams[i:] == [streams[-1]] * (len(full) - i))
        starts = sorted({1, 2, dry - 1, dry, dry + 1, len(full) - 1})
    else:
        starts = (1, len(full) // 2, len(full) - 1)
    for start in starts:
        resumed = list(_loader(spec, start_batch=start, cursors=_cursors(full[:start]),
                               last_stream=full[start - 1]["_cursor"][0], **kw))
        assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[start:]], f"start_batch={start}"
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[start:]))
        assert [b["_skips"] for b in resumed] == [b["_skips"] for b in full[start:]]
        assert [b["_cursor"] for b in resumed] == [b["_cursor"] for b in full[start:]]
    with pytest.raises(ValueError, match="counted cursors"):
        _loader(spec, start_batch=2, cursors=_cursors(full[:2], counted=False), last_stream=0, **kw)
    with pytest.raises(ValueError, match="counted cursors"):
        _loader(spec, start_batch=2, cursors=_cursors(full[:2]), **kw)


def _skip_totals(batches):
    totals = dict.fromkeys(wds.SKIP_KINDS, 0)
    for batch in batches:
        for kind, n in batch["_skips"].items():
            totals[kind] += n
    return totals


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reports_each_skip_once(tmp_path, workers):
    # an image without caption in every shard: skips land between batches, including the
    # ones between the last batch consumed before the resume and the first one after it
    extra = {s: [(f"bad{s}.jpg", _jpeg(s))] for s in range(6)}
    spec, _ = make_shards(tmp_path, n_shards=6, per_shard=8, extra=extra)
    kw = dict(workers=workers, num_samples=48, batch_size=4, shuffle_buffer=1)
    full = list(_loader(spec, **kw))
    assert _skip_totals(full)["missing_text"] >= 3
    for start in ((2, 4, 6, 9) if workers == 0 else (4, 5)):
        resumed = list(_loader(spec, start_batch=start, **kw))
        assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[start:]]
        assert _skip_totals(full[:start] + resumed) == _skip_totals(full), f"start_batch={start}"
        assert [b["_skips"] for b in resumed] == [b["_skips"] for b in full[start:]]


@pytest.mark.parametrize("n, drop_last", [(10, False), (10, True), (12, False)])
def test_batches_discard_reports_each_skip_once(n, drop_last):
    def stream(skips):  # a skip before every third item and one after the last
        for i in range(n):
            if i % 3 == 0:
                skips("decode_error", "u.tar", str(i))
            yield wds._Raw(str(i), "u.tar", b"", "jpg", b""), {"x": torch.tensor(i)}, i
        skips("decode_error", "u.tar", "end")

    def batches(discard, start=0):
        skips = wds._Skips(strict=False, where="test")
        items = itertools.islice(stream(skips), start, None)  # a fast-forward skips items, not batches
        return list(wds._batches(items, 4, skips, drop_last, None, discard, made=discard if start else 0))

    full = batches(0)
    assert _skip_totals(full)["decode_error"] == len(range(0, n, 3)) + 1
    assert [b["_last"] for b in full] == [3, 7, 11][: n // 4] + ([n - 1] if n % 4 and not drop_last else [])
    for discard in range(1, len(full) + 2):
        resumed = batches(discard)
        assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[discard:]]
        assert _skip_totals(full[:discard] + resumed) == _skip_totals(full), f"discard={discard}"
        if discard <= len(full):  # the same after skipping the items of the discarded batches
            forwarded = batches(discard, start=full[discard - 1]["_last"] + 1)
            assert [b["__key__"] for b in forwarded] == [b["__key__"] for b in full[discard:]]
            assert [b["_skips"] for b in forwarded] == [b["_skips"] for b in resumed]


def _tar_bytes(members, fmt=tarfile.GNU_FORMAT):
    """An uncompressed tar of (name, bytes | "dir" | ("symlink", target)) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _odd_members():
    """Everything the filters and the grouping see: bad samples of each kind, webdataset's meta entries,
    a directory, a symlink, a name without extension, upper-case and multi-part extensions, keys with
    folders, a long (GNU longname) key, a repeated extension that starts a new sample."""
    out = _sample("a", 1) + [("b.txt", b"no image")] + [("c.jpg", _jpeg(3))]  # missing_image, missing_text
    out += [("d.jpg", b""), ("d.txt", b"empty image")] + [("e.jpg", _jpeg(5)), ("e.txt", " \u3000".encode())]
    out += [("__meta__", b"{}"), ("__index__/x.jpg", _jpeg(6)), ("dir", "dir"), ("link.jpg", ("symlink", "a.jpg"))]
    out += [("README", b"x")] + [("F.JPG", _jpeg(7)), ("F.TXT", b"upper")] + [("g.seg.png", _jpeg(8)), ("g.seg.txt", b"multi")]
    out += [("sub/h.jpg", _jpeg(9)), ("sub/h.txt", b"folder"), ("sub/h.json", b"{}")]
    out += [("k" * 150 + ".jpg", _jpeg(10)), ("k" * 150 + ".txt", b"long")]
    out += [("r.jpg", _jpeg(11)), ("r.txt", b"first"), ("r.txt", b"second")]  # ext repeated: a new group
    out += _sample("a", 12)  # duplicate_key (not adjacent)
    return out


def _shard_variants(tmp_path):
    """(url, whether the header scan takes it) for files and urls of every kind: the scan must read what it
    takes exactly as the streaming reader does, and leave it everything else."""
    import gzip
    import shutil
    import subprocess

    clean = _tar_bytes(sum((_sample(f"k{i}", i) for i in range(5)), []))
    second = _tar_bytes(sum((_sample(f"m{i}", i) for i in range(2)), []))

    def at(data, name):  # the offset of a member's header block
        return data.index(name.encode()) // 512 * 512

    def with_header(data, name, **fields):  # rewrite header fields, checksum fixed
        data, h = bytearray(data), at(data, name)
        for (start, end), value in fields.values():
            data[h + start:h + end] = value
        data[h + 148:h + 156] = b" " * 8
        data[h + 148:h + 156] = b"%06o\0 " % sum(data[h:h + 512])
        return bytes(data)

    damaged = bytearray(clean)
    damaged[at(clean, "k2.jpg") + 148:at(clean, "k2.jpg") + 156] = b"garbage!"  # a bad checksum mid-file
    zeroed = bytearray(clean)
    zeroed[at(clean, "k2.jpg"):at(clean, "k2.jpg") + 512] = bytes(512)  # a header zeroed: the archive "ends" there
    end = (clean.index(b"caption of k4") // 512 + 1) * 512  # just past the last member's data
    files = {
        "clean": (clean, True), "odd": (_tar_bytes(_odd_members()), True), "empty_tar": (_tar_bytes([]), True),
        "pax": (_tar_bytes(_odd_members(), tarfile.PAX_FORMAT), True),
        "one_end_block": (clean[:end + 512], True), "zero_padding": (clean + bytes(4096), True),
        "gzip": (gzip.compress(clean), False), "cut_in_member": (clean[: at(clean, "k2.jpg") + 700], False),
        "cut_at_boundary": (clean[:at(clean, "k2.jpg")], False), "no_end_block": (clean[:end], False),
        "damaged_header": (bytes(damaged), False), "zeroed_header": (bytes(zeroed), False),
        "trailing_garbage": (clean + b"\x01" * 512, False), "concatenated": (clean + second, False),
        "garbage_then_zeros": (clean[:end + 512] + b"\x01" * 512 + bytes(512), False),
        "negative_size": (with_header(clean, "k1.jpg", size=((124, 136), b"\xff" * 8 + (-512 & 0xFFFFFFFF)
                                                             .to_bytes(4, "big"))), False),
        "xz_like_name": (_tar_bytes([("\udcfd7zXZ.jpg", _jpeg(1)), ("\udcfd7zXZ.txt", b"c")] + _sample("a", 2)), False),
        "not_a_tar": (bytes(range(256)) * 8, False),
    }
    urls = []
    for name, (data, scanned) in files.items():
        (tmp_path / f"{name}.tar").write_bytes(data)
        urls += [(str(tmp_path / f"{name}.tar"), scanned), (f"file://{tmp_path}/{name}.tar", scanned)]
    urls.append((str(tmp_path / "missing.tar"), False))
    # file: URLs mean what gopen (urlparse, url2pathname) makes of them: "%20" a space, "#..." and "?..." cut
    # off, "file://name" a host; plain paths are taken as they are
    for name, scanned in (("pct%20name", True), ("hash#1", False), ("q?x", False), ("colon:0", True)):
        (tmp_path / f"{name}.tar").write_bytes(clean)
        urls.append((f"file://{tmp_path}/{name}.tar", scanned))
    (tmp_path / "pct name.tar").write_bytes(second)  # what file://.../pct%20name.tar opens
    urls += [(f"{tmp_path}/colon:0.tar", True), (f"{tmp_path}/hash#1.tar", True), ("file://clean.tar", False)]
    tar = shutil.which("tar")
    if tar and "GNU" in subprocess.run([tar, "--version"], capture_output=True, text=True).stdout:
        src = tmp_path / "sparse"
        src.mkdir()
        with open(src / "s.jpg", "wb") as f:  # data, a 64 KiB hole, data: stored as a sparse member
            f.write(_jpeg(1))
            f.seek(70000)
            f.write(b"\xff\xd9" * 2048)
        (src / "s.txt").write_bytes(b"sparse")
        (src / "t.jpg").write_bytes(bytes(range(256)) * 800)  # a later member: the file is long enough
        (src / "t.txt").write_bytes(b"after")
        for fmt in ("gnu", "posix"):
            subprocess.run([tar, "--sparse", f"--format={fmt}", "-cf", str(tmp_path / f"sparse_{fmt}.tar"), "-C",
                            str(src), "s.jpg", "s.txt", "t.jpg", "t.txt"], check=True)
            urls.append((str(tmp_path / f"sparse_{fmt}.tar"), False))
    return urls


def test_header_scan_reads_a_shard_as_the_stream_reader_does(tmp_path, monkeypatch):
    """A resume's fast-forward indexes local shards from their headers; for any file or url -- odd members,
    bad samples, compressed, cut short, damaged, appended to, sparse members, file: URLs that gopen reads
    otherwise, not a tar, missing -- it yields the samples and counts the skips the streaming reader does
    (a plain, intact tar from its headers, its images left in the file; anything else by the streaming
    reader itself)."""
    urls = _shard_variants(tmp_path)
    for url, scanned in urls:
        results = []
        for scan in (False, True):
            skips = wds._Skips(strict=False, where="test")
            raws = list(wds._shard_samples(url, skips, "txt", scan=scan))
            results.append(([(r.key, r.url, wds._member_bytes(r.image), r.image_ext, r.text) for r in raws],
                            skips.summary()))
            if scan:
                assert (wds._indexed_groups(url, "txt") is not None) == scanned, url
                assert all(isinstance(r.image, wds._Span) == scanned for r in raws), url
        assert results[0] == results[1], url
    odd = results_of(str(tmp_path / "odd.tar"))
    assert [k for k, *_ in odd[0]] == ["a", "F", "sub/h", "k" * 150, "r"]  # g's extensions: seg.png, seg.txt
    assert odd[1] == {"missing_image": 2, "missing_text": 1, "empty_member": 2, "duplicate_key": 2}
    assert results_of(str(tmp_path / "cut_in_member.tar"))[1] == {"truncated_shard": 1}
    assert results_of(str(tmp_path / "concatenated.tar"))[1] == {"truncated_shard": 1}
    monkeypatch.setenv("GOPEN_REWRITE", f"{tmp_path}/clean=/elsewhere/clean")  # gopen reads another file
    assert wds._indexed_groups(str(tmp_path / "clean.tar"), "txt") is None
    monkeypatch.delenv("GOPEN_REWRITE")
    clean = tmp_path / "clean.tar"
    span = wds._indexed_groups(str(clean), "txt")[0][1]["jpg"]
    data = bytearray(clean.read_bytes())
    data[span.offset] ^= 0xFF
    clean.write_bytes(bytes(data))  # rewritten under a running job, same size: an error, not wrong bytes
    os.utime(clean, ns=(span.mtime_ns + 10**9, span.mtime_ns + 10**9))
    with pytest.raises(OSError, match="changed since it was indexed"):
        span.read()


def results_of(url):
    skips = wds._Skips(strict=False, where="test")
    return [(r.key,) for r in wds._shard_samples(url, skips, "txt")], skips.summary()


def test_fast_forward_reads_the_headers_not_the_images_of_skipped_samples(tmp_path, monkeypatch):
    """From the checkpoint's cursors a resumed stream passes over the consumed samples by a header scan:
    the same batches as the uninterrupted run (views and skip reports included), with a fraction of the
    bytes a full read of the skipped samples costs (counted by the resume benchmark's counter)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_resume import shard_bytes_read

    rng = torch.Generator().manual_seed(0)

    def big_jpeg(i):  # ~10 KB of noise: the image bytes dominate a sample, as in real shards
        buf = io.BytesIO()
        pixels = torch.randint(0, 256, (64, 64, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(buf, "JPEG", quality=95)
        return buf.getvalue()

    tmp_path.mkdir(exist_ok=True)
    for s in range(6):
        members = []
        for j in range(8):
            members += [(f"s{s}k{j}.jpg", big_jpeg(j)), (f"s{s}k{j}.txt", f"caption {s} {j}".encode())]
        members += [(f"bad{s}.jpg", b"not a jpeg"), (f"bad{s}.txt", b"broken")]
        _write_tar(tmp_path / f"{s:05d}.tar", members)
    spec = f"{tmp_path}/{{00000..00005}}.tar"
    kw = dict(num_samples=96, batch_size=4, shuffle_buffer=8)
    full = list(_loader(spec, **kw))
    start = 16
    read = {}
    for header_scan in (True, False):
        monkeypatch.setattr(wds, "HEADER_SCAN", header_scan)
        first = []
        read[header_scan] = shard_bytes_read(lambda: first.append(next(iter(
            _loader(spec, start_batch=start, cursors=_cursors(full[:start]), **kw)))))
        resumed = list(_loader(spec, start_batch=start, cursors=_cursors(full[:start]), **kw))
        assert first[0]["__key__"] == full[start]["__key__"]
        assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[start:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[start:]))
        assert [b["_skips"] for b in resumed] == [b["_skips"] for b in full[start:]]
    skipped = sum(len(b["__key__"]) for b in full[:start])
    assert skipped == 64 and read[False] > 64 * 8000  # the full read passes over every skipped image
    assert read[True] < read[False] / 3, read
    # only the shards opened while fast-forwarding are scanned; those opened after it are streamed
    opened, real = [], wds._shard_samples
    monkeypatch.setattr(wds, "HEADER_SCAN", True)
    monkeypatch.setattr(wds, "_shard_samples", lambda url, skips, ext, scan=False: opened.append(scan) or
                        real(url, skips, ext, scan))
    list(_loader(spec, start_batch=start, cursors=_cursors(full[:start]), **kw))
    first_streamed = opened.index(False)
    assert first_streamed >= 64 // 9 and not any(opened[first_streamed:]), opened


def test_resampled_source_weights(tmp_path):
    a, _ = make_shards(tmp_path / "a", n_shards=2, per_shard=4)
    b, _ = make_shards(tmp_path / "b", n_shards=2, per_shard=4)
    for weights, source in (([1, 0], "/a/"), ([0, 1], "/b/")):
        urls = [u for batch in _loader(f"{a}::{b}", weights=weights, num_samples=16) for u in batch["__url__"]]
        assert len(urls) == 16 and all(source in u for u in urls)
    with pytest.raises(ValueError, match="2 non-negative weights"):
        _loader(f"{a}::{b}", weights=[1])


def test_resampled_with_no_readable_shard_raises_instead_of_hanging(tmp_path):
    spec, _ = make_shards(tmp_path, n_shards=2, per_shard=1)
    for p in tmp_path.glob("*.tar"):
        p.write_bytes(b"")
    with pytest.raises(wds.DataError, match="No usable sample"):
        _run(_loader(spec), max_batches=1)


# ----------------------------------------------------------------------------- bad data


BAD = {
    "bad_jpeg": [("bad_jpeg.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("bad_jpeg.txt", b"broken")],
    "no_txt": [("no_txt.jpg", _jpeg(1))],
    "zero_byte": [("zero_byte.jpg", b""), ("zero_byte.txt", b"empty image")],
    "duplicate": _sample("s0k3", 99),  # key s0k3 already appeared earlier in shard 0
}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tmp_path, caplog, workers):
    members = [m for sample in BAD.values() for m in sample]
    spec, keys = make_shards(tmp_path, n_shards=3, per_shard=8, extra={0: members})
    caplog.set_level(logging.WARNING, logger="declip_ds.data.wds")
    got, totals, shapes = _run(_loader(spec, mode="epoch", batch_size=5, workers=workers))
    assert sorted(got) == sorted(keys) and shapes == {(3, SIZE, SIZE)}
    assert {k: v for k, v in totals.items() if v} == {
        "decode_error": 1, "missing_text": 1, "empty_member": 1, "duplicate_key": 1}
    assert sum(totals[k] for k in wds.SAMPLE_SKIP_KINDS) == 4
    if workers == 0:  # worker processes log to their own stderr, not to caplog
        assert "00000.tar" in caplog.text and "'no_txt'" in caplog.text and "'bad_jpeg'" in caplog.text


def test_missing_image_and_blank_caption(tmp_path):
    extra = {0: [("txt_only.txt", b"no picture"), ("blank.jpg", _jpeg(3)), ("blank.txt", b"  \n")]}
    spec, keys = make_shards(tmp_path, n_shards=1, per_shard=4, extra=extra)
    got, totals, _ = _run(_loader(spec, mode="epoch"))
    assert sorted(got) == sorted(keys)
    assert totals["missing_image"] == 1 and totals["empty_member"] == 1


def test_caption_of_unicode_whitespace_is_empty(tmp_path):
    # bytes.strip() keeps U+3000 / U+00A0; the caption decoder's str.strip() does not
    extra = {0: [("wide.jpg", _jpeg(2)), ("wide.txt", "\u3000\u00a0\n".encode()),
                 ("latin1.jpg", _jpeg(3)), ("latin1.txt", "caf\u00e9".encode("latin-1"))]}
    spec, keys = make_shards(tmp_path, n_shards=1, per_shard=4, extra=extra)
    got, totals, _ = _run(_loader(spec, mode="epoch"))
    assert sorted(got) == sorted(keys)
    assert {k: v for k, v in totals.items() if v} == {"empty_member": 1, "decode_error": 1}
    with pytest.raises(wds.DataError) as e:
        _run(_loader(spec, mode="epoch", strict=True))
    assert "empty_member" in str(e.value) and "00000.tar" in str(e.value) and "'wide'" in str(e.value)


def _cut_shard(tmp_path, member, offset, extra=None):
    spec, keys = make_shards(tmp_path, n_shards=1, per_shard=8, extra=extra)
    path = tmp_path / "00000.tar"
    with tarfile.open(path) as tar:
        start = tar.getmembers()[member].offset
    path.write_bytes(path.read_bytes()[:start + offset])
    return spec, keys


@pytest.mark.parametrize("member, offset, kept", [
    (10, 700, 5),  # inside the data of s0k5.jpg: s0k4, held for its next member, was whole
    (10, 100, 5),  # inside the header of s0k5.jpg
    (10, 0, 5),  # at the header of s0k5.jpg (a member boundary, no end marker)
    (11, 512 + 5, 5),  # inside s0k5.txt: s0k5 has no caption, it is lost (not missing_text)
    (12, 0, 6),  # at the header of s0k6.jpg: s0k5 was whole
])
def test_truncated_shard_keeps_its_last_whole_sample(tmp_path, caplog, member, offset, kept):
    spec, _ = _cut_shard(tmp_path, member, offset)
    caplog.set_level(logging.WARNING, logger="declip_ds.data.wds")
    got, totals, _ = _run(_loader(spec, mode="epoch", batch_size=1))
    assert sorted(got) == [f"s0k{j}" for j in range(kept)]
    assert {k: v for k, v in totals.items() if v} == {"truncated_shard": 1}
    assert f"read {kept} samples" in caplog.text and "sizes.json: 8" in caplog.text


def test_truncated_shard_keeps_a_sample_cut_in_a_member_it_does_not_need(tmp_path):
    extra = {0: _sample("meta", 50) + [("meta.json", b'{"source": "x"}' * 40)]}
    spec, keys = _cut_shard(tmp_path, 18, 512 + 100, extra=extra)  # inside meta.json (members 16-18)
    got, totals, _ = _run(_loader(spec, mode="epoch", batch_size=1))
    assert sorted(got) == sorted(keys + ["meta"]) and totals["truncated_shard"] == 1


def test_truncated_and_missing_shards_are_counted(tmp_path, caplog):
    spec, keys = make_shards(tmp_path, n_shards=3, per_shard=8)
    data = (tmp_path / "00002.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    urls = wds.expand_urls(spec)[0] + [str(tmp_path / "00009.tar")]  # the last one does not exist
    caplog.set_level(logging.WARNING, logger="declip_ds.data.wds")
    got, totals, _ = _run(_loader([urls], mode="epoch", batch_size=3))
    assert totals["truncated_shard"] == 1 and totals["missing_shard"] == 1
    assert set(keys[:16]) <= set(got) and 16 < len(got) < 24 and len(set(got)) == len(got)
    assert "00002.tar" in caplog.text and "00009.tar" in caplog.text and "sizes.json: 8" in caplog.text


def test_cut_at_member_boundary_is_detected(tmp_path):
    spec, _ = make_shards(tmp_path, n_shards=1, per_shard=8)
    path = tmp_path / "00000.tar"
    with tarfile.open(path) as tar:
        cut = [m.offset for m in tar.getmembers()][7]  # header of s0k3.txt: the file just stops
    path.write_bytes(path.read_bytes()[:cut])
    got, totals, _ = _run(_loader(spec, mode="epoch"))
    assert got and set(got) <= {f"s0k{j}" for j in range(3)}  # s0k3 (image only) is lost, not "missing_text"
    assert totals["truncated_shard"] == 1 and totals["missing_text"] == 0


@pytest.mark.parametrize("case", ["bad_jpeg", "no_txt", "zero_byte", "duplicate", "truncated", "missing"])
def test_strict_mode_raises_naming_shard_and_key(tmp_path, case):
    extra = {0: BAD[case]} if case in BAD else {}
    spec, _ = make_shards(tmp_path, n_shards=1, per_shard=4, extra=extra)
    shard = tmp_path / "00000.tar"
    if case == "truncated":
        shard.write_bytes(shard.read_bytes()[:3000])
    urls = [str(shard)] + ([str(tmp_path / "00007.tar")] if case == "missing" else [])
    with pytest.raises(wds.DataError) as e:
        _run(_loader([urls], mode="epoch", strict=True))
    msg = str(e.value)
    assert ("00007.tar" if case == "missing" else "00000.tar") in msg
    if case in BAD:
        key = "s0k3" if case == "duplicate" else case
        assert repr(key) in msg


def test_draft_decode_keeps_enough_pixels():
    data = _jpeg(5, size=128)
    assert wds.decode_image(data, "jpg").size == (128, 128)
    small = wds.decode_image(data, "jpg", draft_size=30)
    assert small.mode == "RGB" and 30 <= small.size[0] < 128


class _SizeView:
    """An image view that reports the decoded size; its draft_size asks for a 30-px shorter side."""

    draft_size = 30

    def __call__(self, image):
        return torch.tensor(image.size)


@pytest.mark.parametrize("jpeg_draft", [True, False])
def test_training_jpeg_draft_can_be_switched_off(tmp_path, jpeg_draft):
    """data.jpeg_draft: training JPEGs are DCT-downscaled to the views' draft_size, or decoded in full."""
    from declip_ds.data.transforms import SampleTransform

    _write_tar(tmp_path / "00000.tar", [("big.jpg", _jpeg(1, size=256)), ("big.txt", b"a big picture")])
    loader = wds.build_train_loader(str(tmp_path / "00000.tar"), SampleTransform({"size": _SizeView()}), 1,
                                    rank=0, world_size=1, seed=0, workers=0, mode="epoch", jpeg_draft=jpeg_draft)
    size = next(iter(loader))["size"][0].tolist()
    assert size == ([32, 32] if jpeg_draft else [256, 256])
    # the trainer's loader follows data.jpeg_draft
    from declip_ds.config import from_dict
    from declip_ds.registry import get_method
    from declip_ds.train.engine import build_loader

    exp = from_dict({"data": {"jpeg_draft": jpeg_draft, "workers": 0, "num_samples": 1}, "train": {"batch_size": 1}})
    built = build_loader(exp, get_method("clip")(exp), [[str(tmp_path / "00000.tar")]], epoch=0)
    assert (built.dataset.draft_size is not None) == jpeg_draft


def test_training_batches_are_pinned_on_cuda_only(tmp_path, monkeypatch):
    """data.pin_memory (default true): the trainer's loader pins its batches (page-locked, so the copies to the GPU
    overlap compute) where CUDA is, never on a CPU machine (DataLoader would warn) or when switched off."""
    from declip_ds.config import from_dict
    from declip_ds.registry import get_method
    from declip_ds.train import engine

    _write_tar(tmp_path / "00000.tar", [("a.jpg", _jpeg(1)), ("a.txt", b"a picture")])
    seen = []
    real = wds.build_train_loader
    monkeypatch.setattr(wds, "build_train_loader", lambda *a, **k: seen.append(k["pin_memory"]) or real(*a, **k))
    for cuda in (False, True):
        monkeypatch.setattr(engine.torch.cuda, "is_available", lambda: cuda)
        for pin in (True, False):
            exp = from_dict({"data": {"pin_memory": pin, "workers": 0, "num_samples": 1}, "train": {"batch_size": 1}})
            engine.build_loader(exp, get_method("clip")(exp), [[str(tmp_path / "00000.tar")]], epoch=0)
    assert seen == [False, False, True, False]


# ----------------------------------------------------------------------------- eval


def test_eval_images_from_shards_equal_a_full_decode(tmp_path):
    """A large JPEG in an eval shard gives the tensor of a full PIL decode + eval_transform (no DCT draft
    downscale): shards and image folders score the same images the same way, as the reference decodes."""
    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(600, 640, 3, generator=rng) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    _write_tar(tmp_path / "00000.tar", [("big.jpg", buf.getvalue()), ("big.cls", b"0")])
    t = eval_transform(32)
    images, labels, keys = next(iter(wds.build_eval_loader(str(tmp_path / "00000.tar"), t, 4)))
    full = t(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert keys == ["big"] and labels.tolist() == [0] and torch.equal(images[0], full)


def test_eval_loader_splits_uneven_shards_across_ranks(tmp_path):
    root, expected = tmp_path / "eval", {}
    root.mkdir()
    for s, n in enumerate([5, 3, 2]):
        members = []
        for j in range(n):
            key, label = f"e{s}_{j}", (s * 7 + j) % 4
            expected[key] = label
            members += [(f"{key}.jpg", _jpeg(j)), (f"{key}.cls", f"{label}\n".encode())]
        _write_tar(root / f"{s:05d}.tar", members)
    spec = f"{root}/{{00000..00002}}.tar"
    t = eval_transform(SIZE)
    for world in (2, 4):
        seen = {}
        for rank in range(world):
            for images, labels, keys in wds.build_eval_loader(spec, t, 4, rank=rank, world_size=world):
                assert images.shape == (len(keys), 3, SIZE, SIZE) and labels.dtype == torch.long
                for k, lab in zip(keys, labels.tolist()):
                    assert k not in seen
                    seen[k] = lab
        assert seen == expected
    assert list(wds.build_eval_loader(spec, t, 4, rank=3, world_size=4)) == []  # no shards: no batches


def test_skip_logging_is_rate_limited(caplog, monkeypatch):
    monkeypatch.setattr(wds, "_LOG_EVERY", 10)
    caplog.set_level(logging.WARNING, logger="declip_ds.data.wds")
    skips = wds._Skips(strict=False, where="test")
    for i in range(25):
        skips("decode_error", "shard.tar", f"k{i}", "bad")
    assert len(caplog.records) == wds._LOG_FIRST + 2  # first few by key, then a summary per 10
    assert "'k0'" in caplog.text and "'k9'" not in caplog.text and "20 skips so far" in caplog.text
    assert skips.take()["decode_error"] == 25 and skips.take()["decode_error"] == 0


_CRASH_SCRIPT = """
import sys, signal, time
from declip_ds.data import wds
from declip_ds.data.transforms import SampleTransform, clip_train_transform
wds.WORKER_TERM_GRACE_S = {grace}
loader = wds.build_train_loader({spec!r}, SampleTransform({{"image": clip_train_transform(16)}}), 4, rank=0,
                                world_size=1, seed=0, workers=1, shuffle_buffer=4)
it = iter(loader)
next(it)
if {signal_group}:
    import os
    signal.signal(signal.SIGTERM, lambda *a: None)  # the trainer's own handler (engine.StopRequest)
    os.killpg(os.getpgrp(), signal.SIGTERM)  # what SLURM sends: the worker must outlive it
    time.sleep(1)
    next(it)  # the worker still serves batches
    print("worker alive after SIGTERM", flush=True)
    sys.exit(0)
raise RuntimeError("trainer crashed with the loader's iterator alive")
"""


@pytest.mark.parametrize("signal_group", [False, True])
def test_workers_outlive_a_group_sigterm_but_never_hang_the_exit(tmp_path, signal_group):
    """Workers ignore SIGTERM for WORKER_TERM_GRACE_S (a process-group SIGTERM must not kill them before the
    trainer's preemption save), but a SIGTERM from multiprocessing's exit handler (after an uncaught
    exception) still ends them: the process exits instead of joining a worker forever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    spec, _ = make_shards(tmp_path / "shards", n_shards=2)
    script = tmp_path / "crash.py"
    # After a group SIGTERM the worker must still serve the batch read 1 s later: a 2-s grace could end it
    # (SIGALRM) in the middle of writing that batch on a loaded machine, and the reader then waits forever
    # for the rest of the message (seen once in a full run beside another). 8 s keeps the check meaningful
    # (the worker outlives the SIGTERM) without racing it; the crash case keeps 2 s (the exit waits for it).
    grace = 8 if signal_group else 2
    script.write_text(_CRASH_SCRIPT.format(grace=grace, spec=spec, signal_group=signal_group))
    start = time.time()
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    try:
        out = p.communicate(timeout=90)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("the process hung at exit joining a DataLoader worker")
    if signal_group:
        assert p.returncode == 0 and "worker alive after SIGTERM" in out, out[-2000:]
    else:
        assert p.returncode == 1 and "trainer crashed" in out, out[-2000:]
    assert time.time() - start < 60


def test_a_stalled_shard_read_is_a_data_error_after_the_timeout(tmp_path):
    """A source that stops sending (here a pipe: that sleeps; an NFS read that hangs) stops the rank with a
    DataError naming data.timeout_minutes. The trainer's Batches arm the timeout only once every worker has
    delivered a batch: a worker that starts late (its shuffle buffer, a resumed run's fast-forward) is not a
    stall. Without a timeout, or for a worker's own error, torch's error is left alone."""
    make_shards(tmp_path, n_shards=2)
    a, b = tmp_path / "00000.tar", tmp_path / "00001.tar"
    # epoch mode, 2 shards, 2 workers: one shard each; one worker starts 3 s late, then both run dry
    late_start = _loader([str(a), f"pipe:sh -c 'sleep 3; cat {b}'"], workers=2, mode="epoch",
                         batch_size=4, shuffle_buffer=1)
    got = wds.Batches(late_start, 1, "rank 0")
    assert [got.next()["image"].shape[0] for _ in range(4)] == [4, 4, 4, 4] and got.next() is None
    # armed after every worker's first batch: a worker that then hangs is a stall
    hangs = _loader(f"pipe:sh -c 'cat {a}; sleep 5'", workers=1, shuffle_buffer=1, batch_size=4)
    got = wds.Batches(hangs, 1, "rank 0")
    with pytest.raises(wds.DataError, match=r"rank 0: no batch from a DataLoader worker in 1 s \(data.timeout_minutes\)"):
        for _ in range(3):
            got.next()
    assert got.seen == 1  # the second batch's last sample ends only at the tar's end, which the pipe withholds

    def failing(message):
        raise RuntimeError(message)
        yield

    with pytest.raises(RuntimeError, match="timed out"):  # no timeout configured: not ours to explain
        wds.next_batch(failing("DataLoader timed out after 2 seconds"), 0)
    with pytest.raises(RuntimeError, match="curl: timed out"):  # a worker's own error
        wds.next_batch(failing("Caught OSError in DataLoader worker process 0: curl: timed out"), 60)
