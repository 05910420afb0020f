"""The sample order as a pure function: exhaustive checks without processes."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from esmdist.data.order import EpochOrder, OrderState, count, slot_positions, take

SHARDS = [[5], [3, 7, 1, 9], [10, 10, 10], [1] * 11, [4, 0, 6]]


def epoch_positions(state: OrderState, total: int, epoch: int) -> list[list[int]]:
    return [[p for a, b in state.run(total, s, epoch) for p in range(a, b)]
            for s in range(len(state.slots))]  # fmt: skip


@pytest.mark.parametrize("sizes", SHARDS)
@pytest.mark.parametrize("slots", [1, 2, 3, 4, 7])
def test_slots_cover_every_sample_once_per_epoch(sizes, slots):
    total = sum(sizes)
    state = OrderState.fresh(seed=3, num_slots=slots)
    for epoch in range(3):
        runs = epoch_positions(state, total, epoch)
        flat = sorted(p for run in runs for p in run)
        assert flat == list(range(total))
        assert max(map(len, runs)) - min(map(len, runs)) <= 1
        order = EpochOrder(sizes, 3, epoch)
        samples = {order.locate(p) for p in range(total)}
        expected = {(shard, i) for shard, n in enumerate(sizes) for i in range(n)}
        assert samples == expected


def test_order_is_stable_and_changes_with_epoch_and_seed():
    sizes = [10, 20, 30]
    a = [EpochOrder(sizes, 7, 0).locate(p) for p in range(60)]
    assert a == [EpochOrder(sizes, 7, 0).locate(p) for p in range(60)]
    assert a != [EpochOrder(sizes, 7, 1).locate(p) for p in range(60)]
    assert a != [EpochOrder(sizes, 8, 0).locate(p) for p in range(60)]
    runs = list(EpochOrder(sizes, 7, 0).runs(0, 60))
    assert [(s, int(i)) for s, idx in runs for i in idx] == a
    assert len(runs) == 3, "positions are contiguous within a shard"


def test_continuing_from_a_state_is_the_rest_of_the_sequence():
    sizes, total = [4, 9, 2], 15
    state = OrderState.fresh(1, 3)
    full = {s: list(slot_positions(state, total, s, 3)) for s in range(3)}
    for slot, k in itertools.product(range(3), range(0, 12)):
        epoch, read = full[slot][k][0], None
        # Count how many of that epoch's positions came before k.
        read = sum(1 for e, _ in full[slot][:k] if e == epoch)
        resumed = OrderState(1, [(0, 0)] * 3)
        resumed.slots[slot] = (epoch, read)
        rest = list(slot_positions(resumed, total, slot, 3 - epoch))
        assert rest == full[slot][k:]
    assert sizes


@pytest.mark.parametrize(("old", "new"), [(4, 1), (4, 3), (2, 5), (3, 2), (1, 4)])
def test_resize_reads_the_rest_of_open_epochs_exactly_once(old, new):
    sizes = [6, 1, 8, 5, 0, 9]
    total = sum(sizes)
    generator = np.random.default_rng(old * 10 + new)
    for _ in range(20):
        state = OrderState.fresh(5, old)
        # Random progress: some slots a full epoch ahead of others.
        state.slots = [(int(e), 0) for e in generator.integers(0, 2, old)]
        state.slots = [(e, int(generator.integers(0, count(state.run(total, s, e)) + 1)))
                       for s, (e, _) in enumerate(state.slots)]  # fmt: skip
        consumed = {0: [], 1: []}
        for slot, (epoch, read) in enumerate(state.slots):
            for e in range(epoch):
                consumed[e] += [p for a, b in state.run(total, slot, e) for p in range(a, b)]
            consumed[epoch] += [p for a, b in take(state.run(total, slot, epoch), 0, read)
                                for p in range(a, b)]  # fmt: skip
        resized = OrderState.from_dict(json.loads(json.dumps(state.resized(total, new).to_dict())))
        start = resized.slots[0][0]
        for epoch in (0, 1):
            if epoch < start:
                assert sorted(consumed[epoch]) == list(range(total))
                continue
            later = [p for s in range(new) for a, b in resized.run(total, s, epoch)
                     for p in range(a, b)]  # fmt: skip
            assert sorted(consumed[epoch] + later) == list(range(total)), (state, resized)


def test_same_topology_resize_is_exact():
    state = OrderState(2, [(3, 5), (4, 0)], {3: [(0, 2)]})
    assert state.resized(50, 2) == state
    assert OrderState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
