"""lpi.tokenizer (Hugging Face `tokenizers` BPE) against open_clip's SimpleTokenizer, the reference.

The corpus is built here: 10,000 strings drawn with a fixed seed from pools of hard pieces
(unicode scripts, emoji sequences, any code point, HTML entities and tags, mojibake, control
characters, every kind of whitespace, contractions, CLIP's special tokens, very long texts) plus
the hand-picked cases below. Token ids must be equal, not close: the ids are the model's input.
"""

from __future__ import annotations

import hashlib
import logging
import random
import string
from pathlib import Path

import pytest
import torch

import lpi
from lpi import tokenizer as lpi_tokenizer

open_clip = pytest.importorskip(
    "open_clip",
    reason="open_clip (the reference tokenizer) is a dev-only dependency that imports only "
    "beside a matching torchvision: pip install -e '.[dev]'",
)

SEED = 20240717
CORPUS_SIZE = 10_000

HARD_CASES = [
    "",
    " ",
    "\t\n\r ",
    "a photo of a cat",
    "A Photo Of A CAT.",
    "   leading, trailing and    inner   whitespace\t\n\r ",
    "it's they're we've I'm you'll he'd IT'S THEY'RE ''s 's' 'ſ it'ſ x'ſtart",
    "<start_of_text>",
    "<end_of_text>",
    "<START_OF_TEXT> <End_Of_Text>",
    "a<start_of_text>b 1<end_of_text>2 !<start_of_text> _<end_of_text> <<start_of_text>>",
    "<ſtart_of_text> <start_of_text<end_of_text>>",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;a&#39; &nbsp;x &#x1F600; &copy",
    "&amp;amp;amp;lt; <b>&amp;amp;lt;</b> &notanentity; & &&",
    "<p>html <a href='x'>link</a></p>",
    "café naïve Ünïcödé straße STRASSE ß ẞ İstanbul ΣΊΣΥΦΟΣ ﬁﬂ ＬＯＵＤ",
    "mojibake cafÃ© â€œsmart quotesâ€\x9d Ã¼ber â€™ ÃƒÂ©",
    "emoji 🐱🚀 👩‍👩‍👧 👍🏽 🇫🇷 1️⃣ ❤️ e\u0301 zero\u200bwidth",
    "control \x00\x07\x1b[31mred\x1b[0m\x7f\x80\x9d\ufeff\ufffc\u206a",
    "spaces \x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u2029\u202f\u3000 end",
    "中文字符 日本語のテキスト 한국어 עברית العربية हिन्दी ไทย",
    "\ud83d\ude00 surrogate pair, lone \ud800 and \udc80",
    "numbers 1234567890 3.14 1e-5 ١٢٣ ² ½ Ⅻ",
    "dog " * 200,
    "x" * 3000,
    "!?" * 500,
]

# Words as text, split: a list literal would run to eighty lines.
ASCII_WORDS = (  # noqa: SIM905
    "a an the of on in with and two three man woman dog cat car street bench red blue green "
    "small large riding sitting standing next to near top photo picture 1990s Mr. U.S.A. "
    "don't isn't e-mail http://example.com/x?y=1 #hashtag @user C++ 9am 10:30"
).split()
UNICODE_WORDS = (  # noqa: SIM905
    "café naïve résumé Ünïcödé straße İ ı ς Σ ΣΊΣΥΦΟΣ Ελληνικά русский Ёлка 中文 日本語 한국어 "
    "עברית العربية हिन्दी ไทย ﬁ ﬂ ＬＯＵＤ ｶﾀｶﾅ Å Å e\u0301 n\u0303 ǅ ǈ ẞ ŉ ǰ ΐ ﬀ ᾈ ʼn ŀ"
).split()
EMOJI = ["🐱", "🚀", "👩‍👩‍👧", "👍🏽", "🇫🇷", "1️⃣", "❤️", "🏳️‍🌈", "🤷‍♀️", "😀😃😄", "©", "™"]
HTML = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&nbsp;", "&#x1F600;", "&amp;amp;", "&copy"]
HTML += ["<b>", "</i>", "<br/>", "&notanentity;", "&", "&#", "&#12345678;"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0"]
SPACES += ["\u1680", "\u2000", "\u2028", "\u2029", "\u202f", "\u3000", "\u200b", "\ufeff"]
CONTROLS = ["\x00", "\x07", "\x1b[31m", "\x1b[0m", "\x7f", "\x80", "\x9d", "\ufffc", "\u206a"]
MOJIBAKE = ["cafÃ©", "â€œ", "â€\x9d", "Ã¼ber", "â€™", "ÃƒÂ©", "Ã", "Â"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "''s", "'ſ", "’s", "'"]
SPECIALS = ["<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "<ſtart_of_text>", "<end_of"]


def _any_code_point(rng: random.Random) -> str:
    while True:
        point = rng.choice([rng.randrange(0x80, 0x800), rng.randrange(0x110000)])
        if not 0xD800 <= point <= 0xDFFF:
            return chr(point)


PIECES = [
    (6, lambda rng: rng.choice(ASCII_WORDS)),
    (2, lambda rng: rng.choice(ASCII_WORDS).upper()),
    (2, lambda rng: "".join(rng.choices(string.punctuation, k=rng.randint(1, 4)))),
    (2, lambda rng: str(rng.randrange(10 ** rng.randint(1, 8)))),
    (2, lambda rng: rng.choice(UNICODE_WORDS)),
    (1, lambda rng: rng.choice(UNICODE_WORDS).upper()),
    (1, lambda rng: rng.choice(EMOJI)),
    (1, lambda rng: rng.choice(HTML)),
    (1, lambda rng: rng.choice(SPACES)),
    (1, lambda rng: rng.choice(CONTROLS)),
    (1, lambda rng: rng.choice(MOJIBAKE)),
    (1, lambda rng: rng.choice(CONTRACTIONS)),
    (1, lambda rng: rng.choice(SPECIALS)),
    (2, lambda rng: "".join(_any_code_point(rng) for _ in range(rng.randint(1, 4)))),
]


def _mixed_text(rng: random.Random, pieces: int) -> str:
    weights = [weight for weight, _ in PIECES]
    draws = rng.choices([draw for _, draw in PIECES], weights=weights, k=pieces)
    return "".join(draw(rng) + rng.choice(["", " ", " ", " "]) for draw in draws)


def _ascii_text(rng: random.Random) -> str:
    """Plain ASCII (the fast path) with every printable character and ASCII space among it."""
    words = rng.choices(ASCII_WORDS, k=rng.randint(0, 14))
    noise = rng.choices(string.printable, k=rng.randint(0, 12))
    return "".join(rng.choice([w + " ", w.capitalize() + " ", *noise]) for w in words + noise)


def build_corpus(seed: int = SEED, size: int = CORPUS_SIZE) -> list[str]:
    """`size` distinct strings: the hard cases, then random ones."""
    rng = random.Random(seed)
    corpus = dict.fromkeys(HARD_CASES)
    while len(corpus) < size:
        kind = rng.random()
        if kind < 0.4:
            corpus[_ascii_text(rng)] = None
        elif kind < 0.97:
            corpus[_mixed_text(rng, rng.randint(1, 12))] = None
        else:  # long: past the context, some far past it
            corpus[_mixed_text(rng, rng.randint(60, 400))] = None
    return list(corpus)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return build_corpus()


@pytest.fixture(scope="module")
def reference():
    return open_clip.tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def reference_ids(corpus, reference) -> list[list[int]]:
    return [reference.encode(text) for text in corpus]


def _first_differences(texts, ours, theirs, limit: int = 5) -> list[str]:
    rows = zip(texts, ours, theirs, strict=True)
    return [f"{text!r}: {a} != {b}" for text, a, b in rows if a != b][:limit]


def test_the_corpus_covers_both_paths_and_the_context(corpus, reference_ids):
    """Both cleaning paths (plain ASCII, ftfy) and truncation get thousands of strings."""
    plain = sum(bool(lpi_tokenizer._PLAIN_ASCII.fullmatch(text)) for text in corpus)
    long = sum(len(ids) + 2 > lpi.tokenizer.CONTEXT_LENGTH for ids in reference_ids)
    assert len(set(corpus)) == len(corpus) >= 10_000
    assert plain >= 3_000 and len(corpus) - plain >= 5_000 and long >= 200


def test_ids_equal_open_clip_on_the_corpus(corpus, reference_ids):
    ours = lpi_tokenizer.ClipTokenizer().encode_batch(corpus)
    assert ours == reference_ids, _first_differences(corpus, ours, reference_ids)


def test_the_word_memo_changes_no_id(corpus, reference_ids):
    """Batch by batch through a memo far smaller than the texts' words, so it restarts many
    times; then the same batches again from a warm memo."""
    corpus, reference_ids = corpus[:3000], reference_ids[:3000]
    tokenizer = lpi_tokenizer.ClipTokenizer(memo_words=300)
    for _ in range(2):
        ours = [
            ids
            for i in range(0, len(corpus), 97)
            for ids in tokenizer.encode_batch(corpus[i : i + 97])
        ]
        assert ours == reference_ids, _first_differences(corpus, ours, reference_ids)
    # Bounded after every batch: the limit is checked after adding, never overshot by a batch.
    assert len(tokenizer._memo) <= 300 + len(lpi_tokenizer.SPECIALS)


def test_tokenize_equals_open_clip_with_truncation(corpus, reference, caplog):
    """The padded [B, 77] rows, truncated texts included (end-of-text kept last)."""
    texts = corpus[:300] + [text for text in corpus if len(text) > 300][:60]
    with caplog.at_level(logging.WARNING, logger="lpi.tokenizer"):
        assert torch.equal(lpi.tokenize(texts), reference(texts))
    assert any("truncated" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("context_length", [1, 2, 3, 16, 77, 128])
def test_other_context_lengths_truncate_as_open_clip(corpus, reference, context_length):
    texts = corpus[:100] + corpus[-100:]
    assert torch.equal(lpi.tokenize(texts, context_length), reference(texts, context_length))


def test_the_shipped_vocabulary_is_open_clips_file():
    shipped = Path(lpi_tokenizer.__file__).parent / "vocab" / lpi_tokenizer.VOCAB_FILE
    theirs = Path(open_clip.tokenizer.default_bpe())
    assert shipped.read_bytes() == theirs.read_bytes()
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == lpi_tokenizer.VOCAB_SHA256
    assert "MIT" in (shipped.parent / "LICENSE").read_text()


def test_vocabulary_and_special_ids_equal_open_clip(reference):
    vocab, merges = lpi_tokenizer.load_vocabulary()
    assert vocab == reference.encoder
    assert {merge: rank for rank, merge in enumerate(merges)} == reference.bpe_ranks
    ours = lpi_tokenizer.clip_tokenizer()
    assert (ours.sot_token_id, ours.eot_token_id) == (
        reference.sot_token_id,
        reference.eot_token_id,
    )
    assert lpi_tokenizer.byte_symbols() == list(open_clip.tokenizer.bytes_to_unicode().values())


def test_a_damaged_vocabulary_is_refused(monkeypatch):
    monkeypatch.setattr(lpi_tokenizer, "VOCAB_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256"):
        lpi_tokenizer.load_vocabulary()
