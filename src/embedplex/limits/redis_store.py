"""Per-key limits shared through Redis: the rules of ``gcra.py`` as three Lua scripts.

Why Lua over redis-py rather than the ``limits`` library: one admission checks three limits
(requests, tokens, concurrency) and takes two of them, atomically; a script does it in one round
trip, where ``limits`` needs one per limit and has no concurrency limit at all, and its moving
window keeps one list entry per unit (a token limit of 200,000 a minute would keep 200,000).
``examples/ratelimit_latency.py`` measures both; the figures are in ``docs/limits.md``.

Each key id has a hash ``embedplex:rl:{id}`` (the two TATs, ``r`` and ``t``) and a sorted set
``embedplex:rl:{id}:c`` of in-flight leases scored by when they expire, so that the slots of a
replica that died with requests in flight come back after ``lease_ttl_s`` instead of never.
A hash ``embedplex:rl:{id}:v`` holds, per lease, the tokens its reservations took here (kept a
minute past the lease): the finish charges what the request spent less that, whatever the
caller saw of those calls. A reservation call that timed out (Redis stalled) or was cancelled
(client gone) may still run when Redis reads it; it is refunded exactly if it did, and takes
nothing if it runs after its lease was settled (the lease's entry is then ``x``). The limiter
says when a finish is in such doubt, and settles leases whose finish failed
(``limiter.py``).
Time is Redis's own clock (``TIME``), so replicas with skewed clocks still agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedplex.core.tenant import KeyLimits
from embedplex.limits.gcra import WINDOW_S, Budget, Verdict

if TYPE_CHECKING:  # redis is imported only when a redis_url is configured (limiter.py)
    from redis.asyncio import Redis


def _prelude(window_arg: int) -> str:
    """What the admit and reserve scripts start with: Redis's clock (``now``), the window
    ``W`` (from ``ARGV[window_arg]``), the key's two TATs and ``budget(limit, tat)``, which
    returns what is left of a limit and the seconds until its bucket is full."""
    return f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local W = tonumber(ARGV[{window_arg}])
local st = redis.call('HMGET', KEYS[1], 'r', 't')
local rtat, ttat = tonumber(st[1]) or 0, tonumber(st[2]) or 0
local function budget(limit, tat)
  local ahead = math.max(tat - now, 0)
  return math.max(math.floor((W - ahead) / (W / limit) + 1e-6), 0), ahead
end
"""


_ADMIT = (
    _prelude(6)
    + """
local rpm, tpm, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local refused, retry = 0, 0
local new_rtat = rtat
local req_rem, req_reset, tok_rem, tok_reset = -1, 0, -1, 0
if rpm > 0 then
  new_rtat = math.max(rtat, now) + W / rpm
  if new_rtat - now > W + 1e-9 then
    refused, retry = 1, new_rtat - W - now
    req_rem, req_reset = budget(rpm, rtat)
  else
    req_rem, req_reset = budget(rpm, new_rtat)
  end
end
if tpm > 0 then
  tok_rem, tok_reset = budget(tpm, ttat)
  if refused == 0 and tok_rem <= 0 then
    refused, retry = 2, math.max(ttat - now - W + W / tpm, 0)
  end
end
if refused == 0 and maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= maxc then
    refused, retry = 3, 1
  end
end
if refused == 0 then
  if rpm > 0 then
    redis.call('HSET', KEYS[1], 'r', string.format('%.6f', new_rtat))
    redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(new_rtat, ttat) - now) * 1000) + 1000)
  end
  if maxc > 0 then
    local ttl = tonumber(ARGV[5])
    redis.call('ZADD', KEYS[2], now + ttl, ARGV[4])
    redis.call('EXPIRE', KEYS[2], math.ceil(ttl))
  end
end
return {refused, math.floor(retry * 1000), req_rem, math.floor(req_reset * 1000),
        tok_rem, math.floor(tok_reset * 1000)}
"""
)

_RESERVE = (
    _prelude(5)
    + """
local rpm, tpm, n, held = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lease = ARGV[6]
local iv = W / tpm
local others = ttat - held * iv
local refused, retry = 0, 0
if lease ~= '' and redis.call('HGET', KEYS[2], lease) == 'x' then
  -- Its request was settled before this ran (a call that timed out or was cancelled, run
  -- late): nobody waits for it, and it takes nothing.
elseif budget(tpm, others) <= 0 then
  refused, retry = 2, math.max(others - now - W + iv, 0)
else
  ttat = math.max(ttat, now) + n * iv
  redis.call('HSET', KEYS[1], 't', string.format('%.6f', ttat))
  redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(ttat, rtat) - now) * 1000) + 1000)
  if lease ~= '' then  -- what the finish settles: what ran here, not what the caller saw
    redis.call('HINCRBY', KEYS[2], lease, n)
    redis.call('PEXPIRE', KEYS[2], ARGV[7])
  end
end
local req_rem, req_reset = -1, 0
if rpm > 0 then
  req_rem, req_reset = budget(rpm, rtat)
end
local tok_rem, tok_reset = budget(tpm, ttat)
return {refused, math.floor(retry * 1000), req_rem, math.floor(req_reset * 1000),
        tok_rem, math.floor(tok_reset * 1000)}
"""
)

# What the finish and settle scripts charge (or refund) with: ``seconds`` of refill on the
# key's tokens bucket (KEYS[1]); a refund (negative) never fills it past full.
_CHARGE = """
local function charge(seconds)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local st = redis.call('HMGET', KEYS[1], 'r', 't')
  local rtat, ttat = tonumber(st[1]) or 0, tonumber(st[2]) or 0
  if seconds > 0 then
    ttat = math.max(ttat, now) + seconds
  else
    ttat = math.max(ttat + seconds, now)
  end
  redis.call('HSET', KEYS[1], 't', string.format('%.6f', ttat))
  redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(ttat, rtat) - now) * 1000) + 1000)
end
"""

_FINISH = (
    _CHARGE
    + """
redis.call('ZREM', KEYS[2], ARGV[2])
local tpm, n = tonumber(ARGV[1]), tonumber(ARGV[3])
local mine = redis.call('HGET', KEYS[3], ARGV[2])
if mine == 'x' then  -- settled already (_SETTLE): this finish ran late, its tokens charged
  return 0            -- in the process whose call failed
end
if mine then
  n = n - tonumber(mine)  -- charged what it spent less what it reserved here
end
if ARGV[5] == '1' then  -- a reservation may still be on its way: it must take nothing
  redis.call('HSET', KEYS[3], ARGV[2], 'x')
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
elseif mine then
  redis.call('HDEL', KEYS[3], ARGV[2])
end
if tpm > 0 and n ~= 0 then
  charge(n * tonumber(ARGV[4]) / tpm)
end
return 0
"""
)

_SETTLE = (
    _CHARGE
    + """
local tpm, W = tonumber(ARGV[1]), tonumber(ARGV[2])
local back = 0
for i = 4, #ARGV do
  redis.call('ZREM', KEYS[2], ARGV[i])
  if tpm > 0 then
    local mine = redis.call('HGET', KEYS[3], ARGV[i])
    if mine ~= 'x' then
      back = back + (tonumber(mine) or 0)
      redis.call('HSET', KEYS[3], ARGV[i], 'x')
      redis.call('PEXPIRE', KEYS[3], ARGV[3])
    end
  end
end
if back > 0 then
  charge(-back * W / tpm)
end
return 0
"""
)

_REASONS = {1: "rpm", 2: "tpm", 3: "concurrency"}


def redis_client(url: str, timeout_s: float) -> Redis:
    """The client the limiter and the cache's Redis tier each use (no I/O until first use).

    ``timeout_s`` bounds connecting and each reply. One quick retry on a connection error (a
    pooled connection that died with a Redis restart), none on a timeout: a Redis that stalled
    would only stall the retry too (a request waited twice the timeout), and a timed-out call
    may still run when Redis reads it, so a retried admission ran twice."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )


class RedisLimits:
    """The shared store: ``admit``, ``reserve`` and ``finish`` as in ``LocalLimits``, one round
    trip each.

    Errors are Redis's own (``redis.exceptions.RedisError``, ``OSError``, timeouts):
    ``errors`` lists them, and the caller (``RateLimiter``) decides what losing Redis means.
    """

    def __init__(self, client: Redis, *, lease_ttl_s: float = 300.0) -> None:
        from redis.exceptions import RedisError, ResponseError

        self.errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._answered = ResponseError
        self.client = client
        self.lease_ttl_s = lease_ttl_s
        self._admit = client.register_script(_ADMIT)
        self._reserve = client.register_script(_RESERVE)
        self._finish = client.register_script(_FINISH)
        self._settle = client.register_script(_SETTLE)
        # A lease's reservations are kept a minute past its lease: a request that outlives
        # that is charged in full at its finish (its reservation is refilled by then).
        self._kept_ms = int((lease_ttl_s + WINDOW_S) * 1000)

    async def admit(self, key: str, limits: KeyLimits, lease: str) -> Verdict:
        raw: list[Any] = await self._admit(
            keys=_keys(key),
            args=[
                limits.rpm or 0,
                limits.tpm or 0,
                limits.max_concurrent or 0,
                lease,
                self.lease_ttl_s,
                WINDOW_S,
            ],
        )
        return _verdict(raw, limits)

    async def reserve(
        self, key: str, limits: KeyLimits, tokens: int, held: int = 0, *, lease: str = ""
    ) -> Verdict:
        """``LocalLimits.reserve`` in Redis: take ``tokens`` unless less than one token is left
        besides ``held`` (what the same request reserved before). Taken for ``lease``: the
        script adds them to what that lease holds here, which its ``finish`` settles (so a
        call that timed out or was cancelled, and ran all the same, is refunded exactly)."""
        if limits.tpm is None or tokens <= 0:
            return Verdict()
        k = _keys(key)
        raw: list[Any] = await self._reserve(
            keys=[k[0], k[2]],
            args=[limits.rpm or 0, limits.tpm, tokens, held, WINDOW_S, lease, self._kept_ms],
        )
        return _verdict(raw, limits)

    async def finish(
        self, key: str, limits: KeyLimits, lease: str, tokens: int, *, doubt: bool = False
    ) -> None:
        """Release ``lease`` and charge ``tokens`` less what it reserved here (negative: a
        refund). ``doubt``: a reservation call of it failed or was cancelled, and may yet run;
        it will take nothing."""
        await self._finish(
            keys=_keys(key),
            args=[limits.tpm or 0, lease, tokens, WINDOW_S, int(doubt), self._kept_ms],
        )

    async def settle(self, leases: dict[str, tuple[int, set[str]]]) -> None:
        """For each key (its ``tpm``, 0 for none, and lease ids): drop the leases' slots and
        refund what they reserved here, for leases whose finish did not reach Redis (their
        tokens were charged in the process instead); a finish that ran after all left
        nothing to refund. Idempotent, and anything of these leases that runs later takes
        nothing. One round trip; a key whose state is ``broken`` is reset instead."""
        pipe = self.client.pipeline(transaction=False)
        for key, (tpm, ids) in leases.items():
            await self._settle(
                keys=_keys(key), args=[tpm, WINDOW_S, self._kept_ms, *ids], client=pipe
            )
        results = await pipe.execute(raise_on_error=False)
        for key, result in zip(leases, results, strict=True):
            if self.broken(result):
                await self.reset(key)
            elif isinstance(result, BaseException):
                raise result

    def broken(self, exc: object) -> bool:
        """Whether ``exc`` says one key's state here is not what these scripts write (Redis's
        ``WRONGTYPE``: another writer, a hand edit), rather than that Redis is away."""
        return isinstance(exc, self._answered) and str(exc).startswith("WRONGTYPE")

    async def reset(self, key: str) -> None:
        """Delete ``key``'s state: its buckets start full, its leases are gone."""
        await self.client.delete(*_keys(key))

    async def ping(self) -> None:
        await self.client.ping()

    async def aclose(self) -> None:
        await self.client.aclose()


def _verdict(raw: list[Any], limits: KeyLimits) -> Verdict:
    code, retry_ms, req_rem, req_reset, tok_rem, tok_reset = (int(v) for v in raw)
    return Verdict(
        _REASONS.get(code),
        retry_ms / 1000,
        None if limits.rpm is None else Budget(limits.rpm, req_rem, req_reset / 1000),
        None if limits.tpm is None else Budget(limits.tpm, tok_rem, tok_reset / 1000),
    )


def _keys(key: str) -> list[str]:
    # The braces keep both keys of one id in one Redis Cluster slot (a script's keys must be).
    return [f"embedplex:rl:{{{key}}}", f"embedplex:rl:{{{key}}}:c", f"embedplex:rl:{{{key}}}:v"]
