"""Recall@K against a loop-by-loop ranking, hand-made galleries, and the continual summaries."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lpi.continual import recall as recall_metrics


def _tied_features(generator: torch.Generator, count: int, width: int = 6) -> torch.Tensor:
    """Unit rows of four +-0.5 entries: every dot product is a multiple of 1/4, exact in any
    summation order, so equal scores are bitwise equal and ties are real ties."""
    rows = torch.zeros(count, width, dtype=torch.float64)
    for row in rows:
        where = torch.randperm(width, generator=generator)[:4]
        row[where] = 0.5 * (2 * torch.randint(0, 2, (4,), generator=generator) - 1).double()
    return rows


def _random_gallery(generator, images: int, tied: bool, width: int = 6):
    """Images with 1 to 3 captions each; tied galleries repeat vectors on purpose."""
    per_image = torch.randint(1, 4, (images,), generator=generator)
    caption_to_image = torch.repeat_interleave(torch.arange(images), per_image)
    captions = caption_to_image.numel()
    if tied:
        image, text = _tied_features(generator, images), _tied_features(generator, captions)
    else:
        image = F.normalize(torch.randn(images, width, generator=generator, dtype=torch.float64))
        text = F.normalize(torch.randn(captions, width, generator=generator, dtype=torch.float64))
    return image, text, caption_to_image


def _first_positive(scores: list[float], positive: list[bool]) -> int:
    """Position of the first true item in the list sorted by score, wrong items first on ties."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], positive[j]))
    return next(place for place, j in enumerate(order) if positive[j])


def _naive_recall(image, text, caption_to_image, ks=(1, 5, 10)):
    """The protocol one query at a time, with per-pair dot products."""
    owner = caption_to_image.tolist()
    t2i = [
        _first_positive(
            [float(text[c] @ image[i]) for i in range(len(image))],
            [i == owner[c] for i in range(len(image))],
        )
        for c in range(len(text))
    ]
    i2t = [
        _first_positive(
            [float(image[i] @ text[c]) for c in range(len(text))],
            [owner[c] == i for c in range(len(text))],
        )
        for i in range(len(image))
    ]

    def recall(ranks):
        return {k: 100.0 * sum(r < k for r in ranks) / len(ranks) for k in ks}

    return {"i2t": recall(i2t), "t2i": recall(t2i)}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tied", [False, True])
def test_recall_matches_naive_loop(seed, tied):
    generator = torch.Generator().manual_seed(seed)
    gallery = _random_gallery(generator, 14, tied)
    expected = _naive_recall(*gallery, ks=(1, 2, 5, 10))
    got = recall_metrics.retrieval_recall(*gallery, ks=(1, 2, 5, 10), chunk=4)
    for direction in ("i2t", "t2i"):  # percents of the same counts: equal up to rounding
        assert got[direction] == pytest.approx(expected[direction], abs=1e-9), direction


def test_perfect_and_reversed_retrieval():
    eye = torch.eye(11)
    caption_to_image = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9, 10])
    perfect = recall_metrics.retrieval_recall(eye, eye[caption_to_image], caption_to_image)
    assert perfect == {
        "i2t": {1: 100.0, 5: 100.0, 10: 100.0},
        "t2i": {1: 100.0, 5: 100.0, 10: 100.0},
    }
    # Each caption points away from its image: its match scores -1, the 10+ wrong ones 0.
    reversed_ = recall_metrics.retrieval_recall(eye, -eye[caption_to_image], caption_to_image)
    assert reversed_ == {"i2t": {1: 0.0, 5: 0.0, 10: 0.0}, "t2i": {1: 0.0, 5: 0.0, 10: 0.0}}
    assert (
        recall_metrics.mean_recall(perfect) == 100.0
        and recall_metrics.mean_recall(reversed_) == 0.0
    )


def test_ties_count_against_the_query():
    """Images 0 and 1 are the same vector: each caption ties with the wrong image."""
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    caption_to_image = torch.tensor([0, 1, 2])
    assert recall_metrics.t2i_ranks(image, text, caption_to_image).tolist() == [1, 1, 0]
    # Image 0 ties with caption 1 (wrong) at score 1, whichever comes first in the gallery.
    assert recall_metrics.i2t_ranks(image, text, caption_to_image).tolist() == [1, 1, 0]
    recall = recall_metrics.retrieval_recall(image, text, caption_to_image, ks=(1, 2))
    assert recall["t2i"] == pytest.approx({1: 100 / 3, 2: 100.0})
    # A collapsed encoder ranks nothing first.
    same = torch.ones(4, 3) / math.sqrt(3)
    collapsed = recall_metrics.retrieval_recall(same, same, torch.arange(4), ks=(1, 4))
    assert collapsed == {"i2t": {1: 0.0, 4: 100.0}, "t2i": {1: 0.0, 4: 100.0}}


def test_best_caption_decides_image_to_text():
    """An image is a hit if any caption is in the top K, even when another is last."""
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # caption 0 is awful
    caption_to_image = torch.tensor([0, 0, 1])
    assert recall_metrics.i2t_ranks(image, text, caption_to_image).tolist() == [0, 0]
    assert recall_metrics.t2i_ranks(image, text, caption_to_image).tolist() == [1, 0, 0]


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_equals_unchunked(tied):
    generator = torch.Generator().manual_seed(7)
    gallery = _random_gallery(generator, 40, tied)
    for rank in (recall_metrics.i2t_ranks, recall_metrics.t2i_ranks):
        whole = rank(*gallery, chunk=10_000)
        for chunk in (1, 3, 17):
            assert torch.equal(rank(*gallery, chunk=chunk), whole)


def test_float32_and_half_inputs():
    """Half inputs are scored in float32; float32 and float64 agree on untied features."""
    generator = torch.Generator().manual_seed(3)
    image, text, caption_to_image = _random_gallery(generator, 30, tied=False)
    as64 = recall_metrics.retrieval_recall(image, text, caption_to_image)
    as32 = recall_metrics.retrieval_recall(image.float(), text.float(), caption_to_image)
    assert as32 == as64
    assert (
        recall_metrics.retrieval_recall(image.half(), text.half(), caption_to_image)["t2i"][10] > 0
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    tied=st.booleans(),
)
def test_union_gallery_never_scores_higher(seed, sizes, tied):
    generator = torch.Generator().manual_seed(seed)
    galleries = {
        f"task{t}": _random_gallery(generator, images, tied) for t, images in enumerate(sizes)
    }
    results = recall_metrics.task_and_union_recall(galleries, ks=(1, 2, 5))
    for name, result in results.items():
        for direction in ("i2t", "t2i"):
            for k, value in result["union"][direction].items():
                assert value <= result["task"][direction][k], (name, direction, k)
    # Ranks themselves only grow: the union adds wrong items, never removes them.
    union, image_slices, text_slices = recall_metrics.union_gallery(list(galleries.values()))
    union_i2t, union_t2i = recall_metrics.i2t_ranks(*union), recall_metrics.t2i_ranks(*union)
    for gallery, images, texts in zip(galleries.values(), image_slices, text_slices, strict=True):
        assert (union_i2t[images] >= recall_metrics.i2t_ranks(*gallery)).all()
        assert (union_t2i[texts] >= recall_metrics.t2i_ranks(*gallery)).all()
    if len(sizes) == 1:
        assert results["task0"]["union"] == results["task0"]["task"]


def test_union_gallery_slices_and_offsets():
    a = (torch.eye(3)[:2], torch.eye(3)[[0, 0, 1]], torch.tensor([0, 0, 1]))
    b = (torch.eye(3)[2:], torch.eye(3)[[2]], torch.tensor([0]))
    (image, text, owner), image_slices, text_slices = recall_metrics.union_gallery([a, b])
    assert image.shape == (3, 3) and text.shape == (4, 3)
    assert owner.tolist() == [0, 0, 1, 2]
    assert image_slices == [slice(0, 2), slice(2, 3)] and text_slices == [slice(0, 3), slice(3, 4)]


def test_mean_recall_averages_six_numbers():
    recall = {"i2t": {1: 10.0, 5: 20.0, 10: 30.0}, "t2i": {1: 40.0, 5: 50.0, 10: 60.0}}
    assert recall_metrics.mean_recall(recall) == pytest.approx(35.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3])), "outside"),
        ((torch.eye(3), torch.eye(3), torch.tensor([0, 1, 1])), "at least one caption"),
        ((torch.eye(3), torch.eye(4)[:3], torch.tensor([0, 1, 2])), "widths differ"),
        ((torch.eye(3), torch.eye(3), torch.tensor([0.0, 1.0, 2.0])), "LongTensor"),
        ((torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1, 2])), "one entry per caption"),
        ((torch.eye(3) * math.nan, torch.eye(3), torch.tensor([0, 1, 2])), "NaN"),
    ],
)
def test_bad_galleries_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        recall_metrics.retrieval_recall(*args)


def test_continual_summary_on_a_hand_made_matrix():
    rows = [[80.0], [70.0, 60.0], [75.0, 50.0, 90.0]]
    matrix = recall_metrics.results_matrix(rows)
    assert math.isnan(matrix[0, 1]) and matrix[2, 1] == 50.0
    summary = recall_metrics.continual_summary(matrix)
    assert summary["seen_mean"] == pytest.approx([80.0, 65.0, 215.0 / 3])
    assert summary["final_mean"] == pytest.approx(215.0 / 3)
    # Task 0: best earlier max(80, 70) = 80, final 75; task 1: best earlier 60, final 50.
    assert summary["forgetting"] == pytest.approx([5.0, 10.0])
    assert summary["mean_forgetting"] == pytest.approx(7.5)  # a gain-based sign would read -7.5


def test_continual_summary_improvement_is_negative_forgetting():
    summary = recall_metrics.continual_summary(
        recall_metrics.results_matrix([[50.0], [60.0, 40.0], [70, 45, 30]])
    )
    assert summary["forgetting"] == pytest.approx([-10.0, -5.0])
    assert summary["mean_forgetting"] == pytest.approx(-7.5)


def test_continual_summary_one_task_and_upper_triangle_ignored():
    summary = recall_metrics.continual_summary(torch.tensor([[42.0]]))
    assert summary["forgetting"] == [] and math.isnan(summary["mean_forgetting"])
    assert summary["seen_mean"] == [42.0] and summary["final_mean"] == 42.0
    full = torch.tensor([[1.0, 99.0], [2.0, 3.0]])  # 99 above the diagonal is never read
    assert recall_metrics.continual_summary(full)["seen_mean"] == pytest.approx([1.0, 2.5])


def test_bad_results_are_refused():
    with pytest.raises(ValueError, match="row 1 must hold 2"):
        recall_metrics.results_matrix([[1.0], [2.0]])
    with pytest.raises(ValueError, match="no rows"):
        recall_metrics.results_matrix([])
    with pytest.raises(ValueError, match="NaN"):
        recall_metrics.results_matrix([[1.0], [math.nan, 2.0]])
    with pytest.raises(ValueError, match="square"):
        recall_metrics.continual_summary(torch.zeros(2, 3))
