"""The repeated-text workload: a share of inputs from a small hot set, the rest never seen.

What a cache and in-flight dedupe are measured with. ``repeat`` is the share of inputs that
carry a text of the hot set; every other input is a fresh text, one this stream has never
handed out (warm-up included), so a cache cannot answer it. The share is exact: after ``n``
inputs, ``floor(n * repeat)`` were hot. Hot texts are drawn uniformly from the set with a
seeded generator, so which text comes when is the same on every run of one seed.

Why a hot set of 256 by default: it must be tiny against any cache bound (256 entries of 384
floats are ~1 MB) and few enough to send once before a run (``priming``: the load primes with
it, so a run measures a cache that has seen its hot set). It must also be large against the
clients in flight: 64 callers at 90% repeats hold ~58 hot texts at once, and over 256 texts
about one in ten of those is already in flight, which dedupe, not the cache, answers (the
report shows both counters); a set of 64 would make that most of them.

Fresh texts are the same sequence ``workload.make_texts`` gives for the seed (duplicates and
hot texts skipped), so at ``repeat = 0`` the first 512 requests carry the bytes of today's
generator, which then starts over where this one keeps making new texts. Building a body costs
the client far more CPU than cycling a pre-encoded one, so the load builds the bodies a run will
send before it starts (``RepeatedBodies.prebuild``), in the stream's order: the texts a seed gives
are the same either way; a run that outlasts them builds the rest as it sends them.
"""

from __future__ import annotations

import random
from collections import deque
from urllib.parse import urlsplit

from embedplex.bench.workload import TokenSpec, json_body, make_text, request_path

DEFAULT_HOT_SET = 256

# Consecutive duplicate draws before the stream gives up: texts of a few tokens run out
# (one word: 129 texts), and a stream that loops forever would hang the run.
_MAX_RETRIES = 1000


class TextsExhaustedError(ValueError):
    """No new text of this length can be made: the tokens are too few."""


class FreshTexts:
    """Texts never handed out before by this stream, in ``make_texts`` order for the seed."""

    def __init__(self, tokens: TokenSpec, *, seed: int = 0, exclude: frozenset[str] = frozenset()):
        self._tokens = tokens
        self._rng = random.Random(seed)
        # Hashes, not texts: a long run keeps millions; a rare collision only skips a text.
        self._seen: set[int] = {hash(t) for t in exclude}

    def __call__(self) -> str:
        rng, seen = self._rng, self._seen
        for _ in range(_MAX_RETRIES):
            text = make_text(self._tokens.draw(rng), rng)
            key = hash(text)
            if key not in seen:
                seen.add(key)
                return text
        raise TextsExhaustedError(
            f"no new texts of {self._tokens} tokens after {_MAX_RETRIES} tries: use longer texts"
        )


class RepeatedTexts:
    """Inputs of which exactly ``repeat`` come from a hot set of ``hot_set`` texts."""

    def __init__(
        self,
        tokens: TokenSpec,
        *,
        repeat: float,
        hot_set: int = DEFAULT_HOT_SET,
        seed: int = 0,
    ) -> None:
        check_repeat(repeat, hot_set)
        self.repeat = repeat
        hot_rng = random.Random(f"hot/{seed}")
        hot: list[str] = []
        if repeat > 0:
            distinct = FreshTexts(tokens, seed=hot_rng.randrange(2**32))
            hot = [distinct() for _ in range(hot_set)]
        self.hot = hot
        self._fresh = FreshTexts(tokens, seed=seed, exclude=frozenset(hot))
        self._pick = hot_rng
        self.count = 0
        self.hot_count = 0

    def __call__(self) -> str:
        n = self.count
        self.count = n + 1
        if int((n + 1) * self.repeat) > self.hot_count:
            self.hot_count += 1
            return self.hot[self._pick.randrange(len(self.hot))]
        return self._fresh()


def check_repeat(repeat: float, hot_set: int) -> None:
    if not 0.0 <= repeat <= 1.0:
        raise ValueError(f"repeat must be a share within [0, 1], got {repeat!r}")
    if hot_set < 1:
        raise ValueError(f"hot set must hold at least 1 text, got {hot_set!r}")


class RequestMaker:
    """Whole HTTP requests for ``texts``: the head is encoded once, only the body is new.

    Byte for byte what ``workload.raw_request(url, path, json_body(...))`` gives.
    """

    def __init__(
        self, url: str, *, dialect: str, model: str | None, api_key: str | None = None
    ) -> None:
        path = request_path(url, dialect)
        host = urlsplit(url).netloc or "127.0.0.1"
        self._head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Accept: application/json\r\nContent-Length: "
        ).encode("latin-1")
        tail = f"\r\nAuthorization: Bearer {api_key}" if api_key else ""
        self._tail = (tail + "\r\n\r\n").encode("latin-1")
        self._dialect = dialect
        self._model = model

    def __call__(self, texts: list[str]) -> bytes:
        body = json_body(texts, dialect=self._dialect, model=self._model)
        return self._head + str(len(body)).encode() + self._tail + body


class RepeatedBodies:
    """Request after request of ``inputs_per_request`` texts from one ``RepeatedTexts``."""

    def __init__(self, texts: RepeatedTexts, maker: RequestMaker, inputs_per_request: int) -> None:
        self.texts = texts
        self._maker = maker
        self._n = inputs_per_request
        self._ready: deque[bytes] = deque()

    def __call__(self) -> bytes:
        if self._ready:
            return self._ready.popleft()
        return self._build()

    def _build(self) -> bytes:
        texts = self.texts
        return self._maker([texts() for _ in range(self._n)])

    def prebuild(self, count: int, *, max_bytes: int) -> int:
        """Build the next ``count`` bodies now (at most ``max_bytes`` of them), for the calls
        that follow to hand out in order; returns how many are ready."""
        ready, size = self._ready, sum(len(b) for b in self._ready)
        while len(ready) < count and size < max_bytes:
            body = self._build()
            ready.append(body)
            size += len(body)
        return len(ready)

    def priming(self) -> list[bytes]:
        """Requests that carry each hot text once (not counted in the share)."""
        hot, n = self.texts.hot, self._n
        return [self._maker(hot[i : i + n]) for i in range(0, len(hot), n)]
