"""OpenAI CLIP byte-level BPE tokenizer, id-for-id identical to open_clip's ``SimpleTokenizer``.

Usage::

    tok = Tokenizer(context_length=77)             # 49,408 ids, SOT=49406, EOT=49407
    tok(["a photo of a cat", "a dog"])             # LongTensor (2, 77)
    tok_mlm = Tokenizer(mask_token=True)           # DeCLIP layout: MASK=49406, SOT=49407, EOT=49408

Pipeline for one caption, and why each stage lives where it does:

1. **Clean** (Python): ``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapse, lower-case,
   exactly as CLIP. Printable-ASCII text without ``&`` skips ftfy/html, which are the identity on
   such text but cost about a third of open_clip's runtime.
2. **Pre-tokenise** (Python ``regex``, the engine CLIP uses) with CLIP's pattern. HF ``tokenizers``
   has a ``Split`` pre-tokenizer, but its Oniguruma engine ships older Unicode tables: 4,658 code
   points (e.g. U+0345, scripts added in Unicode 16) fall in different ``\\p{L}``/``\\p{N}`` classes
   than in ``regex``, so ids would diverge from open_clip on such text.
3. **BPE** per distinct word, memoised in a bounded word -> ids dict; a batch's cache misses go to
   HF ``tokenizers`` (Rust) in one call. Without ``tokenizers`` a pure-Python BPE does the same job.
4. **Frame**: ``[SOT] + ids[:context_length - 2] + [EOT]``, right-padded with 0.

Literal ``<start_of_text>`` / ``<end_of_text>`` in a caption become the SOT/EOT ids when CLIP's
regex isolates them, because open_clip does that too (parity is the contract of this module).
"""

from __future__ import annotations

import array
import functools
import gzip
import html
import itertools
import threading
from importlib import resources
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import ftfy
import regex
import torch

__all__ = ["Tokenizer", "clean_text"]

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps only the first 49152 - 256 - 2 merges, so that 256 byte symbols, their 256 end-of-word
# variants, the merges and the 2 special tokens add up to 49,408 ids.
_NUM_MERGES = 49152 - 256 - 2
_EOW = "</w>"  # end-of-word suffix CLIP appends to the last symbol of every word
_SOT, _EOT, _MASK = "<start_of_text>", "<end_of_text>", "<|mask|>"  # open_clip's spellings
# open_clip's pattern (OpenAI CLIP's with open_clip's special-token spelling); IGNORECASE matters
# even after lower-casing: e.g. "'\u017f" (long s) matches the "'s" alternative.
_PATTERN = regex.compile(
    rf"{_SOT}|{_EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE,
)


# --------------------------------------------------------------------------------------------- #
# Vocabulary
# --------------------------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=None)
def _byte_to_unicode() -> Dict[int, str]:
    """Reversible map from each of the 256 byte values to a printable unicode character.

    Printable latin-1 bytes map to themselves; the other 68 (controls, space, NBSP, soft hyphen)
    map to U+0100.. in byte order, so the BPE never sees whitespace or control characters.
    Insertion order (printable bytes first) is the order of CLIP's first 256 vocabulary ids.
    """
    table = {b: chr(b) for b in [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(0x100 + i) for i, b in enumerate(others)})
    return table


@functools.lru_cache(maxsize=None)
def _merges() -> Tuple[Tuple[str, str], ...]:
    """CLIP's BPE merges, in rank order (48,894 pairs), read from the packaged merges file."""
    data = resources.files(__package__).joinpath(_BPE_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES])  # line 0: header


@functools.lru_cache(maxsize=None)
def _bpe_vocab() -> Tuple[str, ...]:
    """The 49,406 ordinary BPE symbols in id order: bytes, bytes + "</w>", then one per merge."""
    symbols = list(_byte_to_unicode().values())
    symbols += [s + _EOW for s in symbols]
    symbols += ["".join(pair) for pair in _merges()]
    return tuple(symbols)


# --------------------------------------------------------------------------------------------- #
# Text cleaning
# --------------------------------------------------------------------------------------------- #
def _needs_fixing(text: str) -> bool:
    """False when ftfy and html.unescape are provably the identity on ``text``.

    That holds for printable ASCII (U+0020..U+007E) without '&': ftfy only rewrites non-ASCII,
    control characters, escapes and entities, and html.unescape only acts on '&'.
    """
    return not (text.isascii() and text.isprintable() and "&" not in text)


def clean_text(text: str) -> str:
    """CLIP's text normalisation: ftfy, double HTML unescape, whitespace collapse, lower-case."""
    if _needs_fixing(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    # str.split() with no argument splits on all unicode whitespace and drops the ends (= strip).
    return " ".join(text.split()).lower()


# --------------------------------------------------------------------------------------------- #
# BPE back-ends: word list -> list of id lists. Words are raw (not byte-encoded) and non-empty.
# --------------------------------------------------------------------------------------------- #
class _HFBackend:
    """BPE of whole word lists in one Rust call (HF ``tokenizers``)."""

    def __init__(self, vocab: Dict[str, int]):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers

        model = models.BPE(vocab=vocab, merges=list(_merges()), end_of_word_suffix=_EOW)
        self._tok = HFTokenizer(model)
        # Words arrive pre-split; ByteLevel without its GPT-2 regex only applies the byte->unicode
        # map, which is the same table as _byte_to_unicode().
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def __call__(self, words: List[str]) -> List[List[int]]:
        # One sequence for all words: HF's per-call overhead (~10 us) dwarfs the BPE of one word.
        # encode() (not encode_batch) never starts HF's thread pool, so forking DataLoader
        # workers afterwards is safe and silent.
        enc = self._tok.encode(words, is_pretokenized=True, add_special_tokens=False)
        out: List[List[int]] = [[] for _ in words]
        for token_id, word_index in zip(enc.ids, enc.word_ids):
            out[word_index].append(token_id)
        return out


class _PythonBackend:
    """Reference pure-Python BPE (CLIP's algorithm), used when ``tokenizers`` is unavailable."""

    def __init__(self, vocab: Dict[str, int]):
        self._vocab = vocab
        self._ranks = {pair: rank for rank, pair in enumerate(_merges())}
        self._byte_map = _byte_to_unicode()

    def __call__(self, words: List[str]) -> List[List[int]]:
        return [self._word(w) for w in words]

    def _word(self, word: str) -> List[int]:
        chars = [self._byte_map[b] for b in word.encode("utf-8")]
        symbols = chars[:-1] + [chars[-1] + _EOW]
        while len(symbols) > 1:
            # Merge the lowest-ranked adjacent pair everywhere, until no pair is a known merge.
            best = min(zip(symbols, symbols[1:]), key=lambda p: self._ranks.get(p, _NO_MERGE))
            if best not in self._ranks:
                break
            symbols = _merge_pair(symbols, best)
        return [self._vocab[s] for s in symbols]


_NO_MERGE = float("inf")


def _merge_pair(symbols: List[str], pair: Tuple[str, str]) -> List[str]:
    """Replace every non-overlapping occurrence of ``pair`` (scanning left to right) by its merge."""
    first, second = pair
    out, i, n = [], 0, len(symbols)
    while i < n:
        if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
            out.append(first + second)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _make_backend(name: str, vocab: Dict[str, int]):
    """The BPE engine ``name`` ("auto", "hf" or "python"); "auto" prefers HF."""
    if name == "python":
        return _PythonBackend(vocab)
    try:
        return _HFBackend(vocab)
    except ImportError:
        if name == "hf":
            raise
        return _PythonBackend(vocab)


# --------------------------------------------------------------------------------------------- #
# Public tokenizer
# --------------------------------------------------------------------------------------------- #
TextInput = Union[str, Sequence[str]]


class Tokenizer:
    """CLIP BPE tokenizer returning fixed-length id tensors.

    Args:
        context_length: length of every output row, SOT and EOT included (>= 2). CLIP uses 77.
        mask_token: add ``<|mask|>`` the DeCLIP way (MASK=49406, SOT=49407, EOT=49408, 49,409 ids).
            Ordinary BPE ids (< 49406) are the same either way.
        backend: BPE engine for words not yet cached: ``"auto"`` (HF ``tokenizers`` if importable,
            else Python), ``"hf"`` or ``"python"``. All give identical ids.
        cache_size: soft bound on the word -> ids memo; it is emptied when a batch starts above it.

    Calling it maps ``str`` -> LongTensor (1, context_length) and a sequence of N ``str`` ->
    LongTensor (N, context_length): ``[SOT, bpe..., EOT, 0, 0, ...]``; text longer than
    ``context_length - 2`` BPE tokens is truncated so that EOT stays in the last slot.

    Instances pickle cheaply (only settings travel; caches and the HF model rebuild lazily), so one
    can be handed to DataLoader workers. One instance may be shared by threads.
    """

    pad_token_id = 0  # CLIP pads with 0 (which is also the id of "!"); rows end at EOT.

    def __init__(
        self,
        context_length: int = 77,
        mask_token: bool = False,
        *,
        backend: str = "auto",
        cache_size: int = 1 << 16,
    ):
        self.context_length = _check_context_length(context_length)
        self.mask_token = bool(mask_token)
        if backend not in ("auto", "hf", "python"):
            raise ValueError(f"backend must be 'auto', 'hf' or 'python', got {backend!r}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self._backend_name, self._cache_size = backend, int(cache_size)

        bpe = _bpe_vocab()
        specials = [_MASK, _SOT, _EOT] if self.mask_token else [_SOT, _EOT]
        self._id_to_symbol: Tuple[str, ...] = bpe + tuple(specials)
        self.vocab_size = len(self._id_to_symbol)
        self.mask_token_id: Optional[int] = len(bpe) if self.mask_token else None
        self.sot_token_id = self.vocab_size - 2
        self.eot_token_id = self.vocab_size - 1

        self._backend = None  # built on first cache miss (costs ~50 ms and is not worth pickling)
        self._words: Dict[str, Tuple[int, ...]] = {}
        self._reset_cache()
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- #
    @property
    def special_token_ids(self) -> Set[int]:
        """Ids of SOT, EOT and (with ``mask_token``) MASK. Pad (0) is excluded: it is also "!"."""
        ids = {self.sot_token_id, self.eot_token_id}
        if self.mask_token_id is not None:
            ids.add(self.mask_token_id)
        return ids

    def __call__(self, texts: TextInput, context_length: Optional[int] = None) -> torch.LongTensor:
        """Tokenise ``texts`` (str or N strs) into a LongTensor (N, context_length), N=1 for a str."""
        texts = _as_text_list(texts)
        length = self.context_length if context_length is None else _check_context_length(context_length)
        # Every word yields >= 1 id, so words beyond the first length-2 can never be kept.
        words = [_PATTERN.findall(clean_text(t))[: length - 2] for t in texts]
        with self._lock:
            self._fill_cache(words)
            rows = [self._frame(w, length) for w in words]
        return _pad(rows, length, self.pad_token_id)

    def encode(self, text: str) -> List[int]:
        """BPE ids of ``text`` without SOT/EOT and without truncation; list of length n_tokens."""
        (text,) = _as_text_list([text])
        words = _PATTERN.findall(clean_text(text))
        with self._lock:
            self._fill_cache([words])
            get = self._words.__getitem__
            return list(itertools.chain.from_iterable(map(get, words)))

    def decode(self, ids: Union[Iterable[int], torch.Tensor], skip_special_tokens: bool = False) -> str:
        """Text of 1-D ``ids`` (list or tensor), rendered like open_clip (each word + " ").

        With ``skip_special_tokens`` SOT/MASK are dropped and decoding stops at the first EOT,
        so padding (id 0, which would read "!") is ignored.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D id sequence, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = self._strip_specials(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids out of range [0, {self.vocab_size}): {bad[:5]}")
        byte_of = _unicode_to_byte()
        data = bytes(byte_of[c] for c in "".join(self._id_to_symbol[i] for i in ids))
        return data.decode("utf-8", errors="replace").replace(_EOW, " ")

    # ----------------------------------------------------------------------------------------- #
    def _reset_cache(self) -> None:
        self._words.clear()
        # Exactly what open_clip's BPE cache pre-seeds: these words map to the special ids.
        self._words[_SOT] = (self.sot_token_id,)
        self._words[_EOT] = (self.eot_token_id,)

    def _fill_cache(self, word_lists: List[List[str]]) -> None:
        """Ensure every word of ``word_lists`` has its ids in the memo (one backend call)."""
        if len(self._words) > self._cache_size:
            self._reset_cache()  # emptied before, never during, a batch: all its words stay
        memo = self._words
        missing = list({w for words in word_lists for w in words if w not in memo})
        if not missing:
            return
        if self._backend is None:
            self._backend = _make_backend(self._backend_name, _symbol_to_id())
        for word, ids in zip(missing, self._backend(missing)):
            memo[word] = tuple(ids)

    def _frame(self, words: List[str], length: int) -> List[int]:
        """[SOT] + first length-2 BPE ids of ``words`` + [EOT]; at most ``length`` ids."""
        ids = itertools.chain.from_iterable(map(self._words.__getitem__, words))
        return [self.sot_token_id, *itertools.islice(ids, length - 2), self.eot_token_id]

    def _strip_specials(self, ids: List[int]) -> List[int]:
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        return [i for i in ids if i not in (self.sot_token_id, self.mask_token_id)]

    # Pickle only the settings: the memo and HF model are rebuilt lazily in the receiving process.
    def __getstate__(self) -> dict:
        return {
            "context_length": self.context_length,
            "mask_token": self.mask_token,
            "backend": self._backend_name,
            "cache_size": self._cache_size,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(context_length={self.context_length}, "
            f"mask_token={self.mask_token}, vocab_size={self.vocab_size})"
        )


# --------------------------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=None)
def _symbol_to_id() -> Dict[str, int]:
    """Ordinary BPE symbol -> id (specials excluded: the memo handles them)."""
    return {s: i for i, s in enumerate(_bpe_vocab())}


@functools.lru_cache(maxsize=None)
def _unicode_to_byte() -> Dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


def _check_context_length(length) -> int:
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"context_length must be an int, got {type(length).__name__}")
    if length < 2:
        raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {length}")
    return length


def _as_text_list(texts: TextInput) -> List[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise TypeError("expected str or a sequence of str, got bytes; decode it first")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
    return texts


def _pad(rows: List[List[int]], length: int, pad_id: int) -> torch.LongTensor:
    """Right-pad id rows (each <= length) into a LongTensor (len(rows), length)."""
    padding = [pad_id] * length
    # array('q') + frombuffer is ~4x faster than torch.tensor(list) and avoids a copy; the tensor
    # keeps the array alive, and can still be moved to shared memory by DataLoader workers.
    flat = array.array("q")
    for row in rows:
        flat.extend(row)
        flat.extend(padding[: length - len(row)])
    if not flat:  # frombuffer rejects empty buffers
        return torch.zeros(len(rows), length, dtype=torch.long)
    return torch.frombuffer(flat, dtype=torch.long).view(len(rows), length)
