"""The frozen CLIP backbone (METHOD.md §1) with a per-layer prefix key/value input (section 3).

Parameter names are OpenAI's (which open_clip keeps), so real checkpoints load with
`strict=True`. Tensors are batch-first: B rows, T tokens, D width, E embedding size.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import attention_backend, attention_over_prefix, prefix_attention, visibility_mask
from lpi.config import ClipConfig, TextConfig, VisionConfig
from lpi.prefix import LayerPrefix, Prefix, SlotLayerPrefix, SlotPrefix

AnyPrefix = Prefix | SlotPrefix
AnyLayerPrefix = LayerPrefix | SlotLayerPrefix


def split_heads(x: Tensor, heads: int) -> Tensor:
    batch, length, width = x.shape  # [B, T, D]
    return x.view(batch, length, heads, width // heads).transpose(1, 2)  # [B, H, T, d]


def merge_heads(x: Tensor) -> Tensor:
    batch, heads, length, head_dim = x.shape  # [B, H, T, d]
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.c_proj(self.gelu(self.c_fc(x)))
        return out


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's parameter layout; the prefix enters as extra keys/values."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def project_keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """K = x W_k + b_k, V = x W_v + b_v for already-normalised rows x [..., D]."""
        _, w_k, w_v = self.in_proj_weight.chunk(3)
        _, b_k, b_v = self.in_proj_bias.chunk(3)
        return F.linear(x, w_k, b_k), F.linear(x, w_v, b_v)

    def forward(
        self, x: Tensor, prefix: AnyLayerPrefix | None, mask: Tensor | None, causal: bool
    ) -> Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))  # [B, H, T, d]
        if isinstance(prefix, SlotLayerPrefix):  # serving: the fused kernel on CUDA
            out = prefix_attention(
                q,
                k,
                v,
                prefix.slots,
                prefix.key_u.to(q.dtype),
                prefix.key_m.to(q.dtype),
                prefix.value_u.to(q.dtype),
                prefix.value_m.to(q.dtype),
                causal,
            )
        elif prefix is not None:  # training and CPU: materialised per-row prefix
            prefix_k = split_heads(prefix.keys.to(q.dtype), self.heads)  # [B, H, N, d]
            prefix_v = split_heads(prefix.values.to(q.dtype), self.heads)
            out = attention_over_prefix(q, k, v, prefix_k, prefix_v, mask, causal)
        else:
            out = attention_over_prefix(q, k, v, None, None, None, causal)
        projected: Tensor = self.out_proj(merge_heads(out))
        return projected


class ResidualBlock(nn.Module):
    """Pre-LayerNorm block: x + Attn(LN1(x)), then x + MLP(LN2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, round(width * mlp_ratio), activation)

    def prefix_keys_values(self, prompt: Tensor) -> tuple[Tensor, Tensor]:
        """The prefix rows of prompt tokens [..., N, D]: LN1 then this block's K/V maps."""
        return self.attn.project_keys_values(self.ln_1(prompt))

    def forward(
        self,
        x: Tensor,
        prefix: AnyLayerPrefix | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), prefix, mask, causal)
        out: Tensor = x + self.mlp(self.ln_2(x))
        return out


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: str, eps: float):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualBlock(width, heads, mlp_ratio, act, eps) for _ in range(layers)
        )

    @property
    def blocks(self) -> list[ResidualBlock]:
        """`resblocks` typed: a ModuleList's items are plain Modules to a type checker."""
        return cast("list[ResidualBlock]", list(self.resblocks))

    def forward(self, x: Tensor, prefix: AnyPrefix | None, causal: bool) -> Tensor:
        if isinstance(prefix, SlotPrefix) and attention_backend(x.device) == "reference":
            # Off the fused kernel, every layer's per-row prefix is built here once, not per layer.
            prefix = prefix.materialise()
        mask = None  # built once per forward pass and shared by every prompted layer
        if isinstance(prefix, Prefix):
            batch, tokens = x.shape[:2]
            mask = visibility_mask(
                batch, tokens, prefix.tokens, prefix.active, causal, None, x.device
            )
        for index, block in enumerate(self.resblocks):
            layer = None if prefix is None else prefix.layer(index)
            x = block(x, layer, mask if layer is not None else None, causal)
        return x


def _check_prefix(prefix: AnyPrefix | None, tower: str, batch: int, width: int, depth: int) -> None:
    if prefix is None:
        return
    if not isinstance(prefix, Prefix | SlotPrefix):
        raise TypeError(
            f"prefix for the {tower} tower must be an lpi.Prefix or lpi.SlotPrefix, "
            f"got {type(prefix).__name__}"
        )
    if prefix.batch != batch or prefix.width != width or prefix.layers > depth:
        raise ValueError(
            f"{tower} prefix has {prefix.layers} layers, batch {prefix.batch}, width "
            f"{prefix.width}; this batch needs batch {batch}, width {width}, <= {depth} layers"
        )


class VisionTower(nn.Module):
    """ViT: patches + CLS + positions -> ln_pre -> blocks -> ln_post(CLS) @ proj."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, activation: str, eps: float):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.tokens, width))
        self.ln_pre = nn.LayerNorm(width, eps=eps)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation, eps)
        self.ln_post = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))

    def forward(self, pixels: Tensor, prefix: AnyPrefix | None = None) -> Tensor:
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # [B, D, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, D]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, T, D]
        x = self.transformer(self.ln_pre(x), prefix, causal=False)
        pooled: Tensor = self.ln_post(x[:, 0])  # [B, D]
        return (pooled @ self.proj).float()  # [B, E] float32 in any weight dtype


class Backbone(nn.Module):
    """CLIP image and text towers; `encode_*` return L2-normalised [B, E] float32 features.

    The weights may be cast to bfloat16 or float16 (`lpi.precision.cast_backbone`): inputs stay
    float32 pixels or integer ids, and the features are normalised in float32 either way.
    """

    float32_fingerprint: str | None = None  # set by a cast: the weights' name stays float32's

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        text: TextConfig = config.text
        eps, act = config.layer_norm_eps, config.activation
        self.visual = VisionTower(config.vision, config.embed_dim, act, eps)
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.transformer = Transformer(
            text.width, text.layers, text.heads, text.mlp_ratio, act, eps
        )
        self.ln_final = nn.LayerNorm(text.width, eps=eps)
        self.text_projection = nn.Parameter(torch.empty(text.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        init_weights(self)

    def blocks(self, modality: str) -> list[ResidualBlock]:
        """The residual blocks of the image (`"v"`) or text (`"t"`) tower."""
        if modality == "v":
            return self.visual.transformer.blocks
        if modality == "t":
            return self.transformer.blocks
        raise ValueError(f"modality must be 'v' or 't', got {modality!r}")

    def encode_image(self, pixels: Tensor, prefix: AnyPrefix | None = None) -> Tensor:
        """Pixels [B, 3, H, W] (as `lpi.preprocess` makes them) -> unit features [B, E]."""
        cfg = self.config.vision
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixels must be [B, 3, {cfg.image_size}, {cfg.image_size}], "
                f"got {tuple(pixels.shape)}; use lpi.preprocess to make them"
            )
        if pixels.shape[0] == 0:
            raise ValueError("pixels is an empty batch")
        _check_prefix(prefix, "image", pixels.shape[0], cfg.width, cfg.layers)
        return F.normalize(self.visual(pixels, prefix), dim=-1)

    def encode_text(self, token_ids: Tensor, prefix: AnyPrefix | None = None) -> Tensor:
        """Token ids [B, L<=77] (as `lpi.tokenize` makes them) -> unit features [B, E].

        The sequence is cut after the batch's last end-of-text token: with causal attention
        the padding after it never reaches an EOT feature, so the result is the same as with
        the full context and costs far less.
        """
        token_ids = self._check_tokens(token_ids)
        _check_prefix(
            prefix, "text", token_ids.shape[0], self.config.text.width, self.config.text.layers
        )
        length = int(token_ids.argmax(dim=-1).max()) + 1  # the batch's last end-of-text token
        return self.text_tower(token_ids[:, :length], prefix)

    def text_tower(self, token_ids: Tensor, prefix: AnyPrefix | None = None) -> Tensor:
        """The text forward pass alone: no input checks, no trimming (export traces this).

        Token ids [B, T <= context] -> unit features [B, E], pooled at the end-of-text token
        (the highest id of each row).
        """
        eot = token_ids.argmax(dim=-1)  # [B]
        x = self.token_embedding(token_ids)  # [B, T, D]
        x = x + self.positional_embedding[: token_ids.shape[1]].to(x.dtype)
        x = self.transformer(x, prefix, causal=True)
        x = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])  # [B, D]
        return F.normalize((x @ self.text_projection).float(), dim=-1)  # float32 in any dtype

    def _check_tokens(self, token_ids: Tensor) -> Tensor:
        text = self.config.text
        if not isinstance(token_ids, Tensor) or token_ids.dim() != 2:
            raise ValueError("token_ids must be a 2-D LongTensor [B, L]; use lpi.tokenize")
        if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise ValueError(f"token_ids must hold integer ids, got dtype {token_ids.dtype}")
        if token_ids.shape[0] == 0:
            raise ValueError("token_ids is an empty batch")
        if token_ids.shape[1] > text.context_length:
            raise ValueError(
                f"token_ids has {token_ids.shape[1]} positions; the context is "
                f"{text.context_length} (lpi.tokenize truncates longer texts)"
            )
        if int(token_ids.min()) < 0 or int(token_ids.max()) >= text.vocab_size:
            raise ValueError(f"token ids must lie in [0, {text.vocab_size})")
        return token_ids.long().to(self.token_embedding.weight.device)


@torch.no_grad()
def init_weights(model: Backbone) -> None:
    """open_clip's initialisation, so presets start from sensible random weights."""
    cfg = model.config
    nn.init.normal_(model.token_embedding.weight, std=0.02)
    nn.init.normal_(model.positional_embedding, std=0.01)
    scale = cfg.vision.width**-0.5
    model.visual.class_embedding.normal_(std=scale)
    model.visual.positional_embedding.normal_(std=scale)
    model.visual.proj.normal_(std=scale)
    nn.init.normal_(model.text_projection, std=cfg.text.width**-0.5)
    for transformer, tower in (
        (model.visual.transformer, cfg.vision),
        (model.transformer, cfg.text),
    ):
        attn_std = tower.width**-0.5
        proj_std = attn_std * (2 * tower.layers) ** -0.5
        for block in transformer.blocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * tower.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
