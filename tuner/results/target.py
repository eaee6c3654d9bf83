"""The target: what counts as unlearned, useful and robust. Its defaults live here once; the recommender
reads `Target.rule`, which adds the exact-retrain model's values the robustness limits are measured from."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tuner.results.candidates import YARDSTICK, yardstick


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


    gap_tolerance: float = Field(0.1, gt=0, description="|forget gap| within this is 'unlearned'")
    utility_tolerance: float = Field(0.5, gt=0, description="acceptable utility drop (NLL nats)")
    mia_tolerance: float = Field(0.1, gt=0, description="|MIA AUC - 0.5| within this is indistinguishable")
    privleak_tolerance: float = Field(
        5.0, gt=0, description="|privleak| within this (percent) leaks like the reference (MUSE's band); part of "
                               "the band when privleak is an objective")
    em_tolerance: float | None = Field(
        None, ge=0, description="forget exact memorisation at most the target's plus this: the exact retrain's "
                                "forget EM where the study has one, else the candidate's own unseen EM "
                                "(null: no such limit)")
    min_robustness: float = Field(0.5, ge=0, le=1, description="share of succeeding neighbours for 'robust'")
    neighbourhood: float = Field(0.25, gt=0, description="kernel width in hyperparameter space scaled to [0, 1]")
    relearn_limit: float | None = Field(
        None, gt=0, description="after the relearning attack the forget gap must stay >= -relearn_limit, measured "
                                "from the exact-retrain model's gap after the same attack where there is one")
    quant_limit: float | None = Field(
        None, gt=0, description="after 4-bit quantization the forget gap must stay >= -quant_limit")
    candidates: Literal["all", "first_at_target"] = Field(
        "all", description="all: every evaluated checkpoint competes; first_at_target: per trial only the first "
                           "checkpoint whose forget gap reaches the band (MUSE's selection rule)")
    confirmations: int = Field(
        3, ge=0, le=20, description="per search unit, re-runs that score a mid-run candidate in full before it "
                                    "can be recommended (its curve point measured utility on a subsample or "
                                    "not at all, and no MIA); 0: only selected checkpoints can be recommended")

    def rule(self, exact_retrain: dict | None = None) -> dict:
        """The recommender's view of the target: every field (defaults filled in, also for specs stored by
        older versions) and the exact-retrain model's values the robustness limits are measured from."""
        return {**self.model_dump(), YARDSTICK: yardstick(exact_retrain)}
