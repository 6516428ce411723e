"""The fused kernel on a real GPU: serving shapes, half precision, the limits, the device guard.

Skipped without CUDA (the CPU suite runs the kernel under the interpreter instead). Dimensions:
B rows, H heads, T tokens, d head size, N prefix tokens, R the padded rank, S slots.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import lpi
from kernels import TaskSlotPool, reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs a CUDA device and triton (the CPU suite covers the kernel under the interpreter)",
)
# K_p, V_p, P and the output are rounded to the dtype on both sides; outputs lie within about
# +-4, where an ulp is 4e-3 (fp16) or 3e-2 (bf16): allow one or two.
TOLERANCE = {torch.float16: 6e-3, torch.bfloat16: 5e-2, torch.float32: 2e-5}


def inputs(B, T, dtype, device="cuda", H=12, d=64, N=16, R=5, S=4, seed=0, layout="qkv"):
    """q, k, v sliced from one [B, T, 3*H*d] projection (the backbone's layout); slots mix -1."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    qkv = randn(B, T, 3 * H * d)
    q, k, v = (t.view(B, T, H, d).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    pool = [randn(S, N, R, scale=R**-0.5), randn(S, R, H * d)] * 2
    slots = torch.randint(-1, S, (B,), generator=g, device=device, dtype=torch.int32)
    return q, k, v, slots, *pool


@pytest.fixture(scope="module")
def fused():
    from kernels import triton_prefix_attention

    return triton_prefix_attention


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("T", "causal"), [(197, False), (77, True)], ids=["image", "text"])
def test_serving_shapes_match_reference(fused, dtype, T, causal):
    args = inputs(64, T, dtype)
    out = fused.prefix_attention(*args, causal=causal)
    expected = reference.prefix_attention(*args, causal=causal)
    error = (out.float() - expected.float()).abs().max().item()
    assert error <= TOLERANCE[dtype], error


def test_tf32x3_is_close_to_ieee(fused):
    args = inputs(8, 197, torch.float32)
    exact = fused.prefix_attention(*args, fp32_precision="ieee")
    tf32x3 = fused.prefix_attention(*args, fp32_precision="tf32x3")
    # Three TF32 products recover about fp32's 24 bits: 1e-4 on O(1) outputs.
    torch.testing.assert_close(tf32x3, exact, atol=1e-4, rtol=1e-4)


def test_offsets_past_two_to_the_31(fused):
    """B = 4,800 at T = 197: the [B, T, 3*H*d] projection holds 2.2e9 elements."""
    B = 4800
    args = inputs(B, 197, torch.float16)
    assert args[0].storage_offset() + B * args[0].stride(0) > 2**31
    out = fused.prefix_attention(*args)
    tail = slice(B - 32, B)
    sub = [t[tail] if t.shape[0] == B else t for t in args]
    error = (out[tail].float() - reference.prefix_attention(*sub).float()).abs().max().item()
    assert error <= TOLERANCE[torch.float16], error


def test_grid_past_65535_row_heads(fused):
    B = 5500  # B*H = 66,000
    args = inputs(B, 9, torch.float16)
    out = fused.prefix_attention(*args)
    error = (out.float() - reference.prefix_attention(*args).float()).abs().max().item()
    assert error <= TOLERANCE[torch.float16], error


def test_slot_outside_the_pool_gives_nan_not_a_crash(fused):
    q, k, v, slots, *pool = inputs(4, 77, torch.float16)
    slots = torch.tensor([0, 7, -1, -3], dtype=torch.int32, device="cuda")
    out = fused.prefix_attention(q, k, v, slots, *pool, causal=True)
    torch.cuda.synchronize()  # an illegal address would raise here
    assert out[1].isnan().all() and out[3].isnan().all()
    assert out[0].isfinite().all() and out[2].isfinite().all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_device(fused):
    args = inputs(4, 77, torch.float16, device="cuda:1")
    assert torch.cuda.current_device() == 0
    out = fused.prefix_attention(*args, causal=True)
    torch.cuda.synchronize("cuda:1")
    expected = reference.prefix_attention(*args, causal=True)
    assert (out.float() - expected.float()).abs().max().item() <= TOLERANCE[torch.float16]


def test_graphed_engine_equals_eager(tiny_backbone, generator):
    """The engine's CUDA-graph replay gives the eager vectors (same kernels, same dtype)."""
    import copy

    from server.graphs import GraphedEncoders
    from tests.conftest import random_pixels

    backbone = copy.deepcopy(tiny_backbone).to("cuda", torch.bfloat16).eval()
    cfg = backbone.config.vision
    pool_args = (cfg.layers, 4, 3, 5, cfg.width)
    pool = TaskSlotPool(*pool_args, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    shapes = [(cfg.layers, 3, 4), (cfg.layers, 4, cfg.width)] * 2
    pool.add("a", *(torch.randn(s, generator=g) for s in shapes))
    graphs = GraphedEncoders(backbone, max_batch=8)
    pixels = random_pixels(backbone, 5, generator).to("cuda")
    with torch.inference_mode(), pool.lease(["a", None, "a", None, "a"]) as slots:
        eager = torch.nn.functional.normalize(
            backbone.visual(pixels, lpi.SlotPrefix(slots, pool)), dim=-1
        )
        replayed = graphs.run("image", pixels, slots, pool)
        replayed_again = graphs.run("image", pixels, slots, pool)
    assert torch.equal(replayed, replayed_again)
    # bf16 features, unit norm; the graph pads to 8 rows, which changes no real row.
    assert (replayed.float() - eager.float()).abs().max().item() <= 1e-2
