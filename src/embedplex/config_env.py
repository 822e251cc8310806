"""Which ``EMBEDPLEX_*`` environment variables exist: a misspelt one is refused, not ignored.

pydantic-settings reads ``EMBEDPLEX_<FIELD>`` (in any case) and skips every other name with the
prefix, so ``EMBEDPLEX_APIKEY`` would leave a server without its key and ``EMBEDPLEX_STATE_URI``
would give each replica its own SQLite file. ``Settings.load`` (every command that reads the
settings) calls ``check_env_names`` first. The error names the variables and the closest known
name, never a value: a value may be a secret.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping

ENV_PREFIX = "EMBEDPLEX_"

# Read by name elsewhere, not settings fields (grep the name to find its reader).
OTHER_ENV_NAMES = frozenset(
    {
        "EMBEDPLEX_CONFIG",  # the TOML file (Settings.load)
        "EMBEDPLEX_SERVER",  # embedplex providers --server
        "EMBEDPLEX_BENCH_API_KEY",  # embedplex bench --api-key
        "EMBEDPLEX_TEST_PG",  # the test suite's PostgreSQL (tests/state_fixtures.py)
    }
)

# What Kubernetes injects for a Service named embedplex (EMBEDPLEX_SERVICE_HOST,
# EMBEDPLEX_PORT_8080_TCP, ...) unless the pod spec says enableServiceLinks: false.
_SERVICE_LINK = re.compile(r"_SERVICE_(HOST|PORT)|_PORT_\d+_(TCP|UDP|SCTP)")


class UnknownEnvNames(ValueError):
    """``EMBEDPLEX_*`` variables that name no setting; ``names`` as they were spelt."""

    def __init__(self, names: list[str], known: frozenset[str]) -> None:
        self.names = names
        parts = [f"{name}{_suggestion(name, known)}" for name in names]
        plural = "s" if len(names) > 1 else ""
        message = (
            f"unknown environment variable{plural} {', '.join(parts)}: an {ENV_PREFIX}* "
            "variable must be one embedplex reads (docs/configuration.md)"
        )
        if any(_SERVICE_LINK.search(name.upper()) for name in names):
            message += (
                "; these look like Kubernetes service links: set enableServiceLinks: false "
                "in the pod spec"
            )
        super().__init__(message)


def _suggestion(name: str, known: frozenset[str]) -> str:
    upper = name.upper()
    if _SERVICE_LINK.search(upper):  # not a typo: the hint after the list says what it is
        return ""
    base = upper.split("__", 1)[0]
    if "__" in upper and base in known:  # nested keys: lists of tables take JSON instead
        return f" (did you mean {base}, as JSON?)"
    close = difflib.get_close_matches(upper, sorted(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def known_env_names(fields: Iterable[str]) -> frozenset[str]:
    """Every ``EMBEDPLEX_*`` name embedplex reads, upper case: one per field, and the others."""
    return frozenset(ENV_PREFIX + field.upper() for field in fields) | OTHER_ENV_NAMES


def check_env_names(environ: Mapping[str, str], fields: Iterable[str]) -> None:
    """Raise ``UnknownEnvNames`` for any ``EMBEDPLEX_*`` name (any case) that nothing reads."""
    known = known_env_names(fields)
    unknown = sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known
    )
    if unknown:
        raise UnknownEnvNames(unknown, known)
