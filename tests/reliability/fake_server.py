"""``embedplex serve`` with the fake backend: run as a script by the reliability tests.

The real serving path (``embedplex.serve.server.serve``: uvicorn, the HTTP protocol, the
SIGTERM drain, the pipeline) with a ``FakeBackend`` in place of a model, so that overload and
signal scenarios cost the test box no inference. The one argument is a JSON object:
``{"model_dir": ..., "settings": {...Settings fields}, "backend": {...FakeBackend kwargs}}``.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedplex.api.app import create_app
from embedplex.backends.fake import FakeBackend
from embedplex.config import Settings
from embedplex.gateway import Gateway
from embedplex.observability.logs import setup_logging
from embedplex.providers.router import Router
from embedplex.serve import server
from helpers import fake_model


def main(spec: dict[str, object]) -> None:
    model_dir = Path(str(spec["model_dir"]))
    backend = FakeBackend(**spec.get("backend", {}))  # type: ignore[arg-type]
    settings = Settings(model_id=str(model_dir), **spec.get("settings", {}))  # type: ignore[arg-type]

    def factory(s: Settings) -> Gateway:
        # A router with no providers, as build_gateway makes: the admin API has one to change.
        return Gateway([fake_model(model_dir, s, backend)], router=Router(s.providers))

    # As `embedplex serve` does: the access log says which requests the server answered.
    setup_logging(settings.log_level, settings.log_format)
    if "gateway_factory" in inspect.signature(server.serve).parameters:
        server.serve(settings, gateway_factory=factory)  # type: ignore[call-arg]
        return
    # Before serve() took a factory it built its app with create_app(settings): patch that.
    # (Once every branch has serve(gateway_factory=...), this fallback can go.)
    server.create_app = functools.partial(create_app, gateway_factory=factory)  # type: ignore[assignment]
    server.serve(settings)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
