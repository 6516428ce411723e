"""Import direction: lpi is a torch-only model package, and the import contracts hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["torchvision", "open_clip", "timm", "triton", "fastapi", "qdrant_client", "onnx", "httpx"]


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


def test_serving_and_training_load_no_open_clip_torchvision_or_timm():
    """The light runtime: the server app and every lpi module, training included, import none
    of the three, and neither does tokenizing (the vocabulary ships with lpi)."""
    code = (
        "import importlib, pkgutil, sys, lpi, server.app\n"
        "for module in pkgutil.walk_packages(lpi.__path__, 'lpi.'):\n"
        "    if not module.name.endswith('__main__'):\n"
        "        importlib.import_module(module.name)\n"
        "lpi.tokenize(['a photo of a dog', 'caf\\u00e9 \\U0001f436'])\n"
        "print(sorted(m for m in ('open_clip', 'torchvision', 'timm') if m in sys.modules))\n"
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
