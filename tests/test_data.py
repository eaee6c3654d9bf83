"""Data loading: every source kind works, and every bad input names the set and the file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuner.core.errors import TunerError
from tuner.engine.data import DataSpec, TextSource, build_data, read_documents, subsample


def spec(tmp_path, **sources):
    forget = tmp_path / "forget.txt"
    unseen = tmp_path / "unseen.txt"
    forget.write_text("def forget_me(x):\n    return x + 1\n" * 40)
    unseen.write_text("def never_seen(y):\n    return y * 2\n" * 40)
    fields = {"forget": TextSource(path=str(forget)), "unseen": TextSource(path=str(unseen)), "block_size": 32}
    fields.update(sources)
    return DataSpec(**fields)


def test_text_jsonl_and_directory_sources(tmp_path, bench):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.py").write_text("import os\n" * 50)
    (d / "b.py").write_text("import sys\n" * 50)
    (d / "skip.md").write_text("not code")
    rows = tmp_path / "retain.jsonl"
    rows.write_text("\n".join(json.dumps({"body": f"line {i} of retained text " * 5}) for i in range(30)))
    s = spec(tmp_path, retain=TextSource(path=str(rows), text_field="body"),
             general=TextSource(path=str(d), pattern="*.py"))
    assert read_documents(s.general, "general") == ["import os\n" * 50, "import sys\n" * 50]
    data = build_data(s, bench.tokenizer, bench.reference.config)
    assert data.forget.shape[1] == 32 and data.forget.dtype == torch.long
    assert set(data.retain_train) == {"in_distribution", "general"}
    assert data.retain_eval["in_distribution"].shape[0] >= 1
    # held-out utility blocks are disjoint from the blocks descent trains on
    train = {tuple(r) for r in data.retain_train["in_distribution"].tolist()}
    held = {tuple(r) for r in data.retain_eval["in_distribution"].tolist()}
    assert train and held and not (train & held)


def test_subsampling_is_deterministic_by_seed():
    blocks = torch.arange(200).view(100, 2)
    a, b, c = subsample(blocks, 10, 0), subsample(blocks, 10, 0), subsample(blocks, 10, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[1:, 0] > a[:-1, 0]).all()  # order kept


@pytest.mark.parametrize("case, message", [
    ("missing", "forget: file not found"),
    ("empty", "forget: "),
    ("whitespace", "contains no text"),
    ("no_field", "has no text field 'text' (found: body)"),
    ("bad_json", "line 2 is not valid JSON"),
    ("not_utf8", "is not UTF-8 text"),
    ("too_short", "fewer than one block of 32"),
    ("empty_dir", "has no files matching"),
])
def test_bad_forget_sets_name_the_set_and_file(tmp_path, bench, case, message):
    path = tmp_path / ("f.jsonl" if case in {"no_field", "bad_json"} else "f.txt")
    if case == "empty":
        path.write_text("")
    elif case == "whitespace":
        path.write_text("  \n\n ")
    elif case == "no_field":
        path.write_text(json.dumps({"body": "x"}) + "\n")
    elif case == "bad_json":
        path.write_text(json.dumps({"text": "x"}) + "\n{oops\n")
    elif case == "not_utf8":
        path.write_bytes(b"caf\xe9 au lait\n" * 10)
    elif case == "too_short":
        path.write_text("x = 1\n")
    elif case == "empty_dir":
        path = tmp_path / "emptydir"
        path.mkdir()
    s = spec(tmp_path, forget=TextSource(path=str(path)))
    with pytest.raises(TunerError) as err:
        build_data(s, bench.tokenizer, bench.reference.config)
    text = str(err.value)
    assert text.startswith("forget:") and message in text
    if case not in {"empty_dir", "too_short"}:
        assert str(path) in text


def test_blocks_longer_than_the_context_are_refused(tmp_path, bench):
    s = spec(tmp_path).model_copy(update={"block_size": 4096})
    with pytest.raises(TunerError, match="block_size 4096 is longer than the model's context of 64 tokens"):
        build_data(s, bench.tokenizer, bench.reference.config)


def test_missing_retain_source_for_a_method_is_named(tmp_path, bench):
    data = build_data(spec(tmp_path), bench.tokenizer, bench.reference.config)
    with pytest.raises(TunerError, match="retain_source 'general' needs data.general"):
        data.retain_for("general")


def test_a_source_needs_exactly_one_origin():
    with pytest.raises(ValueError, match="exactly one of 'path' or 'hf'"):
        TextSource()
    with pytest.raises(ValueError, match="needs a 'split'"):
        TextSource(hf="llmunlearn/unlearn_dataset", config="arxiv")


def test_unreachable_hf_dataset_is_one_clear_line():
    """In a fresh process with the Hub offline (the Hugging Face libraries read that flag when imported): the
    failure is one line naming the set and the source."""
    pytest.importorskip("datasets")
    code = ("from tuner.engine.data import TextSource, read_documents\n"
            "read_documents(TextSource(hf='llmunlearn/unlearn_dataset', config='arxiv', split='forget'), 'forget')")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(r"tuner\.core\.errors\.TunerError: forget: could not load "
                    r"hf:llmunlearn/unlearn_dataset/arxiv\[forget\]: ", last), done.stderr


def distinct_lines(tmp_path, name: str, prefix: str, n: int = 120) -> TextSource:
    path = tmp_path / name
    path.write_text("".join(f"{prefix} line {i}: the value is {i * 7919 % 1000}\n" for i in range(n)))
    return TextSource(path=str(path))


def test_a_forget_set_that_is_the_retain_or_unseen_set_is_refused(tmp_path, bench):
    """`--forget D --retain D` would unlearn and keep the same text: refused, naming the sets."""
    forget = distinct_lines(tmp_path, "f.txt", "forget")
    with pytest.raises(TunerError, match=r"every forget block \(.*f\.txt\) also appears in retain \(.*f\.txt\)"):
        build_data(spec(tmp_path, forget=forget, retain=forget), bench.tokenizer, bench.reference.config)
    with pytest.raises(TunerError, match=r"also appears in unseen \(.*f\.txt\)"):
        build_data(spec(tmp_path, forget=forget, unseen=forget), bench.tokenizer, bench.reference.config)


def test_a_partial_overlap_is_reported_in_one_line_with_its_share(tmp_path, bench, caplog):
    from tuner.engine.data import forget_overlap

    forget = distinct_lines(tmp_path, "f.txt", "forget")
    mixed = tmp_path / "r.txt"  # the forget text's first half, then text of its own
    mixed.write_text(Path(forget.path).read_text()[:2000] + "".join(f"kept line {i}\n" for i in range(200)))
    with caplog.at_level("WARNING", logger="tuner.engine.data"):
        data = build_data(spec(tmp_path, forget=forget, retain=TextSource(path=str(mixed))), bench.tokenizer,
                          bench.reference.config)
    share = forget_overlap(data)["retain"]
    assert 0.2 < share < 0.8
    lines = [r.getMessage() for r in caplog.records if r.name == "tuner.engine.data"]
    assert lines == [f"data: forget blocks also appear in other sets: {share:.1%} in retain ({mixed})"]
    assert forget_overlap(build_data(spec(tmp_path), bench.tokenizer, bench.reference.config)) == {}
