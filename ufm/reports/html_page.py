"""The pieces of ufm's self-contained HTML reports (runs, studies, model audits, reproductions):
escaping, number formatting, tables, figures and the page, which embeds plotly.js once, inline (no
CDN, no network: the file opens on a machine with no internet, and in ten years).
"""

from __future__ import annotations

import html
import math
import time
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ufm.version import __version__

if TYPE_CHECKING:
    import plotly.graph_objects as go

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { padding: 0.6em 1em; background: #f7f7f7; border-left: 4px solid #d62728; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 0.5em; }
.note { color: #666; font-size: 0.9em; } .error { color: #a00; }
"""


def esc(v: Any) -> str:
    """``str(v)`` escaped for HTML text and attribute values."""
    return html.escape(str(v), quote=True)


def fmt(v: Any) -> str:
    """A cell value for people: 4 significant digits, yes/no, '–' for missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def pct(v: float | None) -> str:
    """An accuracy in [0, 1] as ``"97.3%"`` ('–' when missing)."""
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _cell(v: Any) -> str:
    num = isinstance(v, (int, float)) and not isinstance(v, bool)
    cls = ' class="num"' if num else ""
    return f"<td{cls}>{esc(fmt(v))}</td>"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table: one header row, then one row per ``rows`` entry (cells through :func:`fmt`)."""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
    return "\n".join(["<table>", head, *("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows),
                      "</table>"])


def kv_table(pairs: Iterable[tuple[str, Any]]) -> str:
    """An HTML table of (name, value) rows."""
    return "\n".join(["<table>", *(f"<tr><th>{esc(k)}</th>{_cell(v)}</tr>" for k, v in pairs), "</table>"])


def figure_html(fig: "go.Figure", div_id: str, height: int | None = None) -> str:
    """A plotly figure as a ``<div>`` (``height`` in px), for a page made by :func:`page`."""
    if height is not None:
        fig.update_layout(height=height)
    # plotly.js is in the page head once; each figure carries only its data and layout.
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def page(title: str, body: Sequence[str]) -> str:
    """A whole HTML document: ``body`` (HTML fragments) after plotly.js and the CSS, inline."""
    from plotly.offline import get_plotlyjs

    made = time.strftime("%Y-%m-%d %H:%M:%S")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>", f"<style>{CSS}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>', "</head>", "<body>", *body,
        f'<p class="note">Report made {made} by ufm {esc(__version__)} (plotly.js embedded; opens offline).</p>',
        "</body>", "</html>"])
