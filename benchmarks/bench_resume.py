"""Benchmark: how long a resumed run waits for its first batch, mid-epoch, in data.mode=resampled.

Run:  python benchmarks/bench_resume.py [--image-size 512] [--num-samples 1024] [--start-batches 0 8 32]
                                        [--workers 1] [--repeats 3] [--batch-size 64] [--cold]

A resumed loader must hand out exactly the batches an uninterrupted run would have produced next, so
each stream first gets past the batches consumed before the checkpoint (``start_batch``). Three ways,
side by side on the same shards, same ``clip_train_transform(224)`` + tokenizer, batch 64, 1,000-sample
shuffle buffer, a DataLoader with --workers workers:

* replay:   no cursors (a checkpoint from before they were saved): every consumed sample is decoded
            and transformed again, then dropped;
* read:     the trainer's checkpoint holds each stream's "_cursor" (raw samples up to its last
            consumed batch): those raw samples are read whole from the tars and shuffled, but not
            decoded or transformed (their augmentations are seeded per sample, so nothing is lost);
            what a resume did before the header scan (``wds.HEADER_SCAN = False``);
* scan:     the cursors, with the shards opened during the fast-forward indexed from their tar headers:
            the captions are read, the images stay in the files until a sample is decoded (the default).

Per row: seconds from building the loader to its first batch (median of --repeats, the ways in turn),
the samples skipped, and the bytes read from the shards up to the first batch (one more run per way with
0 workers, every read() of a shard file counted). ``--cold`` evicts the shards from the page
cache (posix_fadvise DONTNEED) before every run, so the reads go to the disk. All ways are checked to give
the same first batch.

Data: the photo-like JPEG shards of bench_dataloader.py (reused from its --work-dir).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dataloader import TokenizeOne, _machine, make_shards  # noqa: E402

from declip_ds.data import wds  # noqa: E402
from declip_ds.data.transforms import SampleTransform, clip_train_transform  # noqa: E402


def loader(spec: str, workers: int, batch_size: int, start_batch: int = 0, cursors=None):
    transform = SampleTransform({"image": clip_train_transform(224)}, {"text": TokenizeOne()})
    return wds.build_train_loader(spec, transform, batch_size, rank=0, world_size=1, seed=0, mode="resampled",
                                  workers=workers, shuffle_buffer=1000, start_batch=start_batch, cursors=cursors)


def cursors_after(spec: str, workers: int, batch_size: int, start_batch: int) -> dict[int, tuple[int, int]]:
    """What the trainer would have saved after consuming ``start_batch`` batches."""
    out = {}
    for i, batch in enumerate(loader(spec, workers, batch_size)):
        if i == start_batch:
            break
        stream, end, made = batch["_cursor"]
        out[stream] = (end, made)
    return out


WAYS = ("replay", "read", "scan")


def evict(spec: str) -> None:
    """Drop the shards' pages from the page cache (clean pages need no privilege)."""
    for url in wds._flatten_urls(wds.expand_urls(spec)):
        fd = os.open(url, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class CountingFile:
    """Adds the bytes read through it to ``CountingFile.total``."""

    total = 0

    def __init__(self, f):
        self._f = f

    def read(self, *a):
        data = self._f.read(*a)
        CountingFile.total += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def shard_bytes_read(run) -> int:
    """Bytes ``run()`` reads from the shards (in this process: the loader must have 0 workers)."""
    real_gopen = wds.gopen
    wds.gopen = lambda url, *a, **k: CountingFile(real_gopen(url, *a, **k))
    wds.open = lambda *a, **k: CountingFile(open(*a, **k))  # the header scan's and the spans' opens
    CountingFile.total = 0
    try:
        run()
    finally:
        wds.gopen = real_gopen
        del wds.open
    return CountingFile.total


def first_batch(spec: str, way: str, workers: int, batch_size: int, start_batch: int, cursors,
                cold: bool) -> tuple[float, dict]:
    wds.HEADER_SCAN = way == "scan"
    if cold:
        evict(spec)
    t0 = time.perf_counter()
    it = iter(loader(spec, workers, batch_size, start_batch, cursors if way != "replay" else None))
    batch = next(it)
    seconds = time.perf_counter() - t0
    del it  # shuts the workers down
    return seconds, batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=512, help="shorter side of the generated JPEGs")
    p.add_argument("--num-samples", type=int, default=1024)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--start-batches", type=int, nargs="+", default=[0, 8, 32])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cold", action="store_true", help="evict the shards from the page cache before each run")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "declip_ds_bench_dataloader"))
    args = p.parse_args()
    torch.set_num_threads(1)
    print(_machine())
    spec = make_shards(args.work_dir, args.image_size, args.num_samples, args.shard_size)
    rows = []
    for start in args.start_batches:
        cursors = cursors_after(spec, args.workers, args.batch_size, start) if start else None
        times = {w: [] for w in WAYS}
        firsts, read = {}, {}
        for rep in range(args.repeats):
            for way in WAYS[rep % 3:] + WAYS[:rep % 3]:
                seconds, firsts[way] = first_batch(spec, way, args.workers, args.batch_size, start, cursors, args.cold)
                times[way].append(seconds)
        cursors0 = cursors_after(spec, 0, args.batch_size, start) if start else None
        for way in WAYS:  # bytes read from the shards: in-process (0 workers), where the reads can be counted
            read[way] = shard_bytes_read(lambda: first_batch(spec, way, 0, args.batch_size, start, cursors0, False))
        for way in WAYS[1:]:
            assert firsts[way]["__key__"] == firsts["replay"]["__key__"]
            assert torch.equal(firsts[way]["image"], firsts["replay"]["image"])
        med = {w: statistics.median(times[w]) for w in WAYS}
        rows.append((start, start * args.batch_size, med, read))
        print(f"start_batch {start}: " + ", ".join(f"{w} {med[w]:.2f} s ({read[w] / 1e6:.1f} MB)" for w in WAYS))
    wds.HEADER_SCAN = True
    print(f"\n{args.image_size}-px JPEGs, batch {args.batch_size}, {args.workers} DataLoader worker(s), median of "
          f"{args.repeats}, page cache {'evicted before each run' if args.cold else 'warm'}\n")
    print("| start_batch | samples skipped | first batch s (replay / read / scan) | MB read (replay / read / scan) "
          "| scan vs read |")
    print("|---|---|---|---|---|")
    for start, skipped, med, read in rows:
        print(f"| {start} | {skipped} | {med['replay']:.2f} / {med['read']:.2f} / {med['scan']:.2f} | "
              f"{read['replay'] / 1e6:.1f} / {read['read'] / 1e6:.1f} / {read['scan'] / 1e6:.1f} | "
              f"{med['read'] / med['scan']:.1f}x faster, {read['read'] / max(read['scan'], 1):.1f}x fewer bytes |")


if __name__ == "__main__":
    main()
