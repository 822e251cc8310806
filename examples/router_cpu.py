"""The router's CPU per routed request, against a fake upstream that answers at once.

Three processes: a fake OpenAI-compatible upstream (``embedplex.bench.fake_upstream``), the
gateway under test (``embedplex serve`` with examples/router.toml pointed at it) and the load
generator (``embedplex bench load``). The gateway's utime+stime is read from /proc before and
after a fixed number of requests: CPU microseconds per routed request. Rounds alternate between
the code trees given with --src, so two versions are measured in one sitting, each with the
examples/router.toml its own checkout ships (``--config-here``: this checkout's for all):

    python examples/router_cpu.py --src old=/work/main/src --src new=src --rounds 3

Each tree's gateway runs with PYTHONPATH=<tree>; the upstream and the load generator always come
from this checkout. See docs/router.md ("Router CPU per request").

On a machine whose speed moves from minute to minute (a shared VM: the same tree reads 140 and
240 us within the hour), ``--callgrind`` counts instructions instead: each gateway runs under
valgrind's callgrind with counting off, switched on for the measured requests only (after the
warm-up), so start-up and loading are not counted; all threads together, the kernel's share of
the sockets not at all. Repeat runs agree within about 1%:

    python examples/router_cpu.py --src old=/work/main/src --src new=src --rounds 2 \
        --callgrind --requests 1500 --warmup 500
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (the fields after the command name in /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def instructions(out: Path) -> int:
    """The instructions callgrind counted in the dumps of one run (``<out>``, ``<out>.1``...)."""
    total = 0
    for dump in out.parent.glob(out.name + "*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def router_config(src: Path, upstream_port: int, workdir: Path) -> Path:
    """examples/router.toml as the tree ``src`` ships it (this checkout's when that tree has
    none, or with --config-here), with its provider pointed at the fake upstream."""
    shipped = src.resolve().parent / "examples" / "router.toml"
    text = (shipped if shipped.is_file() else HERE / "router.toml").read_text()
    text = re.sub(
        r'endpoint = "http://127\.0\.0\.1:\d+"',
        f'endpoint = "http://127.0.0.1:{upstream_port}"',
        text,
    )
    path = workdir / "router.toml"
    path.write_text(text)
    return path


def load(
    url: str, requests: int, concurrency: int, model: str | None, seed: int
) -> dict[str, object]:
    """Every text unique (``--repeat 0``; each run its own ``seed``): with a cache in front of
    the providers, a repeated text would be a hit and never reach the router's lanes."""
    cmd = [
        sys.executable, "-c", "from embedplex.cli.main import main; main()",
        "bench", "load", "--url", url, "--requests", str(requests),
        "--concurrency", str(concurrency), "--repeat", "0", "--seed", str(seed),
        "--json", "-",
    ]  # fmt: skip
    if model:
        cmd += ["--model", model]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_env(ROOT / "src"))
    start = out.stdout.find("{")
    result: dict[str, object] = json.loads(out.stdout[start:])
    return result


def _env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src.resolve())}


def one_round(
    src: Path, upstream_port: int, args: argparse.Namespace, work: Path, seed: int
) -> dict[str, float]:
    port = free_port()
    config = router_config(ROOT / "src" if args.config_here else src, upstream_port, work)
    log = (work / f"gateway-{port}.log").open("wb")
    env = {**_env(src), "EMBEDPLEX_DATA_DIR": str(work / f"data-{port}")}
    counted = work / f"callgrind-{port}.out"
    under = (
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={counted}"]
        if args.callgrind
        else []
    )
    gateway = subprocess.Popen(
        [*under, sys.executable, "-c", "from embedplex.cli.main import main; main()", "serve",
         "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/health/ready", timeout=600.0 if args.callgrind else 120.0)
        load(url, args.warmup, args.concurrency, "remote-minilm", seed=2 * seed)
        if args.callgrind:
            _callgrind(gateway.pid, "-i", "on")
        before = cpu_seconds(gateway.pid)
        result = load(url, args.requests, args.concurrency, "remote-minilm", seed=2 * seed + 1)
        used = cpu_seconds(gateway.pid) - before
        if args.callgrind:
            _callgrind(gateway.pid, "-i", "off")
            _callgrind(gateway.pid, "-d")
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=120)
        log.close()
    answered = float(result.get("ok", args.requests))  # type: ignore[arg-type]
    if args.callgrind:  # valgrind's CPU time says nothing of the gateway's own
        return {
            "instructions_per_request": round(instructions(counted) / answered),
            "req_per_s": float(result.get("req_per_s", 0.0)),  # type: ignore[arg-type]
        }
    return {
        "cpu_us_per_request": round(used / answered * 1e6, 1),
        "req_per_s": float(result.get("req_per_s", 0.0)),  # type: ignore[arg-type]
    }


def _callgrind(pid: int, *command: str) -> None:
    subprocess.run(["callgrind_control", *command, str(pid)], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", action="append", default=[], help="NAME=PATH of a src tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--config-here", action="store_true", help="every tree with this checkout's router.toml"
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="count the gateway's instructions per request under valgrind instead of its CPU",
    )
    args = parser.parse_args()
    if args.callgrind and shutil.which("callgrind_control") is None:
        parser.error("--callgrind needs valgrind (callgrind_control) on PATH")
    trees = [(s.split("=", 1)[0], Path(s.split("=", 1)[1])) for s in args.src or ["this=src"]]
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "embedplex.bench.fake_upstream", str(upstream_port)],
        env=_env(ROOT / "src"),
    )
    try:
        time.sleep(0.5)
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for name, src in trees:
                    figures = one_round(src, upstream_port, args, Path(tmp), seed=1 + r)
                    print(json.dumps({"round": r, "tree": name, **figures}), flush=True)
    finally:
        upstream.send_signal(signal.SIGTERM)
        upstream.wait(timeout=10)


if __name__ == "__main__":
    main()
