"""The error map and what clients see of it: every 4xx names a field, the key comes before the
body, no answer reveals a server path, and a promote never empties /search without a word.

The app runs in-process (httpx ASGI transport), and over a loopback socket for the CLI.
"""

from __future__ import annotations

import json

import httpx
import pytest

from clients.cli import main as lpi_main
from export.errors import ArtifactError
from server.errors import REFUSALS, refusal_of
from server.exceptions import RequestError
from server.registry import RegistryError
from server.store import StoreError
from tests.server_helpers import create_app, export_artifacts, run, running, serve_on_socket
from tests.server_helpers import settings as server_settings

API, ADMIN = "query-key", "admin-key"
KEYS = {"authorization": f"Bearer {ADMIN}"}
JSON = "application/json"
PUBLIC = ("/", "/healthz", "/readyz")  # /metrics is not in the schema and is public too


@pytest.fixture(scope="module")
def artifacts(tiny_runs, tmp_path_factory):
    inbox = tmp_path_factory.mktemp("inbox")
    files = export_artifacts(tiny_runs, inbox)
    rel = lambda path: str(path.relative_to(inbox))  # noqa: E731
    return inbox, rel(files["lpi"][0]), rel(files["dense"][0])


def make_app(tiny_runs, artifacts, tmp_path, **overrides):
    inbox = artifacts[0]
    keys = {"api_key": API, "admin_key": ADMIN} | overrides
    return create_app(server_settings(tiny_runs, tmp_path / "data", inbox, **keys))


def subclasses(root: type) -> list[type]:
    found, todo = [], [root]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


# -- the map -------------------------------------------------------------------------------------


def test_every_domain_exception_has_a_status_and_carries_none_itself():
    roots = (RequestError, RegistryError, StoreError, ArtifactError)
    for cls in [c for root in roots for c in subclasses(root)]:
        assert refusal_of(cls("x")) is not None, cls
        assert not hasattr(cls, "status"), f"{cls.__name__} carries an HTTP status"
        assert cls("x", "f").field == "f", cls  # every one takes and keeps its field
    # The most specific class wins, whichever order the table lists them in.
    from server.registry import TaskNotLoadedError, VersionNotIndexedError
    from server.store import UnknownTaskError

    assert refusal_of(TaskNotLoadedError("x")).status == 404
    assert refusal_of(UnknownTaskError("x")).status == 404
    assert refusal_of(VersionNotIndexedError("x")) == REFUSALS[VersionNotIndexedError]
    assert refusal_of(RegistryError("x")).status == 409
    assert refusal_of(KeyError("x")) is None  # anything unmapped is a 500


# -- the key before the body -------------------------------------------------------------------


def _protected(app) -> list[tuple[str, str]]:
    """Every operation the schema documents is protected, but for the probes and the index."""
    return [
        (method.upper(), path.replace("{task}", "t"))
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if path not in PUBLIC
    ]


def test_every_protected_route_checks_the_key_before_reading_the_body(
    tiny_runs, artifacts, tmp_path
):
    app = make_app(tiny_runs, artifacts, tmp_path)
    protected = _protected(app)
    assert len(protected) >= 8, protected  # embed, index, search, tasks: list/get/put/post/delete

    async def scenario():
        async with running(app) as client:
            answers = []
            for method, path in protected:
                for headers in ({}, {"authorization": "Bearer wrong"}):
                    answers.append(
                        (
                            method,
                            path,
                            bool(headers),
                            await client.request(
                                method,
                                path,
                                content=b"{not json",
                                headers={"content-type": "application/json", **headers},
                            ),
                        )
                    )
            return answers

    for method, path, with_key, answer in run(scenario()):
        where = (method, path, with_key, answer.text)
        assert answer.status_code == (403 if with_key else 401), where
        error = answer.json()["error"]  # the OpenAI-compatible routes name it `param`
        assert error.get("field", error.get("param")) == "authorization", where


def test_a_protected_request_checks_its_key_once(tiny_runs, artifacts, tmp_path, monkeypatch):
    """The key-first check and the declared dependency share one comparison per request."""
    import hmac
    import types

    from server.routes import deps

    compared = []

    def compare_digest(a, b):
        compared.append(a)
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(deps, "hmac", types.SimpleNamespace(compare_digest=compare_digest))
    app = make_app(tiny_runs, artifacts, tmp_path)
    protected = _protected(app)

    async def scenario():
        async with running(app) as client:
            counts = []
            for method, path in protected:
                compared.clear()
                answer = await client.request(
                    method, path, content=b"{not json", headers={"content-type": JSON, **KEYS}
                )
                counts.append((method, path, answer.status_code, len(compared)))
            return counts

    for method, path, status, count in run(scenario()):
        assert status not in (401, 403), (method, path, status)  # the key was accepted
        assert count == 1, (method, path, count)  # the admin key: one comparison, once


# -- every 4xx names a field -------------------------------------------------------------------


def test_every_4xx_names_a_field(tiny_runs, artifacts, tmp_path):
    inbox, v1, _ = artifacts
    (inbox / "junk.safetensors").write_bytes(b"not an artifact")
    bad_requests = [
        ("GET", "/nowhere", {}),
        ("DELETE", "/embed", {}),
        ("POST", "/embed", {"content": b"{not json"}),
        ("POST", "/embed", {"json": []}),
        ("POST", "/embed", {"json": {}}),
        ("POST", "/embed", {"json": {"task": "ghost", "texts": ["a"]}}),
        ("POST", "/index", {"json": [1, 2]}),
        ("POST", "/index", {"json": {"task": "t"}}),
        ("POST", "/index", {"json": {"task": "ghost", "items": [{"text": "a"}]}}),
        ("POST", "/search", {"content": b'{"task": "t", "query": {"text": "a"},}'}),
        ("POST", "/search", {"json": "a string"}),
        ("POST", "/search", {"json": {"task": "t", "query": {}}}),
        ("POST", "/search", {"json": {"task": "t", "query": {"text": "a"}, "top_k": 0}}),
        ("POST", "/search", {"json": {"task": "ghost", "query": {"text": "a"}}}),
        ("GET", "/tasks/ghost", {}),
        ("PUT", "/tasks/t2", {"content": b"", "headers": {"content-type": "x/y"}}),
        ("PUT", "/tasks/t2", {"content": b"garbage"}),
        ("PUT", "/tasks/t2", {"json": {"path": "../escape.safetensors"}}),
        ("PUT", "/tasks/t2", {"json": {"path": "junk.safetensors"}}),
        ("PUT", "/tasks/t2", {"content": b"{not json", "headers": {"content-type": JSON}}),
        ("PUT", "/tasks/auto", {"json": {"path": v1}}),
        ("POST", "/tasks/t/promote", {"json": {"version": "nope"}}),
        ("POST", "/tasks/t/promote", {"content": b"["}),
        ("DELETE", "/tasks/ghost", {}),
        ("DELETE", "/tasks/t", {"params": {"delete_vectors": "maybe"}}),
    ]
    app = make_app(tiny_runs, artifacts, tmp_path)

    async def scenario():
        async with running(app) as client:
            assert (await client.put("/tasks/t", json={"path": v1}, headers=KEYS)).is_success
            answers = []
            for method, path, options in bad_requests:
                headers = KEYS | options.pop("headers", {})
                answers.append(await client.request(method, path, headers=headers, **options))
            return answers

    for (method, path, _), answer in zip(bad_requests, run(scenario()), strict=True):
        where = (method, path, answer.text)
        assert 400 <= answer.status_code < 500, where
        error = answer.json()["error"]
        assert isinstance(error["field"], str) and error["field"], where
        assert set(error) == {"type", "message", "field"}, where


def test_json_syntax_errors_name_the_body_and_where(tiny_runs, artifacts, tmp_path):
    app = make_app(tiny_runs, artifacts, tmp_path)

    async def scenario():
        async with running(app) as client:
            headers = KEYS | {"content-type": JSON}
            post = lambda path: client.post(path, content=b'{"task": "t", oops}', headers=headers)  # noqa: E731
            return await post("/index"), await post("/embed")

    index, embed = run(scenario())
    for answer in (index, embed):
        assert answer.status_code == 422
        error = answer.json()["error"]
        assert error["field"] == "body" and "not valid JSON" in error["message"], error
    assert "character 14" in index.json()["error"]["message"]  # FastAPI's position
    assert "column 15" in embed.json()["error"]["message"]  # pydantic's line and column


# -- no server paths in answers ----------------------------------------------------------------


def test_bad_artifacts_are_named_without_the_servers_paths(tiny_runs, artifacts, tmp_path):
    inbox, v1, _ = artifacts
    data = bytearray((inbox / v1).read_bytes())
    data[-3] ^= 0xFF  # a tensor byte: the checksum no longer matches
    (inbox / "bad").mkdir(exist_ok=True)
    (inbox / "bad" / "flipped.safetensors").write_bytes(bytes(data))
    app = make_app(tiny_runs, artifacts, tmp_path)

    async def scenario():
        async with running(app) as client:
            by_path = await client.put(
                "/tasks/t", json={"path": "bad/flipped.safetensors"}, headers=KEYS
            )
            uploaded = await client.put("/tasks/t", content=bytes(data), headers=KEYS)
            return by_path, uploaded

    by_path, uploaded = run(scenario())
    for answer in (by_path, uploaded):
        assert answer.status_code == 422, answer.text
        message = answer.json()["error"]["message"]
        assert str(tmp_path) not in message and str(inbox) not in message, message
        assert "checksum" in message, message
    assert by_path.json()["error"]["message"].startswith("bad/flipped.safetensors: ")
    assert uploaded.json()["error"]["message"].startswith("the uploaded artifact: ")


# -- promote -------------------------------------------------------------------------------------


def test_promoting_a_version_never_indexed_is_refused_unless_forced(tiny_runs, artifacts, tmp_path):
    """v1 serves indexed items; v2 is loaded but holds none: promoting it would empty /search
    and evict v1. 409 naming `version`, v1 serves on; force=true promotes (and says so)."""
    _, v1_path, v2_path = artifacts
    app = make_app(tiny_runs, artifacts, tmp_path)
    query = {"task": "t", "query": {"text": "a red square"}}

    async def scenario():
        async with running(app) as client:
            v1 = (await client.put("/tasks/t", json={"path": v1_path}, headers=KEYS)).json()
            item = {"id": "a", "text": "a red square"}
            await client.post("/index", json={"task": "t", "items": [item]}, headers=KEYS)
            v2 = (await client.put("/tasks/t", json={"path": v2_path}, headers=KEYS)).json()
            v2_version = v2["task"]["prompt_version"]
            refused = await client.post(
                "/tasks/t/promote", json={"version": v2_version}, headers=KEYS
            )
            info = (await client.get("/tasks/t", headers=KEYS)).json()
            found = (await client.post("/search", json=query, headers=KEYS)).json()
            forced = await client.post(
                "/tasks/t/promote", json={"version": v2_version, "force": True}, headers=KEYS
            )
            empty = (await client.post("/search", json=query, headers=KEYS)).json()
            return v1["task"]["prompt_version"], v2_version, refused, info, found, forced, empty

    v1, v2, refused, info, found, forced, empty = run(scenario())
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["type"] == "version_not_indexed" and error["field"] == "version"
    assert "force" in error["message"]
    assert info["serving_version"] == v1 and sorted(info["loaded_versions"]) == sorted([v1, v2])
    assert [h["id"] for h in found["hits"]] == ["a"] and found["index_version"] == v1
    assert forced.status_code == 200 and forced.json()["serving_version"] == v2
    assert empty["hits"] == [] and empty["index_version"] == v2


def test_cli_promote_needs_force_for_a_version_never_indexed(
    tiny_runs, artifacts, tmp_path, capsys
):
    _, v1_path, v2_path = artifacts
    app = make_app(tiny_runs, artifacts, tmp_path)
    with serve_on_socket(app) as url:
        put = lambda path: httpx.put(f"{url}/tasks/t", json={"path": path}, headers=KEYS)  # noqa: E731
        put(v1_path).raise_for_status()
        httpx.post(f"{url}/index", json={"task": "t", "items": [{"text": "a"}]}, headers=KEYS)
        v2 = put(v2_path).json()["task"]["prompt_version"]
        base = ["--url", url, "--api-key", API, "--admin-key", ADMIN, "tasks", "promote", "t", v2]
        capsys.readouterr()
        refused = lpi_main(base)
        refused_err = capsys.readouterr().err
        forced = lpi_main([*base, "--force"])
        forced_out = capsys.readouterr().out
    assert (
        refused == 1
        and "409 version_not_indexed" in refused_err
        and "(field: version)" in (refused_err)
    )
    assert forced == 0 and json.loads(forced_out)["serving_version"] == v2
