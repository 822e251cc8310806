"""The hub download child with any huggingface_hub that pyproject allows (>=0.24).

transformers 4 (our torch extra allows it) needs huggingface_hub<1.0, whose shared session is
a ``requests.Session`` (no ``event_hooks``) and which never imports httpx2; 1.x is httpx, 2.x
httpx2. The child read ``get_session().event_hooks`` and imported httpx2 unconditionally: every
hub load failed under 0.x ("'Session' object has no attribute 'event_hooks'") and 1.x
(ImportError). Here each shape is simulated on the installed one: a real ``requests.Session``
or ``httpx.Client`` stands in as the session, httpx2 is made unimportable, and the requests go
to real servers on 127.0.0.1. (By hand, each of 0.24, 0.36 and 1.1 installed with ``pip
install --target`` served a model and failed a silent hub in seconds.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

from embedplex.backends import hub
from helpers import served
from hub_mirror import mirror_app, silent_hub

REPO = "tiny-org/tiny-bert"
_PROBE = "/api/models/x/y/revision/z"


@pytest.fixture
def no_httpx2(monkeypatch: pytest.MonkeyPatch) -> None:
    """As where huggingface_hub is 0.x or 1.x: ``import httpx2`` fails."""
    monkeypatch.setitem(sys.modules, "httpx2", None)


@pytest.fixture
def download_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    return 1.0


def _session(monkeypatch: pytest.MonkeyPatch, session: object) -> None:
    monkeypatch.setattr("huggingface_hub.get_session", lambda: session)


def test_a_requests_session_as_huggingface_hub_0x_has_it(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, no_httpx2: None, download_timeout: float
) -> None:
    """0.x: one ``requests.Session`` per thread, response hooks only. The listing sent from
    this thread is noted, and one sent without a timeout gets the download timeout."""
    requests = pytest.importorskip("requests")
    session = requests.Session()
    _session(monkeypatch, session)
    listings = hub._bound_requests(REPO)
    with served(mirror_app(REPO, tiny_model_dir), health_path=_PROBE) as url:
        assert session.get(f"{url}/api/models/{REPO}/revision/main").status_code == 200
        assert session.get(f"{url}/api/agent-harnesses").status_code == 404
    assert (listings.asked, listings.answered) == (1, 1)
    with silent_hub() as url:
        start = time.monotonic()
        with pytest.raises(requests.exceptions.Timeout):
            session.get(f"{url}/api/models/{REPO}/revision/main", timeout=None)
        assert time.monotonic() - start < 10
    assert (listings.asked, listings.answered) == (2, 1)


def test_an_httpx_client_as_huggingface_hub_1x_has_it(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, no_httpx2: None, download_timeout: float
) -> None:
    """1.x: one shared ``httpx.Client`` with event hooks, and no httpx2 to import."""
    client = httpx.Client(timeout=None)
    _session(monkeypatch, client)
    listings = hub._bound_requests(REPO)
    with served(mirror_app(REPO, tiny_model_dir), health_path=_PROBE) as url:
        assert client.get(f"{url}/api/models/{REPO}/tree/main").status_code == 200
    assert (listings.asked, listings.answered) == (1, 1)
    with silent_hub() as url:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            client.get(f"{url}/api/models/{REPO}/revision/main")
        assert time.monotonic() - start < 10
    assert (listings.asked, listings.answered) == (2, 1)
    client.close()


def test_a_hub_that_did_not_answer_is_said_so_whatever_the_http_library(no_httpx2: None) -> None:
    """huggingface_hub 0.x raises LocalEntryNotFoundError from requests' ConnectionError."""
    requests = pytest.importorskip("requests")
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        try:
            raise requests.exceptions.ConnectionError("Max retries exceeded")
        except requests.exceptions.ConnectionError as exc:
            raise LocalEntryNotFoundError("An error happened while trying to locate") from exc
    except LocalEntryNotFoundError as exc:
        line = hub._one_line(exc)
    assert line.startswith(f"the hub ({hub.endpoint()}) did not answer: ConnectionError: ")


@pytest.mark.parametrize(
    ("path", "counted"),
    [
        (f"/api/models/{REPO}/revision/main", True),
        (f"/api/models/{REPO}/tree/0123abc", True),
        (f"/api/models/{REPO}", True),
        (f"/mirror/prefix/api/models/{REPO}/revision/main", True),  # HF_ENDPOINT with a path
        ("/api/agent-harnesses", False),  # huggingface_hub 2.5's best-effort first request
        ("/api/whoami-v2", False),
        (f"/api/models/{REPO}-v2/revision/main", False),  # another repo
        (f"/{REPO}/resolve/main/config.json", False),  # a file, not a listing
    ],
)
def test_only_the_repos_own_listing_counts(path: str, counted: bool) -> None:
    listings = hub._Listings(REPO)
    listings.sent(path)
    listings.received(path, 404)
    assert listings.asked == int(counted)
    assert (listings.error == "HTTP 404") is counted


@pytest.mark.parametrize("library", ["httpx", "httpx2"])
def test_a_hub_that_did_not_answer_is_no_fault_in_code(library: str) -> None:
    """The whole chain as a silent hub raises it: huggingface_hub's error, caused by the HTTP
    library's timeout, caused by its transport's (httpcore2 under httpx2). One line, no
    traceback: a cause from the transport was taken for a fault in code."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from embedplex.core.faults import fault

    http = pytest.importorskip(library)
    with silent_hub() as url, http.Client(timeout=0.5) as client:
        try:
            try:
                client.get(f"{url}/api/models/{REPO}/revision/main")
            except http.TimeoutException as timeout:
                raise LocalEntryNotFoundError("An error happened") from timeout
        except LocalEntryNotFoundError as exc:
            error = exc
    assert error.__cause__ is not None and error.__cause__.__cause__ is not None
    assert fault(error) is None
