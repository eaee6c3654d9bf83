"""The offline testbed is a real, deterministic unlearning problem."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tuner.engine import testbed


def test_micro_testbed_memorises_its_forget_set_and_the_retrain_does_not(bench):
    m = testbed.load_manifest(bench.source.testbed_root)
    model, retrain = m["nll"]["model"], m["nll"]["retrain"]
    assert model["forget"] < model["unseen"]  # memorised
    assert retrain["forget"] - retrain["unseen"] > model["forget"] - model["unseen"] + 0.2  # the retrain did not
    names = {role: {f["name"] for f in m["files"][role]} for role in ("forget", "unseen", "retain")}
    assert not (names["forget"] & names["unseen"]) and not (names["forget"] & names["retain"])
    assert all(len(f["sha256"]) == 64 for role in m["files"].values() for f in role)
    assert m["files"]["general"][0]["origin"].startswith("pydoc_data.topics")


def test_build_is_cached_and_deterministic(bench, tmp_path, monkeypatch):
    root = bench.source.testbed_root
    assert testbed.build("micro") == root  # cache hit: same key, same directory
    monkeypatch.setenv("TUNER_CACHE", str(tmp_path))
    again = testbed.build("micro")
    assert again != root and again.name == root.name
    a = load_file(root / "model" / "model.safetensors")
    b = load_file(again / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_another_seed_gives_another_split(cache_dir):
    _, split0, _ = testbed.testbed_key("micro", 0)
    _, split1, _ = testbed.testbed_key("micro", 1)
    assert [p.name for p in split0["forget"]] != [p.name for p in split1["forget"]]
