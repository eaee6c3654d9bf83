"""The trial table of the study page: filtered, sorted and paged on the server, drawn as a plain HTML table.

Why not `dash_table.DataTable`: Dash 4 deprecates it, and its 480 KB of script and its first render were about
0.3 s of a 500-trial page load on a 2-core machine (bench/dashboard_load.py). Here only the visible page of
rows is sent and drawn; sorting, filtering and paging are one small callback each time.

Filter syntax (comma-separated terms, all must hold): `COLUMN OP VALUE` with OP one of = != > >= < <=
(`status = failed`, `forget_gap > 0.1`, `lr<=1e-3`), or bare text, matched case-insensitively against the
unit, status, outcome and error (`ga_gd`, `diverged`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from dash import dcc, html

from dashboards.data import Column, table_columns
from tuner.core.hparams import Hyperparameter

PAGE_SIZE = 15
# shown with the "all columns" box: fewer columns are easier to read
OPTIONAL = ("forget_es", "unseen_nll", "retain_nll", "selected_step", "effective_batch", "world_size", "sharding", "device",
            "precision")
METRICS = ("forget_gap", "utility_drop", "mia_auc", "privleak", "forget_em", "forget_es", "forget_nll", "unseen_nll",
           "retain_nll")  # to 4 decimals
TEXT_SEARCHED = ("unit", "status", "outcome", "precision", "error")
# a column name: letters of any script (λ, β), '_', ' ', '.', '-'
_TERM = re.compile(r"^\s*((?:[^\W\d]|[ .-])+?)\s*(!=|>=|<=|=|>|<)\s*(.+?)\s*$")
_OPS = {"=": lambda a, b: a == b, "!=": lambda a, b: a != b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
        "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}
CSS = """
.trial-controls { display: flex; gap: 18px; align-items: center; font-size: 13px; margin: 6px 0; flex-wrap: wrap; }
.trial-controls input[type=text] { width: 420px; padding: 3px 6px; font-size: 13px; }
table.trials { border-collapse: collapse; font-size: 12px; }
table.trials th, table.trials td { border-bottom: 1px solid #d8dee4; padding: 3px 6px; white-space: nowrap; }
table.trials th { background: #f6f8fa; }
table.trials th button { border: 0; background: none; font: inherit; font-weight: 600; cursor: pointer; padding: 0; }
table.trials td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.trials td.err { color: #cf222e; max-width: 320px; overflow: hidden; text-overflow: ellipsis; }
.trial-wrap:not(.all-columns) .optional { display: none; }
.pager button { margin: 0 6px; }
"""


class FilterError(ValueError):
    """A filter term the table cannot apply; the message names the term."""


@dataclass(frozen=True)
class View:
    """What the user asked the table to show: sort column and direction, filter text, page (0-based)."""

    sort: str = "id"
    descending: bool = False
    filter: str = ""
    page: int = 0

    @classmethod
    def from_data(cls, data: dict[str, Any] | None, columns: list[Column] | None = None) -> View:
        data = data or {}
        sort = data.get("sort") if data.get("sort") in {c.key for c in columns or table_columns()} else "id"
        return cls(sort, bool(data.get("descending")), str(data.get("filter") or ""), max(0, int(data.get("page") or 0)))

    def as_data(self) -> dict[str, Any]:
        return {"sort": self.sort, "descending": self.descending, "filter": self.filter, "page": self.page}

    def sorted_by(self, column: str) -> View:
        """Clicking a header: that column ascending, or the other way round if it already sorts the table."""
        descending = not self.descending if column == self.sort else False
        return replace(self, sort=column, descending=descending, page=0)


def _numeric(columns: list[Column]) -> set[str]:
    return {c.key for c in columns if c.numeric}


def column_key(name: str, columns: list[Column] | None = None) -> str:
    """A column named by its key or its header label, any case ('forget gap', 'forget_gap', 'λ', 'β')."""
    columns = columns or table_columns()
    wanted = name.strip().lower().replace(" ", "_")
    for c in columns:
        if wanted in (c.key, c.label.lower().replace(" ", "_")):
            return c.key
    raise FilterError(f"unknown column '{name.strip()}' (columns: {', '.join(c.key for c in columns)})")


def _predicate(term: str, columns: list[Column]):
    match = _TERM.match(term)
    if match is None:
        needle = term.strip().lower()
        return lambda row: any(needle in str(row.get(k) or "").lower() for k in TEXT_SEARCHED)
    key, op, raw = column_key(match.group(1), columns), match.group(2), match.group(3).strip().strip("'\"")
    numeric = key in _numeric(columns)
    if numeric:
        try:
            value: Any = float(raw)
        except ValueError:
            raise FilterError(f"'{term.strip()}': {key} is a number, '{raw}' is not") from None
    elif op in ("=", "!="):
        value = raw.lower()
    else:
        raise FilterError(f"'{term.strip()}': {key} is text; use = or != with it")

    def test(row: dict[str, Any]) -> bool:
        cell = row.get(key)
        if cell is None or cell == "":
            return op == "!="
        if not numeric:
            cell = str(cell).lower()
        return _OPS[op](cell, value)

    return test


def apply(rows: list[dict[str, Any]], view: View, columns: list[Column] | None = None) -> list[dict[str, Any]]:
    """The rows the view selects, in its order; empty cells sort last either way. FilterError for a bad term.
    `columns`: the table's (`dashboards.data.table_columns`; default: every declared hyperparameter's)."""
    columns = columns or table_columns()
    tests = [_predicate(t, columns) for t in view.filter.split(",") if t.strip()]
    kept = [r for r in rows if all(test(r) for test in tests)]
    present = [r for r in kept if r.get(view.sort) not in (None, "")]
    absent = [r for r in kept if r.get(view.sort) in (None, "")]
    if view.sort in _numeric(columns):
        present.sort(key=lambda r: r[view.sort], reverse=view.descending)
    else:
        present.sort(key=lambda r: str(r[view.sort]).lower(), reverse=view.descending)
    return present + absent


def cell_text(key: str, value: Any, param: Hyperparameter | None = None) -> str:
    """How a cell reads: a hyperparameter as its declaration formats it, metrics to 4 decimals, tokens with
    separators."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if param is not None:
        return param.format(value)
    if key in METRICS:
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}" if key == "tokens" else str(value)
    return f"{value:.4g}"


def _cell(column: Column, value: Any) -> html.Td:
    key = column.key
    classes = [c for c in ("num" if column.numeric else "", "err" if key == "error" and value else "",
                           "optional" if key in OPTIONAL else "") if c]
    text = cell_text(key, value, column.param)
    return html.Td(text, className=" ".join(classes) or None, title=text if key == "error" and text else None,
                   **{"data-column": key})


def body(rows: list[dict[str, Any]], view: View,
         columns: list[Column] | None = None) -> tuple[list[html.Tr], str, View, str | None]:
    """The visible page of rows, the pager's label, the view (page clamped) and a filter problem, if any."""
    columns = columns or table_columns()
    problem = None
    try:
        shown = apply(rows, view, columns)
    except FilterError as err:
        problem, shown = str(err), apply(rows, replace(view, filter="", page=0), columns)
    pages = max(1, math.ceil(len(shown) / PAGE_SIZE))
    view = replace(view, page=min(view.page, pages - 1))
    first = view.page * PAGE_SIZE
    page_rows = shown[first:first + PAGE_SIZE]
    trs = [html.Tr([_cell(c, r.get(c.key)) for c in columns]) for r in page_rows]
    of = f"of {len(shown)}" + (f" (filtered from {len(rows)})" if len(shown) != len(rows) else "")
    label = f"trials {first + 1}–{first + len(page_rows)} {of}, page {view.page + 1}/{pages}" if page_rows \
        else f"no trials match ({len(rows)} in the study)"
    return trs, label, view, problem


def sort_marks(view: View, columns: list[Column] | None = None) -> list[str]:
    """The header labels, the sorting column marked with its direction."""
    return [c.label + ((" ▼" if view.descending else " ▲") if c.key == view.sort else "")
            for c in columns or table_columns()]


def layout(rows: list[dict[str, Any]], view: View | None = None, columns: list[Column] | None = None) -> html.Div:
    """The table with its filter box, column switch and pager, showing `view` (default: by trial id)."""
    columns = columns or table_columns()
    view = view or View()
    trs, label, view, problem = body(rows, view, columns)
    marks = sort_marks(view, columns)
    head = html.Tr([html.Th(html.Button(mark, id={"type": "trial-sort", "column": c.key},
                                        title=f"sort by {c.param.label if c.param else c.label}"),
                            className="optional" if c.key in OPTIONAL else None, **{"data-column": c.key})
                    for c, mark in zip(columns, marks, strict=True)])
    return html.Div([
        dcc.Store(id="trial-view", data=view.as_data()),
        html.Div([
            dcc.Input(id="trial-filter", type="text", debounce=True, value=view.filter,
                      placeholder="filter, e.g.  status = failed,  forget_gap > 0.1,  ga_gd"),
            dcc.Checklist(id="trial-columns", options=[{"label": " all columns", "value": "all"}], value=[],
                          inline=True),
            html.Span([html.Button("‹ previous", id="trial-prev"), html.Span(label, id="trial-page-label"),
                       html.Button("next ›", id="trial-next")], className="pager"),
        ], className="trial-controls"),
        html.Div(problem, id="trial-filter-problem", className="error"),
        html.Div(html.Table([html.Thead(head), html.Tbody(trs, id="trial-tbody")], id="trial-table",
                            className="trials"), id="trial-wrap", className="trial-wrap wrap"),
    ])
