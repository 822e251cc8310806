"""A process whose model runs on the CPU tokenizes in its inference threads, without the
tokenizers library's thread pool (``tokenize_in_calling_thread``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Encoding, Tokenizer

from embedplex.backends.model_files import load_spec
from embedplex.backends.tokenizer import GIL_FREE_CHARS, TextTokenizer, TruncationDirection
from embedplex.config import Settings

SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from embedplex.backends.tokenizer import (
        TextTokenizer, TruncationDirection, tokenize_in_calling_thread,
    )

    def threads():
        return len(os.listdir("/proc/self/task"))

    tok = TextTokenizer.from_dir(Path(sys.argv[1]), max_length=32, vocab_size=int(sys.argv[2]))
    texts = [f"text number {i} of a batch, naive cafe" for i in range(256)]

    def encode_all():
        return (
            tok.encode(texts, truncate=True),
            tok.encode_each(
                texts, list(range(256)), truncate=True, direction=TruncationDirection.RIGHT
            ),
            tok.encode_pairs("query", texts, truncate=True),
            tok.tokens(texts[:8]),
        )

    before = threads()
    tokenize_in_calling_thread()
    mine = encode_all()
    alone = threads() - before
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the pool again, for comparison
    pooled = encode_all()
    print(alone, threads() - before, mine == pooled)
    """
)


def run(model_dir: Path, **env: str) -> list[str]:
    spec = load_spec(str(model_dir), model_dir)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_dir), str(spec.vocab_size)],
        check=True,
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), "RAYON_NUM_THREADS": "2", **env},
    )
    return out.stdout.split()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_batches_encode_in_the_calling_thread_alike(tiny_model_dir: Path) -> None:
    """In a fresh process (the pool is process-wide and starts on first use): no thread is
    started, and every encoding is what the pool makes."""
    alone, pooled, same = run(tiny_model_dir)
    assert alone == "0"
    assert int(pooled) > 0  # (the check can fail: through the pool, threads do start)
    assert same == "True"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_an_operators_choice_is_kept(tiny_model_dir: Path) -> None:
    alone, _, _ = run(tiny_model_dir, TOKENIZERS_PARALLELISM="true")
    assert int(alone) > 0


async def test_starting_a_cpu_model_turns_the_pool_off(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedplex.models.loading import load_local_model

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    settings = Settings(model_id=str(tiny_model_dir), backend="torch", cache_dir=tmp_path)
    model = load_local_model(settings)
    assert model.backend.device == "cpu"
    await model.start()
    try:
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    finally:
        await model.close()


class Calls:
    """A tokenizer that notes which call each text went through."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.held: list[int] = []  # lengths of texts encoded one by one (``encode``)

    def encode(self, text: str, **kwargs: Any) -> Encoding:
        self.held.append(len(text))
        return self.tok.encode(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)


def test_no_long_text_is_tokenized_holding_the_gil(tiny_model_dir: Path) -> None:
    """``encode`` holds the GIL for all its work: a pool thread tokenizing a 2 MB text with it
    stopped the event loop for the whole second (docs/security.md). ``encode_batch`` lets go."""
    tok = TextTokenizer.from_dir(tiny_model_dir, max_length=32, vocab_size=1)
    long = "quick " * 100_000 + " " * 100_000 + "fox"  # its part holds no token: whole
    query = "fox " * 50_000
    tokenizers = [tok._plain, *tok._truncating.values()]
    spies = [Calls(t) for t in tokenizers]
    tok._plain = spies[0]  # type: ignore[assignment]
    tok._truncating = dict(zip(tok._truncating, spies[1:], strict=True))  # type: ignore[arg-type]
    right = TruncationDirection.RIGHT
    tok.encode(["fox"], truncate=True)  # one short text: encode, in this thread
    tok.encode(["fox", " " * 200_000 + "fox"], truncate=True)
    tok.encode([" " * 200_000 + "fox"], truncate=False)
    tok.encode_each([" " * 200_000 + "fox"], [0], truncate=True, direction=right)
    tok.encode_pairs(query, [long, "fox"], truncate=True)
    tok.tokens([("fox " * 2000)[:8000]])
    held = [n for spy in spies for n in spy.held]
    assert 3 in held and max(held) <= GIL_FREE_CHARS
