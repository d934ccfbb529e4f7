"""One self-contained HTML page: sections of text, tables and base64-embedded PNG figures.

A report is a list of `Section`s; a section has a title, a text (plain text,
paragraphs separated by blank lines) and blocks (`Table`, `Figure`, `RawHtml`).
The page loads nothing from outside (no scripts, fonts or stylesheets), so it opens
offline.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field


@dataclass
class Figure:
    png: bytes
    caption: str
    filename: str  # also written next to the HTML as a PNG file

    @property
    def alt(self) -> str:
        return self.filename


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class RawHtml:
    html: str


@dataclass
class Section:
    title: str
    text: str = ""
    blocks: list = field(default_factory=list)  # Table | Figure | RawHtml


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } caption { caption-side: top; text-align: left; font-weight: bold; padding: 0.3em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.88em; color: #444; } .up { color: #1a7f37; font-weight: bold; } .down { color: #b42318; font-weight: bold; }
nav ul { columns: 2; } .note { color: #555; font-size: 0.9em; }
"""


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def _paragraphs(text: str) -> str:
    parts = [p.strip() for p in text.strip().split("\n\n") if p.strip()]
    return "".join(f"<p>{html.escape(p)}</p>" for p in parts)


def _cell(value: str) -> str:
    escaped = html.escape(str(value))
    return escaped.replace("↑", '<span class="up">↑</span>').replace("↓", '<span class="down">↓</span>')


def render_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_figure(fig: Figure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(fig.alt)}">'
        f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>"
    )


def render_block(block) -> str:
    if isinstance(block, Table):
        return render_table(block)
    if isinstance(block, Figure):
        return render_figure(block)
    if isinstance(block, RawHtml):
        return block.html
    raise TypeError(f"a report block must be a Table, Figure or RawHtml, not {type(block).__name__}")


def render_page(title: str, intro: str, sections: list[Section]) -> str:
    slugs, parts = [], []
    for section in sections:
        slug = _slug(section.title)
        while slug in slugs:
            slug += "-x"
        slugs.append(slug)
        body = _paragraphs(section.text) + "".join(render_block(b) for b in section.blocks)
        parts.append(f'<section id="{slug}"><h2>{html.escape(section.title)}</h2>{body}</section>')
    nav = "".join(f'<li><a href="#{s}">{html.escape(sec.title)}</a></li>' for s, sec in zip(slugs, sections))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{_paragraphs(intro)}<nav><ul>{nav}</ul></nav>"
        + "".join(parts)
        + "</body></html>\n"
    )
