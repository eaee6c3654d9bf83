"""Trials that run to the answer: the early stops are functions of the stored curve, and a run obeys them."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from tuner.core.status import STOPPED_COLLAPSED, STOPPED_HOPELESS
from tuner.engine.stopping import MIN_EVALUATIONS, MIN_SHARE, StopRules, collapsed, hopeless, utility_drop

TOL = 0.1


def judged(steps, gaps, horizon, tol=TOL):
    """The rule on every prefix of a curve, as a running trial applies it: the first step it stops at."""
    for n in range(1, len(steps) + 1):
        if hopeless(steps[:n], gaps[:n], horizon, tol):
            return steps[n - 1]
    return None


@st.composite
def slowing_curves(draw):
    """A forget gap rising at a steady or slowing pace from far below the band, evaluated every `every` steps,
    that reaches the band by the horizon."""
    every = draw(st.integers(1, 8))
    n = draw(st.integers(MIN_EVALUATIONS + 1, 30))
    rises = sorted(draw(st.lists(st.floats(0.0, 0.5), min_size=n, max_size=n)), reverse=True)
    steps = [every * (i + 1) for i in range(n)]
    start = draw(st.floats(-5.0, -0.5))
    gaps = [start + sum(rises[:i + 1]) for i in range(n)]
    final = draw(st.floats(-TOL / 2, 1.0))  # where the gap is at the horizon: in the band, or past it
    shift = final - gaps[-1]
    return steps, [g + shift for g in gaps]


@settings(max_examples=300, deadline=None)
@given(slowing_curves())
def test_a_curve_that_reaches_the_band_by_its_horizon_at_a_steady_or_slowing_pace_is_never_hopeless(curve):
    steps, gaps = curve
    assert judged(steps, gaps, horizon=steps[-1]) is None


@settings(max_examples=200, deadline=None)
@given(st.integers(10, 400), st.integers(1, 10), st.floats(-5.0, -2.5 * TOL), st.floats(-1e-4, 0.0))
def test_a_flat_curve_far_from_the_band_is_hopeless_once_the_minimum_share_is_run(horizon, every, level, drift):
    steps = list(range(every, horizon + 1, every))
    gaps = [level + drift * s for s in steps]
    stop = judged(steps, gaps, horizon)
    eligible = [s for i, s in enumerate(steps) if i + 1 >= MIN_EVALUATIONS and MIN_SHARE * horizon <= s < horizon]
    assert stop == (eligible[0] if eligible else None)


def test_the_rule_waits_for_enough_evaluations_and_stops_once_the_band_was_reached():
    assert hopeless([30, 40], [-1.0, -1.0], 100, TOL) is None  # two evaluations: no pace yet
    assert hopeless([5, 15, 25], [-1.0, -1.0, -1.0], 100, TOL) is None  # under 30 % of the horizon
    why = hopeless([20, 30, 40], [-1.0, -1.0, -1.0], 100, TOL)
    assert why and "step 40" in why and "horizon (step 100)" in why
    # in the band once (and out again): the trial has its candidate, it is not hopeless
    assert hopeless([20, 30, 40, 50], [-1.0, -0.05, -1.0, -1.0], 100, TOL) is None
    # rising fast enough: 0.3 per 10 steps reaches the band well before step 100
    assert hopeless([20, 30, 40], [-1.6, -1.3, -1.0], 100, TOL) is None
    # flat just outside the band: within the margin, the trial goes on
    assert hopeless([20, 30, 40], [-0.15, -0.15, -0.15], 100, TOL) is None
    # rising, but at twice that pace still short
    assert hopeless([20, 30, 40], [-3.02, -3.01, -3.0], 100, TOL)
    # step 0 takes no part in the pace: the drop from the original is the warmup's business
    assert hopeless([0, 20, 30, 40], [-9.0, -1.0, -1.0, -1.0], 100, TOL) == why


def test_a_missing_utility_figure_neither_continues_nor_breaks_a_collapse():
    start = {"step": 0, "retain_nll": 2.0}
    over, under, unmeasured = 2.0 + 0.6, 2.0 + 0.2, None

    def curve(*drops):
        return [start, *({"step": 10 * (i + 1), **({"retain_nll": d} if d is not None else {})}
                         for i, d in enumerate(drops))]

    assert collapsed(curve(over, unmeasured, over), 0.5)  # consecutive among the points that measured it
    assert collapsed(curve(over, under, over), 0.5) is None
    assert collapsed(curve(over, unmeasured), 0.5) is None  # once is not twice
    assert collapsed(curve(under, over, unmeasured, unmeasured), 0.5) is None
    why = collapsed(curve(under, over, over), 0.5)
    assert "step 20" in why and "step 30" in why and "+0.600" in why
    assert utility_drop({"general_nll": 3.5}, {"general_nll": 3.0}) == 0.5  # no retain set: general
    assert utility_drop({"forget_nll": 3.5}, start) is None


def test_stop_rules_are_off_without_a_tolerance_and_silent_at_the_horizon():
    flat = [{"step": 0, "forget_gap": -1.0, "retain_nll": 2.0}] + [
        {"step": s, "forget_gap": -1.0, "retain_nll": 3.0} for s in (10, 20, 30, 40)]
    assert StopRules(100).check(flat) is None
    assert StopRules(100, gap_tolerance=TOL).check(flat).status == STOPPED_HOPELESS
    assert StopRules(100, gap_tolerance=TOL, utility_tolerance=0.5).check(flat).status == STOPPED_COLLAPSED
    assert StopRules(40, gap_tolerance=TOL, utility_tolerance=0.5).check(flat) is None


# ---- runs on the micro testbed ----------------------------------------------------------------------------------

def measured_drops(result):
    start = result.curve[0]
    return [(p["step"], d) for p in result.curve[1:] if (d := utility_drop(p, start)) is not None]


def test_a_run_whose_utility_collapses_twice_in_a_row_stops_and_says_why(unlearn):
    result = unlearn(method="ga", params={"lr": 3e-3, "epochs": 4}, batch_size=32, eval_every=2,
                     eval_utility_every=2, stop_at_target=False, utility_tolerance=0.05, seed=1)
    assert result.status == STOPPED_COLLAPSED and result.steps_done < result.planned_steps
    drops = measured_drops(result)
    assert [s for s, _ in drops] == [p["step"] for p in result.curve[2::2]]  # every other point measured it
    assert drops[-1][0] == result.steps_done and all(d > 0.05 for _, d in drops[-2:])
    assert not any(a > 0.05 and b > 0.05 for (_, a), (_, b) in itertools.pairwise(drops[:-1]))
    assert "utility collapsed" in result.reason and f"step {result.steps_done}" in result.reason
    assert result.metrics is not None  # its kept checkpoint was measured in full


def test_a_run_that_cannot_reach_the_band_stops_hopeless_after_the_minimum_share(unlearn):
    slow = dict(method="ga", params={"lr": 1e-6, "epochs": 4}, batch_size=32, eval_every=4, eval_utility_every=100,
                eval_batch_size=64, gap_tolerance=TOL, utility_tolerance=0.5)
    result = unlearn(**slow)
    assert result.status == STOPPED_HOPELESS and result.metrics is not None
    assert MIN_SHARE * result.planned_steps <= result.steps_done < result.planned_steps
    assert result.steps_done - 4 < MIN_SHARE * result.planned_steps  # at the first evaluation it may judge
    assert result.reason.startswith(f"hopeless at step {result.steps_done}")
    off = unlearn(**slow, prune_hopeless=False)
    assert off.status == "completed" and off.steps_done == off.planned_steps
    again = unlearn(**slow, end_step=off.planned_steps, checkpoint="last", stop_at_target=False)
    assert again.steps_done == off.planned_steps  # reproducing a checkpoint runs to it


def test_an_early_stopped_trial_is_told_to_optuna_as_complete_with_its_kept_checkpoints_objectives(micro_spec):
    """A stopped trial is a measurement of its setting (its kept checkpoint's), so it is told as COMPLETE with
    those objectives (a pruned trial would carry none); a diverged one as FAIL."""
    import optuna
    from optuna.trial import TrialState

    from tuner.study.report import TrialReport
    from tuner.study.search import SearchSpaceFn, UnitSearch, open_study
    from tuner.study.spec import StudySpec

    spec = StudySpec.model_validate(micro_spec())
    study = open_study(optuna.storages.InMemoryStorage(), "u", optuna.samplers.RandomSampler(seed=0),
                       ["forget_gap", "utility_drop"])
    search = UnitSearch(study, SearchSpaceFn(spec, "ga_gd"), ["forget_gap", "utility_drop"], retries=0)
    for status in (STOPPED_HOPELESS, STOPPED_COLLAPSED, "diverged"):
        search.suggest(status)
        search.complete(status, TrialReport(status, {}, {"forget_gap": 0.6, "utility_drop": 0.1}), error=False)
    states = [(t.state, t.values) for t in study.get_trials()]
    assert states == [(TrialState.COMPLETE, [0.6, 0.1])] * 2 + [(TrialState.FAIL, None)]


def test_a_hopeless_trial_keeps_its_reason_in_the_store_and_on_the_dashboard(unlearn, store_file):
    """A run whose lr barely moves the forget gap is stopped as hopeless; the reason the rule gave is what the
    store keeps with the trial and what the dashboard's trial table shows for it."""
    from dashboards.data import load_study, table_rows
    from tuner.core.status import STOPPED_HOPELESS
    from tuner.store import Store

    result = unlearn(method="ga_gd", lr=1e-7, max_steps=40, eval_every=2, stop_at_target=True, gap_tolerance=0.1)
    assert result.status == STOPPED_HOPELESS and result.reason and result.steps_done < 40
    store = Store(store_file)
    study = store.create_study("slow", "testbed:micro", 0, {"objectives": ["forget_gap", "utility_drop"]}, "", {})
    search = store.ensure_search(study, "ga_gd@in_distribution", "ga_gd", "in_distribution", "slow/ga_gd", "tpe", 1,
                                 {})
    row = store.start_trial(search, {"lr": 1e-7})
    store.finish_trial(row, result.status, None, result.to_dict())
    stored = store.trials("slow")[0]
    assert stored["status"] == STOPPED_HOPELESS and stored["error"] == result.reason
    shown = table_rows(load_study(store, "slow"))[0]
    assert shown["status"] == STOPPED_HOPELESS and shown["error"] == result.reason
