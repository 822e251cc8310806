"""A minimal Hugging Face Hub mirror on 127.0.0.1, for HF_ENDPOINT tests.

It serves one directory as a model repo at one commit: the repo info route that
``snapshot_download`` asks first, and ``resolve`` for each file (HEAD for metadata, GET for bytes);
any other route is a 404.
It can serve a file slowly (``throttle_bps``), or cut one at its middle on every try (``cut``).
``silent_hub`` is the other kind: one that accepts connections and never answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@contextmanager
def silent_hub() -> Iterator[str]:
    """A hub that accepts connections and never answers them; its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with suppress(TimeoutError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def mirror_app(
    repo_id: str,
    root: Path,
    revisions: tuple[str, ...] = ("main", COMMIT),
    *,
    throttle_bps: float = 0,
    cut: str | None = None,
) -> Starlette:
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    etags = {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in files}
    requests: list[str] = []

    async def info(request: Request) -> Response:
        requests.append(f"info {request.url.path}")
        repo = f"{request.path_params['org']}/{request.path_params['name']}"
        if repo != repo_id or request.path_params["rev"] not in revisions:
            return JSONResponse({"error": "Repository not found"}, status_code=404)
        return JSONResponse(
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": COMMIT,
                "siblings": [{"rfilename": f} for f in files],
            }
        )

    async def tree(request: Request) -> Response:
        requests.append(f"tree {request.url.path}")
        repo = f"{request.path_params['org']}/{request.path_params['name']}"
        if repo != repo_id or request.path_params["rev"] not in revisions:
            return JSONResponse({"error": "Repository not found"}, status_code=404)
        entries = [
            {"type": "file", "path": f, "size": (root / f).stat().st_size, "oid": etags[f]}
            for f in files
        ]
        return JSONResponse(entries)

    async def resolve(request: Request) -> Response:
        requests.append(f"{request.method} {request.url.path}")
        repo = f"{request.path_params['org']}/{request.path_params['name']}"
        path = request.path_params["path"]
        if repo != repo_id or request.path_params["rev"] not in revisions or path not in etags:
            return JSONResponse(
                {"error": "Entry not found"},
                status_code=404,
                headers={"X-Error-Code": "EntryNotFound"},
            )
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etags[path]}"'}
        if request.method == "HEAD":
            size = (root / path).stat().st_size
            return Response(headers={**headers, "Content-Length": str(size)})
        if path == cut:
            return StreamingResponse(_cut(root / path), headers=headers)
        if throttle_bps:
            return StreamingResponse(_throttled(root / path, throttle_bps), headers=headers)
        return FileResponse(root / path, headers=headers)

    async def other(request: Request) -> Response:
        requests.append(f"other {request.url.path}")
        return JSONResponse({"error": "Not found"}, status_code=404)

    app = Starlette(
        routes=[
            Route("/api/models/{org}/{name}/revision/{rev}", info),
            Route("/api/models/{org}/{name}/tree/{rev}", tree),
            Route("/{org}/{name}/resolve/{rev}/{path:path}", resolve, methods=["GET", "HEAD"]),
            # Any other route, as a mirror answers one it does not serve (huggingface_hub 2.5
            # asks /api/agent-harnesses first): 404, noted.
            Route("/{path:path}", other, methods=["GET", "HEAD", "POST"]),
        ]
    )
    app.state.requests = requests
    return app


async def _cut(file: Path) -> AsyncIterator[bytes]:
    """Half the file, then the connection dies: the same byte on every try."""
    data = await asyncio.to_thread(file.read_bytes)
    yield data[: len(data) // 2]
    raise RuntimeError("the mirror cuts this file")


async def _throttled(file: Path, bps: float) -> AsyncIterator[bytes]:
    with file.open("rb") as fh:
        while chunk := fh.read(16384):
            yield chunk
            await asyncio.sleep(len(chunk) / bps)
