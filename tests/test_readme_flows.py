"""Every ```bash block of README.md, run in order as a new user would, from a clean copy.

The copy: `git ls-files --cached --others --exclude-standard` (what a clone of this tree holds
once committed; nothing git ignores) copied into a temporary folder, made a git repository of
its own so the end can check that the README's commands leave nothing untracked. How the
commands map to this offline machine and its one shared environment (`python3 -m venv`, `pip
install`, sizes, ports) is `tests/readme_blocks.py`'s docstring; in short, the copy's .venv is
a symlink to the environment running the tests, `pip install -e '.[X]'` becomes a check that
the environment satisfies the project and extra X, and PYTHONPATH points at the copy, so its
code is what runs. Blocks marked `<!-- readme-test: skip (REASON) -->` (a download, a GPU) are
reported skipped with REASON.

Each block is one test, named by its README line, so a broken command fails CI and names its
block. Inputs the README assumes the reader has (`prompts.safetensors`, "dense prompts trained
elsewhere") are written by the test: GIVEN.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.readme_blocks import Block, adapt, read_blocks, unmarked_need

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = read_blocks(ROOT / "README.md")
BLOCK_TIMEOUT_S = 600  # one block on a loaded 2-core machine; the whole module takes ~3 min
READY_TIMEOUT_S = 300  # a server block's /readyz (the quick demo builds in seconds)
TAIL = 4000  # characters of a failed block's output in the report
PROBE_TASK = "shapes-colours"
PROBE_TEXTS = ["a red circle", "a small blue square", "a green triangle on a striped background"]


def _dense_prompts(copy: Path) -> None:
    """prompts.safetensors: random dense prompts [J, N, D] that fit the run's backbone."""
    from safetensors.torch import save_file

    import lpi

    backbone = lpi.load_backbone(str(copy / "runs" / "backbone.safetensors"))
    generator = torch.Generator().manual_seed(7)
    layers, tokens = 4, 8  # the README's run: --layers 4 --tokens 8
    tensors = {
        f"prompts_{t}": 0.02 * torch.randn(layers, tokens, width, generator=generator)
        for t, width in (("v", backbone.config.vision.width), ("t", backbone.config.text.width))
    }
    save_file(tensors, str(copy / "prompts.safetensors"))


GIVEN = {"prompts.safetensors": _dense_prompts}  # file the README assumes -> its maker


class Flow:
    """The copy, its environment, the server block running now, and what each block gave."""

    def __init__(self, copy: Path, scratch: Path) -> None:
        self.copy, self.scratch = copy, scratch
        self.user_data = scratch / "xdg-data"  # a per-user data folder nothing should touch
        self.user_data.mkdir()
        self.results: dict[int, tuple[str, str]] = {}  # line -> (outcome, detail)
        self.seconds: dict[int, float] = {}
        self.probes: dict[int, dict] = {}  # server block line -> what it answered
        self.server: subprocess.Popen | None = None
        self.port = _free_port()
        self.key = secrets.token_hex(8)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LPI_", "PYTEST_"))}
        env.update(
            PATH=f"{self.copy / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            VIRTUAL_ENV=str(self.copy / ".venv"),
            PYTHONPATH=str(self.copy),
            XDG_DATA_HOME=str(self.user_data),
            HF_HUB_OFFLINE="1",
            TQDM_DISABLE="1",
            KEY=self.key,
            LPI_PORT=str(self.port),
            LPI_URL=f"http://127.0.0.1:{self.port}",
            LPI_DEMO_SIZE="quick",
            LPI_DTYPE=os.environ.get("LPI_DTYPE", "float32"),
        )
        return env

    def run_through(self, block: Block) -> tuple[str, str]:
        """Run every block up to and including `block` not yet run; `block`'s result."""
        for each in BLOCKS:
            if each.line not in self.results:
                started = time.perf_counter()
                self.results[each.line] = self._run(each)
                self.seconds[each.line] = time.perf_counter() - started
            if each.line == block.line:
                break
        return self.results[block.line]

    def _run(self, block: Block) -> tuple[str, str]:
        if block.kind == "skip":
            return "skipped", block.reason or "no reason given"
        need = unmarked_need(adapt(block.text, self.port), torch.cuda.is_available())
        if need is not None:
            return "failed", (
                f"needs {need} and has no marker: put `<!-- readme-test: skip (needs {need}) -->` "
                "on the line before its fence"
            )
        for name, make in GIVEN.items():
            if name in block.text and not (self.copy / name).exists():
                make(self.copy)
        if block.kind == "server":
            return self._serve(block)
        log = self.scratch / f"block-{block.line}.log"
        with open(log, "wb") as out:
            try:
                done = subprocess.run(
                    ["bash", "-e", "-o", "pipefail", "-c", adapt(block.text, self.port)],
                    cwd=self.copy,
                    env=self.env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=BLOCK_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired:
                return "failed", f"timed out after {BLOCK_TIMEOUT_S} s\n{_tail(log)}"
        if done.returncode != 0:
            return "failed", f"exit status {done.returncode}\n{_tail(log)}"
        return "passed", _tail(log)

    def _serve(self, block: Block) -> tuple[str, str]:
        """Start the block in the background and wait until /readyz says ready."""
        self.stop_server()
        self.port = _free_port()
        log = self.scratch / f"block-{block.line}.log"
        with open(log, "wb") as out:
            self.server = subprocess.Popen(
                ["bash", "-e", "-o", "pipefail", "-c", adapt(block.text, self.port)],
                cwd=self.copy,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url, deadline = f"http://127.0.0.1:{self.port}", time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                return "failed", f"exited with {self.server.returncode} before ready\n{_tail(log)}"
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    self.probes[block.line] = _probe(url)
                    return "passed", _tail(log)
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return "failed", f"not ready after {READY_TIMEOUT_S} s\n{_tail(log)}"

    def stop_server(self) -> None:
        """Ctrl-C (SIGINT to its process group), then SIGKILL if it lingers."""
        server, self.server = self.server, None
        if server is None or server.poll() is not None:
            return
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _probe(url: str) -> dict:
    """What a ready server answers for the probe task: query vectors and search hits."""
    tasks = [t["task"] for t in httpx.get(f"{url}/tasks", timeout=30).json()["tasks"]]
    if PROBE_TASK not in tasks:
        return {"tasks": tasks}
    embedded = httpx.post(
        f"{url}/embed", json={"task": PROBE_TASK, "texts": PROBE_TEXTS}, timeout=60
    ).json()
    hits = [
        [
            hit["id"]
            for hit in httpx.post(
                f"{url}/search",
                timeout=60,
                json={"task": PROBE_TASK, "query": {"text": text}, "top_k": 5},
            ).json()["hits"]
        ]
        for text in PROBE_TEXTS
    ]
    return {
        "tasks": tasks,
        "vectors": embedded["text_embeddings"],
        "hits": hits,
        "version": embedded["prompt_version"],
    }


def _tail(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-TAIL:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_copy(root: Path, dest: Path) -> Path:
    """The repository's files as a clone would hold them, in `dest`, as a fresh git repo."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = root / name
        if not source.exists() and not source.is_symlink():  # deleted, not yet committed
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / name, follow_symlinks=False)
    (dest / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    for command in (["init", "-q"], ["add", "-A"]):
        subprocess.run(["git", *command], cwd=dest, check=True, capture_output=True)
    return dest


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("readme")
    flow = Flow(clean_copy(ROOT, scratch / "lpi-serve"), scratch)
    yield flow
    flow.stop_server()
    timings = ", ".join(f"L{line} {s:.0f} s" for line, s in flow.seconds.items())
    print(f"\nREADME blocks: {timings}; total {sum(flow.seconds.values()):.0f} s")


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README-L{b.line}" for b in BLOCKS])
def test_readme_block(flow: Flow, block: Block):
    outcome, detail = flow.run_through(block)
    if outcome == "skipped":
        pytest.skip(f"{block.name}: {detail}")
    assert outcome == "passed", f"{block.name} failed: {detail}"


def test_an_unmarked_download_or_gpu_block_is_named():
    """A block that would download or needs a GPU fails with the marker it lacks."""
    assert "download" in unmarked_need(adapt("pip install torch --index-url https://x", 1), True)
    assert unmarked_need(adapt("python -m server --allow-download", 1), True) == "a download"
    assert unmarked_need("python -m server --device cuda", has_gpu=False) == "a GPU"
    assert (
        unmarked_need(adapt("python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'", 1), True)
        is None
    )


def test_readme_has_the_flows_it_promises():
    """The blocks this module is meant to exercise are there (a rewrite cannot drop them)."""
    texts = [b.text for b in BLOCKS]
    assert any("python -m server" in t and "--engine onnx" in t for t in texts)
    assert any("python -m export onnx --demo" in t for t in texts)
    assert any("lpi.train" in t for t in texts) and any("lpi index" in t for t in texts)
    assert all(b.reason for b in BLOCKS if b.kind == "skip"), "a skip marker names its reason"


def test_onnx_demo_answers_as_the_torch_demo(flow: Flow):
    """The README's `export onnx --demo` + `--engine onnx` serves the demo as torch does.

    Same query vectors to cosine >= 0.9999 (the float32 graph runs torch's arithmetic; the
    export itself is held to that bound per row) and the same hits, against the vectors the
    torch engine indexed."""
    flow.run_through(BLOCKS[-1])
    servers = [b for b in BLOCKS if b.kind == "server"]
    torch_demo = next(b for b in servers if "--backbone" not in b.text and "onnx" not in b.text)
    onnx_demo = next(b for b in servers if "--engine onnx" in b.text)
    expected, got = flow.probes.get(torch_demo.line), flow.probes.get(onnx_demo.line)
    assert expected and got, f"a demo server block did not come up: {flow.results}"
    assert "vectors" in expected and "vectors" in got, (expected["tasks"], got["tasks"])
    assert got["version"] == expected["version"]
    cosine = torch.nn.functional.cosine_similarity(
        torch.tensor(expected["vectors"]), torch.tensor(got["vectors"]), dim=-1
    )
    assert cosine.min() >= 0.9999, cosine
    assert got["hits"] == expected["hits"]


def test_readme_flows_leave_the_checkout_clean(flow: Flow):
    """After every block: nothing untracked in the copy (runtime outputs are git-ignored), the
    demo's data in the checkout's data/, nothing in the per-user data folder."""
    flow.run_through(BLOCKS[-1])
    flow.stop_server()
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=flow.copy,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    untracked = [line[3:] for line in status if line.startswith("??")]
    assert [name for name in untracked if name not in GIVEN] == []
    assert (flow.copy / "data" / "demo" / "bundle.json").is_file()
    assert list(flow.user_data.iterdir()) == []
