"""bench/padding.py's spread of a ratio measured once per round: which way is faster, or "within noise"."""

import importlib.util

import pytest

from helpers import ROOT

spec = importlib.util.spec_from_file_location("padding_bench", ROOT / "bench" / "padding.py")
padding = importlib.util.module_from_spec(spec)
spec.loader.exec_module(padding)


def test_every_round_above_one_names_the_denominator_faster():
    s = padding.spread([1.9, 1.6, 1.7], "dense", "segments")
    assert (s["min"], s["median"], s["max"]) == (1.6, 1.7, 1.9)
    assert s["rounds"] == [1.9, 1.6, 1.7]
    assert s["verdict"] == "segments faster"


def test_every_round_below_one_names_the_numerator_faster():
    assert padding.spread([0.5, 0.54, 0.6], "dense", "segments")["verdict"] == "dense faster"


@pytest.mark.parametrize("rounds", [[0.54, 1.2, 1.77], [1.0, 1.3, 1.4], [0.8, 0.9, 1.0]])
def test_rounds_that_disagree_or_touch_one_are_within_noise(rounds):
    assert padding.spread(rounds, "dense", "segments")["verdict"] == "within noise"


def test_ratios_pair_the_rounds_of_each_way():
    """Round by round, not medians over medians: 2/1, 2/4, 6/3 (the medians alone would give 2/3)."""
    s = padding.per_round({"random": [2.0, 2.0, 6.0], "grouped": [1.0, 4.0, 3.0]}, "random", "grouped")
    assert s["rounds"] == [2.0, 0.5, 2.0]
    assert s["verdict"] == "within noise"
