"""The soak benchmark's core, short: a real server process, mixed traffic, swaps every 0.5 s.

`benchmarks/soak.py` runs for minutes; here ten seconds must give no 5xx, no failed swap, no
answer naming a version its task was never given, and the JSON report on disk.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from tests.server_helpers import export_artifacts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def soak(monkeypatch):
    """benchmarks/soak.py as a module (the scripts import `benchkit` from their own folder)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("soak")


def test_a_short_soak_has_no_5xx_and_no_failed_swaps(soak, tiny_runs, tmp_path):
    inbox = tmp_path / "inbox"
    export_artifacts(tiny_runs, inbox)
    out = tmp_path / "results" / "soak.json"
    config = soak.SoakConfig(
        backbone=tiny_runs / "backbone.safetensors",
        inbox=inbox,
        duration_s=10.0,
        swap_interval_s=0.5,
        warmup_s=3.0,
        concurrency=4,
        tasks=2,
        out=out,
    )
    report = soak.run_soak(config)

    assert report["five_xx"] == 0, report["errors"]
    assert report["swaps"]["failed"] == 0, report["swaps"]["failures"]
    assert report["swaps"]["done"] >= 5  # 19 are due; a busy machine may fit fewer
    assert report["wrong_answers"] == 0
    assert all(report["ops"][op]["requests"] > 0 for op in soak.OPS), report["ops"]
    assert report["memory"]["rss"]["warm_mib"] > 0 and report["memory"]["rss"]["end_mib"] > 0
    assert report["server"]["log_errors"] == []
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [p.name for p in out.parent.iterdir()] == ["soak.json"]  # no temp file left


@pytest.mark.parametrize(
    "change",
    [{"duration_s": 0.0}, {"warmup_s": 10.0}, {"swap_interval_s": 0.0}, {"id_space": 1}],
)
def test_soak_settings_are_bounded(soak, change):
    config = soak.SoakConfig(backbone=Path("b"), inbox=Path("i"), duration_s=10.0, warmup_s=3.0)
    with pytest.raises(ValueError):
        soak.SoakConfig(**{**config.__dict__, **change}).check()
