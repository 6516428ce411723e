"""Stages the SDK's modules from the repository root and packages them: `clients` (without
the load script, which needs numpy and PIL) and `wire`, the wire schema (pydantic alone)."""

import shutil
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STAGE = HERE / "staged"
SDK_FILES = [
    *(f"clients/{name}.py" for name in ("__init__", "__main__", "aio", "base", "cli", "errors")),
    *(f"clients/{name}.py" for name in ("calls", "cli_inputs", "output", "tables", "sync")),
    "clients/py.typed",
    "wire/__init__.py",
    "wire/openai.py",
    "wire/payloads.py",
    "wire/schema.py",
    "wire/py.typed",
]

if (ROOT / "clients").is_dir():  # building from the repository, not from an sdist
    shutil.rmtree(STAGE, ignore_errors=True)
    for name in SDK_FILES:
        (STAGE / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, STAGE / name)

setup(
    packages=["clients", "wire"],
    package_dir={"": "staged"},
    package_data={"clients": ["py.typed"], "wire": ["py.typed"]},  # typed (PEP 561)
)
