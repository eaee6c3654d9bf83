"""What a new search runs first: the calibration's guideline points, then (TPE) settings spread over the
ranges by a scrambled Sobol sequence instead of random draws that can land side by side."""

from __future__ import annotations

import math

import optuna
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuner.core.hparams import EPOCHS, LR
from tuner.study.search import SearchSpaceFn, first_settings, startup_trials, unit_search
from tuner.study.spec import StudySpec

LOW, HIGH = 1e-5, 3e-4


def spec_of(micro_spec, **fields) -> StudySpec:
    return StudySpec.model_validate(micro_spec(**{"sampler": {"name": "tpe"}, "budget": {"trials": 9},
                                                  "search": {"lr": {"low": LOW, "high": HIGH, "log": True},
                                                             "epochs": {"low": 1, "high": 3}}, **fields}))


def unit_position(lr: float) -> float:
    return math.log(lr / LOW) / math.log(HIGH / LOW)


def test_the_start_spreads_over_the_range(micro_spec):
    """Four starting settings fall in four different quarters of the (log) lr axis, and every epoch value of
    the range is tried: no two near-identical draws."""
    space = SearchSpaceFn(spec_of(micro_spec), "ga_gd")
    points = space.spread(4, seed=0)
    assert len(points) == 4
    assert sorted(math.floor(4 * unit_position(p["lr"])) for p in points) == [0, 1, 2, 3]
    assert all(LOW <= p["lr"] <= HIGH and p["epochs"] in (1, 2, 3) for p in points)
    assert {p["epochs"] for p in points} == {1, 2, 3}
    assert space.spread(4, seed=0) == points and space.spread(4, seed=1) != points  # seeded


GUIDELINE = [{"lr": 5e-5, "epochs": 3}, {"lr": 7.5e-5, "epochs": 2}, {"lr": 1.5e-4, "epochs": 1}]


def test_guideline_points_come_first_then_the_spread_within_the_budget(micro_spec):
    spec = spec_of(micro_spec)
    space = SearchSpaceFn(spec, "ga_gd")
    first = first_settings(spec, space, GUIDELINE, budget=9)
    assert first[:3] == GUIDELINE
    assert len(first) == startup_trials(spec.sampler, 9) == 3  # the warm-up is the guideline points here
    assert first_settings(spec, space, [], budget=9) == space.spread(3, spec.seed)
    assert first_settings(spec, space, GUIDELINE, budget=2) == first[:2]  # never more than the trials to run
    # a point whose lr or epochs fall outside the searched ranges is left out, and the spread takes its place
    outside = [{"lr": 1e-2, "epochs": 1}, {"lr": 5e-5, "epochs": 5}, GUIDELINE[0]]
    assert first_settings(spec, space, outside, budget=9) == [GUIDELINE[0], *space.spread(2, spec.seed)]
    random = spec_of(micro_spec, sampler={"name": "random"})
    assert first_settings(random, SearchSpaceFn(random, "ga_gd"), [], budget=9) == []


def test_a_new_search_asks_the_queued_settings_first_and_a_resumed_one_queues_none(micro_spec):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = spec_of(micro_spec, budget={"trials": 12})  # warm-up of 4 trials: 3 guideline points and 1 spread
    storage = optuna.storages.InMemoryStorage()
    search = unit_search(spec, "ga_gd", "unit", storage, guideline=GUIDELINE)
    asked = [search.suggest(str(i)) for i in range(4)]
    assert [(a["lr"], a["epochs"]) for a in asked[:3]] == [(p["lr"], p["epochs"]) for p in GUIDELINE]
    assert asked[3] == SearchSpaceFn(spec, "ga_gd").spread(1, spec.seed)[0]
    again = unit_search(spec, "ga_gd", "unit", storage, guideline=GUIDELINE)
    waiting = again.study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert waiting == []


@given(u=st.floats(0.0, 1.0, exclude_max=True), low=st.floats(1e-7, 1e-3), ratio=st.floats(1.0, 1e4))
def test_a_position_on_the_axis_is_a_value_in_the_range(u, low, ratio):
    high = low * ratio
    assert low * (1 - 1e-9) <= LR.at(u, low, high, True) <= high * (1 + 1e-9)
    assert low - 1e-12 <= LR.at(u, low, high, False) <= high + 1e-12


@pytest.mark.parametrize(("low", "high"), [(1, 1), (1, 3), (2, 7)])
def test_evenly_spread_positions_use_every_whole_value_evenly(low, high):
    n = high - low + 1
    values = [EPOCHS.at((i + 0.5) / (4 * n), low, high, False) for i in range(4 * n)]
    assert {v: values.count(v) for v in set(values)} == {v: 4 for v in range(low, high + 1)}


def test_the_gp_sampler_searches_with_the_studys_objectives_and_constraints(micro_spec):
    """`sampler: gp` (Optuna's GPSampler): the spread warm-up, then modelled suggestions inside the ranges, with
    trials told two objectives and a constraint as a study tells them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = spec_of(micro_spec, sampler={"name": "gp", "n_startup_trials": 3}, budget={"trials": 6})
    search = unit_search(spec, "ga_gd", "gp", optuna.storages.InMemoryStorage())
    assert isinstance(search.study.sampler, optuna.samplers.GPSampler)
    for i in range(6):
        setting = search.suggest(str(i))
        assert LOW <= setting["lr"] <= HIGH and setting["epochs"] in (1, 2, 3)
        trial = search.running.pop(str(i))
        gap = abs(math.log10(setting["lr"]) + 4.0)
        trial.set_constraint("utility", setting["epochs"] - 2.5)
        search.study.tell(trial, [gap, float(setting["epochs"])])
    assert [t.params for t in search.study.trials[:3]] == SearchSpaceFn(spec, "ga_gd").spread(3, spec.seed)
    assert len(search.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 6
