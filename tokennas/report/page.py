"""The self-contained HTML report."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import optuna
import pandas as pd

from .plots import CostAxis, figures
from .write import write_text

HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")  # a table's |---|---| line


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip()[1:-1].split("|")]


BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline(text: str) -> str:
    """Escaped text with ``**bold**`` as <strong>."""
    return BOLD.sub(r"<strong>\1</strong>", html.escape(text))


def markdown_html(text: str) -> str:
    """The subset of markdown that ``summary.md`` is written in, as HTML: ``#`` headings, ``- `` bullets,
    ``| a | b |`` tables under a ``|---|`` line, paragraphs and ``**bold**``. Every piece of text is escaped."""
    lines, parts, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
        elif match := HEADING.match(line):
            level = len(match.group(1))
            parts.append(f"<h{level}>{html.escape(match.group(2))}</h{level}>")
            i += 1
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].strip().startswith("- "):
                items.append(f"<li>{_inline(lines[i].strip()[2:])}</li>")
                i += 1
            parts.append(f"<ul>{''.join(items)}</ul>")
        elif line.startswith("|") and i + 1 < len(lines) and SEPARATOR.match(lines[i + 1].strip()):
            head = "".join(f"<th>{_inline(cell)}</th>" for cell in _cells(line))
            rows, i = [], i + 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(lines[i])) + "</tr>")
                i += 1
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        else:  # a paragraph runs to the next blank line or block (a stray "|" line is text too)
            words, i = [line], i + 1
            while i < len(lines) and lines[i].strip() and not HEADING.match(lines[i].strip()) \
                    and not lines[i].strip().startswith(("- ", "|")):
                words.append(lines[i].strip())
                i += 1
            parts.append(f"<p>{_inline(' '.join(words))}</p>")
    return "\n".join(parts)


def write_html(study: optuna.Study, frame: pd.DataFrame, objective: str, budget: int, title: str, path: Path,
               mosaic: Path | None = None, ranking: pd.DataFrame | None = None, summary: str = "",
               extra: list[tuple[str, object]] | None = None, axes: list[CostAxis] | None = None) -> None:
    """One self-contained page: the summary rendered from its markdown, plotly.js inlined once, the mosaic
    picture (if any) as data, ``extra`` (title, figure) pairs after the standard figures; ``axes``: the accuracy
    figures' x axes, one figure each (default: MACs)."""
    parts, plotly_js = [], "inline"
    if summary:
        parts.append(markdown_html(summary))
    if ranking is not None and len(ranking):
        parts.append("<h2>Final ranking (re-ranked on more seeds; the baseline is the uniform reference)</h2>"
                     + ranking.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}"))
    if mosaic is not None:
        data = base64.b64encode(mosaic.read_bytes()).decode()
        parts.append("<h2>Mosaic of the best config over validation images</h2>"
                     f"<img src='data:image/png;base64,{data}'>")
    for heading, figure in figures(study, frame, objective, budget, axes) + (extra or []):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(figure, str):
            parts.append(f"<p>{html.escape(figure)}</p>")
        else:
            parts.append(figure.to_html(full_html=False, include_plotlyjs=plotly_js))
            plotly_js = False
    parts.append("<h2>Trials</h2>" + frame.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}"))
    # the summary opens with its own title; a second one above it would only repeat it
    header = "" if summary.lstrip().startswith("# ") else f"<h1>{html.escape(title)}</h1>"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>"
            f"{header}{''.join(parts)}</body></html>")
    write_text(path, page)
