"""Every figure a model is measured by, declared once: its name in a metrics dict, its label, which way is
better, what "unlearned" means for it and, for those a study may optimise, the value the approximate-retraining
target puts it at. Tables, the spec's objectives, the recommender's band and the dashboards read this list.

The forget-side figures compare the forget set (seen in training) with the unseen set (never seen) of the
same kind of text: a model that never saw the forget set treats the two alike. Where the study has an exact
retrain (the testbed), its values are the yardstick instead; otherwise the approximate target is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Better = Literal["ideal", "low", "high", "none"]


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    better: Better  # "ideal": closest to `ideal`; "none": reported, no direction
    unlearned: str  # one line: what an unlearned model shows
    ideal: float | None = None  # the approximate target's value ("ideal" metrics)
    tolerance: str | None = None  # the spec `target` field bounding |value - ideal| in the success band
    remembered_above: bool = False  # which side of `ideal` means the forget set is still remembered
    fmt: str = ".4f"

    def objective(self, value: float) -> float:
        """What the sampler minimises: the distance to the ideal, else the value itself."""
        return abs(value - self.ideal) if self.ideal is not None else value

    def side(self, value: float) -> str:
        """remembered / over_unlearned: which side of the ideal `value` is on."""
        above = value > (self.ideal or 0.0)
        return "remembered" if above == self.remembered_above else "over_unlearned"


CATALOGUE: tuple[Metric, ...] = (
    Metric("forget_nll", "forget NLL", "none", "as high as on unseen text"),
    Metric("unseen_nll", "unseen NLL", "none", "unchanged: text of the same kind never trained on"),
    Metric("retain_nll", "retain NLL", "low", "unchanged from the original model"),
    Metric("general_nll", "general NLL", "low", "unchanged from the original model"),
    Metric("forget_gap", "forget gap (forget − unseen NLL)", "ideal", "0: forget text as surprising as unseen",
           ideal=0.0, tolerance="gap_tolerance", remembered_above=False, fmt="+.4f"),
    Metric("utility_drop", "utility drop (retain NLL − original's)", "low", "near 0: utility kept", fmt="+.4f"),
    Metric("mia_auc", "MIA AUC, min-k (0.5 = unlearned)", "ideal", "0.5: members indistinguishable",
           ideal=0.5, tolerance="mia_tolerance", remembered_above=True),
    Metric("mia_auc_mink", "MIA AUC min-k", "ideal", "0.5", ideal=0.5, remembered_above=True),
    Metric("mia_auc_minkpp", "MIA AUC MinK++", "ideal", "0.5", ideal=0.5, remembered_above=True),
    Metric("mia_auc_loss", "MIA AUC loss", "ideal", "0.5", ideal=0.5, remembered_above=True),
    Metric("mia_auc_zlib", "MIA AUC zlib", "ideal", "0.5", ideal=0.5, remembered_above=True),
    Metric("mia_auc_ref", "MIA AUC vs original", "none",
           "the exact retrain's value: forget text became less likely than under the original, unseen did not"),
    Metric("privleak", "privleak % (MUSE; 0 = like the reference)", "ideal",
           "0: the min-k AUC equals the reference's (exact retrain, else 0.5); < 0 still leaks, > 0 over-unlearned",
           ideal=0.0, tolerance="privleak_tolerance", remembered_above=False, fmt="+.2f"),
    Metric("forget_em", "exact memorisation, forget", "low", "at most the target's (unseen text's, or the "
           "exact retrain's forget EM)"),
    Metric("unseen_em", "exact memorisation, unseen", "none", "the approximate target of forget EM"),
    Metric("forget_es", "extraction strength, forget", "low", "at most the target's"),
    Metric("unseen_es", "extraction strength, unseen", "none", "the approximate target of forget ES"),
    Metric("forget_verbmem", "VerbMem ROUGE-L, forget", "low", "at most the target's (unseen text's, or the exact "
           "retrain's): greedy continuations no closer to the true text than a model that never saw it"),
    Metric("unseen_verbmem", "VerbMem ROUGE-L, unseen", "none", "the approximate target of forget VerbMem"),
)
BY_NAME = {m.name: m for m in CATALOGUE}
OBJECTIVES = ("forget_gap", "utility_drop", "mia_auc", "privleak")  # what a spec may optimise
# The metrics of `tuner unlearn`'s before/after table, in order.
TABLE = ("forget_nll", "unseen_nll", "retain_nll", "general_nll", "forget_gap", "mia_auc_mink", "mia_auc_minkpp",
         "mia_auc_loss", "mia_auc_zlib", "mia_auc_ref", "privleak", "forget_em", "unseen_em", "forget_es",
         "unseen_es", "forget_verbmem", "unseen_verbmem")
# the forget-side figures the Pareto view can put on its x axis besides the forget gap
PARETO_X = ("privleak", "mia_auc", "mia_auc_minkpp", "forget_em", "forget_es", "forget_verbmem")
# objectives that join the forget gap in the target band when a study optimises them
BAND = tuple(name for name in OBJECTIVES if BY_NAME[name].tolerance is not None and name != "forget_gap")


def get(name: str) -> Metric:
    return BY_NAME[name]


def band_metrics(objectives: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The band's figures beyond the forget gap for a study optimising `objectives` (its MIA AUC, privleak)."""
    return tuple(name for name in BAND if name in objectives)


def leak_reference_text(exact_retrain: dict | None) -> str:
    """What a study's privleak figures are relative to: the exact retrain's min-k AUC where the study has one,
    else the approximate target's 0.5, which is no model's measurement."""
    auc = (exact_retrain or {}).get("mia_auc_mink")
    if auc is not None:
        return f"the exact retrain (min-k AUC {auc:.3f})"
    return "the approximate target (min-k AUC 0.5): this study has no exact retrain"
