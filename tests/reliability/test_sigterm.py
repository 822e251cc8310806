"""SIGTERM under load: no accepted request is lost.

"Accepted": the server has read the request. From outside that is known for two kinds: a
request that got a status line, and one sent well before the signal (half a second: long
since read, queued or running). Every request the clients send while the server stops must
end one of these ways, and only these:

- 200 with its full body (every vector there): served;
- a JSON 503 (the drain refuses new work on a connection still open): a clean refusal;
- connection refused (the listener has closed): never accepted, safe to retry elsewhere;
- closed with no answer at all: it sat in the kernel's accept backlog when the listener
  closed, never read by the server, so never accepted either (the server's access log, which
  has a line for every request it answered, shows it never saw it). A pre-stop delay
  (branch failures) is what keeps load balancers from sending these.

Not allowed: an answer that begins and breaks off (a torn 200), any other status. Every
request sent well before the signal must be served (the drain finishes the queue), and the
process exits 0.
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


def _one(url: str, body: dict[str, object]) -> str:
    """Send one request on a new connection; how it ended (see the module docstring)."""
    try:
        with httpx.stream(
            "POST", url + "/embed", json=body, timeout=60, headers={"connection": "close"}
        ) as r:
            status, ctype = r.status_code, r.headers.get("content-type")
            try:
                r.read()
            except httpx.HTTPError:
                return f"torn {status}"  # the answer began and broke off: lost
    except httpx.ConnectError:
        return "refused"
    except (httpx.ReadError, httpx.RemoteProtocolError):
        return "unanswered"  # closed before any answer: see the module docstring
    if status == 200:
        vectors = r.json()
        whole = len(vectors) == INPUTS and all(len(v) == len(vectors[0]) for v in vectors)
        return "served" if whole else "torn 200"
    if status == 503 and ctype == "application/json":
        return "refused 503"
    return f"bad {status}"


def _client(url: str, i: int, stop: threading.Event, out: list[tuple[float, str]]) -> None:
    """Send requests one after another until told to stop."""
    body = {"inputs": [f"client {i} input {k}" for k in range(INPUTS)]}
    while not stop.is_set():
        sent = time.monotonic()
        kind = _one(url, body)
        out.append((sent, kind))
        if kind == "refused":
            time.sleep(0.01)


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
    assert set(kinds) <= {"served", "refused 503", "refused", "unanswered"}, kinds
    assert all(kind == "served" for kind in in_flight), kinds
    # Every request the server took, it answered to the end: its access log counts exactly
    # the answers the clients received whole, so no unanswered request was one it had read.
    answered = [line for line in log.splitlines() if "POST /embed " in line]
    assert len(answered) == kinds.get("served", 0) + kinds.get("refused 503", 0), kinds
    assert kinds.get("served", 0) > CLIENTS  # there was load
    assert code == 0, log[-2000:]


def test_a_request_still_running_when_the_grace_period_ends_gets_a_json_503(
    tiny_model_dir: Path,
) -> None:
    """The drain cannot wait forever: past the grace period the caller hears a documented
    JSON 503, not a dropped connection or a plain-text 500."""
    with fake_server(tiny_model_dir, backend={"delay": 6.0}, graceful_shutdown_s=1) as srv:
        result: list[httpx.Response | Exception] = []

        def call() -> None:
            try:
                result.append(httpx.post(srv.url + "/embed", json={"inputs": "x"}, timeout=30))
            except httpx.HTTPError as exc:
                result.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(1.0)  # the request is in the backend now (6 s per batch)
        srv.proc.send_signal(signal.SIGTERM)
        caller.join(30)
    [answer] = result
    assert isinstance(answer, httpx.Response), answer
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/json"
