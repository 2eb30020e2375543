"""DeCLIP's text augmentations: MLM masking of token ids, and EDA on the raw caption string.

Both follow the DeCLIP reference code (METHODS.md §2) but draw every random number from torch's
RNG, which the loader in ``wds.py`` seeds per (seed, rank, worker, epoch), so runs and resumes are
reproducible:

* ``mlm_mask``: BERT-style masking as the reference's ``mask_tokens`` (15% of the non-special,
  non-padding tokens; 80% ``<|mask|>``, 10% a random id, 10% unchanged), same draw order.
* ``EDA``: one of synonym replacement (1 word), random swap (1 pair), random deletion (p=0.1),
  chosen uniformly per caption, as ``textaugment.EDA`` runs them in the reference. Random insertion
  is not used. ``textaugment`` reseeds Python's global ``random`` to 1 when constructed (so every
  rank draws the same sequence of choices) and crashes on empty captions; this implementation keeps
  a private ``random.Random`` seeded from torch's RNG on every call and never touches the global one.

``MLMView`` and ``EDAView`` are the picklable per-caption text views DeCLIP's sample transform uses.
"""

from __future__ import annotations

import contextlib
import functools
import random
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

__all__ = ["MLMVocab", "mlm_mask", "mlm_mask_batch", "EDA", "MLMView", "EDAView", "wordnet_available", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # label of positions that are not predicted (torch's cross_entropy default)


# --------------------------------------------------------------------------------------------- #
# MLM masking
# --------------------------------------------------------------------------------------------- #
@dataclass(frozen=True)
class MLMVocab:
    """The ids masking needs. ``from_tokenizer(Tokenizer(mask_token=True))`` gives DeCLIP's layout:
    mask 49406, SOT 49407, EOT 49408, 49,409 ids."""

    mask_id: int
    eot_id: int
    special_ids: tuple[int, ...]  # never selected; SOT, EOT and MASK
    vocab_size: int

    @classmethod
    def from_tokenizer(cls, tok) -> "MLMVocab":
        if getattr(tok, "mask_token_id", None) is None:
            raise ValueError(
                "MLM masking needs a tokenizer with the <|mask|> token: Tokenizer(mask_token=True) "
                "(config: model.text.mask_token: true)."
            )
        return cls(int(tok.mask_token_id), int(tok.eot_token_id), tuple(sorted(tok.special_token_ids)),
                   int(tok.vocab_size))


def _as_vocab(vocab) -> MLMVocab:
    return vocab if isinstance(vocab, MLMVocab) else MLMVocab.from_tokenizer(vocab)


def _random_ids(n: int, v: MLMVocab, generator, exclude_special: bool) -> torch.Tensor:
    if not exclude_special:  # the reference: any id, specials included
        return torch.randint(v.vocab_size, (n,), dtype=torch.long, generator=generator)
    ids = torch.randint(v.vocab_size - len(v.special_ids), (n,), dtype=torch.long, generator=generator)
    for s in v.special_ids:  # ascending: shift past each special id in turn
        ids += (ids >= s).long()
    return ids


def mlm_mask(tokens: torch.Tensor, vocab, prob: float = 0.15, generator: Optional[torch.Generator] = None, *,
             random_excludes_special: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of one framed, padded id row, as the DeCLIP reference's ``mask_tokens``.

    tokens: (L,) LongTensor ``[SOT, ids..., EOT, 0, ...]`` from ``Tokenizer(mask_token=True)``.
    vocab: that Tokenizer, or an ``MLMVocab``.
    Returns ``(masked (L,), labels (L,))``: every non-special token up to the last EOT (padding is
    never selected; pad id 0 is also "!", so padding is found by position, not by id) is selected
    with probability ``prob``; a selected token becomes ``<|mask|>`` with p=0.8, a random id with
    p=0.1, stays with p=0.1. ``labels`` holds the original id at selected positions and -100 elsewhere.

    Random ids come from the whole vocabulary, special tokens included, as in the reference. An
    inserted EOT (chance 0.15 x 0.1 / 49,409 = 3e-7 per token) moves the text tower's argmax pooling to
    that earlier position; ``random_excludes_special=True`` draws from the ordinary ids only.
    Draws (in the reference's order) from ``generator``, else torch's global RNG.
    """
    if tokens.dim() != 1:
        raise ValueError(f"mlm_mask takes one (L,) id row, got shape {tuple(tokens.shape)}; map it over rows.")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"mlm_mask: prob must be in [0, 1], got {prob}.")
    v = _as_vocab(vocab)
    tokens = tokens.long()
    eot = (tokens == v.eot_id).nonzero()
    n = int(eot[-1]) + 1 if len(eot) else tokens.numel()  # the unpadded sequence, as the reference masks it
    seq = tokens[:n]
    special = torch.isin(seq, torch.tensor(v.special_ids, dtype=torch.long))
    probs = torch.full((n,), float(prob)).masked_fill_(special, 0.0)
    selected = torch.bernoulli(probs, generator=generator).bool()
    to_mask = torch.bernoulli(torch.full((n,), 0.8), generator=generator).bool() & selected
    to_random = torch.bernoulli(torch.full((n,), 0.5), generator=generator).bool() & selected & ~to_mask
    random_ids = _random_ids(n, v, generator, random_excludes_special)

    masked, labels = tokens.clone(), torch.full_like(tokens, IGNORE_INDEX)
    labels[:n][selected] = seq[selected]
    head = masked[:n]  # a view: edits land in ``masked``
    head[to_mask] = v.mask_id
    head[to_random] = random_ids[to_random]
    return masked, labels


class MLMView:
    """Text view: caption -> ``{"text": masked ids (L,), "mlm_labels": (L,)}`` (picklable)."""

    def __init__(self, tokenizer, prob: float = 0.15, random_excludes_special: bool = False,
                 text_key: str = "text", labels_key: str = "mlm_labels"):
        self.tokenizer, self.prob, self.random_excludes_special = tokenizer, prob, random_excludes_special
        self.vocab = MLMVocab.from_tokenizer(tokenizer)
        self.text_key, self.labels_key = text_key, labels_key

    def __call__(self, caption: str) -> dict[str, torch.Tensor]:
        masked, labels = mlm_mask(self.tokenizer([caption])[0], self.vocab, self.prob,
                                  random_excludes_special=self.random_excludes_special)
        return {self.text_key: masked, self.labels_key: labels}


# --------------------------------------------------------------------------------------------- #
# EDA
# --------------------------------------------------------------------------------------------- #
# NLTK's English stop-word list, used when WordNet is installed but the stopwords corpus is not.
_FALLBACK_STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves
he him his himself she she's her hers herself it it's its itself they them their theirs themselves
what which who whom this that that'll these those am is are was were be been being have has had
having do does did doing a an the and but if or because as until while of at by for with about
against between into through during before after above below to from up down in out on off over
under again further then once here there when where why how all any both each few more most other
some such no nor not only own same so than too very s t can will just don don't should should've
now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn
hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn
shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())

WORDNET_INSTALL_HINT = "python -m nltk.downloader wordnet omw-1.4 stopwords"
_warned_no_wordnet = False


@contextlib.contextmanager
def _global_random_untouched():
    """Importing NLTK draws from Python's global ``random`` (its ``rich`` dependency does at import):
    restore the state so that this module never changes it."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


@functools.lru_cache(maxsize=1)
def _wordnet():
    """NLTK's WordNet reader when its data is installed, else None (checked once per process)."""
    with _global_random_untouched():
        try:
            from nltk.corpus import wordnet

            wordnet.ensure_loaded()
            return wordnet
        except (ImportError, LookupError, OSError):
            return None


def wordnet_available() -> bool:
    return _wordnet() is not None


@functools.lru_cache(maxsize=1)
def _english_stopwords() -> frozenset:
    with _global_random_untouched():
        try:
            from nltk.corpus import stopwords

            return frozenset(stopwords.words("english"))
        except (ImportError, LookupError, OSError):
            return _FALLBACK_STOPWORDS


@functools.lru_cache(maxsize=1 << 16)
def wordnet_synonyms(word: str) -> tuple[str, ...]:
    """``textaugment.EDA._get_synonyms``: lemma names of every synset of ``word``, '_' and '-' as
    spaces, lower-cased, only ``a-z`` and spaces kept, ``word`` itself removed. Sorted (the reference
    returns an unordered set, which made its choice depend on string hashing) and without empty
    strings (which would delete the word). Empty without WordNet data."""
    wn = _wordnet()
    if wn is None:
        return ()
    allowed = set(" qwertyuiopasdfghjklzxcvbnm")
    synonyms = set()
    for syn in wn.synsets(word):
        for lemma in syn.lemmas():
            name = lemma.name().replace("_", " ").replace("-", " ").lower()
            synonyms.add("".join(c for c in name if c in allowed))
    synonyms.discard(word)
    synonyms.discard("")
    return tuple(sorted(synonyms))


def _torch_seed(generator: Optional[torch.Generator]) -> int:
    """A 62-bit seed drawn from ``generator`` or torch's global RNG (the loader seeds it per worker)."""
    return int(torch.randint(0, 1 << 62, (1,), dtype=torch.long, generator=generator))


class EDA:
    """EDA as DeCLIP runs it: per caption, one of synonym replacement (``sr_n`` words), random swap
    (``rs_n`` swaps) and random deletion (each word with p=``rd_p``), chosen uniformly.

    synonyms: ``word -> iterable of synonyms``; None = WordNet through NLTK when its data is
        installed. Without any source, synonym replacement is left out (a one-time warning says how
        to install WordNet) and the choice is between the other two operations.
    stopwords: words synonym replacement never picks (default: NLTK's English list).

    ``eda(caption, generator=None) -> str``: the private ``random.Random`` is seeded from
    ``generator`` or torch's global RNG on every call. Python's global ``random`` is never used.
    Empty and whitespace-only captions are returned unchanged; the result is never empty otherwise.
    """

    OPS = ("synonym_replacement", "random_swap", "random_deletion")

    def __init__(self, synonyms: Optional[Callable[[str], Iterable[str]]] = None,
                 stopwords: Optional[Iterable[str]] = None, sr_n: int = 1, rs_n: int = 1, rd_p: float = 0.1):
        if not 0.0 <= rd_p <= 1.0:
            raise ValueError(f"EDA: rd_p must be in [0, 1], got {rd_p}.")
        self._synonyms = synonyms
        self._stopwords = frozenset(stopwords) if stopwords is not None else None
        self.sr_n, self.rs_n, self.rd_p = int(sr_n), int(rs_n), float(rd_p)

    # -------------------------------------------------------------- sources (resolved lazily, per process)
    def synonyms(self, word: str) -> list[str]:
        if self._synonyms is not None:
            return sorted({s for s in self._synonyms(word) if s and s != word})
        return list(wordnet_synonyms(word))

    @property
    def stopwords(self) -> frozenset:
        return self._stopwords if self._stopwords is not None else _english_stopwords()

    def has_synonyms(self) -> bool:
        if self._synonyms is not None or wordnet_available():
            return True
        global _warned_no_wordnet
        if not _warned_no_wordnet:
            _warned_no_wordnet = True
            warnings.warn(
                "EDA: NLTK's WordNet data is not installed, so DeCLIP's synonym replacement is skipped and "
                "each caption gets a random swap or a random deletion instead. For the reference behaviour "
                f"install it on every training node: {WORDNET_INSTALL_HINT}", RuntimeWarning, stacklevel=2)
        return False

    def operations(self) -> tuple[str, ...]:
        return self.OPS if self.has_synonyms() else self.OPS[1:]

    # -------------------------------------------------------------- the augmentation
    def __call__(self, caption: str, generator: Optional[torch.Generator] = None) -> str:
        rng = random.Random(_torch_seed(generator))
        if not caption.split():
            return caption
        op = rng.choice(self.operations())
        return getattr(self, op)(caption, rng)

    def synonym_replacement(self, caption: str, rng: random.Random) -> str:
        """Replace every occurrence of up to ``sr_n`` random non-stop-words that have synonyms by one
        random synonym each (``textaugment.EDA.synonym_replacement``)."""
        words = caption.split()
        stop = self.stopwords
        candidates = [w for w in dict.fromkeys(words) if w not in stop]  # unique, first-seen order
        rng.shuffle(candidates)
        replaced = 0
        for word in candidates:
            if replaced >= self.sr_n:
                break
            synonyms = self.synonyms(word)
            if synonyms:
                synonym = rng.choice(synonyms)
                words = [synonym if w == word else w for w in words]
                replaced += 1
        return " ".join(words) if words else caption

    def random_swap(self, caption: str, rng: random.Random) -> str:
        """Swap two random words, ``rs_n`` times; gives up on a swap after 4 draws of the same index
        (so a one-word caption comes back unchanged), as ``textaugment.EDA.swap_word``."""
        words = caption.split()
        if not words:
            return caption
        for _ in range(self.rs_n):
            i = j = rng.randint(0, len(words) - 1)
            for _ in range(4):
                j = rng.randint(0, len(words) - 1)
                if j != i:
                    break
            words[i], words[j] = words[j], words[i]
        return " ".join(words)

    def random_deletion(self, caption: str, rng: random.Random) -> str:
        """Drop each word with probability ``rd_p``; a one-word caption is kept, and if every word
        went, one random word is returned (``textaugment.EDA.random_deletion``)."""
        words = caption.split()
        if len(words) <= 1:
            return " ".join(words) if words else caption
        kept = [w for w in words if rng.uniform(0, 1) > self.rd_p]
        return " ".join(kept) if kept else rng.choice(words)


class CaptionView:
    """Text view: caption -> its ids (L,).

    A class rather than a lambda so that a method's sample transform pickles: DataLoader workers
    started by spawn or forkserver (Python 3.14's default on Linux) receive the dataset pickled.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, caption: str) -> torch.Tensor:
        return self.tokenizer([caption])[0]


class EDAView:
    """Text view: caption -> ids (L,) of its EDA augmentation (or of the caption, ``eda=None``)."""

    def __init__(self, tokenizer, eda: Optional[EDA] = None):
        self.tokenizer, self.eda = tokenizer, eda

    def __call__(self, caption: str) -> torch.Tensor:
        text = self.eda(caption) if self.eda is not None else caption
        return self.tokenizer([text])[0]


def mlm_mask_batch(tokens: torch.Tensor, vocab, prob: float = 0.15, generator: Optional[torch.Generator] = None,
                   *, random_excludes_special: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``mlm_mask`` over the rows of a (B, L) tensor, in row order."""
    rows = [mlm_mask(t, vocab, prob, generator, random_excludes_special=random_excludes_special) for t in tokens]
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
