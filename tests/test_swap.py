"""lpi.continual.swap: the cross-task prompt-swap matrix against an independent encoding."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lpi.checkpoint import load_backbone
from lpi.continual import recall as recall_metrics
from lpi.continual import swap
from lpi.continual.data.loader import eval_set
from lpi.continual.data.manifest import read_manifest, select
from lpi.continual.evaluation import headline_r1
from lpi.continual.evaluator import EvalConfig, evaluate_run
from lpi.continual.methods import new_prompts, single_task_prefix
from lpi.continual.run_state import RunError, load_state, load_task
from lpi.tokenizer import tokenize


def reference_cell(run, data_task: str, prompt_task: str) -> tuple[float, int]:
    """Oracle R@1 of one cell through the training path's prefix (not the bank), in one batch;
    also the number of images (one query's weight in the recall)."""
    state = load_state(run)
    backbone = load_backbone(state.config.backbone, device="cpu")
    module = new_prompts(state.config.method, state.config.prompt_config(), backbone)
    load_task(run, state.done.index(prompt_task), prompt_task, module)
    records = select(read_manifest(state.config.manifest), data_task, "test")
    pixels, captions, caption_to_image = eval_set(records, backbone.config.vision.image_size)
    tokens = tokenize(captions)
    with torch.no_grad():
        prompts_v, prompts_t = module()
        image_prefix, _ = single_task_prefix(backbone, prompts_v, prompts_t, len(pixels))
        _, text_prefix = single_task_prefix(backbone, prompts_v, prompts_t, len(tokens))
        image = backbone.encode_image(pixels, image_prefix).float()
        text = backbone.encode_text(tokens, text_prefix).float()
    recall = recall_metrics.retrieval_recall(image, text, caption_to_image)
    return headline_r1(recall), len(pixels)


@pytest.mark.parametrize("method", ["lpi", "dense"])
def test_every_cell_matches_an_independent_encoding(tiny_runs, method):
    run = tiny_runs / method
    report = swap.swap_matrix(run, device="cpu")
    tasks = report["tasks"]
    assert len(tasks) == 2 and len(report["matrix"]) == 2
    for i, data_task in enumerate(tasks):
        for j, prompt_task in enumerate(tasks):
            expected, images = reference_cell(run, data_task, prompt_task)
            # Same math in another batching; a float-rounding flip of two near-equal scores
            # would move one query, 100 / images points in one direction's recall (half of it
            # in the headline mean of both directions).
            assert report["matrix"][i][j] == pytest.approx(expected, abs=50.0 / images + 1e-9)


def test_the_diagonal_is_the_final_oracle_recall(tiny_runs):
    run = tiny_runs / "lpi"
    report = swap.swap_matrix(run, device="cpu")
    oracle = evaluate_run(EvalConfig(run=run, device="cpu"))["final"]["r1"]["oracle"]
    # The evaluation's encoder calls, chunking and recall: equal, not merely close.
    assert [report["matrix"][i][i] for i in range(len(report["tasks"]))] == [
        oracle[t] for t in report["tasks"]
    ]


def test_summary_of_a_known_matrix():
    summary = swap.swap_summary([[10.0, 4.0], [6.0, 20.0]])
    assert summary == {"diagonal_mean": 15.0, "off_diagonal_mean": 5.0, "gap": 10.0}
    single = swap.swap_summary([[7.0]])
    assert single["diagonal_mean"] == 7.0 and single["gap"] is None
    assert not math.isnan(single["diagonal_mean"])


def test_the_cli_writes_swap_json_and_refuses_an_empty_folder(tiny_runs, tmp_path):
    run = tmp_path / "run"
    for path in (tiny_runs / "lpi").iterdir():  # a copy: the session's runs stay untouched
        if path.is_file():
            (run / path.name).parent.mkdir(exist_ok=True)
            (run / path.name).write_bytes(path.read_bytes())
    assert swap.main([str(run), "--device", "cpu"]) == 0
    written = json.loads((run / swap.REPORT).read_text())
    assert written["matrix"] == swap.swap_matrix(run, device="cpu")["matrix"]
    assert swap.main([str(tmp_path / "nothing"), "--device", "cpu"]) == 2


def test_zero_shot_has_nothing_to_swap(tiny_runs, tmp_path):
    from lpi.continual.trainer import TrainConfig, run_training

    source = load_state(tiny_runs / "lpi").config
    run_training(
        TrainConfig(
            manifest=source.manifest,
            backbone=source.backbone,
            out=tmp_path / "zero",
            method="zero-shot",
            tasks=tuple(source.tasks[:1]),
            layers=2,
            tokens=4,
            epochs=1,
            batch_size=8,
            device="cpu",
        )
    )
    with pytest.raises(RunError, match="no prompts"):
        swap.swap_matrix(tmp_path / "zero", device="cpu")
