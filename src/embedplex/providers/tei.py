"""Hugging Face TEI ``POST /embed`` and ``POST /rerank``; the batch limit (texts or documents
per call, ``max_client_batch_size``) and what the upstream serves come from ``GET /info``.

``/info`` sits beside the embed path (``http://host/tei/embed`` -> ``http://host/tei/info``),
and is read at start and again whenever it is due: before the next call after a start that
could not read it (at most every ``INFO_RETRY_S``), and after a call refused for its size
(the upstream's limits changed: perhaps it was redeployed, perhaps with another model). Until
it is read the limit is TEI's default, and a refusal that names the limit teaches it at once
(``HttpProvider.sized``: TEI answers "batch size 64 > maximum allowed batch size 32", 422
since 2026-02, 413 before).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx

from embedplex.core.errors import UpstreamError
from embedplex.providers.adapter import HttpProvider, decode_vectors, parse_ranked, sibling_url
from embedplex.providers.base import Embeddings, EmbedParams, RerankParams, Scores
from embedplex.providers.config import ProviderConfig

logger = logging.getLogger(__name__)

# Seconds between reads of an /info that could not be read (the upstream may come up later).
INFO_RETRY_S = 5.0
# The longest a read of /info before a call may hold that call.
INFO_TIMEOUT_S = 5.0


class TEIProvider(HttpProvider):
    type = "tei"
    path = "/embed"
    max_texts = 32  # TEI's default --max-client-batch-size, until /info says otherwise
    max_documents = 32  # /rerank is held to the same --max-client-batch-size
    served: str | None = None  # "model_id@model_sha" from /info, once read
    supported = frozenset({"truncate", "dimensions", "prompt_name", "truncation_direction"})
    rerank_supported = frozenset({"truncate", "truncation_direction", "raw_scores"})

    def __init__(self, config: ProviderConfig, client: httpx.AsyncClient) -> None:
        super().__init__(config, client)
        self.info_url = sibling_url(self.url, "info")
        # When /info is to be read next (time.monotonic()); None: read, nothing due.
        self._info_due: float | None = 0.0
        self._info_lock = asyncio.Lock()
        # The least limit a refusal named: /info read later cannot raise the limit past it (an
        # upstream whose replicas disagree would otherwise be refused after every read).
        self._refused_at: int | None = None
        self._info_failed = False  # the last read failed (logged once)

    async def start(self) -> None:
        await super().start()
        await self._read_info(self.config.timeout_s)
        if self._info_due is not None:
            self._info_due = 0.0  # not read: read before the first call, whenever it comes

    async def _read_info(self, timeout: float) -> None:  # noqa: ASYNC109 (one GET's own limit)
        try:
            response = await self.transport.client.get(
                self.info_url, headers=self._headers, timeout=timeout
            )
            response.raise_for_status()
            info = response.json()
            limit = max(1, int(info["max_client_batch_size"]))
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            # The upstream may come up later: read again before a call once due; until then
            # TEI's default limit holds, and a refusal that names the real one teaches it.
            log = logger.debug if self._info_failed else logger.warning  # say why once
            log("provider %s: could not read %s (%s)", self.name, self.info_url, exc)
            self._info_failed = True
            self._info_due = time.monotonic() + INFO_RETRY_S
            return
        self._info_due = None
        if self._refused_at is not None:
            limit = min(limit, self._refused_at)
        # What the upstream serves, for the cache's keys (providers/cached.py): a TEI
        # provider rarely names its model, so its URL alone would outlive a redeploy.
        self.served = f"{info.get('model_id')}@{info.get('model_sha')}"
        self._set_limit(limit)
        if self._info_failed:
            logger.info("provider %s: %s read: %d per call", self.name, self.info_url, limit)
            self._info_failed = False

    async def prepare(self) -> None:
        """Read /info before this call if it is due (one read for the calls that wait)."""
        due = self._info_due
        if due is None or time.monotonic() < due:
            return
        async with self._info_lock:
            due = self._info_due
            if due is not None and time.monotonic() >= due:
                await self._read_info(min(self.config.timeout_s, INFO_TIMEOUT_S))

    def learn_items(self, n: int, *, documents: bool) -> None:
        """TEI holds texts and documents to one limit (``embed`` makes /info due as well)."""
        self._refused_at = n if self._refused_at is None else min(n, self._refused_at)
        self._set_limit(min(n, self._limits.max_texts, self._limits.max_documents))

    def _set_limit(self, limit: int) -> None:
        """Texts and documents per call; new ``limits`` only when they change (the runtime
        resizes its lanes on a new one)."""
        if (self._limits.max_texts, self._limits.max_documents) != (limit, limit):
            self._limits = dataclasses.replace(self._limits, max_texts=limit, max_documents=limit)

    def sized(
        self, error: UpstreamError, costs: Sequence[int], *, documents: bool = False
    ) -> UpstreamError:
        """As any adapter's; a refusal of a call's size also makes /info due (the upstream
        changed its limit since it was read: perhaps redeployed, perhaps with another model)."""
        out = super().sized(error, costs, documents=documents)
        if out is not error:
            self._info_due = time.monotonic()
        return out

    def body(self, texts: list[str], params: EmbedParams) -> dict[str, Any]:
        body: dict[str, Any] = {"inputs": texts, "normalize": params.normalize}
        if params.truncate is not None:
            body["truncate"] = params.truncate
        if params.truncation_direction.value != "right":
            body["truncation_direction"] = params.truncation_direction.value.capitalize()
        if params.prompt_name is not None:
            body["prompt_name"] = params.prompt_name
        if params.dimensions is not None:
            body["dimensions"] = params.dimensions
        return body

    def parse(self, data: Any, headers: httpx.Headers) -> Embeddings:
        tokens = headers.get("x-compute-tokens")
        return Embeddings(decode_vectors(data), int(tokens) if tokens else None)

    def rerank_body(self, query: str, documents: list[str], params: RerankParams) -> dict[str, Any]:
        body: dict[str, Any] = {"query": query, "texts": documents, "raw_scores": params.raw_scores}
        if params.truncate is not None:
            body["truncate"] = params.truncate
        if params.truncation_direction.value != "right":
            body["truncation_direction"] = params.truncation_direction.value.capitalize()
        return body

    def parse_rerank(self, data: Any, headers: httpx.Headers, n: int) -> Scores:
        tokens = headers.get("x-compute-tokens")
        return Scores(parse_ranked(data, n, "score"), int(tokens) if tokens else None)
