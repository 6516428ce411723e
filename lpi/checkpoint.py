"""The one module that reads backbone weights: formats, key layouts, architecture inference.

Accepted from a local path:
- an OpenAI TorchScript archive (`ViT-B-16.pt` as OpenAI ships it);
- an OpenAI or open_clip state dict in `.pt`/`.pth`/`.bin` (read with `weights_only=True`,
  so nothing is unpickled) or `.safetensors`, optionally nested under `state_dict` and with a
  `module.` prefix;
- a Hugging Face `CLIPModel` folder (`config.json` + `model.safetensors` or
  `pytorch_model.bin`);
- a preset name (`tiny`, `ViT-B-16`, ...) for random weights.

Or by name, from the Hugging Face cache (`lpi.hub`; downloaded only with `allow_download=True`):
an open_clip pretrained tag (`ViT-B-32:openai`), `hf-hub:ORG/NAME`, or a `CLIPModel` id `ORG/NAME`.

The architecture is inferred from the weights (OpenAI's convention: 64-wide attention heads)
unless the file carries an `lpi.config` entry in its safetensors metadata, as files written
by `save_backbone` do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from lpi.atomic import atomic_path
from lpi.backbone import Backbone
from lpi.config import ClipConfig, TextConfig, VisionConfig, load_preset, preset_names

log = logging.getLogger(__name__)

CONFIG_METADATA_KEY = "lpi.config"
# Entries OpenAI's archives carry beside the weights; they are configuration, not parameters.
# `attn_mask` is open_clip's causal-mask buffer, which a TorchScript export of it keeps.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
_STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be turned into a backbone; the message says why."""


def load_backbone(
    path_or_preset: str | Path,
    device: str | torch.device = "cpu",
    activation: str | None = None,
    config: ClipConfig | None = None,
    seed: int = 0,
    allow_download: bool = False,
    dtype: torch.dtype | str | None = None,
) -> Backbone:
    """A frozen backbone in eval mode from a local checkpoint path, a model name or a preset.

    What the weights cannot say can be given: a whole `config` (e.g. a head count other than
    width / 64) replaces the inferred or stored one, and `activation` ("quick_gelu" for OpenAI
    weights, the default; "gelu" for open_clip models trained without QuickGELU) overrides
    whichever config is used (a model name brings its own, from `lpi.pretrained` or the
    repository's config). `seed` fixes the random weights of a preset. A model name is read
    from the Hugging Face cache, and fetched into it only if `allow_download`. `dtype`
    (float32, bfloat16, float16 or "auto", see `lpi.precision`) casts the weights once after
    loading; the fingerprint stays the float32 weights'.
    """
    source = str(path_or_preset)
    kind = source_kind(source)
    if kind == "hub":
        from lpi import hub

        resolved = hub.resolve(source, allow_download=allow_download)
        try:
            state, inferred = read_checkpoint(resolved.path)
            inferred = resolved.apply(inferred)
            model = build_from_state_dict(state, with_activation(config or inferred, activation))
        except CheckpointError as err:
            raise CheckpointError(f"model {source!r}: {err}") from err
    elif kind == "preset":
        if config is not None:
            raise CheckpointError(
                f"config= replaces the architecture of a checkpoint; {source!r} is a preset, "
                f"which is an architecture already (build lpi.Backbone(config) for random weights)"
            )
        torch.manual_seed(seed)
        model = Backbone(with_activation(load_preset(source), activation))
    else:
        state, inferred = read_checkpoint(Path(source))
        model = build_from_state_dict(state, with_activation(config or inferred, activation))
    model.requires_grad_(False)
    model = model.to(device).eval()
    if dtype is not None:
        from lpi.precision import cast_backbone, resolve_dtype

        if isinstance(dtype, str):
            widest = max(model.config.vision.width, model.config.text.width)
            dtype = resolve_dtype(dtype, torch.device(device), width=widest).dtype
        model = cast_backbone(model, dtype)
    return model


def source_kind(source: str) -> str:
    """'path' (an existing file or folder wins), 'preset' (random weights), 'hub' (a model
    name), or 'path' again for anything else, which `read_checkpoint` then reports missing."""
    from lpi.hub import is_model_name

    if Path(source).exists():
        return "path"
    if source in preset_names():
        return "preset"
    return "hub" if is_model_name(source) else "path"


def with_activation(config: ClipConfig, activation: str | None) -> ClipConfig:
    """`config` with its activation replaced (None keeps it)."""
    if activation is None:
        return config
    if activation not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"activation must be 'quick_gelu' or 'gelu', got {activation!r}")
    return ClipConfig.from_dict({**config.to_dict(), "activation": activation})


def read_checkpoint(path: Path) -> tuple[dict, ClipConfig]:
    """OpenAI-layout state dict and its architecture from any supported file or folder."""
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist (and is not a preset: {', '.join(preset_names())}; "
            f"nor a model name: ViT-B-32:openai, hf-hub:ORG/NAME, ORG/NAME)"
        )
    config_dict = None
    if path.is_dir():
        state, config_dict = _read_hf_folder(path)
    elif path.suffix == ".safetensors":
        state, config_dict = _read_safetensors(path)
    elif path.suffix in _STATE_DICT_SUFFIXES:
        state = _read_torch_file(path)
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint format {path.suffix!r}; expected a TorchScript "
            f"archive or state dict (.pt, .pth, .bin), .safetensors, or a Hugging Face folder"
        )
    state = normalise_keys(state, path)
    config = _stored_config(config_dict, path) if config_dict else infer_config(state, path)
    return state, config


def _stored_config(config_dict: dict, path: Path) -> ClipConfig:
    try:
        return ClipConfig.from_dict(config_dict)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its stored architecture is invalid ({err!r})") from err


def build_from_state_dict(state: dict[str, Tensor], config: ClipConfig) -> Backbone:
    """A backbone holding exactly these weights; every key and shape is checked first."""
    model = Backbone(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"state dict does not match the inferred architecture: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}"
        )
    wrong = [
        f"{key}: {tuple(state[key].shape)} != {tuple(ref.shape)}"
        for key, ref in expected.items()
        if state[key].shape != ref.shape
    ]
    if wrong:
        raise CheckpointError(f"mis-shaped weights: {_few(wrong)}")
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}  # fp16 archives -> fp32
    model.load_state_dict(state, strict=True)
    return model


def save_backbone(model: Backbone, path: str | Path) -> Path:
    """Write weights + architecture as one safetensors file (atomically, `lpi.atomic`).

    The name must end in `.safetensors`: `load_backbone` picks the reader by suffix.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: save_backbone writes safetensors; name it *.safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata={CONFIG_METADATA_KEY: model.config.to_json()})
    return path


def fingerprint(model: Backbone) -> str:
    """sha256 of the architecture and every weight: names what vectors were made with.

    A backbone cast by `lpi.precision.cast_backbone` keeps its float32 weights' fingerprint.
    """
    cast_from = model.float32_fingerprint
    if cast_from is not None and next(model.parameters()).dtype != torch.float32:
        return cast_from
    digest = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _few(items: list[str], limit: int = 6) -> str:
    if not items:
        return "none"
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _read_torch_file(path: Path) -> dict:
    """A state dict read with `weights_only=True`: tensors and containers, never code."""
    if _is_torchscript(path):
        return _read_torchscript(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle of code, a truncated zip, not torch at all
        raise CheckpointError(f"{path}: not a readable state dict ({_why(path, err)})") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    wrong = [f"{k!r} is {type(v).__name__}" for k, v in obj.items() if not isinstance(v, Tensor)]
    if wrong:
        raise CheckpointError(f"{path}: expected a dict of tensors, but {_few(wrong)}")
    return obj


def _read_torchscript(path: Path) -> dict:
    """OpenAI's archives: TorchScript, which runs no Python while loading."""
    log.info("reading TorchScript archive", extra={"path": str(path)})
    try:
        with warnings.catch_warnings():  # torch deprecates jit; OpenAI's files still need it
            warnings.simplefilter("ignore", FutureWarning)
            state: dict = torch.jit.load(str(path), map_location="cpu").state_dict()
            return state
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable TorchScript archive ({err})") from err


def _why(path: Path, err: Exception) -> str:
    """One line instead of torch's advice to turn weights_only off."""
    text = str(err)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if isinstance(err, pickle.UnpicklingError) and unsafe:
        return f"it pickles the Python object {unsafe[1]}, which weights_only=True refuses"
    try:
        with path.open("rb") as handle:
            if handle.read(2) == b"PK" and not zipfile.is_zipfile(path):
                return "a zip archive without its directory: truncated or corrupted"
    except OSError:
        pass  # torch's own message below says what went wrong
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first[:200]


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding compiled code next to the weights."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(re.search(r"(^|/)code/", name) for name in archive.namelist())
    except zipfile.BadZipFile:
        return False  # torch.load reports it with the file's name


def _read_safetensors(path: Path) -> tuple[dict, dict | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    config = metadata.get(CONFIG_METADATA_KEY)
    if not config:
        return state, None
    try:
        return state, json.loads(config)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: metadata {CONFIG_METADATA_KEY!r} is not JSON") from err


def _read_hf_folder(path: Path) -> tuple[dict, dict]:
    from lpi.hf_convert import convert_hf_state_dict, hf_clip_config

    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} is a folder without config.json: not a CLIPModel folder")
    weights = path / "model.safetensors"
    if weights.exists():
        state, _ = _read_safetensors(weights)
    elif (path / "pytorch_model.bin").exists():
        state = _read_torch_file(path / "pytorch_model.bin")
    else:
        raise CheckpointError(
            f"{path} has neither model.safetensors nor pytorch_model.bin "
            f"(sharded checkpoints are not supported)"
        )
    try:
        config = hf_clip_config(json.loads(config_file.read_text()))
        return convert_hf_state_dict(state), config.to_dict()
    except (KeyError, TypeError, ValueError, OSError) as err:  # JSON errors are ValueErrors
        raise CheckpointError(f"{path}: not a supported CLIPModel ({err})") from err


def normalise_keys(state: dict, path: Path) -> dict[str, Tensor]:
    """Strip DataParallel prefixes and configuration entries; refuse unsupported towers."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in _NON_PARAMETER_KEYS}
    if "visual.layer1.0.conv1.weight" in state or "visual.attnpool.c_proj.weight" in state:
        raise CheckpointError(f"{path}: ResNet image towers (RN50, ...) are not supported")
    if "visual.trunk.patch_embed.proj.weight" in state or "text.transformer.embeddings" in str(
        sorted(state)
    ):
        raise CheckpointError(
            f"{path}: timm or Hugging Face towers inside open_clip are unsupported"
        )
    if "text.token_embedding.weight" in state:  # open_clip's CustomTextCLIP nests the text tower
        state = {k.removeprefix("text."): v for k, v in state.items()}
    if "visual.conv1.weight" not in state or "token_embedding.weight" not in state:
        raise CheckpointError(
            f"{path}: not a CLIP state dict (no visual.conv1.weight / token_embedding.weight)"
        )
    return state


def _count_layers(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    if not indices or indices != set(range(max(indices) + 1)):
        raise CheckpointError(f"blocks under {prefix!r} are missing or not numbered 0..L-1")
    return len(indices)


def infer_config(state: dict[str, Tensor], path: Path | str = "state dict") -> ClipConfig:
    """The architecture from the weights' shapes (heads: width / 64, OpenAI's convention)."""
    try:
        conv = state["visual.conv1.weight"]  # [D_v, 3, p, p]
        vision_width, patch = conv.shape[0], conv.shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        text_width = state["ln_final.weight"].shape[0]
        vision = VisionConfig(
            image_size=grid * patch,
            patch_size=patch,
            width=vision_width,
            layers=_count_layers(state, "visual.transformer.resblocks."),
            heads=max(1, vision_width // 64),
            mlp_ratio=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
            / vision_width,
        )
        text = TextConfig(
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
            width=text_width,
            layers=_count_layers(state, "transformer.resblocks."),
            heads=max(1, text_width // 64),
            mlp_ratio=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        )
        return ClipConfig(embed_dim=state["text_projection"].shape[1], vision=vision, text=text)
    except KeyError as err:
        raise CheckpointError(f"{path}: missing weight {err.args[0]!r}") from err
    except CheckpointError:
        raise
    except (IndexError, ValueError) as err:  # a 1-D projection; a width heads do not divide
        raise CheckpointError(
            f"{path}: cannot infer the architecture ({err}); pass config= to load_backbone"
        ) from err
