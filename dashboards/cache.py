"""The dashboards' study cache: the last few studies read from the store, with their figures, shared by the
page's callbacks and built ahead when a browser asks for a study page."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from dashboards import figures, queries
from dashboards.data import StudyData, load_study
from tuner.core.errors import TunerError
from tuner.store import Store, safe_url


class StudyCache:
    """The last few studies loaded, keyed by (name, fingerprint): a refresh that finds nothing new costs one
    small query, and the study page's callbacks share one load. A value being built is built once: a second
    caller (the page's callback arriving while a prefetch runs) waits for it instead of building it again."""

    def __init__(self, store: Store, size: int = 8) -> None:
        self.store, self.size = store, size
        self.items: OrderedDict[tuple, Any] = OrderedDict()
        self.building: dict[tuple, Future] = {}
        self.queued: set[str] = set()  # names waiting for the prefetch worker
        self.lock = threading.Lock()
        self.prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuner-prefetch")

    def _get(self, key: tuple, build) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            pending = self.building.get(key)
            if pending is None:
                pending = self.building[key] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            return pending.result()
        try:
            value = build()
        except BaseException as err:
            with self.lock:
                del self.building[key]
            pending.set_exception(err)
            raise
        with self.lock:
            del self.building[key]
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        pending.set_result(value)
        return value

    def prefetch(self, name: str) -> bool:
        """Start building a study page's data and figures in the background. Called when the browser asks for
        the page's HTML: the server then works while the browser parses the Dash bundles, instead of after
        the page's first callback arrives (about half a second later).

        At most `size` names wait at once and a name waits once: a burst of page requests (a reload storm, a
        crawler) cannot queue unbounded work. A request left out loses nothing but the head start: the page's
        own callback builds the study. False when left out."""
        with self.lock:
            if name in self.queued or len(self.queued) >= self.size:
                return False
            self.queued.add(name)

        def build() -> None:
            with self.lock:
                self.queued.discard(name)
            with contextlib.suppress(Exception):  # the page's own callback reports a bad name or store error
                self.figures(name)

        self.prefetcher.submit(build)
        return True

    def _stamp(self, name: str) -> tuple:
        stamp = queries.study_stamp(self.store, name)
        if stamp == (None,):
            raise TunerError(f"no study named '{name}' in {safe_url(self.store.url)}")
        return stamp

    def study(self, name: str) -> tuple[tuple, StudyData]:
        stamp = self._stamp(name)
        return stamp, self._get((name, stamp, "data"), lambda: load_study(self.store, name))

    def figures(self, name: str, x: str = "signed") -> tuple[tuple, StudyData, dict[str, dict]]:
        """The study and its figures (`x`: the Pareto figure's x axis), both of the same state of the store
        (one fingerprint for both)."""
        stamp = self._stamp(name)
        data = self._get((name, stamp, "data"), lambda: load_study(self.store, name))
        figs = self._get((name, stamp, f"figures-{x}"), lambda: page_figures(data, x))
        return stamp, data, figs


def page_figures(data: StudyData, x: str = "signed") -> dict[str, dict]:
    """Figures as plain dicts (what dcc.Graph sends anyway), with uirevision so zoom survives refreshes."""
    out = {}
    for key, fig in figures.all_figures(data, x=x).items():
        fig.update_layout(uirevision=f"{data.name}:{key}")
        out[key] = fig.to_plotly_json()
    return out
