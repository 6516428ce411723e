"""Pretraining's token embedding restricted to the tokens its captions use.

CLIP's table has 49,408 rows but a synthetic pretraining set uses about a hundred. AdamW still
steps every row of the full table on every batch (the rows never used have zero gradients, so
their update is exactly zero: weight decay is off for embeddings), and that step costs more
than the rest of a small model's. `compact_vocabulary` swaps in a table of the used rows for
the duration of training and writes them back into the full table afterwards, so the result
is the same model, without the dead work.

Dimensions: V the full vocabulary, U the used tokens, D the text width.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lpi.backbone import Backbone
from lpi.tokenizer import tokenize


def used_tokens(captions: Iterable[str], context_length: int) -> Tensor:
    """Sorted LongTensor [U]: every id the captions tokenize to, padding (0) included."""
    ids = {0}
    batch: list[str] = []
    for caption in captions:
        batch.append(caption)
        if len(batch) == 4096:
            ids.update(tokenize(batch, context_length).unique().tolist())
            batch = []
    if batch:
        ids.update(tokenize(batch, context_length).unique().tolist())
    return torch.tensor(sorted(ids), dtype=torch.long)


class CompactEmbedding(nn.Module):
    """Looks full-vocabulary ids [B, T] up in a table of only the used rows [U, D]."""

    def __init__(self, full: nn.Embedding, used: Tensor):
        super().__init__()
        used = used.to(full.weight.device)
        self.weight = nn.Parameter(full.weight.detach()[used].clone())  # [U, D]
        remap = torch.full((full.num_embeddings,), -1, dtype=torch.long, device=used.device)
        remap[used] = torch.arange(len(used), device=used.device)
        self.register_buffer("remap", remap, persistent=False)  # [V]: full id -> row, or -1

    def forward(self, token_ids: Tensor) -> Tensor:
        remap: Tensor = self.remap  # type: ignore[assignment]  # a registered buffer
        rows = remap[token_ids]
        if bool((rows < 0).any()):  # a caption the vocabulary was not built from
            missing = token_ids[rows < 0].unique().tolist()
            raise ValueError(f"token ids {missing[:10]} are outside the compact vocabulary")
        return F.embedding(rows, self.weight)


@contextmanager
def compact_vocabulary(backbone: Backbone, used: Tensor) -> Iterator[CompactEmbedding]:
    """Train with only the `used` rows of the token embedding; they are written back (also
    when training stops with an error) and the full table is restored on exit."""
    full = backbone.token_embedding
    compact = CompactEmbedding(full, used)
    backbone.token_embedding = compact  # type: ignore[assignment]
    try:
        yield compact
    finally:
        with torch.no_grad():
            full.weight[used.to(full.weight.device)] = compact.weight.to(full.weight)
        full.to(compact.weight.device).requires_grad_(compact.weight.requires_grad)
        backbone.token_embedding = full
