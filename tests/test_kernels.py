"""Prefix attention: reference vs an independent naive twin, fused kernel vs reference, dispatch.

The kernel runs on CPU under Triton's interpreter, so TRITON_INTERPRET=1 is set here, before
anything imports triton. Shapes stay tiny (B <= 4, H <= 2, d <= 64) because the interpreter is
slow; T and N go past one 64-wide tile in a few cases so the kernel's loops run more than once.
What only a GPU compiler checks (tile legality, registers, spills, shared memory) is tested in
tests/test_kernel_compile.py; runs on a real GPU in tests/test_kernel_gpu.py.
Dimensions: B rows, H heads, T tokens, d head size, N prefix tokens, R the padded rank, S slots.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference
from tests.kernel_cases import (
    CASES,
    LOW_PRECISION_CASES,
    MASKS,
    make_inputs,
    naive_prefix_attention,
    requires_triton,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("causal", "padding"), MASKS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_naive(case, causal, padding):
    args, kwargs = make_inputs(case, causal, padding, seed=1)
    out = reference.prefix_attention(*args, **kwargs)
    expected = naive_prefix_attention(*args, **kwargs)
    # fp32 SDPA against float64 loops: inputs and outputs are O(1), so a few fp32 ulps (1.2e-7
    # each) of rounding in the dot products and the softmax stay far below 1e-5.
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_attention_with_prefix_is_differentiable():
    """Training calls the materialised form: gradients must flow to q, k, v and the prefix."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 1, 3, 2, generator=g, dtype=torch.float64) for _ in range(3))
    prefix_k, prefix_v = (torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64) for _ in "kv")
    active = torch.tensor([True, False])
    padding = torch.tensor([[True, False, True], [True, True, True]])
    inputs = [t.requires_grad_() for t in (q, k, v, prefix_k, prefix_v)]

    def attend(q, k, v, prefix_k, prefix_v):
        return reference.attention_with_prefix(q, k, v, prefix_k, prefix_v, active, True, padding)

    assert torch.autograd.gradcheck(attend, inputs)


def test_no_prefix_is_the_frozen_backbone():
    """Slot -1 everywhere (and prefix None) is plain causal attention over the tokens."""
    args, kwargs = make_inputs(CASES[3], causal=True, padding=False)
    args[3].fill_(-1)
    q, k, v = args[:3]
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # The same fp32 SDPA up to the masking route: only summation-order rounding differs.
    torch.testing.assert_close(reference.prefix_attention(*args, **kwargs), expected)
    torch.testing.assert_close(reference.attention_with_prefix(q, k, v, causal=True), expected)


def test_query_that_sees_nothing_gets_zeros():
    args, kwargs = make_inputs(CASES[1], causal=False, padding=True)
    args[3][0] = -1
    kwargs["key_padding_mask"][0] = False  # row 0: no prefix and every key padded
    out = reference.prefix_attention(*args, **kwargs)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1:].abs().sum() > 0


@requires_triton
@pytest.mark.parametrize(("causal", "padding"), MASKS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_reference_fp32(fused, case, causal, padding):
    args, kwargs = make_inputs(case, causal, padding, seed=3)
    out = fused.prefix_attention(*args, **kwargs)
    expected = reference.prefix_attention(*args, **kwargs)
    # Both accumulate in fp32 and differ only in summation order and exp2 vs exp: a few ulps of
    # O(1) values (measured <= 5e-7), so 1e-5 catches any real indexing or masking error.
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@requires_triton
@pytest.mark.parametrize(("causal", "padding"), MASKS)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kernel_matches_reference_low_precision(fused, case, causal, padding, dtype):
    args, kwargs = make_inputs(case, causal, padding, dtype, seed=4)
    out = fused.prefix_attention(*args, **kwargs)
    expected = reference.prefix_attention(*args, **kwargs)
    assert out.dtype == dtype
    # Both round K_p, V_p and the output to `dtype`; the kernel also rounds the softmax weights
    # before P @ V. Outputs lie in (-4, 4): an ulp there is <= 2e-3 in fp16 (10-bit mantissa) and
    # <= 1.6e-2 in bf16 (7-bit), so allow about two ulps.
    tolerance = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)


@requires_triton
def test_kernel_query_that_sees_nothing_gets_zeros(fused):
    args, kwargs = make_inputs(CASES[1], causal=True, padding=True)
    args[3][0] = -1
    kwargs["key_padding_mask"][0] = False
    out = fused.prefix_attention(*args, **kwargs)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # zeros, not NaN
    # fp32 against fp32: summation order only (see test_kernel_matches_reference_fp32).
    torch.testing.assert_close(
        out, reference.prefix_attention(*args, **kwargs), atol=1e-5, rtol=1e-5
    )


@requires_triton
def test_kernel_reads_strided_qkv(fused):
    """q, k, v sliced out of one [B, T, 3, H, d] projection: only the last stride is 1."""
    case = CASES[3]
    args, kwargs = make_inputs(case, causal=True, padding=True, seed=5)
    qkv = torch.randn(case.B, case.T, 3, case.H, case.d, generator=torch.Generator().manual_seed(6))
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, d], not contiguous
    assert not q.is_contiguous()
    out = fused.prefix_attention(q, k, v, *args[3:], **kwargs)
    expected = reference.prefix_attention(q, k, v, *args[3:], **kwargs)
    # fp32 against fp32: summation order only (see test_kernel_matches_reference_fp32).
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@requires_triton
def test_kernel_on_pool_with_zero_padded_ranks(fused):
    """Tasks of rank 2 and 3 in a pool of R' = 5: padding adds nothing to U @ M."""
    g = torch.Generator().manual_seed(7)
    layers, N, H, d, B, T = 2, 6, 2, 8, 4, 9
    pool = kernels.TaskSlotPool(layers, slots=3, tokens=N, rank=5, width=H * d)
    factors = {}
    for task, r in (("cars", 2), ("birds", 3)):
        shapes = [(layers, N, r), (layers, r, H * d)] * 2  # U_K, M_K, U_V, M_V
        factors[task] = [torch.randn(shape, generator=g) for shape in shapes]
        pool.add(task, *factors[task])
    q, k, v = (torch.randn(B, H, T, d, generator=g) for _ in "qkv")
    tasks = ["birds", None, "cars", "birds"]
    with pool.lease(tasks) as slots:
        out = fused.prefix_attention(q, k, v, slots, *pool.layer(1))
    expected = torch.empty_like(out)
    for b, task in enumerate(tasks):
        if task is None:
            expected[b] = F.scaled_dot_product_attention(q[b], k[b], v[b])
            continue
        U_K, M_K, U_V, M_V = (f[1] for f in factors[task])
        prefix_k = (U_K @ M_K).view(N, H, d).transpose(0, 1)  # [H, N, d]
        prefix_v = (U_V @ M_V).view(N, H, d).transpose(0, 1)
        keys, values = torch.cat([prefix_k, k[b]], 1), torch.cat([prefix_v, v[b]], 1)
        expected[b] = F.scaled_dot_product_attention(q[b], keys, values)
    # fp32 against fp32 from the unpadded factors: summation order only.
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@requires_triton
@pytest.mark.parametrize(
    ("position", "bad", "message"),
    [
        (1, lambda t: t.double(), "dtype"),
        (3, lambda t: t.long(), "task_slot"),
        (0, lambda t: t.transpose(2, 3).contiguous().transpose(2, 3), "stride 1"),
        (5, lambda t: t[:, :, :-1], "M_K"),
        (4, lambda t: t[:, :, :-1].contiguous(), "U_K, U_V"),
        (6, lambda t: t.transpose(1, 2).contiguous().transpose(1, 2), "U_V must be contiguous"),
        (3, lambda t: t.new_tensor([0, 3]), r"\[-1, 3\)"),
        (3, lambda t: t.new_tensor([-2, 0]), r"\[-1, 3\)"),
        (2, lambda t: t.to("meta"), "v is on meta"),
    ],
    ids=[
        "dtype",
        "slot-dtype",
        "last-stride",
        "width",
        "rank",
        "pool-layout",
        "slot-past-pool",
        "slot-below-none",
        "device",
    ],
)
@requires_triton
def test_kernel_rejects_bad_inputs(fused, position, bad, message):
    args, kwargs = make_inputs(CASES[1], causal=False, padding=False)
    args = list(args)
    args[position] = bad(args[position])
    with pytest.raises(ValueError, match=message):
        fused.prefix_attention(*args, **kwargs)


def test_kernel_writes_the_layout_merge_heads_wants(fused):
    """[B, H, T, d] returned as a view of [B, T, H, d] memory: merging heads is free."""
    args, kwargs = make_inputs(CASES[3], causal=True, padding=False, seed=8)
    out = fused.prefix_attention(*args, **kwargs)
    assert out.shape == args[0].shape and out.transpose(1, 2).is_contiguous()
    merged = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)  # merge_heads
    assert merged.data_ptr() == out.data_ptr()  # a view, no copy
