"""The repository keeps its own promises: docs name modules that exist and links that resolve,
no source file outgrows one job, and nothing points at trackers or folders users do not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lpi", "kernels", "export", "server", "wire", "clients")
MAX_LINES = 450


def tracked(*patterns: str) -> list[Path]:
    """Files git tracks (or would: new files not yet added), so build outputs never count."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.stdout.split() if (ROOT / name).is_file()]


def module_exists(name: str) -> bool:
    """`lpi.continual.recall`, `server/registry.py` or `server/store/` -> does it exist?"""
    path = name.rstrip("/")
    if "/" not in path and "." in path and not path.endswith(".py"):
        path = path.replace(".", "/")
    candidates = [ROOT / path, ROOT / f"{path}.py", ROOT / path / "__init__.py"]
    return any(candidate.exists() for candidate in candidates)


def code_names(text: str) -> set[str]:
    """Backticked names that claim to be one of the project's modules or files."""
    names = set()
    for token in re.findall(r"`([^`\s]+)`", text):
        token = token.split("(")[0].split("::")[0]
        if token.startswith(tuple(f"{package}/" for package in PACKAGES)) or (
            token.startswith(tuple(f"{package}." for package in PACKAGES))
            and re.fullmatch(r"[a-z_][a-z0-9_.]*", token)
        ):
            names.add(token)
    return names


def test_architecture_doc_names_only_modules_that_exist():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    names = code_names(text)
    assert len(names) > 20, "the architecture doc should name the modules it describes"
    missing = []
    for name in sorted(names):
        # `pkg.module.Symbol`: accept when some prefix of it is a module
        parts = name.replace("/", ".").removesuffix(".py").split(".")
        if not any(module_exists(".".join(parts[:n])) for n in range(len(parts), 0, -1)) or (
            "/" in name and not module_exists(name)
        ):
            missing.append(name)
    assert missing == [], f"docs/ARCHITECTURE.md names what does not exist: {missing}"


def test_markdown_links_resolve_inside_the_repository():
    broken = []
    for doc in tracked("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (doc.parent / target).resolve()
            if not resolved.exists() or ROOT not in resolved.parents:
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_no_references_to_trackers_or_folders_outside_the_repository():
    pattern = re.compile(r"\bissue \d+|\bitems? \d+ (?:and|of)\b|\.\./shared|\bSTYLE\.md\b")
    offenders = []
    for path in tracked("*.py", "*.md", "*.toml", "Dockerfile", ".ci/*"):
        if path.name == "test_repository.py":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert offenders == []


def test_no_source_file_over_the_line_limit():
    sources = [p for p in tracked("*.py") if p.parts[len(ROOT.parts)] != "sdk"]
    long = {
        str(p.relative_to(ROOT)): n
        for p in sources
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these into modules with one job each (limit {MAX_LINES}): {long}"
