"""Hugging Face `CLIPModel` weights in OpenAI's layout, so one backbone class serves both.

HF splits the attention input projection into q/k/v and stores projections as Linear weights
([E, D]); OpenAI concatenates them (`in_proj_weight`, [3D, D]) and stores `proj` as [D, E].
Errors are ValueErrors naming the field; `lpi.checkpoint` adds the folder's name.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from lpi.config import ClipConfig, TextConfig, VisionConfig

# transformers 4.x writes only non-default fields to config.json: these are CLIP's defaults.
_TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}
_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

_RENAMES = [  # (HF pattern, OpenAI replacement), applied in order
    (r"^vision_model\.embeddings\.class_embedding$", "visual.class_embedding"),
    (r"^vision_model\.embeddings\.patch_embedding\.weight$", "visual.conv1.weight"),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.positional_embedding"),
    (r"^vision_model\.pre_layrnorm\.", "visual.ln_pre."),
    (r"^vision_model\.post_layernorm\.", "visual.ln_post."),
    (r"^vision_model\.encoder\.layers\.", "visual.transformer.resblocks."),
    (r"^text_model\.embeddings\.token_embedding\.", "token_embedding."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^text_model\.final_layer_norm\.", "ln_final."),
    (r"^text_model\.encoder\.layers\.", "transformer.resblocks."),
    (r"\.self_attn\.out_proj\.", ".attn.out_proj."),
    (r"\.layer_norm1\.", ".ln_1."),
    (r"\.layer_norm2\.", ".ln_2."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
]


def convert_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenAI-layout state dict from a `CLIPModel` state dict."""
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # a buffer of 0..L-1, not a weight
        if key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif match := re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key):
            qkv.setdefault(f"{match[1]}|{match[3]}", {})[match[2]] = value
        else:
            out[_rename(key)] = value
    for group, parts in qkv.items():
        block, kind = group.split("|")
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{block}.self_attn has {kind}s for {sorted(parts)}, not q, k and v")
        out[f"{_rename(block + '.')}attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    return out


def _rename(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def hf_clip_config(config: dict) -> ClipConfig:
    """ClipConfig from a `CLIPModel` config.json (with transformers' defaults filled in)."""
    text, vision = _tower(config, "text"), _tower(config, "vision")
    activation = text["hidden_act"]
    if activation not in ("quick_gelu", "gelu") or vision["hidden_act"] != activation:
        raise ValueError(f"unsupported hidden_act {activation!r}/{vision['hidden_act']!r}")
    if float(text["layer_norm_eps"]) != float(vision["layer_norm_eps"]):
        raise ValueError("text and vision layer_norm_eps differ; lpi uses one for both towers")
    _check_eos(text)
    return ClipConfig(
        embed_dim=int(config.get("projection_dim", 512)),
        vision=VisionConfig(
            image_size=_square(vision["image_size"], "image_size"),
            patch_size=_square(vision["patch_size"], "patch_size"),
            width=vision["hidden_size"],
            layers=vision["num_hidden_layers"],
            heads=vision["num_attention_heads"],
            mlp_ratio=vision["intermediate_size"] / vision["hidden_size"],
        ),
        text=TextConfig(
            context_length=text["max_position_embeddings"],
            vocab_size=text["vocab_size"],
            width=text["hidden_size"],
            layers=text["num_hidden_layers"],
            heads=text["num_attention_heads"],
            mlp_ratio=text["intermediate_size"] / text["hidden_size"],
        ),
        activation=activation,
        layer_norm_eps=float(text["layer_norm_eps"]),
    )


def _tower(config: dict, name: str) -> dict:
    """Defaults, then `<name>_config`, then `<name>_config_dict`, which transformers prefers
    (older CLIP configs such as openai/clip-vit-large-patch14 carry both)."""
    defaults = _TEXT_DEFAULTS if name == "text" else _VISION_DEFAULTS
    return {
        **defaults,
        **(config.get(f"{name}_config") or {}),
        **(config.get(f"{name}_config_dict") or {}),
    }


def _square(value: int | list | tuple, name: str) -> int:
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"vision {name} {value} is not square")
        return int(value[0])
    return int(value)


def _check_eos(text: dict) -> None:
    """The backbone pools at the highest token id (CLIP's end-of-text). transformers pools
    there too when eos_token_id is 2 (legacy configs: argmax) or the last id of the vocabulary
    (first occurrence); any other id would pool somewhere else."""
    eos, last = text["eos_token_id"], text["vocab_size"] - 1
    if eos not in (2, last):
        raise ValueError(
            f"text eos_token_id {eos} is neither 2 (legacy) nor the end-of-text id {last}"
        )
