"""Spherical K-Means and task-key routing on synthetic clusters, against direct loops."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from lpi import routing


def _clusters(generator, centres: torch.Tensor, per_cluster: int, spread: float = 0.01):
    """Unit points around each unit centre [M, E]; returns points [M * per, E] and labels."""
    labels = torch.arange(centres.shape[0]).repeat_interleave(per_cluster)
    noise = spread * torch.randn(labels.numel(), centres.shape[1], generator=generator)
    return F.normalize(centres[labels] + noise, dim=1), labels


def _directions(generator, count: int, width: int) -> torch.Tensor:
    return F.normalize(torch.randn(count, width, generator=generator), dim=1)


def _match(found: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """For each true centre, the cosine to its nearest found centre; also checks a bijection."""
    nearest = (true @ found.T).argmax(1)
    assert sorted(nearest.tolist()) == list(range(found.shape[0]))
    return (true @ found.T).amax(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_separated_clusters(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    true = _directions(generator, 5, 32)
    points, _ = _clusters(generator, true, 60)
    points = points * torch.rand(points.shape[0], 1, generator=generator).add(0.5)  # any norm
    found = routing.spherical_kmeans(points, seed=seed)
    assert found.shape == (5, 32)
    torch.testing.assert_close(found.norm(dim=1), torch.ones(5))
    assert (_match(found, true) > 0.999).all()  # spread 0.01 x sqrt(32) moves a mean by ~1e-3


def test_kmeans_is_a_fixed_point_of_its_own_update():
    """At convergence each centre is the normalised mean of the points nearest to it."""
    generator = torch.Generator().manual_seed(5)
    points = F.normalize(torch.randn(300, 8, generator=generator), dim=1)  # no clusters at all
    centres = routing.spherical_kmeans(points, tolerance=0.0, iterations=300)
    assignment = (points @ centres.T).argmax(1)
    for m in range(centres.shape[0]):
        mean = F.normalize(points[assignment == m].sum(0), dim=0)
        assert float(mean @ centres[m]) > 1 - 1e-5


def test_kmeans_is_deterministic_by_seed():
    generator = torch.Generator().manual_seed(9)
    points = torch.randn(500, 16, generator=generator)
    first = routing.spherical_kmeans(points, seed=3)
    assert torch.equal(first, routing.spherical_kmeans(points, seed=3))
    torch.manual_seed(12345)  # the global generator plays no part
    assert torch.equal(first, routing.spherical_kmeans(points, seed=3))


def test_kmeans_fewer_points_than_clusters():
    generator = torch.Generator().manual_seed(4)
    points = _directions(generator, 3, 10)
    found = routing.spherical_kmeans(points)
    assert found.shape == (3, 10)
    assert (_match(found, points) > 1 - 1e-6).all()
    assert routing.spherical_kmeans(points[:1]).shape == (1, 10)


def test_kmeans_duplicates_give_one_centre_per_direction():
    generator = torch.Generator().manual_seed(8)
    directions = _directions(generator, 2, 12)
    scale = torch.rand(100, 1, generator=generator) + 0.1  # x and 3x are the same direction
    points = directions[torch.arange(100) % 2] * scale
    found = routing.spherical_kmeans(points, clusters=5)
    assert found.shape == (2, 12)
    assert (_match(found, directions) > 1 - 1e-6).all()


def test_empty_cluster_is_reseeded_at_the_worst_served_point():
    points = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 1.0, 0.0]]), dim=1)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # centre 1 attracts nothing
    updated = routing._lloyd_step(points, centres)
    torch.testing.assert_close(updated[1], points[2])  # the point farthest from its centre


def test_kmeans_scales_without_a_pairwise_matrix():
    """20k x 64 would need 1.6 GB for an N x N matrix; this takes well under a second."""
    generator = torch.Generator().manual_seed(1)
    true = _directions(generator, 5, 64)
    points, _ = _clusters(generator, true, 4000, spread=0.05)
    found = routing.spherical_kmeans(points)
    assert (_match(found, true) > 0.99).all()


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (torch.full((4, 3), math.nan), "NaN"),
        (torch.zeros(4, 3), "zero vector"),
        (torch.zeros(0, 3), "non-empty 2-D"),
        (torch.ones(3), "non-empty 2-D"),
    ],
)
def test_kmeans_refuses_bad_features(features, message):
    with pytest.raises(ValueError, match=message):
        routing.spherical_kmeans(features)


def _task_centres(generator, tasks: int = 4, width: int = 32) -> list[list[torch.Tensor]]:
    """Per task and modality, 5 sub-cluster centres [5, E] around the task's own anchor."""
    return [
        [
            F.normalize(_directions(generator, 1, width) + 0.3 * _directions(generator, 5, width))
            for _modality in routing.MODALITIES
        ]
        for _ in range(tasks)
    ]


def _draw(generator, task_centres, per_cluster: int = 20) -> list[list[torch.Tensor]]:
    """Points [5 * per_cluster, E] around every sub-cluster of every task and modality."""
    return [
        [_clusters(generator, centres, per_cluster, spread=0.02)[0] for centres in task]
        for task in task_centres
    ]


def _naive_route(keys: routing.TaskKeys, features: torch.Tensor, modality: str) -> list[int]:
    """Loop over every task's centres: the first strictly better cosine wins."""
    chosen = []
    for query in F.normalize(features, dim=1):
        best, best_task = -math.inf, -1
        for t, name in enumerate(keys.names):
            for centre in keys.centres(name, modality):
                if float(query @ centre) > best:
                    best, best_task = float(query @ centre), t
        chosen.append(best_task)
    return chosen


def test_routing_is_exact_on_separated_tasks():
    generator = torch.Generator().manual_seed(21)
    task_centres = _task_centres(generator)
    keys = routing.TaskKeys()
    for t, (image, text) in enumerate(_draw(generator, task_centres)):
        keys.add(f"task{t}", image, text)
    assert keys.names == ("task0", "task1", "task2", "task3") and len(keys) == 4
    assert keys.width == 32
    held_out = _draw(generator, task_centres, per_cluster=10)  # fresh queries, same tasks
    truth = torch.arange(4).repeat_interleave(50)
    for modality_index, modality in enumerate(routing.MODALITIES):
        queries = torch.cat([task[modality_index] for task in held_out])  # [200, E]
        predicted = keys.route(queries, modality)
        assert predicted.dtype == torch.long and predicted.shape == (200,)
        assert routing.routing_accuracy(predicted, truth) == 100.0
        assert predicted.tolist() == _naive_route(keys, queries, modality)
        names = keys.route_names(queries[:3], modality)
        assert names == ["task0"] * 3
        for name in keys.names:
            centres = keys.centres(name, modality)
            assert centres.shape == (5, 32) and centres.dtype == torch.float32
            torch.testing.assert_close(centres.norm(dim=1), torch.ones(5))


def test_routing_against_naive_loop_on_overlapping_tasks():
    """Overlapping tasks route imperfectly; the vectorised route still equals the loop."""
    generator = torch.Generator().manual_seed(2)
    keys = routing.TaskKeys(clusters=3, seed=7)
    for t in range(3):
        keys.add(f"t{t}", torch.randn(40, 8, generator=generator), torch.randn(30, 8))
    queries = torch.randn(200, 8, generator=generator)
    for modality in routing.MODALITIES:
        assert keys.route(queries, modality).tolist() == _naive_route(keys, queries, modality)


def test_state_dict_round_trips_through_safetensors():
    generator = torch.Generator().manual_seed(3)
    keys = routing.TaskKeys()
    for t, (image, text) in enumerate(_draw(generator, _task_centres(generator, 3, 16))):
        keys.add(f"task {t}.x", image, text)
    keys.add("small", _directions(generator, 2, 16), _directions(generator, 7, 16))
    state = keys.state_dict()
    assert state["image.centres"].shape == (17, 16) and state["text.task"].shape == (20,)
    blob = save(state, metadata={"tasks": json.dumps(keys.names)})
    loaded = load(blob)
    restored = routing.TaskKeys.from_state_dict(loaded, json.loads(json.dumps(keys.names)))
    assert restored.names == keys.names
    for name in keys.names:
        for modality in routing.MODALITIES:
            assert torch.equal(restored.centres(name, modality), keys.centres(name, modality))
    queries = torch.randn(50, 16, generator=generator)
    assert torch.equal(restored.route(queries, "text"), keys.route(queries, "text"))
    assert keys.centres("small", "image").shape == (2, 16)


def test_task_keys_refuse_bad_input():
    keys = routing.TaskKeys()
    with pytest.raises(ValueError, match="no tasks"):
        keys.route(torch.randn(2, 8), "image")
    with pytest.raises(ValueError, match="no tasks"):
        keys.state_dict()
    with pytest.raises(ValueError, match="width"):
        keys.add("a", torch.randn(10, 8), torch.randn(10, 9))
    keys.add("a", torch.randn(10, 8), torch.randn(10, 8))
    with pytest.raises(ValueError, match="already has keys"):
        keys.add("a", torch.randn(10, 8), torch.randn(10, 8))
    with pytest.raises(ValueError, match="width 6"):
        keys.add("b", torch.randn(10, 6), torch.randn(10, 6))
    with pytest.raises(ValueError, match="width 6"):
        keys.route(torch.randn(2, 6), "text")
    with pytest.raises(ValueError, match="NaN"):
        keys.route(torch.full((2, 8), math.inf), "text")
    with pytest.raises(ValueError, match="NaN"):
        keys.add("b", torch.randn(10, 8), torch.full((10, 8), math.nan))
    with pytest.raises(ValueError, match="modality"):
        keys.route(torch.randn(2, 8), "audio")
    assert keys.names == ("a",)  # failed adds leave nothing behind


def test_from_state_dict_refuses_bad_state():
    keys = routing.TaskKeys()
    keys.add("a", torch.randn(10, 8), torch.randn(10, 8))
    state = keys.state_dict()
    with pytest.raises(ValueError, match="lacks"):
        routing.TaskKeys.from_state_dict({"image.centres": state["image.centres"]}, ["a"])
    with pytest.raises(ValueError, match="every task needs centres"):
        routing.TaskKeys.from_state_dict(state, ["a", "b"])
    with pytest.raises(ValueError, match="unit-norm"):
        routing.TaskKeys.from_state_dict(
            {**state, "text.centres": 2 * state["text.centres"]}, ["a"]
        )
    with pytest.raises(ValueError, match="distinct"):
        routing.TaskKeys.from_state_dict(state, [])


def test_routing_accuracy():
    assert routing.routing_accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == 75.0
    assert routing.routing_accuracy(["a", "b"], ["a", "a"]) == 50.0
    with pytest.raises(ValueError, match="as many"):
        routing.routing_accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="as many"):
        routing.routing_accuracy([], [])


@pytest.mark.parametrize("clusters", [0, -1])
def test_keys_refuse_a_centre_count_below_one_before_any_fit(clusters):
    """The one check the trainer's and the evaluator's configs share."""
    with pytest.raises(ValueError, match="key_centres"):
        routing.TaskKeys(clusters)
