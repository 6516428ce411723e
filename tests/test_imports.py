"""Import direction: lpi is a torch-only model package (STYLE.md, issue: foundation)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["torchvision", "open_clip", "triton", "fastapi", "qdrant_client", "onnx", "httpx"]


def test_lpi_runs_without_importing_heavy_or_web_packages():
    """Loading a backbone, tokenizing and preprocessing pull in none of HEAVY."""
    code = (
        "import sys, lpi\n"
        "from PIL import Image\n"
        "b = lpi.load_backbone('tiny')\n"
        "b.encode_text(lpi.tokenize(['a dog']))\n"
        "b.encode_image(lpi.preprocess([Image.new('RGB', (5, 9))], 32))\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_import_contracts_hold():
    """import-linter's contracts in pyproject.toml: kernels <- lpi <- export <- server."""
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(lint).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    out = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
