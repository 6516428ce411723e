"""Shared by the prefix-attention tests: the shape cases, fresh random inputs, an independent
float64 twin, and whether triton can run under the interpreter.

Dimensions: B rows, H heads, T tokens, d head size, N prefix tokens, R the padded rank, S slots.
"""

import importlib.util
import math
from dataclasses import dataclass

import pytest
import torch

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
