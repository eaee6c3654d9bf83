"""`tuner` as a user runs it: the real console script in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TUNER = str(Path(sys.executable).with_name("tuner"))


def tuner(*args, cache_dir):
    env = {**os.environ, "TUNER_CACHE": str(cache_dir)}
    return subprocess.run([TUNER, *args], capture_output=True, text=True, env=env, timeout=600)


def header(stdout: str) -> str:
    """The header row of the metric table (the line that names its columns)."""
    return next(line for line in stdout.splitlines() if "original" in line and "unlearned" in line)


def test_methods_lists_all_seven(cache_dir):
    proc = tuner("methods", cache_dir=cache_dir)
    assert proc.returncode == 0
    for name in ("ga", "random_label", "random_model_label", "adversarial", "retain_finetune", "ga_gd", "ga_kl"):
        assert name in proc.stdout


def test_unlearn_on_the_testbed_reports_both_targets_and_saves(tmp_path, cache_dir, bench):
    out = tmp_path / "run"
    proc = tuner("unlearn", "--model", "testbed:micro", "--method", "ga_gd", "--lr", "1e-3", "--epochs", "2",
                 "--retain-weight", "1.0", "--out", str(out), cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "exact retrain" in header(proc.stdout) and "approximate target" in proc.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["status"] in {"completed", "stopped_at_target"}
    assert report["exact_retrain"]["forget_nll"] > report["baseline"]["forget_nll"]
    t = report["targets"]
    assert t["approximate_forget_nll"] == pytest.approx(report["metrics"]["unseen_nll"])
    assert t["exact_retrain_forget_nll"] == pytest.approx(report["exact_retrain"]["forget_nll"])
    assert report["metrics"]["forget_nll"] > report["baseline"]["forget_nll"]
    assert report["environment"]["effective_batch"] == 8 and report["environment"]["world_size"] == 1
    assert len(report["curve"]) >= 2 and report["curve"][0]["step"] == 0
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()
    # the field's metrics before and after, privleak relative to the exact retrain (0 for the retrain itself)
    for label in ("exact memorisation, forget", "extraction strength, forget", "MIA AUC MinK++", "privleak %"):
        line = next(row for row in proc.stdout.splitlines() if label in row)
        assert len(re.findall(r"[-+]?\d+\.\d+", line)) == 3, line  # original, unlearned, exact retrain
    before, after, retrain = report["baseline"], report["metrics"], report["exact_retrain"]
    assert after["privleak_reference_auc"] == retrain["mia_auc_mink"] and retrain["privleak"] == 0.0
    assert before["privleak"] < -20 < after["privleak"]  # the original leaks (MUSE sign: negative); less after
    assert after["forget_em"] < before["forget_em"] and after["mink_k"] == 0.4
    assert "privleak relative to min-k AUC" in proc.stdout and "the exact retrain" in proc.stdout
    # the saved model loads and is the unlearned one
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not all((a == b).all() for a, b in zip(saved.parameters(), bench.reference.parameters(), strict=True))


def test_config_file_supplies_settings_and_flags_override(tmp_path, cache_dir, bench):
    cfg = tmp_path / "rec.yaml"
    cfg.write_text("config:\n  method: ga\n  lr: 0.001\n  max_steps: 2\n  seed: 3\n")
    out = tmp_path / "run"
    proc = tuner("unlearn", "--model", "testbed:micro", "--config", str(cfg), "--method", "ga_kl", "--out", str(out),
                 cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "metrics.json").read_text())
    assert report["config"]["method"] == "ga_kl" and report["config"]["seed"] == 3
    assert report["planned_steps"] == 2


@pytest.mark.parametrize("args, message", [
    (["--method", "nope", "--lr", "1e-3"], "unknown method 'nope'"),
    (["--method", "ga", "--lr", "-1"], "params: Value error, method 'ga': lr must be > 0 (got -1)"),
        (["--method", "ga", "--lr", "1e-3", "--beta", "0.1"], "method 'ga' has no hyperparameter 'beta'"),
    (["--method", "ga"], "--lr is required"),
    (["--method", "ga", "--lr", "1e-3", "--config", "/nonexistent/x.yaml"], "--config: file not found"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path, cache_dir, bench, args, message):
    proc = tuner("unlearn", "--model", "testbed:micro", "--out", str(tmp_path / "o"), *args, cache_dir=cache_dir)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_bad_models_and_outputs(tmp_path, cache_dir, bench):
    missing = tuner("unlearn", "--model", "./no/such/model", "--method", "ga", "--lr", "1e-3", "--out",
                    str(tmp_path / "o"), cache_dir=cache_dir)
    assert missing.returncode == 2 and "no such directory" in missing.stderr
    model_dir = bench.source.path
    no_data = tuner("unlearn", "--model", model_dir, "--method", "ga", "--lr", "1e-3", "--out", str(tmp_path / "o"),
                    cache_dir=cache_dir)
    assert no_data.returncode == 2 and "--forget is required" in no_data.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    refused = tuner("unlearn", "--model", "testbed:micro", "--method", "ga", "--lr", "1e-3", "--out", str(busy),
                    cache_dir=cache_dir)
    assert refused.returncode == 2 and "exists and is not empty" in refused.stderr
    assert (busy / "keep.txt").read_text() == "mine"


def test_a_local_model_with_its_own_files(tmp_path, cache_dir, bench):
    forget = tmp_path / "forget.txt"
    unseen = tmp_path / "unseen.txt"
    forget.write_text(Path(bench.source.testbed_root / "data" / "forget").joinpath(
        sorted(os.listdir(bench.source.testbed_root / "data" / "forget"))[0]).read_text())
    unseen.write_text(Path(bench.source.testbed_root / "data" / "unseen").joinpath(
        sorted(os.listdir(bench.source.testbed_root / "data" / "unseen"))[0]).read_text())
    out = tmp_path / "run"
    proc = tuner("unlearn", "--model", bench.source.path, "--method", "ga", "--lr", "1e-3", "--max-steps", "2",
                 "--forget", str(forget), "--unseen", str(unseen), "--block-size", "32", "--out", str(out),
                 cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "metrics.json").read_text())
    assert report["exact_retrain"] is None and report["data"]["forget"] == str(forget)


def test_own_data_on_a_testbed_model_shows_no_exact_retrain(tmp_path, cache_dir, bench):
    """The testbed's retrain model never saw the testbed's forget set; it is no exact retrain for the user's."""
    data = bench.source.testbed_root / "data"
    forget, unseen = tmp_path / "forget.txt", tmp_path / "unseen.txt"
    forget.write_text((data / "forget" / sorted(os.listdir(data / "forget"))[0]).read_text())
    unseen.write_text((data / "unseen" / sorted(os.listdir(data / "unseen"))[0]).read_text())
    out = tmp_path / "run"
    proc = tuner("unlearn", "--model", "testbed:micro", "--method", "ga", "--lr", "1e-3", "--max-steps", "2",
                 "--forget", str(forget), "--unseen", str(unseen), "--out", str(out), cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "exact retrain" not in header(proc.stdout) and "exact-retrain" not in proc.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["exact_retrain"] is None and "targets" not in report
    assert report["data"]["forget"] == str(forget)


def test_a_diverged_run_is_reported_and_saves_no_model(tmp_path, cache_dir, bench):
    out = tmp_path / "run"
    proc = tuner("unlearn", "--model", "testbed:micro", "--method", "ga", "--lr", "1e30", "--max-steps", "5",
                 "--no-stop-at-target", "--out", str(out), cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "diverged" in proc.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["status"] == "diverged" and report["diverged_step"] >= 1
    assert not (out / "model").exists()
