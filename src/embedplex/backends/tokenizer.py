"""Tokenization with Hugging Face ``tokenizers``: run in a thread pool, token ids kept.

Truncation state lives on a ``tokenizers.Tokenizer`` object, so we keep one object per
truncation mode instead of flipping settings under concurrent threads.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from tokenizers import Encoding, Tokenizer, normalizers, pre_tokenizers

from embedplex.core.errors import (
    EmbedplexError,
    EmptyInputError,
    InputTooLongError,
    InvalidRequestError,
    PayloadTooLargeError,
)

# Plain lists: turning them into arrays is left to collate, in the inference thread.
Ids = list[int]

# A text longer than max_length x this many characters is truncated from a part of this size
# (``TextTokenizer._part``): more characters than any token of a BERT vocabulary needs.
PART_CHARS_PER_TOKEN = 64

# A rerank query counts at most this many x max_length tokens, plus one (``encode_pairs``): a
# pair keeps fewer than max_length of its tokens, and reading on only to tell which side is the
# longer made every request's cost grow with its query's length (a 2 MB query: seconds).
QUERY_MAX_LENGTHS = 2

# One text longer than this is tokenized without holding the GIL (``_encode_raw``): this many
# characters take some 0.3 ms, the longest the event loop may wait on a tokenizer thread.
GIL_FREE_CHARS = 1024

# TEI refuses a ``/tokenize`` input longer than max_input_length x this many characters
# (``MAX_CHAR_MULTIPLIER`` in its core/src/tokenization.rs): the answer has every token.
TOKENIZE_CHARS_PER_TOKEN = 250

# ``/tokenize`` inputs are tokenized this many characters at a time (``TextTokenizer.tokens``).
TOKENIZE_GROUP_CHARS = 65_536


# Whitespace that BERT's normalizer makes a space and its pre-tokenizer splits at (Unicode
# White_Space, not a control character: U+0085 is deleted instead), cut at like a space.
_SPACES = " \t\n\r\u00a0\u3000"

# How far from a cut point a CJK ideograph is looked for (``TextTokenizer._cut_at``).
_CJK_SCAN = 64


def _is_cjk(c: str) -> bool:
    """A CJK ideograph that BERT's normalizer sets apart (its ``handle_chinese_chars``): the
    main blocks of its list, enough for text of them alone to be cut."""
    o = ord(c)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF


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

    @property
    def bound(self) -> int:
        """What a key's tpm reserves for it (``core/spend.py``): its count, known."""
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
        # Lowercases what the model's own tokenizer.json does not (``do_lower_case``:
        # ``model_files.tokenizer_for``): its vectors differ from the file's tokenizer's.
        self.lowered = False
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
        # Tab, newline, carriage return, no-break and ideographic spaces are whitespace to both
        # (the normalizer's clean_text makes them spaces: ``_SPACES``). An added token matched
        # as a single word is not local: the library's own word boundaries for it differ from
        # the pre-tokenizer's ("_" is a word character to it), so such a tokenizer's texts are
        # never cut.
        tokens = list(tokenizer.get_added_tokens_decoder().values())
        added = "".join(t.content for t in tokens)
        normalizer = tokenizer.normalizer
        local = (
            isinstance(tokenizer.pre_tokenizer, pre_tokenizers.BertPreTokenizer)
            and (normalizer is None or isinstance(normalizer, normalizers.BertNormalizer))
            and not any(c.isspace() for c in added)
            and not any(t.single_word for t in tokens)
        )
        self._cuts = (
            "".join(c for c in _SPACES + string.punctuation if c not in added) if local else ""
        )
        # BERT's normalizer puts spaces around each CJK ideograph (handle_chinese_chars): a
        # piece boundary on either side of one, where text of them alone has no other cut.
        self._cjk = (
            local
            and isinstance(normalizer, normalizers.BertNormalizer)
            and bool(normalizer.handle_chinese_chars)
            and not any(_is_cjk(c) for c in added)
        )
        self._truncating: dict[TruncationDirection, Tokenizer] = {}
        for direction in TruncationDirection:
            tok = Tokenizer.from_str(tokenizer.to_str())
            tok.no_padding()
            tok.enable_truncation(max_length, direction=direction.value)
            self._truncating[direction] = tok

    @property
    def max_chars(self) -> int:
        """The longest text ``tokens`` takes, in characters."""
        return self.max_length * TOKENIZE_CHARS_PER_TOKEN

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
        tok = self._truncating[direction] if truncate else self._plain
        side = direction if truncate else TruncationDirection.RIGHT
        parts = self._parts(texts, side)
        encodings = _encode_batch(tok, parts, add_special_tokens)
        settled = self._settled(tok, texts, parts, encodings, side, add_special_tokens)
        return [self._one(enc, index, whole) for index, (enc, whole) in enumerate(settled)]

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
        side = direction if truncate else TruncationDirection.RIGHT
        parts = self._parts(texts, side)
        try:
            settled = self._settled(tok, texts, parts, _encode_raw(tok, parts, True), side)
        except (TypeError, ValueError):  # one bad text fails the whole call: find it
            out: list[Encoded | EmbedplexError] = []
            for text, part, index in zip(texts, parts, indices, strict=True):
                if not _valid(text):
                    out.append(_lone_surrogate(index))
                    continue
                ((enc, whole),) = self._settled(
                    tok, [text], [part], _encode_raw(tok, [part], True), side
                )
                out.append(self._checked_or_error(enc, index, whole))
            return out
        return [
            self._checked_or_error(enc, index, whole)
            for (enc, whole), index in zip(settled, indices, strict=True)
        ]

    def _parts(
        self, texts: list[str], direction: TruncationDirection, tokens: int = 0
    ) -> list[str]:
        """Each text's ``_part``, the first of it to tokenize (``_settled`` reads on)."""
        return [self._part(text, direction, tokens) for text in texts]

    def _part(self, text: str, direction: TruncationDirection, tokens: int = 0) -> str:
        """The part of a long text that truncation keeps from (its start, or its end when
        truncating left), cut just past (before, from the end) a safe boundary character
        (``_cuts``): tokenizing a megabyte to keep ``max_length`` tokens cost seconds and a
        gigabyte. Its tokens are the whole text's first (last) ones, so a part of more than
        ``max_length`` tokens also proves a text too long where truncation is off. The text
        itself where it is short, where the tokenizer is not known to tokenize locally, where no
        safe boundary is near the cut, or where it is not valid text (whole, it fails as it
        should). ``tokens``: the tokens the part must be able to hold (default ``max_length``)."""
        bound = max(tokens, self.max_length) * PART_CHARS_PER_TOKEN
        if len(text) <= bound or not self._cuts or not _valid(text):
            return text
        return self._cut(text, direction, bound)

    def _cut(self, text: str, direction: TruncationDirection, bound: int) -> str:
        """At most ``bound`` characters of ``text`` from the end truncation keeps, cut at a safe
        boundary (``_part``); the text itself where it is short or none is found."""
        kept = self._cut_at(text, direction, bound)
        if kept == len(text):
            return text
        return text[:kept] if direction is TruncationDirection.RIGHT else text[len(text) - kept :]

    def _cut_at(self, text: str, direction: TruncationDirection, bound: int, after: int = 0) -> int:
        """How many characters, from the end truncation keeps, reach the safe boundary (a
        character of ``_cuts``, or a CJK ideograph: its own piece) nearest ``bound`` among the
        characters past the first ``after``; ``len(text)`` where the text is no longer or none
        is there. Only that stretch is searched: reading on over a long text stays linear."""
        n = len(text)
        if n <= bound:
            return n
        lo, hi = max(after, 1), bound
        if direction is TruncationDirection.RIGHT:
            at = max(text.rfind(c, lo, hi) for c in self._cuts) if self._cuts else -1
            if self._cjk:
                for i in range(hi - 1, max(at, lo - 1, hi - _CJK_SCAN - 1), -1):
                    if _is_cjk(text[i]):
                        at = i
                        break
            return at + 1 if at >= lo else n
        start, end = n - hi, n - lo
        found = [i for i in (text.find(c, start, end) for c in self._cuts) if i >= 0]
        at = min(found) if found else end
        if self._cjk:
            for i in range(start, min(at, start + _CJK_SCAN)):
                if _is_cjk(text[i]):
                    at = i
                    break
        return n - at if at < end else n

    def _settled(
        self,
        tok: Tokenizer,
        texts: list[str],
        parts: list[str],
        encodings: list[Encoding],
        direction: TruncationDirection,
        add_special_tokens: bool = True,
        need: int = 0,
    ) -> list[tuple[Encoding, bool]]:
        """Each text's encoding, and whether it is the whole text's (else a part's).

        A part that truncation cut, or that holds more than ``need`` tokens (default
        ``max_length``: with truncation off, the text is too long), settles what the whole text
        gives: the pieces before its boundary tokenize alike in both. A part with fewer (a run
        of spaces holds no tokens) settles nothing: the text is read on (``_read_on``)."""
        need = max(need, self.max_length)
        out: list[tuple[Encoding, bool]] = []
        for text, part, enc in zip(texts, parts, encodings, strict=True):
            if part is text or enc.overflowing or len(enc) > need:
                out.append((enc, part is text))
            else:
                out.append(self._read_on(tok, text, part, direction, add_special_tokens, need))
        return out

    def _read_on(
        self,
        tok: Tokenizer,
        text: str,
        part: str,
        direction: TruncationDirection,
        add_special_tokens: bool,
        need: int,
    ) -> tuple[Encoding, bool]:
        """A text whose part holds no more than ``need`` tokens, read on from where the part
        ends (begins, from the end), a part's length more at a time, each stretch cut at a safe
        boundary (so tokenized as in the whole text), until what was read holds more than
        ``need`` tokens or is the whole text. The stretches' encodings, joined and given the
        special tokens and truncation of ``tok``, are what ``tok`` gives the text read (ids and
        type ids; offsets are not kept). So a run of spaces before a megabyte of words costs
        about the part it would have cost without them, and a megabyte of spaces is read once
        (it was tokenized whole after its part)."""
        right = direction is TruncationDirection.RIGHT
        step = need * PART_CHARS_PER_TOKEN
        n = len(text)
        pieces = [_encode_raw(self._plain, [part], False)[0]]
        held = len(pieces[0])
        read = len(part)  # characters read, from the end truncation keeps
        while read < n and held <= need:
            # The next boundary past what was read, a stretch at a time (each searched once): a
            # stretch with none (ideographs of a script without spaces) widens the search.
            searched, wider = read, n
            while searched < n:
                wider = self._cut_at(text, direction, searched + step, searched)
                if wider < n or searched + step >= n:
                    break
                searched += step
            stretch = text[read:wider] if right else text[n - wider : n - read]
            piece = _encode_raw(self._plain, [stretch], False)[0]
            pieces.insert(len(pieces) if right else 0, piece)
            held += len(piece)
            read = wider
        joined = Encoding.merge(pieces, growing_offsets=True)
        return tok.post_process(joined, add_special_tokens=add_special_tokens), read >= n

    def _checked_or_error(
        self, enc: Encoding, index: int, whole: bool = True
    ) -> Encoded | EmbedplexError:
        try:
            return self._one(enc, index, whole)
        except InputTooLongError as exc:
            return exc

    def _one(self, enc: Encoding, index: int, whole: bool = True) -> Encoded:
        """``whole``: ``enc`` is the whole input's (else a part's: its length a lower bound)."""
        ids = enc.ids  # a new list on every access
        n = len(ids)
        if n > self.max_length:
            raise InputTooLongError(
                f"input {index} has {n if whole else f'at least {n}'} tokens, more than the "
                f"maximum of {self.max_length}; set truncate to true or shorten it",
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

        The result is exactly ``encode_batch([(query, text) for text in texts])``'s wherever
        the query or the text holds at most ``QUERY_MAX_LENGTHS`` x ``max_length`` tokens. Past
        that, a side counts as one token longer than that: where both sides are longer, they
        count as equally long, so with an odd budget the text keeps the extra token (the
        library compares their whole lengths). Telling which of two such sides is longer means
        reading both to their ends, for one token of a pair.

        The query is tokenized once, not once per text, and only from its ``_part``: joined
        per pair, a long query made the work grow with len(query) x len(texts), and so did
        its cut tokens, kept as the encoding's overflow and copied into every pair.
        ``post_process`` applies the truncation and the pair template as ``encode`` does, to
        each side encoded without special tokens. A long text is encoded from its ``_part``
        (``_answers``).
        """
        tok = self._truncating[direction] if truncate else self._plain
        side = direction if truncate else TruncationDirection.RIGHT
        counted = QUERY_MAX_LENGTHS * self.max_length
        try:
            # Whole sides (the truncating tokenizer would cut each alone): pairing cuts them.
            question, asked = self._question(query, side, counted)
            if not truncate and len(question) > self.max_length:
                # Every pair is too long: refuse with the first one's error, before the rest.
                texts = texts[:1]
            n_query = min(len(question), counted + 1)
            answers, whole = self._answers(texts, n_query, truncate, direction)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError("query and texts must be valid unicode text") from exc
        if not truncate or n_query <= self.max_length:
            pairs = [tok.post_process(question, a) for a in answers]
            return [
                self._one(p, i, w and asked)
                for i, (p, w) in enumerate(zip(pairs, whole, strict=True))
            ]
        # A query longer than max_length keeps at most max_length tokens in any pair, so each
        # pair copies a cut one. Longest-first truncation also looks at which side is longer
        # (with an odd budget the longer side keeps the extra token), so the cut query is one
        # token past max_length and a long text is cut to stay longer, equal or shorter alike.
        _keep(question, self.max_length + 1, direction)
        out: list[Encoded] = []
        for answer in answers:
            n_text = min(len(answer), counted + 1)
            cap = self.max_length + 1 + (n_text > n_query) - (n_text < n_query)
            _keep(answer, cap, direction)
            out.append(self._one(tok.post_process(question, answer), len(out)))
        return out

    def _question(
        self, query: str, direction: TruncationDirection, counted: int
    ) -> tuple[Encoding, bool]:
        """The query's side of its pairs, without special tokens, from a ``_part`` that holds
        more than ``counted`` tokens where the query is longer; and whether it is the whole
        query's. Its ``len`` is the query's where it holds no more (``encode_pairs``)."""
        part = self._part(query, direction, counted)
        encodings = _encode_raw(self._plain, [part], False)
        ((question, whole),) = self._settled(
            self._plain, [query], [part], encodings, direction, False, counted
        )
        return question, whole

    def _answers(
        self, texts: list[str], n_query: int, truncate: bool, direction: TruncationDirection
    ) -> tuple[list[Encoding], list[bool]]:
        """The texts' sides of their pairs, without special tokens, each from a ``_part`` where
        that settles the pair as the whole text would, and whether each is the whole text's.

        Pairing looks at a text's length only up to what truncation keeps of it and through
        which side is longer, so a part of more than max(``max_length``, ``n_query``: the
        query's length as ``encode_pairs`` counts it) tokens stands in for the whole text (its
        first tokens, or its last when truncating left, are the whole text's). With truncation
        off a part of more than ``max_length`` tokens proves the pair too long. A part of fewer
        proves nothing: a longer one is tried (``_settled``)."""
        need = max(self.max_length, n_query) if truncate else self.max_length
        side = direction if truncate else TruncationDirection.RIGHT
        parts = self._parts(texts, side, need)
        answers = _encode_raw(self._plain, parts, False)  # the pair template adds them
        settled = self._settled(self._plain, texts, parts, answers, side, False, need)
        answers = [enc for enc, _ in settled]
        whole = [w for _, w in settled]
        return answers, whole

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

    def tokens(
        self,
        texts: list[str],
        *,
        add_special_tokens: bool = True,
        max_tokens: int | None = None,
    ) -> list[list[Token]]:
        """Token detail for the TEI ``/tokenize`` route. The answer has every token, so an input
        over ``max_chars`` is refused before any is tokenized (as TEI does), and the inputs are
        tokenized ``TOKENIZE_GROUP_CHARS`` at a time: an answer over ``max_tokens`` is refused
        (``PayloadTooLargeError``) once a group passes it, not once all of it is made."""
        limit = self.max_chars
        for index, text in enumerate(texts):
            if len(text) > limit:
                raise InputTooLongError(
                    f"input {index} has {len(text)} characters, more than the maximum of "
                    f"{limit} (max_input_length x {TOKENIZE_CHARS_PER_TOKEN}) /tokenize takes",
                    param="inputs",
                )
            if not _valid(text):  # here, where its index is the request's
                raise _lone_surrogate(index)
        encodings: list[Encoding] = []
        made = 0
        for group in _groups(texts, TOKENIZE_GROUP_CHARS):
            done = _encode_batch(self._plain, group, add_special_tokens)
            made += sum(len(enc) for enc in done)
            encodings += done
            if max_tokens is not None and made > max_tokens:
                # The route's message (api/bounds.py), counted so far: at least this many.
                raise PayloadTooLargeError(
                    f"{made} token ids in one request > the limit of {max_tokens} "
                    "(max_request_tokens)",
                    param="inputs",
                )
        # Rows only for an answer that is given: they are the Python work (the GIL's).
        return [self._row(text, enc) for text, enc in zip(texts, encodings, strict=True)]

    def _row(self, text: str, enc: Encoding) -> list[Token]:
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
        return row


def _keep(encoding: Encoding, n: int, direction: TruncationDirection) -> None:
    """Truncate ``encoding`` in place to ``n`` tokens, its overflow at most one token.

    ``truncate`` keeps the tokens it cuts as ``overflowing`` chunks, and ``post_process`` copies
    and processes those for each pair it is given: a query cut once per request, from tens of
    thousands of tokens, cost that for every text. A second cut, of one token, leaves only the
    second's overflow (each cut makes a new one from the tokens it holds)."""
    if len(encoding) > n + 1:
        encoding.truncate(n + 1, 0, direction.value)
    if len(encoding) > n:
        encoding.truncate(n, 0, direction.value)


def _groups(texts: list[str], chars: int) -> Iterator[list[str]]:
    """``texts`` in order, in runs of at most ``chars`` characters (or one longer text)."""
    group: list[str] = []
    size = 0
    for text in texts:
        if group and size + len(text) > chars:
            yield group
            group, size = [], 0
        group.append(text)
        size += len(text)
    if group:
        yield group


def _encode_raw(tok: Tokenizer, texts: list[str], add_special_tokens: bool) -> list[Encoding]:
    """``encode_batch``, but one short text with ``encode``: ``encode_batch`` hands even one
    text to its thread pool (a wake-up per request at c=1). A long one still goes through
    ``encode_batch``, which lets go of the GIL while it works (``encode`` holds it: the event
    loop stood still for the whole of a 2 MB text, docs/security.md)."""
    if len(texts) == 1 and len(texts[0]) <= GIL_FREE_CHARS:
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
