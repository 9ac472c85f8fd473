"""Benchmark `moeconsol serve` on Ray Serve: requests/s with 1 and 2 replicas, and swaps per
request with variant-aware vs random routing, all in one run on one local Ray.

Builds benchmarks/serve.py's family (base + code + chat, hidden 256, 4 layers x 8 experts;
`--size example` for the tiny one), starts a local Ray as `moeconsol serve` does (no dashboard,
every Ray server and the API on 127.0.0.1) and deploys the application three times, one after
another, on the same Ray:

1. 1 replica, variant-aware routing (multiplexing by the `model` field);
2. 2 replicas, variant-aware routing;
3. 2 replicas, random routing (no multiplexed model id: Serve's plain power-of-two choice).

Each gets the same workload over HTTP: `--requests` greedy completions of `--tokens` tokens,
variants drawn with `--popularity` weights (fixed seed), sent by `--clients` concurrent
clients. Requests/s is wall time over the whole workload (median over `--repeats` runs of
each configuration, interleaved, since the machine's load drifts); swaps come from the summed
`/metrics`. Every replica reserves one CPU and runs one torch thread. Ray may print a line of
its own on stdout before the JSON.

    python benchmarks/cluster.py [--requests 48] [--clients 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import EXAMPLE_SIZE, PROMPT, SHORT_PROMPT, SIZE, build  # noqa: E402

from moeconsol.serving.ray_serve import start_ray, stop  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _swaps(url: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r'^moeconsol_swaps_total\{model="[^"]*"\} (\S+)$', text, re.M))


def run(
    artifact: Path, replicas: int, aware: bool, order: list[tuple[str, str]], tokens: int, clients: int, port: int
) -> dict:
    import httpx
    from ray import serve

    from moeconsol.serving.ray_serve import ReplicaSettings, deploy

    t = time.perf_counter()
    deploy(
        ReplicaSettings(artifact=str(artifact)), replicas, port=port, num_cpus_per_replica=1.0, route_by_variant=aware
    )
    started = time.perf_counter() - t
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64)) as client:

            def post(item: tuple[str, str]) -> dict:
                m, p = item
                r = client.post(
                    f"{url}/v1/completions", json={"model": m, "prompt": p, "max_tokens": tokens, "temperature": 0}
                )
                r.raise_for_status()
                return r.json()

            for m in sorted({m for m, _ in order}):  # warm up every replica's path once
                post((m, order[0][1]))
            swaps_before = _swaps(url)
            load = os.getloadavg()[0]
            t = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                answers = list(pool.map(post, order))
            seconds = time.perf_counter() - t
            swaps = _swaps(url) - swaps_before
    finally:
        serve.delete("moeconsol")
    return {
        "replicas": replicas,
        "routing": "variant-aware" if aware else "random",
        "requests": len(order),
        "seconds": seconds,
        "requests_per_s": len(order) / seconds,
        "tokens_per_s": sum(a["usage"]["completion_tokens"] for a in answers) / seconds,
        "swaps": swaps,
        "swaps_per_request": swaps / len(order),
        "load_average_1m": load,
        "deploy_s": started,
        "texts": [a["choices"][0]["text"] for a in answers],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--popularity", default="1,1,1", help="weights of base, code, chat")
    ap.add_argument("--size", choices=["benchmark", "example"], default="benchmark")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each configuration, interleaved (median)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    weights = [float(w) for w in args.popularity.split(",")]
    rng = random.Random(0)
    prompt = PROMPT if args.size == "benchmark" else SHORT_PROMPT
    models = ["base", "code", "chat"]
    order = [(rng.choices(models, weights)[0], f"{prompt} {i}") for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), SIZE if args.size == "benchmark" else EXAMPLE_SIZE)
        start_ray(None, num_cpus=2)
        try:
            port = _free_port()  # Serve's proxy keeps the port of its first start
            configs = ((1, True), (2, True), (2, False))
            runs = [
                run(paths["out"], n, aware, order, args.tokens, args.clients, port)
                for _ in range(args.repeats)
                for n, aware in configs
            ]  # interleaved: the load drifts
        finally:
            stop(local=True)
    same = all(r["texts"] == runs[0]["texts"] for r in runs)
    rows = []
    for n, aware in configs:
        mine = [r for r in runs if r["replicas"] == n and (r["routing"] == "variant-aware") == aware]
        rows.append(
            {
                "replicas": n,
                "routing": mine[0]["routing"],
                "requests_per_s": statistics.median(r["requests_per_s"] for r in mine),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                "swaps_per_request": sum(r["swaps"] for r in mine) / sum(r["requests"] for r in mine),
                "load_average_1m": statistics.mean(r["load_average_1m"] for r in mine),
                "requests_per_s_each": [r["requests_per_s"] for r in mine],
                "swaps_each": [r["swaps"] for r in mine],
            }
        )
    result = {
        "workload": {
            "requests": args.requests,
            "tokens": args.tokens,
            "clients": args.clients,
            "repeats": args.repeats,
            "popularity": dict(zip(models, weights)),
            "size": args.size,
            "cpus": os.cpu_count(),
        },
        "configs": rows,
        "answers_equal_across_runs": same,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    w = result["workload"]
    print(
        f"{w['requests']} greedy requests x {w['tokens']} tokens, {w['clients']} clients, popularity {w['popularity']}, "
        f"{w['size']} family, {w['cpus']} CPUs; answers equal across runs: {same}"
    )
    for r in rows:
        each = ", ".join(f"{x:.1f}" for x in r["requests_per_s_each"])
        print(
            f"  {r['replicas']} replica(s), {r['routing']:>13}: {r['requests_per_s']:6.2f} req/s median ({each}), "
            f"{r['tokens_per_s']:6.1f} tok/s, {r['swaps_per_request']:.2f} swaps/request, load average {r['load_average_1m']:.1f}"
        )


if __name__ == "__main__":
    main()
