"""What one load run does: `LoadConfig`, its bounds, and the `--op` weights syntax."""

from __future__ import annotations

from dataclasses import dataclass, field

OPS = ("embed", "search", "index")
MIXED_WEIGHTS = {"embed": 8.0, "search": 1.0, "index": 1.0}
MODALITIES = ("text", "image", "mixed")
MAX_DURATION_S = 3600.0  # per level: a load run always ends
MAX_REQUESTS = 1_000_000  # per level
MAX_CONCURRENCY = 1024
DEFAULT_DURATION_S = 10.0  # per level, when neither a duration nor a request count is given


@dataclass(frozen=True)
class LoadConfig:
    """One load run; `check()` refuses unbounded or contradictory settings."""

    url: str = "http://127.0.0.1:8000"
    modality: str = "text"
    tasks: tuple[str, ...] = ()  # empty: every task GET /tasks lists
    items_per_request: int = 1
    concurrency: tuple[int, ...] = (1,)
    duration_s: float | None = None  # per level; at most one of duration_s and requests
    requests: int | None = None  # per level; neither: DEFAULT_DURATION_S per level
    weights: dict[str, float] = field(default_factory=lambda: {"embed": 1.0})
    swap_interval_s: float | None = None
    swap_artifacts: tuple[str, ...] = ()  # server-side paths, or local files with upload
    upload: bool = False
    api_key: str | None = None
    admin_key: str | None = None
    timeout_s: float = 60.0
    warmup: int | None = None  # unrecorded requests before each level (None: one per worker)
    seed: int = 0

    def check(self) -> LoadConfig:
        if self.duration_s is not None and self.requests is not None:
            raise ValueError(
                "give --duration or --requests, not both: either one bounds each level "
                f"(neither: {DEFAULT_DURATION_S:g} seconds per level)"
            )
        if self.duration_s is not None and not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration must lie in (0, {MAX_DURATION_S:.0f}] seconds")
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS:
            raise ValueError(f"requests must lie in [1, {MAX_REQUESTS}]")
        if not self.concurrency or not all(1 <= c <= MAX_CONCURRENCY for c in self.concurrency):
            raise ValueError(f"each concurrency must lie in [1, {MAX_CONCURRENCY}]")
        if len(set(self.concurrency)) != len(self.concurrency):
            raise ValueError("concurrency levels must be distinct (each is reported once)")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}")
        if self.items_per_request < 1:
            raise ValueError("items_per_request must be >= 1")
        if not self.weights or set(self.weights) - set(OPS) or min(self.weights.values()) < 0:
            raise ValueError(f"op weights must name only {OPS}, with weights >= 0")
        if sum(self.weights.values()) <= 0:
            raise ValueError("at least one op needs a positive weight")
        if (self.swap_interval_s is None) != (not self.swap_artifacts):
            raise ValueError("swaps need both swap_interval_s and swap_artifacts")
        if self.swap_interval_s is not None and self.swap_interval_s <= 0:
            raise ValueError("swap_interval_s must be > 0")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        return self

    @property
    def level_seconds(self) -> float | None:
        """How long each level lasts (None when a request count bounds it)."""
        if self.requests is not None:
            return None
        return self.duration_s if self.duration_s is not None else DEFAULT_DURATION_S


def parse_op(text: str) -> dict[str, float]:
    """'embed' -> {embed: 1}; 'mixed' -> the default mix; 'embed=6,search=3' -> those weights."""
    if text in OPS:
        return {text: 1.0}
    if text == "mixed":
        return dict(MIXED_WEIGHTS)
    weights = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in OPS or not value:
            raise ValueError(f"--op: {part!r} is not OP=WEIGHT with OP one of {OPS}")
        weights[name.strip()] = float(value)
    return weights
