"""Export a recommendation as a file a model owner can apply (`tuner unlearn --config FILE`) and defend:
the run settings, the metrics to expect with their spread over nearby trials, and full provenance."""

from __future__ import annotations

import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from tuner.core.errors import TunerError
from tuner.core.metrics import leak_reference_text
from tuner.results.candidates import OK_STATUSES, candidates
from tuner.results.recommend import scaled_params
from tuner.results.target import Target
from tuner.store import Store

FORMAT = "unlearn-tuner/recommendation@2"  # @2: the hyperparameters under config.params (@1 files still apply)
EXPECTED = ("forget_gap", "utility_drop", "mia_auc", "mia_auc_minkpp", "privleak", "forget_em", "forget_es", "forget_nll",
            "unseen_nll", "retain_nll", "general_nll")


def _pick(recommendation: dict[str, Any], method: str | None, study: str) -> tuple[str, dict[str, Any]]:
    if method is None:
        overall = recommendation["overall"]
        if overall.get("trial_id") is None:
            raise TunerError(f"study '{study}': nothing to export ({overall['reason']}); choose one with --method")
        return overall["unit"], overall
    units = {u: r for u, r in recommendation["units"].items() if u == method or u.split("@")[0] == method}
    if not units:
        known = ", ".join(recommendation["units"]) or "none"
        raise TunerError(f"study '{study}' has no method '{method}' (search units: {known})")
    usable = {u: r for u, r in units.items() if r.get("trial_id") is not None}
    if not usable:
        reasons = "; ".join(f"{u}: {r['reason']}" for u, r in units.items())
        raise TunerError(f"method '{method}' has no finished trials to export in study '{study}' ({reasons})")
    order = {"recommended": 0, "closest": 1}
    unit = min(usable, key=lambda u: (order.get(usable[u]["status"], 2), _or_inf(usable[u]["metrics"].get("utility_drop"))))
    return unit, usable[unit]


def _or_inf(value: float | None) -> float:
    """A missing figure ranks last, never as 0."""
    return math.inf if value is None else value


def _spread(rows: list[dict[str, Any]], chosen: dict[str, Any], radius: float) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each metric over the finished trials near the chosen candidate (their
    selected checkpoints, in the scaled hyperparameter space)."""
    done = [r for r in rows if r["status"] in OK_STATUSES and r["metrics"]]
    coords = scaled_params(done + [chosen])
    me = coords[-1]
    near = [r for r, c in zip(done, coords, strict=False)
            if sum((a - b) ** 2 for a, b in zip(c, me, strict=True)) ** 0.5 <= radius]
    out = {}
    for key in EXPECTED:
        values = [r["metrics"][key] for r in near if r["metrics"].get(key) is not None]
        if not values:
            continue
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        out[key] = {"value": chosen["metrics"].get(key), "mean": mean, "std": std, "n": len(values)}
    return out


def _candidate(store: Store, study: Any, rows: list[dict[str, Any]], trial_id: int, step: int | None
               ) -> dict[str, Any]:
    """One candidate of the study: trial `trial_id` (its id, as `study show` and the dashboards list it) at
    `step` (default: its selected checkpoint)."""
    name = study.name
    mine = candidates([r for r in rows if r["id"] == trial_id], store.study_curves(study.id),
                      study.spec.get("objectives") or [], store.study_checks(name))
    if not mine:
        raise TunerError(f"study '{name}' has no trial with id {trial_id} (ids are in `tuner study show {name}`)")
    if mine[0]["status"] not in OK_STATUSES:
        raise TunerError(f"trial {trial_id} of study '{name}' {mine[0]['status']}: it has no checkpoint to export")
    found = next((c for c in mine if (c["selected"] if step is None else c["step"] == step)), None)
    if found is None:
        steps = ", ".join(str(c["step"]) for c in sorted(mine, key=lambda c: c["step"] or 0))
        raise TunerError(f"trial {trial_id} of study '{name}' has no evaluated checkpoint at step {step} "
                         f"(steps: {steps})")
    return found


def build_export(store: Store, name: str, method: str | None = None, trial: int | None = None,
                 step: int | None = None) -> dict[str, Any]:
    """The recommended candidate (of the study, or of `method`), or the candidate `trial`/`step` the user
    chose, as a file `tuner unlearn --config` applies: the trial's settings ending at the candidate's step."""
    study = store.study(name)
    all_rows = store.trials(name)
    if trial is not None:
        chosen = _candidate(store, study, all_rows, trial, step)
        rec = {"status": "chosen", "reason": f"chosen by the user: trial {trial} at step {chosen['step']}",
               "trial_id": trial, "step": chosen["step"]}
        unit = chosen["unit"]
    else:
        recommendation = store.recommendation(name)  # derived once by the study driver
        if recommendation is None:
            raise TunerError(f"study '{name}': no recommendation is stored yet (no trial has finished; "
                             f"`tuner study resume {name}` runs the rest)")
        unit, rec = _pick(recommendation, method, name)
        chosen = _candidate(store, study, all_rows, rec["trial_id"], rec.get("step"))
    rows = [r for r in all_rows if r["unit"] == unit]
    config = dict(chosen["result"].get("config") or {})
    config["device"] = "auto"  # where it runs next is the user's choice; the tuned device is in provenance
    if chosen["step"]:
        # the same schedule, ended at the candidate's step, keeping those weights
        config.update(end_step=chosen["step"], checkpoint="last", stop_at_target=False)
    summary = study.data_summary or {}
    return {
        "format": FORMAT,
        "study": name,
        "unit": unit,
        "step": chosen["step"],
        "status": rec["status"],
        "reason": rec["reason"],
        "robustness": rec.get("robustness"),
        "success_window_decades": rec.get("window_width"),
        "success_rate": rec.get("success_rate"),
        "warnings": rec.get("warnings", []),
        "config": config,
        "expected": _spread(rows, chosen, Target.model_validate(study.spec["target"]).neighbourhood),
        "measured": _measured(chosen),
        "exact_retrain_forget_nll": (study.exact_retrain or {}).get("forget_nll"),
        "privleak_reference": leak_reference_text(study.exact_retrain),
        "provenance": {
            "study": name, "trial_id": chosen["id"], "trial_number": chosen["number"], "step": chosen["step"],
            "seed": study.seed, "model": {"name": study.model, "fingerprint": summary.get("model")},
            "data": {"sources": summary.get("sources"), "sha256": summary.get("sha256"),
                     "blocks": summary.get("blocks")},
            "environment": chosen["result"].get("environment"), "versions": study.versions,
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }


def _measured(chosen: dict[str, Any]) -> dict[str, Any]:
    """How the expected figures were measured: in full at the trial's selected checkpoint, in full by a
    confirmation re-run (with the curve's estimate it replaced), or only as the curve estimated them."""
    how = chosen.get("measured", "full")
    out: dict[str, Any] = {"how": how}
    if how in ("confirmed", "unconfirmed"):
        out["estimate_replaced"] = {k: v for k, v in (chosen.get("estimate") or {}).items() if k in EXPECTED}
    if how == "estimate":
        out["estimated"] = list(chosen.get("estimated") or [])
        out["not_measured"] = [k for k in EXPECTED if chosen["metrics"].get(k) is None]
    return out


def render(doc: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    return yaml.safe_dump(doc, sort_keys=False)


def write_atomic(path: Path, text: str) -> None:
    """All or nothing: a temp file in the target directory, renamed into place. The file is written exactly
    where -o says (no name is derived from study or method names)."""
    if not path.parent.is_dir():
        raise TunerError(f"-o: directory {path.parent} does not exist")
    if path.is_dir():
        raise TunerError(f"-o: {path} is a directory; name the file to write, e.g. {path / 'recommended.yaml'}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise TunerError(f"-o: cannot write in {path.parent} ({err.strerror or type(err).__name__})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as err:
        raise TunerError(f"-o: cannot write {path} ({err.strerror or type(err).__name__})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
