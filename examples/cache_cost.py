"""CPU cost per request of a local model's path, with and without the embedding cache
(docs/cache.md): a zero-delay fake backend, so what is measured is embedplex's own work.

    PYTHONPATH=src:tests python examples/cache_cost.py MODE [ROUNDS] [hits]

MODE: ``none`` (no cache argument: runs on trees before the cache existed), ``0`` (cache off,
in-flight dedupe on) or a byte bound such as ``67108864``. Each round sends 64 concurrent
single-text requests, all texts distinct (every input a miss), or with ``hits`` the same 64
texts every round (every input a hit after the warm-up). Prints CPU microseconds per request
(``time.process_time``, all threads). On a busy machine compare instruction counts instead:

    WARM=2 valgrind --tool=callgrind python examples/cache_cost.py 0 4
    WARM=2 valgrind --tool=callgrind python examples/cache_cost.py 0 12

and divide the difference of the totals by 8 x 64 requests.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from embedplex.backends.fake import FakeBackend
from embedplex.backends.model_files import load_spec
from embedplex.backends.tokenizer import TextTokenizer
from embedplex.config import Settings
from embedplex.core.types import EmbedRequest
from embedplex.models.embedding import LocalEmbeddingModel
from embedplex.models.options import LocalModelOptions
from tiny_models import make_tiny_bert  # tests/: a tiny BERT's files, made locally


async def main(mode: str, rounds: int, hits: bool) -> None:
    model_dir = Path(tempfile.gettempdir()) / "embedplex-cache-cost" / "tiny"
    if not (model_dir / "tokenizer.json").exists():
        make_tiny_bert(model_dir)
    spec = load_spec(str(model_dir), model_dir)
    tokenizer = TextTokenizer.from_dir(
        model_dir, max_length=spec.max_input_length, vocab_size=spec.vocab_size
    )
    backend = FakeBackend()
    settings = Settings(model_id=str(model_dir), inference_streams=1)
    options = LocalModelOptions.from_settings(settings, spec, run_tokens=None)
    extra: dict[str, Any] = {}
    if mode != "none":
        from embedplex.cache import EmbeddingCache

        extra["cache"] = EmbeddingCache(int(mode))
    model = LocalEmbeddingModel(spec, tokenizer, backend, options, **extra)
    counter = itertools.count()
    fixed = [f"a b c {k}" for k in range(64)]

    async def one_round() -> None:
        texts = fixed if hits else [f"a b c {next(counter)}" for _ in range(64)]
        await asyncio.gather(*(model.embed(EmbedRequest(inputs=[t])) for t in texts))

    await model.start()
    for _ in range(int(os.environ.get("WARM", "20"))):
        await one_round()
    start = time.process_time()
    for _ in range(rounds):
        await one_round()
    cpu = time.process_time() - start
    print(f"{mode} hits={hits}: {cpu / (rounds * 64) * 1e6:.1f} us CPU per request")
    await model.close()


if __name__ == "__main__":
    asyncio.run(
        main(
            sys.argv[1],
            int(sys.argv[2]) if len(sys.argv) > 2 else 200,
            len(sys.argv) > 3 and sys.argv[3] == "hits",
        )
    )
