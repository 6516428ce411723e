"""Fuzzing: schemathesis drives every operation of the OpenAPI schema, valid and invalid inputs.

The server runs on a loopback socket with a task loaded and an admin key (so generated loads
and unloads are refused before they touch anything); the property checked is that no input,
however malformed, yields a 5xx, and that every 4xx is our JSON error body.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402

from tests.server_helpers import create_app, export_artifacts, serve_on_socket  # noqa: E402
from tests.server_helpers import settings as server_settings  # noqa: E402

MAX_EXAMPLES = 40  # per operation and mode: bounded for CI (well under a minute in all)


@pytest.fixture(scope="module")
def api_schema(tiny_runs, tmp_path_factory):
    import httpx

    inbox = tmp_path_factory.mktemp("inbox")
    files = export_artifacts(tiny_runs, inbox)
    config = server_settings(
        tiny_runs, tmp_path_factory.mktemp("data"), inbox, admin_key="fuzz-admin",
        max_items=8, max_body_bytes=256 * 1024,
    )  # fmt: skip
    with serve_on_socket(create_app(config)) as url:
        path = str(files["lpi"][0].relative_to(inbox))
        loaded = httpx.put(
            f"{url}/tasks/t", json={"path": path},
            headers={"authorization": "Bearer fuzz-admin"},
        )  # fmt: skip
        assert loaded.status_code == 200, loaded.text
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


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
            max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
            derandomize=True, database=None,
        )  # fmt: skip
        def check(case):
            response = case.call(timeout=30, headers=headers)
            where = f"{case.method} {case.formatted_path}"
            assert response.status_code < 500, (where, case.body, response.text[:500])
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"}, (where, body)
                assert {"type", "message", "field"} <= set(body["error"]), (where, body)

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid (e.g. GET /healthz has no input)
            assert mode == "negative", operation.label
            continue
        checked.append(operation.label)
    # Every route with inputs was fuzzed (positive: all of them).
    assert len(checked) >= (10 if mode == "positive" else 6), checked
