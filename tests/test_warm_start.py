"""A warm start: a new study's sampler is told an earlier study's finished trials (their settings, objectives as
the new study scores them, constraints) before its own first trial; what it cannot be told honestly is left
out, and a warm start from a missing study or another model family is refused in one line."""

from __future__ import annotations

import optuna
import pytest

from tuner.core.errors import TunerError
from tuner.core.status import SCORED
from tuner.results.candidates import objective_values
from tuner.store import Store
from tuner.study import warmstart
from tuner.study.spec import Range, StudySpec


@pytest.fixture(scope="module")
def store_with_two_studies(tmp_path_factory, local_ray, spec_file):
    """`first` (three trials) and `second` (one trial), warm-started from `first`, on one store."""
    from tuner.study.orchestrator import run_study
    from tuner.study.spec import load_spec

    root = tmp_path_factory.mktemp("warm")
    store = Store(f"sqlite:///{root / 'store.db'}")
    for name, fields in (("first", {"budget": {"trials": 3}, "sampler": {"name": "random"}}),
                         ("second", {"budget": {"trials": 1}, "sampler": {"name": "tpe"}, "warm_start": "first",
                                     "objectives": ["forget_gap", "utility_drop", "privleak"]})):
        folder = root / name
        folder.mkdir()
        spec, text = load_spec(spec_file(folder, name=name, **fields))
        run_study(spec, text, store)
    return store


def test_the_new_studys_sampler_is_told_the_earlier_trials_before_its_own(store_with_two_studies):
    store = store_with_two_studies
    earlier = [r for r in store.trials("first") if r["status"] in SCORED]
    assert earlier and [r for r in store.trials("second")]  # its own trial ran and was stored
    assert len(store.trials("second")) == 1  # the told trials are not the new study's trials
    search = store.study("second").searches[0]
    optuna_study = optuna.load_study(study_name=search.optuna_study, storage=store.url)
    told = [t for t in optuna_study.get_trials() if t.user_attrs.get("warm_start") == "first"]
    assert len(told) == len(earlier)
    objectives = ["forget_gap", "utility_drop", "privleak"]
    for trial, row in zip(told, earlier, strict=True):
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.params == {k: row["params"][k] for k in trial.params}
        expected = objective_values(row["metrics"], objectives)  # scored by the new study's objectives
        assert trial.values == pytest.approx([expected[o] for o in objectives])
    own = [t for t in optuna_study.get_trials() if "warm_start" not in t.user_attrs]
    assert len(own) == 1 and own[0].number > max(t.number for t in told)


def test_priors_leave_out_settings_outside_the_ranges_and_unmeasured_objectives(store_file):
    """Three finished trials stored by hand: one outside the new ranges, one from before privleak was
    measured; only the third is told, with its constraints."""
    store = Store(store_file)
    study = store.create_study("old", "testbed:micro", 0, {}, "", {})
    search = store.ensure_search(study, "ga_gd@in_distribution", "ga_gd", "in_distribution", "old/ga_gd", "tpe", 3, {})
    full = {"forget_gap": 0.02, "utility_drop": 0.3, "privleak": -4.0}
    for lr, metrics in ((1e-3, full), (5e-2, full), (2e-3, {"forget_gap": 0.01, "utility_drop": 0.2})):
        row = store.start_trial(search, {"lr": lr, "epochs": 2})
        store.finish_trial(row, "completed", None, {"metrics": metrics})
    ranges = {"lr": Range(low=1e-4, high=1e-2, log=True), "epochs": Range(low=1, high=3)}
    found, skipped = warmstart.priors(store.trials("old"), "ga_gd@in_distribution", ranges,
                                      ["forget_gap", "utility_drop", "privleak"], {"utility_tolerance": 0.5})
    assert skipped == 2 and len(found) == 1
    assert found[0].params == {"lr": 1e-3, "epochs": 2} and found[0].values == (0.02, 0.3, 4.0)
    assert found[0].constraints == {"utility_drop": pytest.approx(0.3 - 0.5)}
    assert warmstart.line("old", 1, 2).endswith("2 left out (outside this search's ranges or not measured)")


def test_a_warm_start_from_a_missing_study_or_another_family_is_refused(store_with_two_studies, micro_spec):
    store = store_with_two_studies
    spec = StudySpec.model_validate(micro_spec(name="third", warm_start="nope"))
    with pytest.raises(TunerError, match="warm_start: no study 'nope' on this store"):
        warmstart.source_of(spec, store, {"model_type": "gpt2"})
    spec = StudySpec.model_validate(micro_spec(name="third", warm_start="first"))
    assert warmstart.source_of(spec, store, {"model_type": "gpt2"}) == "first"
    with pytest.raises(TunerError, match="ran a gpt2 model, this study a llama one"):
        warmstart.source_of(spec, store, {"model_type": "llama"})
    with pytest.raises(ValueError, match="warm_start: 'third' is this study"):
        StudySpec.model_validate(micro_spec(name="third", warm_start="third"))


def test_a_study_with_a_bad_warm_start_stores_nothing(store_with_two_studies, spec_file, tmp_path):
    from tuner.study.orchestrator import run_study
    from tuner.study.spec import load_spec

    store = store_with_two_studies
    spec, text = load_spec(spec_file(tmp_path, name="orphan", warm_start="nope"))
    with pytest.raises(TunerError, match="warm_start: no study 'nope' on this store"):
        run_study(spec, text, store)
    with pytest.raises(TunerError):
        store.study("orphan")  # refused before its study row was written
