"""The SDK's retries and error mapping through both twins, on `httpx.MockTransport`: which
statuses are retried, with what backoff, how Retry-After is honoured, and which typed error
each answer becomes. Sleeps are recorded, never slept.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from clients import (
    AuthError,
    BadRequestError,
    ConflictError,
    ConnectionFailed,
    InvalidResponseError,
    LpiError,
    NotFoundError,
    OverloadedError,
    RetryPolicy,
    ServerError,
    VersionChangedError,
    text_item,
)

API, ADMIN = "query-key", "admin-key"

# -- retries and error mapping, on a mock transport ---------------------------------------------


class Script:
    """A MockTransport handler answering from a list, one entry per request, counting them."""

    def __init__(self, *answers) -> None:
        self.answers, self.requests = list(answers), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        # A fresh response each time: one is read once, by one client.
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)


def error(status: int, kind: str = "x", field: str | None = None, **headers) -> httpx.Response:
    body = {"error": {"type": kind, "message": f"{kind} happened", "field": field}}
    return httpx.Response(status, json=body, headers=headers)


OK = httpx.Response(200, json={"status": "ok"})


def test_503_is_retried_with_backoff_and_jitter(connect):
    script = Script(error(503, "overloaded"), error(503, "overloaded"), OK)
    client = connect(transport=httpx.MockTransport(script))
    assert client.health().status == "ok"
    assert len(script.requests) == 3
    first, second = client.sleeps  # halves of 0.5 s, then of 1 s
    assert 0.25 <= first <= 0.5 and 0.5 <= second <= 1.0


def test_retry_after_is_honoured_and_capped(connect):
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    script = Script(
        error(503, **{"Retry-After": "7"}),
        error(503, **{"Retry-After": "1000"}),
        error(503, **{"Retry-After": later}),
        OK,
    )
    client = connect(transport=httpx.MockTransport(script))
    client.health()
    assert len(script.requests) == 4
    seven, capped, date = client.sleeps
    assert 7 <= seven <= 7.7 and capped == RetryPolicy().max_retry_after and 18 <= date <= 22


def test_retries_exhausted_raise_overloaded(connect):
    script = Script(error(503, "overloaded", **{"Retry-After": "2"}))
    client = connect(transport=httpx.MockTransport(script), retries=RetryPolicy(retries=2))
    with pytest.raises(OverloadedError) as err:
        client.list_tasks()
    assert len(script.requests) == 3 and len(client.sleeps) == 2
    assert (err.value.status, err.value.type, err.value.retry_after) == (503, "overloaded", 2.0)
    assert isinstance(err.value, ServerError)

    no_retries = Script(error(503))
    with pytest.raises(OverloadedError):
        connect(transport=httpx.MockTransport(no_retries), retries=0).health()
    assert len(no_retries.requests) == 1


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, BadRequestError),
        (401, AuthError),
        (403, AuthError),
        (404, NotFoundError),
        (409, ConflictError),
        (413, BadRequestError),
        (422, BadRequestError),
    ],
)
def test_4xx_is_never_retried(connect, status, expected):
    script = Script(error(status, "refused", "texts"))
    client = connect(transport=httpx.MockTransport(script))
    with pytest.raises(expected) as err:
        client.embed_texts(["a"])
    assert len(script.requests) == 1 and not client.sleeps
    assert (err.value.status, err.value.type, err.value.field) == (status, "refused", "texts")
    assert str(err.value) == f"{status} refused: refused happened (field: texts)"


@pytest.mark.parametrize("status", [500, 502, 504])
def test_other_5xx_are_never_retried(connect, status):
    answer = error(500, "internal") if status == 500 else httpx.Response(status, text="<html>")
    script = Script(answer)
    with pytest.raises(ServerError) as err:
        connect(transport=httpx.MockTransport(script)).index("t", [text_item("a")])
    assert len(script.requests) == 1 and not isinstance(err.value, OverloadedError)
    assert err.value.status == status
    if status != 500:
        assert (err.value.type, err.value.message, err.value.body) == (
            "http_error",
            "<html>",
            "<html>",
        )


@pytest.mark.parametrize(
    "failure", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.ReadError("reset")]
)
def test_lost_connections_are_retried(connect, failure):
    script = Script(failure, failure, OK)
    client = connect(transport=httpx.MockTransport(script))
    assert client.health().status == "ok" and len(script.requests) == 3

    always = Script(failure)
    client = connect(transport=httpx.MockTransport(always))
    with pytest.raises(ConnectionFailed) as err:
        client.health()
    assert len(always.requests) == 4 and err.value.status is None
    timeout = isinstance(failure, httpx.TimeoutException)
    assert err.value.type == ("timeout" if timeout else "connection_failed")


def test_not_ready_is_an_answer_not_a_retry(connect):
    body = {
        "ready": False,
        "backbone": "b",
        "engine": "torch",
        "tasks": 0,
        "queue_rows": 9,
        "reasons": ["the queue is full"],
    }
    script = Script(httpx.Response(503, json=body))
    ready = connect(transport=httpx.MockTransport(script)).ready()
    assert not ready.ready and ready.reasons == ["the queue is full"]
    assert len(script.requests) == 1


def test_keys_go_to_their_calls_and_bodies_are_checked(connect):
    script = Script(httpx.Response(200, json={"tasks": []}), httpx.Response(200, text="nope"))
    client = connect(transport=httpx.MockTransport(script), api_key=API, admin_key=ADMIN)
    client.list_tasks()
    with pytest.raises(InvalidResponseError) as err:
        client.unload_task("t", delete_vectors=True)
    sent = script.requests
    assert sent[0].headers["authorization"] == f"Bearer {API}"
    assert sent[1].headers["authorization"] == f"Bearer {ADMIN}"
    assert sent[1].url.params["delete_vectors"] == "true" and err.value.status == 200


def test_chunks_of_two_prompt_versions_are_refused(connect):
    def answer(version: str) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "task": "t",
                "prompt_version": version,
                "backbone": "b",
                "text_embeddings": [[1.0, 0.0]],
                "prompt_versions": {"t": version},
            },
        )

    client = connect(transport=httpx.MockTransport(Script(answer("v1"), answer("v2"))))
    with pytest.raises(VersionChangedError) as err:
        client.embed_texts(["a", "b"], "t", chunk_size=1)
    assert err.value.field == "task" and isinstance(err.value, LpiError)


NOT_SAFE_TWICE = {  # a second send may answer differently for work the first one did
    "unload": lambda c: c.unload_task("t"),
    "load": lambda c: c.load_task("t", b"artifact"),
    "delete points": lambda c: c.delete_points("t", ids=["a"]),
}


@pytest.mark.parametrize("failure", [httpx.ReadTimeout("slow"), httpx.ReadError("reset")])
@pytest.mark.parametrize("call", list(NOT_SAFE_TWICE))
def test_a_lost_answer_to_a_call_not_safe_twice_is_not_resent(connect, failure, call):
    """The server may have done it before the answer was lost: the error says so instead."""
    script = Script(failure, OK)
    client = connect(transport=httpx.MockTransport(script))
    with pytest.raises(ConnectionFailed) as err:
        NOT_SAFE_TWICE[call](client)
    assert len(script.requests) == 1
    assert "may have done it" in str(err.value)


@pytest.mark.parametrize(
    "failure",
    [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow"), httpx.PoolTimeout("full")],
)
@pytest.mark.parametrize("call", list(NOT_SAFE_TWICE))
def test_a_connection_that_never_opened_is_resent_for_any_call(connect, failure, call):
    script = Script(failure, httpx.Response(200, text="not the schema"))
    client = connect(transport=httpx.MockTransport(script))
    with pytest.raises(InvalidResponseError):  # the second send was answered (by a mock body)
        NOT_SAFE_TWICE[call](client)
    assert len(script.requests) == 2


@pytest.mark.parametrize(
    "call", [lambda c: c.search("t", text="a"), lambda c: c.promote("t", "v2")]
)
def test_a_lost_answer_to_a_call_safe_twice_is_resent(connect, call):
    script = Script(httpx.ReadTimeout("slow"), httpx.Response(200, text="not the schema"))
    client = connect(transport=httpx.MockTransport(script))
    with pytest.raises(InvalidResponseError):
        call(client)
    assert len(script.requests) == 2
