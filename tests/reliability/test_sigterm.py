"""SIGTERM under load: no accepted request is lost.

"Accepted" here: the server sent the response's status line. Every request the clients send
while the server is stopping must end one of three ways, and only these:

- 200 with its full body (every vector there): served;
- a JSON 503 (the drain refuses new work on a connection still open): a clean refusal;
- connection refused (the listener has closed): never accepted, safe to retry elsewhere.

Not allowed: a 200 with a torn body, a reset or an empty answer on a request the server had
taken, a 5xx other than the 503. And every request already in flight when the signal came (sent
well before it) must be served: the drain finishes the queue. The process exits 0.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
from procs import FULL, fake_server, record

CLIENTS = 16 if FULL else 8
BEFORE_S = 4.0 if FULL else 1.5  # load before the signal
INPUTS = 4


def _client(url: str, i: int, stop: threading.Event, out: list[tuple[float, str]]) -> None:
    """Send requests one after another (a new connection each) until told to stop."""
    body = {"inputs": [f"client {i} input {k}" for k in range(INPUTS)]}
    while not stop.is_set():
        sent = time.monotonic()
        try:
            r = httpx.post(url + "/embed", json=body, timeout=60, headers={"connection": "close"})
        except httpx.ConnectError:
            out.append((sent, "refused"))
            time.sleep(0.01)
            continue
        except httpx.HTTPError as exc:
            out.append((sent, f"broken: {type(exc).__name__}"))
            continue
        if r.status_code == 200:
            vectors = r.json()
            whole = len(vectors) == INPUTS and all(len(v) == len(vectors[0]) for v in vectors)
            out.append((sent, "served" if whole else "torn"))
        elif r.status_code == 503 and r.headers.get("content-type") == "application/json":
            out.append((sent, "refused 503"))
        else:
            out.append((sent, f"bad {r.status_code}"))


def test_sigterm_under_load_loses_no_accepted_request(tiny_model_dir: Path) -> None:
    with fake_server(
        tiny_model_dir, backend={"delay": 0.05}, max_batch_requests=8, graceful_shutdown_s=20
    ) as srv:
        stop = threading.Event()
        outcomes: list[list[tuple[float, str]]] = [[] for _ in range(CLIENTS)]
        threads = [
            threading.Thread(target=_client, args=(srv.url, i, stop, outcomes[i]))
            for i in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        time.sleep(BEFORE_S)
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(60)
        log = srv.output()
        exited = time.monotonic()
        time.sleep(0.3)  # a few attempts against the closed listener
        stop.set()
        for t in threads:
            t.join(60)
    every = [o for per_client in outcomes for o in per_client]
    kinds: dict[str, int] = {}
    for _, kind in every:
        kinds[kind] = kinds.get(kind, 0) + 1
    # Sent half a second before the signal: read by the server long since, so in its queue.
    in_flight = [kind for sent, kind in every if sent < signalled - 0.5]
    record(
        "sigterm",
        clients=CLIENTS,
        outcomes=kinds,
        drain_s=round(exited - signalled, 2),
        exit_code=code,
    )
    assert set(kinds) <= {"served", "refused 503", "refused"}, kinds
    assert all(kind == "served" for kind in in_flight), kinds
    assert kinds.get("served", 0) > CLIENTS  # there was load
    assert code == 0, log[-2000:]
