"""CLIP's BPE tokenizer (context 77): OpenAI's vocabulary, the BPE run by Hugging Face `tokenizers`.

The same function as open_clip's `SimpleTokenizer` (tests/test_tokenizer.py compares the two on
10,000 strings), without importing open_clip (whose import pulls in torchvision and timm):

1. Clean as CLIP does: ftfy, HTML-unescape twice, whitespace runs to one space, lower-case.
   Printable ASCII without `&` is returned unchanged by ftfy and html.unescape, so it skips them
   (most captions: ftfy alone costs more than everything else here together).
2. Split into words with CLIP's pattern: the `regex` module and the very pattern and flags
   open_clip uses; for that plain ASCII an equivalent stdlib pattern, which is faster.
3. Each word -> ids by byte-level BPE over OpenAI's merges (Rust, `tokenizers`). Short words
   are memoised, as CLIP memoises its own BPE, so a batch of captions costs Python lookups and
   only its words not seen before reach the BPE; the memo is bounded in words and in ids.
   Words past the context never reach the BPE (each word gives at least one id).

The vocabulary (lpi/vocab/, MIT, see its LICENSE) is checked against its sha256 when loaded.
Texts longer than the context are truncated as CLIP does (the last kept position becomes
end-of-text) and a warning is logged.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import logging
import re
import threading
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    import regex
    import tokenizers

log = logging.getLogger(__name__)

CONTEXT_LENGTH = 77
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
MERGES = 49152 - 256 - 2  # CLIP uses the file's first 48,894 merges (after its header line)
SPECIALS = ("<start_of_text>", "<end_of_text>")
MEMO_WORDS = 1 << 16  # distinct words remembered; then the memo starts again
# Only short words are remembered: a caption's words are a few ids each, while one 4,096-letter
# word is 2,285 ids (73 KB). So the memo holds at most MEMO_WORDS * MEMO_WORD_IDS ids (~60 MB).
MEMO_WORD_CHARS = 64
MEMO_WORD_IDS = 32

# CLIP's word pattern (open_clip's SimpleTokenizer.pat), for the `regex` module.
CLIP_WORD_PATTERN = (
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# Text that ftfy and html.unescape return unchanged: printable ASCII but `&`, and the ASCII
# spaces that are not control characters to ftfy (tab, newline, form feed; carriage return
# becomes a newline, equally a space to the split).
_PLAIN_ASCII = re.compile(r"[\t\n\x0c\r\x20-\x25\x27-\x7e]*")
# CLIP_WORD_PATTERN on lower-cased ASCII: letters are a-z, numbers 0-9 (case-folding adds nothing).
_ASCII_WORD = re.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"
)


@lru_cache(maxsize=1)
def _clip_words() -> regex.Pattern[str]:
    import regex

    return regex.compile(CLIP_WORD_PATTERN, regex.IGNORECASE)


def split_words(text: str) -> list[str]:
    """CLIP's cleaning (ftfy, HTML-unescape twice, whitespace, lower-case), then its word split."""
    if _PLAIN_ASCII.fullmatch(text):
        return _ASCII_WORD.findall(text.lower())  # spaces never join a word: no need to collapse
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _clip_words().findall(" ".join(text.split()).lower())


def byte_symbols() -> list[str]:
    """GPT-2's byte -> printable character table (CLIP's too), in byte order of CLIP's vocabulary:
    the bytes that are printable Latin-1 stand for themselves, the other 68 take 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + n) for n in range(len(others))]


def load_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (49,408 ids) and BPE merges, from the package's data file."""
    data = resources.files("lpi").joinpath("vocab", VOCAB_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise RuntimeError(f"lpi/vocab/{VOCAB_FILE} has sha256 {digest}, not {VOCAB_SHA256}")
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [(a, b) for a, b in (line.split() for line in lines[1 : MERGES + 1])]
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), *SPECIALS]
    return {token: index for index, token in enumerate(tokens)}, merges


class ClipTokenizer:
    """Texts -> CLIP BPE ids (no start or end-of-text): open_clip's `SimpleTokenizer.encode`.

    Safe to share between threads: readers never iterate the memo, one lock orders the writers,
    and a full memo is replaced whole, never emptied under a batch that reads it.
    """

    def __init__(self, memo_words: int = MEMO_WORDS):
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab, merges = load_vocabulary()
        self.sot_token_id, self.eot_token_id = (vocab[token] for token in SPECIALS)
        self.vocab_size = len(vocab)
        self._bpe: tokenizers.Tokenizer = Tokenizer(
            models.BPE(vocab, merges, end_of_word_suffix="</w>")
        )
        # Bytes -> GPT-2's printable characters, word by word (the words come split already).
        self._bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        # A special token's word is its id, as CLIP's BPE cache starts with them.
        self._specials = {token: [vocab[token]] for token in SPECIALS}
        self._memo_words = memo_words
        self._memo = dict(self._specials)
        self._memo_lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], limit: int | None = None) -> list[list[int]]:
        """Each text's ids; with `limit`, only its first `limit` ids (the same ids as the whole
        encoding's first `limit`): a word gives at least one id, so the words past the first
        `limit` never reach the BPE."""
        rows = [split_words(text) for text in texts]
        if limit is not None:
            rows = [row[: max(limit, 0)] for row in rows]
        memo = self._memo
        missing = list({word for row in rows for word in row if word not in memo})
        fresh = dict(zip(missing, self._bpe_words(missing), strict=True)) if missing else {}
        ids = [
            [index for word in row for index in (fresh[word] if word in fresh else memo[word])]
            for row in rows
        ]
        if fresh:
            self._remember(fresh)
        return ids if limit is None else [row[: max(limit, 0)] for row in ids]

    def _remember(self, fresh: dict[str, list[int]]) -> None:
        """Memoise the short words of `fresh`; past MEMO_WORDS the memo starts again (checked
        after adding, so it never holds more than MEMO_WORDS words of MEMO_WORD_IDS ids)."""
        short = {
            word: ids
            for word, ids in fresh.items()
            if len(word) <= MEMO_WORD_CHARS and len(ids) <= MEMO_WORD_IDS
        }
        if not short:
            return
        with self._memo_lock:
            memo = self._memo
            if len(memo) + len(short) > self._memo_words + len(self._specials):
                kept = dict(list(short.items())[: self._memo_words])
                self._memo = self._specials | kept  # a new dict: readers keep the old one
            else:
                memo.update(short)

    def _bpe_words(self, words: list[str]) -> list[list[int]]:
        """Each word's ids, from one call: the words as one pre-split sequence, its ids grouped
        back by word index. (A single sequence also keeps `tokenizers` off its thread pool, so
        forking later, as a DataLoader's workers do, leaves nothing to warn about.)"""
        encoding = self._bpe.encode(words, is_pretokenized=True, add_special_tokens=False)
        ids: list[list[int]] = [[] for _ in words]
        for index, word in zip(encoding.ids, encoding.word_ids, strict=True):
            assert word is not None  # no special tokens added: every id is in a word
            ids[word].append(index)
        return ids


@lru_cache(maxsize=1)
def clip_tokenizer() -> ClipTokenizer:
    """The process's tokenizer, built on first use (about 0.15 s: the vocabulary and merges)."""
    return ClipTokenizer()


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> Tensor:
    """Texts -> LongTensor [B, context_length]: start, BPE ids, end-of-text, zero padding."""
    rows = token_ids(texts, context_length)
    # numpy copies a list of ints into a row many times faster than torch.tensor converts one.
    tokens = np.zeros((len(rows), context_length), dtype=np.int64)
    for row, ids in enumerate(rows):
        tokens[row, : len(ids)] = ids
    return torch.from_numpy(tokens)


def token_ids(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> list[list[int]]:
    """Texts -> each text's ids (start, BPE ids, end-of-text), unpadded: `tokenize`'s rows,
    for callers that pad batches themselves (the server pads to a batch's longest text)."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list | tuple) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {type(text).__name__}, not str")
    tokenizer = clip_tokenizer()
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    rows, truncated = [], []
    # context_length - 1 BPE ids tell a text that fits from one that is cut: BPE stops there.
    limit = context_length - 1 if context_length >= 1 else None
    for row, bpe_ids in enumerate(tokenizer.encode_batch(list(texts), limit)):
        ids = [sot, *bpe_ids, eot]
        if len(ids) > context_length:
            truncated.append(row)
            ids = [*ids[: context_length - 1], eot]
        rows.append(ids)
    _warn_truncated(truncated, context_length)
    return rows


def _warn_truncated(truncated: list[int], context_length: int) -> None:
    if truncated:
        log.warning(
            "texts longer than the context were truncated",
            extra={"rows": truncated[:16], "count": len(truncated), "context": context_length},
        )
