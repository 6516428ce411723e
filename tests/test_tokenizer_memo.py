"""The tokenizer's word memo and its context limit (lpi/tokenizer.py), without open_clip.

The reference is the same BPE without memo (memo_words=0) or without a limit, single-threaded:
ids must be equal, not close. tests/test_tokenizer.py compares the ids with open_clip itself.
"""

from __future__ import annotations

import random
import string
import threading

import pytest

from lpi import tokenizer as lpi_tokenizer
from lpi.tokenizer import MEMO_WORD_CHARS, MEMO_WORD_IDS, SPECIALS, ClipTokenizer

PIECES = [
    "a photo of",
    "two dogs",
    "café naïve",
    "中文 日本語",
    "🐱🚀",
    "&amp; <b>x</b>",
    "it's",
    "<end_of_text>",
    "3.14",
    "\u00a0 \t",
]


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(low, high)))


def _corpus(seed: int, size: int) -> list[str]:
    """Captions of short random words, known hard pieces and now and then a very long word."""
    rng = random.Random(seed)
    texts = []
    for _ in range(size):
        words = [_word(rng, 1, 9) for _ in range(rng.randint(0, 30))]
        words += rng.choices(PIECES, k=rng.randint(0, 3))
        if rng.random() < 0.1:
            words.append(_word(rng, 65, 600))
        rng.shuffle(words)
        texts.append(" ".join(words))
    return texts


@pytest.fixture(scope="module")
def reference():
    return ClipTokenizer(memo_words=0)  # remembers no word: every word through the BPE


def _memo_ids(tokenizer: ClipTokenizer) -> int:
    return sum(len(ids) for ids in tokenizer._memo.values())


def test_the_memo_stays_bounded_in_ids_whatever_the_words(reference):
    """Long random words (up to 4,096 letters, ~2,300 ids each) are never remembered; short
    ones fill at most memo_words entries of at most MEMO_WORD_IDS ids, after every batch."""
    rng = random.Random(8)
    tokenizer = ClipTokenizer(memo_words=64)
    for _ in range(12):
        batch = [" ".join(_word(rng, 100, 4096) for _ in range(4)) for _ in range(3)]
        batch += [" ".join(_word(rng, 1, 12) for _ in range(40))]
        assert tokenizer.encode_batch(batch) == reference.encode_batch(batch)
        assert len(tokenizer._memo) <= 64 + len(SPECIALS)
        assert _memo_ids(tokenizer) <= 64 * MEMO_WORD_IDS + len(SPECIALS)
        assert all(len(word) <= MEMO_WORD_CHARS for word in tokenizer._memo)
    assert len(tokenizer._memo) > 40  # short words are still remembered


def test_threads_sharing_one_tokenizer_get_the_single_threaded_ids(reference):
    """Four threads, four corpora, one small memo (it starts again many times under them)."""
    corpora = [_corpus(seed, 300) for seed in range(4)]
    expected = [reference.encode_batch(corpus) for corpus in corpora]
    shared = ClipTokenizer(memo_words=150)
    start = threading.Barrier(len(corpora))
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            start.wait()
            corpus, got = corpora[index], []
            for _ in range(2):  # a cold memo, then whatever the others left in it
                got = [
                    ids
                    for i in range(0, len(corpus), 7)
                    for ids in shared.encode_batch(corpus[i : i + 7])
                ]
            results[index] = got
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(corpora))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert [results[i] for i in range(len(corpora))] == expected
    assert len(shared._memo) <= 150 + len(SPECIALS)


@pytest.mark.parametrize("limit", [0, 1, 2, 5, 30, 75, 76])
def test_a_limit_keeps_the_first_ids_of_the_whole_encoding(reference, limit):
    texts = [*_corpus(21, 200), "x" * 3000, "dog " * 200, "🐱" * 100, ""]
    whole = reference.encode_batch(texts)
    limited = ClipTokenizer(memo_words=50)  # its memo is filled from truncated rows
    for _ in range(2):
        assert limited.encode_batch(texts, limit) == [ids[:limit] for ids in whole]


def test_bpe_stops_at_the_context(monkeypatch):
    """token_ids hands the BPE no word past the context's, whatever the text's length."""
    tokenizer = ClipTokenizer()
    seen: list[int] = []
    bpe_words = tokenizer._bpe_words
    monkeypatch.setattr(
        tokenizer, "_bpe_words", lambda words: seen.append(len(words)) or bpe_words(words)
    )
    monkeypatch.setattr(lpi_tokenizer, "clip_tokenizer", lambda: tokenizer)
    rng = random.Random(5)
    text = " ".join(_word(rng, 6, 12) for _ in range(5000))  # ~5,000 distinct words
    rows = lpi_tokenizer.token_ids([text], 77)
    assert len(rows[0]) == 77 and rows[0][-1] == tokenizer.eot_token_id
    assert sum(seen) <= 76
