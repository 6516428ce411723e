"""Prefix attention beyond its values: which backend the dispatch picks, that importing
kernels never imports triton, what is refused before a launch, the launch limits (1-D grid,
64-bit offsets) and the autotuner's keys. The kernel runs under Triton's interpreter here.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import dispatch, reference, tiles
from tests.kernel_cases import CASES, Case, make_inputs, requires_triton

REPO = Path(__file__).resolve().parents[1]


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


def _launch(fused, tokens: int, padding: bool):
    """launch_args of a small CPU case, without the interpreter's fixed tiles (the GPU's way)."""
    inputs, kwargs = make_inputs(Case(B=2, H=1, T=tokens, d=16, N=4, R=2), False, padding)
    args, meta = fused.launch_args(*inputs, kwargs["causal"], kwargs["key_padding_mask"])
    return inputs[0], args, {k: v for k, v in meta.items() if k not in ("BLOCK_M", "BLOCK_N")}


@requires_triton
def test_tuning_keys_separate_t_buckets_key_masks_and_gpus(fused):
    def key(tokens, padding=False, arch=90):
        q, args, meta = _launch(fused, tokens, padding)
        return tiles.tuning_key(arch, tokens, args[-2], args[-5], args[-4], meta, q.dtype)

    assert key(50) == key(60) != key(150)  # buckets 64 and 256
    assert key(50) != key(50, padding=True)
    assert key(50, arch=80) != key(50, arch=90)
    configs = tiles.tile_configs()  # within a bucket the candidates are the same: one tuning
    for dtype in (torch.float16, torch.float32):
        assert tiles.candidate_tiles(configs, 50, dtype, 90) == tiles.candidate_tiles(
            configs, 64, dtype, 90
        )
    assert fused._tuner(90, 64) is fused._tuner(90, 64)
    assert fused._tuner(90, 64) is not fused._tuner(90, 256)
    assert fused._tuner(80, 64) is not fused._tuner(90, 64)
    assert "HAS_KEY_MASK" in fused._tuner(90, 64).keys


@requires_triton
def test_each_key_gets_its_own_tuning(fused, monkeypatch):
    """The launcher's bookkeeping, on the CPU with a stand-in autotuner and kernel: the first
    launch per (GPU, T bucket, key mask, ...) tunes; a later T of the same bucket reuses it."""
    import triton

    tuned, reused, arch = [], [], [90]

    class Tuner:
        def __init__(self, arch: int, bucket: int):
            self.arch, self.bucket = arch, bucket

        def __getitem__(self, grid):
            def launch(*args, **meta):
                tuned.append((self.arch, self.bucket, meta["HAS_KEY_MASK"]))
                self.best_config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4)

            return launch

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: reused.append(meta["BLOCK_M"])

    monkeypatch.setattr(fused, "_tuner", functools.cache(Tuner))
    monkeypatch.setattr(fused, "_prefix_attention_kernel", Kernel())
    monkeypatch.setattr(fused, "_best", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: divmod(arch[0], 10))
    for tokens, padding, gpu in [
        (50, False, 90),
        (60, False, 90),
        (150, False, 90),
        (50, True, 90),
        (50, False, 80),
        (64, False, 80),
    ]:
        arch[0] = gpu
        q, args, meta = _launch(fused, tokens, padding)
        fused._launch_tuned(q, args, meta)
    assert tuned == [(90, 64, False), (90, 256, False), (90, 64, True), (80, 64, False)]
    assert reused == [64, 64]  # T=60 on sm_90 and T=64 on sm_80: their buckets' tiles
