"""The report page: one self-contained HTML file with plotly.js embedded, the figures and the pandas tables.

Figures are written as JSON into their own `Plotly.newPlot` calls with every `<` escaped (`\\u003c`), so no string
from the study can end a script element; text shown by plotly or in the tables is HTML-escaped besides.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from autopeft.report._common import esc

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #1f2a44; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 6px 0; font-size: 24px; }
header p { margin: 0; opacity: 0.85; }
nav { padding: 8px 32px; background: #e9edf5; font-size: 14px; }
nav a { margin-right: 14px; color: #1f2a44; }
main { padding: 8px 32px 40px 32px; max-width: 1400px; }
section { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; margin: 16px 0; padding: 8px 16px; }
h2 { font-size: 18px; margin: 10px 0; }
table.dataframe { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
table.dataframe th, table.dataframe td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; }
table.dataframe th { background: #f0f2f7; }
p.note { color: #555; font-size: 13px; }
"""


def _figure_html(key: str, fig: go.Figure) -> str:
    data = json.loads(fig.to_json())
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    config = {"displaylogo": False, "responsive": True}
    return (f'<div id="fig-{key}" class="plotly-graph-div" style="width:100%;"></div>\n'
            f'<script>(function (f) {{ Plotly.newPlot("fig-{key}", f.data, f.layout, {json.dumps(config)}); }})'
            f"({payload});</script>")


def table_html(table: pd.DataFrame, empty: str, header: bool = True) -> str:
    """A pandas table, escaped; `empty` (plain text) when it has no rows."""
    if table.empty:
        return f'<p class="note">{esc(empty)}</p>'
    return table.to_html(index=False, escape=True, border=0, na_rep="-", header=header)


def page(title: str, subtitle: str, summary: pd.DataFrame, sections: Sequence[tuple[str, str, go.Figure | str]],
         footer: str) -> str:
    """The whole HTML document.

    Args:
        title: plain text for <title> and the heading (escaped here).
        subtitle: plain text under the heading (escaped here).
        summary: a (fact, value) table shown first.
        sections: (anchor, heading (plain text), a figure or ready HTML) in page order.
        footer: plain text at the end (escaped here).
    """
    nav = " ".join(f'<a href="#{key}">{esc(heading)}</a>' for key, heading, _ in sections)
    body = []
    for key, heading, content in sections:
        inner = _figure_html(key, content) if isinstance(content, go.Figure) else content
        body.append(f'<section id="{key}"><h2>{esc(heading)}</h2>\n{inner}\n</section>')
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body>",
        f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>",
        f"<nav>{nav}</nav>",
        "<main>",
        f'<section id="summary"><h2>Summary</h2>{table_html(summary, "no settings stored", header=False)}</section>',
        *body,
        f'<p class="note">{esc(footer)}</p>',
        "</main></body></html>",
    ])
