"""The image and text towers as ONNX graphs that take every prompted layer's prefix as input.

Spec LPI.md sections 1 and 3: a task's whole effect on a tower is, at each prompted layer
j < J, N prefix key/value rows that every real token attends to. Each graph takes them as
inputs with a per-row flag that hides a row's prefix (the attention mask of
`kernels.visibility_mask`), so one graph serves every task, tasks mixed in one batch, and no
task (flag False: the frozen backbone):

    image.onnx  pixels [B, 3, S, S] f32, prefix_keys, prefix_values [J, B, N, D_v] f32,
                prefix_active [B] bool                   ->  features [B, E] f32, unit norm
    text.onnx   token_ids [B, T] i64 (T <= context, 0 after each row's end-of-text token),
                prefix_keys, prefix_values [J, B, N, D_t], prefix_active [B]  ->  features [B, E]

B and T are dynamic; J and N are fixed per export (the deployment's prompt shape; section 6
folds a task to exactly these keys and values). `*.fp16.onnx` compute in float16 behind the
same float32 inputs and outputs, and are kept only where they hold cosine >= 0.999 per row
against torch in float32 (STYLE.md habit 7).

The graphs are traced from the backbone's own modules (`backbone.visual` and
`backbone.text_tower` fed an `lpi.Prefix`), so they compute what torch computes. Every export
checks that with onnxruntime on fresh random inputs, active and inactive rows mixed, and writes
`onnx.json`: backbone fingerprint, shapes, opset, each file's sha256, the check results.

Exporter: torch.onnx's dynamo exporter (torch.export + onnxscript). The TorchScript exporter
(`dynamo=False`) is deprecated since torch 2.9 and its float16 graph did not load
(LayerNormalization bound to float and float16 at once); dynamo's graphs also have a quarter of
the nodes. onnx and onnxruntime are imported only inside the functions that need them.

Dimensions: B rows, T tokens, J prompted layers, N prompt tokens, D tower width, E embedding.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lpi
from lpi import Backbone, Prefix, atomic
from lpi.atomic import atomic_path

log = logging.getLogger(__name__)

FORMAT = "lpi-onnx"
FORMAT_VERSION = 1
MANIFEST = "onnx.json"
TOWERS = ("image", "text")
PRECISIONS = ("float32", "float16")
INPUTS = {
    "image": ("pixels", "prefix_keys", "prefix_values", "prefix_active"),
    "text": ("token_ids", "prefix_keys", "prefix_values", "prefix_active"),
}
OUTPUT = "features"
MIN_OPSET = 18  # the dynamo exporter's lowest; onnxruntime >= 1.14 runs it
DEFAULT_OPSET = 18
# Per-row cosine against torch fp32 an export must hold: the fp32 graph runs the same arithmetic
# (differences ~1e-7), so it is held to 0.9999; fp16 to the cross-backend 0.999 of STYLE.md.
MIN_COSINE = {"float32": 0.9999, "float16": 0.999}
TRACE_BATCH, TRACE_LENGTH = 3, 11  # the traced example; the checks use other sizes
CHECK_SEED = 1


class OnnxExportError(RuntimeError):
    """An exported float32 graph that does not compute what torch computes."""


class _CheckFailed(Exception):
    def __init__(self, check: dict) -> None:
        self.check = check


class OnnxManifestError(ValueError):
    """An ONNX export folder that cannot be served: the message says which check failed."""


class ImageGraph(nn.Module):
    """normalize(visual(pixels, Prefix(keys, values, active))): what `encode_image` computes."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.visual = backbone.visual

    def forward(self, pixels, prefix_keys, prefix_values, prefix_active) -> Tensor:
        prefix = Prefix(prefix_keys, prefix_values, prefix_active)
        return F.normalize(self.visual(pixels, prefix).float(), dim=-1)  # [B, E]


class TextGraph(nn.Module):
    """text_tower(token_ids, Prefix(...)): `encode_text` without its checks and trimming."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone  # only the text tower's weights end up in the graph

    def forward(self, token_ids, prefix_keys, prefix_values, prefix_active) -> Tensor:
        prefix = Prefix(prefix_keys, prefix_values, prefix_active)
        return self.backbone.text_tower(token_ids, prefix).float()  # [B, E]


def file_name(tower: str, precision: str) -> str:
    return f"{tower}.onnx" if precision == "float32" else f"{tower}.fp16.onnx"


# ---------------------------------------------------------------------------------- export


def export_towers(
    backbone: Backbone,
    out_dir: str | Path,
    layers: int,
    tokens: int,
    opset: int = DEFAULT_OPSET,
    fp16: bool = True,
) -> dict:
    """Write image.onnx, text.onnx (and *.fp16.onnx where they hold), then onnx.json.

    Each graph is checked against torch before it replaces a file of the same name; a float32
    graph that fails raises OnnxExportError, a float16 one is skipped with a logged reason.
    Returns the manifest.
    """
    backbone = _cpu_float32(backbone)
    _check_export_shape(backbone, layers, tokens, opset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict = {tower: {} for tower in TOWERS}
    checks: dict = {tower: {} for tower in TOWERS}
    for tower in TOWERS:
        entry, check = export_tower(backbone, tower, out_dir, layers, tokens, opset, "float32")
        checks[tower]["float32"] = check
        if entry is None:
            raise OnnxExportError(f"{file_name(tower, 'float32')} differs from torch: {check}")
        files[tower]["float32"] = entry
        log.info("%s: %s", file_name(tower, "float32"), _describe(check))
    for tower in TOWERS:
        (out_dir / file_name(tower, "float16")).unlink(missing_ok=True)  # never leave a stale one
        if not fp16:
            checks[tower]["float16"] = {"kept": False, "reason": "not asked for (fp16=False)"}
            continue
        entry, checks[tower]["float16"] = _try_fp16(backbone, tower, out_dir, layers, tokens, opset)
        if entry is not None:
            files[tower]["float16"] = entry
    manifest = _manifest(backbone, layers, tokens, opset, files, checks)
    atomic.write_json(out_dir / MANIFEST, manifest)
    log.info("wrote %s", out_dir / MANIFEST)
    return manifest


def _manifest(backbone: Backbone, layers: int, tokens: int, opset: int, files, checks) -> dict:
    config = backbone.config
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "backbone": {"fingerprint": lpi.fingerprint(backbone), "config": config.to_dict()},
        "layers": layers,
        "tokens": tokens,
        "widths": {"image": config.vision.width, "text": config.text.width},
        "embed_dim": config.embed_dim,
        "image_size": config.vision.image_size,
        "context_length": config.text.context_length,
        "vocab_size": config.text.vocab_size,
        "opset": opset,
        "exporter": f"torch.onnx dynamo, torch {torch.__version__}",
        "inputs": {tower: list(INPUTS[tower]) for tower in TOWERS},
        "output": OUTPUT,
        "files": files,
        "checks": checks,
    }


def export_tower(
    backbone: Backbone,
    tower: str,
    out_dir: Path,
    layers: int,
    tokens: int,
    opset: int,
    precision: str,
) -> tuple[dict | None, dict]:
    """Trace one graph to a temp file, check it, and install it only if it holds.

    Returns (file entry, check); the entry is None when the check failed (nothing installed).
    """
    model = backbone if precision == "float32" else copy.deepcopy(backbone).half()
    module = (ImageGraph if tower == "image" else TextGraph)(model).eval()
    generator = torch.Generator().manual_seed(0)
    example = random_inputs(backbone, tower, TRACE_BATCH, TRACE_LENGTH, layers, tokens, generator)
    path = out_dir / file_name(tower, precision)
    try:
        with atomic_path(path) as temp:  # a graph that fails its check is never installed
            trace(module, tower, example, temp, opset, backbone.config.text.context_length)
            check = check_graph(temp, backbone, tower, layers, tokens, MIN_COSINE[precision])
            if not check["passed"]:
                raise _CheckFailed(check)
            entry = {"file": path.name, "sha256": sha256_file(temp), "bytes": temp.stat().st_size}
    except _CheckFailed as failed:
        return None, failed.check
    return entry, check


def _try_fp16(backbone, tower, out_dir, layers, tokens, opset) -> tuple[dict | None, dict]:
    """The float16 graph is optional: any failure skips it with a logged reason."""
    name = file_name(tower, "float16")
    try:
        entry, check = export_tower(backbone, tower, out_dir, layers, tokens, opset, "float16")
    except Exception as err:  # whatever went wrong costs only this optional graph
        reason = f"export or run failed: {type(err).__name__}: {err}"
        log.warning("%s skipped: %s", name, reason)
        return None, {"kept": False, "reason": reason}
    if entry is None:
        check["reason"] = (
            f"per-row cosine {check['min_cosine']:.6f} (inactive rows vs the bare backbone "
            f"{check['bare_min_cosine']:.6f}) is below {MIN_COSINE['float16']}"
        )
        log.warning("%s skipped: %s", name, check["reason"])
    else:
        log.info("%s: %s", name, _describe(check))
    return entry, {"kept": entry is not None, **check}


def trace(module: nn.Module, tower: str, example: dict, path: Path, opset: int, context: int):
    """torch.onnx's dynamo exporter with dynamic B (and T for text), written to `path`."""
    batch = torch.export.Dim("batch", min=1)
    first = {0: batch}  # pixels [B, 3, S, S]; token_ids [B, T]
    if tower == "text":
        first[1] = torch.export.Dim("length", min=1, max=context)
    # In INPUTS order: the exporter names the graph's axes by position, not by key.
    dims = dict(zip(INPUTS[tower], (first, {1: batch}, {1: batch}, {0: batch}), strict=True))
    with warnings.catch_warnings(), _quiet("onnx_ir", "onnxscript"):
        # The same batch dimension on four inputs makes the exporter note that it merged them.
        warnings.filterwarnings("ignore", message=r".*axis name.*", category=UserWarning)
        program = torch.onnx.export(
            module,
            tuple(example[name] for name in INPUTS[tower]),
            dynamo=True,
            opset_version=opset,
            input_names=list(INPUTS[tower]),
            output_names=[OUTPUT],
            dynamic_shapes=dims,
            verbose=False,
        )
        program.save(str(path), external_data=False)


@contextlib.contextmanager
def _quiet(*names: str):
    """The exporter's graph passes log every rewrite at INFO; keep their warnings only."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# ---------------------------------------------------------------------------------- checks


def check_graph(path, backbone, tower: str, layers: int, tokens: int, min_cosine: float) -> dict:
    """onnxruntime vs torch fp32 per row, on fresh inputs at batch 1 (T = context) and 5 (T 13).

    Also checks that rows whose prefix_active is False equal the bare backbone (prefix=None).
    """
    session = new_session(path, ["CPUExecutionProvider"], torch.get_num_threads())
    generator = torch.Generator().manual_seed(CHECK_SEED)
    cosines, bare, diffs, rows = [], [], [], 0
    for batch, length in ((1, backbone.config.text.context_length), (5, 13)):
        inputs = random_inputs(backbone, tower, batch, length, layers, tokens, generator)
        got = torch.from_numpy(session.run([OUTPUT], {k: v.numpy() for k, v in inputs.items()})[0])
        want, plain = torch_features(backbone, tower, inputs)
        inactive = ~inputs["prefix_active"]
        cosines.append(F.cosine_similarity(got, want, dim=-1))
        bare.append(F.cosine_similarity(got[inactive], plain[inactive], dim=-1))
        diffs.append(float((got - want).abs().max()))
        rows += batch
    cosine, bare_cosine = float(torch.cat(cosines).min()), float(torch.cat(bare).min())
    return {
        "rows": rows,
        "inactive_rows": sum(len(b) for b in bare),
        "min_cosine": cosine,
        "bare_min_cosine": bare_cosine,
        "max_abs_diff": max(diffs),
        "min_cosine_required": min_cosine,
        "passed": cosine >= min_cosine and bare_cosine >= min_cosine,
        "provider": "CPUExecutionProvider",
    }


@torch.no_grad()
def random_inputs(backbone, tower, batch, length, layers, tokens, generator) -> dict[str, Tensor]:
    """Fresh random graph inputs in INPUTS order, never zeros.

    Prefixes are random prompt tokens through each block's own LN1 and K/V maps (the scale of
    real ones); row 0 is active, row 1 inactive, the rest random. Inactive rows keep random
    prefixes, which the mask must hide. Token ids: SOT, random ids, EOT at a random place, 0s.
    """
    blocks = backbone.blocks("v" if tower == "image" else "t")
    width = backbone.config.vision.width if tower == "image" else backbone.config.text.width
    prompts = torch.randn(layers, batch, tokens, width, generator=generator)  # [J, B, N, D]
    pairs = [blocks[j].prefix_keys_values(prompts[j]) for j in range(layers)]
    active = torch.rand(batch, generator=generator) < 0.5
    active[: min(batch, 2)] = torch.tensor([True, False])[:batch]
    if tower == "image":
        size = backbone.config.vision.image_size
        data = torch.randn(batch, 3, size, size, generator=generator)
    else:
        data = random_token_ids(backbone.config.text.vocab_size, batch, length, generator)
    return {
        INPUTS[tower][0]: data,
        "prefix_keys": torch.stack([k for k, _ in pairs]),  # [J, B, N, D]
        "prefix_values": torch.stack([v for _, v in pairs]),
        "prefix_active": active,  # [B] bool
    }


def random_token_ids(vocab: int, batch: int, length: int, generator) -> Tensor:
    """[B, T] ids as lpi.tokenize lays them out; row 0 ends at the last position."""
    sot, eot = vocab - 2, vocab - 1
    ids = torch.randint(1, sot, (batch, length), generator=generator)
    ids[:, 0] = sot
    ends = torch.randint(min(1, length - 1), length, (batch,), generator=generator)
    ends[0] = length - 1
    ids = ids.masked_fill(torch.arange(length) > ends[:, None], 0)
    ids[torch.arange(batch), ends] = eot
    return ids


@torch.no_grad()
def torch_features(backbone: Backbone, tower: str, inputs: dict) -> tuple[Tensor, Tensor]:
    """The backbone's public API on the same inputs: prompted features, and bare (no prefix)."""
    data = inputs[INPUTS[tower][0]]
    prefix = Prefix(inputs["prefix_keys"], inputs["prefix_values"], inputs["prefix_active"])
    encode = backbone.encode_image if tower == "image" else backbone.encode_text
    return encode(data, prefix), encode(data, None)


def _describe(check: dict) -> str:
    return (
        f"{check['rows']} rows ({check['inactive_rows']} inactive): min cosine "
        f"{check['min_cosine']:.7f}, inactive vs bare {check['bare_min_cosine']:.7f}, "
        f"max |diff| {check['max_abs_diff']:.2e}"
    )


def _cpu_float32(backbone: Backbone) -> Backbone:
    parameter = next(backbone.parameters())
    if parameter.dtype != torch.float32:
        raise ValueError(
            f"export a float32 backbone (it makes the fp16 graph), got {parameter.dtype}"
        )
    if parameter.device.type != "cpu":
        backbone = copy.deepcopy(backbone).cpu()
    return backbone


def _check_export_shape(backbone: Backbone, layers: int, tokens: int, opset: int) -> None:
    depth = min(backbone.config.vision.layers, backbone.config.text.layers)
    if not 1 <= layers <= depth:
        raise ValueError(f"layers J={layers} must lie in [1, {depth}] (the backbone's depth)")
    if tokens < 1:
        raise ValueError(f"tokens N={tokens} must be >= 1")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is below {MIN_OPSET}, the dynamo exporter's lowest")


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
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise OnnxManifestError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this code reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    made_for = manifest["backbone"]["fingerprint"]
    if fingerprint is not None and made_for != fingerprint:
        raise OnnxManifestError(
            f"{path}: these graphs were exported from backbone {made_for[:16]}..., not from the "
            f"given backbone {fingerprint[:16]}...; their vectors would not be comparable "
            "(re-export with python -m export onnx --backbone <the served backbone>)"
        )
    return manifest


# ---------------------------------------------------------------------------------- runner


def default_providers() -> list[str]:
    """CUDA when this onnxruntime has it (onnxruntime-gpu), else the CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def new_session(path, providers: list[str], threads: int | None = None):
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
            self.sessions["image"].get_providers(),
        )

    @property
    def providers(self) -> list[str]:
        return self.sessions["image"].get_providers()

    def encode_image(self, pixels, prefix_keys=None, prefix_values=None, active=None):
        """Pixels [B, 3, S, S] (lpi.preprocess) -> unit features [B, E].

        prefix_keys, prefix_values [J, B, N, D_v]; active [B] bool (None: every row when a
        prefix is given, no row when not).
        """
        return self._run("image", pixels, prefix_keys, prefix_values, active)

    def encode_text(self, token_ids, prefix_keys=None, prefix_values=None, active=None):
        """Token ids [B, T <= context] (lpi.tokenize, may be cut after the last EOT) -> [B, E]."""
        return self._run("text", token_ids, prefix_keys, prefix_values, active)

    def _verified_file(self, tower: str) -> Path:
        entry = self.manifest["files"][tower].get(self.precision)
        if entry is None:
            why = self.manifest["checks"][tower].get(self.precision, {}).get("reason", "unknown")
            raise OnnxManifestError(
                f"{self.directory}: no {self.precision} {tower} graph in this export ({why})"
            )
        path = self.directory / entry["file"]
        if not path.is_file():
            raise OnnxManifestError(f"{path}: listed in {MANIFEST} but missing")
        if sha256_file(path) != entry["sha256"]:
            raise OnnxManifestError(f"{path}: sha256 differs from {MANIFEST}: corrupt or replaced")
        return path

    def _run(self, tower: str, data, keys, values, active):
        as_torch = isinstance(data, Tensor)
        device = data.device if as_torch else None
        array = self._checked_data(tower, data)
        feeds = {
            INPUTS[tower][0]: array,
            **self._prefix(tower, array.shape[0], keys, values, active),
        }
        out = self.sessions[tower].run([OUTPUT], feeds)[0]  # [B, E]
        return torch.from_numpy(out).to(device) if as_torch else out

    def _checked_data(self, tower: str, data) -> np.ndarray:
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

    def _prefix(self, tower: str, batch: int, keys, values, active) -> dict[str, np.ndarray]:
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
        keys, values = _numpy(keys, np.float32), _numpy(values, np.float32)
        for name, array in (("prefix_keys", keys), ("prefix_values", values)):
            if array.shape != shape:
                raise ValueError(
                    f"{tower} {name} must be [J, B, N, D] = {shape}, got {array.shape}"
                )
        flags = np.ones(batch, np.bool_) if active is None else _numpy(active, np.bool_)
        if flags.shape != (batch,):
            raise ValueError(f"active must be [B={batch}] bool, got {flags.shape}")
        return {"prefix_keys": keys, "prefix_values": values, "prefix_active": flags}


def _numpy(data, dtype) -> np.ndarray:
    if isinstance(data, Tensor):
        data = data.detach().cpu()
        if data.dtype in (torch.float16, torch.bfloat16):
            data = data.float()
        data = data.numpy()
    return np.ascontiguousarray(data, dtype=dtype)


# ---------------------------------------------------------------------------------- CLI


def add_onnx_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `python -m export onnx`."""
    parser.add_argument(
        "--backbone",
        required=True,
        metavar="PATH",
        help="checkpoint path or preset name (tiny, ViT-B-16, ...)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help=f"folder for image.onnx, text.onnx, *.fp16.onnx and {MANIFEST}",
    )
    parser.add_argument(
        "--layers",
        type=_positive_int,
        default=9,
        metavar="J",
        help="prompted layers per tower (default 9, capped at the backbone's depth)",
    )
    parser.add_argument(
        "--tokens", type=_positive_int, default=16, metavar="N", help="prompt tokens (default 16)"
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset (default {DEFAULT_OPSET}, at least {MIN_OPSET})",
    )
    parser.add_argument(
        "--no-fp16",
        action="store_true",
        help="skip the float16 graphs (by default kept where they hold cosine >= "
        f"{MIN_COSINE['float16']} per row against torch float32)",
    )
    return parser


def run_onnx(args: argparse.Namespace) -> int:
    """Export and check both towers; 0 done, 1 a float32 graph failed its check, 2 bad input."""
    try:
        backbone = lpi.load_backbone(args.backbone)
    except lpi.CheckpointError as err:
        log.error("%s", err)
        return 2
    depth = min(backbone.config.vision.layers, backbone.config.text.layers)
    layers = min(args.layers, depth)
    if layers < args.layers:
        log.info("--layers %d capped at the backbone's depth, %d", args.layers, depth)
    try:
        manifest = export_towers(
            backbone, args.out, layers, args.tokens, args.opset, fp16=not args.no_fp16
        )
    except OnnxExportError as err:
        log.error("%s", err)
        return 1
    except (ValueError, OSError) as err:
        log.error("%s", err)
        return 2
    kept = [entry["file"] for tower in TOWERS for entry in manifest["files"][tower].values()]
    log.info("exported %s to %s (J=%d, N=%d)", ", ".join(kept), args.out, layers, args.tokens)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
