"""The image and text towers as ONNX graphs that take every prompted layer's prefix as input.

docs/METHOD.md §1 and §3: a task's whole effect on a tower is, at each prompted layer
j < J, N prefix key/value rows that every real token attends to. Each graph takes them as
inputs with a per-row flag that hides a row's prefix (the attention mask of
`kernels.visibility_mask`), so one graph serves every task, tasks mixed in one batch, and no
task (flag False: the frozen backbone):

    image.onnx  pixels [B, 3, S, S] f32, prefix_keys, prefix_values [J, B, N, D_v] f32,
                prefix_active [B] bool                   ->  features [B, E] f32, unit norm
    text.onnx   token_ids [B, T] i64 (T <= context, 0 after each row's end-of-text token),
                prefix_keys, prefix_values [J, B, N, D_t], prefix_active [B]  ->  features [B, E]

B and T are dynamic; J and N are fixed per export (the deployment's prompt shape; METHOD.md §6
folds a task to exactly these keys and values). `*.fp16.onnx` compute in float16 behind the
same float32 inputs and outputs, and are kept only where they hold cosine >= 0.999 per row
against torch in float32 (the cross-backend bound, per row).

The graphs are traced from the backbone's own modules (`backbone.visual` and
`backbone.text_tower` fed an `lpi.Prefix`), so they compute what torch computes. Every export
checks that with onnxruntime on fresh random inputs, active and inactive rows mixed, and writes
`onnx.json`: backbone fingerprint, shapes, opset, each file's sha256, the check results. The
folder's format (names, inputs, manifest) and its runtime live in export.onnx_runtime; the
`python -m export onnx` options in export.onnx_cli. What an export makes is one
`OnnxExportOptions`: a new kind of graph is a field there and a step in `export_graphs`.

Exporters (`OnnxExportOptions.exporter`): the float32 graph, and the int8 graph quantised from
it, come from torch.onnx's TorchScript exporter by default: onnxruntime fuses its LayerNorm and
QuickGELU patterns and quantises its MatMuls, and measured side by side on ViT-B/32 (one thread,
batch 8) it ran 2.6x torch in float32 and 6.9x in int8, against 2.0x and 5.6x for the dynamo
exporter's graph (benchmarks/onnx_runtime.py; onnxruntime's transformer optimiser added nothing:
the prefix's concatenated keys and mask keep its attention fusion from matching); it also
exports in a sixth of the time. `exporter="dynamo"` (torch.export + onnxscript) remains. The
float16 graph is always dynamo's: the TorchScript one did not load (LayerNormalization bound to
float and float16 at once).

Dimensions: B rows, T tokens, J prompted layers, N prompt tokens, D tower width, E embedding.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lpi
from export.onnx_runtime import (
    FORMAT,
    FORMAT_VERSION,
    INPUTS,
    MANIFEST,
    OUTPUT,
    TOWERS,
    file_name,
    new_session,
    sha256_file,
)
from export.onnx_trace import trace
from lpi import Backbone, Prefix, atomic
from lpi.atomic import atomic_path

log = logging.getLogger(__name__)

MIN_OPSET = 18  # the dynamo exporter's lowest; onnxruntime >= 1.14 runs it
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 18
# Per-row cosine against torch fp32 an export must hold: the fp32 graph runs the same arithmetic
# (differences ~1e-7), so it is held to 0.9999; fp16 to the cross-backend 0.999.
# int8 (dynamic quantisation: weights per channel, activations per call) to 0.99, the bound
# retrieval keeps its ranking at (the demo's recall@10 moves < 1 point, README).
MIN_COSINE = {"float32": 0.9999, "float16": 0.999, "int8": 0.99}
QUANTIZE = ("int8",)
TRACE_BATCH, TRACE_LENGTH = 3, 11  # the traced example; the checks use other sizes
CHECK_SEED = 1


class OnnxExportError(RuntimeError):
    """An exported float32 graph that does not compute what torch computes."""


class _CheckFailed(Exception):
    def __init__(self, check: dict) -> None:
        self.check = check


@dataclass(frozen=True)
class OnnxExportOptions:
    """What one export makes: the prompt shape every graph takes (J layers, N tokens, the
    deployment's; a task folds to exactly these), the opset, and the optional graphs to try."""

    layers: int  # J
    tokens: int  # N
    opset: int = DEFAULT_OPSET
    fp16: bool = True  # also *.fp16.onnx, kept only where they hold MIN_COSINE["float16"]
    quantize: str | None = None  # "int8": also *.int8.onnx, refused below MIN_COSINE["int8"]
    exporter: str = "torchscript"  # of the float32 graph (float16 is always dynamo's)

    def check(self, backbone: Backbone) -> OnnxExportOptions:
        """Refuse a shape the backbone cannot take or an opset the exporter cannot write."""
        depth = min(backbone.config.vision.layers, backbone.config.text.layers)
        if not 1 <= self.layers <= depth:
            raise ValueError(
                f"layers J={self.layers} must lie in [1, {depth}] (the backbone's depth)"
            )
        if self.tokens < 1:
            raise ValueError(f"tokens N={self.tokens} must be >= 1")
        if self.exporter not in EXPORTERS:
            raise ValueError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.opset < MIN_OPSET:
            raise ValueError(
                f"opset {self.opset} is below {MIN_OPSET}, the dynamo exporter's lowest"
            )
        return self


class ImageGraph(nn.Module):
    """normalize(visual(pixels, Prefix(keys, values, active))): what `encode_image` computes."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.visual = backbone.visual

    def forward(
        self, pixels: Tensor, prefix_keys: Tensor, prefix_values: Tensor, prefix_active: Tensor
    ) -> Tensor:
        prefix = Prefix(prefix_keys, prefix_values, prefix_active)
        return F.normalize(self.visual(pixels, prefix).float(), dim=-1)  # [B, E]


class TextGraph(nn.Module):
    """text_tower(token_ids, Prefix(...)): `encode_text` without its checks and trimming."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone  # only the text tower's weights end up in the graph

    def forward(
        self, token_ids: Tensor, prefix_keys: Tensor, prefix_values: Tensor, prefix_active: Tensor
    ) -> Tensor:
        prefix = Prefix(prefix_keys, prefix_values, prefix_active)
        return self.backbone.text_tower(token_ids, prefix).float()  # [B, E]


# ---------------------------------------------------------------------------------- export


def export_towers(
    backbone: Backbone,
    out_dir: str | Path,
    layers: int,
    tokens: int,
    opset: int = DEFAULT_OPSET,
    fp16: bool = True,
    quantize: str | None = None,
    exporter: str = "torchscript",
) -> dict:
    """`export_graphs` with the options spelled out; returns the manifest."""
    options = OnnxExportOptions(layers, tokens, opset, fp16, quantize, exporter)
    return export_graphs(backbone, out_dir, options)


def export_graphs(backbone: Backbone, out_dir: str | Path, options: OnnxExportOptions) -> dict:
    """Write image.onnx, text.onnx (and *.fp16.onnx where they hold), then onnx.json.

    Each graph is checked against torch before it replaces a file of the same name; a float32
    graph that fails raises OnnxExportError, a float16 one is skipped with a logged reason.
    Returns the manifest.
    """
    backbone = _cpu_float32(backbone)
    options.check(backbone)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict = {tower: {} for tower in TOWERS}
    checks: dict = {tower: {} for tower in TOWERS}
    for tower in TOWERS:
        entry, check = export_tower(backbone, tower, out_dir, options, "float32")
        checks[tower]["float32"] = check
        if entry is None:
            raise OnnxExportError(f"{file_name(tower, 'float32')} differs from torch: {check}")
        files[tower]["float32"] = entry
        log.info("%s: %s", file_name(tower, "float32"), describe_check(check))
    for tower in TOWERS:
        (out_dir / file_name(tower, "float16")).unlink(missing_ok=True)  # never leave a stale one
        if not options.fp16:
            checks[tower]["float16"] = {"kept": False, "reason": "not asked for (fp16=False)"}
            continue
        entry, checks[tower]["float16"] = _try_fp16(backbone, tower, out_dir, options)
        if entry is not None:
            files[tower]["float16"] = entry
    for tower in TOWERS:
        (out_dir / file_name(tower, "int8")).unlink(missing_ok=True)
        if options.quantize != "int8":
            checks[tower]["int8"] = {"kept": False, "reason": "not asked for (--quantize int8)"}
            continue
        from export.onnx_quantize import quantize_tower  # onnxruntime.quantization, lazily

        entry, checks[tower]["int8"] = quantize_tower(backbone, tower, out_dir, options)
        if entry is not None:
            files[tower]["int8"] = entry
    manifest = _manifest(backbone, options, files, checks)
    atomic.write_json(out_dir / MANIFEST, manifest)
    log.info("wrote %s", out_dir / MANIFEST)
    refused = [t for t in TOWERS if options.quantize and options.quantize not in files[t]]
    if refused:
        reasons = "; ".join(f"{t}: {checks[t][options.quantize]['reason']}" for t in refused)
        raise OnnxExportError(f"{options.quantize} graphs refused ({reasons})")
    return manifest


def _manifest(
    backbone: Backbone,
    options: OnnxExportOptions,
    files: dict[str, dict[str, dict]],
    checks: dict[str, dict[str, dict]],
) -> dict:
    config = backbone.config
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "backbone": {"fingerprint": lpi.fingerprint(backbone), "config": config.to_dict()},
        "layers": options.layers,
        "tokens": options.tokens,
        "widths": {"image": config.vision.width, "text": config.text.width},
        "embed_dim": config.embed_dim,
        "image_size": config.vision.image_size,
        "context_length": config.text.context_length,
        "vocab_size": config.text.vocab_size,
        "opset": options.opset,
        "exporter": f"torch.onnx {options.exporter} (float16: dynamo), torch {torch.__version__}",
        "inputs": {tower: list(INPUTS[tower]) for tower in TOWERS},
        "output": OUTPUT,
        "files": files,
        "checks": checks,
    }


def export_tower(
    backbone: Backbone,
    tower: str,
    out_dir: Path,
    options: OnnxExportOptions,
    precision: str,
) -> tuple[dict | None, dict]:
    """Trace one graph, check it, and install it only if it holds (`install_checked`)."""
    model = backbone if precision == "float32" else copy.deepcopy(backbone).half()
    module = (ImageGraph if tower == "image" else TextGraph)(model).eval()
    generator = torch.Generator().manual_seed(0)
    layers, tokens = options.layers, options.tokens
    example = random_inputs(backbone, tower, TRACE_BATCH, TRACE_LENGTH, layers, tokens, generator)
    context = backbone.config.text.context_length
    exporter = options.exporter if precision == "float32" else "dynamo"

    def make(temp: Path) -> None:
        trace(module, tower, example, temp, options.opset, context, exporter)

    return install_checked(make, backbone, tower, out_dir, options, precision)


def install_checked(
    make: Callable[[Path], None],
    backbone: Backbone,
    tower: str,
    out_dir: Path,
    options: OnnxExportOptions,
    precision: str,
) -> tuple[dict | None, dict]:
    """`make` the graph into a temp file, check it against torch (MIN_COSINE[precision]), and
    install it as `file_name(tower, precision)` only if it holds.

    Returns (file entry, check); the entry is None when the check failed (nothing installed).
    """
    path = out_dir / file_name(tower, precision)
    try:
        with atomic_path(path) as temp:  # a graph that fails its check is never installed
            make(temp)
            check = check_graph(
                temp, backbone, tower, options.layers, options.tokens, MIN_COSINE[precision]
            )
            if not check["passed"]:
                raise _CheckFailed(check)
            entry = {"file": path.name, "sha256": sha256_file(temp), "bytes": temp.stat().st_size}
    except _CheckFailed as failed:
        return None, failed.check
    return entry, check


def below_bound(check: dict, precision: str) -> str:
    """Why a checked graph was not kept: its cosines against the bound it missed."""
    return (
        f"per-row cosine {check['min_cosine']:.6f} (inactive rows vs the bare backbone "
        f"{check['bare_min_cosine']:.6f}) is below {MIN_COSINE[precision]}"
    )


def _try_fp16(
    backbone: Backbone, tower: str, out_dir: Path, options: OnnxExportOptions
) -> tuple[dict | None, dict]:
    """The float16 graph is optional: any failure skips it with a logged reason."""
    name = file_name(tower, "float16")
    try:
        entry, check = export_tower(backbone, tower, out_dir, options, "float16")
    except Exception as err:  # whatever went wrong costs only this optional graph
        reason = f"export or run failed: {type(err).__name__}: {err}"
        log.warning("%s skipped: %s", name, reason)
        return None, {"kept": False, "reason": reason}
    if entry is None:
        check["reason"] = below_bound(check, "float16")
        log.warning("%s skipped: %s", name, check["reason"])
    else:
        log.info("%s: %s", name, describe_check(check))
    return entry, {"kept": entry is not None, **check}


# ---------------------------------------------------------------------------------- checks


def check_graph(
    path: Path, backbone: Backbone, tower: str, layers: int, tokens: int, min_cosine: float
) -> dict:
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
def random_inputs(
    backbone: Backbone,
    tower: str,
    batch: int,
    length: int,
    layers: int,
    tokens: int,
    generator: torch.Generator,
) -> dict[str, Tensor]:
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


def random_token_ids(vocab: int, batch: int, length: int, generator: torch.Generator) -> Tensor:
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


def describe_check(check: dict) -> str:
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
