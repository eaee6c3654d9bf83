"""Which plotly.js the pages load.

The study page draws scatter and bar traces only, so it loads plotly.js's official "basic" partial bundle
(1.2 MB, vendored in `static/`) instead of the full one (4.8 MB): on a 2-core machine parsing and compiling
the full bundle was the largest single item of a cold page load. The basic bundle is used only when it is the
same plotly.js version as the one the installed `plotly` package bundles; otherwise the full bundle is.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

BASIC = Path(__file__).with_name("static") / "plotly-basic.min.js"
BASIC_TRACE_TYPES = frozenset({"scatter", "bar", "pie"})


@cache
def basic_version() -> str | None:
    if not BASIC.is_file():
        return None
    with BASIC.open(encoding="utf-8") as fh:
        match = re.search(r"plotly\.js \(basic - minified\) v(\S+)", fh.read(300))
    return match.group(1) if match else None


def full_version() -> str:
    from plotly.offline import get_plotlyjs_version

    return get_plotlyjs_version()


def use_basic() -> bool:
    return basic_version() is not None and basic_version() == full_version()


def source() -> str:
    """The bundle's text, for the offline HTML export."""
    if use_basic():
        return BASIC.read_text(encoding="utf-8")
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()
