"""README.md's ```bash blocks, and how tests/test_readme_flows.py runs them on this machine.

A block may be preceded (on the line before its fence) by a marker comment:

    <!-- readme-test: skip (REASON) -->   not run; the test reports REASON (a GPU, a download)
    <!-- readme-test: server -->          serves until stopped: run in the background, waited on
                                          until /readyz answers 200, stopped (SIGINT, as Ctrl-C)
                                          when the next server block starts or the test ends

A block without a marker that would download (an unmapped pip install, --allow-download) or
needs a GPU this machine lacks fails, naming the marker it lacks (`unmarked_need`).

Mapping to one offline machine with one shared environment (`adapt`):
- `python3 -m venv .venv`: the copy's .venv is a symlink to the environment running the tests;
- `.venv/bin/pip install ... -e '.[EXTRA]'`: `python -m tests.readme_blocks check-install
  EXTRA` checks that the environment holds every requirement of the project and that extra
  (name and version, read from pyproject.toml); a pip install of anything else (e.g. torch
  from a URL) is a download and its block must carry a skip marker;
- `python -m pytest`: `--collect-only -q` appended (the suite itself is .ci/run's first step;
  collecting it checks that the command works and every test module imports);
- `localhost:8000`: the port of the server block running now (LPI_PORT, LPI_URL for `lpi`);
- sizes: SHRINK's flags are appended to the commands they name (argparse: the last flag wins),
  and the demo builds with LPI_DEMO_SIZE=quick (the server's --demo-size).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<kind>skip|server)\s*(?:\((?P<reason>.*)\))?\s*-->")

# Command prefix -> flags appended to make it small (each command's own --help lists them).
SHRINK = {
    "python -m lpi.continual.data.synthetic": "--tasks 2 --train-per-task 16 --test-per-task 8 "
    "--pretrain 64",
    "python -m lpi.pretrain": "--preset tiny --epochs 1",
    "python -m lpi.train": "--epochs 1",
    "python benchmarks/continual.py": "--configs lpi-R4 --seeds 0 --backbone tiny --suite classic "
    "--tasks 2 --fashion-groups --train-per-task 16 --test-per-task 8 --image-size 32 --epochs 1 "
    "--batch-size 8",
    "python -m export onnx": "--no-fp16",
}


@dataclass(frozen=True)
class Block:
    """One ```bash block: where it starts, its text, and its marker (if any)."""

    line: int  # 1-based line of the opening fence
    text: str
    kind: str = "run"  # run, server or skip
    reason: str = ""

    @property
    def name(self) -> str:
        first = self.text.strip().splitlines()[0]
        return f"README.md:{self.line} `{first[:60]}`"


def read_blocks(readme: Path) -> list[Block]:
    """Every ```bash block of `readme`, in order, with the marker on the line before it."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() != "```bash":
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
        marker = MARKER.search(lines[index - 1]) if index else None
        kind = marker["kind"] if marker else "run"
        reason = (marker["reason"] or "").strip() if marker else ""
        blocks.append(Block(index + 1, "\n".join(lines[index + 1 : end]), kind, reason))
        index = end + 1
    return blocks


def adapt(text: str, port: int) -> str:
    """The block as this machine runs it (see the module docstring)."""
    commands = []
    for command in _logical_lines(text):
        code, comment = _split_comment(command)
        code = re.sub(r"python3 -m venv \.venv", "true", code)
        code = re.sub(
            r"\.venv/bin/pip install (?:-q )?-e '\.\[([\w,-]+)\]'",
            r".venv/bin/python -m tests.readme_blocks check-install \1",
            code,
        )
        code = re.sub(r"(python -m pytest)\b", r"\1 --collect-only -q", code)
        code = code.replace("localhost:8000", f"localhost:{port}")
        for prefix, flags in SHRINK.items():
            if re.search(rf"(^|\s){re.escape(prefix)}\b", code):
                code = f"{code.rstrip()} {flags}"
        commands.append(code + (f"  {comment}" if comment else ""))
    return "\n".join(commands)


def unmarked_need(adapted: str, has_gpu: bool) -> str | None:
    """What an unmarked block needs that this offline, maybe GPU-less machine cannot give."""
    if re.search(r"\bpip install\b", adapted):
        return "a download (a pip install the environment check does not cover)"
    if "--allow-download" in adapted or re.search(r"\b(curl|wget)\b.*https?://", adapted):
        return "a download"
    if not has_gpu and re.search(r"--device cuda|--gpus\b", adapted):
        return "a GPU"
    return None


def _logical_lines(text: str) -> list[str]:
    """Lines with their backslash continuations joined."""
    joined, current = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    return [line for line in joined if line.strip()]


def _split_comment(line: str) -> tuple[str, str]:
    """(code, trailing '# comment'), quotes respected."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line, ""


# -- check-install: what `pip install -e '.[EXTRA]'` would leave installed ---------------------


def missing_requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """Requirements of the project and `extras` (self-references followed) not satisfied."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    wanted, seen, todo = list(project["dependencies"]), set(), list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            return [f"no extra {extra!r} in pyproject.toml"]
        seen.add(extra)
        for text in optional[extra]:
            req = Requirement(text)
            if req.name == project["name"]:
                todo += list(req.extras)
            else:
                wanted.append(text)
    missing = []
    for text in wanted:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{text} (not installed)")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(f"{text} (found {version})")
    return missing


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "check-install":
        print("usage: python -m tests.readme_blocks check-install EXTRA[,EXTRA]", file=sys.stderr)
        return 2
    missing = missing_requirements(Path("pyproject.toml"), argv[1].split(","))
    for line in missing:
        print(f"not satisfied: {line}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
