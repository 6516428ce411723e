"""Prefix attention: reference vs an independent naive twin, fused kernel vs reference, dispatch.

The kernel runs on CPU under Triton's interpreter, so TRITON_INTERPRET=1 is set here, before
anything imports triton. Shapes stay tiny (B <= 4, H <= 2, d <= 64) because the interpreter is
slow; T and N go past one 64-wide tile in a few cases so the kernel's loops run more than once.
Without a GPU, a subprocess also compiles the kernel for sm_80 and sm_90 (no interpreter) to
catch what only the GPU compiler checks, such as tl.dot's minimum tile sizes.
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
    ],
    ids=["dtype", "slot-dtype", "last-stride", "width", "rank"],
)
@requires_triton
def test_kernel_rejects_bad_inputs(fused, position, bad, message):
    args, kwargs = make_inputs(CASES[1], causal=False, padding=False)
    args = list(args)
    args[position] = bad(args[position])
    with pytest.raises(ValueError, match=message):
        fused.prefix_attention(*args, **kwargs)


COMPILE_FOR_GPUS = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import triton_prefix_attention as fused

kernel = fused._prefix_attention_kernel
pointers = {"Q", "K", "V", "Out", "UK", "MK", "UV", "MV"}
for arch, dtype, causal, masked, (T, N, R, d) in [
    (90, "fp16", True, True, (77, 16, 5, 64)),
    (90, "bf16", False, False, (197, 16, 16, 64)),
    (90, "fp32", True, True, (5, 3, 1, 4)),
    (80, "fp16", True, True, (20, 70, 17, 24)),
]:
    flags = {"CAUSAL": causal, "HAS_KEY_MASK": masked, "DOT_FP32": False}
    constants = {**flags, **fused.block_sizes(T, N, R, d)}
    signature = {
        name: "constexpr" if name in constants
        else "*" + dtype if name in pointers
        else "*i32" if name == "Slot"
        else "*u8" if name == "KeyMask"
        else "fp32" if name == "qk_scale"
        else "i32"
        for name in kernel.arg_names
    }
    constexprs = {(kernel.arg_names.index(n),): v for n, v in constants.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    warps = 8 if dtype == "fp32" else 4
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
"""


@requires_triton
def test_kernel_compiles_for_gpus(tmp_path):
    """tl.dot tile minimums, dtypes and layouts are checked only by the GPU compiler, not the
    interpreter: compile for Ampere and Hopper (ptxas ships with triton; no GPU is needed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_CACHE_DIR": str(tmp_path)}
    env.pop("TRITON_INTERPRET")
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_GPUS], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


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
