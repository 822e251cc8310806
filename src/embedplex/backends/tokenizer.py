"""Tokenization with Hugging Face ``tokenizers``: run in a thread pool, token ids kept.

Truncation state lives on a ``tokenizers.Tokenizer`` object, so we keep one object per
truncation mode instead of flipping settings under concurrent threads.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from tokenizers import Encoding, Tokenizer, normalizers, pre_tokenizers

from embedplex.core.errors import (
    EmbedplexError,
    EmptyInputError,
    InputTooLongError,
    InvalidRequestError,
)

# Plain lists: turning them into arrays is left to collate, in the inference thread.
Ids = list[int]

# A text longer than max_length x this many characters is truncated from a part of this size
# (``TextTokenizer._part``): more characters than any token of a BERT vocabulary needs.
PART_CHARS_PER_TOKEN = 64


class TruncationDirection(StrEnum):
    RIGHT = "right"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized input, ready to pad into a batch."""

    ids: Ids
    type_ids: Ids | None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def cost(self) -> int:
        """What it weighs in a batch: its token count."""
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


def tokenize_in_calling_thread() -> None:
    """Batches encode in the thread that asks (an inference thread), not in the library's own
    thread pool (rayon, one thread per core): for a process whose model runs on the CPU.

    The pool pays where cores are idle while the model runs (a GPU server). Where the model
    runs on the CPU its passes already keep every core busy, and the pool's threads only take
    turns with them, at more cost than they save (rayon wakes, and spins, its workers for every
    batch). Measured on the 2-core machine: 21 texts of 14 tokens took 615 us of CPU through
    the pool and 498 us in the calling thread; at 64 clients the pool's threads took 94-100 us
    of CPU per request, besides the tokenizing itself (docs/benchmarks.md, "Where the CPU
    goes"). ``encode_batch`` still releases the GIL while it works, which ``encode`` called
    text by text does not: the event loop runs on meanwhile.

    The library's only switch is the ``TOKENIZERS_PARALLELISM`` variable, read at every call,
    so this is process-wide; an operator who set the variable keeps their choice.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, *, max_length: int, vocab_size: int) -> None:
        self.max_length = max_length
        self.vocab_size = vocab_size
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._plain = tokenizer
        # A long text is truncated from a part of it only where tokenizing is local: BERT's
        # normalizer works char by char and its pre-tokenizer splits at whitespace and
        # punctuation, so the pieces before a piece boundary tokenize alike in any longer text.
        # The part is cut only at an ASCII space or punctuation mark (each a piece boundary
        # whatever stands beside it) that no added token holds: the raw pre-tokenizer's own
        # boundaries include characters the normalizer deletes (U+0085) and fall inside added
        # tokens ("[SEP]" is "[", "SEP", "]" to it), where the whole text tokenizes otherwise.
        added = "".join(t.content for t in tokenizer.get_added_tokens_decoder().values())
        local = isinstance(tokenizer.pre_tokenizer, pre_tokenizers.BertPreTokenizer) and (
            tokenizer.normalizer is None
            or isinstance(tokenizer.normalizer, normalizers.BertNormalizer)
        )
        self._cuts = (
            "".join(c for c in " " + string.punctuation if c not in added)
            if local and not any(c.isspace() for c in added)
            else ""
        )
        self._truncating: dict[TruncationDirection, Tokenizer] = {}
        for direction in TruncationDirection:
            tok = Tokenizer.from_str(tokenizer.to_str())
            tok.no_padding()
            tok.enable_truncation(max_length, direction=direction.value)
            self._truncating[direction] = tok

    @classmethod
    def from_dir(cls, path: Path, *, max_length: int, vocab_size: int) -> TextTokenizer:
        return cls(
            Tokenizer.from_file(str(path / "tokenizer.json")),
            max_length=max_length,
            vocab_size=vocab_size,
        )

    def encode(
        self,
        texts: list[str],
        *,
        truncate: bool,
        direction: TruncationDirection = TruncationDirection.RIGHT,
        add_special_tokens: bool = True,
    ) -> list[Encoded]:
        if not truncate:
            return self._checked(_encode_batch(self._plain, texts, add_special_tokens))
        tok = self._truncating[direction]
        parts = [self._part(text, direction) for text in texts]
        encodings = _encode_batch(tok, parts, add_special_tokens)
        return self._checked(
            self._whole_where_short(tok, texts, parts, encodings, add_special_tokens)
        )

    def encode_each(
        self,
        texts: list[str],
        indices: list[int],
        *,
        truncate: bool,
        direction: TruncationDirection,
    ) -> list[Encoded | EmbedplexError]:
        """``encode`` for texts of several requests at once (the inference thread tokenizes a
        batch): a text that fails gets its error in its place instead of failing them all.
        ``indices`` are the texts' positions in their own requests, for the error messages."""
        tok = self._truncating[direction] if truncate else self._plain
        parts = [self._part(text, direction) for text in texts] if truncate else texts
        try:
            encodings = _encode_raw(tok, parts, True)
            encodings = self._whole_where_short(tok, texts, parts, encodings)
        except (TypeError, ValueError):  # one bad text fails the whole call: find it
            out: list[Encoded | EmbedplexError] = []
            for text, index in zip(texts, indices, strict=True):
                if not _valid(text):
                    out.append(_lone_surrogate(index))
                    continue
                out.append(self._checked_or_error(tok.encode(text), index))
            return out
        return [self._checked_or_error(e, i) for e, i in zip(encodings, indices, strict=True)]

    def _part(self, text: str, direction: TruncationDirection) -> str:
        """The part of a long text that truncation keeps from (its start, or its end when
        truncating left), cut just past (before, from the end) a safe boundary character
        (``_cuts``): tokenizing a megabyte to keep ``max_length`` tokens cost seconds and a
        gigabyte. The text itself where it is short, where the tokenizer is not known to
        tokenize locally, where no safe boundary is near the cut, or where it is not valid text
        (whole, it fails as it should)."""
        bound = self.max_length * PART_CHARS_PER_TOKEN
        cuts = self._cuts
        if len(text) <= bound or not cuts or not _valid(text):
            return text
        if direction is TruncationDirection.RIGHT:
            at = max(text.rfind(c, 0, bound) for c in cuts)
            return text[: at + 1] if at > 0 else text
        start = len(text) - bound
        found = [i for i in (text.find(c, start) for c in cuts) if i >= 0]
        return text[min(found) :] if found and min(found) < len(text) - 1 else text

    def _whole_where_short(
        self,
        tok: Tokenizer,
        texts: list[str],
        parts: list[str],
        encodings: list[Encoding],
        add_special_tokens: bool = True,
    ) -> list[Encoding]:
        """A part that truncation did not cut (it had no more than ``max_length`` tokens: a
        megabyte of spaces) does not show what the whole text keeps: that one is encoded
        whole. A part that was cut keeps what the whole text keeps: the pieces before its
        boundary tokenize alike in both."""
        special = add_special_tokens
        return [
            enc if part is text or enc.overflowing else tok.encode(text, add_special_tokens=special)
            for text, part, enc in zip(texts, parts, encodings, strict=True)
        ]

    def _checked(self, encodings: list[Encoding]) -> list[Encoded]:
        return [self._one(enc, index) for index, enc in enumerate(encodings)]

    def _checked_or_error(self, enc: Encoding, index: int) -> Encoded | EmbedplexError:
        try:
            return self._one(enc, index)
        except InputTooLongError as exc:
            return exc

    def _one(self, enc: Encoding, index: int) -> Encoded:
        ids = enc.ids  # a new list on every access
        n = len(ids)
        if n > self.max_length:
            raise InputTooLongError(
                f"input {index} has {n} tokens, more than the maximum of {self.max_length}; "
                "set truncate to true or shorten it",
                param="input",
            )
        type_ids = enc.type_ids
        return Encoded(ids, type_ids if any(type_ids) else None)

    def encode_pairs(
        self,
        query: str,
        texts: list[str],
        *,
        truncate: bool,
        direction: TruncationDirection = TruncationDirection.RIGHT,
    ) -> list[Encoded]:
        """(query, text) pairs for a cross-encoder; truncation cuts the longer side first.

        The result is exactly ``encode_batch([(query, text) for text in texts])``'s, but the
        query is tokenized once, not once per text: joined per pair, a long query made the
        work grow with len(query) x len(texts). ``post_process`` applies the truncation and the
        pair template as ``encode`` does, to each side encoded whole without special tokens.
        """
        tok = self._truncating[direction] if truncate else self._plain
        try:
            # Whole sides (the truncating tokenizer would cut each alone): pairing cuts them.
            question = self._plain.encode(query, add_special_tokens=False)
            if not truncate and len(question) > self.max_length:
                # Every pair is too long: refuse with the first one's error, before the rest.
                texts = texts[:1]
            answers = _encode_raw(self._plain, texts, False)  # the pair template adds them
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError("query and texts must be valid unicode text") from exc
        n_query = len(question)
        if not truncate or n_query <= self.max_length:
            return self._checked([tok.post_process(question, a) for a in answers])
        # A query longer than max_length keeps at most max_length tokens in any pair, so each
        # pair copies a cut one. Longest-first truncation also looks at which side is longer
        # (with an odd budget the longer side keeps the extra token), so the cut query is one
        # token past max_length and a long text is cut to stay longer, equal or shorter alike.
        question.truncate(self.max_length + 1, 0, direction.value)
        pairs: list[Encoding] = []
        for answer in answers:
            n_text = len(answer)
            cap = self.max_length + 1 + (n_text > n_query) - (n_text < n_query)
            if n_text > cap:
                answer.truncate(cap, 0, direction.value)
            pairs.append(tok.post_process(question, answer))
        return self._checked(pairs)

    def encode_ids(
        self,
        sequences: list[list[int]],
        *,
        truncate: bool,
        direction: TruncationDirection = TruncationDirection.RIGHT,
    ) -> list[Encoded]:
        """Inputs given as token ids are used as they are (no special tokens are added)."""
        out: list[Encoded] = []
        for index, seq in enumerate(sequences):
            if not seq:
                raise InvalidRequestError(
                    f"input {index} is an empty list of token ids", param="input"
                )
            if min(seq) < 0 or max(seq) >= self.vocab_size:
                raise InvalidRequestError(
                    f"input {index} has token ids outside the vocabulary [0, {self.vocab_size})",
                    param="input",
                )
            if len(seq) > self.max_length:
                if not truncate:
                    raise InputTooLongError(
                        f"input {index} has {len(seq)} tokens, more than the maximum of "
                        f"{self.max_length}; set truncate to true or shorten it",
                        param="input",
                    )
                seq = (
                    seq[: self.max_length]
                    if direction is TruncationDirection.RIGHT
                    else seq[-self.max_length :]
                )
            out.append(Encoded(list(seq), None))
        return out

    def decode(self, sequences: list[list[int]], *, skip_special_tokens: bool) -> list[str]:
        """Token ids back to text (TEI ``/decode``); ids must be inside the vocabulary."""
        for index, seq in enumerate(sequences):
            if not seq:
                raise EmptyInputError(f"ids {index} is an empty list of token ids", param="ids")
            if min(seq) < 0 or max(seq) >= self.vocab_size:
                raise InvalidRequestError(
                    f"ids {index} has token ids outside the vocabulary [0, {self.vocab_size})",
                    param="ids",
                )
        return self._plain.decode_batch(sequences, skip_special_tokens=skip_special_tokens)

    def tokens(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[Token]]:
        """Token detail for the TEI ``/tokenize`` route."""
        result: list[list[Token]] = []
        for text, enc in zip(
            texts,
            _encode_batch(self._plain, texts, add_special_tokens),
            strict=True,
        ):
            row = []
            for tid, special, (start, stop) in zip(
                enc.ids, enc.special_tokens_mask, enc.offsets, strict=True
            ):
                is_special = bool(special)
                row.append(
                    Token(
                        id=tid,
                        text=text[start:stop]
                        if not is_special
                        else (self._plain.id_to_token(tid) or ""),
                        special=is_special,
                        start=None if is_special else start,
                        stop=None if is_special else stop,
                    )
                )
            result.append(row)
        return result


def _encode_raw(tok: Tokenizer, texts: list[str], add_special_tokens: bool) -> list[Encoding]:
    """``encode_batch``, but one text in this thread: ``encode_batch`` hands even one text to
    its thread pool (a wake-up per request at c=1)."""
    if len(texts) == 1:
        return [tok.encode(texts[0], add_special_tokens=add_special_tokens)]
    return tok.encode_batch(texts, add_special_tokens=add_special_tokens)


def _encode_batch(tok: Tokenizer, texts: list[str], add_special_tokens: bool) -> list[Encoding]:
    try:
        return _encode_raw(tok, texts, add_special_tokens)
    except (TypeError, ValueError) as exc:
        # JSON can carry lone surrogates ("\ud800"), which are not text the tokenizer accepts.
        for index, text in enumerate(texts):
            if not _valid(text):
                raise _lone_surrogate(index) from exc
        raise


def _valid(text: str) -> bool:
    """No lone surrogates (JSON can carry them; the tokenizer refuses them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate(index: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"input {index} is not valid unicode text (lone surrogate)", param="input"
    )
