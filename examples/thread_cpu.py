"""A served model's CPU per request, by thread: event loop, inference threads, the rest.

Runs one ``embedplex bench load`` against a server already listening on --port and reads the
server's threads' utime+stime (/proc/PID/task/*/stat) before and after; prints one JSON line:
req/s and CPU microseconds per request of the event loop (the main thread), the inference
threads (those the server runs below its own priority, ``serve/process_tuning.py``) and every
other thread (the tokenizer's pool, logging, the state store). docs/benchmarks.md ("Where the
CPU goes at 64 clients") holds a run of it:

    embedplex serve --port 8102 --log-level warning &
    python examples/thread_cpu.py --port 8102 --warmup-run     # once: threads start lazily
    python examples/thread_cpu.py --port 8102 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def listener_pid(port: int) -> int:
    """The process listening on 127.0.0.1:``port`` (from ``ss``)."""
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True)
    for field in out.stdout.split("pid=")[1:]:
        return int(field.split(",")[0])
    raise SystemExit(f"nothing listens on port {port}")


def threads(pid: int) -> dict[int, tuple[int, int]]:
    """Each thread's (utime+stime in ticks, nice)."""
    out: dict[int, tuple[int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # ended meanwhile
        out[int(task.name)] = (int(fields[11]) + int(fields[12]), int(fields[16]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the texts (default: a new random one)"
    )
    parser.add_argument("--warmup-run", action="store_true", help="a 3 s load, nothing printed")
    args = parser.parse_args()
    if args.seed is None:  # texts no earlier run sent: the server's cache cannot answer them
        args.seed = secrets.randbelow(2**31)
    pid = listener_pid(args.port)
    load = [
        sys.executable, "-c", "from embedplex.cli.main import main; main()", "bench", "load",
        "--url", f"http://127.0.0.1:{args.port}", "--concurrency", str(args.concurrency),
        "--duration", str(3 if args.warmup_run else args.duration),
        "--warmup", str(args.concurrency), "--repeat", "0", "--seed", str(args.seed),
        "--json", "-",
    ]  # fmt: skip
    before = threads(pid)
    out = subprocess.run(load, check=True, capture_output=True, text=True).stdout
    after = threads(pid)
    if args.warmup_run:
        return
    result = json.loads(out[out.find("{") :])
    requests = int(result["ok"]) + args.concurrency  # the warm-up's requests count too
    kinds = {"loop": 0.0, "inference": 0.0, "other": 0.0}
    for tid, (ticks, nice) in after.items():
        used = (ticks - before.get(tid, (0, 0))[0]) * TICK_US / requests
        kind = "loop" if tid == pid else "inference" if nice > 0 else "other"
        kinds[kind] += used
    print(
        json.dumps(
            {
                "seed": args.seed,
                "req_per_s": round(float(result["req_per_s"]), 1),
                **{f"{k}_us": round(v) for k, v in kinds.items()},
                "total_us": round(sum(kinds.values())),
            }
        )
    )


if __name__ == "__main__":
    main()
