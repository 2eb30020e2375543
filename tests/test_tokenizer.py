"""Tests for declip_ds.data.tokenizer: open_clip parity, framing, truncation, mask-token layout."""

import html
import pickle
import random

import ftfy
import pytest
import torch

from declip_ds.data.tokenizer import Tokenizer, _needs_fixing, clean_text

SEED = 1234
N_CAPTIONS = 2400

# --------------------------------------------------------------------------------------------- #
# Deterministic caption generator covering the categories CLIP tokenisation must get right.
# --------------------------------------------------------------------------------------------- #
_WORDS = (
    "a an the photo picture image of on in with and near over under dog cat bird car truck "
    "street beach mountain river city night sunset red blue green large small old young man "
    "woman child people playing running sitting standing table chair food pizza coffee sky "
    "tree flowers snow rain boat airplane train bicycle horse sheep cow elephant giraffe zebra"
).split()
_ACCENTED = "café naïve façade résumé Ångström Zürich São Paulo piñata crème brûlée Ærø Łódź İstanbul straße Ὀδυσσεύς Москва Київ".split()
_SCRIPTS = [
    "東京タワーの夜景", "一只猫坐在桌子上", "서울의 거리 풍경", "กรุงเทพมหานคร", "مرحبا بالعالم",
    "नमस्ते दुनिया", "שלום עולם", "ᚠᚢᚦᚨᚱᚲ", "Ελληνικά γράμματα", "ⓗⓔⓛⓛⓞ", "𝕳𝖊𝖑𝖑𝖔 𝓌𝑜𝓇𝓁𝒹",
]
_EMOJI = ["😀", "🐶", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🔥🔥🔥", "✨", "🏳️‍🌈", "☕"]
_URLS = [
    "https://example.com/path?q=1&r=2#frag", "http://www.flickr.com/photos/12345/", "www.foo-bar.org",
    "user.name+tag@mail.example.co.uk", "#sunset", "@john_doe", "C:\\Users\\img_0001.JPG",
]
_ENTITIES = ["&amp;", "&lt;b&gt;", "&#39;", "&quot;", "&nbsp;", "&amp;amp;", "&eacute;", "&#x1F600;", "<b>bold</b>", "&"]
_NUMBERS = ["1,234.56", "3rd", "2024-01-01", "½", "x²", "Ⅻ", "٣٤٥", "१२३", "10%", "$5.99", "007", "3.14159"]
_PUNCT = ["!!!", "...", "?!?!", "---", "***", "~~~", "((", "))", "“quoted”", "‘single’", "…", "«»", "—", "|", "_"]
_CONTRACTIONS = ["don't", "I'm", "you're", "we've", "she'll", "he'd", "it's", "DON'T", "I’M", "can't", "'s'", "'ſt"]
_ODD = [
    "cafÃ©", "â€œmojibakeâ€\x9d", "ﬁsh ﬂower", "ＦＵＬＬＷＩＤＴＨ", "e\u0301", "a\u200db", "x\u0345y",
    "\x00\x07ctrl\x1b[31m", "\udc80", "tab\tnew\nline\r\n", "<start_of_text>", "<end_of_text>",
    "x<end_of_text>", "!<start_of_text>", "<|startoftext|>", "<|mask|>", "<START_OF_TEXT>",
    "\u2028\u3000\xa0", "\U00010940\U00010941", "\u088f\ua7ce",
]
_SPACES = ["", " ", "   ", "\t", "\n\n", "\u3000", "\xa0", " \t\r\n "]
_CATEGORIES = [_WORDS, _ACCENTED, _SCRIPTS, _EMOJI, _URLS, _ENTITIES, _NUMBERS, _PUNCT, _CONTRACTIONS, _ODD]


def _random_codepoints(rng: random.Random, n: int) -> str:
    """Random characters from all planes (surrogates excluded), biased towards low planes."""
    out = []
    for _ in range(n):
        cp = rng.choice([rng.randrange(0x20, 0x800), rng.randrange(0x800, 0x10000), rng.randrange(0x10000, 0x110000)])
        out.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "?")
    return "".join(out)


def _caption(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.03:
        return rng.choice(_SPACES)
    if kind < 0.08:  # very long: well past 77 tokens
        return " ".join(rng.choice(rng.choice(_CATEGORIES)) for _ in range(rng.randint(60, 400)))
    if kind < 0.14:
        return _random_codepoints(rng, rng.randint(1, 40))
    if kind < 0.20:  # printable ASCII soup (exercises the ftfy-skipping fast path)
        return "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(rng.randint(1, 60)))
    parts = []
    for _ in range(rng.randint(1, 25)):
        pool = _WORDS if rng.random() < 0.6 else rng.choice(_CATEGORIES)
        word = rng.choice(pool)
        parts.append(word.upper() if rng.random() < 0.1 else word.capitalize() if rng.random() < 0.1 else word)
    sep = rng.choice([" ", " ", " ", "", "  ", "\t", ", "])
    return sep.join(parts) + rng.choice(["", ".", "!", " ?", "..."])


@pytest.fixture(scope="module")
def captions():
    rng = random.Random(SEED)
    caps = [_caption(rng) for _ in range(N_CAPTIONS)]
    caps += [s for cat in _CATEGORIES for s in cat] + _SPACES  # every listed sample at least once
    return caps


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def reference():
    open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
    return open_clip_tokenizer.SimpleTokenizer()


# --------------------------------------------------------------------------------------------- #
# Parity with open_clip
# --------------------------------------------------------------------------------------------- #
def test_caption_set_is_varied(captions):
    assert len(captions) >= 2000
    assert sum(len(c) > 1000 for c in captions) >= 20  # genuinely long captions present


@pytest.mark.parametrize("backend", ["hf", "python"])
def test_parity_with_open_clip(captions, reference, backend):
    ours = Tokenizer(backend=backend)(captions)
    theirs = reference(captions)
    assert ours.dtype == torch.long and ours.shape == theirs.shape == (len(captions), 77)
    mismatched = [c for c, a, b in zip(captions, ours, theirs) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} captions differ, e.g. {mismatched[:3]!r}"
    assert (theirs[:, 76] != 0).sum() > 0  # some rows really were truncated


def test_encode_parity_untruncated(captions, reference, tok):
    for c in captions[:500] + [c for c in captions if len(c) > 1000]:
        assert tok.encode(c) == reference.encode(c), repr(c)


@pytest.mark.parametrize("length", [2, 3, 16, 100])
def test_parity_other_context_lengths(captions, reference, length):
    ours = Tokenizer(context_length=length)(captions[:300])
    assert torch.equal(ours, reference(captions[:300], context_length=length))


def test_parity_with_tiny_cache(captions, reference):
    # The memo is emptied between batches; results must not depend on it.
    tok = Tokenizer(cache_size=8)
    for start in range(0, 400, 50):
        batch = captions[start : start + 50]
        assert torch.equal(tok(batch), reference(batch))


def test_fast_path_is_identity_where_used():
    rng = random.Random(SEED)
    printable = [chr(c) for c in range(0x20, 0x7F)]
    samples = ["".join(rng.choices(printable, k=rng.randint(0, 80))) for _ in range(2000)]
    skipped = [s for s in samples if not _needs_fixing(s)]
    assert len(skipped) > 1000
    for s in skipped:
        assert html.unescape(html.unescape(ftfy.fix_text(s))) == s
    assert _needs_fixing("a &amp; b") and _needs_fixing("café") and _needs_fixing("a\tb")


# --------------------------------------------------------------------------------------------- #
# Framing, truncation, API
# --------------------------------------------------------------------------------------------- #
def test_sot_eot_pad_positions(tok):
    ids = tok.encode("a photo of a cat")
    row = tok("a photo of a cat")[0].tolist()
    n = len(ids)
    assert row[0] == tok.sot_token_id == 49406
    assert row[1 : n + 1] == ids
    assert row[n + 1] == tok.eot_token_id == 49407
    assert row[n + 2 :] == [tok.pad_token_id] * (77 - n - 2) and tok.pad_token_id == 0
    assert tok("")[0, :3].tolist() == [49406, 49407, 0]
    assert torch.equal(tok(" \t\n "), tok(""))


def test_truncation_keeps_eot_last(tok):
    text = " ".join(f"word{i}" for i in range(200))
    ids = tok.encode(text)
    assert len(ids) > 77
    row = tok(text)[0].tolist()
    assert row[0] == tok.sot_token_id and row[-1] == tok.eot_token_id
    assert row[1:-1] == ids[:75]
    assert tok(text, context_length=10)[0].tolist() == [tok.sot_token_id, *ids[:8], tok.eot_token_id]
    assert tok(text, context_length=2)[0].tolist() == [tok.sot_token_id, tok.eot_token_id]


def test_exact_fit_is_not_truncated(tok):
    ids = tok.encode("one two three four five")
    row = tok("one two three four five", context_length=len(ids) + 2)[0].tolist()
    assert row == [tok.sot_token_id, *ids, tok.eot_token_id]


def test_single_string_and_batches(tok):
    single = tok("a dog on a beach")
    assert single.shape == (1, 77) and single.dtype == torch.long
    batch = tok(["a dog on a beach", "a cat"])
    assert torch.equal(batch[0:1], single)
    assert tok(("a cat",)).shape == (1, 77)
    assert tok([]).shape == (0, 77)
    out = tok(["a", "b"])
    out.share_memory_()  # what DataLoader workers do with returned tensors
    out[0, 0] = 5
    assert out.is_contiguous() and out[0, 0] == 5


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == 49408 and tok.context_length == 77
    assert tok.mask_token_id is None
    assert tok.special_token_ids == {49406, 49407}


def test_decode_round_trip(tok):
    # Digits are single-character words in CLIP, so "42" would decode as "4 2".
    for text in ["a photo of a cat", "two dogs playing in the snow", "hello world 7"]:
        assert tok.decode(tok.encode(text)).strip() == text
    row = tok("a photo of a cat")[0]
    assert tok.decode(row, skip_special_tokens=True).strip() == "a photo of a cat"
    assert tok.decode(row[:3]).startswith("<start_of_text>")
    assert tok.decode(tok.encode("Café, 東京 😀!")).replace(" ", "") == "café,東京😀!"


def test_decode_matches_open_clip(reference, tok):
    ids = tok.encode("Hello, wörld! 東京 don't 😀")
    assert tok.decode(ids) == reference.decode(ids)


def test_errors(tok):
    for bad in (1, 0, -5):
        with pytest.raises(ValueError, match="context_length"):
            Tokenizer(context_length=bad)
    with pytest.raises(TypeError):
        Tokenizer(context_length=77.0)
    with pytest.raises(ValueError, match="context_length"):
        tok("a cat", context_length=1)
    with pytest.raises(TypeError):
        tok(None)
    with pytest.raises(TypeError):
        tok(["ok", 3])
    with pytest.raises(TypeError):
        tok(b"bytes")
    with pytest.raises(ValueError, match="backend"):
        Tokenizer(backend="rust")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([49408])


def test_pickle_round_trip(captions, tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert len(pickle.dumps(tok)) < 1000  # settings only: cheap to send to DataLoader workers
    assert torch.equal(clone(captions[:200]), tok(captions[:200]))


# --------------------------------------------------------------------------------------------- #
# DeCLIP mask token
# --------------------------------------------------------------------------------------------- #
def test_mask_token_layout():
    mtok = Tokenizer(mask_token=True)
    assert mtok.vocab_size == 49409
    assert (mtok.mask_token_id, mtok.sot_token_id, mtok.eot_token_id) == (49406, 49407, 49408)
    assert mtok.special_token_ids == {49406, 49407, 49408}
    assert mtok.decode([49406]) == "<|mask|>"
    row = mtok("a photo of a cat")[0].tolist()
    assert row[0] == 49407 and 49408 in row and 49406 not in row


def test_mask_token_keeps_ordinary_ids(captions, tok):
    mtok = Tokenizer(mask_token=True)
    plain, masked = tok(captions), mtok(captions)
    # Only the two special ids move (+1); every ordinary BPE id and every pad is unchanged.
    remapped = plain.clone()
    remapped[plain == 49406] = 49407
    remapped[plain == 49407] = 49408
    assert torch.equal(masked, remapped)
    assert int(masked.max()) <= 49408 and not (masked == 49406).any()
    for c in captions[:200]:
        ordinary = [i for i in tok.encode(c) if i < 49406]
        assert [i for i in mtok.encode(c) if i < 49406] == ordinary


def test_clean_text_matches_clip():
    assert clean_text("  Hello&amp;amp;   WORLD \n") == "hello& world"
    assert clean_text("ＬＯＵＤ\u3000ＮＯＩＳＥＳ") == "loud noises"
    assert clean_text("") == ""
