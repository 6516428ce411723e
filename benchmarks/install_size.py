"""Install size: each recipe in a fresh virtual environment, measured on disk, smoke-tested.

    python benchmarks/install_size.py                   # both recipes (minutes; ~7 GB of disk)
    python benchmarks/install_size.py --recipes cpu

Recipes (the README's commands, the project installed from this working tree):
  cpu      pip install torch==2.13.0, then pip install '.[server]': torch's CPU-only wheel first,
           so the project's `torch>=...` is already met and no CUDA build is pulled in
  default  pip install '.[server]' alone: whatever torch pip resolves (from PyPI, a CUDA build)

The size is the environment folder's file sizes added up (symlinks not followed; the same as
`du --apparent-size`), with the largest installed distributions listed. The smoke test imports
`lpi` and `server.app` from the new environment (outside the repository, so the installed copy
and its packaged vocabulary are what run), tokenizes, and records which heavy packages loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import table, write_json

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {  # pip install arguments, run from the repository root
    "cpu": [["torch==2.13.0"], [".[server]"]],
    "default": [[".[server]"]],
}
SMOKE = """
import json, sys, time
start = time.perf_counter()
import lpi, server.app, torch
from PIL import Image
ids = lpi.tokenize(["a photo of a dog"])[0, :7].tolist()
backbone = lpi.load_backbone("tiny")
text = backbone.encode_text(lpi.tokenize(["a red circle"]))
image = backbone.encode_image(lpi.preprocess([Image.new("RGB", (40, 30))], 32))
heavy = sorted(m for m in ("open_clip", "torchvision", "timm", "triton") if m in sys.modules)
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "tokens": ids,
                  "similarity": float(text @ image.T), "heavy_imported": heavy,
                  "smoke_s": round(time.perf_counter() - start, 2)}))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["cpu", "default"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/install_size.json"))
    return parser.parse_args()


def folder_bytes(folder: Path) -> int:
    total = 0
    for path, _, files in os.walk(folder):
        total += sum(os.lstat(os.path.join(path, name)).st_size for name in files)
    return total


def largest_distributions(python: Path, count: int = 8) -> list[dict]:
    """Installed distributions by the bytes of the files their RECORD lists."""
    code = (
        "import json, importlib.metadata as m\n"
        "rows = []\n"
        "for d in m.distributions():\n"
        "    size = sum(f.size or 0 for f in d.files or [])\n"
        "    rows.append({'name': d.metadata['Name'], 'version': d.version, 'bytes': size})\n"
        "print(json.dumps(sorted(rows, key=lambda r: -r['bytes'])))\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[:count]


def measure(recipe: str, workdir: Path) -> dict:
    venv = workdir / f"venv-{recipe}"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    start = time.perf_counter()
    for packages in RECIPES[recipe]:
        subprocess.run([python, "-m", "pip", "install", "-q", *packages], check=True, cwd=ROOT)
    install_s = time.perf_counter() - start
    smoke = subprocess.run(
        [python, "-c", SMOKE], capture_output=True, text=True, check=True, cwd=workdir
    )
    size = folder_bytes(venv)
    return {
        "recipe": recipe,
        "commands": [["pip", "install", *packages] for packages in RECIPES[recipe]],
        "venv_bytes": size,
        "venv_gb": size / 1e9,
        "install_s": install_s,
        **json.loads(smoke.stdout),
        "largest": largest_distributions(python),
    }


def main() -> None:
    args = parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lpi-install-size-") as workdir:
        for recipe in args.recipes:
            rows.append(measure(recipe, Path(workdir)))
            print(f"{recipe}: {rows[-1]['venv_gb']:.2f} GB", flush=True)
    columns = [("recipe", "{}"), ("torch", "{}"), ("cuda", "{}"), ("venv_gb", "{:.2f}")]
    columns += [("install_s", "{:.0f}"), ("heavy_imported", "{}")]
    print(table(columns, rows))
    for row in rows:
        print(f"\n{row['recipe']}: largest distributions")
        for dist in row["largest"]:
            print(f"  {dist['bytes'] / 1e6:9.1f} MB  {dist['name']} {dist['version']}")
    machine = {"python": platform.python_version(), "platform": platform.platform()}
    write_json(args.out, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
