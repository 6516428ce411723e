"""The SDK's side of the fleet, through both twins on `httpx.MockTransport` (no Ray): a call
naming one task carries it in Ray Serve's routing header (`serve_multiplexed_model_id`); a
replica loading the task (409 + Retry-After) is retried, and a replica lost under a call (Ray's
proxy answers a plain-text 500) for a call safe to repeat (reads, /embed, /index with the SDK's
ids); never a load, a delete, a promote or an unload; the server's own errors never.
"""

from __future__ import annotations

import httpx
import pytest

from clients import ConflictError, InvalidResponseError, ServerError, text_item

HEADER = "serve_multiplexed_model_id"
EMBED = {
    "task": "t",
    "prompt_version": "v1",
    "backbone": "b",
    "text_embeddings": [[1.0, 0.0]],
    "prompt_versions": {"t": "v1"},
}


class Script:
    """Answers from a list, one per request (the last one repeated); the requests seen."""

    def __init__(self, *answers: httpx.Response) -> None:
        self.answers, self.requests = list(answers), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)


def refusal(status: int, kind: str, **headers) -> httpx.Response:
    body = {"error": {"type": kind, "message": f"{kind} happened", "field": "task"}}
    return httpx.Response(status, json=body, headers=headers)


RAY_500 = httpx.Response(500, text="ActorDiedError: The actor died unexpectedly")


def test_a_call_naming_one_task_carries_the_routing_header(connect):
    script = Script(httpx.Response(200, json=EMBED))
    client = connect(transport=httpx.MockTransport(script))
    client.embed_texts(["a"], "t")
    client.embed_texts(["a"], "auto")  # routed by task keys on the replica: no one task
    client.embed_texts(["a"])  # the default task
    for call in (  # answered with an embedding: only what was sent matters here
        lambda: client.search("t", text="stripes"),
        lambda: client.index("u", [text_item("a")]),
        client.list_tasks,
    ):
        with pytest.raises(InvalidResponseError):
            call()
    sent = [request.headers.get(HEADER) for request in script.requests]
    assert sent == ["t", None, None, "t", "u", None]


def test_a_loading_task_is_retried_after_its_retry_after(connect):
    loading = refusal(409, "conflict", **{"Retry-After": "1"})
    script = Script(loading, loading, httpx.Response(200, json=EMBED))
    client = connect(transport=httpx.MockTransport(script))
    assert client.embed_texts(["a"], "t").prompt_version == "v1"
    assert len(script.requests) == 3 and all(1 <= s <= 1.1 for s in client.sleeps)

    plain = Script(refusal(409, "conflict"))  # a real conflict: no Retry-After, no retry
    with pytest.raises(ConflictError):
        connect(transport=httpx.MockTransport(plain)).embed_texts(["a"], "t")
    assert len(plain.requests) == 1


def test_a_replica_lost_under_a_call_is_retried_only_if_the_call_is_safe_to_repeat(connect):
    script = Script(RAY_500, httpx.Response(200, json=EMBED))
    client = connect(transport=httpx.MockTransport(script))
    assert client.embed_texts(["a"], "t").prompt_version == "v1"
    assert len(script.requests) == 2 and len(client.sleeps) == 1

    repeatable = (  # each retried (answered with an embedding: only the count matters here)
        lambda c: c.search("t", text="stripes"),
        lambda c: c.index("t", [text_item("a")]),
        lambda c: c.count_points("t"),
        lambda c: c.list_tasks(),
        lambda c: c.promote("t", "v2"),  # the same state and answer a second time
    )
    for call in repeatable:
        again = Script(RAY_500, httpx.Response(200, json=EMBED))
        with pytest.raises(InvalidResponseError):
            call(connect(transport=httpx.MockTransport(again)))
        assert len(again.requests) == 2

    # Each may have done its work before the proxy's 500: sent again, a delete would report
    # `deleted: 0` and a load `changed: False`. Not repeated.
    once = (
        lambda c: c.unload_task("t"),
        lambda c: c.delete_points("t", ids=["a"]),
        lambda c: c.load_task("t", b"artifact"),
    )
    for call in once:
        lost = Script(RAY_500)
        with pytest.raises(ServerError) as err:
            call(connect(transport=httpx.MockTransport(lost)))
        assert len(lost.requests) == 1 and err.value.status == 500

    own = Script(refusal(500, "internal"))  # the server's own 500: never repeated
    with pytest.raises(ServerError):
        connect(transport=httpx.MockTransport(own)).embed_texts(["a"], "t")
    assert len(own.requests) == 1
