"""Task keys: route a query whose task is not named to the task of its nearest centre.

Spec section 5, after S-Prompts (Wang et al., NeurIPS 2022): after task k, 5 K-Means centres of
the frozen, unprompted image features of its training data and 5 of the text features; a query
goes to the task that owns the nearest centre by cosine distance 1 - <x, c>. (The original code
used L1 distance; the method chooses cosine, so the K-Means here is spherical to match.)

Dimensions: N points, E embedding, M centres, B queries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

CLUSTERS = 5
ITERATIONS = 100
TOLERANCE = 1e-6  # stop once no centre moves more than this in cosine distance
SAME_DIRECTION = 1e-6  # cosine distance under which two points count as one direction
MODALITIES = ("image", "text")


def check_clusters(clusters: int) -> int:
    """A centre count per task and modality, refused below 1 (configs check it before any work)."""
    if clusters < 1:
        raise ValueError(f"key_centres: {clusters} must be at least 1")
    return clusters


def unit_rows(features: Tensor, width: int | None = None, name: str = "features") -> Tensor:
    """Rows scaled to unit norm, at least float32; refuses what cosine cannot rank."""
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty 2-D tensor [N, E], got {tuple(features.shape)}"
        )
    if width is not None and features.shape[1] != width:
        raise ValueError(f"{name} have width {features.shape[1]}, the task keys have {width}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} hold NaN or inf")
    features = features.to(torch.promote_types(features.dtype, torch.float32))
    norms = features.norm(dim=1, keepdim=True)  # [N, 1]
    if (norms == 0).any():
        raise ValueError(f"{name} hold a zero vector, which has no direction")
    unit: Tensor = features / norms
    return unit


def check_centres(centres: Tensor, width: int | None = None, name: str = "centres") -> Tensor:
    """Centres [M, E] as routing keeps them: floating point, 2-D, non-empty, finite, unit-norm
    rows (to a float32 round trip); returns them float32 on the CPU, else ValueError."""
    if not isinstance(centres, Tensor) or not centres.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [M, E]")
    unit = unit_rows(centres, width, name)
    if not torch.allclose(unit, centres.to(unit.dtype), atol=1e-4):  # float32 round trip
        raise ValueError(f"{name} are not unit-norm")
    return centres.float().cpu()


def usable_centres(
    centres: Mapping[str, Mapping[str, Tensor]], width: int | None = None
) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    """Split tasks' centres into those routing can use and those it must skip (task -> why).

    Defensive: one task's unusable keys (a wrong width, no direction, one modality missing)
    must leave routing to the others, never fail it for every caller. `width` is E when
    known; otherwise the first usable task fixes it.
    """
    usable: dict[str, dict[str, Tensor]] = {}
    skipped: dict[str, str] = {}
    for task, per_modality in centres.items():
        try:
            missing = [m for m in MODALITIES if m not in per_modality]
            if missing:
                raise ValueError(f"no {missing[0]} centres")
            checked = {m: check_centres(per_modality[m], width, f"{m} centres") for m in MODALITIES}
            if checked["text"].shape[1] != checked["image"].shape[1]:
                raise ValueError("image and text centres differ in width")
        except ValueError as err:
            skipped[task] = str(err)
            continue
        usable[task] = checked
        width = checked["image"].shape[1]
    return usable, skipped


def _kmeans_plus_plus(points: Tensor, clusters: int, generator: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding (as scikit-learn): draw 2 + ln(M) candidates with probability
    proportional to their distance to the nearest centre, keep the one that lowers the total most.

    On the unit sphere |x - c|^2 = 2 (1 - <x, c>), so the classic D^2 weight is the cosine
    distance. Stops early when every point lies within SAME_DIRECTION of a centre.
    """
    count = points.shape[0]
    trials = 2 + int(math.log(clusters))
    first = int(torch.randint(count, (), generator=generator))
    chosen = [points[first]]
    distance = (1 - points @ points[first]).clamp_min(0)  # [N] to the nearest centre
    while len(chosen) < clusters:
        weights = torch.where(distance > SAME_DIRECTION, distance, 0).double()  # [N]
        total = float(weights.sum())
        if total == 0:
            break
        draws = torch.rand(trials, generator=generator, dtype=torch.float64) * total  # [L]
        candidates = torch.searchsorted(weights.cumsum(0), draws.to(points.device), right=True)
        candidates = candidates.clamp_max(count - 1)  # [L]
        to_candidate = (1 - points @ points[candidates].T).clamp_min(0)  # [N, L]
        reduced = torch.minimum(distance[:, None], to_candidate)  # [N, L]
        best = int(reduced.double().sum(0).argmin())
        chosen.append(points[candidates[best]])
        distance = reduced[:, best]
    return torch.stack(chosen)  # [M, E]


def _lloyd_step(points: Tensor, centres: Tensor) -> Tensor:
    """One assignment + mean-direction update; empty clusters take the worst-served points."""
    similarity = points @ centres.T  # [N, M]
    best, assignment = similarity.max(1)  # [N]; ties go to the lower centre index
    sums = torch.zeros_like(centres).index_add_(0, assignment, points)  # [M, E]
    counts = torch.bincount(assignment, minlength=centres.shape[0])  # [M]
    norms = sums.norm(dim=1, keepdim=True)  # [M, 1]
    # A cluster whose points cancel out (zero mean) keeps its old direction.
    updated = torch.where(norms > 0, sums / norms.clamp_min(1e-30), centres)  # [M, E]
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        farthest = torch.sort(best, stable=True).indices[: empty.numel()]
        updated[empty] = points[farthest]
    return updated


def spherical_kmeans(
    features: Tensor,
    clusters: int = CLUSTERS,
    seed: int = 0,
    iterations: int = ITERATIONS,
    tolerance: float = TOLERANCE,
) -> Tensor:
    """Unit-norm centres [M, E] of features [N, E] under cosine distance, deterministic by seed.

    M = min(clusters, number of distinct directions): fewer points, or many duplicates, give
    fewer centres rather than repeated ones. Greedy k-means++ seeding, then at most `iterations`
    Lloyd steps (assign by cosine, centre = normalised mean) until no centre moves more than
    `tolerance`. Memory is O(N M), never O(N^2).
    """
    if clusters < 1 or iterations < 0:
        raise ValueError(f"need clusters >= 1 and iterations >= 0, got {clusters}, {iterations}")
    points = unit_rows(features)  # [N, E]
    generator = torch.Generator().manual_seed(seed)
    centres = _kmeans_plus_plus(points, clusters, generator)  # [M, E]
    for _ in range(iterations):
        updated = _lloyd_step(points, centres)
        shift = float((1 - (updated * centres).sum(1)).max())
        centres = updated
        if shift <= tolerance:
            break
    return centres


class TaskKeys:
    """Per task, unit-norm image centres [M, E] and text centres [M, E], M <= clusters.

    Tasks keep the order they were added in; route() returns indices into `names`. A query
    equally near two tasks goes to the one added first.
    """

    def __init__(self, clusters: int = CLUSTERS, seed: int = 0) -> None:
        self.clusters = check_clusters(clusters)
        self.seed = seed
        self._names: list[str] = []
        self._centres: dict[str, list[Tensor]] = {modality: [] for modality in MODALITIES}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._names)

    @property
    def width(self) -> int | None:
        """E, fixed by the first task added; None while there are no tasks."""
        return self._centres["image"][0].shape[1] if self._names else None

    def __len__(self) -> int:
        return len(self._names)

    def centres(self, task: str, modality: str) -> Tensor:
        """The centres [M, E] of one task and modality."""
        return self._centres[_modality(modality)][self._names.index(task)]

    def subset(self, tasks: Sequence[str]) -> TaskKeys:
        """The keys of only these tasks, in this order (e.g. a resumed run's finished ones)."""
        unknown = sorted(set(tasks) - set(self._names))
        if unknown:
            raise ValueError(f"no keys for tasks {unknown}; keys hold {self._names}")
        keys = TaskKeys(self.clusters, self.seed)
        keys._names = list(tasks)
        for modality in MODALITIES:
            keys._centres[modality] = [self.centres(task, modality) for task in tasks]
        return keys

    def add(self, task: str, image_features: Tensor, text_features: Tensor) -> None:
        """Fit and keep the keys of a new task from its frozen, unprompted training features."""
        if not isinstance(task, str) or not task:
            raise ValueError("a task name must be a non-empty string")
        if task in self._names:
            raise ValueError(f"task {task!r} already has keys")
        width = self.width
        for modality, features in (("image", image_features), ("text", text_features)):
            unit_rows(features, width if width is not None else image_features.shape[-1], modality)
        fitted = {
            modality: spherical_kmeans(features, self.clusters, self.seed).float().cpu()
            for modality, features in (("image", image_features), ("text", text_features))
        }
        self._names.append(task)
        for modality in MODALITIES:
            self._centres[modality].append(fitted[modality])

    def route(self, features: Tensor, modality: str) -> Tensor:
        """Task index LongTensor [B] of the nearest centre (cosine) for each query [B, E]."""
        if not self._names:
            raise ValueError("no tasks have keys yet: add() one before routing")
        centres, owner = self._stacked(_modality(modality))  # [M_all, E], [M_all]
        queries = unit_rows(features, self.width, f"{modality} features").float()  # [B, E]
        nearest = (queries @ centres.to(queries.device).T).argmax(1)  # [B]
        return owner.to(queries.device)[nearest]

    def route_names(self, features: Tensor, modality: str) -> list[str]:
        """Task name of the nearest centre for each query [B, E]."""
        return [self._names[index] for index in self.route(features, modality).tolist()]

    def _stacked(self, modality: str) -> tuple[Tensor, Tensor]:
        per_task = self._centres[modality]
        owner = [torch.full((c.shape[0],), i, dtype=torch.long) for i, c in enumerate(per_task)]
        return torch.cat(per_task), torch.cat(owner)

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors for safetensors: "{m}.centres" [M_all, E] float32, "{m}.task" [M_all].

        "{m}.task" holds each centre's index into `names`; keep `names` beside it (for example
        as JSON in the safetensors metadata).
        """
        if not self._names:
            raise ValueError("no tasks have keys yet: nothing to save")
        state = {}
        for modality in MODALITIES:
            centres, owner = self._stacked(modality)
            state[f"{modality}.centres"], state[f"{modality}.task"] = centres, owner
        return state

    @classmethod
    def from_centres(cls, centres: Mapping[str, Mapping[str, Tensor]]) -> TaskKeys:
        """Keys from centres already fitted (task -> {"image": [M, E], "text": [M, E]}), as
        task artifacts carry them: no refit, checked like a saved state."""
        if not centres:
            return cls()
        state = {}
        for modality in MODALITIES:
            per_task = [centres[task][modality] for task in centres]
            state[f"{modality}.centres"] = torch.cat(per_task)
            state[f"{modality}.task"] = torch.cat(
                [torch.full((c.shape[0],), i, dtype=torch.long) for i, c in enumerate(per_task)]
            )
        return cls.from_state_dict(state, list(centres))

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Tensor],
        names: Sequence[str],
        clusters: int = CLUSTERS,
        seed: int = 0,
    ) -> TaskKeys:
        """Rebuild keys saved by state_dict(), checking every shape, index and norm."""
        names = list(names)
        if not names or len(set(names)) != len(names):
            raise ValueError("names must be a non-empty list of distinct task names")
        keys = cls(clusters, seed)
        width = None
        missing = {f"{m}.{part}" for m in MODALITIES for part in ("centres", "task")} - set(state)
        if missing:
            raise ValueError(f"task keys state lacks {sorted(missing)}")
        for modality in MODALITIES:
            centres, owner = state[f"{modality}.centres"], state[f"{modality}.task"]
            if owner.ndim != 1 or owner.dtype != torch.long or centres.shape[:1] != owner.shape:
                raise ValueError(f"{modality}: need centres [M, E] and a LongTensor task [M]")
            # kept bit for bit (as float32): routing must not shift on reload
            saved = check_centres(centres, width, f"{modality} centres")
            width = saved.shape[1]  # the first modality's width; the second must match it
            counts = torch.bincount(owner.clamp_min(0), minlength=len(names))
            if owner.min() < 0 or len(counts) != len(names) or (counts == 0).any():
                raise ValueError(f"{modality}: every task needs centres and every centre a task")
            keys._centres[modality] = [saved[owner == i] for i in range(len(names))]
        keys._names = names
        return keys


def _modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return modality


def routing_accuracy(predicted: Tensor | Sequence, true: Tensor | Sequence) -> float:
    """Percent of queries routed to their true task (indices or names, compared as given)."""
    predicted = predicted.tolist() if isinstance(predicted, Tensor) else list(predicted)
    true = true.tolist() if isinstance(true, Tensor) else list(true)
    if len(predicted) != len(true) or not true:
        raise ValueError(
            f"need as many predictions as labels, at least one: {len(predicted)}, {len(true)}"
        )
    hits = sum(bool(p == t) for p, t in zip(predicted, true, strict=True))
    return 100.0 * hits / len(true)
