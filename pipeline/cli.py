"""The command line: parse, call, print. Logic lives in the modules below."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import DEFAULT_RECIPE, STAGES, ConfigError, available_profiles, load_profile, load_recipe
from .context import StageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill, prune, export, quantize, benchmark, report, gate and ship vision models.")
console = Console()
err = Console(stderr=True)
DEBUG = {"on": False}


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    DEBUG["on"] = debug


def fail(msg: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def run(profile: Annotated[str, typer.Option(help="a name from profiles/ or a YAML path")] = "edge-cpu",
        recipe: Annotated[Path, typer.Option(help="what to compress")] = DEFAULT_RECIPE,
        runs_dir: Annotated[Path, typer.Option(help="where run directories go")] = Path("runs"),
        resume: Annotated[bool, typer.Option(help="continue runs/latest, skipping unchanged stages")] = False,
        nproc: Annotated[int, typer.Option(help="processes for teacher/distill training (torchrun, DDP)")] = 1,
        ) -> None:
    """Run every enabled stage and write runs/<id>/report.md."""
    from .report import render_md  # noqa: F401  (import errors surface before a long run)
    from .runner import run_pipeline
    try:
        prof = load_profile(profile)
        rec = load_recipe(recipe, prof)
        run_dir = run_pipeline(rec, prof, recipe_path=recipe, runs_dir=runs_dir, resume=resume, console=console,
                               debug=DEBUG["on"], nproc=nproc)
    except ConfigError as e:
        if DEBUG["on"]:
            raise
        fail(str(e), 2)
    except StageError as e:
        if DEBUG["on"]:
            raise
        fail(f"{e}\nEarlier artifacts are intact; fix the cause and rerun with --resume (make pipeline RESUME=1).", 1)
    _print_report(run_dir)


def _print_report(run_dir: Path) -> None:
    import json

    from .report import HEADER, table_rows
    report = json.loads((run_dir / "report.json").read_text())
    table = Table(title=f"{report['recipe']['name']} on {report['profile']['name']}", show_lines=False)
    for h in HEADER:
        table.add_column(h, overflow="fold")
    for row in table_rows(report):
        table.add_row(*row)
    console.print(table)
    console.print("suffix h = measured on this host (not the target), e = estimated, — = skipped (see status)")
    for n in report.get("notes", []):
        console.print(f"[yellow]note:[/] {n}")
    rec = report.get("recommended")
    console.print(f"recommended: [bold]{rec['artifact']}[/] ({rec['basis']})" if rec else
                  "recommended: none meets the budgets")
    console.print(f"report: {run_dir / 'report.md'}")


@app.command()
def stages() -> None:
    """List the stages in the order they run."""
    from .runner import stage_module
    for i, name in enumerate(STAGES, 1):
        doc = (stage_module(name).run.__doc__ or "").strip().splitlines()[0]
        console.print(f"{i}. [bold]{name}[/]: {doc}")


@app.command()
def profiles() -> None:
    """List the hardware profiles with their target and budgets."""
    table = Table("profile", "target", "providers", "precisions", "budgets")
    for name in available_profiles():
        try:
            p = load_profile(name)
        except ConfigError as e:
            table.add_row(name, f"[red]invalid[/]: {e}", "", "", "")
            continue
        b = ", ".join(f"{k}={v}" for k, v in p.budgets.model_dump().items() if v is not None)
        table.add_row(name, f"{p.target.kind}: {p.target.name}", ", ".join(p.target.providers)
                      + (" + trtexec" if p.target.tensorrt else ""), ", ".join(p.target.precisions), b)
    console.print(table)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory")] = Path("runs/latest")) -> None:
    """Re-render report.md/.html from a run's report.json (nothing is rerun)."""
    from .rerender import rerender
    try:
        for p in rerender(run_dir):
            console.print(f"wrote {p}")
    except ConfigError as e:
        fail(str(e), 3)


def entry() -> None:
    app()


if __name__ == "__main__":
    sys.exit(app())
