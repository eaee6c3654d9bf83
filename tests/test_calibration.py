"""The learning-rate calibration before each unit's search: what it reads from a curve (hand-made curves), and a
micro study that calibrates, narrows its lr range, stores and shows the calibration, refuses a unit without a
window, and changes nothing with `calibration: false`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuner.results.calibration import GUIDELINE_SHARE, MIN_MOVE, analyse, guideline, target_lr_sum

LOW, HIGH = 1e-5, 1e-1
TOL, UTIL_TOL = 0.1, 0.5
ROOT = Path(__file__).resolve().parents[1]


def ramp_lrs(n: int, low: float = LOW, high: float = HIGH) -> list[float]:
    return [low * (high / low) ** (k / max(1, n - 1)) for k in range(n)]


def curve(gaps: list[float], drops: list[float | None], start: float = -2.0) -> list[dict]:
    """Step 0 at `start`, then one point per ramp lr with its gap and (None: not scored) utility drop."""
    lrs = ramp_lrs(len(gaps))
    points = [{"step": 0, "lr": None, "forget_gap": start, "utility_drop": 0.0}]
    for k, (gap, drop) in enumerate(zip(gaps, drops, strict=True)):
        point = {"step": 4 * (k + 1), "lr": lrs[k], "forget_gap": gap}
        if drop is not None:
            point["utility_drop"] = drop
        points.append(point)
    return points


GAPS = [-2.0, -2.0, -1.995, -1.9, -1.2, -0.05, 0.4, 1.0]
LRS = ramp_lrs(len(GAPS))


def test_move_crossing_and_collapse_are_found_and_bound_the_window():
    drops = [0.0, 0.0, 0.01, 0.02, 0.1, 0.3, 0.9, 2.0]
    found = analyse(curve(GAPS, drops), LOW, HIGH, TOL, UTIL_TOL)
    assert found.found and found.threshold == pytest.approx(MIN_MOVE)
    assert (found.move_lr, found.cross_lr, found.collapse_lr) == (LRS[3], LRS[5], LRS[6])
    # the window: from the last lr before the gap moved to the lr at which the utility collapsed
    assert (found.low, found.high) == (LRS[2], LRS[6])
    assert "lr window" in found.summary() and f"{LRS[6]:.2e}" in found.summary()


def test_a_utility_that_was_not_measured_is_not_one_that_held():
    # scored only at the 2nd, 4th and 8th points: the collapse is where it was measured, not where it was missing
    sparse = analyse(curve(GAPS, [None, 0.0, None, 0.05, None, None, None, 3.0]), LOW, HIGH, TOL, UTIL_TOL)
    assert sparse.collapse_lr == LRS[7] and sparse.high == LRS[7]
    # never above the tolerance where measured, last scored at the 5th point: the window ends there, not at the
    # range's top (a missing figure is not a drop of 0)
    unscored_top = analyse(curve(GAPS, [0.0, 0.0, 0.0, 0.1, 0.2, None, None, None]), LOW, HIGH, TOL, UTIL_TOL)
    assert unscored_top.collapse_lr is None and unscored_top.high == LRS[4] < HIGH
    every = analyse(curve(GAPS, [0.0, 0.0, 0.0, 0.1, 0.2, 0.2, 0.2, 0.2]), LOW, HIGH, TOL, UTIL_TOL)
    assert every.high == HIGH
    none = analyse(curve(GAPS, [None] * len(GAPS)), LOW, HIGH, TOL, UTIL_TOL)
    assert not none.found and none.refusal.startswith("utility never measured")


def test_no_movement_is_refused_in_one_line_naming_the_top_lr():
    found = analyse(curve([-2.0, -2.001, -1.999, -2.0, -2.0, -1.995, -2.0, -1.99], [0.0] * 8), LOW, HIGH, TOL,
                    UTIL_TOL)
    assert not found.found and found.low is None and found.high is None
    assert found.refusal == f"forget gap never moved up to lr {HIGH:.2e}"
    assert "\n" not in found.summary()


def test_a_collapse_before_the_move_or_a_divergence_leaves_no_window():
    early = analyse(curve(GAPS, [0.0, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), LOW, HIGH, TOL, UTIL_TOL)
    assert not early.found and "collapsed" in early.refusal and early.collapse_lr == LRS[1]
    # diverged between the 5th and 6th points: the divergence is the collapse
    diverged = analyse(curve(GAPS, [0.0] * 8)[:6], LOW, HIGH, TOL, UTIL_TOL, diverged_lr=LRS[5])
    assert diverged.found and diverged.collapse_lr == LRS[5] and diverged.high == LRS[5]


def test_a_drop_past_the_tolerance_that_the_ramp_recovers_from_is_no_collapse():
    # NPO on the micro testbed: the utility drop passes the tolerance where the gap reaches the band, then comes
    # back within it at higher lrs; only a drop past it for the rest of the ramp bounds the window
    recovered = analyse(curve(GAPS, [0.0, 0.0, 0.01, 0.02, 0.1, 0.8, 0.6, 0.2]), LOW, HIGH, TOL, UTIL_TOL)
    assert recovered.found and recovered.collapse_lr is None and recovered.high == HIGH
    relapsed = analyse(curve(GAPS, [0.0, 0.0, 0.01, 0.9, 0.1, 0.2, 0.8, 0.9]), LOW, HIGH, TOL, UTIL_TOL)
    assert relapsed.collapse_lr == LRS[6] and relapsed.high == LRS[6]
    # unscored points between the drops past the tolerance do not end their run
    gappy = analyse(curve(GAPS, [0.0, 0.0, 0.01, 0.02, 0.1, 0.9, None, 0.7]), LOW, HIGH, TOL, UTIL_TOL)
    assert gappy.collapse_lr == LRS[5] and gappy.high == LRS[5]


def test_noise_in_the_first_points_raises_the_move_threshold():
    noisy = [-1.9, -2.1, -1.95, -1.9, -1.2, -0.05, 0.4, 1.0]  # spread 0.2 over step 0 and the first two points
    found = analyse(curve(noisy, [0.0] * 8), LOW, HIGH, TOL, UTIL_TOL)
    assert found.threshold == pytest.approx(0.25 * (2.0 - TOL))  # capped: a move is seen before the band
    assert found.move_lr == LRS[4]


def with_sums(points: list[dict], steps_per_point: int = 4) -> list[dict]:
    """The points with the lr the ramp summed up to each: every point's lr held for the steps since the last."""
    total, out = 0.0, []
    for p in points:
        total += (p["lr"] or 0.0) * (steps_per_point if p["step"] else 0)
        out.append({**p, "lr_sum": total})
    return out


def test_guideline_points_sum_a_multiple_of_the_lr_the_ramp_summed_to_0_longest_first():
    drops = [0.0, 0.0, 0.01, 0.02, 0.1, 0.3, 0.9, 2.0]
    points = with_sums(curve(GAPS, drops))
    found = analyse(points, LOW, HIGH, TOL, UTIL_TOL)
    # the gap reached 0 between the 6th (-0.05) and the 7th ramp point (+0.4): a ninth of the way
    below, past = points[6]["lr_sum"], points[7]["lr_sum"]
    assert found.target_lr_sum == pytest.approx(below + (past - below) / 9)
    sums = {1: 10.0, 2: 20.0, 3: 30.0}  # a trial's lr multipliers summed over its steps, per epochs
    lrs = guideline(found, sums)
    assert [e for e, _ in lrs] == [3, 2, 1]
    # each trial sums, at its peak lr, the multiple of the ramp's summed lr; fewer epochs take a higher lr
    assert all(lr * sums[e] == pytest.approx(GUIDELINE_SHARE * found.target_lr_sum) for e, lr in lrs)
    assert lrs[0][1] < lrs[1][1] < lrs[2][1]


def test_no_guideline_where_the_gap_never_reached_0_or_without_a_summed_lr():
    sums = {1: 10.0, 3: 30.0}
    # moved and reached the band (-0.05), never 0
    never = analyse(with_sums(curve([-2.0, -1.9, -1.5, -1.0, -0.05], [0.0] * 5)), LOW, HIGH, TOL, UTIL_TOL)
    assert never.found and never.cross_lr is not None and guideline(never, sums) == []
    # nothing left to unlearn at step 0: no lr sum reaches it
    assert target_lr_sum({"step": 0, "forget_gap": 0.2}, [{"step": 4, "forget_gap": 0.5, "lr_sum": 1.0}]) is None
    unsummed = analyse(curve(GAPS, [0.0] * len(GAPS)), LOW, HIGH, TOL, UTIL_TOL)  # a record without lr sums
    assert unsummed.cross_lr is not None and guideline(unsummed, sums) == []
    refused = analyse(with_sums(curve([-2.0] * 5, [0.0] * 5)), LOW, HIGH, TOL, UTIL_TOL)
    assert not refused.found and guideline(refused, sums) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=1, max_size=30), st.floats(-3, -0.01))
def test_the_summed_lr_to_0_lies_between_the_points_around_the_first_that_reached_it(gaps, start):
    points = with_sums(curve(gaps, [None] * len(gaps), start))
    total = target_lr_sum(points[0], points[1:])
    first = next((k for k, p in enumerate(points) if p["step"] and p["forget_gap"] >= 0), None)
    if first is None:
        assert total is None
    else:
        assert points[first - 1]["lr_sum"] <= total <= points[first]["lr_sum"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-3, 3), st.one_of(st.none(), st.floats(-1, 5))), min_size=1, max_size=30),
       st.floats(-3, 0))
def test_a_window_lies_in_the_range_and_holds_no_measured_collapse(points, start):
    gaps, drops = [g for g, _ in points], [d for _, d in points]
    found = analyse(curve(gaps, drops, start), LOW, HIGH, TOL, UTIL_TOL)
    if not found.found:
        assert found.low is None and found.high is None and found.refusal
        return
    assert LOW <= found.low <= found.high <= HIGH and found.move_lr is not None
    measured = [(lr, d) for lr, d in zip(ramp_lrs(len(gaps)), drops, strict=True) if d is not None]
    assert found.high in [lr for lr, _ in measured]  # the window ends at a measured lr
    # every scored point past the tolerance inside the window is recovered from by a later one within it; from
    # its top on, every scored point is past the tolerance (a collapse) or the top is the last one that held
    for k, (lr, d) in enumerate(measured):
        if lr < found.high and d > UTIL_TOL:
            assert any(later <= UTIL_TOL for _, later in measured[k + 1:])
    above = [d for lr, d in measured if lr >= found.high]
    assert all(d > UTIL_TOL for d in above) if found.collapse_lr is not None else above[-1] <= UTIL_TOL


@pytest.mark.parametrize("method", ["ga_gd", "npo", "ga"])
def test_the_calibration_runs_at_the_heaviest_retain_weight_the_longest_horizon_and_the_top_lr(method):
    from tuner.study.calibration import run_params
    from tuner.study.spec import StudySpec

    spec = StudySpec(name="p", model="testbed:micro", methods=sorted({method, "ga_gd"}),
                     search={"retain_weight": {"low": 0.5, "high": 4.0}, "epochs": {"low": 1, "high": 2}})
    params = run_params(method, spec.space_for(method))
    assert params["lr"] == spec.space_for(method)["lr"].high and params["epochs"] == 2
    # descent on retained data protects utility, and a trial stops at the band: the guideline points run there
    assert params.get("retain_weight") == (None if method == "ga" else 4.0)


# ---- a micro study ----------------------------------------------------------------------------------------------

CALIBRATED = {"methods": ["ga", "ga_gd"], "budget": {"trials": 2}, "run": {"eval_every": 4},
              "search": {"lr": {"low": LOW, "high": HIGH}, "epochs": {"low": 1, "high": 2}},
              # ga's range lies far below anything that moves the forget gap: it has no window
              "per_method": {"ga": {"lr": {"low": 1e-9, "high": 1e-8}}},
              "calibration": {"enabled": True, "steps": 16, "points": 8}}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, local_ray, spec_file):
    from tuner.store import Store
    from tuner.study.orchestrator import run_study
    from tuner.study.spec import load_spec

    root = tmp_path_factory.mktemp("calibrated")
    spec, text = load_spec(spec_file(root, name="cal", **CALIBRATED))
    url = f"sqlite:///{root / 'cal.db'}"
    events: list[tuple[str, dict]] = []
    outcome = run_study(spec, text, Store(url), on_event=lambda unit, info: events.append((unit, dict(info))))
    return {"url": url, "store": Store(url), "spec": spec, "text": text, "events": events, "outcome": outcome}


def test_the_calibration_is_stored_and_narrows_the_lr_the_trials_draw(calibrated):
    store = calibrated["store"]
    found = store.calibrations("cal")
    assert set(found) == {"ga", "ga_gd@in_distribution"}
    gd = found["ga_gd@in_distribution"]
    assert gd["status"] == "window" and gd["steps"] == 16 and gd["range"] == {"low": LOW, "high": HIGH}
    window = gd["window"]
    assert LOW <= window["low"] < window["high"] <= HIGH
    assert window["low"] > LOW or window["high"] < HIGH  # narrower than the declared four decades
    ramp = [p for p in gd["points"] if p["step"]]
    assert len(ramp) == 8 and [p["lr"] for p in ramp] == sorted(p["lr"] for p in ramp)
    assert ramp[-1]["lr"] == pytest.approx(HIGH) and ramp[-1].get("utility_drop") is not None
    assert gd["finding"]["move_lr"] is not None
    rows = [r for r in store.trials("cal") if r["unit"] == "ga_gd@in_distribution"]
    assert len(rows) == 2 and all(window["low"] <= r["params"]["lr"] <= window["high"] for r in rows)
    # the guideline points inside the ranges ran first: each at the lr whose trial sums a multiple of the lr the
    # ramp summed up to gap 0
    total = gd["finding"]["target_lr_sum"]
    assert total is not None and set(gd["schedule_sums"]) == {"1", "2", "3"}
    assert all(p["lr"] * gd["schedule_sums"][str(p["epochs"])] == pytest.approx(GUIDELINE_SHARE * total)
               for p in gd["guideline"])
    inside = [p for p in gd["guideline"] if window["low"] <= p["lr"] <= window["high"] and p["epochs"] <= 2]
    assert inside, gd["guideline"]
    assert gd["params"]["retain_weight"] == 10.0  # the default range's top
    assert all(p["retain_weight"] == gd["params"]["retain_weight"] for p in inside)  # the run's other settings
    first = sorted(rows, key=lambda r: r["number"])[:len(inside)]
    assert [r["params"] for r in first] == inside
    # the Optuna distribution is the window (log scale), and the search row says what was searched
    study = optuna.load_study(study_name="cal/ga_gd@in_distribution", storage=calibrated["url"])
    dist = study.trials[0].distributions["lr"]
    assert (dist.low, dist.high, dist.log) == (window["low"], window["high"], True)
    search = next(s for s in store.study("cal").searches if s.unit == "ga_gd@in_distribution")
    assert search.space["lr"] == {"low": window["low"], "high": window["high"], "log": True}


def test_a_unit_without_a_window_is_refused_in_one_line_before_its_budget_is_spent(calibrated):
    store = calibrated["store"]
    ga = store.calibrations("cal")["ga"]
    assert ga["status"] == "no_window" and ga["window"] is None
    assert ga["summary"].startswith("forget gap never moved up to lr 1.00e-08")
    assert not [r for r in store.trials("cal") if r["unit"] == "ga"]
    notes = [info["note"] for unit, info in calibrated["events"] if unit == "ga" and info.get("note")]
    assert notes == [f"calibration: {ga['summary']}"]
    assert calibrated["outcome"].units["ga"].finished == 0


def test_study_show_prints_each_units_calibration(calibrated):
    # this checkout's command line, whichever one the environment installed
    shown = subprocess.run([sys.executable, "-m", "tuner.cli", "study", "show", "cal", "--storage", calibrated["url"]],
                           capture_output=True, text=True, timeout=180, cwd=ROOT,
                           env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"})
    assert shown.returncode == 0, shown.stderr
    found = calibrated["store"].calibrations("cal")
    assert "learning-rate calibration per search unit" in shown.stdout
    for unit, record in found.items():
        assert f"calibration of {unit}: {record['summary']}" in " ".join(shown.stdout.split())
    window = found["ga_gd@in_distribution"]["window"]
    assert f"{window['low']:.2e}..{window['high']:.2e}" in shown.stdout and "not searched" in shown.stdout
    first = found["ga_gd@in_distribution"]["guideline"][0]
    assert f"{first['epochs']}: {first['lr']:.2e}" in shown.stdout  # the guideline points it ran first
    # two trials are too few to say which hyperparameter mattered: the table says so, it shows no shares
    assert ("parameter importance of ga_gd@in_distribution: needs at least 4 finished trials (2 so far)"
            in shown.stdout)
    as_json = subprocess.run([sys.executable, "-m", "tuner.cli", "study", "show", "cal", "--json", "--storage",
                              calibrated["url"]], capture_output=True, text=True, timeout=180, cwd=ROOT,
                             env={"PATH": "/usr/bin:/bin"})
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["format"] == "unlearn-tuner/study@1" and doc["name"] == "cal"
    assert doc["calibrations"] == json.loads(json.dumps(found))
    assert [t["id"] for t in doc["trials"]] == [r["id"] for r in calibrated["store"].trials("cal")]
    assert doc["importance"]["ga_gd@in_distribution"] == {"trials": 2,
                                                          "note": "needs at least 4 finished trials (2 so far)"}


def test_the_dashboard_figure_draws_the_stored_points_band_tolerance_and_window(calibrated):
    import plotly.graph_objects as go

    from dashboards import data as D
    from dashboards import figures as F
    from dashboards.figures.calibration import calibration

    data = D.load_study(calibrated["store"], "cal")
    fig = calibration(data)
    raw = fig.to_plotly_json()
    assert go.Figure(raw).to_plotly_json() == raw and "fig-calibration" in F.all_figures(data)
    record = data.calibrations["ga_gd@in_distribution"]
    ramp = [p for p in record["points"] if p["step"]]
    by_role = {(t.meta["unit"], t.meta["role"]): t for t in fig.data}
    gap = by_role[("ga_gd@in_distribution", "forget_gap")]
    assert list(gap.x) == [p["lr"] for p in ramp] and list(gap.y) == [p["forget_gap"] for p in ramp]
    drop = by_role[("ga_gd@in_distribution", "utility_drop")]
    scored = [p for p in ramp if p.get("utility_drop") is not None]
    assert list(drop.x) == [p["lr"] for p in scored] and list(drop.y) == [p["utility_drop"] for p in scored]
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis2.type == "log"
    shapes = fig.layout.shapes
    assert any(s.yref == "y" and s.y0 == -TOL and s.y1 == TOL for s in shapes)  # the band
    assert any(s.type == "line" and s.yref == "y2" and s.y0 == UTIL_TOL for s in shapes)  # the tolerance
    window = record["window"]
    assert any(s.xref == "x" and (s.x0, s.x1) == (window["low"], window["high"]) for s in shapes)
    assert ("ga_gd@in_distribution", "move_lr") in by_role
    # each guideline point's peak lr, as a dotted line on the gap panel labelled with its epochs
    for point in record["guideline"]:
        assert any(s.line.dash == "dot" and s.x0 == s.x1 == point["lr"] and s.yref == "y domain" for s in shapes)
        assert any(a.text == f"{point['epochs']} ep" and a.x == point["lr"] for a in fig.layout.annotations)
    empty = D.StudyData(**{**data.__dict__, "calibrations": {}})
    assert "no calibration stored" in calibration(empty).layout.annotations[0].text


def test_the_json_api_serves_each_units_stored_calibration(calibrated):
    from dashboards.app import create_app

    client = create_app(calibrated["url"]).server.test_client()
    served = client.get("/api/studies/cal/calibrations").get_json()
    stored = calibrated["store"].calibrations("cal")
    assert served["study"] == "cal" and set(served["units"]) == set(stored)
    gd = served["units"]["ga_gd@in_distribution"]
    assert gd["window"] == stored["ga_gd@in_distribution"]["window"] and gd["guideline"]
    assert served["units"]["ga"]["status"] == "no_window"
    missing = client.get("/api/studies/nope/calibrations")
    assert missing.status_code == 404 and "no study named 'nope'" in missing.get_json()["error"]


def test_a_resumed_study_keeps_its_calibration(calibrated):
    from tuner.store import Store
    from tuner.study.orchestrator import run_study

    before = calibrated["store"].calibrations("cal")
    run_study(calibrated["spec"], calibrated["text"], Store(calibrated["url"]), resume=True)
    assert calibrated["store"].calibrations("cal") == before  # not run again: same curve, same timing


def test_calibration_false_searches_the_declared_range(tmp_path, local_ray, micro_study):
    from tuner.store import Store

    url = micro_study(tmp_path, name="off", search=CALIBRATED["search"], calibration=False)
    store = Store(url)
    assert store.calibrations("off") == {}
    dist = optuna.load_study(study_name="off/ga_gd@in_distribution", storage=url).trials[0].distributions["lr"]
    assert (dist.low, dist.high, dist.log) == (LOW, HIGH, True)
    assert next(iter(store.study("off").searches)).space["lr"] == {"low": LOW, "high": HIGH, "log": True}
    assert math.isfinite(store.trials("off")[0]["metrics"]["forget_gap"])


def test_calibration_settings_are_their_own_section(micro_spec):
    from tuner.core.errors import TunerError
    from tuner.study.spec import validate_spec

    assert validate_spec(micro_spec(calibration=False), "s").calibration.enabled is False
    assert validate_spec({"name": "d", "model": "testbed:micro"}, "s").calibration.enabled is True  # on by default
    with pytest.raises(TunerError, match="search.calibrate"):
        validate_spec(micro_spec(search={"calibrate": False}), "s")


def test_a_units_calibration_line_is_printed_once_above_the_progress():
    import io

    from rich.console import Console
    from rich.progress import Progress

    from tuner.cli.logprogress import LogLines, StudyLog
    from tuner.cli.render import StudyBars

    note = "calibration: forget gap never moved up to lr 1.00e-08; not searched"
    info = {"budget": 2, "finished": 0, "running": 0, "failed": 0, "best": None}
    stream = io.StringIO()
    with LogLines("[study x]", every=3600, stream=stream) as lines:
        log = StudyLog(lines)
        log("ga", {**info, "note": note})
        log("ga", info)
    noted = [ln for ln in stream.getvalue().splitlines() if "forget gap never moved up to lr 1.00e-08" in ln]
    assert len(noted) == 1 and "unit=ga finished=0/2" in noted[0]
    screen = io.StringIO()
    with Progress(console=Console(file=screen, width=200)) as progress:
        StudyBars(progress)("ga", {**info, "note": note})
    assert f"ga: {note}" in screen.getvalue()
