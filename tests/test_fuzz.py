"""Random malformed bodies never get a 5xx: every bad input is a clear 4xx JSON error."""

from __future__ import annotations

import json
import random
from pathlib import Path

from embedplex.backends.fake import FakeBackend
from helpers import fake_app, running

SEEDS = {
    "/embed": {"inputs": ["hello world", "cat"], "normalize": True, "truncate": True,
               "truncation_direction": "Right", "dimensions": 8},
    "/v1/embeddings": {"input": ["hello world"], "model": "m", "encoding_format": "base64",
                       "dimensions": 8, "user": "u"},
    "/api/v1/embed": {"inputs": "hello", "normalize": False},
    "/tokenize": {"inputs": ["hello"], "add_special_tokens": False},
    "/embed_all": {"inputs": ["hello world", "cat"], "truncate": True, "prompt_name": None},
    "/similarity": {"inputs": {"source_sentence": "cat", "sentences": ["dog", "hello"]},
                    "parameters": {"truncate": True}},
    "/decode": {"ids": [[18, 19], [20]], "skip_special_tokens": True},
    "/": {"inputs": "hello", "normalize": True, "encoding_format": "float"},
    "/api/embed": {"input": ["hello", "world"], "model": "m", "truncate": True},
    "/api/embed/batch": {"texts": ["hello", "world"], "model": "m"},
}  # fmt: skip

ODD_VALUES: list[object] = [
    None, True, -1, 0, 2**70, -(2**70), 1.5, float("inf"), "", "x" * 3000, [], [[]], [None],
    [1, "a"], {"a": 1}, [[1, 2], "b"], [2**40], "\ud800", [0.5], {"inputs": "nested"},
]  # fmt: skip


def mutate(rng: random.Random, body: dict[str, object]) -> bytes:
    body = dict(body)
    choice = rng.randrange(5)
    if choice == 0:  # a field takes an odd value
        body[rng.choice(list(body))] = rng.choice(ODD_VALUES)
    elif choice == 1:  # a field goes missing
        body.pop(rng.choice(list(body)))
    elif choice == 2:  # an unknown field
        body[rng.choice(["extra", "inputs ", "INPUT", "__proto__"])] = rng.choice(ODD_VALUES)
    raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    if choice == 3:  # the bytes are cut or corrupted
        cut = rng.randrange(1, len(raw))
        raw = (
            raw[:cut] if rng.random() < 0.5 else raw[:cut] + bytes([rng.randrange(256)]) + raw[cut:]
        )
    elif choice == 4:  # not an object at all
        raw = rng.choice([b"[]", b"null", b"42", b'"text"', b"", b"\xff\xfe\x00", b"{" * 50])
    return raw


async def test_random_bad_bodies_get_4xx_json(tiny_model_dir: Path) -> None:
    rng = random.Random(1234)
    backend = FakeBackend(dim=16)
    seen: dict[int, int] = {}
    async with running(fake_app(tiny_model_dir, backend)) as client:
        for _ in range(800):
            path = rng.choice(list(SEEDS))
            body = mutate(rng, SEEDS[path])
            r = await client.post(path, content=body, headers={"content-type": "application/json"})
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (path, body, r.status_code, r.text)
            if r.status_code >= 400:
                data = r.json()
                assert "error" in data, (path, body, r.text)
    assert seen.get(200, 0) > 20  # the mutations also leave plenty of valid requests
    assert sum(v for k, v in seen.items() if 400 <= k < 500) > 100
