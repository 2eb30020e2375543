"""declip_ds.data.prepare: tables / folders -> shards that build_train_loader reads back.

Everything is written to tmp_path: tiny JPEG/PNG images, tables in each supported layout.
Most runs use workers=0 (in-process); one determinism test uses 2 worker processes.
"""

import csv
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from declip_ds.data import prepare as prep
from declip_ds.data import wds
from declip_ds.data.prepare import PrepareError, clean_yfcc_text, prepare
from declip_ds.data.transforms import SampleTransform, clip_train_transform


def _jpeg(path, size=(24, 20), color=(200, 40, 40), **save):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG", quality=85, **save)
    return path


def _images(root, n, size=(24, 20), name="{i}.jpg"):
    return [_jpeg(str(root / name.format(i=i)), size, (i * 40 % 256, 90, 200 - i)) for i in range(n)]


def _write_table(path, header, rows, delimiter=","):
    """CSV (quoted where needed), or TSV as the datasets ship it: raw fields, no quoting."""
    rows = ([header] if header else []) + rows
    with open(path, "w", newline="", encoding="utf-8") as f:
        if delimiter == "\t":
            f.write("".join("\t".join(row) + "\n" for row in rows))
        else:
            csv.writer(f).writerows(rows)
    return str(path)


def _read_back(out):
    """Every sample through build_train_loader (epoch mode, one pass): {key: caption}."""
    spec = str(out / "*.tar")
    transform = SampleTransform({"image": clip_train_transform(8)}, {"caption": lambda s: s})
    loader = wds.build_train_loader(spec, transform, 4, rank=0, world_size=1, seed=0, mode="epoch", workers=0,
                                    shuffle_buffer=4)
    got = {}
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 8, 8)
        assert not any(batch["_skips"].values()), batch["_skips"]
        for key, caption in zip(batch["__key__"], batch["caption"]):
            assert key not in got, f"{key} read twice"
            got[key] = caption
    assert len(got) == wds.read_num_samples(spec)
    return got


def _members(tar_path):
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def _skips(out):
    return [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]


def _run(input, out, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return prepare(str(input), str(out), **kw)


# ----------------------------------------------------------------------------- formats


def test_csv_roundtrip_through_loader(tmp_path):
    _images(tmp_path / "img", 7)
    rows = [[f"img/{i}.jpg", f"a photo number {i}", f"x{i}"] for i in range(7)]
    table = _write_table(tmp_path / "t.csv", ["filepath", "title", "extra"], rows)
    summary = _run(table, tmp_path / "out", shard_size=3)
    assert summary["samples"] == 7 and summary["shards"] == 3 and summary["skipped"] == 0
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 3,
                                                                       "00002.tar": 1}
    assert _read_back(tmp_path / "out") == {f"{i:09d}": f"a photo number {i}" for i in range(7)}
    meta = json.loads(_members(tmp_path / "out" / "00000.tar")["000000001.json"])
    assert meta["source"] == "img/1.jpg" and meta["row"] == {"extra": "x1"} and meta["index"] == 1
    assert (meta["width"], meta["height"], meta["reencoded"]) == (24, 20, False)


def test_tsv_with_named_columns_and_base_dir(tmp_path):
    _images(tmp_path / "images", 4)
    rows = [[f"{i}.jpg", f"caption\twith tab {i}" if i == 0 else f"caption {i}"] for i in range(4)]
    table = tmp_path / "meta" / "t.tsv"
    table.parent.mkdir()
    with open(table, "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["img", "sentence"]] + rows)  # quoted field holds the tab
    _run(table, tmp_path / "out", image_col="img", caption_col="sentence", base_dir=str(tmp_path / "images"))
    got = _read_back(tmp_path / "out")
    assert got == {f"{i:09d}": r[1] for i, r in enumerate(rows)}


def test_folder_with_sidecar_captions(tmp_path):
    root = tmp_path / "photos"
    _jpeg(str(root / "a" / "cat.jpg"))
    (root / "a" / "cat.txt").write_text("a cat on a mat\n")
    _jpeg(str(root / "b" / "dog.jpeg"), (30, 30))
    (root / "b" / "dog.txt").write_text("a dog")
    Image.new("RGB", (12, 16), (0, 255, 0)).save(root / "b" / "leaf.png")
    (root / "b" / "leaf.txt").write_text("a green leaf")
    _jpeg(str(root / "b" / "nocap.jpg"))
    _jpeg(str(root / "b" / "empty.jpg"))
    (root / "b" / "empty.txt").write_text("  \n")
    (root / "notes.md").write_text("not an image")
    summary = _run(root, tmp_path / "out", shard_size=2)
    got = _read_back(tmp_path / "out")
    # sorted walk: a/cat, b/dog, b/empty, b/leaf, b/nocap
    assert got == {"000000000": "a cat on a mat", "000000001": "a dog", "000000003": "a green leaf"}
    assert {(s["source"], s["reason"]) for s in _skips(tmp_path / "out")} == {
        (os.path.join("b", "nocap.jpg"), "missing_caption"), (os.path.join("b", "empty.jpg"), "empty_caption")}
    assert summary["skipped_by_reason"] == {"empty_caption": 1, "missing_caption": 1}
    png = _members(tmp_path / "out" / "00001.tar")["000000003.jpg"]
    assert Image.open(io.BytesIO(png)).format == "JPEG"


def test_folder_names_that_are_not_utf8(tmp_path):
    """A file name with a Latin-1 byte (a folder copied from an old system) used to abort the whole run with
    UnicodeEncodeError: the image is read, and its source is recorded with the byte shown as \\xe9."""
    root = tmp_path / "photos"
    root.mkdir()
    raw = os.fsencode(str(root)) + b"/caf\xe9.jpg"
    try:
        open(raw, "wb").close()
    except OSError:
        pytest.skip("this filesystem refuses non-UTF-8 names")
    _jpeg(os.fsdecode(raw))
    open(raw[:-4] + b".txt", "w").write("a cafe")
    _jpeg(str(root / "plain.jpg"))
    (root / "plain.txt").write_text("plain")
    _run(root, tmp_path / "out")
    assert sorted(_read_back(tmp_path / "out").values()) == ["a cafe", "plain"]
    members = _members(tmp_path / "out" / "00000.tar")
    assert {json.loads(v)["source"] for k, v in members.items() if k.endswith(".json")} == {"caf\\xe9.jpg", "plain.jpg"}


def _yfcc_row(line, photoid, title, description):
    row = [str(line), str(photoid), f"hash{photoid:06d}", "uid@N00", "nick", "2010-01-01 00:00:00.0", "1262304000",
           "Canon", title, description, "tag1,tag2", "", "", "", "", "http://flickr.com/p/1",
           "http://farm.static/x.jpg", "Attribution License", "http://creativecommons.org/licenses/by/2.0/", "1",
           "1", "abc", "def", "jpg", "0"]
    assert len(row) == 25
    return row


def test_yfcc_metadata_tsv(tmp_path):
    for pid in (101, 102, 103, 104):
        _jpeg(str(tmp_path / "yfcc" / f"{pid}.jpg"))
    rows = [
        _yfcc_row(0, 101, "Sunset+at+the+beach", "The+sun+sets+%26+the+%3Cb%3Esky%3C%2Fb%3E+glows"),
        _yfcc_row(1, 102, "My+dog%21", "see+http%3A%2F%2Fwww.example.com%2Fx+for+more+%26amp%3B+photos"),
        _yfcc_row(2, 103, "", "%3Ca+href%3D%22http%3A%2F%2Fx.com%22%3E%3C%2Fa%3E"),  # nothing left: skipped
        _yfcc_row(3, 104, "Only+a+title", ""),
        _yfcc_row(4, 999, "No+image+file", ""),
    ]
    table = _write_table(tmp_path / "yfcc100m_dataset.tsv", None, rows, delimiter="\t")
    summary = _run(table, tmp_path / "out", format="yfcc", base_dir=str(tmp_path / "yfcc"))
    assert _read_back(tmp_path / "out") == {
        "000000000": "Sunset at the beach. The sun sets & the sky glows",
        "000000001": "My dog! see for more & photos",
        "000000003": "Only a title",
    }
    assert summary["skipped_by_reason"] == {"empty_caption": 1, "missing_file": 1}
    meta = json.loads(_members(tmp_path / "out" / "00000.tar")["000000000.json"])
    assert meta["row"]["photoid"] == "101" and meta["row"]["title"] == "Sunset at the beach"
    # title only, from a table with a header (dalle-mini style export)
    table2 = _write_table(tmp_path / "subset.tsv", ["photoid", "title", "description"],
                          [["101", "A+title", "A+description"]], delimiter="\t")
    _run(table2, tmp_path / "out2", format="yfcc", caption_col="title", base_dir=str(tmp_path / "yfcc"))
    assert _read_back(tmp_path / "out2") == {"000000000": "A title"}


def test_clean_yfcc_text():
    assert clean_yfcc_text("a+%3Ci%3Eb%3C%2Fi%3E++c%0A%0Ad") == "a b c d"
    assert clean_yfcc_text("x+www.foo.com%2Fbar+y+https%3A%2F%2Fa.b") == "x y"
    assert clean_yfcc_text("Caf%C3%A9+%26quot%3Bok%26quot%3B") == 'Café "ok"'


def test_cc3m_tsv_by_row_index(tmp_path):
    captions = ["a tree in the park", 'a "quoted" word', "a boat", "lost image"]
    for i in range(3):
        _jpeg(str(tmp_path / "training" / f"{i:08d}.jpg"))
    table = _write_table(tmp_path / "Train_GCC-training.tsv", None,
                         [[c, f"http://example.com/{i}.jpg"] for i, c in enumerate(captions)], delimiter="\t")
    summary = _run(table, tmp_path / "out", format="cc3m", base_dir=str(tmp_path / "training"))
    assert _read_back(tmp_path / "out") == {f"{i:08d}".rjust(9, "0"): captions[i] for i in range(3)}
    assert summary["skipped_by_reason"] == {"missing_file": 1}
    meta = json.loads(_members(tmp_path / "out" / "00000.tar")["000000002.json"])
    assert meta["row"] == {"url": "http://example.com/2.jpg"} and meta["source"] == "00000002.jpg"


def test_jsonl_declip_meta(tmp_path):
    _images(tmp_path, 2)
    lines = [json.dumps({"filename": "0.jpg", "caption": ["", "first real caption", "second"]}),
             "{not json", json.dumps({"filename": "1.jpg", "caption": "plain"})]
    (tmp_path / "meta.jsonl").write_text("\n".join(lines) + "\n")
    summary = _run(tmp_path / "meta.jsonl", tmp_path / "out")
    assert _read_back(tmp_path / "out") == {"000000000": "first real caption", "000000002": "plain"}
    assert summary["skipped_by_reason"] == {"bad_row": 1}
    # the same as a JSON array: an element that is not an object is a bad row, not a crash
    (tmp_path / "meta.json").write_text(json.dumps([{"filename": "0.jpg", "caption": "zero"}, "oops",
                                                    {"filename": "1.jpg", "caption": "one"}]))
    summary = _run(tmp_path / "meta.json", tmp_path / "out2")
    assert _read_back(tmp_path / "out2") == {"000000000": "zero", "000000002": "one"}
    assert summary["skipped_by_reason"] == {"bad_row": 1}


# ----------------------------------------------------------------------------- images


def test_resize_shorter_side_copy_and_reencode(tmp_path):
    _jpeg(str(tmp_path / "big.jpg"), (64, 40))
    small = _jpeg(str(tmp_path / "small.jpg"), (30, 16))
    Image.new("RGBA", (40, 80), (0, 0, 255, 0)).save(tmp_path / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    _jpeg(str(tmp_path / "rotated.jpg"), (20, 10), exif=exif.tobytes())
    names = ["big.jpg", "small.jpg", "alpha.png", "rotated.jpg"]
    table = _write_table(tmp_path / "t.csv", ["image", "caption"], [[n, n] for n in names])
    _run(table, tmp_path / "out", resize_shorter=20, jpeg_quality=80)
    members = _members(tmp_path / "out" / "00000.tar")
    sizes = {n: Image.open(io.BytesIO(members[f"{i:09d}.jpg"])).size for i, n in enumerate(names)}
    assert sizes == {"big.jpg": (32, 20), "small.jpg": (30, 16), "alpha.png": (20, 40), "rotated.jpg": (10, 20)}
    assert members["000000001.jpg"] == open(small, "rb").read()  # small enough: copied byte for byte
    meta = {n: json.loads(members[f"{i:09d}.json"]) for i, n in enumerate(names)}
    assert [meta[n]["reencoded"] for n in names] == [True, False, True, True]
    assert (meta["big.jpg"]["original_width"], meta["big.jpg"]["original_height"]) == (64, 40)
    flat = Image.open(io.BytesIO(members["000000002.jpg"])).convert("RGB").getpixel((10, 10))
    assert min(flat) > 240  # transparency flattened over white
    assert len(_read_back(tmp_path / "out")) == 4


def _save_trns(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", transparency=7 if image.mode == "L" else (7, 7, 7))
    return buf.getvalue()


def _mode_images() -> dict:
    """name -> (PNG / TIFF bytes, the 8-bit gray level or RGB colour it must decode to)."""
    import numpy as np

    def save(image, fmt="PNG"):
        buf = io.BytesIO()
        image.save(buf, fmt)
        return buf.getvalue()

    flat = lambda v, dtype: np.full((8, 8), v, dtype)  # noqa: E731
    return {
        "gray16_mid.png": (save(Image.fromarray(flat(32768, np.uint16))), 128),  # PIL alone: 255 (white)
        "gray16_dark.png": (save(Image.fromarray(flat(1000, np.uint16))), 4),
        "int32.tif": (save(Image.fromarray(flat(20000, np.int32)), "TIFF"), 78),
        "float01.tif": (save(Image.fromarray(flat(0.5, np.float32)), "TIFF"), 128),
        "rgba.png": (save(Image.new("RGBA", (8, 8), (0, 0, 255, 0))), (255, 255, 255)),  # transparent: white
        "la.png": (save(Image.new("LA", (8, 8), (0, 0))), (255, 255, 255)),
        "gray_trns.png": (_save_trns(Image.new("L", (8, 8), 7)), (255, 255, 255)),  # tRNS: gray 7 is transparent
        "rgb_trns.png": (_save_trns(Image.new("RGB", (8, 8), (7, 7, 7))), (255, 255, 255)),
        "palette.png": (save(Image.new("RGB", (8, 8), (204, 0, 51)).convert("P")), (204, 0, 51)),  # web-safe
        "cmyk.tif": (save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF"), (255, 0, 0)),
    }


def test_every_image_mode_decodes_alike_in_the_loader_and_in_prepare(tmp_path):
    """16-bit / 32-bit / float grayscale (PIL's own conversion clips them at 255: a mid-gray 16-bit PNG became
    white), transparency (over white in both), palette and CMYK images: the trainer's decoder gives the
    expected colour, and a shard written by prepare decodes to the same pixels (up to JPEG loss)."""
    from declip_ds.data.wds import decode_image

    images = _mode_images()
    for name, (data, want) in images.items():
        got = decode_image(data, name.rsplit(".", 1)[1])
        assert got.mode == "RGB", name
        want = (want,) * 3 if isinstance(want, int) else want
        assert max(abs(a - b) for a, b in zip(got.getpixel((3, 3)), want)) <= 1, (name, got.getpixel((3, 3)))
        (tmp_path / name).write_bytes(data)
    # evaluation decodes as torchvision's ImageFolder / CLIP_benchmark do (PIL's convert: comparable scores)
    rgba = images["rgba.png"][0]
    assert decode_image(rgba, "png", plain=True).getpixel((3, 3)) == Image.open(io.BytesIO(rgba)).convert("RGB").getpixel((3, 3))
    # the decode happens in decode_image: a truncated file is a decode error there, not in the transform
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 99, 199)).save(jpeg, "JPEG")
    with pytest.raises(OSError, match="(?i)truncated"):
        decode_image(jpeg.getvalue()[: len(jpeg.getvalue()) * 3 // 4])
    table = _write_table(tmp_path / "t.csv", ["image", "caption"], [[n, n] for n in images])
    _run(table, tmp_path / "out", resize_shorter=4)  # every image re-encoded as JPEG
    members = _members(tmp_path / "out" / "00000.tar")
    for i, name in enumerate(images):
        shard = decode_image(members[f"{i:09d}.jpg"]).getpixel((2, 2))
        direct = decode_image(images[name][0], name.rsplit(".", 1)[1]).getpixel((3, 3))
        assert max(abs(a - b) for a, b in zip(shard, direct)) <= 4, (name, shard, direct)


def test_premultiplied_alpha_modes_flatten_over_white():
    """La / RGBa (premultiplied alpha; made in memory by some PIL operations, never read from a file):
    PIL cannot convert La to RGBA, so to_rgb used to raise on it."""
    from declip_ds.data.prepare import to_rgb

    half = {"La": Image.new("LA", (4, 4), (100, 128)).convert("La"),
            "RGBa": Image.new("RGBA", (4, 4), (100, 100, 100, 128)).convert("RGBa")}
    for mode, image in half.items():
        assert image.mode == mode
        got = to_rgb(image)
        assert got.mode == "RGB" and all(abs(v - 177) <= 1 for v in got.getpixel((1, 1))), (mode, got.getpixel((1, 1)))


def test_skipped_rows_are_reported_with_reasons(tmp_path, capsys):
    _images(tmp_path, 2)
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image")
    full = open(tmp_path / "0.jpg", "rb").read()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "adir.jpg").mkdir()
    rows = [["0.jpg", "ok"], ["missing.jpg", "gone"], ["garbage.jpg", "bad bytes"], ["truncated.jpg", "cut"],
            ["1.jpg", "   "], ["", "no path"], ["adir.jpg", "a directory"], ["1.jpg", "ok too"]]
    table = _write_table(tmp_path / "t.csv", ["filepath", "caption"], rows)
    with open(table, "a") as f:
        f.write("too,many,fields\n")
    assert prep.main(["--input", table, "--out", str(tmp_path / "out"), "--workers", "0", "--shard-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 7 rows" in printed and "missing_file 1" in printed and "skipped.jsonl" in printed
    reasons = {s["index"]: s["reason"] for s in _skips(tmp_path / "out")}
    assert reasons == {1: "missing_file", 2: "unreadable_image", 3: "unreadable_image", 4: "empty_caption",
                       5: "missing_path", 6: "unreadable_file", 8: "bad_row"}
    details = {s["index"]: s["detail"] for s in _skips(tmp_path / "out")}
    assert "truncated" in details[3].lower() and "0x" not in details[2]
    assert _read_back(tmp_path / "out") == {"000000000": "ok", "000000007": "ok too"}


def test_shards_count_only_rows_that_reading_accepts(tmp_path):
    # rows without a caption (read-time skips) take no place; an unreadable image (a write-time
    # skip) keeps its place and leaves its shard short, as the docstring and --shard-size say
    _images(tmp_path, 10)
    (tmp_path / "6.jpg").write_bytes(b"not an image")
    rows = [[f"{i}.jpg", "" if i in (1, 2) else f"caption {i}"] for i in range(10)]
    table = _write_table(tmp_path / "t.csv", ["filepath", "caption"], rows)
    _run(table, tmp_path / "out", shard_size=4)
    keys = {name: sorted({m.split(".")[0] for m in _members(tmp_path / "out" / name)})
            for name in ("00000.tar", "00001.tar")}
    assert keys == {"00000.tar": [f"{i:09d}" for i in (0, 3, 4, 5)],
                    "00001.tar": [f"{i:09d}" for i in (7, 8, 9)]}
    assert sorted(os.listdir(tmp_path / "out")).count("00002.tar") == 0
    help_text = " ".join(prep._build_parser().format_help().split())
    assert "input rows per shard" not in help_text and "counting only rows" in help_text
    assert "input rows ``s * shard_size" not in prep.__doc__


# ----------------------------------------------------------------------------- duplicates


def test_duplicate_rows_are_counted_and_reported(tmp_path, capsys):
    _images(tmp_path / "img", 4)
    rows = [["img/0.jpg", "a cat"], ["img/1.jpg", "a dog"], ["img/0.jpg", "a cat"],  # 2 repeats 0
            ["img/2.jpg", "a bird"], ["img/1.jpg", ""],  # 4: skipped while reading, not counted
            ["img/./0.jpg", "a cat"],  # 5 repeats 0: the same file, spelled otherwise
            ["img/0.jpg", "a black cat"],  # 6: the image of 0 with another caption
            ["img/3.jpg", "a fish"], ["img/gone.jpg", "gone"], ["img/gone.jpg", "gone"]]  # 9 repeats 8 (missing)
    table = _write_table(tmp_path / "t.csv", ["filepath", "caption"], rows)
    out = tmp_path / "out"
    assert prep.main(["--input", table, "--out", str(out), "--workers", "0", "--shard-size", "3"]) == 0
    printed = capsys.readouterr().out
    duplicates = json.loads((out / "prepare.json").read_text())["summary"]["duplicates"]
    assert duplicates == {"same_image": 4, "same_image_and_caption": 3, "examples": [
        {"index": 2, "first_index": 0, "source": "img/0.jpg"}, {"index": 5, "first_index": 0, "source": "img/./0.jpg"},
        {"index": 9, "first_index": 8, "source": "img/gone.jpg"}]}
    assert ("warning: 3 rows repeat an earlier row's image and caption exactly (e.g. row 2 = row 0, img/0.jpg); "
            "1 more row shares an image with an earlier row, with another caption. Exact repeats are trained on more "
            f"often than the rest; several captions per image is fine. See duplicates in {out / 'prepare.json'}."
            ) in printed
    # counted, not dropped: every readable row is a sample, in the shards it had before
    assert _read_back(out) == {f"{i:09d}": rows[i][1] for i in (0, 1, 2, 3, 5, 6, 7)}
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 3, "00002.tar": 1}


def test_no_duplicates_and_several_captions_per_image(tmp_path, capsys):
    _images(tmp_path, 3)
    table = _write_table(tmp_path / "t.csv", ["filepath", "caption"], [[f"{i}.jpg", f"c{i}"] for i in range(3)])
    assert prep.main(["--input", table, "--out", str(tmp_path / "out"), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "prepare.json").read_text())["summary"]
    assert summary["duplicates"] == {"same_image": 0, "same_image_and_caption": 0, "examples": []}
    assert "repeat" not in printed and "share an image" not in printed and "warning" not in printed
    # COCO style: a note, not a warning; the examples are the same-image rows
    coco = _write_table(tmp_path / "coco.csv", ["filepath", "caption"],
                        [["0.jpg", "a"], ["0.jpg", "b"], ["1.jpg", "c"], ["0.jpg", "d"], ["1.jpg", "e"]])
    summary = _run(coco, tmp_path / "coco")
    assert summary["duplicates"] == {"same_image": 3, "same_image_and_caption": 0, "examples": [
        {"index": 1, "first_index": 0, "source": "0.jpg"}, {"index": 3, "first_index": 0, "source": "0.jpg"},
        {"index": 4, "first_index": 2, "source": "1.jpg"}]}
    line = prep._format_summary(summary, str(tmp_path / "coco")).splitlines()[-1]
    assert line.startswith("note: 3 rows share an image with an earlier row, with another caption (e.g. row 1 = "
                           "row 0, 0.jpg): fine for several captions per image")


def test_resume_counts_the_same_duplicates(tmp_path):
    _images(tmp_path, 3)
    rows = [["0.jpg", "a"], ["1.jpg", "b"], ["0.jpg", "a"], ["2.jpg", "c"], ["1.jpg", "x"], ["0.jpg", "a"]]
    table = _write_table(tmp_path / "t.csv", ["filepath", "caption"], rows)
    first = _run(table, tmp_path / "out", shard_size=2)
    expected = {"same_image": 3, "same_image_and_caption": 2, "examples": [
        {"index": 2, "first_index": 0, "source": "0.jpg"}, {"index": 5, "first_index": 0, "source": "0.jpg"}]}
    assert first["duplicates"] == expected
    second = _run(table, tmp_path / "out", shard_size=2)
    assert second["shards_kept"] == 3 and second["duplicates"] == expected
    (tmp_path / "out" / "00001.tar").unlink()
    third = _run(table, tmp_path / "out", shard_size=2)
    assert (third["shards_kept"], third["shards_written"]) == (2, 1) and third["duplicates"] == expected
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["summary"]["duplicates"] == expected


def test_duplicate_examples_never_cost_the_shards_or_the_counts(tmp_path, monkeypatch):
    """The examples re-read the input after the shards are written: an input that changed meanwhile (a caption
    edited: no longer an exact repeat) gives no example for that row, and one that cannot be read again (a JSON
    error, pyarrow's ArrowInvalid: ValueErrors) gives none at all; sizes.json and the counts are written all the
    same."""
    _images(tmp_path, 2)
    rows = [["0.jpg", "a"], ["1.jpg", "b"], ["0.jpg", "a"], ["1.jpg", "b"]]
    table = _write_table(tmp_path / "t.csv", ["filepath", "caption"], rows)
    reads, real_rows = [], prep._rows

    def rows_then_edited(opts):
        reads.append(1)
        for item in real_rows(opts):
            if len(reads) > 1 and getattr(item, "index", None) == 3:  # row 3's caption, read again, differs
                item = prep._Row(item.index, item.source, item.path, "b, edited", item.caption_file, item.meta)
            yield item

    monkeypatch.setattr(prep, "_rows", rows_then_edited)
    summary = _run(table, tmp_path / "edited")
    assert summary["duplicates"] == {"same_image": 2, "same_image_and_caption": 2,
                                     "examples": [{"index": 2, "first_index": 0, "source": "0.jpg"}]}

    def unreadable_the_second_time(opts):
        reads.append(1)
        if len(reads) > 3:
            raise ValueError("Expecting value: line 1 column 1 (char 0)")
        yield from real_rows(opts)

    monkeypatch.setattr(prep, "_rows", unreadable_the_second_time)
    summary = _run(table, tmp_path / "gone")
    assert summary["duplicates"] == {"same_image": 2, "same_image_and_caption": 2, "examples": []}
    assert json.loads((tmp_path / "gone" / "sizes.json").read_text()) == {"00000.tar": 4}


# ----------------------------------------------------------------------------- resume, errors, determinism


def _mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("*.tar"))}


def test_resume_keeps_finished_shards_and_rewrites_deleted_ones(tmp_path):
    _images(tmp_path / "img", 6)
    table = _write_table(tmp_path / "t.csv", ["filepath", "caption"], [[f"img/{i}.jpg", f"c{i}"] for i in range(6)])
    out = tmp_path / "out"
    first = _run(table, out, shard_size=2)
    assert first["shards_written"] == 3
    before, data = _mtimes(out), {n: (out / n).read_bytes() for n in _mtimes(out)}
    second = _run(table, out, shard_size=2)
    assert (second["shards_kept"], second["shards_written"]) == (3, 0) and _mtimes(out) == before
    (out / "00001.tar").unlink()
    (out / "00002.tar.tmp999").write_bytes(b"left by a killed run")
    third = _run(table, out, shard_size=2)
    assert (third["shards_kept"], third["shards_written"]) == (2, 1)
    assert not (out / "00002.tar.tmp999").exists()
    after = _mtimes(out)
    assert after["00000.tar"] == before["00000.tar"] and after["00002.tar"] == before["00002.tar"]
    assert (out / "00001.tar").read_bytes() == data["00001.tar"]
    assert len(_read_back(out)) == 6
    # other arguments, or other rows under a finished shard: an error, nothing rewritten
    with pytest.raises(PrepareError, match=r"--shard-size: 2 before, 3 now"):
        _run(table, out, shard_size=3)
    _write_table(table, ["filepath", "caption"], [[f"img/{i}.jpg", f"new {i}"] for i in range(6)])
    with pytest.raises(PrepareError, match="input changed"):
        _run(table, out, shard_size=2)
    assert _mtimes(out) == after
    _write_table(table, ["filepath", "caption"], [[f"img/{i}.jpg", f"c{i}"] for i in range(4)])  # rows removed
    with pytest.raises(PrepareError, match="fewer rows"):
        _run(table, out, shard_size=2)


def test_bad_arguments_and_inputs(tmp_path, monkeypatch, capsys):
    _images(tmp_path, 1)
    table = _write_table(tmp_path / "t.csv", ["path", "caption"], [["0.jpg", "c"]])
    out = str(tmp_path / "out")
    cases = [
        (dict(input=str(tmp_path / "nope.csv")), "does not exist"),
        (dict(format="xml"), "Unknown format 'xml'. Known: auto, csv"),
        (dict(shard_size=0), "--shard-size must be an integer >= 1"),
        (dict(jpeg_quality=101), "--jpeg-quality must be an integer >= 1 and <= 100"),
        (dict(image_col="file"), r"--image-col 'file' is not a column.*\['caption', 'path'\]"),
        (dict(caption_col="text"), "--caption-col 'text' is not a column"),
        (dict(image_template="{photoid}.jpg"), r"--image-template '\{photoid\}.jpg' does not fit.*'index'"),
        (dict(format="folder"), "--format folder needs a directory"),
        (dict(base_dir=str(tmp_path / "nodir")), "--base-dir .* is not a directory"),
    ]
    for kw, message in cases:
        kw = dict(dict(input=table, out=out), **kw)
        with pytest.raises(PrepareError, match=message):
            _run(kw.pop("input"), kw.pop("out"), **kw)
    assert not os.path.exists(out)  # nothing written for a bad call
    (tmp_path / "x.dat").write_text("?")
    with pytest.raises(PrepareError, match="Pass --format"):
        _run(tmp_path / "x.dat", out)
    _write_table(tmp_path / "nocols.csv", ["a", "b"], [["1", "2"]])
    with pytest.raises(PrepareError, match=r"No caption column.*\['a', 'b'\]. Pass --caption-col"):
        _run(tmp_path / "nocols.csv", out)
    _write_table(tmp_path / "noimage.csv", ["a", "caption"], [["1", "2"]])
    with pytest.raises(PrepareError, match="No image column.*Pass --image-col"):
        _run(tmp_path / "noimage.csv", out)
    (tmp_path / "empty.csv").write_text("path,caption\n")
    with pytest.raises(PrepareError, match="has no data rows"):
        _run(tmp_path / "empty.csv", out)
    (tmp_path / "bad.tsv").write_text("a\tb\tc\n")
    with pytest.raises(PrepareError, match="3 tab-separated fields.*YFCC100M"):
        _run(tmp_path / "bad.tsv", out, format="yfcc")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "00000.tar").write_bytes(b"")
    with pytest.raises(PrepareError, match="did not write"):
        _run(table, foreign)
    assert os.listdir(foreign) == ["00000.tar"]  # left as it was
    # parquet without pyarrow / pandas: a clear message
    import builtins
    real_import = builtins.__import__

    def no_parquet(name, *a, **k):
        if name.split(".")[0] in ("pyarrow", "pandas"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setattr(builtins, "__import__", no_parquet)
    with pytest.raises(PrepareError, match="needs pyarrow"):
        _run(tmp_path / "t.parquet", out)
    monkeypatch.undo()
    # the CLI: exit status 2 and the message on stderr, no traceback
    assert prep.main(["--input", table, "--out", out, "--shard-size", "-1"]) == 2
    assert "error: --shard-size must be an integer >= 1" in capsys.readouterr().err
    # every row skipped (the images are not where the table's relative paths point): exit 2 and why
    missing = _write_table(tmp_path / "m.csv", ["filepath", "caption"], [["imgs/a.jpg", "a cat"], ["imgs/b.jpg", "b"]])
    assert prep.main(["--input", missing, "--out", str(tmp_path / "m"), "--workers", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (f"error: no sample was written: every row was skipped, most for missing_file (first: row 0, "
            f"{tmp_path / 'imgs' / 'a.jpg'}). Relative image paths are resolved against --base-dir") in err


def test_parquet_when_available(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    _images(tmp_path, 3)
    pq.write_table(pa.table({"filepath": [f"{i}.jpg" for i in range(3)], "caption": ["a", "", "c"]}),
                   tmp_path / "t.parquet")
    summary = _run(tmp_path / "t.parquet", tmp_path / "out")
    assert _read_back(tmp_path / "out") == {"000000000": "a", "000000002": "c"} and summary["skipped"] == 1


def test_deterministic_bytes_any_worker_count(tmp_path):
    _images(tmp_path / "img", 5, size=(40, 30))
    Image.new("RGB", (50, 50), (9, 9, 9)).save(tmp_path / "img" / "x.png")
    rows = [[f"img/{i}.jpg", f"c{i}"] for i in range(5)] + [["img/x.png", "png"], ["img/none.jpg", "missing"]]
    table = _write_table(tmp_path / "t.csv", ["filepath", "caption"], rows)
    a = _run(table, tmp_path / "a", shard_size=2, resize_shorter=20)
    b = _run(table, tmp_path / "b", shard_size=2, resize_shorter=20, workers=2)
    assert a["samples"] == b["samples"] == 6
    for name in ["00000.tar", "00001.tar", "00002.tar", "00003.tar", "sizes.json", "skipped.jsonl"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
