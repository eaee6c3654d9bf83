"""What a study runs after its trials: the confirmation of mid-run picks, the robustness checks of Pareto
candidates whose weights no trial kept (`robustness.when: pareto_at_end`) and the seed spread of the overall
recommendation (`robustness.seeds`).

Each is a candidate's setting run again as a Ray task with a trial's resources, ended at the candidate's step
on the same schedule (`end_step`), so the re-run is the candidate. Results are stored as checks of that
candidate (`Store.add_check`); a resumed study skips what is already stored.

Confirmations come first and repeat until the recommendation settles: the recommender lists, per unit, the
mid-run candidate it would pick if its estimated figures held (`confirm`); its re-run is scored in full (and
gets the study's robustness checks), stored as that candidate's measurement, and the study is derived again,
so a pick that the full measurement moves out of the band gives way to the next, within the unit's budget.
"""

from __future__ import annotations

from typing import Any

from tuner.engine.robustness import seed_spread
from tuner.results import derived
from tuner.results.candidates import CONFIRMATION, OK_STATUSES
from tuner.store import Store
from tuner.study.cluster import worker_task
from tuner.study.context import TrialContext
from tuner.study.spec import StudySpec

SPREAD_KEYS = ("forget_gap", "utility_drop")


def candidate_config(row: dict[str, Any], step: int | None, seed: int | None = None) -> dict[str, Any]:
    """The trial's run settings ended at `step` (its kept weights at that point), with another seed if given.
    A re-run is one process: a trial sharded over ranks is re-run at the same effective batch (batch_size ×
    world size per micro-batch), which gives the same result (tests/test_equivalence.py)."""
    config = dict(row["result"].get("config") or {})
    world = int(config.get("world_size") or 1)
    if world > 1:
        config.update(batch_size=int(config.get("batch_size", 8)) * world, world_size=1)
    if step:
        config.update(end_step=step, checkpoint="last", stop_at_target=False)
    if seed is not None:
        config["seed"] = seed
    return config


def pending(spec: StudySpec, store: Store) -> list[dict[str, Any]]:
    """The re-runs still to do: (trial, step, config, kind), kind "checks" or "seed"."""
    rows = {r["id"]: r for r in store.trials(spec.name)}
    checks = store.study_checks(spec.name)
    jobs: list[dict[str, Any]] = []
    robust = spec.robustness
    if robust.when == "pareto_at_end" and robust.checks:
        for trial_id, points in store.study_curves(store.study(spec.name).id).items():
            for point in points:
                key = (trial_id, point["step"])
                if point["pareto"] and not (checks.get(key) or {}).get("metrics") and \
                        rows[trial_id]["status"] in OK_STATUSES:
                    jobs.append({"trial": trial_id, "step": point["step"], "kind": "checks",
                                 "config": candidate_config(rows[trial_id], point["step"])})
    overall = (store.recommendation(spec.name) or {}).get("overall") or {}
    if robust.seeds > 1 and overall.get("trial_id") in rows:
        row, step = rows[overall["trial_id"]], overall.get("step")
        done = (checks.get((row["id"], step)) or {}).get("metrics") or {}
        if f"{SPREAD_KEYS[0]}_std" not in done:
            base = int(row["result"].get("config", {}).get("seed", spec.seed))
            jobs += [{"trial": row["id"], "step": step, "kind": "seed", "config": candidate_config(row, step, base + k)}
                     for k in range(1, robust.seeds)]
    return jobs


def confirmations(spec: StudySpec, store: Store) -> list[dict[str, Any]]:
    """The confirmations the stored recommendation asks for (at most one per unit; see `recommend_unit`)."""
    rows = {r["id"]: r for r in store.trials(spec.name)}
    wanted = [c for unit in ((store.recommendation(spec.name) or {}).get("units") or {}).values()
              for c in unit.get("confirm") or []]
    return [{"trial": c["trial_id"], "step": c["step"], "kind": "confirm",
             "config": candidate_config(rows[c["trial_id"]], c["step"])} for c in wanted if c["trial_id"] in rows]


def run(spec: StudySpec, store: Store, context: TrialContext, prepared: Any) -> int:
    """Confirm mid-run picks until the recommendation settles, then run the pending checks and seed runs, as
    Ray tasks (at most `concurrency` at once); store what they measured and derive the study's results again.
    Returns how many re-runs ran."""
    import ray

    data = ray.put(prepared) if not isinstance(prepared, ray.ObjectRef) else prepared
    ran = 0
    while jobs := confirmations(spec, store):
        ran += _store_confirmations(store, _run(spec, jobs, context, data))
        derived.refresh(store, spec.name)
    if spec.resources.workers > 1:  # checks and seed runs of sharded studies: not yet
        return ran
    jobs = pending(spec, store)
    if not jobs:
        return ran
    results = _run(spec, jobs, context, data)
    rows = {r["id"]: r for r in store.trials(spec.name)}
    seeds: dict[tuple[int, int | None], list[dict[str, Any]]] = {}
    for job, out in results:
        if job["kind"] == "checks" and out["checks"] is not None:
            store.add_check(job["trial"], {"step": job["step"], **out["checks"], "time_s": out["time_s"]})
        elif job["kind"] == "seed":
            seeds.setdefault((job["trial"], job["step"]), []).append(out)
    for (trial_id, step), runs in seeds.items():
        measured = [_candidate_metrics(store, spec, rows[trial_id], step), *(r["metrics"] for r in runs)]
        store.add_check(trial_id, {"step": step or 0, "metrics": seed_spread(measured, SPREAD_KEYS),
                                   "details": {"seed_runs": [{k: (m or {}).get(k) for k in SPREAD_KEYS}
                                                             for m in measured]},
                                   "time_s": sum(r["time_s"] for r in runs)})
    derived.refresh(store, spec.name)
    return ran + len(results)


def _run(spec: StudySpec, jobs: list[dict[str, Any]], context: TrialContext, data: Any
         ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each job's re-run as a Ray task with a trial's resources: (job, what `tuner.study.trial.rerun` returned)."""
    import ray

    from tuner.study.trial import rerun

    task = worker_task(rerun, spec)
    checked = spec.robustness.when != "off" and bool(spec.robustness.checks)
    results: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for start in range(0, len(jobs), spec.concurrency):
        batch = jobs[start:start + spec.concurrency]
        refs = [task.remote(job["config"], context, data, job["kind"] == "checks" or
                            (job["kind"] == "confirm" and checked)) for job in batch]
        results += list(zip(batch, ray.get(refs), strict=True))
    return results


def _store_confirmations(store: Store, results: list[tuple[dict[str, Any], dict[str, Any]]]) -> int:
    """Each confirmation's full measurement (and its robustness checks) as the candidate's check; a re-run
    that produced no metrics is stored too, with its status, so it is neither retried nor recommended."""
    for job, out in results:
        metrics = {**(out["metrics"] or {}), **((out["checks"] or {}).get("metrics") or {})}
        details = {CONFIRMATION: {"status": out["status"], "reason": out.get("reason")},
                   **({"checks": out["checks"].get("details")} if out["checks"] else {})}
        store.add_check(job["trial"], {"step": job["step"], "metrics": metrics, "details": details,
                                       "time_s": out["time_s"]})
    return len(results)


def _candidate_metrics(store: Store, spec: StudySpec, row: dict[str, Any], step: int | None) -> dict[str, float]:
    """The candidate's own metrics, the first of the seed runs."""
    from tuner.results.candidates import candidates

    found = [c for c in candidates([row], store.study_curves(store.study(spec.name).id), list(spec.objectives))
             if c["step"] == step]
    return found[0]["metrics"] if found else row["metrics"]
