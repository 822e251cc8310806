"""What one request may ask for: checked in the route, before any tokenizing or queueing (422).

A request's cost is bounded on every route by three settings, each checked as early as it can be:

- ``payload_limit``: bytes of body, before the body is read (by Content-Length) and while it is
  (``api/stages.py``); it bounds what tokenizing any text may cost.
- ``max_client_batch_size``: inputs per request (texts, token lists, rerank documents,
  ``/tokenize`` inputs, ``/decode`` lists, the sub-requests of a batch and their inputs in
  total); a model's own value where it has one (the models check it too, before tokenizing).
- ``max_request_tokens``: token ids a request sends (token-id inputs, ``/decode``), counted before
  they are validated, and tokens ``/tokenize`` answers with (known only as its inputs are
  tokenized: a local model counts them as it goes, each input at most max_input_length x 250
  characters, ``TextTokenizer.tokens``).

The tokens a text request puts through a model are then at most inputs x ``max_input_length``
(longer inputs are truncated, or refused with 422).
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request

from embedplex.config import Settings
from embedplex.core.errors import PayloadTooLargeError


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def check_count(request: Request, n: int, param: str, limit: int | None = None) -> None:
    """At most ``limit`` (default ``max_client_batch_size``) inputs of ``param``."""
    limit = limit or _settings(request).max_client_batch_size
    if n > limit:
        raise PayloadTooLargeError(
            f"{n} {param} in one request > maximum allowed batch size {limit}", param=param
        )


def token_ids(inputs: Sequence[object]) -> int:
    """How many token ids ``inputs`` holds (0 for texts)."""
    if not inputs or not isinstance(inputs[0], list):
        return 0
    return sum(len(ids) for ids in inputs if isinstance(ids, list))


def check_tokens(request: Request, n: int, param: str) -> None:
    """At most ``max_request_tokens`` token ids in ``param``."""
    if n == 0:  # texts (most requests): no settings to look up
        return
    limit = _settings(request).max_request_tokens
    if n > limit:
        raise PayloadTooLargeError(
            f"{n} token ids in one request > the limit of {limit} (max_request_tokens)",
            param=param,
        )
