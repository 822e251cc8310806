"""Deploying a model on Ray Serve (``deploy_model``, which ``RayModel.deploy`` runs): connect,
deploy its application or attach to a running one, and hand ``RayModel`` its blocking hooks
into Serve (read the replicas' states, delete, deploy again).

A wrong setting must fail the start in one line, never leave the gateway "loading":

- an address that accepts no TCP connection: ``ray.init`` retried for ~14 minutes (and a
  name that does not resolve as long); a connection is tried first, for a few seconds.
- replicas the cluster cannot place (more CPUs than a node has, a GPU where there is none):
  a blocking ``serve.run`` waited forever, logging nothing, while Serve's status said why. The
  application is deployed without blocking and its status polled until ``ray_start_timeout_s``,
  its deployment's message logged every ``PROGRESS_LOG_S`` and named in the failure.
- a failed deploy: Serve's exception says only "Failed to update the deployments"; the reason
  is the deployment's message, added to the error.

And a gateway attaching to a running application compares the Serve options its own table
decides (replicas or autoscaling, CPUs, GPUs, Serve's concurrency cap) with what Serve reports
the application runs with, and names the ones that differ.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedplex.core.errors import FatalBackendError
from embedplex.core.types import ModelInfo
from embedplex.models.config import RAY_MISSING, ModelConfig
from embedplex.ray.wire import DEPLOYMENT, SINCE, WIRE_VERSION, app_name

if TYPE_CHECKING:
    from embedplex.config import Settings

logger = logging.getLogger(__name__)

CONNECT_CHECK_S = 3.0  # a cluster address must accept a TCP connection within this
DEPLOY_POLL_S = 1.0  # how often Serve's status is read while an application starts
PROGRESS_LOG_S = 30.0  # how often a start that is taking long says what Serve says
MESSAGE_CHARS = 300  # the most of Serve's message that an error or a log line carries
INFO_TIMEOUT_S = 120.0  # the first call to a new deployment (its batcher starts)
START_TIMEOUT_S = 300.0  # ray_start_timeout_s's default

# One Ray connection per process: the address the first ray model connected to.
_connected: list[str] = []
_connect_lock = threading.Lock()

Sleep = Callable[[float], None]
Clock = Callable[[], float]


def check_reachable(address: str, timeout: float = CONNECT_CHECK_S) -> None:
    """A ``host:port`` (or ``ray://host:port``) address must accept a TCP connection, else
    FatalBackendError at once: ``ray.init`` would retry for minutes. ``RAY_ADDRESS``, when
    set, is what Ray connects to (it wins over the argument). ``auto`` and ``local`` are not
    addresses."""
    target = os.environ.get("RAY_ADDRESS") or address
    if target in ("auto", "local"):
        return
    hostport = target.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return  # not host:port: left to Ray
    host = host.strip("[]")  # [::1]:6379
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        if isinstance(exc, TimeoutError):
            why = f"no answer within {timeout:g}s"
        raise FatalBackendError(
            f"cannot connect to the Ray cluster at {target!r}: {why} (is Ray running there? "
            '`ray start --head`, or ray_address = "local" for a private Ray in this process)'
        ) from exc


def connect(ray: Any, address: str) -> None:
    """``ray.init`` once per process; a second model naming another cluster is refused. A
    process that is a Ray driver already (it called ``ray.init`` itself: an application that
    embeds the gateway, a test) uses the cluster it is connected to."""
    with _connect_lock:
        if _connected:
            if _connected[0] != address:
                raise FatalBackendError(
                    f"ray_address {address!r}: this gateway is already connected to "
                    f"{_connected[0]!r} (one Ray cluster per process)"
                )
            return
        if ray.is_initialized():
            logger.info("already connected to a Ray cluster: ray_address %r not used", address)
            _connected.append(address)
            return
        check_reachable(address)  # ray.init retried an address nobody answers for minutes
        try:
            if address == "local":
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except ConnectionError as exc:
            raise FatalBackendError(
                f"cannot connect to the Ray cluster at {address!r}: {exc} (ray_address = "
                '"local" starts a private Ray in this process)'
            ) from exc
        _connected.append(address)


def deploy_app(serve: Any, built: Any, name: str, model: str) -> None:
    """Deploy (or update) application ``name`` without waiting for its replicas: a blocking
    ``serve.run`` waited forever for replicas the cluster cannot place
    (``ray_deploy.wait_running`` bounds that wait and says why)."""
    try:
        serve._run(built, name=name, route_prefix=None, _blocking=False)
    except Exception as exc:  # refused outright (a bad option): Serve's own words
        raise FatalBackendError(
            f"model {model!r}: Ray Serve could not deploy {name}: {short(str(exc))}"
        ) from exc


def short(message: str) -> str:
    """Serve's message on one line, at most ``MESSAGE_CHARS``: of a traceback, its last line
    (the exception); otherwise its lines joined."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    text = lines[-1] if "Traceback (most recent call last)" in message else " ".join(lines)
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def app_message(app: Any) -> str:
    """What Serve says about an application (a ``serve.status()`` entry): its replica
    deployment's message (why replicas do not start), else the application's own."""
    deployment = getattr(app, "deployments", {}).get(DEPLOYMENT)
    message = getattr(deployment, "message", "") or getattr(app, "message", "") or ""
    return short(str(message))


def wait_running(
    read_app: Callable[[], Any],
    model: str,
    app_name: str,
    timeout_s: float,
    *,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
) -> None:
    """Poll ``read_app()`` (the application's ``serve.status()`` entry, None while it is not
    there yet) until it is RUNNING; FatalBackendError with Serve's reason when it failed, or
    when it is not running after ``timeout_s``."""
    started = clock()
    logged = started
    while True:
        app = read_app()
        status = str(_value(getattr(app, "status", ""))) if app is not None else "NOT_STARTED"
        if status == "RUNNING":
            return
        message = app_message(app) if app is not None else ""
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise FatalBackendError(
                f"model {model!r}: Ray Serve could not deploy {app_name}: "
                f"{message or status.lower()}"
            )
        now = clock()
        if now - started >= timeout_s:
            raise FatalBackendError(
                f"model {model!r}: {app_name} is not running after {timeout_s:g}s "
                f"(ray_start_timeout_s; Serve: {status}{': ' + message if message else ''})"
            )
        if now - logged >= PROGRESS_LOG_S:
            logged = now
            logger.warning(
                "%s: %s not running after %.0fs (%s)%s",
                model,
                app_name,
                now - started,
                status,
                f": {message}" if message else "",
            )
        sleep(DEPLOY_POLL_S)


# The Serve options a table decides (``ray/application.py: deployment_options``), as Serve
# reports a running deployment's config, and the table key each comes from.
COMPARED = {
    "num_replicas": "replicas",
    "autoscaling_config.min_replicas": "autoscaling.min_replicas",
    "autoscaling_config.max_replicas": "autoscaling.max_replicas",
    "autoscaling_config.target_ongoing_requests": "autoscaling.target_ongoing_requests",
    "max_ongoing_requests": "max_ongoing_requests (max_concurrent_requests, max_batch_requests)",
    "ray_actor_options.num_cpus": "num_cpus",
    "ray_actor_options.num_gpus": "num_gpus",
}


# Serve's own defaults, for a deployment that does not set them (``ray_actor_options``).
SERVE_DEFAULTS = {"ray_actor_options.num_cpus": 1, "ray_actor_options.num_gpus": 0}


def serve_options(options: dict[str, Any]) -> dict[str, Any]:
    """The compared options of a deployment's config (``deployment_options`` or what Serve
    reports), by table key; whole numbers as ints (Serve reports 1 CPU as 1.0)."""
    flat: dict[str, Any] = {}
    for path, key in COMPARED.items():
        value: Any = options
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            value = SERVE_DEFAULTS.get(path)
        flat[key] = int(value) if isinstance(value, float) and value.is_integer() else value
    return flat


def running_options(app_name: str) -> dict[str, Any] | None:
    """The compared options of a running application's replica deployment, None when they
    cannot be read. Blocking; Serve's controller client (what ``serve status`` reads)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        assert client is not None
        details = client.get_serve_details()
        deployment = details["applications"][app_name]["deployments"][DEPLOYMENT]
        return serve_options(deployment["deployment_config"])
    except Exception as exc:  # a Serve of another shape: nothing to compare
        logger.info("cannot read %s's deployment config: %r", app_name, exc)
        return None


def differences(running: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """``key: running X, this table Y`` for each key whose value differs (a key one side
    lacks counts as its default, None)."""
    return [
        f"{key}: running {running.get(key)!r}, this table {ours.get(key)!r}"
        for key in sorted(running.keys() | ours.keys())
        if running.get(key) != ours.get(key)
    ]


def warn_if_different(
    model: str, app_name: str, running: dict[str, Any] | None, ours: dict[str, Any]
) -> bool:
    """Log a WARNING naming the options in which the running application differs from this
    gateway's table (the gateway uses it as it is: it may be shared); True if it did."""
    if running is None:
        return False
    diff = differences(running, ours)
    if not diff:
        return False
    logger.warning(
        "%s: the running Ray Serve application %s was deployed with other options; using it "
        "as it is (%s). To deploy this table: `serve delete %s` once no gateway uses it, then "
        "restart this gateway",
        model,
        app_name,
        "; ".join(diff),
        app_name,
    )
    return True


@dataclass(frozen=True, slots=True)
class ServeState:
    """One read of an application's Serve status: its replicas by state; ``failed``, Serve's
    reason when the application failed or is unhealthy; ``live``, the ids of its live
    replicas (None: not known)."""

    replicas: dict[str, int]
    failed: str | None = None
    live: frozenset[str] | None = None


def live_replicas(ray: Any, name: str) -> frozenset[str] | None:
    """The ids of ``name``'s live replicas (blocking): Serve names each replica's actor
    ``SERVE_REPLICA::<app>#<deployment>#<id>`` (ids as ``replica.py`` reports them). None
    when they cannot be listed."""
    prefix = f"SERVE_REPLICA::{name}#{DEPLOYMENT}#"
    try:
        actors = ray.util.list_named_actors(all_namespaces=True)
    except Exception:
        return None
    return frozenset(a["name"][len(prefix) :] for a in actors if a["name"].startswith(prefix))


@dataclass(frozen=True)
class Deployed:
    """A model's application as ``deploy_model`` left it running, for its ``RayModel``:
    ``owned`` if this gateway deployed it; ``read_states``, ``delete`` and ``recover`` are
    ``RayModel``'s (blocking) hooks into Serve for it."""

    handle: Any  # a Serve DeploymentHandle
    info: ModelInfo
    owned: bool
    wire: int  # the replicas' wire version (``wire.py``)
    read_states: Callable[[], ServeState | None]
    delete: Callable[[], None]
    recover: Callable[[], tuple[Any, bool]]


def deploy_model(settings: Settings, config: ModelConfig) -> Deployed:
    """Connect to Ray, deploy the model's application (or attach to a running one) and
    wait until it answers (``RayModel.deploy``). Blocking: the gateway builds models in a
    thread."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise FatalBackendError(f"model {config.name!r}: {RAY_MISSING}") from exc
    from embedplex.ray.application import application, deployment_options

    connect(ray, config.ray_address or "auto")
    serve.start(proxy_location="Disabled")  # handles only: no HTTP proxy on the cluster
    name = app_name(config.name)
    start_timeout = config.ray_start_timeout_s or START_TIMEOUT_S
    running = serve.status().applications.get(name)
    owned = running is None or str(_value(running.status)) != "RUNNING"
    if owned:
        logger.info("%s: deploying Ray Serve application %s", config.name, name)
        deploy_app(serve, application(settings, config), name, config.name)
        try:
            wait_running(
                lambda: serve.status().applications.get(name), config.name, name, start_timeout
            )
        except FatalBackendError:
            # It never ran, so no gateway uses it: not left to place its replicas later.
            with contextlib.suppress(Exception):
                serve.delete(name, _blocking=False)
            raise
    else:
        logger.info("%s: using the running Ray Serve application %s", config.name, name)
        ours = serve_options(deployment_options(config))
        warn_if_different(config.name, name, running_options(name), ours)
    handle = serve.get_app_handle(name)
    info: ModelInfo = handle.info.remote().result(timeout_s=INFO_TIMEOUT_S)
    wire = _wire_version(handle)
    if wire < WIRE_VERSION:
        logger.warning(
            "%s: the replicas of %s run an older embedplex (wire version %d, this gateway's "
            "is %d): %s are refused until it is redeployed",
            config.name,
            name,
            wire,
            WIRE_VERSION,
            ", ".join(sorted(m for m, v in SINCE.items() if v > wire)),
        )

    def read_states() -> ServeState | None:
        app = serve.status().applications.get(name)
        if app is None:
            return None
        failed = None
        if str(_value(app.status)) in ("DEPLOY_FAILED", "UNHEALTHY"):
            failed = app_message(app) or str(_value(app.status))
        deployment = app.deployments.get(DEPLOYMENT)
        if deployment is None:
            return ServeState({}, failed)
        states = {str(_value(k)): int(v) for k, v in deployment.replica_states.items()}
        return ServeState(states, failed, live_replicas(ray, name))

    def delete() -> None:
        serve.delete(name)

    def recover() -> tuple[Any, bool]:
        # Checked again just before deploying: another gateway may have done it already.
        if serve.status().applications.get(name) is not None:
            logger.info("%s: %s was deployed again: using it", config.name, name)
            return serve.get_app_handle(name), False
        logger.warning("%s: the Ray Serve application %s is gone: deploying it", config.name, name)
        # Not waited for: the poller follows its replicas (readiness false until one runs).
        deploy_app(serve, application(settings, config), name, config.name)
        return serve.get_app_handle(name), True

    return Deployed(handle, info, owned, wire, read_states, delete, recover)


def _wire_version(handle: Any) -> int:
    """The replicas' wire version (blocking; ``deploy_model``): 1 when they have no
    ``wire_version``, which replicas of the first release lack."""
    try:
        return int(handle.wire_version.remote().result(timeout_s=INFO_TIMEOUT_S))
    except Exception as exc:
        logger.info("no wire_version from the replicas (%s): version 1", type(exc).__name__)
        return 1


def _value(state: object) -> object:
    """An enum's value (Serve's states are enums in some versions, strings in others)."""
    return getattr(state, "value", state)
