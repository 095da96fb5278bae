"""One self-contained HTML page: sections, pandas tables and plotly figures that share a single
embedded plotly.js, so the file opens offline and stays one file.

Script errors are caught on the page and listed in a visible box (id "js-errors"), so a broken
figure shows up in a browser and in headless tests alike.
"""

from __future__ import annotations

import html
from typing import Callable

import pandas as pd
from plotly.offline import get_plotlyjs

from analyses import plots


PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1400px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 2em; }
table.frame { border-collapse: collapse; font-size: 0.85em; margin: 8px 0; }
table.frame td, table.frame th { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
table.frame th { background: #f0f0f0; }
pre.doc { white-space: pre-wrap; background: #f7f7f7; padding: 10px; font-size: 0.85em; }
.scroll { overflow-x: auto; }
#js-errors { color: #b00; font-family: monospace; }
#js-errors:empty { display: none; }
"""

# Registered before plotly.js so that its errors, and every figure's, are caught too.
ERROR_CATCHER = """
window.addEventListener('error', function (e) {
  var box = document.getElementById('js-errors');
  if (box) { box.textContent += 'script error: ' + e.message + '\\n'; }
});
"""


def frame_html(frame: pd.DataFrame, links: dict[str, Callable[[dict], str]] | None = None) -> str:
    """A pandas table; `links` maps a column to a function of the row (a dict) that gives the link
    target of each of its cells. Every cell is HTML-escaped."""
    shown = frame.copy()
    for column in shown.columns:
        if shown[column].dtype == object:
            shown[column] = shown[column].map(lambda v: v if v is None or isinstance(v, float) else html.escape(str(v)))
    for column, target in (links or {}).items():
        shown[column] = [f"<a href='{html.escape(target(row))}'>{html.escape(str(row[column]))}</a>"
                         for row in frame.to_dict("records")]
    table = shown.to_html(classes="frame", index=False, float_format=lambda v: f"{v:.3f}", na_rep="", border=0,
                          escape=False)
    return f"<div class='scroll'>{table}</div>"


class Page:
    """Sections of the report, each figure a div that shares the one embedded plotly.js."""

    def __init__(self, title: str, extra_css: str = ""):
        self.title, self.parts, self.n_figures, self.extra_css = title, [], 0, extra_css

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)

    def heading(self, text: str, level: int = 2) -> None:
        self.add(f"<h{level}>{html.escape(text)}</h{level}>")

    def figure(self, fig) -> None:
        self.n_figures += 1
        self.add(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{self.n_figures}"))

    def render(self) -> str:
        return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{PAGE_CSS}{plots.EXAMPLE_CSS}{self.extra_css}</style><script>{ERROR_CATCHER}</script>"
                f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
                f"<h1>{html.escape(self.title)}</h1><pre id='js-errors'></pre>{''.join(self.parts)}</body></html>\n")


