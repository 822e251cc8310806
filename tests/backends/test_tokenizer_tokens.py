"""``TextTokenizer.tokens`` (TEI ``/tokenize``): every token of every input, with its cost
bounded before the work: an input over max_input_length x 250 characters is refused untokenized
(as TEI refuses it), and an answer over ``max_tokens`` once a group of inputs passes it."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_tokenizer_pairs import Recording, real_tokenizer_json
from tokenizers import Tokenizer

from embedplex.backends.tokenizer import (
    TOKENIZE_CHARS_PER_TOKEN,
    TOKENIZE_GROUP_CHARS,
    TextTokenizer,
    Token,
)
from embedplex.core.errors import InputTooLongError, InvalidRequestError, PayloadTooLargeError

MAX = 32
MAX_CHARS = MAX * TOKENIZE_CHARS_PER_TOKEN


def recorded(path: Path) -> tuple[TextTokenizer, Recording]:
    tok = TextTokenizer(Tokenizer.from_file(str(path)), max_length=MAX, vocab_size=1)
    recording = Recording(tok._plain)
    tok._plain = recording  # type: ignore[assignment]
    return tok, recording


def whole(path: Path, texts: list[str], add_special_tokens: bool = True) -> list[list[Token]]:
    """Every token of each text, as /tokenize answered before it was bounded."""
    plain = Tokenizer.from_file(str(path))
    plain.no_padding()
    plain.no_truncation()
    rows = []
    for text in texts:
        enc = plain.encode(text, add_special_tokens=add_special_tokens)
        rows.append(
            [
                Token(i, plain.id_to_token(i) or "", True, None, None)
                if s
                else Token(i, text[a:b], False, a, b)
                for i, s, (a, b) in zip(enc.ids, enc.special_tokens_mask, enc.offsets, strict=True)
            ]
        )
    return rows


@pytest.mark.parametrize("special", [True, False])
def test_every_token_of_inputs_up_to_the_limit(special: bool) -> None:
    path = real_tokenizer_json()
    tok, _ = recorded(path)
    texts = [
        "hello world",
        "Ünïcödé façade 東京 🚀",
        ("word " * MAX_CHARS)[:MAX_CHARS],  # at the limit: far more than MAX tokens, all kept
        ("a, " * (TOKENIZE_GROUP_CHARS // 3 + 5)),  # past a group's size: a group of its own
    ]
    texts[3] = texts[3][: min(len(texts[3]), MAX_CHARS)]
    assert tok.tokens(texts, add_special_tokens=special) == whole(path, texts, special)


def test_an_input_over_the_limit_is_refused_before_any_is_tokenized() -> None:
    tok, recording = recorded(real_tokenizer_json())
    texts = ["fine", "a " * 1_000_000]
    with pytest.raises(InputTooLongError, match=r"^input 1 has 2000000 characters") as e:
        tok.tokens(texts)
    assert e.value.param == "inputs" and e.value.kind == "validation"
    assert recording.chars == 0
    assert len(tok.tokens([" " * MAX_CHARS])[0]) == 2  # at the limit: taken


def test_an_answer_over_max_tokens_is_refused_once_a_group_passes_it() -> None:
    """30 inputs of 60,000 characters, 30,000 tokens each, against a limit of 100,000: refused
    after some four of them, not after all 1.8 MB (the route refused only once all was made)."""
    tok = TextTokenizer(
        Tokenizer.from_file(str(real_tokenizer_json())), max_length=256, vocab_size=1
    )
    recording = Recording(tok._plain)
    tok._plain = recording  # type: ignore[assignment]
    texts = ["a " * 30_000] * 30
    with pytest.raises(
        PayloadTooLargeError, match=r"token ids in one request > the limit of 100000"
    ):
        tok.tokens(texts, max_tokens=100_000)
    assert recording.chars <= 100_000 * 2 + TOKENIZE_GROUP_CHARS
    assert len(tok.tokens(texts[:3], max_tokens=100_000)) == 3  # 90,006 tokens: answered


def test_a_lone_surrogate_is_named_by_its_place_in_the_request() -> None:
    tok, _ = recorded(real_tokenizer_json())
    texts = ["a " * (MAX_CHARS // 2)] * 9 + ["x\udfff"]  # past the first group
    assert sum(map(len, texts[:9])) > TOKENIZE_GROUP_CHARS
    with pytest.raises(InvalidRequestError, match="input 9 is not valid unicode"):
        tok.tokens(texts)
