"""Benchmark: declip_ds Tokenizer vs open_clip SimpleTokenizer on 4,096 varied captions.

Run:  python benchmarks/bench_tokenizer.py [--batch 4096] [--runs 5]

Captions are synthetic but realistic: Zipf-distributed words drawn from CLIP's own BPE vocabulary
(so the word caches see real repetition and real misses), ~10% non-ASCII (accents, CJK, emoji),
some URLs, numbers, HTML entities and a few over-long captions. Scenarios, median of --runs:

* warm:   the same batch again on one instance (every word cached).
* stream: a new batch each run on one long-lived instance (the DataLoader steady state).
* cold:   a new batch on a freshly built instance (empty caches; the constructor is not timed,
          but our lazy HF BPE-model build on the first call is).
* single: stream, but one caption per call, as a Dataset.__getitem__ would do.

Both tokenizers' outputs are checked to be identical before timing.
"""

import argparse
import os
import random
import statistics
import sys
import time

import torch

# Allow `python benchmarks/bench_tokenizer.py` from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from declip_ds.data.tokenizer import Tokenizer, _bpe_vocab, _needs_fixing

_EXTRA = [
    "café", "naïve", "Zürich", "東京タワー", "一只猫", "서울", "😀", "🐶🐶", "👍🏽", "&amp;", "&quot;hi&quot;",
    "https://example.com/a?b=1", "#sunset", "@user", "1,234", "2024", "3rd", "don't", "it's", "I’m", "!!!", "...",
]


def _word_pool(rng: random.Random, size: int = 30000) -> list:
    """Alphabetic whole words from CLIP's vocabulary, shuffled; index = Zipf rank."""
    words = [s[:-4] for s in _bpe_vocab() if s.endswith("</w>") and s[:-4].isascii() and s[:-4].isalpha()]
    rng.shuffle(words)
    return words[:size]


def make_captions(n: int, seed: int) -> list:
    rng = random.Random(seed)
    pool = _word_pool(random.Random(0))
    weights = [1.0 / (rank + 1) for rank in range(len(pool))]
    caps = []
    for _ in range(n):
        length = rng.randint(40, 120) if rng.random() < 0.02 else rng.randint(4, 25)
        words = rng.choices(pool, weights=weights, k=length)
        for i in range(len(words)):
            if rng.random() < 0.05:
                words[i] = rng.choice(_EXTRA)
        caption = " ".join(words)
        caps.append(caption.capitalize() + rng.choice(["", ".", "!"]) if rng.random() < 0.5 else caption)
    return caps


def _median_time(fn, runs: int) -> float:
    times = []
    for i in range(runs):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from open_clip.tokenizer import SimpleTokenizer

    batches = [make_captions(args.batch, seed) for seed in range(args.runs + 1)]
    ours, theirs = Tokenizer(), SimpleTokenizer()
    assert torch.equal(ours(batches[0]), theirs(batches[0])), "outputs differ from open_clip"
    n_long = sum(int(row[-1]) != 0 for row in theirs(batches[0]))
    n_ftfy = sum(map(_needs_fixing, batches[0]))  # non-ASCII or '&': both tokenizers run ftfy
    print(f"{args.batch} captions/batch ({n_ftfy} need ftfy, {n_long} truncated), "
          f"median of {args.runs} runs, torch threads=1")

    def scenarios(make, call):
        inst = make()
        inst_single = make()
        call(inst, batches[0])  # warm-up batch for the warm/stream instances
        call(inst_single, batches[0])
        fresh = [make() for _ in range(args.runs)]
        return {
            "warm": _median_time(lambda i: call(inst, batches[0]), args.runs),
            "stream": _median_time(lambda i: call(inst, batches[i + 1]), args.runs),
            "cold": _median_time(lambda i: call(fresh[i], batches[i + 1]), args.runs),
            "single": _median_time(lambda i: [call(inst_single, c) for c in batches[i + 1]], args.runs),
        }

    rows = {
        "declip_ds.Tokenizer": scenarios(Tokenizer, lambda t, x: t(x)),
        "open_clip.SimpleTokenizer": scenarios(SimpleTokenizer, lambda t, x: t(x)),
    }
    print(f"{'captions/s':<27}" + "".join(f"{k:>12}" for k in ("warm", "stream", "cold", "single")))
    for name, res in rows.items():
        print(f"{name:<27}" + "".join(f"{args.batch / res[k]:>12,.0f}" for k in ("warm", "stream", "cold", "single")))
    base, ours_res = rows["open_clip.SimpleTokenizer"], rows["declip_ds.Tokenizer"]
    print(f"{'speed-up':<27}" + "".join(f"{base[k] / ours_res[k]:>11.1f}x" for k in ("warm", "stream", "cold", "single")))


if __name__ == "__main__":
    main()
