"""HTML for report.html: one self-contained page that opens offline.

Every image is embedded as a data: URI, the style sheet is inline, and there is no script at
all; the page's Content-Security-Policy forbids scripts and any other source, so even a
mistake here cannot make a browser fetch anything. Markup is built only by the functions below:
every value that comes from data (class names are the user's folder names, file names,
reasons) goes through `esc`, and only `Markup` (what these functions return) is inserted as it is.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from string import Template


class Markup(str):
    """HTML made by this module's functions: inserted without escaping."""

    __slots__ = ()


def esc(value: object) -> Markup:
    """`value` as text in HTML (attributes included); Markup passes through."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def join(parts: Iterable[object]) -> Markup:
    return Markup("".join(esc(part) for part in parts))


def data_uri(content: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(content).decode('ascii')}"


def image(content: bytes, mime: str, alt: str, css_class: str = "") -> Markup:
    klass = f' class="{esc(css_class)}"' if css_class else ""
    return Markup(f'<img src="{data_uri(content, mime)}" alt="{esc(alt)}"{klass}>')


def tag(name: str, content: object, css_class: str = "") -> Markup:
    """<name class=...>content</name>; `name` is one of this module's literals, never data."""
    klass = f' class="{esc(css_class)}"' if css_class else ""
    return Markup(f"<{name}{klass}>{esc(content)}</{name}>")


def paragraph(content: object, css_class: str = "") -> Markup:
    return tag("p", content, css_class)


def code(content: object) -> Markup:
    return tag("code", content)


def table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], numeric_from: int = 1
) -> Markup:
    """A table; columns from `numeric_from` on are right-aligned (numbers)."""

    def cells(row: Sequence[object], cell: str) -> str:
        return "".join(
            tag(cell, value, "num" if i >= numeric_from else "") for i, value in enumerate(row)
        )

    head = f"<thead><tr>{cells(headers, 'th')}</tr></thead>"
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    return Markup(f"<table>{head}<tbody>{body}</tbody></table>")


def figure(content: Markup, caption: object = "") -> Markup:
    caption_html = tag("figcaption", caption) if caption != "" else ""
    return Markup(f"<figure>{content}{caption_html}</figure>")


def gallery(figures: Iterable[Markup]) -> Markup:
    return tag("div", join(figures), "gallery")


def details(summary: object, content: Markup) -> Markup:
    """Folded content (no script: the browser's own <details>)."""
    return Markup(f"<details>{tag('summary', summary)}{content}</details>")


def bar(fraction: float, full_px: int = 200) -> Markup:
    """A horizontal bar, `fraction` (0..1) of `full_px` pixels long."""
    width = max(0.0, min(1.0, float(fraction))) * full_px
    return Markup(f'<span class="bar" style="width:{width:.0f}px"></span>')


@dataclass(frozen=True)
class Section:
    """One part of the page: its content, or (absent) the reason it has none."""

    anchor: str  # a literal of the report module, never data
    heading: str
    body: Markup | None = None
    absent: str | None = None
    level: int = 2  # h2 for a section, h3 for a part of one


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1em 2em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
nav a { margin-right: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.absent { color: #8a5a00; background: #fff7e6; padding: 0.5em 0.8em; border-left: 4px solid
          #f0b000; }
.muted { color: #666; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; max-width: 280px; font-size: 0.85em; }
figure img { display: block; max-width: 100%; }
img.plot { max-width: 100%; }
img.thumb { width: 128px; height: auto; image-rendering: auto; }
.bar { display: inline-block; height: 0.8em; background: #4a7bd0; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""

# No script, no outside source: the browser refuses both even if markup slipped through.
_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="$policy">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>$style</style>
</head>
<body>
<h1>$title</h1>
$subtitle
<nav>$nav</nav>
$body
</body>
</html>
""")


def _section_html(section: Section) -> str:
    heading = f'<h{section.level} id="{esc(section.anchor)}">{esc(section.heading)}'
    heading += f"</h{section.level}>"
    if section.body is None:
        reason = section.absent or "nothing to show"
        return heading + paragraph(f"Not in this report: {reason}", "absent")
    return heading + section.body


def render(title: str, subtitle: Markup, sections: Sequence[Section]) -> str:
    """The whole page: title, a table of contents (the h2 sections), then every section."""
    nav = join(
        Markup(f'<a href="#{esc(s.anchor)}">{esc(s.heading)}</a>') for s in sections if s.level == 2
    )
    return _PAGE.substitute(
        policy=_POLICY,
        title=esc(title),
        style=_STYLE,
        subtitle=subtitle,
        nav=nav,
        body="\n".join(_section_html(section) for section in sections),
    )
