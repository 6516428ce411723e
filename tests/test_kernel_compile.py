"""What the GPU compiler enforces, checked without a GPU: the variant the runtime launches (its
16-byte alignment specialisation included) compiled for sm_80 and sm_90 by `kernels.aot`.

The interpreter hides registers, spills, shared memory and tile legality. Every tile config the
autotuner may pick is compiled in bf16 for both towers (fp16 allocates the same registers: the
dtypes differ only in the dot's input type); fp16 and fp32 compile their first config. The
compiles run in one child process, since this test session runs triton under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
TOWERS = ("image", "text")
SMEM_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}  # the most one block may take


def _ptxas_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    root = Path(importlib.util.find_spec("triton").origin).parent
    return (root / "backends" / "nvidia" / "bin" / "ptxas").exists()


pytestmark = pytest.mark.skipif(
    not _ptxas_available(),
    reason="triton's NVIDIA backend (with ptxas) is not installed: nothing compiles for a GPU",
)


def _aot(*flags: str, tmp: Path) -> list[dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(REPO), "TRITON_CACHE_DIR": str(tmp)}
    done = subprocess.run(
        [sys.executable, "-m", "kernels.aot", *flags], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("triton-cache")
    return _aot("--dtype", "bf16", tmp=tmp) + _aot("--dtype", "fp16", "fp32", "--first", tmp=tmp)


def _group(compiled: list[dict], arch: int, dtype: str, tower: str) -> list[dict]:
    found = [v for v in compiled if (v["arch"], v["dtype"], v["tower"]) == (arch, dtype, tower)]
    assert found, f"nothing compiled for sm_{arch} {dtype} {tower}"
    return found


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_half_precision_tile_compiles_without_spills(compiled, arch, tower):
    from kernels import tiles as kernel_tiles

    found = _group(compiled, arch, "bf16", tower)
    configs = kernel_tiles.tile_configs()
    tokens = 197 if tower == "image" else 77
    expected = kernel_tiles.candidate_tiles(configs, tokens, torch.bfloat16, arch)
    assert len(found) == len(expected) > 1
    for variant in found + _group(compiled, arch, "fp16", tower):
        tiles = {k: variant[k] for k in ("block_m", "block_n", "warps", "stages")}
        assert variant["spill_stores"] == variant["spill_loads"] == 0, (tiles, variant)
        assert variant["registers"] <= 255, tiles
        assert 0 < variant["shared_bytes"] <= SMEM_PER_BLOCK[arch], tiles
        assert variant["blocks_per_sm"] >= 1, tiles


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_lightest_half_tile_keeps_several_blocks_per_sm(compiled, arch, tower):
    """Among the candidates, the lightest keeps >= 2 blocks (>= 8 warps) resident per SM, so
    an SM overlaps several programs' loads whatever the autotuner picks for small batches."""
    found = _group(compiled, arch, "bf16", tower)
    assert max(v["blocks_per_sm"] * v["warps"] for v in found) >= 8, found


@pytest.mark.parametrize("arch", ARCHS)
def test_the_runtime_variant_is_the_one_compiled(compiled, arch):
    """q, k, v sliced from the backbone's [B, T, 3*H*d] projection: every pointer and every
    row/head/token stride is 16-byte divisible, as in a real launch (the old test compiled a
    variant without this specialisation)."""
    variant = _group(compiled, arch, "bf16", "image")[0]
    expected = {"Q", "K", "V", "Out", "UK", "MK", "UV", "MV", "stride_qb", "stride_qt"}
    assert expected <= set(variant["aligned_args"]), variant["aligned_args"]


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_compiles_in_both_precisions(compiled, arch, tower):
    """fp32 is the slow path (bf16 is the GPU default): both dot precisions must compile and fit
    one block per SM; their register pressure is reported by the compile table, not bounded."""
    found = _group(compiled, arch, "fp32", tower)
    assert {v["precision"] for v in found} == {"ieee", "tf32x3"}
    for variant in found:
        assert (variant["block_m"], variant["warps"]) == (64, 8)
        assert variant["blocks_per_sm"] >= 1 and variant["shared_bytes"] <= SMEM_PER_BLOCK[arch]
