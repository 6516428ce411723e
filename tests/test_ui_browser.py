"""The search page (/ui) in a real browser, and what a browser gets from the server offline:
the API docs from package data (no external host), security schemes, CORS, `/` for people.

The browser is Debian's headless Chromium (`apt-get install chromium`, as .ci/run does) driven
by Playwright; where either is missing the browser tests skip, saying which. Screenshots go to
a temporary folder, or to LPI_SCREENSHOT_DIR when set (how docs/ui-search.png was made).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

import lpi
from export.tasks import export_run
from server.app import create_app
from server.settings import Settings
from tests.server_helpers import run, running, serve_on_socket

API = "page-key"
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)
SHAPES = {
    "red-circle": ("a red circle", (220, 40, 40), "ellipse"),
    "blue-square": ("a blue square", (40, 80, 220), "rectangle"),
    "green-triangle": ("a green triangle", (40, 170, 60), "polygon"),
    "yellow-circle": ("a yellow circle", (235, 200, 30), "ellipse"),
}


def shape_png(colour, kind: str, size: int = 96) -> bytes:
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw, box = ImageDraw.Draw(image), (16, 16, size - 16, size - 16)
    if kind == "polygon":
        draw.polygon([(size // 2, 14), (size - 14, size - 14), (14, size - 14)], fill=colour)
    else:
        getattr(draw, kind)(box, fill=colour)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def setup(tiny_runs, tmp_path_factory):
    backbone = lpi.load_backbone(tiny_runs / "backbone.safetensors")
    inbox = tmp_path_factory.mktemp("inbox")
    artifact = export_run(tiny_runs / "lpi", backbone, inbox)[0]
    return tiny_runs / "backbone.safetensors", inbox, artifact


def _settings(setup, tmp_path, **overrides) -> Settings:
    backbone, inbox, _ = setup
    values = dict(backbone=str(backbone), data_dir=tmp_path, artifact_dir=inbox, store="memory")
    return Settings(**(values | overrides))


# -- what a browser gets, without one ------------------------------------------------------------


def test_docs_render_from_package_data_with_no_external_host(setup, tmp_path):
    async def scenario():
        async with running(create_app(_settings(setup, tmp_path, api_key=API))) as client:
            for page in ("/docs", "/redoc", "/ui"):
                html = (await client.get(page)).text
                assert not EXTERNAL.search(html), (page, EXTERNAL.search(html))
                assets = re.findall(r"""(?:src|href)=["']?(/static/[^"' >]+)""", html)
                assert assets, page
                for asset in assets:
                    answer = await client.get(asset)
                    assert answer.status_code == 200 and len(answer.content) > 500, asset
            assert "fonts.googleapis" not in (await client.get("/redoc")).text
            document = (await client.get("/openapi.json")).json()
            schemes = document["components"]["securitySchemes"]
            assert {s["scheme"] for s in schemes.values()} == {"bearer"}
            paths = document["paths"]
            assert paths["/embed"]["post"]["security"] == [{"apiKey": []}, {"adminKey": []}]
            assert paths["/v1/embeddings"]["post"]["security"][0] == {"apiKey": []}
            assert paths["/tasks/{task}"]["put"]["security"] == [{"adminKey": []}]
            assert "security" not in paths["/healthz"]["get"]
            named = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(document)))
            assert named <= set(document["components"]["schemas"])  # none dangles (ReDoc)

    run(scenario())


def test_cors_is_off_by_default_and_answers_preflights_when_set(setup, tmp_path):
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }

    async def scenario():
        async with running(create_app(_settings(setup, tmp_path / "off"))) as client:
            assert (await client.options("/search", headers=preflight)).status_code == 405
        origins = ["https://app.example.com"]
        app = create_app(_settings(setup, tmp_path / "on", cors_origins=origins, api_key=API))
        async with running(app) as client:
            answer = await client.options("/search", headers=preflight)
            assert answer.status_code == 200
            assert answer.headers["access-control-allow-origin"] == origins[0]
            assert "authorization" in answer.headers["access-control-allow-headers"].lower()
            other = await client.options("/search", headers=preflight | {"Origin": "https://x.io"})
            assert other.status_code == 400  # an origin not listed is refused
            got = await client.get("/healthz", headers={"Origin": origins[0]})
            assert got.headers["access-control-allow-origin"] == origins[0]

    run(scenario())


def test_root_sends_browsers_to_the_page_and_programs_json(setup, tmp_path):
    async def scenario():
        async with running(create_app(_settings(setup, tmp_path))) as client:
            page = await client.get("/", headers={"Accept": "text/html,*/*;q=0.8"})
            assert page.status_code == 307 and page.headers["location"] == "/ui"
            index = (await client.get("/")).json()
            assert index["links"]["ui"] == "/ui" and index["links"]["docs"] == "/docs"

    run(scenario())


# -- the page in Chromium ------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path):
    """A fresh Chromium profile, or a skip that says what is missing."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.skip(
            "playwright is not installed (pip install playwright; never playwright "
            "install: the test uses Debian's chromium)"
        )
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        try:
            context = playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=FLAGS,
                viewport={"width": 1100, "height": 820},
            )
        except Error as err:
            pytest.skip(f"chromium at {CHROMIUM} did not start: {str(err).splitlines()[0]}")
        yield context
        context.close()


def _shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("LPI_SCREENSHOT_DIR") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_search_page_finds_text_and_image_hits_in_chromium(setup, tmp_path, browser):
    settings = _settings(setup, tmp_path, api_key=API, max_text_chars=200)
    shots = _shots(tmp_path)
    files = {}
    for name, (_, colour, kind) in SHAPES.items():
        files[name] = tmp_path / f"{name}.png"
        files[name].write_bytes(shape_png(colour, kind))
    with serve_on_socket(create_app(settings)) as url:
        headers = {"Authorization": f"Bearer {API}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            artifact = setup[2]
            path = artifact.path.relative_to(setup[1]).as_posix()
            task = artifact.task_id
            http.put(f"/tasks/{task}", json={"path": path}).raise_for_status()
            items = [
                {
                    "id": name,
                    "image": base64.b64encode(files[name].read_bytes()).decode(),
                    "payload": {"caption": caption},
                }
                for name, (caption, _, _) in SHAPES.items()
            ]
            items += [
                {
                    "id": "note-1",
                    "text": "a handwritten note about shapes",
                    "payload": {"caption": "a text item"},
                }
            ]
            answer = http.post("/index", json={"task": task, "items": items, "thumbnail": True})
            assert answer.status_code == 200, answer.text

        page = browser.new_page()
        page.goto(url + "/ui")
        status = page.locator("#status")
        # Without the key, the server's refusal is shown, not a blank page.
        page.wait_for_function("document.getElementById('status').textContent.length > 0")
        assert "401" in status.text_content() and "API key" in status.text_content()
        page.fill("#api-key", API)
        page.dispatch_event("#api-key", "change")
        page.wait_for_function(f"document.querySelector('#task option[value=\"{task}\"]')")
        page.select_option("#task", task)

        # A text query: the stored text item itself is the nearest (cosine 1).
        page.fill("#query", "a handwritten note about shapes")
        page.click("#go")
        page.wait_for_selector("#hits .hit")
        first = page.locator("#hits .hit").first
        assert first.locator(".id").text_content() == "note-1"
        assert float(first.locator(".score").text_content()) > 0.999
        assert page.locator("#hits .hit").count() == 5

        # An image query: dropping a stored image finds it first, with its thumbnail.
        page.set_input_files("#file", str(files["blue-square"]))
        page.wait_for_function(
            "document.querySelector('#hits .hit .id')?.textContent === 'blue-square'"
        )
        first = page.locator("#hits .hit").first
        assert float(first.locator(".score").text_content()) > 0.999
        assert page.locator("#hits .hit img.thumb").count() == 4  # the images, not the text
        src = first.locator("img.thumb").get_attribute("src")
        assert src.startswith("data:image/jpeg;base64,")
        assert "blue square" in first.text_content()
        page.screenshot(path=str(shots / "ui-search.png"), full_page=True)

        # A refused search shows the server's message.
        page.fill("#query", "x" * 300)
        page.click("#go")
        page.wait_for_function("document.getElementById('status').className === 'error'")
        message = status.text_content()
        assert "413 text_too_long" in message and "the limit is 200" in message
        assert page.locator("#hits .hit").count() == 0

        docs = browser.new_page()
        docs.goto(url + "/docs")
        docs.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
        assert docs.locator(".btn.authorize").count() == 1  # security schemes: "Authorize"
        docs.screenshot(path=str(shots / "api-docs.png"))
        redoc = browser.new_page()
        redoc.goto(url + "/redoc")
        redoc.wait_for_selector("h1", timeout=30_000)
        assert "lpi-serve" in redoc.locator("h1").first.text_content()
    for name in ("ui-search.png", "api-docs.png"):
        assert Image.open(shots / name).size[0] >= 1000
