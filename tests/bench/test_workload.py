from __future__ import annotations

import random

import orjson
import pytest

from embedplex.backends.model_files import load_spec, resolve_model_dir
from embedplex.backends.tokenizer import TextTokenizer
from embedplex.bench.workload import (
    TokenSpec,
    build_requests,
    json_body,
    make_texts,
    raw_request,
    request_path,
)


def test_token_spec_parses_fixed_and_ranges() -> None:
    assert TokenSpec.parse("14") == TokenSpec(14, 14)
    assert TokenSpec.parse("5-256") == TokenSpec(5, 256)
    assert str(TokenSpec.parse("5-256")) == "5-256"
    rng = random.Random(0)
    assert all(5 <= TokenSpec(5, 9).draw(rng) <= 9 for _ in range(100))


@pytest.mark.parametrize("bad", ["", "x", "0", "9-3", "3-", "-4"])
def test_token_spec_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="tokens"):
        TokenSpec.parse(bad)


@pytest.mark.parametrize("tokens", [5, 14, 128, 256])
def test_texts_have_the_asked_token_count(tokens: int) -> None:
    path, sha = resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    spec = load_spec("m", path, sha=sha)
    tok = TextTokenizer.from_dir(path, max_length=512, vocab_size=spec.vocab_size)
    lengths = [
        len(e) for e in tok.encode(make_texts(TokenSpec(tokens, tokens), 20), truncate=False)
    ]
    assert lengths == [tokens] * 20


def test_bodies_per_dialect() -> None:
    assert orjson.loads(json_body(["a"], dialect="openai", model="m")) == {
        "input": "a",
        "model": "m",
    }
    assert orjson.loads(json_body(["a", "b"], dialect="tei", model=None)) == {"inputs": ["a", "b"]}
    assert request_path("http://127.0.0.1:8080", "openai") == "/v1/embeddings"
    assert request_path("http://127.0.0.1:8080/", "tei") == "/embed"
    assert request_path("http://127.0.0.1:8080/custom", "tei") == "/custom"


def test_raw_request_is_complete_http() -> None:
    raw = raw_request("http://127.0.0.1:9/", "/embed", b'{"inputs":"a"}', api_key="k")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:9\r\n")
    assert b"Content-Length: 14" in head
    assert b"Authorization: Bearer k" in head
    assert body == b'{"inputs":"a"}'


def test_build_requests_are_distinct_and_sized() -> None:
    reqs = build_requests(
        "http://127.0.0.1:9",
        dialect="openai",
        tokens=TokenSpec(14, 14),
        inputs_per_request=3,
        model=None,
        count=10,
    )
    assert len(reqs) == len(set(reqs)) == 10
    body = orjson.loads(reqs[0].partition(b"\r\n\r\n")[2])
    assert len(body["input"]) == 3
