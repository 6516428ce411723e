"""`AsyncClient`: the asyncio twin. Its methods mirror `Client`'s one for one (awaited); both run
the plans of clients/base.py, and only `_send`, `_run` and `_sleep` are written here.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx

from clients.base import (
    DEFAULT_CHUNK,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    USER_AGENT,
    BaseClient,
    Plan,
    Retry,
    RetryPolicy,
    mirror_docs,
)
from clients.calls import Call, ImageInput, ItemInput, T
from wire import schema


@mirror_docs
class AsyncClient(BaseClient):
    """An asyncio client of an lpi-serve server; `Client`'s twin, every method awaited.

    `api_key` is sent with queries, `admin_key` with task loads, promotions and unloads (either
    alone is used for both if the other is not given). `retries` (or a `RetryPolicy`) applies
    to 503s and to requests that got no answer. `transport` replaces the network, e.g. with
    `httpx.MockTransport` or `httpx.ASGITransport(app)`.
    """

    _sleep = staticmethod(asyncio.sleep)

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int | RetryPolicy = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key=api_key, admin_key=admin_key, retries=retries)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers={"User-Agent": USER_AGENT},
        )

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _send(self, call: Call) -> Any:
        request = self._request(call)
        for attempt in itertools.count():
            try:
                response = await self._http.request(**request)
            except httpx.TransportError as error:
                outcome = self._failure(call, error, attempt)
            else:
                outcome = self._answer(call, response, attempt)
            if not isinstance(outcome, Retry):
                return outcome
            await self._sleep(outcome.delay)

    async def _run(self, plan: Plan[T]) -> T:
        try:
            call = next(plan)
            while True:
                call = plan.send(await self._send(call))
        except StopIteration as done:
            result: T = done.value
            return result
        finally:
            plan.close()

    # -- the API: each method runs the base's plan of the same name ------------------------------

    async def embed(
        self, texts: Sequence[str] = (), images: Sequence[ImageInput] = (), task: str | None = None
    ) -> schema.EmbedResponse:
        return await self._run(self._embed(texts, images, task))

    async def embed_texts(
        self,
        texts: Sequence[str],
        task: str | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        progress: bool = False,
        numpy: bool = False,
    ) -> schema.EmbedResponse | Any:
        plan = self._embed_texts(texts, task, chunk_size=chunk_size, progress=progress, numpy=numpy)
        return await self._run(plan)

    async def embed_images(
        self,
        images: Sequence[ImageInput],
        task: str | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        progress: bool = False,
        numpy: bool = False,
    ) -> schema.EmbedResponse | Any:
        plan = self._embed_images(
            images, task, chunk_size=chunk_size, progress=progress, numpy=numpy
        )
        return await self._run(plan)

    async def index(self, task: str, items: Iterable[ItemInput]) -> schema.IndexResponse:
        return await self._run(self._index(task, items))

    async def index_many(
        self,
        task: str,
        items: Iterable[ItemInput],
        *,
        chunk_size: int = DEFAULT_CHUNK,
        progress: bool = True,
        skip_existing: bool = False,
        prompt_version: str | None = None,
    ) -> list[schema.IndexResponse]:
        plan = self._index_many(
            task,
            items,
            chunk_size=chunk_size,
            progress=progress,
            skip_existing=skip_existing,
            prompt_version=prompt_version,
        )
        return await self._run(plan)

    async def search(
        self,
        task: str,
        *,
        text: str | None = None,
        image: ImageInput | None = None,
        vector: Sequence[float] | None = None,
        top_k: int = 10,
        filter: Mapping[str, schema.FilterValue] | None = None,
        accept_mismatch: bool = False,
        exact: bool = False,
        hnsw_ef: int | None = None,
    ) -> schema.SearchResponse:
        return await self._run(
            self._search(
                task,
                text=text,
                image=image,
                vector=vector,
                top_k=top_k,
                filter=filter,
                accept_mismatch=accept_mismatch,
                exact=exact,
                hnsw_ef=hnsw_ef,
            )
        )

    async def count_points(
        self, task: str, filter: Mapping[str, schema.FilterValue] | None = None
    ) -> int:
        return await self._run(self._count_points(task, filter))

    async def list_points(
        self,
        task: str,
        filter: Mapping[str, schema.FilterValue] | None = None,
        *,
        limit: int = 100,
        offset: str | None = None,
    ) -> schema.PointsResponse:
        return await self._run(self._list_points(task, filter, limit=limit, offset=offset))

    async def all_points(
        self,
        task: str,
        filter: Mapping[str, schema.FilterValue] | None = None,
        *,
        page_size: int = 1000,
    ) -> list[schema.StoredPoint]:
        return await self._run(self._all_points(task, filter, page_size=page_size))

    async def delete_points(
        self,
        task: str,
        ids: Sequence[str] | None = None,
        filter: Mapping[str, schema.FilterValue] | None = None,
    ) -> int:
        return await self._run(self._delete_points(task, ids, filter))

    async def list_tasks(self) -> schema.TaskList:
        return await self._run(self._list_tasks())

    async def get_task(self, task: str) -> schema.TaskInfo:
        return await self._run(self._get_task(task))

    async def load_task(
        self,
        task: str,
        path_or_bytes: str | os.PathLike[str] | bytes | None = None,
        *,
        server_path: str | None = None,
        promote: bool = False,
    ) -> schema.LoadTaskResponse:
        plan = self._load_task(task, path_or_bytes, server_path=server_path, promote=promote)
        return await self._run(plan)

    async def promote(self, task: str, version: str, *, force: bool = False) -> schema.TaskInfo:
        return await self._run(self._promote(task, version, force=force))

    async def unload_task(
        self, task: str, *, delete_vectors: bool = False
    ) -> schema.UnloadResponse:
        return await self._run(self._unload_task(task, delete_vectors=delete_vectors))

    async def health(self) -> schema.Health:
        return await self._run(self._health())

    async def ready(self) -> schema.Readiness:
        return await self._run(self._ready())

    async def metrics(self) -> str:
        return await self._run(self._metrics())
