"""The open_clip pretrained tags this project can serve, as data: `ARCH:TAG` -> a hub repository.

open_clip names pretrained weights `ARCH:TAG` (`ViT-B-32:openai`, `ViT-B-16:laion2b_s34b_b88k`)
and publishes each on the Hugging Face hub as `open_clip_model.safetensors` and/or
`open_clip_pytorch_model.bin` (OpenAI's own archives are mirrored under `timm/...`). This table
carries the tags whose towers `lpi.Backbone` builds and whose preprocessing is OpenAI's (the only
one `lpi.preprocess` implements); open_clip itself is never imported to read it. Tags left out on
purpose: `ViT-L-14:laion2b_s32b_b82k` (Inception mean/std) and `ViT-H-14:dfn5b` (squashed, not
cropped, images): served with OpenAI's preprocessing they would give subtly wrong vectors.

What the weights cannot say is carried here too: the activation (QuickGELU for OpenAI, MetaCLIP,
DFN-2B and LAION-400M ViT-B-32 weights; GELU for the rest) and the image tower's head width where
it is not OpenAI's 64.
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
QUICK, GELU = "quick_gelu", "gelu"
# Image towers with wider heads than 64 (open_clip's model configs: `head_width`).
VISION_HEAD_WIDTH = {"ViT-H-14": 80, "ViT-g-14": 88, "ViT-bigG-14": 104}


@dataclass(frozen=True)
class PretrainedTag:
    """One `ARCH:TAG`: where its weights live and what they need to be read right."""

    arch: str
    tag: str
    repo: str  # Hugging Face hub repository holding WEIGHT_FILES
    activation: str

    @property
    def name(self) -> str:
        return f"{self.arch}:{self.tag}"

    @property
    def vision_head_width(self) -> int:
        return VISION_HEAD_WIDTH.get(self.arch, 64)


def _timm(model: str, tag: str) -> str:
    return f"timm/{model}.{tag}"


_B32, _B16 = "vit_base_patch32_clip_224", "vit_base_patch16_clip_224"
_L14 = "vit_large_patch14_clip_224"
# arch -> tag -> (repo, activation)
_TABLE: dict[str, dict[str, tuple[str, str]]] = {
    "ViT-B-32": {
        "openai": (_timm(_B32, "openai"), QUICK),
        "laion400m_e31": (_timm(_B32, "laion400m_e31"), QUICK),
        "laion400m_e32": (_timm(_B32, "laion400m_e32"), QUICK),
        "laion2b_e16": (_timm(_B32, "laion2b_e16"), GELU),
        "laion2b_s34b_b79k": ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", GELU),
        "datacomp_xl_s13b_b90k": ("laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K", GELU),
        "metaclip_400m": (_timm(_B32, "metaclip_400m"), QUICK),
        "metaclip_fullcc": (_timm(_B32, "metaclip_2pt5b"), QUICK),
    },
    "ViT-B-32-256": {
        "datacomp_s34b_b86k": ("laion/CLIP-ViT-B-32-256x256-DataComp-s34B-b86K", GELU),
    },
    "ViT-B-16": {
        "openai": (_timm(_B16, "openai"), QUICK),
        "laion400m_e31": (_timm(_B16, "laion400m_e31"), GELU),
        "laion400m_e32": (_timm(_B16, "laion400m_e32"), GELU),
        "laion2b_s34b_b88k": ("laion/CLIP-ViT-B-16-laion2B-s34B-b88K", GELU),
        "datacomp_xl_s13b_b90k": ("laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K", GELU),
        "datacomp_l_s1b_b8k": ("laion/CLIP-ViT-B-16-DataComp.L-s1B-b8K", GELU),
        "dfn2b": ("apple/DFN2B-CLIP-ViT-B-16", QUICK),
        "metaclip_400m": (_timm(_B16, "metaclip_400m"), QUICK),
        "metaclip_fullcc": (_timm(_B16, "metaclip_2pt5b"), QUICK),
    },
    "ViT-B-16-plus-240": {
        "laion400m_e31": (_timm("vit_base_patch16_plus_clip_240", "laion400m_e31"), GELU),
    },
    "ViT-L-14": {
        "openai": (_timm(_L14, "openai"), QUICK),
        "laion400m_e31": (_timm(_L14, "laion400m_e31"), GELU),
        "laion400m_e32": (_timm(_L14, "laion400m_e32"), GELU),
        "datacomp_xl_s13b_b90k": ("laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", GELU),
        "metaclip_400m": (_timm(_L14, "metaclip_400m"), QUICK),
        "metaclip_fullcc": (_timm(_L14, "metaclip_2pt5b"), QUICK),
        "dfn2b": ("apple/DFN2B-CLIP-ViT-L-14", QUICK),
        "dfn2b_s39b": ("apple/DFN2B-CLIP-ViT-L-14-39B", GELU),
    },
    "ViT-L-14-336": {
        "openai": (_timm("vit_large_patch14_clip_336", "openai"), QUICK),
    },
    "ViT-H-14": {
        "laion2b_s32b_b79k": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", GELU),
        "metaclip_fullcc": (_timm("vit_huge_patch14_clip_224", "metaclip_2pt5b"), QUICK),
        "metaclip_altogether": (_timm("vit_huge_patch14_clip_224", "metaclip_altogether"), GELU),
    },
    "ViT-g-14": {
        "laion2b_s12b_b42k": ("laion/CLIP-ViT-g-14-laion2B-s12B-b42K", GELU),
        "laion2b_s34b_b88k": ("laion/CLIP-ViT-g-14-laion2B-s34B-b88K", GELU),
    },
    "ViT-bigG-14": {
        "laion2b_s39b_b160k": ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", GELU),
        "metaclip_fullcc": (_timm("vit_gigantic_patch14_clip_224", "metaclip_2pt5b"), QUICK),
    },
}
QUICKGELU_SUFFIX = "-quickgelu"  # open_clip's alias of an arch for its QuickGELU tags


class UnknownTagError(KeyError):
    """An `ARCH:TAG` not in the table; str() is the whole message."""

    def __str__(self) -> str:
        return str(self.args[0])


def lookup(name: str) -> PretrainedTag:
    """The table row of `ARCH:TAG` (tags compared as open_clip does: case and '-' ignored)."""
    arch, _, tag = name.partition(":")
    base = arch.removesuffix(QUICKGELU_SUFFIX)
    if base not in _TABLE:
        raise UnknownTagError(
            f"unknown model {name!r}: no architecture {arch!r} among the supported "
            f"open_clip models ({', '.join(_TABLE)})"
        )
    tags = _TABLE[base]
    clean = tag.lower().replace("-", "_")
    entry = tags.get(clean)
    if entry is None or (arch != base and entry[1] != QUICK):
        known = [t for t, (_, act) in tags.items() if arch == base or act == QUICK]
        raise UnknownTagError(
            f"unknown model {name!r}: {arch} has no pretrained tag {tag!r} "
            f"(supported: {', '.join(known)})"
        )
    return PretrainedTag(arch=base, tag=clean, repo=entry[0], activation=entry[1])


def supported() -> list[str]:
    """Every supported `ARCH:TAG`, for help texts and errors."""
    return [f"{arch}:{tag}" for arch, tags in _TABLE.items() for tag in tags]
