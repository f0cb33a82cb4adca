"""`pipeline report RUN_DIR`: report.md and report.html again from report.json, without rerunning anything."""
from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import atomic_write_text
from pipeline.report import html
from pipeline.report import schema as reportschema
from pipeline.report.build import render_md


def rerender(run_dir: Path) -> list[Path]:
    """Validate run_dir/report.json against the schema, then rewrite report.md and report.html next to it.

    Raises ConfigError for a missing run or report, or one of another schema_version.
    """
    run_dir = Path(run_dir)
    report = reportschema.load(run_dir)
    out = {run_dir / "report.md": render_md(report), run_dir / "report.html": html.render(report)}
    for path, text in out.items():
        atomic_write_text(path, text)
    return list(out)
