"""The load generator's own CPU per request, inside the measured run.

Runs ``embedplex bench load``'s loop in this process against a server already listening and
reads this process's utime+stime (``getrusage``) as the measured run begins and after it ends:
what the client takes from cores it shares with the server. Prints one JSON line.
docs/benchmarks.md ("Load generator ceiling") holds a run, old and new trees alternating:

    python -m embedplex.bench.echo_server 18932 &
    PYTHONPATH=<tree>/src python examples/load_cpu.py --port 18932 --repeat 0 --warmup 640
"""

from __future__ import annotations

import argparse
import json
import resource
import secrets

from embedplex.bench.load import LoadOptions, run_load_sync


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=int, default=640)
    parser.add_argument("--repeat", type=float, default=None, help="unset: 512 cycled bodies")
    parser.add_argument("--seed", type=int, default=None, help="default: a new random one")
    args = parser.parse_args()
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    options = LoadOptions(
        url=f"http://127.0.0.1:{args.port}",
        duration=args.duration,
        concurrency=args.concurrency,
        warmup=args.warmup,
        repeat=args.repeat,
        seed=seed,
    )
    began: list[float] = []
    result = run_load_sync(options, on_start=lambda: began.append(cpu_s()))
    used = cpu_s() - began[0]
    print(
        json.dumps(
            {
                "repeat": args.repeat,
                "seed": seed,
                "req_per_s": round(result.req_per_s),
                "requests": result.requests,
                "client_cpu_us_per_request": round(used / max(result.requests, 1) * 1e6, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
