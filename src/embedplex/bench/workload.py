"""Synthetic inputs of a chosen token length, and request bodies pre-encoded once.

Texts are built from common English words that WordPiece (BERT-style) vocabularies hold as one
token each, so ``n`` tokens is ``n - 2`` words plus ``[CLS]`` and ``[SEP]``. Other tokenizers
land close to the target; the length is approximate by design.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

_WORD_TEXT = (
    "the of and to in is was for on as with by he at from his an were are which this also be "
    "has or had first one their its new after but who not they have her she two been other when "
    "there all during into school time may years more most only over city some world would where "
    "later up such used many can state about national out known university united then made "
    "between team three year since under season film series part both game early music "
    "called being well area became family second government several each while people district "
    "began work war including same north south house four great group number club life league "
    "could before album through public however until old american history county party"
)
WORDS = tuple(_WORD_TEXT.split())

_SPECIAL_TOKENS = 2  # [CLS] and [SEP]


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """Input length in tokens: a fixed number (``"14"``) or a uniform range (``"5-256"``)."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> TokenSpec:
        lo, sep, hi = text.partition("-")
        try:
            low = int(lo)
            high = int(hi) if sep else low
        except ValueError as exc:
            raise ValueError(f"tokens must be N or LOW-HIGH, got {text!r}") from exc
        if not 1 <= low <= high:
            raise ValueError(f"tokens must satisfy 1 <= LOW <= HIGH, got {text!r}")
        return cls(low, high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)


def make_text(tokens: int, rng: random.Random) -> str:
    """A text of about ``tokens`` tokens (special tokens included), words drawn from ``rng``."""
    words = max(1, tokens - _SPECIAL_TOKENS)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def make_texts(spec: TokenSpec, count: int, *, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [make_text(spec.draw(rng), rng) for _ in range(count)]


def request_path(url: str, dialect: str) -> str:
    """The path a dialect posts to, unless ``url`` names one itself."""
    path = urlsplit(url).path
    if path and path != "/":
        return path
    return "/v1/embeddings" if dialect == "openai" else "/embed"


def json_body(texts: list[str], *, dialect: str, model: str | None) -> bytes:
    """One request body: a bare string for a single text, a list otherwise."""
    payload: str | list[str] = texts[0] if len(texts) == 1 else texts
    if dialect == "openai":
        body: dict[str, object] = {"input": payload}
        if model is not None:
            body["model"] = model
    else:
        body = {"inputs": payload}
        if model is not None:
            body["model"] = model
    return orjson.dumps(body)


def raw_request(url: str, path: str, body: bytes, *, api_key: str | None = None) -> bytes:
    """The full HTTP/1.1 request bytes (keep-alive), ready to write to a socket as they are."""
    parts = urlsplit(url)
    host = parts.netloc or "127.0.0.1"
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        "Accept: application/json",
        f"Content-Length: {len(body)}",
    ]
    if api_key:
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def build_requests(
    url: str,
    *,
    dialect: str,
    tokens: TokenSpec,
    inputs_per_request: int,
    model: str | None,
    count: int,
    api_key: str | None = None,
    seed: int = 0,
) -> list[bytes]:
    """``count`` distinct pre-encoded requests; the load workers cycle through them."""
    path = request_path(url, dialect)
    texts = make_texts(tokens, count * inputs_per_request, seed=seed)
    out = []
    for i in range(count):
        chunk = texts[i * inputs_per_request : (i + 1) * inputs_per_request]
        out.append(
            raw_request(url, path, json_body(chunk, dialect=dialect, model=model), api_key=api_key)
        )
    return out
