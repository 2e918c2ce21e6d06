"""Cost-balanced packing (stages/pack/cost_balance.py): samples exchanged between packs until the packs' estimated
FLOPs agree, without changing the packs' count, capacity or the samples they hold between them."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.errors import ConfigError
from schemas.params import parse_params
from stages.pack.algorithms import assign_packs
from stages.pack.cost_balance import balance_costs


def pack_sums(assigned: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.bincount(assigned, weights=values, minlength=int(assigned.max()) + 1)


items = st.integers(20, 400).flatmap(
    lambda cap: st.tuples(
        st.lists(st.tuples(st.integers(1, cap), st.floats(0.1, 10.0)), min_size=1, max_size=300), st.just(cap)
    )
)


@settings(max_examples=120, deadline=None)
@given(items, st.integers(0, 2**31))
def test_balance_keeps_the_packs_and_never_widens_their_cost_range(data, seed):
    pairs, capacity = data
    lengths = np.array([n for n, _ in pairs], np.int64)
    costs = np.array([n * density for n, density in pairs])
    before = assign_packs(lengths, capacity, "first_fit", seed)
    after = balance_costs(before, lengths, costs, capacity)
    assert after.shape == before.shape  # every sample in exactly one pack
    assert sorted(set(after.tolist())) == sorted(set(before.tolist()))  # the same packs, none emptied
    assert pack_sums(after, lengths).max() <= capacity
    was, now = pack_sums(before, costs), pack_sums(after, costs)
    assert now.max() <= was.max() * (1 + 1e-9) and now.min() >= was.min() * (1 - 1e-9)
    assert np.array_equal(balance_costs(before, lengths, costs, capacity), after)  # deterministic


def test_image_and_text_samples_are_spread_until_the_pack_costs_agree():
    """Image samples cost 3x a text token's FLOPs (the vision tower): first_fit leaves packs 20% apart; balanced,
    within 1% of the mean."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 600, 4000)
    costs = lengths * np.where(rng.random(4000) < 0.4, 3.0, 1.0)
    before = assign_packs(lengths, 4096, "first_fit", 1)
    after = balance_costs(before, lengths, costs, 4096)
    was, now = pack_sums(before, costs), pack_sums(after, costs)
    assert was.max() / was.mean() > 1.2
    assert now.max() / now.mean() < 1.02
    assert pack_sums(after, lengths).max() <= 4096


def test_empty_input_is_returned_as_is():
    assert balance_costs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), 10).size == 0


def test_cost_balance_with_a_decreasing_strategy_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="packing_cost_balance needs packing_strategy first_fit"):
        parse_params({"dataset_config": {"packing_strategy": "best_fit_decreasing", "packing_cost_balance": True}})
    default = parse_params({"dataset_config": {"packing_strategy": "first_fit_decreasing"}}).dataset_config
    assert not default.balances_cost  # the default follows the strategy
    assert parse_params({"dataset_config": {"packing_strategy": "first_fit"}}).dataset_config.balances_cost
