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
from embedplex.core.errors import EmbedplexError, InputTooLongError, InvalidRequestError

MAX = 32
BOUND = MAX * PART_CHARS_PER_TOKEN
RIGHT = TruncationDirection.RIGHT

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


def outcomes(path: Path, texts: list[str]) -> list[Encoded | int]:
    """What the whole texts give with truncation off: the encoding, or the index refused."""
    tok = whole_pairs(path, MAX, False, "right")
    return [
        Encoded(e.ids, e.type_ids if any(e.type_ids) else None) if len(e.ids) <= MAX else k
        for k, e in enumerate(tok.encode_batch(texts))
    ]


def refused_at(got: list[Encoded | EmbedplexError]) -> list[Encoded | int]:
    out: list[Encoded | int] = []
    for k, e in enumerate(got):
        if isinstance(e, InputTooLongError):
            assert f"input {k} has " in str(e) and f"maximum of {MAX}" in str(e)
            out.append(k)
        else:
            assert isinstance(e, Encoded)
            out.append(e)
    return out


def around_the_limit() -> list[str]:
    """Texts longer than the part, with MAX - 3 .. MAX + 1 tokens (specials included) before,
    after or around a run of spaces the size of the part: just under, at and over the limit."""
    texts = []
    for n in range(MAX - 5, MAX):
        words = "a " * n
        texts += [
            words + " " * (2 * BOUND),  # the tokens are in the part
            " " * (2 * BOUND) + words,  # past it: the part proves nothing
            "a " * (n // 2) + " " * (2 * BOUND) + "b " * (n - n // 2),
        ]
    return texts


def test_with_truncation_off_parts_refuse_and_keep_what_whole_texts_do() -> None:
    path = real_tokenizer_json()
    tok = ours(path, MAX)
    rng = random.Random("off")
    texts = [adversarial(rng) for _ in range(40)] + around_the_limit()
    whole = outcomes(path, texts)
    assert any(isinstance(w, int) for w in whole) and any(isinstance(w, Encoded) for w in whole)
    got = tok.encode_each(texts, list(range(len(texts))), truncate=False, direction=RIGHT)
    assert refused_at(got) == whole
    for k, text in enumerate(texts):  # one at a time: the same, or the same refusal
        try:
            assert tok.encode([text], truncate=False) == [whole[k]]
        except InputTooLongError:
            assert isinstance(whole[k], int)


def test_a_long_text_is_refused_from_its_part() -> None:
    """truncate false and 2 MB of text: refused after tokenizing one part of it, with the
    same error as before (422 validation, param input), its count a lower bound."""
    path = real_tokenizer_json()
    tok = TextTokenizer(Tokenizer.from_file(str(path)), max_length=MAX, vocab_size=1)
    recording = Recording(tok._plain)
    tok._plain = recording  # type: ignore[assignment]
    text = "hello world, " * 160_000
    with pytest.raises(
        InputTooLongError, match=r"^input 0 has at least \d+ tokens, more than"
    ) as e:
        tok.encode([text], truncate=False)
    assert e.value.param == "input" and e.value.kind == "validation"
    assert 0 < recording.chars <= BOUND
    recording.chars = 0
    got = tok.encode_each(["a", text], [3, 4], truncate=False, direction=RIGHT)
    assert isinstance(got[0], Encoded) and isinstance(got[1], InputTooLongError)
    assert "input 4 has at least" in str(got[1])
    assert 0 < recording.chars <= BOUND + 1


def recorded(path: Path, d: TruncationDirection) -> tuple[TextTokenizer, Recording, Recording]:
    """The real tokenizer at ``MAX``, its plain and ``d``-truncating tokenizers recording the
    characters they are given."""
    tok = TextTokenizer(Tokenizer.from_file(str(path)), max_length=MAX, vocab_size=1)
    plain, cutting = Recording(tok._plain), Recording(tok._truncating[d])
    tok._plain = plain  # type: ignore[assignment]
    tok._truncating[d] = cutting  # type: ignore[assignment]
    return tok, plain, cutting


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("direction", ["right", "left"])
def test_a_run_of_spaces_costs_what_it_holds(truncate: bool, direction: str) -> None:
    """A part of spaces settles nothing, and the whole text was tokenized (a megabyte of words
    behind 4 x BOUND spaces: seconds); the text is read on a part's length at a time instead."""
    path = real_tokenizer_json()
    d = TruncationDirection(direction)
    tok, plain, cutting = recorded(path, d)
    spaces, words = " \n\x85\u200b" * BOUND, "hello world, " * 100_000
    side = direction if truncate else "right"
    text = spaces + words if side == "right" else words + spaces
    if truncate:
        assert tok.encode([text], truncate=True, direction=d) == expected(path, [text], direction)
    else:
        with pytest.raises(InputTooLongError, match="input 0 has at least"):
            tok.encode([text], truncate=False, direction=d)
    # The part, read again without special tokens, the run, and one stretch past it.
    assert plain.chars + cutting.chars <= len(spaces) + 3 * BOUND


def silent(rng: random.Random) -> str:
    """Long texts of characters that make no token (spaces, deleted characters) with a few
    that do, here and there: parts that settle nothing, read on stretch by stretch."""
    quiet = [" ", "\n", "\x85", "\u200b", "\x00", "\ufeff", " \u0301", "  "]
    loud = ["a", "!", "[SEP]", "東", "é", "word", "[", "x\u0301"]
    n = rng.choice([3 * BOUND, 5 * BOUND, 9 * BOUND])
    p = rng.choice([0.0005, 0.002, 0.01, 0.05])
    out: list[str] = []
    size = 0
    while size < n:
        piece = rng.choice(loud) if rng.random() < p else rng.choice(quiet)
        out.append(piece)
        size += len(piece)
    return "".join(out)


@pytest.mark.parametrize("direction", ["right", "left"])
def test_texts_read_on_stretch_by_stretch_keep_what_whole_texts_keep(direction: str) -> None:
    path = real_tokenizer_json()
    tok = ours(path, MAX)
    rng = random.Random(f"silent-{direction}")
    texts = [silent(rng) for _ in range(40)]
    d = TruncationDirection(direction)
    assert tok.encode(texts, truncate=True, direction=d) == expected(path, texts, direction)
    got = tok.encode_each(texts, list(range(len(texts))), truncate=False, direction=d)
    assert refused_at(got) == outcomes(path, texts)


@pytest.mark.parametrize("direction", ["right", "left"])
@pytest.mark.parametrize(
    "unit", ["東", "日本語の文", "a\n", "a\t", "a\r\n", "a\u00a0", "a\u3000", "東" * 40 + "\u00e9"]
)
def test_text_without_ascii_spaces_is_cut_too(direction: str, unit: str) -> None:
    """Ideographs alone, or words between tabs, newlines or Unicode spaces, were tokenized
    whole (a 2 MB run of 中: 5 s and 1.3 GB): each is a piece boundary as much as a space, so the
    part cut there keeps what the whole text keeps, and costs a part."""
    path = real_tokenizer_json()
    d = TruncationDirection(direction)
    tok, plain, cutting = recorded(path, d)
    text = unit * (40 * BOUND // len(unit))
    assert tok.encode([text], truncate=True, direction=d) == expected(path, [text], direction)
    assert plain.chars + cutting.chars <= 2 * BOUND
    with pytest.raises(InputTooLongError, match="input 0 has at least"):
        tok.encode([text], truncate=False, direction=d)
    assert plain.chars + cutting.chars <= 4 * BOUND


def test_a_single_word_added_token_turns_cutting_off() -> None:
    """The library matches a ``single_word`` added token at its own word boundaries ("_" is a
    word character to it), not the pre-tokenizer's: a cut at "_" would make a boundary that the
    whole text has not. Such a tokenizer's texts are tokenized whole."""
    from tokenizers import AddedToken

    base = Tokenizer.from_file(str(real_tokenizer_json()))
    base.add_tokens([AddedToken("<x>", single_word=True)])
    base.no_truncation()
    base.no_padding()
    tok = TextTokenizer(Tokenizer.from_str(base.to_str()), max_length=8, vocab_size=1)
    assert tok._cuts == "" and not tok._cjk
    for text, d in [
        ("q" * 511 + "_<x>" + " red" * 3, RIGHT),  # "_" just inside the part (8 x 64 chars)
        ("red " * 3 + "<x>_" + "q" * 511, TruncationDirection.LEFT),
    ]:
        whole = Tokenizer.from_str(base.to_str())
        whole.enable_truncation(8, direction=d.value)
        assert tok.encode([text], truncate=True, direction=d)[0].ids == whole.encode(text).ids
