"""The CLIP BPE tokenizer (context 77), taken from open_clip rather than written again.

Only open_clip's self-contained `tokenizer.py` (and its vocabulary file) is loaded, not the
`open_clip` package, whose import pulls in torchvision. Texts longer than the context are
truncated as CLIP does (the last kept position becomes end-of-text) and a warning is logged.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

log = logging.getLogger(__name__)

CONTEXT_LENGTH = 77


@lru_cache(maxsize=1)
def _open_clip_tokenizer_module() -> ModuleType:
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "open_clip_torch is required for the CLIP tokenizer: pip install lpi-serve"
        )
    source = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("lpi._open_clip_tokenizer", source)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=1)
def clip_tokenizer():
    """open_clip's `SimpleTokenizer` over OpenAI's BPE vocabulary (49,408 ids)."""
    return _open_clip_tokenizer_module().SimpleTokenizer()


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> Tensor:
    """Texts -> LongTensor [B, context_length]: start, BPE ids, end-of-text, zero padding."""
    rows = token_ids(texts, context_length)
    result = torch.zeros(len(rows), context_length, dtype=torch.long)
    for row, ids in enumerate(rows):
        result[row, : len(ids)] = torch.tensor(ids)
    return result


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
    rows, truncated = [], []
    for row, text in enumerate(texts):
        ids = [tokenizer.sot_token_id, *tokenizer.encode(text), tokenizer.eot_token_id]
        if len(ids) > context_length:
            truncated.append(row)
            ids = [*ids[: context_length - 1], tokenizer.eot_token_id]
        rows.append(ids)
    _warn_truncated(truncated, context_length)
    return rows


def _warn_truncated(truncated: list[int], context_length: int) -> None:
    if truncated:
        log.warning(
            "texts longer than the context were truncated",
            extra={"rows": truncated[:16], "count": len(truncated), "context": context_length},
        )
