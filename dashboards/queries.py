"""Read-only store queries the `Store` class does not offer, written against `tuner.store.schema`."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import func, select

from tuner.core.status import UNFINISHED
from tuner.store import Store
from tuner.store.schema import Check, CurvePoint, Search, Study, Trial


def trial_curve(store: Store, trial_id: int) -> list[dict[str, Any]]:
    return store.curve(trial_id)


def study_list(store: Store) -> list[dict[str, Any]]:
    """The list page: every study with its model, status, notes, target and trial counts by status."""
    with store.sessions() as s:
        counts: dict[int, Counter] = {}
        for study_id, status, n in s.execute(select(Search.study_id, Trial.status, func.count(Trial.id))
                                             .join(Trial, Trial.search_id == Search.id)
                                             .group_by(Search.study_id, Trial.status)):
            counts.setdefault(study_id, Counter())[status] = n
        units = dict(s.execute(select(Search.study_id, func.count(Search.id)).group_by(Search.study_id)).all())
        out = []
        for st in s.scalars(select(Study).order_by(Study.created_at)):
            spec = st.spec or {}
            c = counts.get(st.id, Counter())
            out.append({"name": st.name, "model": st.model, "status": st.status, "notes": spec.get("notes") or "",
                        "units": units.get(st.id, 0), "trials": sum(c.values()), "by_status": dict(c),
                        "finished": sum(n for k, n in c.items() if k not in UNFINISHED),
                        "budget": (spec.get("budget") or {}).get("trials"), "created_at": st.created_at,
                        "updated_at": st.updated_at})
    return out


def study_stamp(store: Store, name: str) -> tuple:
    """A cheap fingerprint of a study's state (status, trials, curve points, robustness checks) to know when to
    redraw. Checks count on their own: the checks re-run after the trials (`tuner.study.rechecks`) add no trial."""
    with store.sessions() as s:
        row = s.execute(select(Study.id, Study.status, Study.updated_at).where(Study.name == name)).first()
        if row is None:
            return (None,)
        trials = s.execute(select(func.count(Trial.id), func.max(Trial.finished_at))
                           .join(Search, Search.id == Trial.search_id).where(Search.study_id == row[0])).first()
        points = s.scalar(select(func.count()).select_from(CurvePoint).join(Trial, Trial.id == CurvePoint.trial_id)
                          .join(Search, Search.id == Trial.search_id).where(Search.study_id == row[0]))
        checks = s.execute(select(func.count(), func.max(Check.created_at)).select_from(Check)
                           .join(Trial, Trial.id == Check.trial_id).join(Search, Search.id == Trial.search_id)
                           .where(Search.study_id == row[0])).first()
        return (row[1], str(row[2]), trials[0], str(trials[1]), points, checks[0], str(checks[1]))
