"""Sample order as a pure function of a small state — what makes exact resume possible.

Every epoch has one global order of all N samples of a split: the shards in a seeded
permutation, and inside each shard its samples in a seeded permutation. Nothing depends on
time, pid or topology. The order is never materialised (N can be 10⁸): a position maps to
(shard, sample) through the shard permutation and that shard's own permutation, made on demand.

A *slot* is one reader: (rank, dataloader worker), `slot = rank * workers + worker`, S slots
in all. In each epoch, the positions not yet consumed are cut into S contiguous runs of equal
count (±1) and slot s reads run s, in order. A slot's whole progress is (epoch, count read in
its run); when its run ends it goes on to its run of the next epoch.

Resume:
- same number of slots → every slot continues at its (epoch, count): the very next batch;
- another number of slots → what each old slot read (a prefix of its run, in each epoch it
  touched) is recorded as consumed intervals of the global order, and the remaining positions
  of those epochs are cut anew among the new slots. No sample of an epoch is read twice or
  skipped; batches differ from an uninterrupted run (the samples are regrouped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Intervals = list[tuple[int, int]]


def rng(*key: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative integers (seed, epoch, …)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


class EpochOrder:
    """The global order of one epoch over shards of the given sample counts."""

    def __init__(self, shard_sizes: list[int] | np.ndarray, seed: int, epoch: int):
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.seed, self.epoch = seed, epoch
        self.shards = rng(seed, epoch, 0).permutation(len(self.shard_sizes))
        self.starts = np.concatenate([[0], np.cumsum(self.shard_sizes[self.shards])])
        self.total = int(self.starts[-1])
        self._cache: tuple[int, np.ndarray] | None = None

    def within(self, shard: int) -> np.ndarray:
        """The permutation of shard `shard`'s samples in this epoch."""
        if self._cache is None or self._cache[0] != shard:
            order = rng(self.seed, self.epoch, 1, shard).permutation(int(self.shard_sizes[shard]))
            self._cache = (shard, order)
        return self._cache[1]

    def locate(self, position: int) -> tuple[int, int]:
        """(shard, sample index in the shard) at `position` of the epoch's order."""
        place = int(np.searchsorted(self.starts, position, side="right")) - 1  # in shard order
        shard = int(self.shards[place])
        return shard, int(self.within(shard)[position - self.starts[place]])

    def runs(self, start: int, end: int):
        """(shard, sample indices) for positions [start, end), one item per shard touched."""
        position = start
        while position < end:
            place = int(np.searchsorted(self.starts, position, side="right")) - 1
            shard = int(self.shards[place])
            stop = min(end, int(self.starts[place + 1]))
            offset = position - int(self.starts[place])
            yield shard, self.within(shard)[offset : offset + stop - position]
            position = stop


def complement(total: int, consumed: Intervals) -> Intervals:
    """[0, total) minus the (sorted, disjoint) consumed intervals."""
    out, cursor = [], 0
    for start, end in consumed:
        if start > cursor:
            out.append((cursor, start))
        cursor = max(cursor, end)
    if cursor < total:
        out.append((cursor, total))
    return out


def merge(intervals: Intervals) -> Intervals:
    out: Intervals = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def take(intervals: Intervals, skip: int, count: int) -> Intervals:
    """The sub-list of positions number [skip, skip + count) of the positions in `intervals`."""
    out, seen = [], 0
    for start, end in intervals:
        length = end - start
        lo, hi = max(skip - seen, 0), min(skip + count - seen, length)
        if lo < hi:
            out.append((start + lo, start + hi))
        seen += length
        if seen >= skip + count:
            break
    return out


def count(intervals: Intervals) -> int:
    return sum(end - start for start, end in intervals)


@dataclass
class OrderState:
    """The whole resume state of a split's reader: a few integers per slot.

    `consumed[epoch]` lists positions of that epoch read before the current slot layout was
    made (empty unless a run resumed on another number of slots); `slots[s] = (epoch, read)`.
    """

    seed: int
    slots: list[tuple[int, int]]
    consumed: dict[int, Intervals] = field(default_factory=dict)

    @classmethod
    def fresh(cls, seed: int, num_slots: int) -> OrderState:
        return cls(seed, [(0, 0)] * num_slots)

    def run(self, total: int, slot: int, epoch: int) -> Intervals:
        """The positions slot `slot` reads in `epoch` under this layout."""
        remaining = complement(total, self.consumed.get(epoch, []))
        n, slots = count(remaining), len(self.slots)
        begin, end = slot * n // slots, (slot + 1) * n // slots
        return take(remaining, begin, end - begin)

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "slots": [list(s) for s in self.slots],
            "consumed": {str(e): [list(i) for i in v] for e, v in self.consumed.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> OrderState:
        return cls(
            seed=int(data["seed"]),
            slots=[(int(e), int(r)) for e, r in data["slots"]],
            consumed={
                int(e): [(int(a), int(b)) for a, b in v] for e, v in data["consumed"].items()
            },
        )

    def check(self, total: int) -> None:
        """ValueError unless this state can be a reader's over `total` samples: each slot's read
        count within its run of its epoch (a count past it would silently skip the rest of the
        data), consumed positions inside the epoch, epochs not negative."""
        for epoch, intervals in self.consumed.items():
            if epoch < 0 or any(not 0 <= a < b <= total for a, b in intervals):
                raise ValueError(f"data order: consumed positions {intervals[:3]} of epoch "
                                 f"{epoch} lie outside the dataset's {total:,} samples")  # fmt: skip
        for slot, (epoch, read) in enumerate(self.slots):
            run = count(self.run(total, slot, epoch)) if epoch >= 0 else -1
            if epoch < 0 or not 0 <= read <= run:
                raise ValueError(f"data order: slot {slot} has read {read:,} samples of epoch "
                                 f"{epoch}, whose run holds {max(run, 0):,} of the dataset's "
                                 f"{total:,}: not a state of this dataset")  # fmt: skip

    def resized(self, total: int, num_slots: int) -> OrderState:
        """This state laid out anew on `num_slots` slots (exact when the number is the same)."""
        if num_slots == len(self.slots):
            return OrderState(self.seed, list(self.slots), dict(self.consumed))
        first = min(epoch for epoch, _ in self.slots)
        last = max(epoch for epoch, _ in self.slots)
        consumed: dict[int, Intervals] = {}
        for epoch in range(first, last + 1):
            taken = list(self.consumed.get(epoch, []))
            for slot, (slot_epoch, read) in enumerate(self.slots):
                if slot_epoch > epoch:
                    taken += self.run(total, slot, epoch)
                elif slot_epoch == epoch:
                    taken += take(self.run(total, slot, epoch), 0, read)
            consumed[epoch] = merge(taken)
        # Epochs already complete need no record; new slots start at the oldest open epoch.
        while first < last and count(consumed[first]) == total:
            del consumed[first]
            first += 1
        return OrderState(self.seed, [(first, 0)] * num_slots, consumed)


def slot_positions(state: OrderState, total: int, slot: int, epochs: int):
    """(epoch, position) pairs slot `slot` reads from its state onwards, for `epochs` epochs:
    the pure function the tests check exhaustively."""
    epoch, read = state.slots[slot]
    for current in range(epoch, epoch + epochs):
        positions = [p for a, b in state.run(total, slot, current) for p in range(a, b)]
        for position in positions[read if current == epoch else 0 :]:
            yield current, position
