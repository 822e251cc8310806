"""TEI's own environment variables at ``serve``'s start: refused or warned about, never skipped.

TEI reads every flag from a variable of the same name (``API_KEY``, ``MODEL_ID``, ...: its
``cli_arguments.md``), and a deployment moved from TEI keeps them. embedplex reads only
``EMBEDPLEX_*``, so ``API_KEY=... MODEL_ID=... embedplex serve`` served the default model with
no authentication, and said nothing. ``serve`` now checks them first (``tei_env_findings``):

- **refused** (exit 2, one line): the names whose loss changes what the server is, in a way
  nothing in its answers shows. ``API_KEY``: the operator expects authentication and the
  server would be open. ``MODEL_ID``, ``POOLING``, ``DEFAULT_PROMPT``,
  ``DEFAULT_PROMPT_NAME``: every vector would come from another model, pooling or prompt
  than the index was built with, and retrieval would go quietly wrong.
- **warned** (one log line each): the rest. A lost limit, log format, CORS origin or OTLP
  endpoint shows itself (a 4xx, a missing trace), and ``REVISION`` or ``DTYPE`` change the
  vectors of the same model little or not at all.

A name is left alone when the settings say what it would (``TeiName.said``): its setting is
given by a flag, its ``EMBEDPLEX_`` variable (even set to the default) or the config file;
for ``API_KEY`` also ``api_keys``, ``require_api_key`` or ``state_url`` (managed keys); with
``[[models]]`` tables, a model's key (``MODEL_ID``: ``model_id``) that every table sets.
``ignore_tei_env`` names the variables that belong to another program (a generic ``API_KEY``
in a shared environment). ``HOSTNAME`` and ``PORT`` are never read: Docker and most platforms
set them, and a ``*_PORT`` value such as ``tcp://10.0.0.7:9090`` is a Kubernetes service link
(a service named ``prometheus`` gives every pod ``PROMETHEUS_PORT``), not TEI's.
``HF_TOKEN`` and ``HUGGINGFACE_HUB_CACHE`` need nothing: huggingface_hub reads them. Messages
name variables, never their values (``API_KEY``'s is a secret).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from embedplex.config_env import ENV_PREFIX

if TYPE_CHECKING:
    from embedplex.config import Settings


@dataclass(frozen=True, slots=True)
class TeiName:
    """What one of TEI's variables becomes here: ``setting`` (a Settings field, or None when
    there is no counterpart), whether a server that ignores it is refused, and how to say
    what to set instead (``use``: appended to the ``EMBEDPLEX_`` name, or the whole advice
    when there is no counterpart; a function of the variable's value where that decides).
    ``also``: other settings that say what it would (one of two prompts is one choice).
    ``table``: its key in a ``[[models]]`` table; ``flat``: a key of the one model served
    without tables, refused beside them."""

    setting: str | None
    refuse: bool = False
    use: str | Callable[[str], str] = ""
    also: tuple[str, ...] = ()
    table: str | None = None
    flat: bool = False

    def said(self, given: Collection[str], tables: Sequence[Collection[str]] | None) -> bool:
        """Whether the settings say what this variable would: ``given``, the settings set by
        a flag, a variable or the file; ``tables``, each ``[[models]]`` table's keys."""
        if self.setting is None:
            return False
        if {self.setting, *self.also} & set(given):
            return True
        if tables is None or self.table is None:
            return False
        keys = {self.table, *self.also}
        return all(keys & set(table) for table in tables)

    def advice(self, value: str, *, tables: bool = False) -> str:
        use = self.use(value) if callable(self.use) else self.use
        if self.setting is None:
            return use
        variable = f"{ENV_PREFIX}{self.setting.upper()}{use}"
        if tables and self.table is not None:
            each = f"set {self.table} in each [[models]] table"
            return each if self.flat else f"{each}, or {variable} for them all"
        return f"set {variable}"


def _log_format(value: str) -> str:
    """TEI's ``--json-output`` is a flag: false asks for what embedplex does by default."""
    return "=pretty" if value.strip().lower() in ("false", "0", "no", "off") else "=json"


TEI_ENV: dict[str, TeiName] = {
    "API_KEY": TeiName("api_key", refuse=True, also=("api_keys", "require_api_key", "state_url")),
    "MODEL_ID": TeiName("model_id", refuse=True, table="model_id", flat=True),
    "POOLING": TeiName("pooling", refuse=True, table="pooling"),
    "DEFAULT_PROMPT": TeiName(
        "default_prompt", refuse=True, also=("default_prompt_name",), table="default_prompt"
    ),
    "DEFAULT_PROMPT_NAME": TeiName(
        "default_prompt_name", refuse=True, also=("default_prompt",), table="default_prompt_name"
    ),
    "REVISION": TeiName("revision", table="revision", flat=True),
    "DTYPE": TeiName("dtype", table="dtype"),
    "SERVED_MODEL_NAME": TeiName("served_model_name", table="name", flat=True),
    "TOKENIZATION_WORKERS": TeiName("tokenization_workers"),
    "MAX_CONCURRENT_REQUESTS": TeiName("max_concurrent_requests", table="max_concurrent_requests"),
    "MAX_BATCH_TOKENS": TeiName("max_batch_tokens", table="max_batch_tokens"),
    "MAX_BATCH_REQUESTS": TeiName("max_batch_requests", table="max_batch_requests"),
    "MAX_CLIENT_BATCH_SIZE": TeiName("max_client_batch_size", table="max_client_batch_size"),
    "AUTO_TRUNCATE": TeiName("auto_truncate", table="auto_truncate"),
    "PAYLOAD_LIMIT": TeiName("payload_limit"),
    "JSON_OUTPUT": TeiName("log_format", use=_log_format),
    "DISABLE_SPANS": TeiName("disable_spans"),
    "OTLP_ENDPOINT": TeiName("otlp_endpoint"),
    "OTLP_SERVICE_NAME": TeiName("otlp_service_name"),
    # TEI's HTTP server never listens on it (only its gRPC build does): /metrics is on the
    # main port there as here, and ours moves it, so it is not the same setting.
    "PROMETHEUS_PORT": TeiName(
        "metrics_port",
        use=" only to move /metrics off the main port (TEI's HTTP server never opens this "
        "port: its /metrics is on the main port, as embedplex's is)",
    ),
    "CORS_ALLOW_ORIGIN": TeiName("cors_allow_origins"),
    "HF_API_TOKEN": TeiName(None, use="set HF_TOKEN (huggingface_hub reads it)"),
    "DENSE_PATH": TeiName(
        None, use="embedplex serves no Dense module (a model with one is refused at start)"
    ),
}

# A Kubernetes service link: every service gives each pod ``{NAME}_PORT=tcp://IP:PORT``.
_SERVICE_LINK = re.compile(r"(?:tcp|udp|sctp)://", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class TeiEnvFindings:
    """The TEI variables of one environment that embedplex does not read: ``refused`` (the
    one line ``serve`` exits with, or None) and ``warnings`` (a log line each)."""

    refused: str | None
    warnings: list[str]


def tei_env_findings(environ: Mapping[str, str], settings: Settings) -> TeiEnvFindings:
    """What ``environ`` holds of TEI's variables that ``settings`` (as ``serve`` loaded them:
    flags, ``EMBEDPLEX_*`` and the config file) do not say otherwise. An empty value counts as
    unset (compose files often carry ``API_KEY=`` placeholders)."""
    given = settings.model_fields_set
    tables = [m.model_fields_set for m in settings.models] if settings.models else None
    refused: list[tuple[str, str]] = []  # (name, advice)
    warnings: list[str] = []
    for name, tei in TEI_ENV.items():
        value = environ.get(name, "").strip()
        if not value or name in settings.ignore_tei_env or tei.said(given, tables):
            continue
        if name.endswith("_PORT") and _SERVICE_LINK.match(value):
            continue
        advice = tei.advice(value, tables=tables is not None)
        if tei.refuse:
            refused.append((name, advice))
        else:
            warnings.append(
                f"{name} is TEI's variable, which embedplex does not read: {advice} "
                f"(or list it in {ENV_PREFIX}IGNORE_TEI_ENV)"
            )
    return TeiEnvFindings(_refusal(refused), warnings)


def _refusal(refused: list[tuple[str, str]]) -> str | None:
    if not refused:
        return None
    names = ", ".join(name for name, _ in refused)
    advice = "; ".join(f"for {name}, {advice}" for name, advice in refused)
    several = len(refused) > 1
    verb = "are TEI's variables" if several else "is TEI's variable"
    return (
        f"{names} {verb}, which embedplex does not read, and the server would not be what "
        f"{'they ask' if several else 'it asks'} for: {advice} "
        f"(docs/configuration.md, Coming from TEI); to start anyway, list "
        f"{'them' if several else 'it'} in {ENV_PREFIX}IGNORE_TEI_ENV"
    )
