"""The shared loop: results do not depend on how an effective batch is split; the schedule is as stated."""

from __future__ import annotations

import torch

from tuner.engine.methods.base import nll_term
from tuner.engine.training import IndexStream, LossOut, OptimConfig, lr_multiplier, run_loop, warmup_of


def test_gradient_accumulation_matches_one_big_batch(bench, data):
    """16 blocks as 1 x 16 or as 4 x 4 with accumulation: the same weights after 3 steps."""
    batches = data.forget[:48].view(3, 16, -1)
    finals = []
    for micro_size in (16, 4):
        model = bench.fresh()
        accum = 16 // micro_size

        def micro(step, i, model=model, micro_size=micro_size):
            return LossOut(nll_term(model, batches[step, i * micro_size:(i + 1) * micro_size]))

        run_loop(model, micro, 3, accum, OptimConfig(lr=1e-3, warmup_ratio=0), torch.device("cpu"))
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
    for key in finals[0]:
        assert torch.allclose(finals[0][key], finals[1][key], atol=2e-5), key


def test_schedule_warms_up_then_decays():
    f = lr_multiplier("linear", 2, 10)
    values = [f(s) for s in range(10)]
    assert values[0] < values[1] < values[2] == 1.0
    assert all(a >= b for a, b in zip(values[2:], values[3:], strict=False)) and values[-1] < 0.2
    cos = lr_multiplier("cosine", 0, 10)
    assert cos(0) == 1.0 and 0.45 < cos(5) < 0.55


def test_index_stream_visits_every_row_once_per_epoch():
    stream = IndexStream(10, seed=3)
    first, second = stream.take(10), stream.take(10)
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)
    assert torch.equal(IndexStream(10, seed=3).take(10), first)


def test_wsd_holds_the_peak_until_its_decay_and_a_fixed_warmup_ignores_the_horizon():
    f = lr_multiplier("wsd", 2, 20, decay_ratio=0.25)
    values = [f(s) for s in range(20)]
    assert values[0] < values[1] < values[2] == 1.0 == values[15]
    assert values[16:] == [0.8, 0.6, 0.4, 0.2]
    short, long = lr_multiplier("constant", 3, 10), lr_multiplier("constant", 3, 1000)
    assert [short(s) for s in range(10)] == [long(s) for s in range(10)]
    assert warmup_of(OptimConfig(lr=1, warmup_steps=3), 1000) == 3 == warmup_of(OptimConfig(lr=1, warmup_ratio=0.3), 10)


def test_under_a_constant_schedule_a_long_trial_passes_through_the_short_ones_checkpoints(unlearn):
    """The prefix of a 4-epoch trial is the 2-epoch trial: a checkpoint at step S of a long trial is what a run
    ending at S gives. Under a linear decay it is not."""
    common = dict(method="ga_gd", batch_size=32, eval_every=8, eval_batch_size=64, stop_at_target=False,
                  warmup_steps=2, seed=4)

    def curves(schedule):
        short, long = (unlearn(params={"lr": 1e-3, "epochs": e}, schedule=schedule, **common) for e in (2, 4))
        assert long.planned_steps >= 2 * short.planned_steps > short.planned_steps
        by_step = {p["step"]: p for p in long.curve}
        return [(p, by_step[p["step"]]) for p in short.curve]

    for a, b in curves("constant"):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 for k in a), (a, b)
    assert any(abs(a["forget_gap"] - b["forget_gap"]) > 1e-3 for a, b in curves("linear"))
