"""Export a recommendation as a file a model owner can apply (`tuner unlearn --config FILE`) and defend:
the run settings, the metrics to expect with their spread over nearby trials, and full provenance."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from tuner.errors import TunerError
from tuner.recommend import OK_STATUSES, scaled_params
from tuner.store import Store

FORMAT = "unlearn-tuner/recommendation@2"  # @2: the hyperparameters under config.params (@1 files still apply)
EXPECTED = ("forget_gap", "utility_drop", "mia_auc", "forget_nll", "unseen_nll", "retain_nll", "general_nll")


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
    unit = min(usable, key=lambda u: (order.get(usable[u]["status"], 2),
                                      usable[u]["metrics"].get("utility_drop") or 0.0))
    return unit, usable[unit]


def _spread(rows: list[dict[str, Any]], chosen_id: int, radius: float) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each metric over the finished trials near the chosen one."""
    done = [r for r in rows if r["status"] in OK_STATUSES and r["metrics"]]
    coords = scaled_params(done)
    me = next(i for i, r in enumerate(done) if r["id"] == chosen_id)
    near = [r for r, c in zip(done, coords, strict=True)
            if sum((a - b) ** 2 for a, b in zip(c, coords[me], strict=True)) ** 0.5 <= radius]
    out = {}
    for key in EXPECTED:
        values = [r["metrics"][key] for r in near if r["metrics"].get(key) is not None]
        if not values:
            continue
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        out[key] = {"value": done[me]["metrics"].get(key), "mean": mean, "std": std, "n": len(values)}
    return out


def build_export(store: Store, name: str, method: str | None = None) -> dict[str, Any]:
    study = store.study(name)
    recommendation = store.recommendation(name)  # derived once by the study driver
    if recommendation is None:
        raise TunerError(f"study '{name}': no recommendation is stored yet (no trial has finished; "
                         f"`tuner study resume {name}` runs the rest)")
    unit, rec = _pick(recommendation, method, name)
    rows = [r for r in store.trials(name) if r["unit"] == unit]
    trial = next(r for r in rows if r["id"] == rec["trial_id"])
    config = dict(trial["result"].get("config") or {})
    config["device"] = "auto"  # where it runs next is the user's choice; the tuned device is in provenance
    summary = study.data_summary or {}
    return {
        "format": FORMAT,
        "study": name,
        "unit": unit,
        "status": rec["status"],
        "reason": rec["reason"],
        "robustness": rec.get("robustness"),
        "success_window_decades": rec.get("window_width"),
        "success_rate": rec.get("success_rate"),
        "warnings": rec.get("warnings", []),
        "config": config,
        "expected": _spread(rows, trial["id"], study.spec["target"].get("neighbourhood", 0.25)),
        "exact_retrain_forget_nll": (study.exact_retrain or {}).get("forget_nll"),
        "provenance": {
            "study": name, "trial_id": trial["id"], "trial_number": trial["number"], "seed": study.seed,
            "model": {"name": study.model, "fingerprint": summary.get("model")},
            "data": {"sources": summary.get("sources"), "sha256": summary.get("sha256"),
                     "blocks": summary.get("blocks")},
            "environment": trial["result"].get("environment"), "versions": study.versions,
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }


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
