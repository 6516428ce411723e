"""The losses as the trainer wires them: gradient balance at init, the given task similarity
recorded and checked before training, and oracle forgetting exactly zero (METHOD.md §4, §5)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lpi.checkpoint import load_backbone
from lpi.config import PromptConfig
from lpi.continual import losses, trainer
from lpi.continual.data.loader import make_loader
from lpi.continual.data.manifest import read_manifest, select
from lpi.continual.evaluation import encode
from lpi.continual.methods import gradient_ratios, method_spec, new_prompts, step_loss
from lpi.continual.run_state import RunError, load_state
from lpi.continual.similarity import FILE_NAME, SimilarityError, write_similarity
from lpi.continual.trainer import run_training
from tests.train_helpers import tiny_train_config as _config

BAND = (0.01, 10.0)  # the spec's check: an auxiliary term within [0.01, 10] x L_clip's gradient


def _init_ratios(tiny_runs, method: str) -> dict[str, dict[str, float]]:
    """Ratios on task 1's first batch (16 images), the trainer's default prompt shape capped at
    the tiny backbone's depth, task 0 frozen and unrelated (S = 0.2 < 0.5)."""
    backbone = load_backbone(str(tiny_runs / "backbone.safetensors"))
    records = read_manifest(tiny_runs / "data" / "manifest.jsonl")
    names = list(dict.fromkeys(r.task for r in records))
    depth = min(backbone.config.vision.layers, backbone.config.text.layers)
    config = PromptConfig(layers=min(9, depth), tokens=16, rank=4)
    torch.manual_seed(0)
    earlier, current = new_prompts(method, config, backbone), new_prompts(method, config, backbone)
    size = backbone.config.vision.image_size
    batch = next(iter(make_loader(select(records, names[1], "train"), size, 16, seed=0)))
    targets = losses.task_targets(torch.tensor([[1.0, 0.2], [0.2, 1.0]]))
    spec = method_spec(method)
    parts = step_loss(backbone, current, batch.pixels, batch.tokens, [earlier], targets, spec)
    return gradient_ratios(parts, current)


@pytest.mark.parametrize("method", ["lpi", "dense"])
def test_task_constraint_gradient_is_within_the_band_at_init(tiny_runs, method):
    ratios = _init_ratios(tiny_runs, method)
    assert set(ratios) == {"layer", "task"}
    expected = {"A", "B_v", "B_t", "C_v", "C_t"} if method == "lpi" else {"P_v", "P_t"}
    assert set(ratios["task"]) == expected
    low, high = BAND
    assert all(low <= r <= high for r in ratios["task"].values()), ratios["task"]


@pytest.mark.xfail(
    strict=True,
    reason="measured: with the spec's weight 0.1, 0.1 L_layer's gradient is 3.8-45x L_clip's "
    "on the factors at init on this random tiny backbone (J=4, N=16, R=4: A 15, B_v 45, B_t 3.8, "
    "C_v 26, C_t 4.3); the weight is the spec's to change, not the trainer's",
)
def test_layer_contrast_gradient_is_within_the_band_at_init(tiny_runs):
    ratios = _init_ratios(tiny_runs, "lpi")["layer"]
    low, high = BAND
    assert all(low <= r <= high for r in ratios.values()), ratios


def test_gradient_ratios_match_a_direct_autograd_computation(tiny_backbone, generator):
    """Independent reference: each term backpropagated on its own through .backward()."""
    config = PromptConfig(layers=2, tokens=4, rank=3)
    torch.manual_seed(1)
    earlier, current = (new_prompts("lpi", config, tiny_backbone) for _ in range(2))
    size = tiny_backbone.config.vision.image_size
    pixels = torch.randn(6, 3, size, size, generator=generator)
    tokens = torch.randint(1, 400, (6, 77), generator=generator)
    targets = torch.eye(2, dtype=torch.bool)
    spec = method_spec("lpi")
    ratios = gradient_ratios(
        step_loss(tiny_backbone, current, pixels, tokens, [earlier], targets, spec), current
    )
    grads = {}
    for term, weight in (("clip", 1.0), ("layer", 0.1), ("task", 0.1)):
        current.zero_grad()
        parts = step_loss(tiny_backbone, current, pixels, tokens, [earlier], targets, spec)
        (weight * parts[term]).backward()
        grads[term] = {n: float(current.get_parameter(n).grad.norm()) for n in ratios["task"]}
    assert all(p.grad is None for p in earlier.parameters())  # only task k learns
    for term in ("layer", "task"):
        for name, ratio in ratios[term].items():
            # Same float32 graph, two autograd paths: equal up to summation order.
            assert ratio == pytest.approx(grads[term][name] / grads["clip"][name], rel=1e-4)


@pytest.fixture
def data(tiny_runs, tmp_path):
    """A copy of the tiny bundle's data folder, so a similarity file can sit beside it."""
    folder = tmp_path / "data"
    shutil.copytree(tiny_runs / "data", folder)
    return folder


def _tasks(data):
    return list(dict.fromkeys(r.task for r in read_manifest(data / "manifest.jsonl")))


def test_similarity_file_beside_the_manifest_is_used_and_recorded(tiny_runs, data, tmp_path):
    names = _tasks(data)
    write_similarity(data / FILE_NAME, names[::-1], [[1.0, 0.8], [0.8, 1.0]], "shared families")
    state = run_training(_config(tiny_runs, data, tmp_path / "run", task_threshold=0.6))
    saved = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert saved["task_threshold"] == 0.6 and saved["similarity"]["task_loss"]
    assert saved["similarity"]["matrix"] == [[1.0, 0.8], [0.8, 1.0]]
    assert FILE_NAME in saved["similarity"]["source"]
    assert "shared families" in saved["similarity"]["source"]
    first, second = (r["gradient_ratios"] for r in state.results)
    assert set(first) == {"layer"} and set(second) == {"layer", "task"}  # L_task from k = 1


def test_without_a_matrix_task_loss_is_off_with_one_warning(tiny_runs, data, tmp_path, caplog):
    (data / FILE_NAME).unlink(missing_ok=True)  # the generator ships one
    state = run_training(_config(tiny_runs, data, tmp_path / "run"))
    assert state.config.similarity["task_loss"] is False
    assert state.config.similarity["source"] is None
    assert "task" not in state.results[1]["gradient_ratios"]
    assert caplog.text.count("L_task is off") == 1


def test_description_similarity_only_when_asked(tiny_runs, data, tmp_path):
    (data / FILE_NAME).unlink(missing_ok=True)
    config = _config(tiny_runs, data, tmp_path / "run", similarity_from_descriptions=True)
    state = run_training(config)
    assert "text tower" in state.config.similarity["source"]
    assert "task" in state.results[1]["gradient_ratios"]


def test_a_resume_under_another_similarity_is_refused(tiny_runs, data, tmp_path):
    """The finished tasks trained under one S: a resume may not switch it (a changed file, no
    file, S asked of the text tower), nor resume a format-1 run.json that never named it."""
    names, out = _tasks(data), tmp_path / "run"
    write_similarity(data / FILE_NAME, names, [[1.0, 0.8], [0.8, 1.0]], "families")
    run_training(_config(tiny_runs, data, out))
    stamp = (out / "run.json").read_bytes()
    write_similarity(data / FILE_NAME, names, [[1.0, 0.2], [0.2, 1.0]], "families")
    with pytest.raises(RunError, match=r"run\.json: similarity: S\[.*\] was 0\.8 .*now 0\.2"):
        run_training(_config(tiny_runs, data, out))
    (data / FILE_NAME).unlink()
    with pytest.raises(RunError, match=r"run\.json: similarity: the run's S came from file"):
        run_training(_config(tiny_runs, data, out))
    with pytest.raises(RunError, match=r"run\.json: .*similarity_from_descriptions False -> True"):
        run_training(_config(tiny_runs, data, out, similarity_from_descriptions=True))
    assert (out / "run.json").read_bytes() == stamp  # refused before anything was written

    old = json.loads(stamp)  # as format 1 wrote it: no rule for L_task recorded
    old["config"]["format"] = 1
    for key in ("task_threshold", "similarity", "similarity_from_descriptions"):
        del old["config"][key]
    (out / "run.json").write_text(json.dumps(old))
    with pytest.raises(RunError, match=r"run\.json: run format 1, this version reads 2"):
        run_training(_config(tiny_runs, data, out))


BAD_FILES = {
    "not symmetric": {"matrix": [[1.0, 0.3], [0.2, 1.0]]},
    "rows": {"matrix": [[1.0, 0.3, 0.0], [0.3, 1.0, 0.0], [0.0, 0.0, 1.0]]},
    "finite": {"matrix": [[1.0, float("nan")], [float("nan"), 1.0]]},
    "no similarity for task": {"tasks": ["a", "b"]},
}


@pytest.mark.parametrize("why", list(BAD_FILES))
def test_bad_similarity_is_refused_before_training(tiny_runs, data, tmp_path, monkeypatch, why):
    content = {"tasks": _tasks(data), "matrix": [[1.0, 0.3], [0.3, 1.0]], "source": ""}
    path = tmp_path / "given.json"
    path.write_text(json.dumps(content | BAD_FILES[why]))
    monkeypatch.setattr(trainer, "load_backbone", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SimilarityError, match=why) as err:
        run_training(_config(tiny_runs, data, tmp_path / "run", similarity=path))
    assert str(path) in str(err.value)
    path.write_text("{")
    with pytest.raises(SimilarityError, match="unreadable"):
        run_training(_config(tiny_runs, data, tmp_path / "run", similarity=path))
    assert not (tmp_path / "run" / "run.json").exists()


def test_oracle_forgetting_is_exactly_zero(tiny_runs, data, tmp_path, monkeypatch):
    """Task 0's parameters, embeddings and oracle recall after task 1 equal those after task 0
    bit for bit, with L_task on (task 1 reads task 0's prompts, detached)."""
    names = _tasks(data)
    write_similarity(data / FILE_NAME, names, [[1.0, 0.9], [0.9, 1.0]], "related")
    seen = []
    real = trainer.evaluate_seen

    def spy(backbone, bank, keys, sets):
        test = sets[names[0]]
        rows = [names[0]] * len(test.pixels), [names[0]] * len(test.tokens)
        seen.append(
            (
                {k: v.clone() for k, v in bank.tasks[names[0]].state_dict().items()},
                encode(backbone, bank, test.pixels, rows[0], True),
                encode(backbone, bank, test.tokens, rows[1], False),
            )
        )
        return real(backbone, bank, keys, sets)

    monkeypatch.setattr(trainer, "evaluate_seen", spy)
    state = run_training(_config(tiny_runs, data, tmp_path / "run", lr=0.1))
    assert len(seen) == 2 and "task" in state.results[1]["gradient_ratios"]
    (params0, image0, text0), (params1, image1, text1) = seen
    assert params0.keys() == params1.keys()
    assert all(torch.equal(params0[k], params1[k]) for k in params0)
    assert torch.equal(image0, image1) and torch.equal(text0, text1)
    first, last = (r["oracle"][names[0]] for r in state.results)
    # Every recall@k, both directions, on the task's own gallery (the union gallery gains task
    # 1's test set as distractors, so it may drop).
    assert first["task"] == last["task"]
    saved = load_state(tmp_path / "run").results
    assert saved[0]["r1"]["oracle"][names[0]] == saved[1]["r1"]["oracle"][names[0]]
