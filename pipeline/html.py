"""report.html (placeholder until the full renderer lands): the Markdown table in a <pre>."""
from __future__ import annotations

import html as _html


def render(report: dict) -> str:
    from .report import render_md
    return f"<!doctype html><meta charset='utf-8'><title>{_html.escape(report['run_id'])}</title>" \
           f"<pre>{_html.escape(render_md(report))}</pre>"
