"""Read-only JSON endpoints beside the pages, for other tools: the study list, a study's Pareto points, its
units' lr calibrations and its stored recommendation. They sit behind the same loopback binding and optional
token as the pages."""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify

from dashboards import queries
from dashboards.data import load_study, no_recommendation_note
from tuner.core.errors import TunerError
from tuner.store import Store

PARETO_FIELDS = ("id", "unit", "method", "retain_source", "number", "status", "params", "objectives")
PARETO_METRICS = ("forget_gap", "utility_drop", "mia_auc", "privleak", "forget_em", "forget_es", "forget_nll",
                  "unseen_nll", "retain_nll")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def register(server: Flask, store: Store) -> None:
    @server.get("/api/studies")
    def api_studies():
        return jsonify(_jsonable(queries.study_list(store)))

    @server.get("/api/studies/<name>/pareto")
    def api_pareto(name: str):
        try:
            data = load_study(store, name, curves=False, recommend=False)
        except TunerError as err:
            return jsonify({"error": str(err)}), 404
        points = [{**{k: r[k] for k in PARETO_FIELDS},
                   "metrics": {k: r["metrics"].get(k) for k in PARETO_METRICS}}
                  for r in data.rows if r.get("pareto")]
        return jsonify(_jsonable({"study": name, "objectives": data.objectives, "points": points}))

    @server.get("/api/studies/<name>/recommendation")
    def api_recommendation(name: str):
        """The recommendation the study driver stored (it is not computed here); 404 before there is one."""
        try:
            stored = store.recommendation(name)
            if stored is None:
                return jsonify({"error": f"study '{name}': {no_recommendation_note(store.trials(name))}"}), 404
        except TunerError as err:
            return jsonify({"error": str(err)}), 404
        return jsonify(_jsonable(stored))

    @server.get("/api/studies/<name>/calibrations")
    def api_calibrations(name: str):
        """Each unit's stored lr calibration (curve, finding, window, guideline points), as `tuner study show
        --json` gives them; no units for a study that ran without one."""
        try:
            return jsonify(_jsonable({"study": name, "units": store.calibrations(name)}))
        except TunerError as err:
            return jsonify({"error": str(err)}), 404
