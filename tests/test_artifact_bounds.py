"""Work an artifact can demand before it is refused stays bounded (export/checks.py).

A few MiB of factors can claim a [1024, 4096, D] prefix: the backbone's depth and widths are
checked before anything whose work grows with the header's shapes, the header's ranks must be
the tensors', and the prefix bound is never formed whole. The bound is compared with the
product in float64 on fresh random factors (tolerance 1e-12 relative: the same float64 sums,
grouped in other blocks).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import export.artifact
import export.checks
import lpi
from export.artifact import ArtifactShapeError, BackboneMismatchError, read_artifact
from export.checks import PREFIX_LIMIT, check_prefix, largest_prefix
from lpi import FoldedTask, FoldedTower
from server.app import create_app
from tests.artifact_edits import (
    ADMIN,
    OCTETS,
    artifact_bytes,
    random_folded,
    read_raw,
    seal,
    write_raw,
)
from tests.server_helpers import export_artifacts, run, running
from tests.server_helpers import settings as base_settings

MIB = 1 << 20


@pytest.fixture(scope="module")
def backbone():
    return lpi.load_backbone("tiny", seed=5)


@pytest.fixture(scope="module")
def written(backbone, tmp_path_factory):
    path = tmp_path_factory.mktemp("written") / "task.safetensors"
    return export.write_artifact(path, "Task", random_folded(backbone, 11), backbone)


def hostile_parts(backbone, meta: dict) -> tuple[dict, dict]:
    """~20 MiB of fp16 factors claiming J=1024, N=4096 (a [1024, 4096, 64] float64 product is
    2 GiB; at ViT-B's width 768 it is 24 GiB), the text tower of rank 0 (no bytes at all)."""
    layers, tokens = 1024, 4096
    widths = {"image": backbone.config.vision.width, "text": backbone.config.text.width}
    tensors = {}
    for tower, rank in (("image", 1), ("text", 0)):
        for part in ("key", "value"):
            tensors[f"{tower}.{part}_u"] = torch.ones(layers, tokens, rank, dtype=torch.float16)
            tensors[f"{tower}.{part}_m"] = torch.ones(layers, rank, widths[tower]).half()
    header = meta | {"layers": layers, "tokens": tokens, "rank_image": 1, "rank_text": 0}
    return seal(header, tensors), tensors


def _no_product(*args, **kwargs):
    raise AssertionError("a prefix product was formed before the backbone check")


def test_a_hostile_shape_is_refused_before_any_prefix_product(
    backbone, written, tmp_path, monkeypatch
):
    monkeypatch.setattr(export.artifact, "check_prefix", _no_product)
    monkeypatch.setattr(export.checks, "largest_prefix", _no_product)
    meta, _ = read_raw(written.path)
    path = write_raw(tmp_path / "hostile.safetensors", *hostile_parts(backbone, meta))
    assert path.stat().st_size < 24 * MIB
    with pytest.raises(BackboneMismatchError, match="exceeds the backbone depth") as refused:
        read_artifact(path, backbone)
    assert refused.value.field == "artifact.layers"


def test_the_server_answers_422_naming_the_field(tiny_runs, tmp_path, monkeypatch):
    """Through PUT /tasks: 422 artifact.layers, and no prefix product on the way."""
    good = export_artifacts(tiny_runs, tmp_path / "exported")["lpi"][0]
    meta, _ = read_raw(good)
    body = artifact_bytes(
        *hostile_parts(lpi.load_backbone(tiny_runs / "backbone.safetensors"), meta)
    )
    (tmp_path / "inbox").mkdir()
    settings = base_settings(
        tiny_runs,
        tmp_path / "data",
        tmp_path / "inbox",
        admin_key="admin-secret",
        api_key="query-secret",
    )

    async def scenario():
        async with running(create_app(settings)) as client:
            monkeypatch.setattr(export.artifact, "check_prefix", _no_product)
            monkeypatch.setattr(export.checks, "largest_prefix", _no_product)
            return await client.put("/tasks/t", content=body, headers=ADMIN | OCTETS)

    answer = run(scenario())
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["field"] == "artifact.layers", answer.text


@pytest.mark.parametrize("tower", ["image", "text"])
def test_the_header_rank_must_be_the_tensors_rank(backbone, written, tmp_path, tower):
    meta, tensors = read_raw(written.path)
    rank = tensors[f"{tower}.key_u"].shape[-1]
    path = write_raw(
        tmp_path / "x.safetensors", seal(meta | {f"rank_{tower}": rank + 1}, tensors), tensors
    )
    with pytest.raises(ArtifactShapeError, match=f"rank_{tower}") as refused:
        read_artifact(path, backbone)
    assert refused.value.field == f"artifact.rank_{tower}"


def test_a_rank_beyond_the_width_is_refused(backbone, written, tmp_path):
    meta, tensors = read_raw(written.path)
    layers = tensors["image.key_u"].shape[0]
    rank, width = backbone.config.vision.width + 1, backbone.config.vision.width
    for part in ("key", "value"):  # zero-padded ranks: the same prefix, only wider
        tensors[f"image.{part}_u"] = torch.nn.functional.pad(
            tensors[f"image.{part}_u"], (0, rank - tensors[f"image.{part}_u"].shape[-1])
        )
        tensors[f"image.{part}_m"] = torch.cat(
            [
                tensors[f"image.{part}_m"],
                torch.zeros(layers, rank - tensors[f"image.{part}_m"].shape[1], width),
            ],
            dim=1,
        )
    path = write_raw(
        tmp_path / "x.safetensors", seal(meta | {"rank_image": rank}, tensors), tensors
    )
    with pytest.raises(ArtifactShapeError, match="more than the width") as refused:
        read_artifact(path, backbone)
    assert refused.value.field == "artifact.rank_image"


def _exact(u: torch.Tensor, m: torch.Tensor) -> float:
    """The independent reference: the whole product in float64."""
    return float((u.double() @ m.double()).abs().max())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("layers", "tokens", "rank", "width"), [(1, 1, 1, 1), (3, 7, 5, 33), (2, 300, 9, 64)]
)
def test_the_bound_is_the_product_where_it_decides(seed, layers, tokens, rank, width, monkeypatch):
    """Past the limit it returns an entry of the product past it (the largest when only the
    largest passes); below, a bound between the largest and the limit. A small chunk makes
    every product run in several row blocks."""
    monkeypatch.setattr(export.checks, "PREFIX_CHUNK", 2 * width)
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(layers, tokens, rank, generator=generator)
    m = torch.randn(layers, rank, width, generator=generator)
    exact = _exact(u, m)
    over = largest_prefix(u, m, limit=exact / 2)
    assert exact / 2 < over <= exact * (1 + 1e-12)
    only_the_largest = largest_prefix(u, m, limit=exact * (1 - 1e-9))
    assert abs(only_the_largest - exact) <= 1e-12 * exact
    under = largest_prefix(u, m, limit=exact * 4)
    assert exact * (1 - 1e-12) <= under <= exact * 4


def test_cancelling_factors_pass_and_large_prefixes_do_not():
    """Factors whose cheap bound passes the limit while their product stays small are
    accepted (the exact path decides); a product past the limit is refused, naming a factor."""
    generator = torch.Generator().manual_seed(4)
    u = torch.rand(2, 6, 1, generator=generator).repeat(1, 1, 2) * 1000  # [J, N, 2]: equal columns
    m = torch.rand(2, 1, 16, generator=generator) * 1000
    m = torch.cat([m, -m + 1e-3], dim=1)  # [J, 2, D]: the columns cancel but for 1e-3
    assert _exact(u, m) < 10 and float((u.abs() @ m.abs().amax(-1, keepdim=True)).max()) > 1e5
    tower = FoldedTower(u, m, u, m)
    check_prefix("a", FoldedTask(tower, tower))
    assert _exact(u, m + 100) > PREFIX_LIMIT  # each key u * (200 + 1e-3)
    big = FoldedTower(u, m + 100, u, m)
    with pytest.raises(export.artifact.ArtifactValueError, match="image prefix keys") as refused:
        check_prefix("a", FoldedTask(big, tower))
    assert refused.value.field in ("artifact.image.key_u", "artifact.image.key_m")


def test_the_bound_never_forms_the_product_whole():
    """Peak memory of the bound on a [16, 4096, 768] prefix whose cheap bound cannot decide:
    the whole product in float64 is 384 MiB (and its abs as much again); one layer 24 MiB.
    Measured in a fresh process (ru_maxrss is a high-water mark; this one's is spent)."""
    script = textwrap.dedent("""
        import resource, torch
        from export.checks import largest_prefix
        u = torch.ones(16, 4096, 2)  # [J, N, R']: equal columns
        m = torch.cat([torch.ones(16, 1, 768), -torch.ones(16, 1, 768)], dim=1) * 1e5
        largest_prefix(u[:1], m[:1])  # warm torch's allocator and kernels on one layer
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert largest_prefix(u, m) == 0.0
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    grown_mib = int(done.stdout.strip())
    assert grown_mib < 96, f"peak memory grew by {grown_mib} MiB"
