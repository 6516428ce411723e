"""Architecture as data: frozen dataclasses for the CLIP towers and the task prompts.

Shapes are never hidden in code: a backbone is fully described by a `ClipConfig`, read from a
JSON preset (`lpi/presets/*.json`) or inferred from checkpoint weights (`lpi.checkpoint`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Literal

Activation = Literal["quick_gelu", "gelu"]


@dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        """CLS plus patches: the sequence length T of the image tower."""
        return self.grid * self.grid + 1


@dataclass(frozen=True)
class TextConfig:
    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class ClipConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    activation: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"activation must be 'quick_gelu' or 'gelu', got {self.activation!r}")
        for name, tower in (("vision", self.vision), ("text", self.text)):
            if tower.width % tower.heads:
                raise ValueError(
                    f"{name}.width {tower.width} is not divisible by heads {tower.heads}"
                )
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(
                f"vision.image_size {self.vision.image_size} is not a multiple of "
                f"patch_size {self.vision.patch_size}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> ClipConfig:
        return cls(
            embed_dim=int(data["embed_dim"]),
            vision=VisionConfig(**data["vision"]),
            text=TextConfig(**data["text"]),
            activation=data.get("activation", "quick_gelu"),
            layer_norm_eps=float(data.get("layer_norm_eps", 1e-5)),
        )


def preset_names() -> list[str]:
    folder = resources.files("lpi") / "presets"
    return sorted(
        p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")
    )


def load_preset(name: str) -> ClipConfig:
    """A named architecture (`tiny`, `ViT-B-16`, ...); its weights are random, never downloaded."""
    if name not in preset_names():
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    text = (resources.files("lpi") / "presets" / f"{name}.json").read_text()
    return ClipConfig.from_dict(json.loads(text))


@dataclass(frozen=True)
class PromptConfig:
    """Shapes of one task's low-rank deep prompts (METHOD.md §2).

    J prompted layers, N prompt tokens per modality, rank R of the CP factors, rank R_i of
    the interaction maps, mixing weight alpha; `interaction=False` is the ablation P' = P.
    """

    layers: int = 9  # J
    tokens: int = 16  # N
    rank: int = 4  # R
    interaction_rank: int = 4  # R_i
    alpha: float = 0.1
    interaction: bool = True
    init_std: float = 0.5

    def __post_init__(self) -> None:
        for name in ("layers", "tokens", "rank", "interaction_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"PromptConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"PromptConfig.alpha must lie in [0, 1], got {self.alpha}")

    def check_fits(self, clip: ClipConfig) -> None:
        depth = min(clip.vision.layers, clip.text.layers)
        if self.layers > depth:
            raise ValueError(
                f"PromptConfig.layers J={self.layers} exceeds the backbone's depth {depth}"
            )

    def to_dict(self) -> dict:
        return asdict(self)
