"""Benchmark: how long a resumed run waits for its first batch, mid-epoch, in data.mode=resampled.

Run:  python benchmarks/bench_resume.py [--image-size 512] [--num-samples 1024] [--start-batches 0 8 32]
                                        [--workers 1] [--repeats 3] [--batch-size 64]

A resumed loader must hand out exactly the batches an uninterrupted run would have produced next, so
each stream first gets past the batches consumed before the checkpoint (``start_batch``). Two ways,
side by side on the same shards, same ``clip_train_transform(224)`` + tokenizer, batch 64, 1,000-sample
shuffle buffer, a DataLoader with --workers workers:

* replay:   no cursors (a checkpoint from before they were saved): every consumed sample is decoded
            and transformed again, then dropped;
* cursors:  the trainer's checkpoint holds each stream's "_cursor" (raw samples up to its last
            consumed batch): those raw samples are read from the tars and shuffled, but not decoded
            or transformed (their augmentations are seeded per sample, so nothing is lost).

Per row: seconds from building the loader to its first batch (median of --repeats, the two ways
alternating), the samples skipped, the ratio, and the cost per skipped sample (the time above the
start_batch 0 row, the fresh-start baseline where both ways are the same). Both ways are checked to
give the same first batch.

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


def first_batch(spec: str, workers: int, batch_size: int, start_batch: int, cursors) -> tuple[float, dict]:
    t0 = time.perf_counter()
    it = iter(loader(spec, workers, batch_size, start_batch, cursors))
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
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "declip_ds_bench_dataloader"))
    args = p.parse_args()
    torch.set_num_threads(1)
    print(_machine())
    spec = make_shards(args.work_dir, args.image_size, args.num_samples, args.shard_size)
    rows = []
    for start in args.start_batches:
        cursors = cursors_after(spec, args.workers, args.batch_size, start) if start else None
        times = {"replay": [], "cursors": []}
        firsts = {}
        for rep in range(args.repeats):
            for way in (("replay", "cursors") if rep % 2 == 0 else ("cursors", "replay")):
                seconds, batch = first_batch(spec, args.workers, args.batch_size, start,
                                             cursors if way == "cursors" else None)
                times[way].append(seconds)
                firsts[way] = batch
        assert firsts["replay"]["__key__"] == firsts["cursors"]["__key__"]
        assert torch.equal(firsts["replay"]["image"], firsts["cursors"]["image"])
        replay, fast = statistics.median(times["replay"]), statistics.median(times["cursors"])
        rows.append((start, start * args.batch_size, replay, fast))
        print(f"start_batch {start}: replay {replay:.2f} s, cursors {fast:.2f} s")
    print(f"\n{args.image_size}-px JPEGs, batch {args.batch_size}, {args.workers} DataLoader worker(s), "
          f"median of {args.repeats}\n")
    base = next(((r, f) for s, _, r, f in rows if s == 0), None)
    print("| start_batch | samples skipped | first batch s (replay) | first batch s (cursors) | speed-up | "
          "ms per skipped sample (replay / cursors) |")
    print("|---|---|---|---|---|---|")
    for start, skipped, replay, fast in rows:
        per = (f"{1000 * (replay - base[0]) / skipped:.2f} / {1000 * (fast - base[1]) / skipped:.2f}"
               if base is not None and skipped else "-")
        print(f"| {start} | {skipped} | {replay:.2f} | {fast:.2f} | {replay / fast:.1f}x | {per} |")


if __name__ == "__main__":
    main()
