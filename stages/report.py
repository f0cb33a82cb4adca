"""report: report.json and report.md from the run directory (and report.html when rendering is on)."""
from __future__ import annotations

import json

from pydantic import Field

from pipeline.artifacts import Artifact, Artifacts, atomic_write_text
from pipeline.context import Context
from pipeline.report import build as rep
from pipeline.settings import Strict

USES_PROFILE = True


class Config(Strict):
    html: bool = Field(True, description="also write report.html with embedded SVG plots")


def run(inputs: Artifacts, cfg: Config, ctx: Context) -> Artifacts:
    """Collect every stage's record and the benchmark rows into one report; render it."""
    report = rep.build(ctx.run_dir)
    atomic_write_text(ctx.path("report.json"), json.dumps(report, indent=2, default=float))
    atomic_write_text(ctx.path("report.md"), rep.render_md(report))
    out = {"report.json": Artifact(name="report.json", kind="json", stage="report"),
           "report.md": Artifact(name="report.md", kind="markdown", stage="report")}
    if cfg.html:
        from pipeline.report import html
        atomic_write_text(ctx.path("report.html"), html.render(report))
        out["report.html"] = Artifact(name="report.html", kind="html", stage="report")
    ctx.results["report"] = {"recommended": report["recommended"]}
    return out
