"""The routing policy of `moeconsol serve` (`ray_routing.rank_replicas`), without Ray: a
request goes to a replica holding its variant whenever one can take it; otherwise it may go
to another, first to one whose variants stay held elsewhere."""

from hypothesis import given
from hypothesis import strategies as st

from moeconsol.serving.ray_routing import ReplicaView, rank_replicas

VARIANTS = ["a", "b", "c", "d"]

replica_sets = st.lists(
    st.tuples(st.sets(st.sampled_from(VARIANTS), max_size=2), st.booleans()), min_size=1, max_size=6
).map(lambda rs: [ReplicaView(i, frozenset(holds), full) for i, (holds, full) in enumerate(rs)])


def _holds_elsewhere(r: ReplicaView, replicas: list[ReplicaView]) -> bool:
    return all(any(v in o.holds for o in replicas if o.key != r.key) for v in r.holds)


@given(replica_sets, st.sampled_from([*VARIANTS, None]))
def test_ranks(replicas, variant):
    ranks = rank_replicas(variant, replicas)
    keys = [k for rank in ranks for k in rank]
    assert all(ranks) and len(keys) == len(set(keys)) and set(keys) <= {r.key for r in replicas}
    holders = {r.key for r in replicas if variant in r.holds}
    if variant is None:
        assert ranks == [[r.key for r in replicas]]
    elif any(not r.full for r in replicas if r.key in holders):
        assert ranks == [sorted(holders)]  # only the holders, however slow they are
    else:  # every holder full, or none: every replica may take it, the holders first
        assert set(keys) == {r.key for r in replicas}
        if holders:
            assert set(ranks[0]) == holders
        others = [k for rank in ranks for k in rank if k not in holders]
        by_key = {r.key: r for r in replicas}
        spare = [_holds_elsewhere(by_key[k], replicas) for k in others]
        assert spare == sorted(spare, reverse=True)  # keeping a variant's last holder comes last


def test_alternating_variants_stay_on_their_replicas():
    """Two replicas holding a and b: requests for a go to 0 and for b to 1, whatever their
    load, until the holder is full; a third variant goes to a replica whose variant another
    holds too, if there is one."""
    replicas = [ReplicaView(0, frozenset({"a"})), ReplicaView(1, frozenset({"b"}))]
    assert rank_replicas("a", replicas) == [[0]] and rank_replicas("b", replicas) == [[1]]
    full = [ReplicaView(0, frozenset({"a"}), full=True), replicas[1]]
    assert rank_replicas("a", full) == [[0], [1]]
    three = [*replicas, ReplicaView(2, frozenset({"a"}))]
    assert rank_replicas("c", three) == [[0, 2], [1]]
    assert rank_replicas("c", [ReplicaView(0, frozenset())]) == [[0]]
    assert rank_replicas("a", []) == [] and rank_replicas(None, []) == []
