"""TransferStore: one byte budget, a count per session, a timeout; injected clock."""

from __future__ import annotations

from synapse_coap.transport.transfers import ENTRY_OVERHEAD, TransferStore


def test_budget_session_limit_and_timeout() -> None:
    now = [0.0]
    store = TransferStore(budget=10 * 4096, per_session=3, timeout=60.0, clock=lambda: now[0])
    size = 4096 - ENTRY_OVERHEAD
    # one session: its 4th transfer evicts its own oldest
    for i in range(4):
        assert store.put(("a", i), "A", object(), size)
    assert ("a", 0) not in store and len(store) == 3
    assert store.evictions["session_limit"] == 1
    # many sessions: the budget holds, the least recently used go first
    for i in range(20):
        now[0] += 1
        store.put(("s", i), f"S{i}", object(), size)
        assert store.bytes <= store.budget
    assert len(store) == 10
    assert [("s", i) in store for i in range(20)] == [False] * 10 + [True] * 10
    # touching an entry keeps it
    store.get(("s", 10))
    store.put(("s", 99), "S99", object(), size)
    assert ("s", 10) in store and ("s", 11) not in store
    # one body larger than the budget is refused
    assert not store.put("huge", "H", object(), store.budget)
    assert store.evictions["too_large"] == 1
    # stalled entries go after the timeout, without anyone touching the store
    now[0] += 61
    assert store.expire() == 10
    assert len(store) == 0 and store.bytes == 0
