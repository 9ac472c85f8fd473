"""On paper, past these machines: replicas, swaps per request and memory for N variants.

A small discrete-event simulation of `moeconsol serve` at a scale this machine cannot run.
Requests for N variants arrive as a Poisson stream (rate `--rate` per second); a variant's
popularity follows Zipf(`--zipf`) (0 = uniform). Each replica serves one request at a time
(batch 1, FIFO: the reference system's setting, and a pessimistic one for a batching engine);
a request costs prefill + tokens x decode, plus a swap when its variant is not the replica's
active one. Two routers:

- variant-aware (Ray Serve multiplexing as deployed): the replica whose active variant it is
  with the shortest queue, unless that queue holds `--spill` or more requests; then the
  replica with the shortest queue (which swaps);
- random: two replicas drawn at random, the one with the shorter queue (Ray Serve's
  power-of-two choice without a multiplexed model id: load-aware, blind to the variant).

The swap, prefill and decode times come from the command line or from the JSON of
`python benchmarks/serve.py --json` (`--measured FILE`). Memory compares one replica (bank
resident once + one variant's non-expert tensors on the device, every variant's non-expert
tensors in host memory) with N whole models, for Mixtral-8x7B-sized variants by default.

    python benchmarks/simulate_cluster.py --variants 8 --rate 4 [--measured serve.json]
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
from dataclasses import dataclass

GB = 1e9


@dataclass
class Costs:
    swap_s: float
    prefill_s: float
    decode_s: float
    """per generated token"""
    tokens: int

    def service(self, swap: bool) -> float:
        return self.prefill_s + self.tokens * self.decode_s + (self.swap_s if swap else 0.0)


def zipf(n: int, s: float) -> list[float]:
    w = [1.0 / (k + 1) ** s for k in range(n)]
    return [x / sum(w) for x in w]


def simulate(
    n_variants: int,
    popularity: list[float],
    rate: float,
    replicas: int,
    costs: Costs,
    aware: bool,
    requests: int = 20_000,
    spill: int = 4,
    seed: int = 0,
) -> dict:
    """Mean and p95 latency (arrival to last token), swaps per request, utilisation."""
    rng = random.Random(seed)
    active = [k % n_variants for k in range(replicas)]  # replica i starts on variant i mod N
    free_at = [0.0] * replicas
    queue_ends: list[list[float]] = [[] for _ in range(replicas)]  # finish times of queued work
    t, swaps, latencies, busy = 0.0, 0, [], 0.0
    for _ in range(requests):
        t += rng.expovariate(rate)
        v = rng.choices(range(n_variants), popularity)[0]
        for q in queue_ends:
            while q and q[0] <= t:
                heapq.heappop(q)
        if aware:
            holders = [r for r in range(replicas) if active[r] == v and len(queue_ends[r]) < spill]
            pool = holders or range(replicas)
            r = min(pool, key=lambda i: (len(queue_ends[i]), free_at[i]))
        else:  # two replicas at random, the shorter queue: Ray Serve's routing without a model id
            a, b = rng.randrange(replicas), rng.randrange(replicas)
            r = min((a, b), key=lambda i: (len(queue_ends[i]), free_at[i]))
        swap = active[r] != v
        swaps += swap
        active[r] = v
        start = max(t, free_at[r])
        cost = costs.service(swap)
        free_at[r] = start + cost
        busy += cost
        heapq.heappush(queue_ends[r], free_at[r])
        latencies.append(free_at[r] - t)
    latencies.sort()
    return {
        "replicas": replicas,
        "routing": "variant-aware" if aware else "random",
        "mean_latency_s": sum(latencies) / len(latencies),
        "p95_latency_s": latencies[int(0.95 * len(latencies))],
        "swaps_per_request": swaps / requests,
        "utilisation": busy / (replicas * max(free_at)),
    }


def replicas_needed(
    n_variants: int,
    popularity: list[float],
    rate: float,
    costs: Costs,
    aware: bool,
    slo_s: float,
    spill: int,
    most: int = 64,
) -> dict | None:
    """The fewest replicas whose p95 latency meets `slo_s`."""
    for r in range(1, most + 1):
        row = simulate(n_variants, popularity, rate, r, costs, aware, spill=spill)
        if row["p95_latency_s"] <= slo_s:
            return row
    return None


def memory(n_variants: int, expert_gb: float, non_expert_gb: float, distinct_expert_fraction: float) -> dict:
    """Bytes of one replica against N whole models. `distinct_expert_fraction`: the share of
    each fine-tune's experts that differ from the base (the bank stores those once more)."""
    bank = expert_gb * (1 + (n_variants - 1) * distinct_expert_fraction)
    return {
        "replica_device_gb": bank + non_expert_gb,
        "replica_host_gb": n_variants * non_expert_gb,
        "whole_models_gb": n_variants * (expert_gb + non_expert_gb),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=int, default=8)
    ap.add_argument("--zipf", type=float, default=1.0, help="popularity skew (0 = uniform)")
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second")
    ap.add_argument("--slo", type=float, default=10.0, help="p95 latency target, seconds")
    ap.add_argument("--spill", type=int, default=4, help="queue length at which variant-aware routing spills")
    ap.add_argument("--swap", type=float, default=1.2, help="seconds per swap (reference: Mixtral on PCIe 4)")
    ap.add_argument("--prefill", type=float, default=0.9, help="seconds to first token without a swap")
    ap.add_argument("--decode", type=float, default=0.025, help="seconds per generated token")
    ap.add_argument("--tokens", type=int, default=25)
    ap.add_argument("--measured", help="JSON of benchmarks/serve.py --json: take swap, prefill and decode from it")
    ap.add_argument("--expert-gb", type=float, default=90.0, help="expert bytes of one model (Mixtral-8x7B bf16)")
    ap.add_argument("--non-expert-gb", type=float, default=3.2)
    ap.add_argument("--distinct-experts", type=float, default=0.25, help="share of a fine-tune's experts not shared")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    costs = Costs(args.swap, args.prefill, args.decode, args.tokens)
    if args.measured:
        m = json.load(open(args.measured))
        g = m["generation"]
        decode = 1.0 / g["runtime_tokens_per_s"]
        service_ttft = [
            r["service_ttft_without_swap_s"] for r in m["interleaved"] if r.get("service_ttft_without_swap_s")
        ]
        costs = Costs(m["swap"]["swap_s"], min(service_ttft) if service_ttft else decode, decode, args.tokens)
    popularity = zipf(args.variants, args.zipf)
    rows = []
    for aware in (True, False):
        need = replicas_needed(args.variants, popularity, args.rate, costs, aware, args.slo, args.spill)
        rows.append({"routing": "variant-aware" if aware else "random", "needed": need})
    same = max(r["needed"]["replicas"] for r in rows if r["needed"]) if all(r["needed"] for r in rows) else 8
    at_same = [
        simulate(args.variants, popularity, args.rate, same, costs, aware, spill=args.spill) for aware in (True, False)
    ]
    mem = memory(args.variants, args.expert_gb, args.non_expert_gb, args.distinct_experts)
    result = {
        "costs": costs.__dict__,
        "variants": args.variants,
        "zipf": args.zipf,
        "rate": args.rate,
        "slo_s": args.slo,
        "replicas_needed": rows,
        "at_same_replicas": at_same,
        "memory": mem,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(
        f"{args.variants} variants, Zipf {args.zipf}, {args.rate} req/s, p95 target {args.slo} s; swap {costs.swap_s:.4g} s, "
        f"prefill {costs.prefill_s:.4g} s, decode {costs.decode_s:.4g} s/token x {costs.tokens}"
    )
    for r in rows:
        n = r["needed"]
        print(
            f"  {r['routing']:>13}: "
            + (
                "more than 64 replicas"
                if n is None
                else f"{n['replicas']} replicas (p95 {n['p95_latency_s']:.2f} s, {n['swaps_per_request']:.2f} swaps/request, "
                f"utilisation {n['utilisation']:.0%})"
            )
        )
    for r in at_same:
        print(
            f"  at {same} replicas, {r['routing']:>13}: {r['swaps_per_request']:.2f} swaps/request, "
            f"mean {r['mean_latency_s']:.2f} s, p95 {r['p95_latency_s']:.2f} s"
        )
    print(
        f"  memory per replica: {mem['replica_device_gb']:.0f} GB on the device + {mem['replica_host_gb']:.0f} GB host; "
        f"{args.variants} whole models: {mem['whole_models_gb']:.0f} GB"
    )


if __name__ == "__main__":
    main()
