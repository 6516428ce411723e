"""Evaluating a continual run after each task (METHOD.md §5).

Each seen task's test images and captions are encoded with the task's own prompt (oracle) and
with the prompt of the task their frozen features route to (task keys); recall@K is computed
per task against that task's gallery and against the union of all seen tasks' galleries.

Dimensions: I images, C captions, E embedding, B encoding batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lpi.continual import recall as recall_metrics
from lpi.continual.data.loader import eval_set
from lpi.continual.data.manifest import Record
from lpi.prompts import PromptBank
from lpi.routing import TaskKeys, routing_accuracy
from lpi.tokenizer import tokenize

if TYPE_CHECKING:
    from lpi.backbone import Backbone

ENCODE_BATCH = 256


@dataclass(frozen=True)
class TestSet:
    pixels: Tensor  # [I, 3, S, S]
    tokens: Tensor  # [C, 77]
    caption_to_image: Tensor  # [C]


def make_test_set(pixels: Tensor, captions: list[str], caption_to_image: Tensor) -> TestSet:
    return TestSet(pixels, tokenize(captions), caption_to_image)


@torch.no_grad()
def encode(
    backbone: Backbone,
    bank: PromptBank | None,
    data: Tensor,
    rows: Sequence[str | None],
    image: bool,
) -> Tensor:
    """Features [I or C, E] of pixels or tokens, row r encoded with task rows[r] (None: bare)."""
    device = next(backbone.parameters()).device
    encoder = backbone.encode_image if image else backbone.encode_text
    out = []
    for start in range(0, len(data), ENCODE_BATCH):
        chunk = data[start : start + ENCODE_BATCH].to(device)
        chunk_rows = rows[start : start + ENCODE_BATCH]
        prefix = None
        if bank is not None and any(task is not None for task in chunk_rows):
            image_prefix, text_prefix = bank.prefixes(backbone, chunk_rows)
            prefix = image_prefix if image else text_prefix
        out.append(encoder(chunk, prefix).float().cpu())
    return torch.cat(out)


def _galleries(
    backbone: Backbone,
    bank: PromptBank | None,
    sets: dict[str, TestSet],
    image_rows: Mapping[str, Sequence[str | None]],
    text_rows: Mapping[str, Sequence[str | None]],
) -> dict[str, recall_metrics.Gallery]:
    return {
        task: (
            encode(backbone, bank, data.pixels, image_rows[task], image=True),
            encode(backbone, bank, data.tokens, text_rows[task], image=False),
            data.caption_to_image,
        )
        for task, data in sets.items()
    }


def headline_r1(recall: recall_metrics.Recall) -> float:
    """The single number of tables and heatmaps: mean of image->text and text->image R@1."""
    return 0.5 * (recall["i2t"][1] + recall["t2i"][1])


def evaluate_seen(
    backbone: Backbone, bank: PromptBank | None, keys: TaskKeys | None, sets: dict[str, TestSet]
) -> dict:
    """Recall of every seen task, oracle and routed, per-task and union gallery."""
    oracle_image = {t: [t if bank else None] * len(d.pixels) for t, d in sets.items()}
    oracle_text = {t: [t if bank else None] * len(d.tokens) for t, d in sets.items()}
    oracle = recall_metrics.task_and_union_recall(
        _galleries(backbone, bank, sets, oracle_image, oracle_text)
    )
    result: dict[str, Any] = {
        "tasks": list(sets),
        "oracle": oracle,
        "routed": oracle,
        "routing_accuracy": None,
        "routing_confusion": None,
    }
    if keys is not None:  # routing is measured even where no prompt makes it matter
        queries = {task: frozen_features(backbone, data) for task, data in sets.items()}
        routed_image, routed_text, result["routing_accuracy"] = route_queries(keys, queries)
        result["routing_confusion"] = {
            "image": routing_confusion(routed_image),
            "text": routing_confusion(routed_text),
        }
        if bank is not None:
            routed = _galleries(backbone, bank, sets, routed_image, routed_text)
            result["routed"] = recall_metrics.task_and_union_recall(routed)
    result["r1"] = {
        mode: {t: headline_r1(result[mode][t]["task"]) for t in sets}
        for mode in ("oracle", "routed")
    }
    return result


def frozen_features(backbone: Backbone, data: TestSet) -> tuple[Tensor, Tensor]:
    """Unprompted image [I, E] and text [C, E] features: what routing reads, and (of a task's
    training data) what its keys are fitted on."""
    return (
        encode(backbone, None, data.pixels, [None] * len(data.pixels), True),
        encode(backbone, None, data.tokens, [None] * len(data.tokens), False),
    )


def key_features(backbone: Backbone, records: Sequence[Record]) -> tuple[Tensor, Tensor]:
    """The frozen features of a task's training records, the inputs of its keys."""
    size = backbone.config.vision.image_size
    return frozen_features(backbone, make_test_set(*eval_set(records, size)))


def fit_keys(features: Mapping[str, tuple[Tensor, Tensor]], centres: int) -> TaskKeys:
    """Keys with `centres` centres per modality for each task's (image, text) key features."""
    keys = TaskKeys(centres)
    for task, (image, text) in features.items():
        keys.add(task, image, text)
    return keys


def route_queries(
    keys: TaskKeys, queries: Mapping[str, tuple[Tensor, Tensor]]
) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, float]]:
    """Route each task's frozen query features by `keys`: routed task names per query (image,
    text) and the percent routed to their own task per modality."""
    image_rows = {task: keys.route_names(image, "image") for task, (image, _) in queries.items()}
    text_rows = {task: keys.route_names(text, "text") for task, (_, text) in queries.items()}
    accuracy = {}
    for modality, rows in (("image", image_rows), ("text", text_rows)):
        guess = [name for task in rows for name in rows[task]]
        truth = [task for task in rows for _ in rows[task]]
        accuracy[modality] = routing_accuracy(guess, truth)
    return image_rows, text_rows, accuracy


def routing_confusion(routes: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """Per true task, the percent of its queries routed to each task, most first: where routing
    goes wrong, which one accuracy figure hides."""
    confusion = {}
    for task, rows in routes.items():
        counts = Counter(rows)
        confusion[task] = {t: 100.0 * n / len(rows) for t, n in counts.most_common()}
    return confusion


def summarise(results: list[dict], mode: str = "oracle") -> dict:
    """Matrix of headline R@1 (row t: after task t), seen means, final mean, forgetting."""
    rows = [[result["r1"][mode][t] for t in result["tasks"]] for result in results]
    summary: dict[str, Any] = recall_metrics.continual_summary(recall_metrics.results_matrix(rows))
    summary["matrix"] = rows
    return summary
