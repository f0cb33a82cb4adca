"""pipeline search: which model meets the profile's budgets, found by running the pipeline on a space of students.

A trial is one point of the recipe's `search:` space (student, width multiplier, prune ratio, KD temperature); it
runs through the same stages as `pipeline run` (distill, prune, export, quantize, benchmark, report) in its own run
directory, runs/search-<id>/<trial>-e<epochs>/. Its candidates are its deployed artifact at each searched precision
(student-pruned.int8.onnx, ...). The cost is bounded by successive halving on the distill epochs (every trial runs
search.epochs[0]; the best `keep` share of each rung runs the next rung's epochs), search.max_trials and
search.max_minutes. The teacher trains once per recipe (runs/search-teachers/<recipe>-<hash>/, reused by later
searches) and every trial loads it as models.teacher.checkpoint.

search.json holds every trial's state and is written atomically after each change: `pipeline search --resume`
continues runs/search-latest, skips finished runs and resumes a killed one inside its stage (the runner's
--resume). The search's report.json is a report of the run kind (pipeline/report/report.schema.json) whose rows
are every trial's candidates, named <trial run dir>/<artifact> (t02-e4/student-pruned.int8.onnx), plus its
`search` section: the candidates with the Pareto front, the cost and provenance of each. budgets.py judges it
as it judges a run, so the recommendation and the nearest miss mean the same thing here as in a run's report.
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import random
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from pipeline.artifacts import atomic_write_text, is_candidate
from pipeline.config import (ModelSpec, Profile, RecipeBase, check_model, model_outputs, num_classes,
                             recipe_model)
from pipeline.errors import ConfigError, StageError, first_line
from pipeline.report import budgets
from pipeline.report.build import SCHEMA_VERSION, flags, fmt, pareto, render_md
from pipeline.runner import locked, new_run_dir, point_latest

SEARCH_SCHEMA = 1
# budgets a longer distillation cannot fix: a trial missing them on every candidate is never promoted
ARCHITECTURE_BUDGETS = ("p95_latency_ms", "max_size_mb", "max_energy_mj")


# ---------------------------------------------------------------- the space
def plan(recipe: RecipeBase, profile: Profile, path: Path | str = "recipe") -> list[dict]:
    """The trials of the recipe's search space (sampled, seeded, down to search.max_trials), in grid order."""
    s = recipe.search
    students = s.students or [recipe.models.student]
    ratios = s.prune_ratios or [recipe.prune.ratio if recipe.prune.enabled else 0.0]
    temps = s.temperatures or [recipe.distill.temperature]
    grid = []
    for (i, spec), m, r, t in itertools.product(enumerate(students), s.width_multipliers, ratios, temps):
        grid.append({"student": scaled(spec, m, path, f"search.students.{i}" if s.students else "models.student"
                                       ).model_dump(mode="json"),
                     "width": m, "prune_ratio": r, "temperature": t})
    if len(grid) > s.max_trials:  # a random sample of the grid, not its first corner
        keep = sorted(random.Random(recipe.seed).sample(range(len(grid)), s.max_trials))
        grid = [grid[i] for i in keep]
    return [{"id": f"t{i:02d}", **g, "runs": []} for i, g in enumerate(grid)]


def precisions(recipe: RecipeBase, profile: Profile, path: Path | str = "recipe") -> list[str]:
    """The precisions deployed: search.precisions, else the profile's fp32 and int8."""
    own = [p for p in profile.target.precisions if p in ("fp32", "int8")]
    chosen = recipe.search.precisions or own
    missing = [p for p in chosen if p not in profile.target.precisions]
    if missing or not chosen:
        raise ConfigError(f"{path}: search.precisions: {', '.join(missing) or 'none left'} not among profile "
                          f"'{profile.name}''s target.precisions ({', '.join(profile.target.precisions)}). Search "
                          f"only precisions the target runs.")
    return chosen


WIDTH_KWARGS = {"resnet": ("widths",), "cnn": ("channels", "hidden"), "mlp": ("hidden",)}


def scaled(spec: ModelSpec, m: float, path: Path | str, field: str) -> ModelSpec:
    """The spec with its width kwargs times m (rounded, at least 1); m == 1 is the spec itself."""
    if m == 1.0:
        return spec
    if spec.arch not in WIDTH_KWARGS:
        raise ConfigError(f"{path}: search.width_multipliers: {field} (arch '{spec.arch}') has no width setting "
                          f"this search scales (only {', '.join(WIDTH_KWARGS)}). List the widths you want as "
                          f"search.students instead.")
    from pipeline.train import models
    cls = {"resnet": models.NarrowResNet, "cnn": models.SmallCNN, "mlp": models.SmallMLP}[spec.arch]
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    kw = dict(spec.kwargs)
    for k in WIDTH_KWARGS[spec.arch]:
        v = kw.get(k, defaults[k])
        kw[k] = [max(1, round(w * m)) for w in v] if isinstance(v, (list, tuple)) else (max(1, round(v * m)) if v
                                                                                       else v)
    return spec.model_copy(update={"kwargs": kw})


def label(trial: dict) -> str:
    """'resnet[12,24,48,96] prune 0.75 T 4' for tables."""
    kw = trial["student"]["kwargs"]
    w = next((kw[k] for k in ("widths", "channels", "hidden") if k in kw), None)
    widths = "[" + ",".join(map(str, w)) + "]" if isinstance(w, list) else ""
    return f"{trial['student']['arch']}{widths} prune {trial['prune_ratio']:g} T {trial['temperature']:g}"


def deployed(trial: dict, precision: str) -> str:
    """The trial's candidate at this precision: its pruned student when it prunes, else its student."""
    stem = "student-pruned" if trial["prune_ratio"] > 0 else "student"
    return f"{stem}.onnx" if precision == "fp32" else f"{stem}.{precision}.onnx"


def trial_recipe(base: RecipeBase, trial: dict, epochs: int, teacher_dir: Path, precs: list[str]) -> RecipeBase:
    """The base recipe with this trial's student, prune ratio, temperature and epochs, loading the shared teacher."""
    data = base.model_dump(mode="json")
    data["models"]["student"] = trial["student"]
    if base.models.teacher.onnx is None:
        data["models"]["teacher"]["checkpoint"] = str(teacher_dir / "teacher.pt")
    for i, extra in enumerate(data["models"]["extra_teachers"], 1):
        if extra.get("onnx") is None:
            extra["checkpoint"] = str(teacher_dir / f"teacher-{i}.pt")
    data["distill"].update(epochs=epochs, temperature=trial["temperature"])
    data["prune"].update(enabled=trial["prune_ratio"] > 0, ratio=trial["prune_ratio"] or base.prune.ratio)
    # only the deployed artifact is quantized: the search's candidates are it, at each precision
    data["quantize"].update(enabled="int8" in precs, precisions=["int8"], sources=[])
    return recipe_model().model_validate(data)


# ---------------------------------------------------------------- the search
def run_search(recipe: RecipeBase, profile: Profile, *, recipe_path: Path, runs_dir: Path = Path("runs"),
               resume: bool = False, console: Console | None = None, debug: bool = False) -> Path:
    """Run (or continue) a search and write its search.json, report.json, report.md and report.html."""
    console = console or Console()
    runs_dir.mkdir(parents=True, exist_ok=True)
    search_dir = _latest(runs_dir) if resume else new_run_dir(runs_dir, profile, recipe, prefix="search-")
    point_latest(runs_dir, search_dir, "search-latest")
    with locked(search_dir, "pipeline search", "Wait for it to finish."):
        return Search(search_dir, recipe, profile, recipe_path, runs_dir, console, debug, resume).run()


class Search:
    def __init__(self, search_dir: Path, recipe: RecipeBase, profile: Profile, recipe_path: Path, runs_dir: Path,
                 console: Console, debug: bool, resume: bool):
        self.dir, self.runs_dir, self.console, self.debug = search_dir, runs_dir, console, debug
        self.state_path = search_dir / "search.json"
        if resume:  # the stored recipe and profile: a resumed search asks the question it started with
            self.state = json.loads(self.state_path.read_text())
            recipe = recipe_model().model_validate(self.state["recipe"])
            profile = Profile.model_validate(self.state["profile"])
        self.recipe, self.profile = recipe, profile
        self.precs = precisions(recipe, profile, recipe_path)
        if not resume:
            trials = plan(recipe, profile, recipe_path)
            self._check_students(trials, recipe_path)
            self.state = {"schema": SEARCH_SCHEMA, "id": search_dir.name, "status": "running",
                          "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "recipe_path": str(recipe_path), "recipe": recipe.model_dump(mode="json"),
                          "profile": profile.model_dump(mode="json"), "precisions": self.precs,
                          "elapsed_s": 0.0, "sessions": 0, "teacher": None, "rungs": [], "stopped": None,
                          "trials": trials}
        self.state["sessions"] = self.state.get("sessions", 0) + 1
        self.state["stopped"] = None  # judged again in this session (the stored max_minutes still applies)
        self.t0, self.elapsed0 = time.monotonic(), self.state["elapsed_s"]
        self.cpu0, self.cpu_before = _cpu_s(), self.state.get("cpu_s", 0.0)
        self._save()

    def run(self) -> Path:
        s = self.recipe.search
        teacher = self._teacher()
        ids = [t["id"] for t in self.state["trials"]]
        for rung, epochs in enumerate(s.epochs):
            if rung == len(self.state["rungs"]):
                self.state["rungs"].append({"epochs": epochs, "trials": ids, "promoted": None})
            ids = self.state["rungs"][rung]["trials"]
            for tid in ids:
                if not self._run_trial(self._trial(tid), rung, epochs, teacher):
                    break
            if self.state["stopped"] or rung == len(s.epochs) - 1:
                break
            if self.state["rungs"][rung]["promoted"] is None:
                self.state["rungs"][rung]["promoted"] = self._promote(rung)
                self._save()
            ids = self.state["rungs"][rung]["promoted"]
            if not ids:
                break
        report = self.report()
        # the budgets this search judged (--p95, --max-drop included): gate and ship read them from here, as from a
        # run; ship also reads the data settings, splits and timing, copied from the recommended candidate's run
        atomic_write_text(self.dir / "profile.json", json.dumps(self.state["profile"], indent=2))
        rec = (report.get("recommended") or report.get("nearest_miss") or {}).get("artifact")
        if rec:
            for name in ("recipe.json", "splits.json", "benchmark.json"):
                atomic_write_text(self.dir / name, (self.dir / rec.split("/")[0] / name).read_text())
        atomic_write_text(self.dir / "report.json", json.dumps(report, indent=2, default=float))
        atomic_write_text(self.dir / "report.md", render_md(report))
        from pipeline.report import html
        atomic_write_text(self.dir / "report.html", html.render(report))
        self.state["status"] = "done"
        self._save()
        return self.dir

    # ------------------------------------------------------------ the teacher, once
    def _teacher(self) -> Path:
        """The shared teacher's run directory: trained once per teacher setting, loaded by every trial."""
        r = self.recipe
        key = hashlib.sha256(json.dumps({
            "seed": r.seed, "data": r.data.model_dump(mode="json", exclude={"workers"}),
            "teacher": r.models.teacher.model_dump(mode="json"),
            "extra": [e.model_dump(mode="json") for e in r.models.extra_teachers],
            "stage": r.teacher.model_dump(mode="json")}, sort_keys=True, default=str).encode()).hexdigest()
        tdir = self.runs_dir / "search-teachers" / f"{r.name}-{key[:12]}"
        tdir.mkdir(parents=True, exist_ok=True)
        # the runner's stage key covers all of models: a fixed student keeps it the teacher's alone, so a later
        # search with other students reuses this teacher (the teacher stage never builds the student)
        data = r.model_dump(mode="json")
        data["models"]["student"] = {**data["models"]["teacher"], "checkpoint": None, "onnx": None}
        teacher_recipe = recipe_model().model_validate(data)
        from pipeline.runner import Runner
        t = time.monotonic()
        self.console.print(f"[bold]search {self.dir.name}[/]: teacher in {tdir}")
        Runner(tdir, teacher_recipe, self.profile, recipe_path=Path(self.state["recipe_path"]),
               console=self.console, debug=self.debug).run(resume=True, until="teacher")
        rec = json.loads((tdir / "run.json").read_text())["stages"]["teacher"]
        self.state["teacher"] = {"run_dir": str(tdir), "reused": bool(rec.get("reused")),
                                 "duration_s": rec.get("duration_s"), "wall_s": round(time.monotonic() - t, 1),
                                 "results": {k: v for k, v in rec.get("results", {}).items() if k != "history"}}
        self._save()
        return tdir

    # ------------------------------------------------------------ one trial at one rung
    def _run_trial(self, trial: dict, rung: int, epochs: int, teacher: Path) -> bool:
        """Run (or resume) the trial's run of this rung; False when max_minutes stops the search."""
        run = next((r for r in trial["runs"] if r["rung"] == rung), None)
        if run is not None and run["status"] in ("ok", "failed"):
            self.console.print(f"  {trial['id']} e{epochs}: {run['status']} earlier, kept")
            return True
        expected = self._expected_s(trial, rung, epochs)
        cap = self.recipe.search.max_minutes * 60
        if self._elapsed() + expected > cap:
            self.state["stopped"] = (f"search.max_minutes ({self.recipe.search.max_minutes:g}) reached: "
                                     f"{self._elapsed() / 60:.1f} min spent, {trial['id']}'s rung-{rung} run would take "
                                     f"about {expected / 60:.1f} min; it and later runs not started")
            self._save()
            self.console.print(f"[yellow]{self.state['stopped']}[/]")
            return False
        run_dir = self.dir / f"{trial['id']}-e{epochs}"
        if run is None:
            run = {"rung": rung, "epochs": epochs, "run_dir": run_dir.name, "status": "running", "duration_s": 0.0,
                   "attempts": 0}
            trial["runs"].append(run)
        run["attempts"] += 1
        self._save()
        self.console.print(f"[bold cyan]▶ {trial['id']}[/] {label(trial)}, distill {epochs} epochs "
                           f"({run_dir.name}{', resumed' if run['attempts'] > 1 else ''})")
        from pipeline.runner import Runner
        recipe = trial_recipe(self.recipe, trial, epochs, teacher, self.precs)
        run_dir.mkdir(exist_ok=True)
        t = time.monotonic()
        try:
            Runner(run_dir, recipe, self.profile, recipe_path=Path(self.state["recipe_path"]),
                   console=self.console, debug=self.debug).run(resume=True)
            run["status"] = "ok"
        except (StageError, ConfigError) as e:  # this trial cannot be built; the others still can
            run.update(status="failed", error=first_line(e))
            self.console.print(f"[red]  {trial['id']} failed:[/] {e}")
        finally:  # a kill leaves the run 'running': --resume continues it inside its stage
            run["duration_s"] = round(run["duration_s"] + time.monotonic() - t, 1)
            self._save()
        if run["status"] == "ok":
            c = self._candidates([trial], rung)
            best = max(c, key=lambda x: x["accuracy"] or 0.0)
            self.console.print(f"  {trial['id']} e{epochs}: " + "; ".join(
                f"{x['precision']} acc {fmt(x['accuracy'], 4)} p95 {fmt(x['p95_ms'], 3)} ms" for x in c) + f" ({run['duration_s'] / 60:.1f} min)"
                + (" \\[meets every budget]" if best["meets_all"] else ""))  # rich markup: \\[ prints a bracket
        return True

    def _expected_s(self, trial: dict, rung: int, epochs: int) -> float:
        """How long this run should take: the trial's previous run scaled by the epochs (an overestimate: only
        distillation grows), else the mean of the rung's finished runs, else 0 (the first run always starts)."""
        prev = [r for r in trial["runs"] if r["rung"] < rung and r["status"] == "ok"]
        if prev:
            return prev[-1]["duration_s"] * epochs / prev[-1]["epochs"]
        done = [r["duration_s"] for t in self.state["trials"] for r in t["runs"]
                if r["rung"] == rung and r["status"] == "ok"]
        return sum(done) / len(done) if done else 0.0

    def _promote(self, rung: int) -> list[str]:
        """The best `keep` share (rounded up) of the rung's finished trials that can still meet the architecture
        budgets (a miss there is not fixed by more epochs), ranked by their best candidate's accuracy."""
        ran = [t for t in self.state["trials"] if any(r["rung"] == rung and r["status"] == "ok" for r in t["runs"])]
        score = {}
        for t in ran:
            ok = [c for c in self._candidates([t], rung)
                  if not any(m["budget"] in ARCHITECTURE_BUDGETS for m in c["missed"]) and c["accuracy"] is not None]
            if ok:
                score[t["id"]] = max(c["accuracy"] for c in ok)
        n = math.ceil(self.recipe.search.keep * len(ran))
        chosen = sorted(score, key=lambda tid: (-score[tid], tid))[:n]
        self.console.print(f"rung {rung} -> {rung + 1}: {', '.join(chosen) or 'none'} continue "
                           f"({len(score)} of {len(ran)} can meet the latency, size and energy budgets)")
        return sorted(chosen)

    # ------------------------------------------------------------ the report
    def _final_run(self, trial: dict) -> dict | None:
        ok = [r for r in trial["runs"] if r["status"] == "ok"]
        return max(ok, key=lambda r: r["rung"]) if ok else None

    def _candidates(self, trials: list[dict], rung: int | None = None) -> list[dict]:
        """The candidates of these trials (their run of `rung`, else their last finished run), judged together."""
        parts = []
        for t in trials:
            run = next((r for r in t["runs"] if r["rung"] == rung), None) if rung is not None else self._final_run(t)
            if run is not None and run["status"] == "ok":
                parts.append((t, run, _read_report(self.dir / run["run_dir"])))
        return candidates(merge(self._profile_dict(), parts, self.precs, self.state), parts, self.precs)

    def report(self) -> dict:
        parts = [(t, r, _read_report(self.dir / r["run_dir"])) for t in self.state["trials"]
                 if (r := self._final_run(t)) is not None]
        report = merge(self._profile_dict(), parts, self.precs, self.state)
        cands = candidates(report, parts, self.precs)
        for c, on in zip(cands, pareto([(c["p95_ms"], c["accuracy"]) if c["provenance"] == "measured" else None
                                        for c in cands])):
            c["on_front"] = on
        runs = [r for t in self.state["trials"] for r in t["runs"]]
        report["search"] = {
            "id": self.state["id"], "wall_s": round(self._elapsed(), 1),
            "cpu_s": round(self.cpu_before + _cpu_s() - self.cpu0, 1), "sessions": self.state["sessions"],
            "trials": len(self.state["trials"]), "runs": len(runs),
            "runs_failed": sum(r["status"] == "failed" for r in runs), "stopped": self.state["stopped"],
            "teacher": self.state["teacher"], "precisions": self.precs,
            "space": self.recipe.search.model_dump(mode="json"),
            "rungs": self.state["rungs"], "candidates": cands,
            "front": [c["artifact"] for c in sorted((c for c in cands if c["on_front"]), key=lambda c: c["p95_ms"])],
            "trial_runs": [{"trial": t["id"], "label": label(t), **{k: r.get(k) for k in
                            ("rung", "epochs", "run_dir", "status", "duration_s", "attempts", "error")}}
                           for t in self.state["trials"] for r in t["runs"]]}
        return report

    def _profile_dict(self) -> dict:
        return {k: self.state["profile"].get(k) for k in ("name", "description", "target", "hardware", "budgets")}

    # ------------------------------------------------------------ bookkeeping
    def _trial(self, tid: str) -> dict:
        return next(t for t in self.state["trials"] if t["id"] == tid)

    def _elapsed(self) -> float:
        return self.elapsed0 + time.monotonic() - self.t0

    def _save(self) -> None:
        self.state["elapsed_s"] = round(self._elapsed(), 1)
        self.state["cpu_s"] = round(self.cpu_before + _cpu_s() - self.cpu0, 1)
        atomic_write_text(self.state_path, json.dumps(self.state, indent=2, default=str))

    def _check_students(self, trials: list[dict], path: Path) -> None:
        """Every student of the space built once on the meta device: a bad width fails now, not at trial 9."""
        classes = num_classes(self.recipe.data, path)
        for t in trials:
            spec = ModelSpec.model_validate(t["student"])
            check_model(path, f"search ({t['id']}: {label(t)}) student", spec, self.recipe.data,
                        model_outputs(self.recipe, spec, classes, path))


# ---------------------------------------------------------------- merging trial reports
def _read_report(run_dir: Path) -> dict:
    from pipeline.report import schema
    return schema.load(run_dir)


def merge(profile: dict, parts: list[tuple[dict, dict, dict]], precs: list[str], state: dict) -> dict:
    """One report of the run kind over the trials: each trial's candidate rows as <run dir>/<artifact> (a path
    from the search directory), the
    teacher's rows from the first trial (every trial loads the same teacher), judged by `profile`'s budgets."""
    rows: list[dict] = []
    first = parts[0][2] if parts else {}
    rows += [dict(r) for r in first.get("rows", []) if r.get("role") == "teacher"]
    for trial, run, rep in parts:
        names = {deployed(trial, p) for p in precs}
        for r in rep["rows"]:
            if r["artifact"] in names:
                rows.append({**r, "artifact": f"{run['run_dir']}/{r['artifact']}",
                             "predecessor": f"{run['run_dir']}/{r['predecessor']}" if r.get("predecessor") else None})
    notes = list(dict.fromkeys(n for _, _, rep in parts for n in rep.get("notes", [])))
    report = {
        "schema_version": SCHEMA_VERSION, "run_id": state["id"], "created": state["created"],
        "recipe": {"name": state["recipe"]["name"], "path": state["recipe_path"]}, "profile": profile,
        "environment": first.get("environment") or {"versions": {}}, "teacher": first.get("teacher", {}),
        "distill": {}, "prune": {}, "quantize": {},
        "stages": [{"name": run["run_dir"], "status": "ok", "duration_s": run["duration_s"], "reused": False}
                   for _, run, _ in parts],
        "rows": rows, "notes": notes, "meter": first.get("meter"),
        "allowance": state["recipe"].get("max_accuracy_drop_per_stage", 0.01)}
    report["flags"] = flags(report)
    report["recommended"], report["nearest_miss"] = budgets.recommendation(report)
    return report


def candidates(report: dict, parts: list[tuple[dict, dict, dict]], precs: list[str]) -> list[dict]:
    """Each trial's deployed artifact per precision: its accuracy, p95, size, energy, how they were obtained,
    its cost and its verdict, as budgets.py judges them."""
    standing = budgets.evaluate(report)
    out = []
    for trial, run, _ in parts:
        cost = sum(r["duration_s"] for r in trial["runs"]) / 60
        for p in precs:
            name = f"{run['run_dir']}/{deployed(trial, p)}"
            s = standing.get(name)
            if s is None or not is_candidate(s.role):
                continue
            mine = [r for r in report["rows"] if r["artifact"] == name]
            est = [r for r in mine if r["status"] == "estimated"]
            energy = min((r for r in mine if r.get("energy_mj") is not None and (r.get("on_target")
                          or r["status"] == "estimated")), key=lambda r: r["energy_mj"], default=None)
            out.append({
                "artifact": name, "trial": trial["id"], "label": label(trial), "student": trial["student"],
                "width": trial["width"], "prune_ratio": trial["prune_ratio"], "temperature": trial["temperature"],
                "precision": p, "epochs": run["epochs"], "accuracy": s.accuracy,
                "p95_ms": s.latency["p95"] if s.latency else None,
                "lower_bound_ms": min((r["latency_ms"]["lower_bound"] for r in est), default=None),
                "provenance": "measured" if s.latency else ("estimated" if est else "unmeasured"),
                "size_bytes": s.size_bytes, "energy_mj": energy["energy_mj"] if energy else None,
                "energy_how": energy.get("energy_how") if energy else None, "cost_min": round(cost, 2),
                "meets_all": s.meets_all, "on_front": False,
                "missed": [{"budget": c.budget, "by": -c.margin} for c in s.missed],
                "unmeasured": [c.budget for c in s.unmeasured],
                "verdict": budgets.describe_miss(s)})
    return out


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children: wall time on a shared machine says little alone."""
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ---------------------------------------------------------------- directories and the lock
def _latest(runs_dir: Path) -> Path:
    link = runs_dir / "search-latest"
    if not (link.exists() and (link / "search.json").is_file()):
        raise ConfigError(f"No search to resume in {runs_dir}/ (search-latest with a search.json): start one with "
                          f"`pipeline search` (or `make search`).")
    return link.resolve()


OPTIONS = {"p95_latency_ms": "--p95", "max_accuracy_drop": "--max-drop"}  # the CLI's names for the budgets


def with_budgets(profile: Profile, **limits: float | None) -> Profile:
    """The profile with some budgets replaced (the CLI's --p95, --max-drop); None keeps the profile's."""
    from pydantic import ValidationError

    from pipeline.config import Budgets
    given = {k: v for k, v in limits.items() if v is not None}
    if not given:
        return profile
    try:
        b = Budgets.model_validate({**profile.budgets.model_dump(), **given})
    except ValidationError as e:
        err = e.errors()[0]
        option = OPTIONS.get(str(err["loc"][0]), str(err["loc"][0]))
        raise ConfigError(f"{option} {err['input']}: {err['msg'].lower()}. Give a budget in range (p95 in ms > 0, a "
                          f"drop between 0 and 1).") from None
    out = profile.model_copy(update={"budgets": b})
    out._path = profile._path
    return out
