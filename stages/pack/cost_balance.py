"""Packs of equal compute, not only equal tokens: swap samples between packs until their estimated FLOPs agree.

With one pack per data-parallel rank per step, the step waits for the heaviest pack; two full packs can differ
by 2x in compute (a pack of images runs the vision tower on every patch, a pack of long samples pays attention on
the square of each length). `balance_costs` improves a packing in rounds: the packs sorted by cost, the k-th
cheapest paired with a dearer half's pack (the pairing rotates each round, so a pair that cannot trade meets
others), and in each pair the one move (a sample from the dear pack to the cheap one) or swap (one sample each
way) that brings their costs closest together, if it does, keeping both packs within the capacity and none
empty; until the spread is negligible or a round narrows it by under 1%. No pack is added or removed, so the
token efficiency is the packing's own.

It needs packs with room to exchange unequal lengths: first_fit (a random order) leaves it, and on the GPU
benchmark's mix (966 packs of 16k tokens) the dearest pack over the mean falls from 1.105 to 1.0002 and the
straggler ratio at one pack a rank on 8 ranks from 1.049 to 1.000 (benchmarks/balance_bench.py). The decreasing
strategies fill packs with samples of similar length to within a few tokens, so no exchange fits (measured:
1.114 -> 1.112, also with 1% of slack and with 2-for-1 swaps); the schema refuses that pairing.
"""

from __future__ import annotations

import numba
import numpy as np

MAX_ROUNDS = 64
SPREAD_GOAL = 1e-4  # stop once (dearest - cheapest) / mean is below this: no rank waits measurably
MIN_GAIN = 0.01  # or once a round narrows the packs' squared cost deviation by under 1%: what is left is
# typically a few samples that outweigh the mean pack alone (a long video), which no exchange can fix


@numba.njit(cache=True)
def _balance(assigned: np.ndarray, lengths: np.ndarray, costs: np.ndarray, capacity: int) -> np.ndarray:
    n = len(assigned)
    packs = assigned.max() + 1
    fill = np.zeros(packs, np.int64)
    for i in range(n):
        fill[assigned[i]] += 1
    width = fill.max() + 16  # room for 16 samples more than the fullest pack (a move past that is not made)
    members = np.full((packs, width), -1, np.int64)
    tokens = np.zeros(packs, np.int64)
    cost = np.zeros(packs, np.float64)
    fill[:] = 0
    for i in range(n):
        p = assigned[i]
        members[p, fill[p]] = i
        fill[p] += 1
        tokens[p] += lengths[i]
        cost[p] += costs[i]
    mean = cost.sum() / packs
    deviation = np.inf  # the sum of squared deviations from the mean: every exchange lowers it
    for rnd in range(MAX_ROUNDS):
        order = np.argsort(cost, kind="mergesort")
        now = ((cost - mean) ** 2).sum()
        if mean <= 0 or (cost[order[-1]] - cost[order[0]]) / mean < SPREAD_GOAL or now > (1 - MIN_GAIN) * deviation:
            break
        deviation = now
        half = packs // 2
        for k in range(half):  # pairs rotate each round, so a pair that cannot trade meets other partners
            cheap, dear = order[k], order[packs - 1 - (k + rnd) % half]
            gap = cost[dear] - cost[cheap]
            best, give, take = gap, -1, -1  # best: the pair's gap after the exchange
            for a in range(fill[dear]):
                x = members[dear, a]
                if fill[dear] > 1 and fill[cheap] < width and tokens[cheap] + lengths[x] <= capacity:
                    after = abs(gap - 2 * costs[x])
                    if after < best:
                        best, give, take = after, a, -1
                for b in range(fill[cheap]):
                    y = members[cheap, b]
                    shift = lengths[x] - lengths[y]
                    if tokens[cheap] + shift <= capacity and tokens[dear] - shift <= capacity:
                        after = abs(gap - 2 * (costs[x] - costs[y]))
                        if after < best:
                            best, give, take = after, a, b
            if give < 0:
                continue
            x = members[dear, give]
            if take < 0:  # move x
                fill[dear] -= 1
                members[dear, give] = members[dear, fill[dear]]
                members[cheap, fill[cheap]] = x
                fill[cheap] += 1
                dl, dc = lengths[x], costs[x]
            else:  # swap x and y
                y = members[cheap, take]
                members[dear, give], members[cheap, take] = y, x
                assigned[y] = dear
                dl, dc = lengths[x] - lengths[y], costs[x] - costs[y]
            assigned[x] = cheap
            tokens[dear] -= dl
            tokens[cheap] += dl
            cost[dear] -= dc
            cost[cheap] += dc
    return assigned


def balance_costs(assigned: np.ndarray, lengths: np.ndarray, costs: np.ndarray, capacity: int) -> np.ndarray:
    """A new pack index for every item (same packs, same count, each within ``capacity``) with the packs' summed
    ``costs`` as equal as moves and swaps make them; deterministic."""
    if len(assigned) == 0:
        return assigned.copy()
    return _balance(
        np.asarray(assigned, np.int64).copy(),
        np.asarray(lengths, np.int64),
        np.asarray(costs, np.float64),
        int(capacity),
    )
