"""Bin packing of sample lengths into fixed-capacity packs, O(n log n).

`pack_lengths(lengths, capacity, strategy, seed)` is the pure function the pack stage and the tests use.
first_fit finds the leftmost pack with room through a max segment tree over the packs' remaining capacity;
best_fit_decreasing finds the tightest pack through a segment tree over capacity values (which buckets of
packs are non-empty). Both loops are compiled with numba: the same loops in Python take minutes for 10M items.
"""

from __future__ import annotations

import numba
import numpy as np

STRATEGIES = ("first_fit", "first_fit_decreasing", "best_fit_decreasing")


@numba.njit(cache=True)
def _first_fit(order: np.ndarray, lengths: np.ndarray, capacity: int) -> np.ndarray:
    n = len(order)
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = np.full(2 * size, capacity, np.int64)  # leaves: remaining room of pack slots (unopened = capacity)
    assigned = np.empty(n, np.int64)
    for k in range(n):
        item = order[k]
        need = lengths[item]
        node = 1
        while node < size:  # descend to the leftmost leaf with room >= need
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        assigned[item] = node - size
        tree[node] -= need
        node //= 2
        while node >= 1:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return assigned


@numba.njit(cache=True)
def _best_fit(order: np.ndarray, lengths: np.ndarray, capacity: int) -> np.ndarray:
    n = len(order)
    size = 1
    while size < capacity + 1:
        size *= 2
    nonempty = np.zeros(2 * size, np.int64)  # leaf r: number of open packs with exactly r remaining
    head = np.full(capacity + 1, -1, np.int64)  # packs with r remaining, as linked lists
    nxt = np.full(max(n, 1), -1, np.int64)
    room = np.zeros(max(n, 1), np.int64)
    assigned = np.empty(n, np.int64)
    opened = 0
    for k in range(n):
        item = order[k]
        need = lengths[item]
        # smallest r >= need with an open pack: walk up from leaf `need`, then down to the leftmost hit
        r = -1
        node = need + size
        if nonempty[node] > 0:
            r = need
        else:
            while node > 1:
                if node % 2 == 0 and nonempty[node + 1] > 0:
                    node = node + 1
                    while node < size:
                        node = 2 * node if nonempty[2 * node] > 0 else 2 * node + 1
                    r = node - size
                    break
                node //= 2
        if r == -1:
            pack = opened
            opened += 1
            room[pack] = capacity
        else:
            pack = head[r]
            head[r] = nxt[pack]
            node = r + size
            while node >= 1:
                nonempty[node] -= 1
                node //= 2
        assigned[item] = pack
        room[pack] -= need
        left = room[pack]
        nxt[pack] = head[left]
        head[left] = pack
        node = left + size
        while node >= 1:
            nonempty[node] += 1
            node //= 2
    return assigned


def assign_packs(lengths: np.ndarray, capacity: int, strategy: str, seed: int = 0) -> np.ndarray:
    """Pack index of every item (numbered by first use in the packing order)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"every length must be in 1..{capacity}; got {lengths.min()}..{lengths.max()}")
    if strategy == "first_fit":
        order = np.random.default_rng(seed).permutation(len(lengths))
    else:  # decreasing length; ties by position, so the result is deterministic
        order = np.lexsort((np.arange(len(lengths)), -lengths))
    solver = _best_fit if strategy == "best_fit_decreasing" else _first_fit
    return solver(order.astype(np.int64), lengths, int(capacity))


def pack_lengths(lengths, capacity: int, strategy: str = "first_fit_decreasing", seed: int = 0) -> list[list[int]]:
    """Indices of ``lengths`` grouped into packs whose lengths sum to at most ``capacity``."""
    assigned = assign_packs(np.asarray(lengths), capacity, strategy, seed)
    order = np.argsort(assigned, kind="stable")
    bounds = np.flatnonzero(np.diff(assigned[order])) + 1
    return [group.tolist() for group in np.split(order, bounds)] if len(order) else []
