"""Server memory on a first start (the model exported to ONNX) against a cached start.

    python examples/export_rss.py --dtype float32
    python examples/export_rss.py --dtype int8

Starts ``embedplex serve`` twice on one fresh, empty ``--cache-dir`` (other arguments are passed
to it), and after ``/health/ready`` and one ``/embed`` prints the server process's VmRSS and
VmHWM (its peak). The export runs in a child process, so both starts should weigh the same
(docs/architecture.md, "Export in a child process").
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import httpx

from embedplex.bench.server_proc import ServerProcess


def main(args: list[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix="embedplex-export-rss-"))
    for start in ("first", "cached"):
        with ServerProcess(["--cache-dir", str(work / "cache"), *args], log=work / "log") as srv:
            reply = httpx.post(f"{srv.url}/embed", json={"inputs": ["hello world"]}, timeout=120)
            reply.raise_for_status()
            rss, peak = srv.rss_mb()
            print(
                f"{' '.join(args) or 'defaults'}: {start} start, ready in {srv.ready_s:.1f} s, "
                f"VmRSS {rss:.0f} MB, VmHWM {peak:.0f} MB",
                flush=True,
            )
    print(f"server log: {work / 'log'}")


if __name__ == "__main__":
    main(sys.argv[1:])
