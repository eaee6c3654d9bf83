"""What a study runs after its trials: the robustness checks of Pareto candidates whose weights no trial
kept (`robustness.when: pareto_at_end`) and the seed spread of the overall recommendation (`robustness.seeds`).

Each is a candidate's setting run again as a Ray task with a trial's resources, ended at the candidate's step
on the same schedule (`end_step`), so the re-run is the candidate. Results are stored as checks of that
candidate (`Store.add_check`); a resumed study skips what is already stored.
"""

from __future__ import annotations

from typing import Any

from tuner import derived
from tuner.candidates import OK_STATUSES
from tuner.robustness import seed_spread
from tuner.spec import StudySpec
from tuner.store import Store

SPREAD_KEYS = ("forget_gap", "utility_drop")


def candidate_config(row: dict[str, Any], step: int | None, seed: int | None = None) -> dict[str, Any]:
    """The trial's run settings ended at `step` (its kept weights at that point), with another seed if given."""
    config = dict(row["result"].get("config") or {})
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


def run(spec: StudySpec, store: Store, context: dict[str, Any], prepared: Any) -> int:
    """Run the pending re-runs as Ray tasks (at most `concurrency` at once), store what they measured and
    derive the study's results again. Returns how many ran."""
    import ray

    from tuner.trial import rerun

    jobs = pending(spec, store)
    if not jobs:
        return 0
    task = ray.remote(max_calls=1)(rerun).options(num_cpus=spec.resources.cpus, num_gpus=spec.resources.gpus)
    data = ray.put(prepared) if not isinstance(prepared, ray.ObjectRef) else prepared
    results: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for start in range(0, len(jobs), spec.concurrency):
        batch = jobs[start:start + spec.concurrency]
        refs = [task.remote(job["config"], context, data, job["kind"] == "checks") for job in batch]
        results += list(zip(batch, ray.get(refs), strict=True))
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
    return len(results)


def _candidate_metrics(store: Store, spec: StudySpec, row: dict[str, Any], step: int | None) -> dict[str, float]:
    """The candidate's own metrics, the first of the seed runs."""
    from tuner.candidates import candidates

    found = [c for c in candidates([row], store.study_curves(store.study(spec.name).id), list(spec.objectives))
             if c["step"] == step]
    return found[0]["metrics"] if found else row["metrics"]
