"""Tokenizing without the library's thread pool (``TextTokenizer(parallel=False)``): the same
encodings as through the pool, no pool threads started, and what a CPU model is given."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from embedplex.backends.model_files import load_spec
from embedplex.backends.tokenizer import TextTokenizer, TruncationDirection
from embedplex.config import Settings
from embedplex.core.errors import InputTooLongError

TEXTS = [
    "the quick brown fox",
    "jumps over the lazy dog " * 3,
    "naïve café déjà vu",
    "a",
    "Retrieval systems re-embed the same texts all the time.",
]


def tokenizers(model_dir: Path) -> tuple[TextTokenizer, TextTokenizer]:
    spec = load_spec(str(model_dir), model_dir)
    made = [
        TextTokenizer.from_dir(
            model_dir, max_length=spec.max_input_length, vocab_size=spec.vocab_size, parallel=p
        )
        for p in (True, False)
    ]
    return made[0], made[1]


def test_one_after_the_other_encodes_as_the_pool_does(tiny_model_dir: Path) -> None:
    pool, serial = tokenizers(tiny_model_dir)
    assert pool.parallel and not serial.parallel
    for truncate in (True, False):
        for direction in TruncationDirection:
            try:
                expected = pool.encode(TEXTS, truncate=truncate, direction=direction)
            except InputTooLongError:
                with pytest.raises(InputTooLongError):
                    serial.encode(TEXTS, truncate=truncate, direction=direction)
                continue
            assert serial.encode(TEXTS, truncate=truncate, direction=direction) == expected
    assert serial.encode_pairs("query", TEXTS, truncate=True) == pool.encode_pairs(
        "query", TEXTS, truncate=True
    )
    assert serial.tokens(TEXTS) == pool.tokens(TEXTS)
    # Texts of several requests at once: a bad one gets its error in its place, alone.
    mixed = [TEXTS[0], "\ud800", TEXTS[2]]
    got = serial.encode_each(mixed, [0, 3, 1], truncate=True, direction=TruncationDirection.RIGHT)
    want = pool.encode_each(mixed, [0, 3, 1], truncate=True, direction=TruncationDirection.RIGHT)
    assert [type(x) for x in got] == [type(x) for x in want]
    assert got[0] == want[0] and got[2] == want[2]
    assert "input 3" in str(got[1])


THREADS = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from embedplex.backends.tokenizer import TextTokenizer, TruncationDirection

    def threads():
        return len(os.listdir("/proc/self/task"))

    tok = TextTokenizer.from_dir(
        Path(sys.argv[1]), max_length=32, vocab_size=int(sys.argv[2]),
        parallel=sys.argv[3] == "pool",
    )
    texts = [f"text number {i} of a batch" for i in range(256)]
    before = threads()
    for _ in range(3):
        tok.encode(texts, truncate=True)
        tok.encode_each(
            texts, list(range(256)), truncate=True, direction=TruncationDirection.RIGHT
        )
        tok.encode_pairs("query", texts, truncate=True)
    print(threads() - before)
    """
)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_one_after_the_other_starts_no_threads(tiny_model_dir: Path) -> None:
    """In a fresh process (the pool is process-wide and starts on first use): batches encoded
    one after the other start no thread; through the pool, they do."""
    spec = load_spec(str(tiny_model_dir), tiny_model_dir)

    def started(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", THREADS, str(tiny_model_dir), str(spec.vocab_size), mode],
            check=True,
            capture_output=True,
            text=True,
            env={"TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": "2", "PATH": ""},
        )
        return int(out.stdout.strip())

    assert started("serial") == 0
    assert started("pool") > 0


def test_a_cpu_model_tokenizes_in_its_own_thread(tiny_model_dir: Path, tmp_path: Path) -> None:
    from embedplex.models.local import load_local_model

    settings = Settings(model_id=str(tiny_model_dir), backend="torch", cache_dir=tmp_path)
    model = load_local_model(settings)
    assert model.backend.device == "cpu"
    assert model.tokenizer.parallel is False
