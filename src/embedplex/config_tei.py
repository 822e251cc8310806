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

A name is left alone when its ``EMBEDPLEX_`` counterpart is set (even to the default) or its
flag is given: the operator has said what embedplex should do. ``ignore_tei_env`` names the
variables that belong to another program (a generic ``API_KEY`` in a shared environment).
``HOSTNAME`` and ``PORT`` are never read: Docker and most platforms set them themselves.
``HF_TOKEN`` and ``HUGGINGFACE_HUB_CACHE`` need nothing: huggingface_hub reads them. Messages
name variables, never their values (``API_KEY``'s is a secret).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from embedplex.config_env import ENV_PREFIX


@dataclass(frozen=True, slots=True)
class TeiName:
    """What one of TEI's variables becomes here: ``setting`` (a Settings field, or None when
    there is no counterpart), whether a server that ignores it is refused, and how to say
    what to set instead (``use``: appended to the ``EMBEDPLEX_`` name, or the whole advice
    when there is no counterpart)."""

    setting: str | None
    refuse: bool = False
    use: str = ""

    def advice(self) -> str:
        if self.setting is None:
            return self.use
        return f"set {ENV_PREFIX}{self.setting.upper()}{self.use}"


TEI_ENV: dict[str, TeiName] = {
    "API_KEY": TeiName("api_key", refuse=True),
    "MODEL_ID": TeiName("model_id", refuse=True),
    "POOLING": TeiName("pooling", refuse=True),
    "DEFAULT_PROMPT": TeiName("default_prompt", refuse=True),
    "DEFAULT_PROMPT_NAME": TeiName("default_prompt_name", refuse=True),
    "REVISION": TeiName("revision"),
    "DTYPE": TeiName("dtype"),
    "SERVED_MODEL_NAME": TeiName("served_model_name"),
    "TOKENIZATION_WORKERS": TeiName("tokenization_workers"),
    "MAX_CONCURRENT_REQUESTS": TeiName("max_concurrent_requests"),
    "MAX_BATCH_TOKENS": TeiName("max_batch_tokens"),
    "MAX_BATCH_REQUESTS": TeiName("max_batch_requests"),
    "MAX_CLIENT_BATCH_SIZE": TeiName("max_client_batch_size"),
    "AUTO_TRUNCATE": TeiName("auto_truncate"),
    "PAYLOAD_LIMIT": TeiName("payload_limit"),
    "JSON_OUTPUT": TeiName("log_format", use="=json"),
    "DISABLE_SPANS": TeiName("disable_spans"),
    "OTLP_ENDPOINT": TeiName("otlp_endpoint"),
    "OTLP_SERVICE_NAME": TeiName("otlp_service_name"),
    "PROMETHEUS_PORT": TeiName("metrics_port"),
    "CORS_ALLOW_ORIGIN": TeiName("cors_allow_origins"),
    "HF_API_TOKEN": TeiName(None, use="set HF_TOKEN (huggingface_hub reads it)"),
    "DENSE_PATH": TeiName(
        None, use="embedplex serves no Dense module (a model with one is refused at start)"
    ),
}


@dataclass(frozen=True, slots=True)
class TeiEnvFindings:
    """The TEI variables of one environment that embedplex does not read: ``refused`` (the
    one line ``serve`` exits with, or None) and ``warnings`` (a log line each)."""

    refused: str | None
    warnings: list[str]


def tei_env_findings(
    environ: Mapping[str, str], *, flags: Collection[str], ignored: Collection[str]
) -> TeiEnvFindings:
    """What ``environ`` holds of TEI's variables that nothing here would read.

    ``flags``: the settings given on the command line; ``ignored``: ``ignore_tei_env``. An
    empty value counts as unset (compose files often carry ``API_KEY=`` placeholders).
    """
    ours = {name.upper() for name in environ if name.upper().startswith(ENV_PREFIX)}
    refused: list[tuple[str, TeiName]] = []
    warnings: list[str] = []
    for name, tei in TEI_ENV.items():
        if not environ.get(name, "").strip() or name in ignored:
            continue
        if tei.setting is not None and (
            tei.setting in flags or ENV_PREFIX + tei.setting.upper() in ours
        ):
            continue
        if tei.refuse:
            refused.append((name, tei))
        else:
            warnings.append(
                f"{name} is TEI's variable, which embedplex does not read: {tei.advice()} "
                f"(or list it in {ENV_PREFIX}IGNORE_TEI_ENV)"
            )
    return TeiEnvFindings(_refusal(refused), warnings)


def _refusal(refused: list[tuple[str, TeiName]]) -> str | None:
    if not refused:
        return None
    names = ", ".join(name for name, _ in refused)
    advice = "; ".join(f"for {name}, {tei.advice()}" for name, tei in refused)
    several = len(refused) > 1
    verb = "are TEI's variables" if several else "is TEI's variable"
    return (
        f"{names} {verb}, which embedplex does not read, and the server would not be what "
        f"{'they ask' if several else 'it asks'} for: {advice} (docs/configuration.md, Coming "
        f"from TEI); to start anyway, list {'them' if several else 'it'} in "
        f"{ENV_PREFIX}IGNORE_TEI_ENV"
    )
