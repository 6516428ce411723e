"""The SDK builds as its own distribution (sdk/): httpx and pydantic, no torch, no server."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_sdk_wheel_holds_the_client_and_the_schema_only(tmp_path):
    pytest.importorskip("setuptools")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT / "sdk"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("lpi_serve_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        meta = next(n for n in names if n.endswith("METADATA"))
        requires = [
            line
            for line in archive.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist") and "extra ==" not in line
        ]
    modules = {n for n in names if n.endswith(".py")}
    assert {"clients/sync.py", "clients/aio.py", "clients/cli.py", "wire/schema.py"} <= modules
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"clients", "wire"}  # no `server`, `lpi`, `kernels` or `export`
    assert not any(n.startswith("clients/load/") for n in names)
    names = sorted(r.split(":")[1].split(">")[0].strip() for r in requires)
    assert names == ["httpx", "pydantic", "sniffio"]
