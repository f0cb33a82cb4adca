"""The command line: parse, call, print. Logic lives in the modules below."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import stages as stage_registry
from pipeline.config import DEFAULT_RECIPE, available_profiles, load_profile, load_recipe
from pipeline.errors import ConfigError, StageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill, prune, export, quantize, benchmark, report, gate and ship vision models.")
console = Console()
if not console.is_terminal:  # logs and pipes: keep table rows on one line
    console = Console(width=150)
err = Console(stderr=True)
DEBUG = {"on": False}


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    DEBUG["on"] = debug


SET_HELP = ("KEY=VALUE: a recipe setting for this run, over the recipe and the profile's overrides (KEY dotted, "
            "VALUE YAML; repeatable), e.g. --set distill.method=dkd")


def fail(msg: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def run(profile: Annotated[str, typer.Option(help="a name from profiles/ or a YAML path")] = "edge-cpu",
        recipe: Annotated[Path, typer.Option(help="what to compress")] = DEFAULT_RECIPE,
        runs_dir: Annotated[Path, typer.Option(help="where run directories go")] = Path("runs"),
        resume: Annotated[bool, typer.Option(help="continue runs/latest, skipping unchanged stages")] = False,
        nproc: Annotated[int, typer.Option(min=1, help="processes for teacher/distill training (torchrun, DDP)")] = 1,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help=SET_HELP)] = None,
        ) -> None:
    """Run every enabled stage and write runs/<id>/report.md."""
    from pipeline.report.build import render_md  # noqa: F401  (import errors surface before a long run)
    from pipeline.runner import run_pipeline
    try:
        prof = load_profile(profile)
        rec = load_recipe(recipe, prof, set_ or [])
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


@app.command()
def search(profile: Annotated[str, typer.Option(help="a name from profiles/ or a YAML path")] = "edge-cpu",
           recipe: Annotated[Path, typer.Option(help="what to compress; its `search:` is the space")] = DEFAULT_RECIPE,
           runs_dir: Annotated[Path, typer.Option(help="where runs/search-<id>/ goes")] = Path("runs"),
           resume: Annotated[bool, typer.Option(help="continue runs/search-latest with its stored recipe, profile "
                                                     "and budgets; finished runs are kept")] = False,
           p95: Annotated[Optional[float], typer.Option(help="p95_latency_ms budget in ms, instead of the "
                                                            "profile's")] = None,
           max_drop: Annotated[Optional[float], typer.Option(help="max_accuracy_drop budget vs the teacher "
                                                                 "(0.01 = 1 point), instead of the profile's")] = None,
           set_: Annotated[Optional[list[str]], typer.Option("--set", help=SET_HELP)] = None,
           ) -> None:
    """Search the recipe's space for the most accurate model meeting every budget: runs/search-<id>/report.md."""
    import time

    from pipeline.search import run_search, with_budgets
    t0 = time.monotonic()
    try:
        if resume and (p95 is not None or max_drop is not None or set_):
            raise ConfigError("--p95, --max-drop and --set cannot change a search being resumed: it keeps the "
                              "recipe and budgets it started with. Drop them, or start a new search.")
        prof = with_budgets(load_profile(profile), p95_latency_ms=p95, max_accuracy_drop=max_drop)
        rec = load_recipe(recipe, prof, set_ or [])
        search_dir = run_search(rec, prof, recipe_path=recipe, runs_dir=runs_dir, resume=resume, console=console,
                                debug=DEBUG["on"])
    except ConfigError as e:
        if DEBUG["on"]:
            raise
        fail(str(e), 2)
    except StageError as e:  # the shared teacher: a trial's own failure is recorded and the search goes on
        if DEBUG["on"]:
            raise
        fail(f"{e}\nFix the cause and continue with `pipeline search --resume` (make search RESUME=1).", 1)
    _print_search(search_dir, time.monotonic() - t0)


def _print_search(search_dir: Path, session_s: float) -> None:
    import json

    from pipeline.report import budgets
    from pipeline.report.build import SEARCH_HEADER, search_cells
    report = json.loads((search_dir / "report.json").read_text())
    s = report["search"]
    table = Table(title=f"search {s['id']}: budgets of {report['profile']['name']}")
    for h in SEARCH_HEADER:
        table.add_column(h, overflow="fold")
    for c in s["candidates"]:
        cells = search_cells(c)
        table.add_row(*(escape(cells[h]) for h in SEARCH_HEADER))  # 'misses min_accuracy[parity]': not markup
    console.print(table)
    console.print(budgets.verdict_line(report), highlight=False, markup=False)
    if s.get("stopped"):
        console.print(f"stopped: {s['stopped']}", highlight=False, markup=False)
    console.print(f"trials: {s['trials']} ({s['runs']} runs, {s['runs_failed']} failed); wall time: "
                  f"{s['wall_s'] / 60:.1f} min over {s['sessions']} session(s) (this command: {session_s / 60:.1f} "
                  f"min); CPU time: {s['cpu_s'] / 60:.1f} min", highlight=False)
    console.print(f"search directory: {search_dir}\nreport: {search_dir / 'report.md'}", highlight=False)


@app.command("check")
def check_command(profile: Annotated[str, typer.Option(help="a name from profiles/ or a YAML path")] = "edge-cpu",
                  recipe: Annotated[Path, typer.Option(help="what to compress")] = DEFAULT_RECIPE,
                  set_: Annotated[Optional[list[str]], typer.Option("--set", help=SET_HELP)] = None) -> None:
    """Check in seconds what a run needs (configs, files, models, data, device): exit 0 ready, 2 not."""
    from pipeline.check import run_checks
    ready = run_checks(recipe, profile, lambda line: console.print(line, highlight=False, markup=False,
                                                                   soft_wrap=True), debug=DEBUG["on"],
                       sets=set_ or [])
    raise typer.Exit(0 if ready else 2)


def _print_report(run_dir: Path) -> None:
    import json

    from pipeline.report import budgets
    from pipeline.report.build import cells, header, table_rows, tasks_line
    report = json.loads((run_dir / "report.json").read_text())
    keep = header(report, ["artifact", "prec", "backend/provider", "where", "KiB", "acc", "Δ teacher", "p50 ms",
                           "p95 ms", "mJ/inf", "status"])  # 'acc': one column per head of a multi-task model
    table = Table(title=f"{report['recipe']['name']} on {report['profile']['name']}", show_lines=False)
    for h in keep:
        table.add_column(h, overflow="fold")
    reasons: list[str] = []
    for t in table_rows(report):
        c = cells(t)
        if t.reason:  # numbered here, spelled out below the table
            if t.reason not in reasons:
                reasons.append(t.reason)
            c["status"] += f" [{reasons.index(t.reason) + 1}]"
        c["backend/provider"] = ("ort/" if t.backend == "onnxruntime" else "") + t.provider
        c["where"] = t.where_kind  # the machines are named below
        table.add_row(*(c.get(h, "—") for h in keep))
    console.print(table)
    if tasks_line(report):
        console.print(tasks_line(report), highlight=False, markup=False)
    console.print("suffix h = measured on this host (not the target), e = estimated, — = skipped or n/a")
    for i, reason in enumerate(reasons, 1):
        console.print(f"[{i}] {reason}", highlight=False, markup=False)
    for n in report.get("notes", []):
        console.print(f"note: {n}", highlight=False, markup=False)
    host = report["environment"]
    console.print(f"host: {host.get('hostname')} ({host.get('cpu', {}).get('model')})", highlight=False)
    heads = budgets.limits(report)
    bt = Table(title=f"budgets of {report['profile']['name']} (on the target; p95 + noise margin)")
    for h in ["artifact", *heads.values()]:
        bt.add_column(escape(h), overflow="fold")  # 'min_accuracy[parity]' is text, not rich markup
    for s in budgets.table(report):
        bt.add_row(s.artifact, *(budgets.short(s.checks[k]) for k in heads))
    console.print(bt)
    console.print(budgets.verdict_line(report), highlight=False, markup=False)
    console.print(f"run directory: {run_dir}\nreport: {run_dir / 'report.md'}")


@app.command()
def stages() -> None:
    """List the stages in the order they run."""
    for i, name in enumerate(stage_registry.STAGES, 1):
        doc = (stage_registry.load(name).run.__doc__ or "").strip().splitlines()[0]
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
    from pipeline.report.rerender import rerender
    try:
        for p in rerender(run_dir):
            console.print(f"wrote {p}")
    except ConfigError as e:
        fail(str(e), 3)


def _run_profile(run_dir: Path):
    """The profile a run was made with, as stored in run_dir/profile.json (a profile given as a YAML path has no
    name to look up); else the name in report.json, else edge-cpu: the command then reports what is unusable."""
    import json

    from pipeline.config import Profile
    try:
        return Profile.model_validate(json.loads((run_dir / "profile.json").read_text()))
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        pass
    try:
        return json.loads((run_dir / "report.json").read_text())["profile"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return "edge-cpu"


@app.command()
def gate(run_dir: Annotated[Path, typer.Argument(help="a run directory")] = Path("runs/latest"),
         profile: Annotated[Optional[str], typer.Option(help="budgets to check; default: the run's profile")] = None,
         allow_estimates: Annotated[bool, typer.Option(help="let estimates and host figures pass, labelled")] = False,
         junit: Annotated[Optional[Path], typer.Option(help="also write JUnit XML here (exit 3 when it cannot "
                                                            "be written)")] = None,
         as_json: Annotated[bool, typer.Option("--json", help="print the verdict as JSON")] = False) -> None:
    """Check the profile's budgets: exit 0 met, 1 missed, 2 no measurement on the target, 3 unusable input."""
    from pipeline.report.gate import gate as check
    from pipeline.report.gate import write_junit
    verdict = check(run_dir, profile or _run_profile(run_dir), allow_estimates=allow_estimates)
    if as_json:
        typer.echo(verdict.to_json())
    else:
        color = {0: "green", 1: "red", 2: "yellow", 3: "red"}[verdict.code]
        console.print(verdict.text(), style=color, highlight=False, soft_wrap=True, markup=False)
    if junit is not None:
        try:
            write_junit(verdict, junit)
        except ConfigError as e:  # CI reads the XML: without it the verdict cannot be trusted, so unusable
            fail(str(e), 3)
    raise typer.Exit(verdict.code)


@app.command()
def ship(run_dir: Annotated[Path, typer.Argument(help="a run directory")] = Path("runs/latest"),
         profile: Annotated[Optional[str], typer.Option(help="the bundle's profile; default: the run's")] = None,
         out: Annotated[Path, typer.Option(help="where the bundle goes")] = Path("dist"),
         to: Annotated[Optional[str], typer.Option(help="copy and verify over SSH: [user@]host[:port]:/dir")] = None,
         ) -> None:
    """Bundle the recommended artifact (bundle-<recipe>-<run>.tar.gz) for a device; exit 3 on unusable input."""

    from pipeline.ship.bundle import ShipError
    from pipeline.ship.bundle import ship as make
    try:
        make(run_dir, profile or _run_profile(run_dir), out, to=to,
             log=lambda m: console.print(m, highlight=False, markup=False))
    except ConfigError as e:
        fail(str(e), 3)
    except ShipError as e:
        fail(str(e), 1)


@app.command()
def verify(bundle: Annotated[Path, typer.Argument(help="a bundle .tar.gz or its unpacked folder")]) -> None:
    """Recompute a bundle's checksums and check runtimes: exit 0 verified, 1 refused, 3 not a bundle."""

    from pipeline.ship.bundle import verify as check
    warnings: list[str] = []
    try:
        problems = check(bundle, warnings)
    except ConfigError as e:
        fail(str(e), 3)
    for w in warnings:
        console.print(f"warning: {w}", style="yellow", highlight=False, markup=False)
    for p in problems:
        err.print(f"REFUSED: {p}", style="red", highlight=False, markup=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    console.print(f"{bundle}: verified", style="green", highlight=False, markup=False)
