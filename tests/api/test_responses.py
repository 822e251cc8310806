"""``JsonResponse`` writes the same head and body as Starlette's ``Response`` would."""

from __future__ import annotations

from starlette.responses import Response

from embedplex.api.responses import JsonResponse
from embedplex.core.types import Timings


def test_same_headers_and_body_as_starlette() -> None:
    body = b'{"object":"list"}'
    headers = {"X-Queue-Time": "1.250", "retry-after": "2"}
    ours = JsonResponse(body, 429, headers)
    theirs = Response(body, status_code=429, headers=headers, media_type="application/json")
    assert ours.status_code == theirs.status_code == 429
    assert ours.body == theirs.body
    assert sorted(ours.raw_headers) == sorted(theirs.raw_headers)
    assert sorted(JsonResponse(b"{}").raw_headers) == sorted(
        Response(b"{}", media_type="application/json").raw_headers
    )


def test_raw_header_lines_are_written_as_given() -> None:
    """``raw=``: the routes' timing headers, already bytes, are kept as they are."""
    timings = Timings(tokenization=0.25, queue=1.5, inference=12.0625, total=14.0)
    ours = JsonResponse(b"{}", raw=timings.headers(tokens=12, characters=345, compute_type=b"cpu"))
    theirs = Response(
        b"{}",
        headers={
            "X-Compute-Type": "cpu",
            "X-Compute-Time": "14",  # whole milliseconds, as TEI
            "X-Compute-Characters": "345",
            "X-Compute-Tokens": "12",
            "X-Tokenization-Time": "0.250",
            "X-Queue-Time": "1.500",
            "X-Inference-Time": "12.062",
            "X-Total-Time": "14.000",
        },
        media_type="application/json",
    )
    assert sorted(ours.raw_headers) == sorted(theirs.raw_headers)
