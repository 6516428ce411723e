"""Fuzzing: schemathesis drives every operation of the OpenAPI schema, valid and invalid inputs.

The server runs on a loopback socket with a task loaded and an admin key (so generated loads
and unloads are refused before they touch anything); the property checked is that no input,
however malformed, yields a 5xx, and that every 4xx is our JSON error body. A stateful run
then chains operations through OpenAPI links added to the served schema (index -> search ->
unload -> search -> reload -> index ...), with the admin key, on the loaded task's name.
"""

from __future__ import annotations

import collections
import itertools
import logging

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402

from tests.server_helpers import create_app, export_artifacts, serve_on_socket  # noqa: E402
from tests.server_helpers import settings as server_settings  # noqa: E402

MAX_EXAMPLES = 40  # per operation and mode: bounded for CI (well under a minute in all)


@pytest.fixture(scope="module")
def served(tiny_runs, tmp_path_factory):
    """(base URL, the loaded artifact's path in the inbox) of a server with task "t" loaded."""
    import httpx

    inbox = tmp_path_factory.mktemp("inbox")
    files = export_artifacts(tiny_runs, inbox)
    config = server_settings(
        tiny_runs,
        tmp_path_factory.mktemp("data"),
        inbox,
        admin_key="fuzz-admin",
        max_items=8,
        max_body_bytes=256 * 1024,
    )
    with serve_on_socket(create_app(config)) as url:
        path = str(files["lpi"][0].relative_to(inbox))
        loaded = httpx.put(
            f"{url}/tasks/t",
            json={"path": path},
            headers={"authorization": "Bearer fuzz-admin"},
        )
        assert loaded.status_code == 200, loaded.text
        yield url, path


@pytest.fixture(scope="module")
def api_schema(served):
    url, _ = served
    return schemathesis.openapi.from_url(f"{url}/openapi.json")


def check_response(case, response) -> None:
    """No 5xx; every 4xx a JSON error body naming a field: ours (`field`), or OpenAI's shape
    (`param`), which the OpenAI-compatible routes answer in for OpenAI's clients."""
    where = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, (where, case.body, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, (where, body)
        assert {"type", "message"} <= set(body["error"]), (where, body)
        named = body["error"].get("field") or body["error"].get("param")
        assert named, (where, body)  # every 4xx names a field


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize(
    ("mode", "admin"), [("positive", False), ("negative", False), ("positive", True)]
)
def test_no_input_makes_a_server_error(api_schema, mode, admin):
    """Every operation, MAX_EXAMPLES generated requests each (schemathesis over hypothesis);
    with the admin key, generated loads, promotions and unloads reach the registry."""
    headers = {"authorization": "Bearer fuzz-admin"} if admin else None
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    generation = schemathesis.GenerationMode(mode)
    checked = []
    for operation in operations(api_schema):

        @given(case=operation.as_strategy(generation_mode=generation))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case):
            check_response(case, case.call(timeout=30, headers=headers))

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid (e.g. GET /healthz has no input)
            assert mode == "negative", operation.label
            continue
        checked.append(operation.label)
    # Every route with inputs was fuzzed (positive: all of them).
    assert len(checked) >= (10 if mode == "positive" else 6), checked


# -- stateful: chains through OpenAPI links -----------------------------------------------------

ADMIN = {"authorization": "Bearer fuzz-admin"}
SEARCH = "search_search_post"
LINKS = {  # (path, method) -> link name -> link (OpenAPI 3 "links" of its 200 response)
    ("/index", "post"): {
        "SearchIt": {"operationId": SEARCH, "requestBody": {"task": "$request.body#/task"}},
        "UnloadIt": {
            "operationId": "unload_task_tasks__task__delete",
            "parameters": {"path.task": "$request.body#/task"},
        },
    },
    ("/tasks/{task}", "delete"): {
        "SearchGone": {"operationId": SEARCH, "requestBody": {"task": "$response.body#/task"}},
        "IndexGone": {
            "operationId": "index_index_post",
            "requestBody": {"task": "$response.body#/task"},
        },
        "Reload": {
            "operationId": "load_task_tasks__task__put",
            "parameters": {"path.task": "$response.body#/task"},
        },
    },
    ("/tasks/{task}", "put"): {
        "IndexAgain": {
            "operationId": "index_index_post",
            "requestBody": {"task": "$response.body#/task/task"},
        },
    },
}
STATEFUL = settings(
    max_examples=40,
    stateful_step_count=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def linked_schema(raw: dict, artifact: str) -> dict:
    """The served schema with LINKS added, and task names held to the loaded task ("t"), so a
    chain meets real state instead of 404s; a reload names the same artifact."""
    for (path, method), links in LINKS.items():
        responses = raw["paths"][path][method]["responses"]
        responses["200"]["links"] = links
    for name in ("IndexRequest", "SearchRequest"):
        raw["components"]["schemas"][name]["properties"]["task"] = {"type": "string", "enum": ["t"]}
    schemas = raw["components"]["schemas"]
    text = {"type": "string", "pattern": "^[a-z]{1,12}( [a-z]{1,12}){0,3}$"}
    keeps = {
        "IndexRequest": ("task", "items"),
        "IndexItem": ("id", "text", "payload"),
        "SearchQuery": ("text",),
    }
    for name, keep in keeps.items():
        # texts only (generated base64 is rarely an image), and no NUL, so chains go on
        model = schemas[name]
        model["properties"] = {k: v for k, v in model["properties"].items() if k in keep}
        model["properties"] |= {"text": text} if "text" in keep else {}
        model["required"] = [k for k in ("task", "items", "text") if k in keep]
    raw["components"]["schemas"]["IndexRequest"]["properties"]["items"]["maxItems"] = 4
    load = {
        "type": "object",
        "required": ["path"],
        "additionalProperties": False,
        "properties": {
            "path": {"type": "string", "enum": [artifact]},
            "promote": {"type": "boolean"},
        },
    }
    body = raw["paths"]["/tasks/{task}"]["put"]["requestBody"]
    body["content"] = {"application/json": {"schema": load}}  # a path, no upload
    return raw


def test_stateful_chains_make_no_server_error(served):
    """index -> search -> unload -> search -> reload chains (schemathesis's state machine over
    hypothesis, with the admin key): no 5xx, every 4xx our JSON error body, and the chains
    really ran (a search after an index, a search after an unload)."""
    import httpx

    url, artifact = served
    raw = linked_schema(httpx.get(f"{url}/openapi.json").json(), artifact)
    schema = schemathesis.openapi.from_dict(raw)
    schema.config.base_url = url
    # Only the links above: schemathesis's own inference reads ids out of earlier responses
    # (load times, counts), which hypothesis would see as data generation changing under it.
    schema.config.phases.stateful.inference.algorithms = []
    seen: list[tuple[str, int]] = []

    class Chains(schema.as_state_machine()):
        def setup(self):  # every scenario starts from the same state: "t" loaded
            httpx.put(f"{url}/tasks/t", json={"path": artifact}, headers=ADMIN).raise_for_status()

        def get_call_kwargs(self, case):
            return {"headers": ADMIN, "timeout": 30}

        def after_call(self, response, case):
            super().after_call(response, case)
            seen.append((f"{case.method} {case.path}", response.status_code))

        def validate_response(self, response, case, **kwargs):
            check_response(case, response)

    try:
        Chains.run(settings=STATEFUL)
    finally:  # leave the task loaded for any test after this one
        httpx.put(f"{url}/tasks/t", json={"path": artifact}, headers=ADMIN)
    steps = sorted(collections.Counter(seen).items())
    logging.getLogger("tests.fuzz").info("stateful steps (operation, status) -> count: %s", steps)
    pairs = set(itertools.pairwise(seen))
    assert any(a == ("POST /index", 200) and b[0] == "POST /search" for a, b in pairs), str(steps)
    assert any(a == ("DELETE /tasks/{task}", 200) and b[0] != a[0] for a, b in pairs), str(steps)
