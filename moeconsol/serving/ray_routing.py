"""Which replicas a request may go to: the routing policy of `moeconsol serve`, without Ray.

A replica holds the variant of the last request it was sent (its scheduler swaps to it). A
request for variant V goes to a replica holding V whenever one of them can take it: a holder
that is slow to answer (a busy machine) is waited for, never passed over for a replica that
would swap. Only when every holder is known to be full (at Serve's `max_ongoing_requests`),
or no replica holds V, may another replica take V: first one whose own variants are held by
some other replica too (no variant loses its last holder), then any.

`ray_router.VariantRouter` applies this inside Ray Serve; Serve then picks the replica with
the shortest queue within the first rank that has room, and retries (with backoff) while
none has.
"""

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaView:
    """What the policy knows of one replica."""

    key: Hashable
    holds: frozenset[str]
    full: bool = False
    """known to be at its limit of requests in flight (unknown counts as not full)"""


def rank_replicas(variant: str | None, replicas: Sequence[ReplicaView]) -> list[list[Hashable]]:
    """The replicas' keys to try for a request of `variant`, best rank first, no rank empty.
    A request with no variant (it is answered by any replica) may go anywhere."""
    everyone = [r.key for r in replicas]
    if not variant:
        return [everyone] if everyone else []
    holders = [r for r in replicas if variant in r.holds]
    if any(not r.full for r in holders):
        return [[r.key for r in holders]]
    others = [r for r in replicas if variant not in r.holds]
    spare = [r.key for r in others if _held_elsewhere(r, replicas)]
    last = [r.key for r in others if not _held_elsewhere(r, replicas)]
    return [rank for rank in ([r.key for r in holders], spare, last) if rank]


def _held_elsewhere(replica: ReplicaView, replicas: Sequence[ReplicaView]) -> bool:
    """Every variant `replica` holds is held by another replica too (or it holds none)."""
    return all(any(v in o.holds for o in replicas if o.key != replica.key) for v in replica.holds)
