"""The pipeline's ``RateLimit`` stage: a tenant's key limits, and the headers that tell them.

Runs after authentication, for requests whose tenant has a key id and at least one limit;
anonymous requests, open paths (probes, metrics, docs) and the admin API pass untouched. An
admitted request holds its key's concurrency slot until the pipeline finishes it (answer ready,
error, client gone, task cancelled: ``Exchange.at_finish``). A key with ``tpm`` reserves a
request's tokens (counted, bounded or estimated) just before its inputs queue
(``_Release._reserve``, through ``core/spend.py``: refused with the same 429 as at admission
when a parallel request's reservation left less than one token), and at the finish is charged
its tokens less that reservation: the answer's, or for a request that ended without one, those
of its inputs that ran.

Every answer to a limited key carries OpenAI's headers (``x-ratelimit-limit-requests``,
``-remaining-requests``, ``-reset-requests`` and the ``-tokens`` three), refusals as well; a
refusal is a 429 with ``Retry-After`` (whole seconds) and ``retry-after-ms``, which the OpenAI
clients prefer.
"""

from __future__ import annotations

from collections.abc import Awaitable

from embedplex.api.pipeline import Exchange
from embedplex.core.errors import KeyRateLimitedError
from embedplex.core.spend import REQUEST_SPEND, Spend
from embedplex.core.tenant import NO_LIMITS
from embedplex.limits import Budget, Lease, RateLimiter, Verdict

_MESSAGES = {
    "rpm": "rate limit reached: requests per minute for this key",
    "tpm": "rate limit reached: tokens per minute for this key",
    "concurrency": "rate limit reached: concurrent requests for this key",
}


class RateLimit:
    """Admit the request against its tenant's limits, or refuse it with 429."""

    def __init__(self, limiter: RateLimiter, skip: tuple[str, ...]) -> None:
        """``skip``: path prefixes never limited (open and admin paths)."""
        self.limiter = limiter
        self.skip = skip

    def enter(self, ex: Exchange) -> Awaitable[None] | None:
        tenant = ex.tenant
        if tenant.key_id is None or tenant.limits == NO_LIMITS or ex.path.startswith(self.skip):
            return None  # the anonymous tenant (no key configured) costs one comparison
        return self._admit(ex, tenant.key_id)

    async def _admit(self, ex: Exchange, key_id: str) -> None:
        verdict, lease = await self.limiter.admit(key_id, ex.tenant.limits)
        ex.response_headers.extend(headers(verdict))
        if lease is None:
            raise _refusal(ex.response_headers, verdict)
        release = _Release(self.limiter, lease, ex.response_headers)
        ex.at_finish(release)
        if lease.limits.tpm is not None:  # the models queue through it (core/spend.py)
            REQUEST_SPEND.set(release)


def _refusal(out: list[tuple[bytes, bytes]], verdict: Verdict) -> KeyRateLimitedError:
    """The 429 for a refused ``verdict``; its ``retry-after-ms`` header joins ``out``."""
    ms = max(round(verdict.retry_after * 1000), 1)
    out.append((b"retry-after-ms", str(ms).encode()))
    return KeyRateLimitedError(
        _MESSAGES.get(verdict.refused or "", "rate limit reached"),
        retry_after=verdict.retry_after,
    )


class _Release(Spend):
    """Reserves a request's tokens as its inputs queue, and finishes its lease once, charging
    its tokens less that reservation: an answer's (``record.tokens``), or, for a request that
    ended without one, at least the tokens of its inputs that ran."""

    __slots__ = ("headers", "lease", "limiter", "reserved_here")

    def __init__(
        self, limiter: RateLimiter, lease: Lease, response_headers: list[tuple[bytes, bytes]]
    ) -> None:
        super().__init__()
        self.limiter = limiter
        self.lease = lease
        self.headers = response_headers
        self.reserved_here = 0  # reserved in this process for a lease admitted in Redis

    async def _reserve(self, tokens: int, held: int) -> None:
        verdict, shared = await self.limiter.reserve(self.lease, tokens, held)
        if verdict.refused is not None:
            # The answer tells the bucket as it is now, as an admission refusal would.
            self.headers[:] = [h for h in self.headers if not h[0].startswith(_OURS)]
            self.headers.extend(headers(verdict))
            raise _refusal(self.headers, verdict)
        if self.lease.shared and not shared:
            self.reserved_here += tokens

    def __call__(self, ex: Exchange, status: int) -> Awaitable[None] | None:
        tokens = ex.record.tokens
        if status >= 400:  # client gone, cancelled, failed: what ran was spent all the same
            tokens = max(tokens, self.tokens())
        self.forget()
        return self.limiter.finish(
            self.lease, tokens, reserved=self.reserved, reserved_here=self.reserved_here
        )


_OURS = (b"x-ratelimit-", b"retry-after-ms")


def headers(verdict: Verdict) -> list[tuple[bytes, bytes]]:
    """OpenAI's ``x-ratelimit-*`` headers for the limits the key has."""
    out: list[tuple[bytes, bytes]] = []
    for kind, budget in (("requests", verdict.requests), ("tokens", verdict.tokens)):
        if budget is not None:
            out += _budget_headers(kind, budget)
    return out


def _budget_headers(kind: str, budget: Budget) -> list[tuple[bytes, bytes]]:
    return [
        (f"x-ratelimit-limit-{kind}".encode(), str(budget.limit).encode()),
        (f"x-ratelimit-remaining-{kind}".encode(), str(budget.remaining).encode()),
        (f"x-ratelimit-reset-{kind}".encode(), duration(budget.reset_s).encode()),
    ]


def duration(seconds: float) -> str:
    """A duration as OpenAI writes it: ``0s``, ``120ms``, ``8.64s``, ``6m0s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(round(seconds * 1000), 1)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest, 3):g}s"
