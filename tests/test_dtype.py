"""Half-precision serving against float32: the backbone, the slot path, the kernel reference.
(`SlotPrefix.materialise` itself, in float32, is tests/test_slot_prefix.py's.)

Tolerances, per row: bfloat16 keeps 8 significant bits (relative error 2^-9 per rounding),
float16 11 bits; the rounding errors of D-wide dot products average out,
so unit features stay within cosine 0.999 of float32 (seen here: >= 0.9999 for bf16 on the
tiny backbone; 1 - cos ~ 1e-5). The kernel reference, one attention call, is held to
|diff| <= 2e-2 (bf16) on outputs of size ~1: a few bf16 roundings of values below 4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lpi
from kernels import reference
from lpi import precision
from lpi.prefix import SlotPrefix
from tests.conftest import CAPTIONS, random_pixels

MIN_COSINE = 0.999
HALF = (torch.bfloat16, torch.float16)
AVX512_BF16 = frozenset({"avx512f", "avx512_bf16"})


def test_auto_takes_bfloat16_only_where_the_cpu_has_it():
    cpu = torch.device("cpu")
    assert precision.resolve_dtype("auto", cpu, AVX512_BF16).dtype == torch.bfloat16
    assert precision.resolve_dtype("auto", cpu, frozenset({"amx_bf16"})).dtype == torch.bfloat16
    plain = precision.resolve_dtype("auto", cpu, frozenset({"avx2"}))
    assert plain.dtype == torch.float32 and not plain.fell_back


def test_auto_keeps_narrow_towers_in_float32_on_a_cpu():
    """bf16 gains nothing on a tiny tower (per-op overhead) and costs a kernel per shape; a
    named bfloat16 is still honoured, and CUDA is not subject to the rule."""
    cpu, wide = torch.device("cpu"), precision.CPU_BF16_MIN_WIDTH
    narrow = precision.resolve_dtype("auto", cpu, AVX512_BF16, width=64)
    assert narrow.dtype == torch.float32 and not narrow.fell_back and "64 wide" in narrow.reason
    assert precision.resolve_dtype("auto", cpu, AVX512_BF16, width=wide).dtype == torch.bfloat16
    assert precision.resolve_dtype("bfloat16", cpu, AVX512_BF16, width=64).dtype == torch.bfloat16


def test_a_dtype_the_hardware_lacks_falls_back_to_float32_and_says_so():
    chosen = precision.resolve_dtype("bfloat16", "cpu", frozenset({"avx2"}))
    assert chosen.dtype == torch.float32 and chosen.fell_back
    assert "avx512_bf16" in chosen.reason and "float32" in chosen.reason
    asked = precision.resolve_dtype("bfloat16", "cpu", AVX512_BF16)
    assert asked.dtype == torch.bfloat16 and not asked.fell_back
    with pytest.raises(ValueError, match="dtype must be one of"):
        precision.resolve_dtype("int4", "cpu")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert {"avx512f", "avx512_bf16"} <= precision.cpu_flags(str(info))
    assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.fixture(scope="module")
def float32_backbone():
    return lpi.load_backbone("tiny", seed=3)


@pytest.mark.parametrize("dtype", HALF)
def test_half_backbone_equals_float32_per_row(float32_backbone, dtype):
    """Bare and prompted (materialised prefix), both towers; float32 unit vectors come back."""
    half = lpi.load_backbone("tiny", seed=3, dtype=dtype)
    assert next(half.parameters()).dtype == dtype
    assert lpi.fingerprint(half) == lpi.fingerprint(float32_backbone)  # tasks still fit it
    generator = torch.Generator().manual_seed(11)
    pixels = random_pixels(float32_backbone, 6, generator)
    tokens = lpi.tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(6)])
    bank = lpi.PromptBank()
    for name in ("x", "y"):
        torch.manual_seed(len(name) + ord(name))
        config = lpi.PromptConfig(layers=2, tokens=4, rank=2)
        bank.add(name, lpi.TaskPrompts.for_backbone(config, float32_backbone))
    rows = ["x", "y", None, "x", "y", None]
    with torch.inference_mode():
        image_prefix, text_prefix = bank.prefixes(float32_backbone, rows)
        for data, encode_name, prefix in (
            (pixels, "encode_image", image_prefix),
            (tokens, "encode_text", text_prefix),
        ):
            for given in (None, prefix):
                want = getattr(float32_backbone, encode_name)(data, given)
                got = getattr(half, encode_name)(data, given)
                assert got.dtype == torch.float32
                assert torch.allclose(got.norm(dim=-1), torch.ones(6), atol=1e-5)
                assert F.cosine_similarity(got, want, dim=-1).min() >= MIN_COSINE


def _factors(layers, tokens, rank, width, generator) -> list[torch.Tensor]:
    """Random U_K, M_K, U_V, M_V of one task: [J, N, R], [J, R, D] twice."""
    shapes = [(layers, tokens, rank), (layers, rank, width)] * 2
    return [torch.randn(*shape, generator=generator) * 0.5 for shape in shapes]


def _pool(layers, slots, tokens, rank, width, dtype, generator, tasks=None):
    """A pool holding `tasks` (default: one per slot but the last, whose zeros stay unread)."""
    from kernels import TaskSlotPool

    pool = TaskSlotPool(layers, slots, tokens, rank, width, dtype=dtype)
    if tasks is None:
        made = (_factors(layers, tokens, rank, width, generator) for _ in range(slots - 1))
        tasks = {f"t{i}": factors for i, factors in enumerate(made)}
    for name, factors in tasks.items():
        pool.add(name, *(f.to(dtype) for f in factors))
    return pool


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_reference_runs_half_precision_on_the_cpu(dtype, causal):
    generator = torch.Generator().manual_seed(5)
    batch, heads, tokens, head_dim = 4, 2, 7, 8
    pool = _pool(1, 3, 4, 2, heads * head_dim, torch.float32, generator)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=generator) for _ in range(3))
    slots = torch.tensor([0, -1, 1, 0], dtype=torch.int32)
    want = reference.prefix_attention(q, k, v, slots, *pool.layer(0), causal)
    half = [t.to(dtype) for t in (q, k, v)] + [t.to(dtype) for t in pool.layer(0)]
    from kernels import prefix_attention  # the dispatch: the reference on CPU tensors

    got = prefix_attention(*half[:3], slots, *half[3:], causal)
    assert got.dtype == dtype
    assert (got.float() - want).abs().max() <= 2e-2


@pytest.mark.parametrize("dtype", HALF)
def test_slot_path_in_half_precision_equals_float32(float32_backbone, dtype):
    """The serving path (pool in the backbone's dtype, prefix materialised once per pass)."""
    half = lpi.load_backbone("tiny", seed=3, dtype=dtype)
    width = float32_backbone.config.vision.width
    generator = torch.Generator().manual_seed(21)
    tasks = {name: _factors(2, 4, 2, width, generator) for name in ("t0", "t1")}
    pool32 = _pool(2, 3, 4, 2, width, torch.float32, generator, tasks)
    pool_half = _pool(2, 3, 4, 2, width, dtype, generator, tasks)
    pixels = random_pixels(float32_backbone, 4, generator)
    with torch.inference_mode(), pool32.lease(["t0", None, "t1", "t0"]) as slots32:
        want = float32_backbone.encode_image(pixels, SlotPrefix(slots32, pool32))
        with pool_half.lease(["t0", None, "t1", "t0"]) as slots_half:
            got = half.encode_image(pixels, SlotPrefix(slots_half, pool_half))
    assert F.cosine_similarity(got, want, dim=-1).min() >= MIN_COSINE


def test_folding_refuses_half_precision_weights(float32_backbone):
    """Folds use the float32 weights; a cast backbone would bake its rounding into the task."""
    prompts = lpi.TaskPrompts.for_backbone(
        lpi.PromptConfig(layers=2, tokens=4, rank=2), float32_backbone
    )
    lpi.fold_task(float32_backbone, prompts)
    half = lpi.load_backbone("tiny", seed=3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs the float32 backbone"):
        lpi.fold_task(half, prompts)
