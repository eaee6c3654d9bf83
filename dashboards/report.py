"""`tuner dashboard export`: one self-contained HTML file (plotly.js inlined once) that opens offline.

Every stored string (study name, notes, units, errors, reasons) is HTML-escaped; the figures' JSON is
Plotly's, which escapes `<`, `>` and `/` itself.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path

import plotly.graph_objects as go

from dashboards import figures, plotlyjs
from dashboards.data import StudyData, load_study, table_columns, table_rows
from dashboards.page import (
    FAILING_COLOUR,
    RECOMMENDATION_COLUMNS,
    SECTIONS,
    VERDICT_COLOURS,
    guideline_rows,
    header_facts,
    recommendation_rows,
)
from dashboards.trialtable import cell_text
from tuner.core.errors import TunerError
from tuner.store import Store

CSS = """
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 0 auto; max-width: 1400px; padding: 0 24px 48px;
       color: #1f2328; }
h1 { margin: 24px 0 4px; font-size: 26px; } h2 { margin: 32px 0 6px; font-size: 19px; }
p.lead, .notes { color: #57606a; margin: 4px 0 12px; white-space: pre-wrap; }
table { border-collapse: collapse; font-size: 13px; } th, td { border-bottom: 1px solid #d8dee4; padding: 4px 8px;
       text-align: left; vertical-align: top; }
th { background: #f6f8fa; position: sticky; top: 0; }
table.facts th { background: none; font-weight: 600; position: static; }
table.sortable th { cursor: pointer; user-select: none; } table.sortable th:hover { background: #eaeef2; }
.verdict { font-weight: 700; white-space: nowrap; } .wrap { overflow-x: auto; max-height: 560px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.err { color: #cf222e; max-width: 360px; }
nav a { margin-right: 14px; } footer { margin-top: 36px; color: #6e7781; font-size: 12px; }
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('data-dir') !== 'asc';
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-dir'); });
      th.setAttribute('data-dir', asc ? 'asc' : 'desc');
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
        var nx = parseFloat(x), ny = parseFloat(y), c;
        if (x === '' && y !== '') return 1; if (y === '' && x !== '') return -1;
        c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _plotlyjs() -> str:
    return plotlyjs.source()


def figure_html(fig: go.Figure, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def render(data: StudyData, x: str = "signed") -> str:
    """The whole report as one HTML string (`x`: the Pareto figure's x axis)."""
    figs = figures.all_figures(data, x=x)
    parts = [f"<h1>Study {e(data.name)}</h1>",
             "<p class='lead'>Unlearning hyperparameter study: exported from the store on "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.</p>"]
    if data.notes:
        parts.append(f"<div class='notes' id='study-notes'>{e(data.notes)}</div>")
    parts.append("<nav>" + "".join(f"<a href='#{sid}'>{e(title)}</a>" for sid, title, _ in SECTIONS)
                 + "<a href='#guidelines'>Guidelines</a><a href='#trials'>Trial table</a></nav>")
    parts.append("<table class='facts'>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>"
                                                   for k, v in header_facts(data)) + "</table>")
    parts.append(_recommendations(data))
    parts.append(_guidelines(data))
    for sid, title, lead in SECTIONS:
        parts.append(f"<section id='{sid}'><h2>{e(title)}</h2><p class='lead'>{e(lead)}</p>"
                     f"{figure_html(figs[sid], 'plot-' + sid[4:])}</section>")
    parts.append(_trial_table(data))
    versions = ", ".join(f"{k} {v}" for k, v in (data.versions or {}).items())
    parts.append(f"<footer>unlearn-tuner dashboard export; {e(versions)}</footer>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{e(data.name)} — unlearning "
            f"study report</title><style>{CSS}</style>\n<script type='text/javascript'>{_plotlyjs()}</script>\n"
            "</head><body>\n" + "\n".join(parts) + f"\n<script>{SORT_JS}</script>\n</body></html>\n")


def _recommendations(data: StudyData) -> str:
    rows = recommendation_rows(data)
    if not rows:
        return ("<h2 id='recommendation'>Recommendation</h2><p class='lead'>"
                f"{e(data.recommendation_note or 'no recommendation')}</p>")
    def cell(r: dict[str, str], key: str) -> str:
        failing = r["failing"] and key in ("status", "checks")  # a pick that fails the study's robustness limits
        style = f" class='rec-{key} failing' style='color:{FAILING_COLOUR};font-weight:600'" if failing \
            else f" class='rec-{key}'"
        return f"<td{style}>{e(r[key])}</td>"

    body = "".join("<tr>" + "".join(cell(r, k) for k, _ in RECOMMENDATION_COLUMNS) + "</tr>" for r in rows)
    return ("<h2 id='recommendation'>Recommendation</h2><div class='wrap'><table id='recommendation-table'><thead><tr>"
            + "".join(f"<th>{e(h)}</th>" for _, h in RECOMMENDATION_COLUMNS) + f"</tr></thead><tbody>{body}</tbody>"
            "</table></div>")


def _guidelines(data: StudyData) -> str:
    body = []
    for g in guideline_rows(data):
        colour = VERDICT_COLOURS.get(g["verdict"], "#6e7781")
        body.append(f"<tr><td>{g['number']}</td><td><b>{e(g['title'])}</b>: {e(g['rule'])}</td>"
                    f"<td class='verdict' style='color:{colour}'>{e(g['verdict'])}</td><td>{e(g['reason'])}</td>"
                    f"<td><a href='#{e(g['figure'])}'>{e(g['figure_name'])}</a></td></tr>")
    return ("<section id='guidelines'><h2>5. Tuning guidelines, checked on this study's data</h2><table><thead><tr>"
            "<th>#</th><th>guideline</th><th>check</th><th>evidence</th><th>figure</th></tr></thead><tbody>"
            + "".join(body) + "</tbody></table></section>")


def _trial_table(data: StudyData) -> str:
    rows = table_rows(data)
    columns = table_columns(data)
    head = "".join(f"<th title='sort by {e(c.param.label if c.param else c.label)}' data-column='{e(c.key)}'>"
                   f"{e(c.label)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c.key)
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            shown = e(cell_text(c.key, v, c.param))
            cls = " class='num'" if numeric else (" class='err'" if c.key == "error" and v else "")
            cells.append(f"<td{cls} data-v='{e('' if v is None else v)}'>{shown}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<section id='trials'><h2>4c. Trials ({len(rows)})</h2><p class='lead'>Click a column header to sort."
            f"</p><div class='wrap'><table class='sortable' id='trial-table'><thead><tr>{head}</tr></thead><tbody>"
            + "".join(body) + "</tbody></table></div></section>")


def export(store: Store, name: str, output: str | Path, x: str = "signed") -> Path:
    """Write the report of study `name` to `output`; TunerError for an unknown study or a missing folder."""
    out = Path(output).expanduser()
    if out.is_dir():
        raise TunerError(f"-o: {out} is a directory; name the HTML file to write, e.g. {out / (name + '.html')}")
    if not out.parent.exists():
        raise TunerError(f"-o: folder {out.parent} does not exist")
    data = load_study(store, name)
    text = render(data, x=x)
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as err:
        raise TunerError(f"-o: cannot write {out}: {err.strerror}") from None
    return out
