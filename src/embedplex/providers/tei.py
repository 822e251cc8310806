"""Hugging Face TEI ``POST /embed`` and ``POST /rerank``; the batch limit (texts or documents
per call, ``max_client_batch_size``) and what the upstream serves come from ``GET /info``.

``/info`` sits beside the embed path (``http://host/tei/embed`` -> ``http://host/tei/info``,
the endpoint's query kept: a key may travel there), and is read at start and again whenever it
is due: after a start that could not read it (first at the next call, then ``INFO_RETRY_S``
after a failed read, doubling with each failure up to ``INFO_RETRY_MAX_S``), after a call
refused for its size (the upstream's limits changed: perhaps it was redeployed, perhaps with
another model), and when limits learned from refusals expire. A read after start runs in the
background, started by the call that finds it due: no call waits for it, and none is held by
an /info that hangs or trickles (each read has ``INFO_TIMEOUT_S`` in all). Until it is read the
limit is TEI's default, and a refusal that names the limit teaches it at once
(``HttpProvider.sized``: TEI answers "batch size 64 > maximum allowed batch size 32", 422
since 2026-02, 413 before).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from embedplex.providers.http import query_secrets, sanitize

logger = logging.getLogger(__name__)

# Seconds before an /info that could not be read is read again (the upstream may come up
# later): this after the first failure, twice as long after each one after it, up to the max.
INFO_RETRY_S = 5.0
INFO_RETRY_MAX_S = 300.0
# The longest one read of /info may take, in all (headers and body: a trickling answer too).
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
        self._info_shown = self.info_url.partition("?")[0]  # for the log: no query, no key
        # When /info is to be read next (time.monotonic()); None: read, nothing due.
        self._info_due: float | None = 0.0
        self._info_failures = 0  # reads failed in a row (the first is logged as a warning)
        self._info_task: asyncio.Task[None] | None = None  # the read under way, if any

    async def start(self) -> None:
        await super().start()
        await self._read_info()
        if self._info_due is not None:
            self._info_due = 0.0  # not read: read again at the first call, whenever it comes

    async def close(self) -> None:
        task, self._info_task = self._info_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().close()

    async def _read_info(self) -> None:
        """One read of /info, at most ``INFO_TIMEOUT_S`` (and ``timeout_s``) in all."""
        limit = min(self.config.timeout_s, INFO_TIMEOUT_S)
        try:
            # In all: the client's own timeouts are per read, and restart with every byte.
            async with asyncio.timeout(limit):
                response = await self.transport.client.get(
                    self.info_url, headers=self._headers, timeout=limit
                )
            if not 200 <= response.status_code < 300:
                # Not raise_for_status: its text holds the URL, and the URL may hold a key.
                raise ValueError(f"answered {response.status_code}")
            info = response.json()
            most = int(info["max_client_batch_size"])
            if most < 1:
                raise ValueError(f"max_client_batch_size {most}")
        except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError) as exc:
            # The upstream may come up later: read again once due; until then the limit
            # holds, and a refusal that names the real one teaches it.
            self._info_failures += 1
            wait = min(INFO_RETRY_MAX_S, INFO_RETRY_S * 2.0 ** (self._info_failures - 1))
            self._info_due = time.monotonic() + wait
            if isinstance(exc, TimeoutError):
                why = f"no answer within {limit:g}s"
            else:
                why = sanitize(f"{type(exc).__name__}: {exc}", query_secrets(self.info_url))
            log = logger.warning if self._info_failures == 1 else logger.debug  # say why once
            log(
                "provider %s: could not read %s (%s); again in %.0fs",
                self.name,
                self._info_shown,
                why,
                wait,
            )
            return
        self._info_due = None
        # What the upstream serves, for the cache's keys (providers/cached.py): a TEI
        # provider rarely names its model, so its URL alone would outlive a redeploy.
        self.served = f"{info.get('model_id')}@{info.get('model_sha')}"
        self._set_limit(most)
        if self._info_failures:
            logger.info("provider %s: %s read: %d per call", self.name, self._info_shown, most)
            self._info_failures = 0

    async def prepare(self) -> None:
        """Start a read of /info when one is due, in the background: this call goes on with
        the limits known now (one read at a time)."""
        due = self._info_due
        if due is None or self._info_task is not None or time.monotonic() < due:
            return
        self._info_task = asyncio.create_task(self._refresh(), name=f"{self.name} /info")

    async def _refresh(self) -> None:
        try:
            await self._read_info()
        finally:
            self._info_task = None

    def learn_items(self, n: int, *, documents: bool) -> None:
        """TEI holds texts and documents to one limit (``sized`` makes /info due as well)."""
        self._learn(max_texts=n, max_documents=n)

    def _forget(self) -> None:
        """As any adapter's; /info is read again too (what the upstream takes now)."""
        super()._forget()
        if self._info_due is None:
            self._info_due = time.monotonic()

    def _set_limit(self, limit: int) -> None:
        """What /info said: texts and documents per call. A limit a refusal taught stays
        below it while it lasts (an upstream whose replicas disagree would otherwise be
        refused after every read). New ``limits`` only when they change (the runtime resizes
        its lanes on a new one)."""
        learned = self._learned_at is not None and self._limits.max_texts < self._told.max_texts
        self._told = dataclasses.replace(self._told, max_texts=limit, max_documents=limit)
        if learned:
            limit = min(limit, self._limits.max_texts)
        if (self._limits.max_texts, self._limits.max_documents) != (limit, limit):
            self._limits = dataclasses.replace(self._limits, max_texts=limit, max_documents=limit)

    def sized(
        self, error: UpstreamError, costs: Sequence[int], *, documents: bool = False
    ) -> UpstreamError:
        """As any adapter's; a refusal of a call's size also makes /info due, where it was
        read (the upstream changed its limit since: perhaps redeployed, perhaps with another
        model); where it could not be, its reads keep their back-off."""
        out = super().sized(error, costs, documents=documents)
        if out is not error and self._info_due is None:
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
