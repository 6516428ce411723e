"""The runtime of an ONNX export: its folder format, and the onnxruntime sessions that serve it.

`python -m export onnx` (export.onnx_export) writes a folder of graphs and `onnx.json`; this
module owns what that folder holds (file names, graph inputs and output, the manifest and its
checks on read) and runs it: `OnnxTowers` is the server's onnxruntime engine
(server.engine.OnnxEngine). The exporter writes to this format and checks its graphs through
`new_session`, so both sides share one definition.

    image.onnx  pixels [B, 3, S, S] f32, prefix_keys, prefix_values [J, B, N, D_v] f32,
                prefix_active [B] bool                   ->  features [B, E] f32, unit norm
    text.onnx   token_ids [B, T] i64, prefix_keys, prefix_values [J, B, N, D_t],
                prefix_active [B]                        ->  features [B, E]

onnxruntime is imported only inside the functions that need it.

Dimensions: B rows, T tokens, J prompted layers, N prompt tokens, D tower width, E embedding.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import Tensor

import lpi
from export.onnx_manifest import contained, manifest_problem
from lpi import Backbone

log = logging.getLogger(__name__)

Array = TypeVar("Array", Tensor, np.ndarray)  # encode_* return their input's kind

FORMAT = "lpi-onnx"
FORMAT_VERSION = 1
MANIFEST = "onnx.json"
TOWERS = ("image", "text")
PRECISIONS = ("float32", "float16", "int8")
INPUTS = {
    "image": ("pixels", "prefix_keys", "prefix_values", "prefix_active"),
    "text": ("token_ids", "prefix_keys", "prefix_values", "prefix_active"),
}
OUTPUT = "features"


class OnnxManifestError(ValueError):
    """An ONNX export folder that cannot be served: the message says which check failed."""


def file_name(tower: str, precision: str) -> str:
    return {"float32": f"{tower}.onnx", "float16": f"{tower}.fp16.onnx"}.get(
        precision, f"{tower}.{precision}.onnx"
    )


def pick_precision(directory: str | Path, precision: str = "auto") -> tuple[str, str]:
    """The graphs to serve and why: `auto` takes int8 where the export holds it for both
    towers (it passed its cosine check at export), else float32; a named one is taken as is."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be auto or one of {PRECISIONS}, got {precision!r}")
        return precision, f"{precision} as asked"
    files = read_manifest(directory)["files"]
    if all("int8" in files[tower] for tower in TOWERS):
        return "int8", "auto: the export holds int8 graphs that passed their check"
    return "float32", "auto: the export holds no int8 graphs"


# ---------------------------------------------------------------------------------- files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | Path, fingerprint: str | None = None) -> dict:
    """onnx.json of an export folder, refused if unreadable, of another format or backbone."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise OnnxManifestError(f"{path}: cannot read the ONNX manifest: {err}") from err
    if not isinstance(manifest, dict):
        raise OnnxManifestError(f"{path}: the ONNX manifest is not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise OnnxManifestError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this code reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    problem = manifest_problem(manifest)  # every value read below and by OnnxTowers
    if problem:
        raise OnnxManifestError(f"{path}: {problem}")
    made_for = manifest["backbone"]["fingerprint"]
    if fingerprint is not None and made_for != fingerprint:
        raise OnnxManifestError(
            f"{path}: these graphs were exported from backbone {made_for[:16]}..., not from the "
            f"given backbone {fingerprint[:16]}...; their vectors would not be comparable "
            "(re-export with python -m export onnx --backbone <the served backbone>)"
        )
    return manifest


# ---------------------------------------------------------------------------------- sessions


def default_providers() -> list[str]:
    """CUDA when this onnxruntime has it (onnxruntime-gpu), else the CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def new_session(path: str | Path, providers: list[str], threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: fp16 graphs on the CPU note every cast
    # Idle worker threads sleep instead of spinning: spinning holds every core between calls,
    # starving whatever else runs in the process (the server's batcher, torch).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers)


class OnnxTowers:
    """onnxruntime sessions of an export's two graphs: the server's onnxruntime engine.

    `backbone` (or its `fingerprint`) names the backbone whose vectors the caller serves; an
    export made from another is refused. Each file's sha256 is checked before it is loaded.
    `encode_*` take numpy arrays or torch tensors and return the same kind ([B, E] float32,
    unit norm; torch on the input's device). With no prefix a batch runs as the bare backbone.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        backbone: Backbone | None = None,
        fingerprint: str | None = None,
        precision: str = "float32",
        providers: list[str] | None = None,
        threads: int | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if backbone is not None:
            given = lpi.fingerprint(backbone)
            if fingerprint is not None and fingerprint != given:
                raise ValueError("backbone and fingerprint disagree; give one of them")
            fingerprint = given
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, fingerprint)
        self.precision = precision
        self.layers, self.tokens = self.manifest["layers"], self.manifest["tokens"]
        self.sessions = {
            tower: new_session(
                self._verified_file(tower), providers or default_providers(), threads
            )
            for tower in TOWERS
        }
        log.info(
            "ONNX towers %s (%s, J=%d, N=%d) on %s",
            self.directory,
            precision,
            self.layers,
            self.tokens,
            self.providers,
        )

    @property
    def providers(self) -> list[str]:
        providers: list[str] = self.sessions["image"].get_providers()
        return providers

    def encode_image(
        self,
        pixels: Array,
        prefix_keys: Tensor | np.ndarray | None = None,
        prefix_values: Tensor | np.ndarray | None = None,
        active: Tensor | np.ndarray | None = None,
    ) -> Array:
        """Pixels [B, 3, S, S] (lpi.preprocess) -> unit features [B, E].

        prefix_keys, prefix_values [J, B, N, D_v]; active [B] bool (None: every row when a
        prefix is given, no row when not).
        """
        return cast(Array, self._run("image", pixels, prefix_keys, prefix_values, active))

    def encode_text(
        self,
        token_ids: Array,
        prefix_keys: Tensor | np.ndarray | None = None,
        prefix_values: Tensor | np.ndarray | None = None,
        active: Tensor | np.ndarray | None = None,
    ) -> Array:
        """Token ids [B, T <= context] (lpi.tokenize, may be cut after the last EOT) -> [B, E]."""
        return cast(Array, self._run("text", token_ids, prefix_keys, prefix_values, active))

    def _verified_file(self, tower: str) -> Path:
        entry = self.manifest["files"][tower].get(self.precision)
        if entry is None:
            why = self.manifest["checks"][tower].get(self.precision, {}).get("reason", "unknown")
            raise OnnxManifestError(
                f"{self.directory}: no {self.precision} {tower} graph in this export ({why})"
            )
        path = contained(self.directory, entry["file"])  # a plain name, checked on read
        if path is None:
            raise OnnxManifestError(
                f"{self.directory}: {MANIFEST} names {entry['file']!r}, which leads outside "
                "the export folder"
            )
        if not path.is_file():
            raise OnnxManifestError(f"{path}: listed in {MANIFEST} but missing")
        if sha256_file(path) != entry["sha256"]:
            raise OnnxManifestError(f"{path}: sha256 differs from {MANIFEST}: corrupt or replaced")
        return path

    def _run(
        self,
        tower: str,
        data: Tensor | np.ndarray,
        keys: Tensor | np.ndarray | None,
        values: Tensor | np.ndarray | None,
        active: Tensor | np.ndarray | None,
    ) -> Tensor | np.ndarray:
        as_torch = isinstance(data, Tensor)
        device = data.device if as_torch else None
        array = self._checked_data(tower, data)
        feeds = {
            INPUTS[tower][0]: array,
            **self._prefix(tower, array.shape[0], keys, values, active),
        }
        out: np.ndarray = self.sessions[tower].run([OUTPUT], feeds)[0]  # [B, E]
        return torch.from_numpy(out).to(device) if as_torch else out

    def _checked_data(self, tower: str, data: Tensor | np.ndarray) -> np.ndarray:
        m = self.manifest
        if tower == "image":
            array = _numpy(data, np.float32)
            expected = (3, m["image_size"], m["image_size"])
            if array.ndim != 4 or array.shape[1:] != expected or array.shape[0] == 0:
                raise ValueError(
                    f"pixels must be [B>=1, {', '.join(map(str, expected))}], got {array.shape}"
                )
            return array
        array = _numpy(data, np.int64)
        if array.ndim != 2 or array.shape[0] == 0 or not 1 <= array.shape[1] <= m["context_length"]:
            raise ValueError(
                f"token_ids must be [B>=1, 1<=T<={m['context_length']}], got {array.shape}"
            )
        if array.min() < 0 or array.max() >= m["vocab_size"]:
            raise ValueError(f"token ids must lie in [0, {m['vocab_size']})")
        return array

    def _prefix(
        self,
        tower: str,
        batch: int,
        keys: Tensor | np.ndarray | None,
        values: Tensor | np.ndarray | None,
        active: Tensor | np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        shape = (self.layers, batch, self.tokens, self.manifest["widths"][tower])  # [J, B, N, D]
        if keys is None and values is None:
            if active is not None and _numpy(active, np.bool_).any():
                raise ValueError("rows marked active need prefix_keys and prefix_values")
            zeros = np.zeros(shape, np.float32)  # hidden by the mask: the bare backbone
            return {
                "prefix_keys": zeros,
                "prefix_values": zeros,
                "prefix_active": np.zeros(batch, np.bool_),
            }
        if keys is None or values is None:
            raise ValueError("prefix_keys and prefix_values must be given together")
        key_array, value_array = _numpy(keys, np.float32), _numpy(values, np.float32)
        for name, array in (("prefix_keys", key_array), ("prefix_values", value_array)):
            if array.shape != shape:
                raise ValueError(
                    f"{tower} {name} must be [J, B, N, D] = {shape}, got {array.shape}"
                )
        flags = np.ones(batch, np.bool_) if active is None else _numpy(active, np.bool_)
        if flags.shape != (batch,):
            raise ValueError(f"active must be [B={batch}] bool, got {flags.shape}")
        return {"prefix_keys": key_array, "prefix_values": value_array, "prefix_active": flags}


def _numpy(data: Tensor | np.ndarray, dtype: type[np.generic]) -> np.ndarray:
    if isinstance(data, Tensor):
        tensor = data.detach().cpu()
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        data = tensor.numpy()
    return np.ascontiguousarray(data, dtype=dtype)
