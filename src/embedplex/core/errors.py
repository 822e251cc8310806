"""The one exception tree of embedplex.

Every failure a caller can see is one of these. The HTTP layer maps them to a status code and a
body in exactly one place (``embedplex.api.errors``); nothing below the HTTP layer knows about
status codes. On OpenAI routes every 422 below is a 400, as OpenAI answers them; a body over
``payload_limit`` is a 413 on every route.

    EmbedplexError                      base; ``kind`` names the error in responses and metrics
    ├── ClientError                     the request is at fault (never retried)
    │   ├── EmptyInputError             no inputs at all                        -> 400
    │   ├── InvalidRequestError         malformed JSON, wrong types, bad values -> 400 / 422
    │   │   └── UpstreamRefusedError    a provider's 400/422 for this input     -> 422
    │   ├── PayloadTooLargeError        inputs or token ids over a limit        -> 422
    │   │   └── BodyTooLargeError       body bytes over payload_limit           -> 413
    │   ├── HeadersTooLargeError        request line and headers over the cap   -> 431
    │   ├── RequestTimeoutError         headers or body too slow to arrive      -> 408
    │   ├── InputTooLongError           over max input length, truncate off     -> 422
    │   ├── ModelNotFoundError          no such model or provider               -> 404
    │   ├── AuthenticationError         missing or wrong API key                -> 401
    │   └── ForbiddenError              not allowed: a feature turned off       -> 403
    │       └── ModelNotAllowedError    a key used for a model outside its list -> 403
    ├── OverloadedError                 admission refused; retry later          -> 429
    │   └── RateLimitedError            rate limit hit (here or upstream)       -> 429 + Retry-After
    │       └── KeyRateLimitedError     the caller's key is over its own limits (no failover)
    ├── UnavailableError                                                        -> 503
    │   ├── QueueTimeoutError           no progress for queue_timeout_ms
    │   └── NotReadyError               loading, draining, or a dead backend
    └── BackendError                    the model or the upstream failed        -> 424 / 500
        ├── UpstreamError               a remote provider answered with an error -> 502
        │   └── UpstreamTimeoutError    it did not answer in time (after retries) -> 504
        └── FatalBackendError           the backend cannot serve again; flips readiness
"""

from __future__ import annotations

# A name a caller sent, repeated in an error: the head of a 100 KB model name says enough.
SHOWN_CHARS = 120


def shown(name: str | None) -> str:
    """``repr(name)`` for an error message, cut to ``SHOWN_CHARS`` characters with its length."""
    if name is None or len(name) <= SHOWN_CHARS:
        return repr(name)
    return f"{name[:SHOWN_CHARS]!r}... ({len(name):,} characters)"


class EmbedplexError(Exception):
    """Base of every error a caller can see."""

    kind: str = "internal"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ClientError(EmbedplexError):
    kind = "validation"


class EmptyInputError(ClientError):
    kind = "empty"


class InvalidRequestError(ClientError):
    """The body is not what the route accepts.

    ``malformed`` is true when the request cannot be read at all (400): by default its body is
    not JSON (OpenAI code ``invalid_json``), else ``code`` says what was unreadable (a header,
    the HTTP request itself). Otherwise the JSON is well formed but a field is wrong (422).
    """

    kind = "validation"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        malformed: bool = False,
        code: str = "invalid_json",
    ) -> None:
        super().__init__(message, param=param)
        self.malformed = malformed
        self.code = code


class PayloadTooLargeError(ClientError):
    """More of something than a request may carry: inputs, documents, token ids."""

    kind = "payload_too_large"


class BodyTooLargeError(PayloadTooLargeError):
    """The body's bytes are over ``payload_limit``: refused before (or while) it is read, so
    before any route parses it (413 on every route, OpenAI's too)."""


class UnsupportedEncodingError(ClientError):
    """A body in a content coding the server does not decode (RFC 9110: 415)."""

    kind = "unsupported_media_type"


class HeadersTooLargeError(ClientError):
    """Answered by the connection itself (``serve/edge.py``), before any route."""

    kind = "headers_too_large"


class RequestTimeoutError(ClientError):
    """The client sent its headers or body too slowly (``serve/edge.py``)."""

    kind = "request_timeout"


class InputTooLongError(ClientError):
    kind = "validation"


class UpstreamRefusedError(InvalidRequestError):
    """A remote provider refused one input (its 400 or 422, e.g. over its context length),
    that input alone: the others of its call were answered (``providers/guard.py``)."""


class ModelNotFoundError(ClientError):
    kind = "model_not_found"


class AuthenticationError(ClientError):
    kind = "authentication"


class ForbiddenError(ClientError):
    """The caller may not do this: the server has turned it off (the admin API without a
    secret), or the caller's key does not allow it (``ModelNotAllowedError``)."""

    kind = "forbidden"


class ModelNotAllowedError(ForbiddenError):
    """A managed key used for a model outside its list of models."""


class OverloadedError(EmbedplexError):
    """Refused for now; ``retry_after`` (seconds), when known, is sent as ``Retry-After``."""

    kind = "overloaded"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitedError(OverloadedError):
    kind = "rate_limited"


class KeyRateLimitedError(RateLimitedError):
    """The caller's own key is over its limits (``api/ratelimit.py``), at admission or when its
    request reserves its tokens: not a provider's failure, so a route never fails over on it."""


class UnavailableError(EmbedplexError):
    """Cannot answer now; ``retry_after`` (seconds), when known, is sent as ``Retry-After``."""

    kind = "unhealthy"

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class QueueTimeoutError(UnavailableError):
    """Waited too long; ``retry_after`` (seconds), when given, is sent as ``Retry-After``."""

    kind = "queue_timeout"


class NotReadyError(UnavailableError):
    kind = "unhealthy"


class BackendError(EmbedplexError):
    kind = "backend"


class UpstreamError(BackendError):
    """A remote provider failed. ``status`` is the upstream status code, if there was one."""

    kind = "upstream"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UpstreamTooLargeError(UpstreamError):
    """A remote provider refused a call for its size, not for any one input: more texts or
    more tokens than one call may carry (a 413, a vendor's 400/422 that says so, or a 2xx
    answer to several inputs over ``max_response_bytes``). What the refusal said one call may
    carry: ``max_items`` inputs, ``max_cost`` estimated tokens
    (``providers.base.budget_tokens``); None where it did not say. The call is split to fit
    (``providers/guard.py``); one input refused alone so is too large for that upstream, and
    reaches its caller as ``UpstreamRefusedError`` (422)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        max_items: int | None = None,
        max_cost: int | None = None,
    ) -> None:
        super().__init__(message, status=status)
        self.max_items = max_items
        self.max_cost = max_cost


class UpstreamTimeoutError(UpstreamError):
    """A remote provider did not answer within the per-attempt timeout or the retry budget."""

    kind = "upstream_timeout"


class FatalBackendError(BackendError):
    kind = "backend"
