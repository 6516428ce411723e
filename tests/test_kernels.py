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

import importlib.util
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import dispatch, reference

REPO = Path(__file__).resolve().parents[1]
requires_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed, so the fused kernel cannot run even under TRITON_INTERPRET=1",
)


@dataclass(frozen=True)
class Case:
    B: int
    H: int
    T: int
    d: int
    N: int
    R: int
    S: int = 3

    def __str__(self) -> str:
        return f"B{self.B}-H{self.H}-T{self.T}-d{self.d}-N{self.N}-R{self.R}-S{self.S}"


# Head sizes 4..64 (24 is not a power of two), ranks 1..17, prefixes 1..70, T 1..70 with 5, 7, 17.
CASES = [
    Case(B=1, H=1, T=1, d=4, N=1, R=1, S=1),
    Case(B=2, H=2, T=5, d=8, N=4, R=2),
    Case(B=3, H=1, T=7, d=16, N=16, R=5),
    Case(B=4, H=2, T=17, d=32, N=7, R=16),
    Case(B=3, H=2, T=20, d=24, N=3, R=17),
    Case(B=2, H=1, T=70, d=8, N=5, R=3),  # two token tiles: the causal cut-off between tiles
    Case(B=2, H=1, T=6, d=8, N=70, R=4),  # two prefix tiles
    Case(B=4, H=2, T=16, d=16, N=16, R=5, S=6),
    Case(B=2, H=1, T=9, d=64, N=16, R=16),  # ViT-B's head size, a dense (U = I sized) rank
]
LOW_PRECISION_CASES = [CASES[1], CASES[3], CASES[4], CASES[5], CASES[8]]
MASKS = [(False, False), (True, False), (False, True), (True, True)]  # (causal, padding)


def make_inputs(case: Case, causal: bool, padding: bool, dtype=torch.float32, seed: int = 0):
    """Fresh random inputs; slots mix -1 and pool slots; pool entries K_p ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    B, H, T, d, N, R, S = case.B, case.H, case.T, case.d, case.N, case.R, case.S

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    q, k, v = randn(B, H, T, d), randn(B, H, T, d), randn(B, H, T, d)
    U_K, M_K = randn(S, N, R, scale=R**-0.5), randn(S, R, H * d)
    U_V, M_V = randn(S, N, R, scale=R**-0.5), randn(S, R, H * d)
    slots = torch.randint(-1, S, (B,), generator=g, dtype=torch.int32)
    if B > 1:
        slots[0], slots[-1] = -1, S - 1
    mask = None
    if padding:
        mask = torch.rand(B, T, generator=g) < 0.7
        mask[:, 0] = True
    return (q, k, v, slots, U_K, M_K, U_V, M_V), {"causal": causal, "key_padding_mask": mask}


def naive_prefix_attention(q, k, v, slots, U_K, M_K, U_V, M_V, causal, key_padding_mask):
    """Row by row, head by head, explicit softmax in float64; shares no code with the reference."""
    B, H, T, d = q.shape
    out = torch.zeros(B, H, T, d, dtype=torch.float64)
    for b in range(B):
        seen = torch.ones(T, T, dtype=torch.bool)
        if key_padding_mask is not None:
            seen &= key_padding_mask[b][None, :]
        if causal:
            seen &= torch.ones(T, T, dtype=torch.bool).tril()
        for h in range(H):
            keys, values, visible = k[b, h].double(), v[b, h].double(), seen
            if slots[b] >= 0:
                s, cols = int(slots[b]), slice(h * d, (h + 1) * d)
                prefix_k = torch.einsum("nr,rd->nd", U_K[s].double(), M_K[s, :, cols].double())
                prefix_v = torch.einsum("nr,rd->nd", U_V[s].double(), M_V[s, :, cols].double())
                keys, values = torch.cat([prefix_k, keys]), torch.cat([prefix_v, values])
                visible = torch.cat([torch.ones(T, len(prefix_k), dtype=torch.bool), seen], 1)
            scores = torch.einsum("td,nd->tn", q[b, h].double(), keys) / math.sqrt(d)
            for t in range(T):
                if visible[t].any():
                    row = scores[t][visible[t]]
                    weights = torch.exp(row - row.max())
                    out[b, h, t] = (weights / weights.sum()) @ values[visible[t]]
    return out


@pytest.fixture(scope="module")
def fused():
    """The kernel module, imported under the interpreter (skip if triton came in without it)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from triton.runtime.interpreter import InterpretedFunction

    from kernels import triton_prefix_attention

    if not isinstance(triton_prefix_attention._prefix_attention_kernel, InterpretedFunction):
        pytest.skip("kernels.triton_prefix_attention was imported before TRITON_INTERPRET=1")
    return triton_prefix_attention


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


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    assert kernels.attention_backend(torch.device("cpu")) == "reference"
    args, kwargs = make_inputs(CASES[2], causal=True, padding=True)
    expected = reference.prefix_attention(*args, **kwargs)
    assert torch.equal(kernels.prefix_attention(*args, **kwargs), expected)


def test_dispatch_gradients_need_the_reference(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "auto")
    assert kernels.attention_backend(torch.device("cuda"), needs_grad=True) == "reference"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match="no backward"):
        kernels.attention_backend(torch.device("cuda"), needs_grad=True)


@requires_triton
def test_dispatch_env_forces_triton_under_interpreter(monkeypatch, fused):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    calls = []
    launcher = fused.prefix_attention
    monkeypatch.setattr(
        fused, "prefix_attention", lambda *a, **kw: calls.append(1) or launcher(*a, **kw)
    )
    args, kwargs = make_inputs(CASES[2], causal=False, padding=True)
    out = kernels.prefix_attention(*args, **kwargs)
    assert calls, "LPI_ATTENTION_BACKEND=triton did not reach the Triton launcher"
    # fp32 against fp32: summation order only (see test_kernel_matches_reference_fp32).
    torch.testing.assert_close(
        out, reference.prefix_attention(*args, **kwargs), atol=1e-5, rtol=1e-5
    )


def test_dispatch_env_errors(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="auto, triton, reference"):
        kernels.attention_backend(torch.device("cpu"))
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    if importlib.util.find_spec("triton") is not None:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            kernels.attention_backend(torch.device("cpu"))


def test_import_kernels_never_imports_triton():
    """`import kernels` and the CPU path work with triton absent (blocked from importing)."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "q = torch.randn(2, 1, 3, 4)\n"
        "pool = [torch.randn(1, 2, 1), torch.randn(1, 1, 4)] * 2\n"
        "slots = torch.tensor([0, -1], dtype=torch.int32)\n"
        "out = kernels.prefix_attention(q, q, q, slots, *pool, causal=True)\n"
        "assert out.shape == q.shape and sys.modules['triton'] is None\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(dispatch.BACKEND_ENV, None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@requires_triton
def test_kernel_writes_the_layout_merge_heads_wants(fused):
    """[B, H, T, d] returned as a view of [B, T, H, d] memory: merging heads is free."""
    args, kwargs = make_inputs(CASES[3], causal=True, padding=False, seed=8)
    out = fused.prefix_attention(*args, **kwargs)
    assert out.shape == args[0].shape and out.transpose(1, 2).is_contiguous()
    merged = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)  # merge_heads
    assert merged.data_ptr() == out.data_ptr()  # a view, no copy


@pytest.mark.parametrize(
    ("position", "bad", "message"),
    [
        (3, lambda t: t.new_tensor([0, 3]), r"\[-1, 3\)"),
        (3, lambda t: t.new_tensor([-2, 0]), r"\[-1, 3\)"),
        (2, lambda t: t.to("meta"), "v is on meta"),
    ],
    ids=["slot-past-pool", "slot-below-none", "device"],
)
def test_reference_rejects_bad_inputs(position, bad, message):
    args, kwargs = make_inputs(CASES[1], causal=False, padding=False)
    args = list(args)
    args[position] = bad(args[position])
    with pytest.raises(ValueError, match=message):
        reference.prefix_attention(*args, **kwargs)


@pytest.mark.parametrize("use_kernel", [False, True], ids=["reference", "kernel"])
def test_key_padding_mask_on_another_device_is_refused(use_kernel, request):
    """The reference and the kernel agree: the mask must sit with q (it used to pass one and
    not the other)."""
    args, kwargs = make_inputs(CASES[1], causal=False, padding=True)
    kwargs["key_padding_mask"] = kwargs["key_padding_mask"].to("meta")
    attend = request.getfixturevalue("fused").prefix_attention if use_kernel else None
    with pytest.raises(ValueError, match="key_padding_mask is on meta"):
        (attend or reference.prefix_attention)(*args, **kwargs)


def test_reference_past_the_grid_limit():
    """B*H = 65,544 > 65,535 (CUDA's grid-y cap, which the kernel's 1-D grid avoids): each row
    still equals the same row attended alone."""
    B, H, T, d, N, R = 5462, 12, 2, 4, 3, 2
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(B, H, T, d, generator=g) for _ in "qkv")
    pool = [torch.randn(2, N, R, generator=g), torch.randn(2, R, H * d, generator=g)] * 2
    slots = (torch.arange(B) % 3 - 1).to(torch.int32)
    out = reference.prefix_attention(q, k, v, slots, *pool, causal=True)
    tail = slice(B - 3, B)
    alone = reference.prefix_attention(q[tail], k[tail], v[tail], slots[tail], *pool, causal=True)
    # The same fp32 SDPA on the same rows: only batching order could differ.
    torch.testing.assert_close(out[tail], alone, atol=1e-6, rtol=1e-6)


@requires_triton
def test_launch_limits_on_shapes_alone(fused):
    """Meta tensors (shapes and strides, no memory): a batch past 2^31 elements and past 65,535
    row-heads passes the checks with a 1-D grid; a single row past 32-bit offsets is refused."""
    B, H, T, d, N, R, S = 5600, 12, 197, 64, 16, 5, 4
    qkv = torch.empty(B, T, 3 * H * d, device="meta", dtype=torch.float16)
    q, k, v = (t.view(B, T, H, d).transpose(1, 2) for t in qkv.chunk(3, -1))
    assert B * T * 3 * H * d > 2**31 and B * H > 65_535
    pool = [torch.empty(S, N, R, device="meta"), torch.empty(S, R, H * d, device="meta")] * 2
    slots = torch.empty(B, dtype=torch.int32, device="meta")
    fused.check_kernel_layout(q, k, v, slots, *pool)
    assert fused._programs(q, 64) == 4 * B * H  # one axis: CUDA allows 2^31 - 1 programs
    wide = torch.empty(1, 1, 2**20, 2**12, device="meta").transpose(1, 2)  # a 2^32-element row
    with pytest.raises(ValueError, match="past 32-bit offsets"):
        fused.check_kernel_layout(wide, wide, wide, slots[:1], *pool)
