"""What share of a whole study the robustness checks take, at the spec's robustness settings (the defaults
unless the spec sets them). A benchmark, not a test.

Runs the study (Ray Tune, Optuna, a new SQLite store in a temporary folder) and reads the store: the trials'
own wall time, the checks' time (in-trial checks and the re-runs after the trials: the seed spread, Pareto
re-checks) and the exact-retrain model's attack (once per study). With `--against-off` it runs the study a
second time with `robustness.when: off, seeds: 1` and reports the two studies' wall times as well.

    python bench/robustness_share.py                              # studies/quickstart.yaml
    python bench/robustness_share.py studies/robustness.yaml --against-off
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from tuner.store import Store
from tuner.study.orchestrator import run_study
from tuner.study.spec import load_spec


def run(path: Path, tmp: Path, robustness: dict | None) -> tuple[Store, str, float]:
    doc = yaml.safe_load(path.read_text())
    doc["name"] = f"{doc['name']}-{uuid.uuid4().hex[:6]}"
    if robustness is not None:
        doc["robustness"] = {**(doc.get("robustness") or {}), **robustness}
    spec_path = tmp / f"{doc['name']}.yaml"
    spec_path.write_text(yaml.safe_dump(doc))
    spec, text = load_spec(spec_path)
    store = Store(f"sqlite:///{tmp / (doc['name'] + '.db')}")
    started = time.perf_counter()
    run_study(spec, text, store)
    return store, doc["name"], time.perf_counter() - started


def shares(store: Store, name: str) -> dict[str, float]:
    trials = sum(r["wall_time_s"] or 0.0 for r in store.trials(name))
    checks = store.study_checks(name)
    total_checks = sum(c["time_s"] or 0.0 for c in checks.values())
    retrain = ((store.study(name).exact_retrain or {}).get("relearn") or {}).get("time_s") or 0.0
    return {"trials_s": trials, "checks_s": total_checks, "retrain_attack_s": retrain, "checked": len(checks),
            "share": (total_checks + retrain) / (trials + total_checks + retrain) if trials else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", default="studies/quickstart.yaml")
    p.add_argument("--against-off", action="store_true", help="also run it without robustness, compare wall times")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="robustness-share-"))
    store, name, wall = run(Path(args.spec), tmp, None)
    s = shares(store, name)
    print(f"{args.spec}: {len(store.trials(name))} trials, {s['checked']} checked candidates, study wall {wall:.0f} s")
    print(f"  trials' own time      {s['trials_s']:8.1f} s")
    print(f"  checks                {s['checks_s']:8.1f} s  (in the trials, and re-runs after them: seed spread)")
    print(f"  retrain attack        {s['retrain_attack_s']:8.1f} s  (once per study)")
    print(f"robustness share of the study's compute: {100 * s['share']:.1f} %")
    if args.against_off:
        _, _, off = run(Path(args.spec), tmp, {"when": "off", "seeds": 1})
        print(f"wall time with robustness {wall:.0f} s, without {off:.0f} s: {wall / off:.2f}x")


if __name__ == "__main__":
    main()
