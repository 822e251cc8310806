"""A long text is truncated from a part of it, and keeps exactly what the whole text keeps."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from test_tokenizer_pairs import Recording, ours, real_tokenizer_json, whole_pairs
from tokenizers import Tokenizer

from embedplex.backends.tokenizer import (
    PART_CHARS_PER_TOKEN,
    Encoded,
    TextTokenizer,
    TruncationDirection,
)
from embedplex.core.errors import EmbedplexError, InvalidRequestError

MAX = 32
BOUND = MAX * PART_CHARS_PER_TOKEN

ALPHABET = [
    *"abc xyz  !?.,;:'\"-_()[]\t\n",
    *"東京は日本の首都です한국어éüñ",
    *["\u0301", "🚀", "👩\u200d💻", "\u200b", "\u00a0", "\u3000", "\ufeff", "\x00", "\x7f"],
    *["\x85", "[SEP]", "[", "]", "[MASK]"],  # deleted by the normalizer; added tokens
]


def adversarial(rng: random.Random) -> str:
    n = rng.choice([BOUND - 1, BOUND + 1, BOUND + 7, 2 * BOUND, 4 * BOUND])
    mode = rng.random()
    if mode < 0.4:
        return "".join(rng.choice(ALPHABET) for _ in range(n))
    if mode < 0.7:
        letters = "abcdefghé東!\u0301"
        return " ".join(
            "".join(rng.choice(letters) for _ in range(rng.randint(1, 3 * BOUND // 2)))
            for _ in range(max(1, n // 20))
        )
    unit = rng.choice(["!", " ", "a", "ab ", "\u0301", "x\u0301 ", "東", "  \n", "a" * 5000 + " "])
    return (unit * (n // len(unit) + 1))[:n]


def expected(path: Path, texts: list[str], direction: str) -> list[Encoded]:
    tok = whole_pairs(path, MAX, True, direction)
    return [
        Encoded(e.ids, e.type_ids if any(e.type_ids) else None) for e in tok.encode_batch(texts)
    ]


@pytest.mark.parametrize("direction", ["right", "left"])
def test_parts_keep_what_whole_texts_keep(direction: str) -> None:
    path = real_tokenizer_json()
    tok = ours(path, MAX)
    rng = random.Random(direction)
    texts = [adversarial(rng) for _ in range(40)]
    d = TruncationDirection(direction)
    whole = expected(path, texts, direction)
    assert tok.encode(texts, truncate=True, direction=d) == whole
    assert tok.encode_each(texts, list(range(len(texts))), truncate=True, direction=d) == whole


@pytest.mark.parametrize("direction", ["right", "left"])
def test_a_long_text_is_tokenized_in_part(direction: str) -> None:
    path = real_tokenizer_json()
    tok = TextTokenizer(Tokenizer.from_file(str(path)), max_length=MAX, vocab_size=1)
    d = TruncationDirection(direction)
    recording = Recording(tok._truncating[d])
    tok._truncating[d] = recording  # type: ignore[assignment]
    text = "!" * 2_000_000
    assert tok.encode([text], truncate=True, direction=d) == expected(path, [text], direction)
    assert 0 < recording.chars <= BOUND
    recording.chars = 0
    tok.encode_each([text, "a"], [0, 1], truncate=True, direction=d)
    assert 0 < recording.chars <= BOUND + 1


def test_a_part_that_truncation_does_not_cut_falls_back_to_the_whole_text() -> None:
    path = real_tokenizer_json()
    tok = ours(path, MAX)
    text = " " * (3 * BOUND) + "hello world"  # the part is only spaces: no tokens at all
    assert tok.encode([text], truncate=True) == expected(path, [text], "right")


def test_a_lone_surrogate_past_the_part_is_still_refused() -> None:
    tok = ours(real_tokenizer_json(), MAX)
    text = "a " * BOUND + "\ud800"
    with pytest.raises(InvalidRequestError, match="lone surrogate"):
        tok.encode([text], truncate=True)
    (error,) = tok.encode_each([text], [0], truncate=True, direction=TruncationDirection.RIGHT)
    assert isinstance(error, EmbedplexError)


@pytest.mark.parametrize("direction", ["right", "left"])
@pytest.mark.parametrize("k", range(1, 6))
def test_an_added_token_or_a_deleted_character_at_the_cut_changes_nothing(
    direction: str, k: int
) -> None:
    """Cut at the raw pre-tokenizer's boundaries, a part split "[SEP]" into "[", "SEP", "]"
    (the whole text keeps the added token) and ended a word at U+0085, which the normalizer
    deletes (the whole text joins the word across it): both tokenized otherwise (review)."""
    path = real_tokenizer_json()
    tok = ours(path, MAX)
    d = TruncationDirection(direction)
    head = "a " * (MAX - 2 - k)
    for marker in ("[SEP]", "qzxvbnmkjh\x85"):
        pad = " " * (BOUND - len(head) - len(marker))
        if direction == "right":  # the marker ends exactly at the cut
            text = head + pad + marker + "c" * 300 + " b" * 50
        else:  # the marker starts exactly where the part would begin
            text = "b " * 50 + "c" * 300 + marker + pad + head
        assert tok.encode([text], truncate=True, direction=d) == expected(path, [text], direction)


def test_a_whole_text_fallback_keeps_add_special_tokens() -> None:
    path = real_tokenizer_json()
    tok = ours(path, MAX)
    text = "a b" + " " * (2 * BOUND) + "c"  # the part has no more than MAX tokens: whole
    (got,) = tok.encode([text], truncate=True, add_special_tokens=False)
    plain = Tokenizer.from_file(str(path))
    plain.no_padding()
    assert got.ids == plain.encode(text, add_special_tokens=False).ids == [1037, 1038, 1039]
