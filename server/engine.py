"""The server's model runner: a frozen backbone and its loaded tasks behind one small interface.

Why an interface: the registry loads and unloads tasks and the batcher encodes mixed-task
batches (docs/ARCHITECTURE.md, steps 2-4) without knowing which runtime holds the backbone.
Two runtimes hold it:

- `TorchEngine`: the backbone in torch; each task's folded prefix factors (METHOD.md
  section 6) live in one `kernels.TaskSlotPool` per tower, and a batch reads its rows' slots
  through an `lpi.SlotPrefix` (the fused kernel on CUDA, its reference elsewhere; section 7).
- `OnnxEngine`: the export's two onnxruntime graphs; a task's prefix keys and values are
  materialised once at load and gathered per row into the graphs' prefix inputs.

Both return the same vectors (tests/test_server_engine.py compares them per row). What both
check (shapes, rows, the probe batch every new version must pass) is `engine_checks`. A task is
named by its key, (task name, prompt version); a row without one runs the bare backbone.
`add` and `remove` run on the registry's threads while `encode` runs on the batcher's: each
engine keeps its bookkeeping under one lock, and a batch in flight keeps its tasks' prefixes.

Dimensions: B rows, T tokens, S image side, J prompted layers, N prompt tokens, R' a task's
rank, D a tower's width, E the embedding size.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

import lpi
from export.artifact import TaskArtifact
from kernels import NotInPoolError, PoolFullError, TaskSlotPool
from lpi import precision
from lpi.precision import resolve_dtype
from server.engine_checks import (  # noqa: F401 - re-exported: callers import them from here
    TOWERS,
    EngineError,
    Key,
    Modality,
    already_loaded,
    artifact_shape,
    check_rows,
    check_shape,
    probe,
    probe_added,
    unusable_rows,
)
from server.graphs import GraphedEncoders
from server.threads import apply_torch_threads, default_threads

log = logging.getLogger(__name__)

KINDS = ("torch", "onnx")


@runtime_checkable
class Engine(Protocol):
    """What the registry and the batcher need of a runtime."""

    name: str  # "torch" or "onnx"
    dtype: str  # what the model computes in: float32, bfloat16, float16 (torch); int8 (onnx)
    dtype_reason: str  # why that one (a fall-back from what was asked says so)
    backbone_id: str  # lpi.fingerprint of the backbone
    embed_dim: int
    image_size: int
    context_length: int

    def check(self, artifact: TaskArtifact) -> None:
        """Raise EngineError if `add` of this artifact would fail; changes nothing.

        Artifacts come from `export.read_artifact(path, backbone)`, which has checked that
        they were made for this backbone; engines check only what they hold (J, N, R', slots).
        """

    def add(self, key: Key, artifact: TaskArtifact) -> None:
        """Load a task under `key`, then `probe` it; EngineError if it cannot be held, the key
        is taken, or its vectors are unusable (then nothing stays loaded)."""

    def remove(self, key: Key) -> None:
        """Unload a task; the caller guarantees that no queued batch still names it."""

    def encode(self, modality: Modality, inputs: Tensor, keys: Sequence[Key | None]) -> Tensor:
        """Pixels [B, 3, S, S] or token ids [B, T] and one key per row (None: no task)
        -> unit-norm features [B, E] float32 on the CPU."""

    def loaded(self) -> list[Key]:
        """The keys loaded now, in load order."""


# ---------------------------------------------------------------------------------- torch


def cast_backbone(backbone: lpi.Backbone, device: torch.device, dtype: torch.dtype):
    """Move and cast the backbone in place, eval mode; the pools are made in its dtype.

    The backbone keeps its float32 fingerprint (`lpi.precision.cast_backbone`); tasks are
    folded at export against float32 weights and only their factors are cast, at `add`."""
    return precision.cast_backbone(backbone.to(device=device).eval(), dtype)


class TorchEngine:
    """The backbone in torch with task slots in two pools (image tower, text tower).

    The pools are made at the first `add`, for that task's J and N and a rank of
    max(max_rank, its R'); every later task must fit them. `backbone` is moved to `device`,
    cast to `dtype` (see `lpi.precision.resolve_dtype`) and put in eval mode in place (the
    engine owns it from then on); tasks' factors are cast to it at `add`. `threads`: torch's
    intra-op threads, set process-wide (None: left as they are). `backbone_fingerprint` saves
    hashing the weights again when the caller already has it.
    """

    name = "torch"

    def __init__(
        self,
        backbone: lpi.Backbone,
        *,
        device: torch.device | str = "cpu",
        slots: int = 64,
        max_rank: int = 16,
        backbone_fingerprint: str | None = None,
        dtype: str = "auto",
        cuda_graphs: int = 0,
        threads: int | None = None,
    ):
        if slots < 1 or max_rank < 1:
            raise ValueError(f"slots and max_rank must be >= 1, got {slots} and {max_rank}")
        self.backbone_id = backbone_fingerprint or lpi.fingerprint(backbone)
        self.device = torch.device(device)
        config = backbone.config
        widest = max(config.vision.width, config.text.width)
        chosen = resolve_dtype(dtype, self.device, width=widest)
        (log.warning if chosen.fell_back else log.info)("torch engine dtype: %s", chosen.reason)
        self.dtype, self.dtype_reason = chosen.name, chosen.reason
        # threads None: torch's setting is left alone (build_engine passes the server's default).
        self.threads = apply_torch_threads(threads) if threads else torch.get_num_threads()
        if next(backbone.parameters()).dtype == torch.float32:
            backbone.float32_fingerprint = self.backbone_id  # saves hashing it again to cast
        self.backbone = cast_backbone(backbone, self.device, chosen.dtype)
        # cuda_graphs > 0: forward passes replayed from CUDA graphs for batches up to that size.
        self._graphs = GraphedEncoders(self.backbone, cuda_graphs) if cuda_graphs else None
        self.embed_dim = config.embed_dim
        self.image_size = config.vision.image_size
        self.context_length = config.text.context_length
        self.widths = {"image": config.vision.width, "text": config.text.width}
        self.slots, self.max_rank = slots, max_rank
        self._dtype = next(backbone.parameters()).dtype  # the pools match q: no cast per layer
        self._lock = threading.Lock()
        self._pools: dict[str, TaskSlotPool] = {}  # tower -> pool, made at the first add
        self._keys: dict[Key, None] = {}  # loaded keys in load order

    def check(self, artifact: TaskArtifact) -> None:
        with self._lock:
            self._check(artifact)

    def add(self, key: Key, artifact: TaskArtifact) -> None:
        with self._lock:
            if key in self._keys:
                raise already_loaded(key)
            self._check(artifact)
            if not self._pools:
                self._pools = self._new_pools(artifact)
            self._load(key, artifact)
            self._keys[key] = None
        probe_added(self, key)
        log.info("loaded task %s (R' %d/%d)", key, *self._ranks(artifact))

    def remove(self, key: Key) -> None:
        with self._lock:
            if key not in self._keys:
                raise NotInPoolError(f"task {key!r} is not loaded")
            for pool in self._pools.values():
                pool.free(key)  # a slot still leased by a batch is reused after it
            del self._keys[key]
        log.info("unloaded task %s", key)

    def encode(self, modality: Modality, inputs: Tensor, keys: Sequence[Key | None]) -> Tensor:
        check_rows(modality, inputs, keys)
        with self._lock:
            pool = self._pools.get(modality)
        with torch.inference_mode():
            data = inputs.to(self.device)
            if all(key is None for key in keys):
                out = self._run(modality, data, None)
            elif pool is None:
                raise NotInPoolError(f"no task is loaded; asked for {sorted(set(keys) - {None})}")
            else:
                with pool.lease(keys) as slots:  # [B] int32, -1 = no task
                    # On the host before the lease ends: no later pool write can race the batch.
                    out = self._run(modality, data, lpi.SlotPrefix(slots, pool))
        return out.clone()  # a normal tensor: callers may write into it outside inference mode

    def loaded(self) -> list[Key]:
        with self._lock:
            return list(self._keys)

    def _run(self, modality: Modality, data: Tensor, prefix: lpi.SlotPrefix | None) -> Tensor:
        pool = self._pools.get(modality)
        if self._graphs is not None and pool is not None:
            if prefix is None:  # every row bare: slot -1
                slots = torch.full((len(data),), -1, dtype=torch.int32, device=data.device)
            else:
                slots = prefix.slots
            out = self._graphs.run(modality, data, slots, pool)
            if out is not None:
                return out.to("cpu", torch.float32)  # [B, E]
        encode = self.backbone.encode_image if modality == "image" else self.backbone.encode_text
        return encode(data, prefix).to("cpu", torch.float32)  # [B, E]

    def _check(self, artifact: TaskArtifact) -> None:
        """What `add` needs, under the lock: shape, rank, a free slot. That the artifact was
        made for this backbone (fingerprint, widths, depth) `read_artifact` has checked."""
        if not self._pools:
            return
        image = self._pools["image"]
        check_shape(artifact, image.layers, image.tokens, "the task-slot pool")
        for tower, rank in zip(TOWERS, self._ranks(artifact), strict=True):
            if rank > self._pools[tower].rank:
                raise EngineError(
                    f"task {artifact.name!r}: {tower} rank R'={rank} exceeds the pool's "
                    f"{self._pools[tower].rank} (raise max_rank)",
                    "artifact.rank",
                )
        if min(pool.available for pool in self._pools.values()) == 0:
            raise EngineError(
                f"no free task slot: {len(self._keys)} of {self.slots} hold tasks (the rest "
                "wait for in-flight batches); unload a task or raise slots",
                "task",
            )

    def _new_pools(self, artifact: TaskArtifact) -> dict[str, TaskSlotPool]:
        layers, tokens = artifact_shape(artifact)
        pools = {
            tower: TaskSlotPool(
                layers,
                self.slots,
                tokens,
                max(self.max_rank, rank),
                self.widths[tower],
                device=self.device,
                dtype=self._dtype,
            )
            for tower, rank in zip(TOWERS, self._ranks(artifact), strict=True)
        }
        log.info(
            "task-slot pools: %d slots, J=%d, N=%d, rank %d/%d",
            self.slots,
            layers,
            tokens,
            pools["image"].rank,
            pools["text"].rank,
        )
        return pools

    def _load(self, key: Key, artifact: TaskArtifact) -> None:
        """Write both towers' factors; undo the first if the second finds no slot."""
        done = []
        try:
            for tower in TOWERS:
                folded = getattr(artifact.folded, tower)  # [J, N, R'], [J, R', D]
                self._pools[tower].add(
                    key, folded.key_u, folded.key_m, folded.value_u, folded.value_m
                )
                done.append(tower)
        except PoolFullError as err:
            for tower in done:
                self._pools[tower].free(key)
            raise EngineError(str(err), "task") from err

    @staticmethod
    def _ranks(artifact: TaskArtifact) -> tuple[int, int]:
        return artifact.folded.image.rank, artifact.folded.text.rank


# ---------------------------------------------------------------------------------- onnx


class OnnxEngine:
    """The export's onnxruntime graphs; each task's prefix materialised once, per tower.

    The export fixes J and N (its manifest's "layers" and "tokens"); tasks of another shape
    are refused. Tasks have no slot limit: each holds 2 x 2 x [J, N, D] float32 on the host.
    """

    name = "onnx"

    def __init__(
        self,
        directory: str | Path,
        *,
        backbone_fingerprint: str,
        embed_dim: int,
        image_size: int,
        context_length: int,
        precision: str = "auto",
        threads: int | None = None,
        providers: list[str] | None = None,
    ):
        from export.onnx_runtime import OnnxTowers, pick_precision  # onnxruntime loads here only

        chosen, self.dtype_reason = pick_precision(directory, precision)
        self.threads = threads or default_threads()
        self.towers = OnnxTowers(
            directory,
            fingerprint=backbone_fingerprint,
            precision=chosen,
            providers=providers,
            threads=self.threads,
        )
        self.dtype = chosen
        log.info("onnx engine precision: %s", self.dtype_reason)
        manifest = self.towers.manifest
        given = {"embed_dim": embed_dim, "image_size": image_size, "context_length": context_length}
        wrong = {k: (v, manifest[k]) for k, v in given.items() if manifest[k] != v}
        if wrong:
            raise ValueError(f"{directory}: the export does not fit the backbone: {wrong}")
        self.backbone_id = backbone_fingerprint
        self.embed_dim, self.image_size, self.context_length = embed_dim, image_size, context_length
        self.layers, self.tokens = self.towers.layers, self.towers.tokens
        self.widths = dict(manifest["widths"])
        self._lock = threading.Lock()
        self._prefixes: dict[Key, dict[str, tuple[Tensor, Tensor]]] = {}  # tower -> K_p, V_p

    def check(self, artifact: TaskArtifact) -> None:
        """J and N of the export (the backbone match is `read_artifact`'s check)."""
        check_shape(artifact, self.layers, self.tokens, "the ONNX export")

    def add(self, key: Key, artifact: TaskArtifact) -> None:
        self.check(artifact)
        prefixes = {}
        for tower in TOWERS:
            keys, values = getattr(artifact.folded, tower).materialise()  # [J, N, D] each
            prefixes[tower] = (keys.float().contiguous(), values.float().contiguous())
        with self._lock:
            if key in self._prefixes:
                raise already_loaded(key)
            self._prefixes[key] = prefixes
        probe_added(self, key)
        log.info("loaded task %s", key)

    def remove(self, key: Key) -> None:
        with self._lock:
            if self._prefixes.pop(key, None) is None:
                raise NotInPoolError(f"task {key!r} is not loaded")
        log.info("unloaded task %s", key)

    def encode(self, modality: Modality, inputs: Tensor, keys: Sequence[Key | None]) -> Tensor:
        check_rows(modality, inputs, keys)
        data = inputs.detach().cpu()
        if modality == "text":
            data = data[:, : int(data.argmax(dim=-1).max()) + 1]  # cut after the last EOT
        run = self.towers.encode_image if modality == "image" else self.towers.encode_text
        rows = self._rows(modality, keys)
        if all(row is None for row in rows):
            out = run(data)
        else:
            out = run(data, *self._gather(modality, rows))
        return torch.as_tensor(out).to("cpu", torch.float32)  # [B, E]

    def loaded(self) -> list[Key]:
        with self._lock:
            return list(self._prefixes)

    def _rows(self, modality: Modality, keys: Sequence[Key | None]) -> list:
        """Each row's (K_p, V_p) [J, N, D], or None; taken under the lock, then immutable."""
        with self._lock:
            missing = sorted({k for k in keys if k is not None and k not in self._prefixes})
            if missing:
                raise NotInPoolError(f"tasks {missing} are not loaded")
            return [None if k is None else self._prefixes[k][modality] for k in keys]

    def _gather(self, modality: Modality, rows: list) -> tuple[Tensor, Tensor, Tensor]:
        """Prefix keys, values [J, B, N, D] (zeros for rows without a task) and active [B]."""
        zeros = torch.zeros(self.layers, self.tokens, self.widths[modality])  # [J, N, D]
        keys = torch.stack([zeros if row is None else row[0] for row in rows], dim=1)
        values = torch.stack([zeros if row is None else row[1] for row in rows], dim=1)
        active = torch.tensor([row is not None for row in rows])  # [B] bool
        return keys, values, active


# ---------------------------------------------------------------------------------- factory


def build_engine(
    kind: str,
    backbone: lpi.Backbone,
    *,
    device: torch.device | str = "cpu",
    slots: int = 64,
    max_rank: int = 16,
    onnx_dir: str | Path | None = None,
    threads: int | None = None,
    precision: str = "auto",
    backbone_fingerprint: str | None = None,
    dtype: str = "auto",
    cuda_graphs: int = 0,
) -> Engine:
    """The engine of `kind` ("torch" or "onnx") serving `backbone`.

    slots, max_rank, dtype (auto: bfloat16 where the device has it natively, else float32)
    and cuda_graphs (largest graphed batch, 0 = off) configure torch; onnx_dir and precision
    ("auto": int8 where the export holds it, else float32; or "float32", "float16", "int8")
    configure onnxruntime, on the CPU when `device` is. threads: intra-op threads of either
    (None: the usable cores less one, `server.threads`).
    """
    if kind not in KINDS:
        raise ValueError(f"engine kind must be one of {KINDS}, got {kind!r}")
    backbone_fingerprint = backbone_fingerprint or lpi.fingerprint(backbone)
    threads = threads or default_threads()
    if kind == "torch":
        return TorchEngine(
            backbone,
            device=device,
            slots=slots,
            max_rank=max_rank,
            backbone_fingerprint=backbone_fingerprint,
            dtype=dtype,
            cuda_graphs=cuda_graphs,
            threads=threads,
        )
    if onnx_dir is None:
        raise ValueError("the onnx engine needs onnx_dir, the folder python -m export onnx wrote")
    config = backbone.config
    return OnnxEngine(
        onnx_dir,
        backbone_fingerprint=backbone_fingerprint,
        embed_dim=config.embed_dim,
        image_size=config.vision.image_size,
        context_length=config.text.context_length,
        precision=precision,
        threads=threads,
        providers=["CPUExecutionProvider"] if torch.device(device).type == "cpu" else None,
    )
