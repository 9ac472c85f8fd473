"""Ray Serve's request router for the replicas of `moeconsol serve`: routing by variant that
holds on a busy machine.

Serve's default router (power of two choices with model multiplexing) falls back to any
replica when the replica holding the requested model does not answer its queue-length probe
within 0.1 s, or once a request has waited 1-2 s: on a loaded machine that sends requests to
the replica holding the other variant, which swaps. `VariantRouter` ranks replicas by
`ray_routing.rank_replicas` instead: a holder that is slow is retried with backoff (Serve's
probe deadline grows to 1 s) until it answers, is found full, or dies (Serve then drops it: a
dead or unhealthy replica holds nothing).

What a replica holds is what this router last sent it, else what the replica announced
(`@serve.multiplexed`, which reaches the router 0.1 s or more later). One router makes every
routing decision (the application has one `Router` replica), so its own record is current.

This module imports Ray: `ray_serve.build_app` names it to Serve, which loads it by path in the
processes that route.
"""

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .ray_routing import ReplicaView, rank_replicas


class VariantRouter(RequestRouter):
    """Routes a request with a multiplexed model id (the variant) to the replicas holding it."""

    def initialize_state(self, **kwargs) -> None:
        self.sent: dict[ReplicaID, str] = {}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        variant = pending_request.metadata.multiplexed_model_id if pending_request is not None else None
        by_key = {r.replica_id: r for r in candidate_replicas}
        views = [ReplicaView(r.replica_id, self.holds(r), self.full(r)) for r in candidate_replicas]
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # no rank had room: wait, then retry
        return [[by_key[k] for k in rank] for rank in rank_replicas(variant, views)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        variant = pending_request.metadata.multiplexed_model_id
        if variant:
            live = self.curr_replicas
            self.sent = {k: v for k, v in self.sent.items() if k in live}
            self.sent[replica_id] = variant

    def holds(self, replica: RunningReplica) -> frozenset[str]:
        sent = self.sent.get(replica.replica_id)
        return frozenset({sent}) if sent else frozenset(replica.multiplexed_model_ids)

    def full(self, replica: RunningReplica) -> bool:
        ongoing = self.replica_queue_len_cache.get(replica.replica_id)
        return ongoing is not None and ongoing >= replica.max_ongoing_requests
