"""Nothing is recommended on what was not measured: generated candidate sets (hypothesis) and the cases that
were wrong before (a mid-run point without utility or MIA ranked as if it had none to lose)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from tuner.core.metrics import BAND
from tuner.results.candidates import CONFIRMATION, candidates
from tuner.results.recommend import recommend, recommend_unit
from tuner.results.target import Target

TARGET = Target(gap_tolerance=0.1, utility_tolerance=0.5, mia_tolerance=0.1, confirmations=3).rule()


def candidate(i, step, gap, drop, mia=None, measured="full", lr=1e-3, selected=None):
    metrics = {"forget_gap": gap}
    if drop is not None:
        metrics["utility_drop"] = drop
    if mia is not None:
        metrics["mia_auc"] = mia
    return {"id": i, "number": i, "unit": "ga_gd", "status": "completed", "params": {"lr": lr, "epochs": 2},
            "step": step, "selected": measured == "full" if selected is None else selected,
            "measured": measured, "metrics": metrics}


def test_a_mid_run_point_without_utility_is_not_ranked_as_undamaged():
    """The issue's case: the true drop of the unmeasured step was 0.6, the measured one's 0.3."""
    rows = [candidate(1, 10, 0.02, 0.3), candidate(1, 6, 0.01, None, measured="estimate")]
    rec = recommend_unit(rows, TARGET, band=())
    assert rec["status"] == "recommended" and rec["step"] == 10 and rec["metrics"]["utility_drop"] == 0.3
    assert rec["confirm"] == [{"trial_id": 1, "step": 6, "missing": ["utility_drop"], "estimated": []}]


def test_an_estimate_that_would_win_is_confirmed_before_it_is_recommended():
    rows = [candidate(1, 10, 0.02, 0.3), candidate(1, 6, 0.01, 0.1, measured="estimate")]
    rec = recommend_unit(rows, TARGET, band=())
    assert rec["step"] == 10 and [c["step"] for c in rec["confirm"]] == [6]
    # the confirmation measured 0.6: the full measurement at step 10 stays the pick, nothing more to confirm
    confirmed = [candidate(1, 10, 0.02, 0.3), candidate(1, 6, 0.01, 0.6, measured="confirmed")]
    rec = recommend_unit(confirmed, TARGET, band=())
    assert rec["step"] == 10 and rec["confirm"] == []
    # had it measured 0.05, the confirmed step wins and says how it was measured
    better = [candidate(1, 10, 0.02, 0.3), candidate(1, 6, 0.01, 0.05, measured="confirmed")]
    rec = recommend_unit(better, TARGET, band=())
    assert rec["step"] == 6 and rec["measured"] == "confirmed" and "re-running" in rec["reason"]


def test_the_mia_tolerance_applies_to_mid_run_candidates_too():
    rows = [candidate(1, 10, 0.02, 0.3, mia=0.55), candidate(2, 4, 0.0, 0.0, measured="estimate", lr=2e-3)]
    rec = recommend_unit(rows, TARGET, band=("mia_auc",))
    assert rec["trial_id"] == 1 and rec["confirm"][0]["missing"] == ["mia_auc"]
    failing = [candidate(1, 10, 0.02, 0.3, mia=0.55), candidate(2, 4, 0.0, 0.0, mia=0.9, measured="confirmed")]
    assert recommend_unit(failing, TARGET, band=("mia_auc",))["trial_id"] == 1


def test_without_budget_estimates_are_left_out_and_the_reason_is_shown():
    rows = [candidate(1, 6, 0.01, 0.1, measured="estimate")]
    rec = recommend_unit(rows, {**TARGET, "confirmations": 0}, band=())
    assert rec["trial_id"] is None and rec["status"] == "none"
    assert any("confirmation budget (0" in w for w in rec["warnings"])
    spent = rows + [candidate(2, 3, 0.5, 0.1, measured="confirmed", lr=3e-3)] * 3
    assert recommend_unit(spent, TARGET, band=())["confirm"] == []
    waiting = recommend_unit(rows, TARGET, band=())
    assert waiting["status"] == "to_confirm" and waiting["trial_id"] is None and waiting["confirm"]


def test_candidates_read_a_confirmation_as_the_full_measurement():
    row = {"id": 7, "number": 0, "unit": "ga_gd", "status": "completed", "params": {"lr": 1e-3, "epochs": 2},
           "metrics": {"forget_gap": 0.3, "utility_drop": 0.4, "mia_auc": 0.5}, "objectives": {},
           "result": {"selected_step": 9, "config": {"eval_utility_blocks": 4}}}
    curve = {7: [{"step": 0, "forget_gap": -1.0, "retain_nll": 2.0}, {"step": 3, "forget_gap": -0.5},
                 {"step": 6, "forget_gap": 0.01, "retain_nll": 2.1}, {"step": 9, "forget_gap": 0.3}]}
    cands = {c["step"]: c for c in candidates([row], curve, ["forget_gap", "utility_drop"])}
    assert cands[3]["measured"] == "estimate" and "utility_drop" not in cands[3]["metrics"]
    assert cands[6]["estimated"] == ["retain_nll", "utility_drop"]
    assert math.isclose(cands[6]["metrics"]["utility_drop"], 0.1)
    checks = {(7, 6): {"metrics": {"forget_gap": 0.012, "utility_drop": 0.2, "mia_auc": 0.51, "retain_nll": 2.2},
                       "details": {CONFIRMATION: {"status": "completed"}}}}
    cands = {c["step"]: c for c in candidates([row], curve, ["forget_gap", "utility_drop"], checks)}
    assert cands[6]["measured"] == "confirmed" and cands[6]["metrics"]["utility_drop"] == 0.2
    assert math.isclose(cands[6]["estimate"]["utility_drop"], 0.1)
    failed = {(7, 6): {"metrics": {}, "details": {CONFIRMATION: {"status": "diverged", "reason": "nan"}}}}
    cands = {c["step"]: c for c in candidates([row], curve, ["forget_gap"], failed)}
    assert cands[6]["measured"] == "unconfirmed"
    assert recommend_unit(list(cands.values()), TARGET, band=())["step"] != 6


# --- generated candidate sets ------------------------------------------------------------------------------

maybe = st.one_of(st.none(), st.floats(-2.0, 2.0, allow_nan=False))
share = st.one_of(st.none(), st.floats(0.0, 1.0))
metrics = st.fixed_dictionaries({"forget_gap": maybe, "utility_drop": maybe, "mia_auc": share,
                                 "privleak": st.one_of(st.none(), st.floats(-100.0, 100.0)),
                                 "forget_em": share, "unseen_em": share})


@st.composite
def studies(draw):
    rows = []
    for i in range(draw(st.integers(1, 6))):
        lr = draw(st.floats(1e-5, 1e-2))
        selected = draw(metrics.filter(lambda m: m["forget_gap"] is not None))
        status = draw(st.sampled_from(["completed", "stopped_at_target", "stopped_hopeless", "stopped_collapsed",
                                       "diverged"]))
        base = {"id": i, "number": i, "unit": draw(st.sampled_from(["a", "b"])), "params": {"lr": lr, "epochs": 1}}
        rows.append({**base, "status": status, "step": 10, "selected": True, "measured": "full",
                     "metrics": selected if status != "diverged" else {}})
        if status == "diverged":
            continue
        for step in range(1, draw(st.integers(0, 3)) + 1):
            point = draw(metrics.filter(lambda m: m["forget_gap"] is not None))
            how = draw(st.sampled_from(["estimate", "confirmed", "unconfirmed"]))
            rows.append({**base, "status": status, "step": step, "selected": False, "measured": how,
                         "metrics": {k: v for k, v in point.items() if v is not None}})
        rows[-1]["metrics"] = {k: v for k, v in rows[-1]["metrics"].items() if v is not None}
    return rows


@settings(max_examples=300, deadline=None)
@given(studies(), st.sets(st.sampled_from(BAND)), st.one_of(st.none(), st.floats(0.0, 0.3)), st.integers(0, 3))
def test_a_recommendation_is_measured_in_full_and_within_every_tolerance(rows, band, em_tolerance, budget):
    """Whatever the band (MIA AUC, privleak) and the memorisation limit, a pick has every figure they need,
    measured, and within its tolerance."""
    target = {**TARGET, "confirmations": budget, "em_tolerance": em_tolerance}
    band = tuple(sorted(band))
    rec = recommend(rows, target, band)
    picked = {(r["id"], r["step"]): r for r in rows}
    for unit, pick in [*rec["units"].items(), (None, rec["overall"])]:
        if pick["status"] != "recommended":
            assert pick.get("trial_id") is None or pick["status"] == "closest", pick
            continue
        row = picked[(pick["trial_id"], pick["step"])]
        assert row["measured"] in ("full", "confirmed"), (unit, row)
        m = row["metrics"]
        assert m.get("forget_gap") is not None and abs(m["forget_gap"]) <= target["gap_tolerance"]
        assert m.get("utility_drop") is not None and m["utility_drop"] <= target["utility_tolerance"]
        if "mia_auc" in band:
            assert m.get("mia_auc") is not None and abs(m["mia_auc"] - 0.5) <= target["mia_tolerance"]
        if "privleak" in band:
            assert m.get("privleak") is not None and abs(m["privleak"]) <= target["privleak_tolerance"]
        if em_tolerance is not None:  # no exact retrain here: the target is the candidate's own unseen EM
            assert m.get("forget_em") is not None and m.get("unseen_em") is not None
            assert m["forget_em"] <= m["unseen_em"] + em_tolerance
        for name, value in pick["metrics"].items():
            assert value is None or value == m.get(name), name  # every figure shown is the candidate's own
    for pick in rec["units"].values():
        for job in pick.get("confirm") or []:
            assert picked[(job["trial_id"], job["step"])]["measured"] == "estimate"
    if rec["overall"]["status"] == "none":
        assert all(p["status"] != "recommended" for p in rec["units"].values())


def test_an_early_stopped_trials_checkpoints_are_candidates_like_a_completed_ones():
    """A trial stopped as hopeless kept a checkpoint measured in full: it and its curve points are candidates,
    ranked and named like any other; one stopped for collapsed utility is not recommended for its utility."""
    from tuner.results.pareto import front_members
    from tuner.results.recommend import outcome

    def trial(i, status, gap, drop, lr):
        return {"id": i, "number": i, "unit": "ga_gd", "status": status, "params": {"lr": lr, "epochs": 2},
                "metrics": {"forget_gap": gap, "utility_drop": drop, "mia_auc": 0.5},
                "objectives": {"forget_gap": abs(gap), "utility_drop": drop}, "result": {"selected_step": 8}}

    hopeless = trial(1, "stopped_hopeless", -0.6, 0.05, 1e-5)
    collapsed = trial(2, "stopped_collapsed", 0.02, 0.9, 1e-2)
    curves = {1: [{"step": 0, "forget_gap": -1.0, "retain_nll": 2.0},
                  {"step": 4, "forget_gap": -0.8, "retain_nll": 2.01}, {"step": 8, "forget_gap": -0.6}]}
    cands = candidates([hopeless, collapsed], curves, ["forget_gap", "utility_drop"])
    assert [(c["id"], c["step"], c["measured"]) for c in cands] == [(1, 8, "full"), (1, 4, "estimate"), (2, 8, "full")]
    assert outcome(cands[0], TARGET, band=()) == "remembered"
    assert outcome(cands[2], TARGET, band=()) == "in_band"
    assert {c["id"] for c in front_members(cands, ["forget_gap", "utility_drop"])["ga_gd"]} == {1, 2}
    rec = recommend_unit(cands, TARGET, band=())
    assert rec["status"] == "closest" and rec["trial_id"] in (1, 2), rec
