"""CPU per answer of the Ray wire format (``ray/wire.py``) against the local model's own types,
through Ray's own serialization and object store (``ray.get(ray.put(...))``: what a replica's
answer goes through, both ends in one process). docs/ray.md#routes quotes it.

    python examples/ray_wire_cost.py     # needs the embedplex[ray] extra
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

import ray
from embedplex.backends.tokenizer import Token
from embedplex.core.types import Timings
from embedplex.ray.wire import TokenEmbedAnswer, TokensAnswer


def cpu_ms(fn: Callable[[], object], n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1e3


def token(j: int) -> Token:
    special = j in (0, 127)
    start = None if special else j * 4
    return Token(1000 + j, f"tok{j}", special, start, None if start is None else start + 3)


def embed_all(inputs: int, tokens: int, rounds: int = 3) -> None:
    vecs = [np.random.rand(tokens, 384).astype(np.float32) for _ in range(inputs)]

    def flat() -> object:  # packed in the replica, split into views in the gateway
        return ray.get(ray.put(TokenEmbedAnswer.pack(vecs, 0, Timings(), "r"))).vectors()

    for r in range(rounds):
        listed = cpu_ms(lambda: ray.get(ray.put(vecs)), 50)
        packed = cpu_ms(flat, 50)
        print(
            f"round {r}: /embed_all {inputs} inputs x {tokens} tokens x 384: "
            f"list of arrays {listed:.2f} ms, flat {packed:.2f} ms"
        )


def tokenize(rounds: int = 3) -> None:
    rows = [[token(j) for j in range(128)] for _ in range(64)]
    for r in range(rounds):
        objects = cpu_ms(lambda: ray.get(ray.put(rows)), 20)
        packed = cpu_ms(lambda: ray.get(ray.put(TokensAnswer.pack(rows, "r"))).rows(), 20)
        print(
            f"round {r}: /tokenize 64 inputs x 128 tokens: Token objects {objects:.2f} ms, "
            f"flat and rebuilt {packed:.2f} ms"
        )


def main() -> None:
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=200 << 20)
    embed_all(16, 128)
    embed_all(512, 8)
    tokenize()
    ray.shutdown()


if __name__ == "__main__":
    main()
