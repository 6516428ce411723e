"""Retrieval recall@K and the continual summaries of METHOD.md §5.

Recall follows the COCO / Flickr protocol: text->image, a caption is a hit when its own image is
in the top K; image->text, an image is a hit when ANY of its captions is in the top K (the rank of
its best caption).

Ties are broken against the query (pessimistic): a wrong gallery item whose score EQUALS the true
match's counts as ranked above it, so rank = the number of wrong items scoring >= the best true
match. This does not depend on gallery order (so a union gallery is a superset in rank too), and a
collapsed encoder that maps everything to one vector scores 0, not the luck of the index order.
Scores are exact float products; ties mean bitwise-equal scores.

Dimensions: I images, C captions, E embedding, Q queries in a chunk, T tasks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

DEFAULT_KS = (1, 5, 10)
DEFAULT_CHUNK = 512  # queries per similarity block: 512 x 25k captions x 4 B = 51 MB

Recall = dict[str, dict[int, float]]  # {"i2t": {K: percent}, "t2i": {K: percent}}
Gallery = tuple[Tensor, Tensor, Tensor]  # image [I, E], text [C, E], caption_to_image [C]


def _check(
    image_features: Tensor, text_features: Tensor, caption_to_image: Tensor, chunk: int
) -> None:
    """Refuse shapes, indices and values that would make a recall silently wrong."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError("image and text features must be 2-D [I, E] and [C, E]")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"feature widths differ: image {image_features.shape[1]}, text {text_features.shape[1]}"
        )
    if caption_to_image.dtype != torch.long or caption_to_image.shape != text_features.shape[:1]:
        raise ValueError("caption_to_image must be a LongTensor [C] with one entry per caption")
    count = image_features.shape[0]
    if count == 0 or caption_to_image.numel() == 0:
        raise ValueError("the gallery needs at least one image and one caption")
    if caption_to_image.min() < 0 or caption_to_image.max() >= count:
        raise ValueError(f"caption_to_image holds an index outside [0, {count})")
    if torch.bincount(caption_to_image, minlength=count).min() == 0:
        raise ValueError("every image needs at least one caption")
    for name, features in (("image", image_features), ("text", text_features)):
        if not torch.isfinite(features).all():
            raise ValueError(f"{name} features hold NaN or inf")


def _scores_dtype(*features: Tensor) -> torch.dtype:
    """The inputs' common float type, at least float32 (half scores tie far too often)."""
    return torch.promote_types(torch.promote_types(*(f.dtype for f in features)), torch.float32)


def t2i_ranks(
    image_features: Tensor,
    text_features: Tensor,
    caption_to_image: Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """Rank [C] of each caption's image: the number of other images scoring >= it (0 = top)."""
    _check(image_features, text_features, caption_to_image, chunk)
    dtype = _scores_dtype(image_features, text_features)
    gallery = image_features.to(dtype)
    ranks = []
    for start in range(0, text_features.shape[0], chunk):
        queries = text_features[start : start + chunk].to(dtype)  # [Q, E]
        scores = queries @ gallery.T  # [Q, I]
        target = caption_to_image[start : start + chunk].to(scores.device)
        true_score = scores.gather(1, target[:, None])  # [Q, 1]
        ranks.append((scores >= true_score).sum(1) - 1)  # minus the true image itself
    return torch.cat(ranks)  # [C]


def i2t_ranks(
    image_features: Tensor,
    text_features: Tensor,
    caption_to_image: Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """Rank [I] of each image's best caption: wrong captions scoring >= that caption."""
    _check(image_features, text_features, caption_to_image, chunk)
    dtype = _scores_dtype(image_features, text_features)
    gallery = text_features.to(dtype)
    owner = caption_to_image.to(gallery.device)
    ranks = []
    for start in range(0, image_features.shape[0], chunk):
        queries = image_features[start : start + chunk].to(dtype)  # [Q, E]
        scores = queries @ gallery.T  # [Q, C]
        image_index = torch.arange(start, start + queries.shape[0], device=owner.device)
        positive = owner[None, :] == image_index[:, None]  # [Q, C]
        best = scores.masked_fill(~positive, -math.inf).amax(1, keepdim=True)  # [Q, 1]
        ranks.append(((scores >= best) & ~positive).sum(1))
    return torch.cat(ranks)  # [I]


def recall_from_ranks(ranks: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Percent of queries whose rank is below K, for each K."""
    return {k: 100.0 * float((ranks < k).double().mean()) for k in ks}


def retrieval_recall(
    image_features: Tensor,
    text_features: Tensor,
    caption_to_image: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    chunk: int = DEFAULT_CHUNK,
) -> Recall:
    """Recall@K in percent both ways: {"i2t": {K: %}, "t2i": {K: %}}; features unit-norm."""
    i2t = i2t_ranks(image_features, text_features, caption_to_image, chunk)
    t2i = t2i_ranks(image_features, text_features, caption_to_image, chunk)
    return {"i2t": recall_from_ranks(i2t, ks), "t2i": recall_from_ranks(t2i, ks)}


def mean_recall(recall: Recall) -> float:
    """The average of every recall number (the six of R@1/5/10 both ways by default)."""
    values = [value for direction in recall.values() for value in direction.values()]
    return sum(values) / len(values)


def union_gallery(galleries: Sequence[Gallery]) -> tuple[Gallery, list[slice], list[slice]]:
    """Concatenate galleries; also each one's image and caption slices in the union."""
    images, texts, owners, image_slices, text_slices = [], [], [], [], []
    image_offset = text_offset = 0
    for image, text, caption_to_image in galleries:
        images.append(image)
        texts.append(text)
        owners.append(caption_to_image + image_offset)
        image_slices.append(slice(image_offset, image_offset + image.shape[0]))
        text_slices.append(slice(text_offset, text_offset + text.shape[0]))
        image_offset += image.shape[0]
        text_offset += text.shape[0]
    union = (torch.cat(images), torch.cat(texts), torch.cat(owners))
    return union, image_slices, text_slices


def task_and_union_recall(
    galleries: Mapping[str, Gallery], ks: Sequence[int] = DEFAULT_KS, chunk: int = DEFAULT_CHUNK
) -> dict[str, dict[str, Recall]]:
    """Each task's queries against its own gallery ("task") and the union of all ("union").

    Pass the tasks seen so far; features are used as the caller encoded them (oracle or
    routed prompts). The union adds only distractors, so it never scores higher than "task".
    """
    results: dict[str, dict[str, Recall]] = {
        name: {"task": retrieval_recall(*gallery, ks=ks, chunk=chunk)}
        for name, gallery in galleries.items()
    }
    union, image_slices, text_slices = union_gallery(list(galleries.values()))
    i2t = i2t_ranks(*union, chunk=chunk)  # [I_union]
    t2i = t2i_ranks(*union, chunk=chunk)  # [C_union]
    for name, images, texts in zip(results, image_slices, text_slices, strict=True):
        results[name]["union"] = {
            "i2t": recall_from_ranks(i2t[images], ks),
            "t2i": recall_from_ranks(t2i[texts], ks),
        }
    return results


def results_matrix(rows: Sequence[Sequence[float]]) -> Tensor:
    """R [T, T] float64 from ragged rows: row t holds the metric on tasks 0..t after task t.

    Entries above the diagonal (tasks not yet seen) are NaN.
    """
    count = len(rows)
    if count == 0:
        raise ValueError("no rows: evaluate at least one task")
    matrix = torch.full((count, count), math.nan, dtype=torch.float64)
    for t, row in enumerate(rows):
        if len(row) != t + 1:
            raise ValueError(f"row {t} must hold {t + 1} values (tasks 0..{t}), got {len(row)}")
        matrix[t, : t + 1] = torch.tensor([float(value) for value in row], dtype=torch.float64)
    if not torch.isfinite(matrix.tril()).all():
        raise ValueError("the results hold NaN or inf on or below the diagonal")
    return matrix


def continual_summary(matrix: Tensor) -> dict[str, list[float] | float]:
    """Mean over seen tasks after each task, the final mean, and forgetting per task.

    Sign convention, positive = forgot: forgetting[i] = max over t < T-1 of R[t, i] - R[T-1, i],
    for i < T-1 (Chaudhry et al. 2018). docs/METHOD.md says "final minus best earlier value",
    which is -forgetting (negative = forgot). mean_forgetting averages over the T-1 earlier
    tasks and is NaN when T = 1. Only the lower triangle (i <= t) of R [T, T] is read.
    """
    count = matrix.shape[0]
    if matrix.ndim != 2 or matrix.shape[1] != count or count == 0:
        raise ValueError(f"R must be a non-empty square matrix [T, T], got {tuple(matrix.shape)}")
    lower = matrix.double().tril()  # [T, T]
    if not torch.isfinite(lower).all():
        raise ValueError("R holds NaN or inf on or below the diagonal")
    seen = lower.sum(1) / torch.arange(1, count + 1, dtype=torch.float64)  # [T]
    forgetting = [
        float(lower[i : count - 1, i].max() - lower[-1, i]) for i in range(count - 1)
    ]  # rows i..T-2 are the earlier evaluations of task i
    return {
        "seen_mean": seen.tolist(),
        "final_mean": float(seen[-1]),
        "forgetting": forgetting,
        "mean_forgetting": sum(forgetting) / len(forgetting) if forgetting else math.nan,
    }
