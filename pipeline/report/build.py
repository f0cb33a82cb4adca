"""report.json from a run directory, the recommended artifact, flags, and the Markdown table.

Every figure carries how it was obtained; the table shows it with a suffix: no suffix = measured on the
profile's target, `h` = measured on this host (not the target), `e` = estimated, `—` = skipped (see reasons).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import is_trained
from pipeline.report import budgets
from pipeline.report.budgets import measured_rows, noise_margin_ms  # noqa: F401  (their home is budgets)

SCHEMA_VERSION = 2  # 2: rows' energy_how, latency std required, nearest_miss


def _load(run_dir: Path, name: str) -> Any:
    p = run_dir / name
    return json.loads(p.read_text()) if p.exists() else {}


def best_row(rows: list[dict], artifact: str, on_target: bool) -> dict | None:
    cands = measured_rows(rows, artifact, on_target)
    return min(cands, key=lambda r: r["latency_ms"]["p50"]) if cands else None


def build(run_dir: Path) -> dict:
    run = _load(run_dir, "run.json")
    bench = _load(run_dir, "benchmark.json")
    profile = _load(run_dir, "profile.json")
    recipe = _load(run_dir, "recipe.json")
    stages = run.get("stages", {})
    results = {k: v.get("results", {}) for k, v in stages.items()}
    outputs = {n: o for v in stages.values() for n, o in v.get("outputs", {}).items()}
    rows = bench.get("rows", [])
    order = {a: i for i, a in reversed(list(enumerate(r["artifact"] for r in rows)))}
    kinds = {"host": 1, "device": 0, "estimate": 2}  # per artifact: device rows first, estimates last
    rows.sort(key=lambda r: (order[r["artifact"]], kinds.get(r["where"]["kind"], 3), r["status"] == "skipped"))
    teacher_acc = next((r["accuracy"] for r in rows if r.get("role") == "teacher" and r.get("accuracy") is not None
                        and r["status"] == "measured"), None)
    for r in rows:
        meta = outputs.get(r["artifact"], {}).get("meta", {})
        r["predecessor"] = meta.get("predecessor")
        if r.get("accuracy") is not None and teacher_acc is not None:
            r["delta_vs_teacher"] = r["accuracy"] - teacher_acc
    report = {
        "schema_version": SCHEMA_VERSION, "run_id": run.get("run_id", run_dir.name), "created": run.get("created"),
        "recipe": {"name": recipe.get("name"), "path": run.get("recipe", {}).get("path")},
        "profile": {k: profile.get(k) for k in ("name", "description", "target", "hardware", "budgets")},
        "environment": {**bench.get("where_host", {}), "versions": _versions()},
        "teacher": {k: v for k, v in results.get("teacher", {}).items() if k != "history"},
        "distill": {k: v for k, v in results.get("distill", {}).items() if not k.startswith("history")},
        "prune": results.get("prune", {}), "quantize": results.get("quantize", {}),
        "stages": [{"name": k, "status": v.get("status"), "duration_s": v.get("duration_s"),
                    "reused": v.get("reused", False)} for k, v in stages.items()],
        "tasks": list(bench.get("tasks") or []),  # multi-task: one per output head, in head order; [] single-task
        "rows": rows, "notes": list(bench.get("notes", [])), "meter": bench.get("meter"),
        "allowance": recipe.get("max_accuracy_drop_per_stage", 0.01),
    }
    report["flags"] = flags(report)
    report["recommended"], report["nearest_miss"] = budgets.recommendation(report)
    return report


def _versions() -> dict:
    from pipeline.device.envinfo import versions
    return versions("torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "torch-pruning", "numpy")


def flags(report: dict) -> list[dict]:
    """Stages that are not faster than their predecessor beyond noise, or lose more accuracy than allowed."""
    out = []
    rows = report["rows"]
    for r in rows:
        pred = r.get("predecessor")
        if r["status"] != "measured" or not pred:
            continue
        p = next((q for q in rows if q["artifact"] == pred and q["provider"] == r["provider"]
                  and q["where"].get("hostname") == r["where"].get("hostname") and q["status"] == "measured"), None)
        if p is None:
            continue
        margin = noise_margin_ms(r["latency_ms"], p["latency_ms"])
        if r["latency_ms"]["p50"] > p["latency_ms"]["p50"] - margin:
            out.append({"artifact": r["artifact"], "provider": r["provider"], "kind": "not_faster",
                        "detail": f"p50 {r['latency_ms']['p50']:.4f} ms vs {pred} {p['latency_ms']['p50']:.4f} ms "
                                  f"(noise margin {margin:.4f} ms): not faster than its predecessor"})
        # the per-stage allowance is for compression steps (prune, quantize); a student's loss against its
        # teacher is what the profile's max_accuracy_drop budget judges
        if not is_trained(r.get("role")) and r.get("accuracy") is not None and p.get("accuracy") is not None \
                and p["accuracy"] - r["accuracy"] > report["allowance"]:
            out.append({"artifact": r["artifact"], "provider": r["provider"], "kind": "accuracy_drop",
                        "detail": f"accuracy {r['accuracy']:.4f} vs {pred} {p['accuracy']:.4f}: drop over the "
                                  f"recipe's allowance of {report['allowance']}"})
    return out


def pareto(points: list[tuple[float, float] | None]) -> list[bool]:
    """For (latency, accuracy) points, whether each is on the front: no other point is at least as fast and at least
    as accurate, and strictly better in one. None (not measured) is never on it; equal points are both on it."""
    def beats(q: tuple[float, float], p: tuple[float, float]) -> bool:
        return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])
    real = [p for p in points if p is not None and p[0] is not None and p[1] is not None]
    return [p in real and not any(beats(q, p) for q in real) for p in points]


def recommend(report: dict) -> dict | None:
    """The artifact budgets.recommendation chooses (report.json's `recommended`), or None."""
    return budgets.recommendation(report)[0]


# ---------------------------------------------------------------- rendering
def distill_facts(d: dict) -> list[tuple[str, str]]:
    """The distill stage's results as (label, value) lines, for report.md and report.html alike."""
    gap = d.get("gap_closed")
    of = d.get("teacher_of")  # multi-task: the teacher of each task, not an ensemble
    label = (" (" + ", ".join(f"{t}: {n}" for t, n in of.items()) + ")" if of and len(set(of.values())) > 1 else
             f" (ensemble of {d['teachers']})" if not of and (d.get("teachers") or 1) > 1 else "")
    out = [("teacher" + label, fmt(d.get("acc_teacher"), 4)),
           ("KD student", fmt(d.get("acc_kd"), 4)),
           ("scratch student (same budget, no teacher)", fmt(d.get("acc_scratch"), 4) + (
               " (collapsed: trained to chance on validation; without the teacher this budget did not train)"
               if d.get("scratch_collapsed") else "")),
           ("gap closed (KD - scratch) / (teacher - scratch)",
            fmt(gap, 2) if gap is not None else "undefined: the scratch student is at least as accurate as the "
                                                 "teacher")]
    if d.get("attack"):  # adversarial KD: robustness is what the method is for
        out.append((f"under attack ({d['attack']}): KD / scratch",
                    f"{fmt(d.get('acc_kd_attacked'), 4)} / {fmt(d.get('acc_scratch_attacked'), 4)}"))
    for h, a in (d.get("heads") or {}).items():  # multi-task: every head's figures (the lines above: the first's)
        out.append((f"head {h}: teacher / KD / scratch",
                    f"{fmt(a.get('acc_teacher'), 4)} / {fmt(a.get('acc_kd'), 4)} / {fmt(a.get('acc_scratch'), 4)}"))
    for g in d.get("generations") or []:  # self-distillation: each generation's student
        out.append((f"generation {g['generation']}", f"{fmt(g.get('test_acc'), 4)} (val {fmt(g.get('val_acc'), 4)})"))
    return out


def fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def how(r: dict) -> str:
    """'target', 'host', 'estimate' or 'skipped': how this row's figures were obtained."""
    if r["status"] == "skipped":
        return "skipped"
    if r["status"] == "estimated":
        return "estimate"
    return "target" if r.get("on_target") else "host"


@dataclass(frozen=True)
class TableRow:
    """One benchmark row as the tables show it: values and how each was obtained, nothing rendered yet."""
    artifact: str
    precision: str
    backend: str                 # onnxruntime / tensorrt
    provider: str                # without "ExecutionProvider"
    where_kind: str              # host / device / estimate
    where_name: str              # the machine (or the target an estimate is for)
    size_bytes: int | None
    params: int | None
    macs: int | None
    accuracy: float | None       # the first head's (a multi-task model's rows also have heads)
    heads: dict[str, float | None]  # multi-task: accuracy per head (task name), {} when the row has none
    delta_vs_teacher: float | None
    p50_ms: float | None         # an estimate's lower bound
    p95_ms: float | None
    img_s_b1: float | None
    energy_mj: float | None
    how: str                     # how(r): target / host / estimate / skipped
    energy_how: str | None       # measured / estimated / skipped, as the row says
    status: str
    reason: str | None


def table_rows(report: dict) -> list[TableRow]:
    out = []
    for r in report["rows"]:
        lat, kind, where = r.get("latency_ms") or {}, how(r), r["where"]
        measured = kind in ("target", "host")
        out.append(TableRow(
            artifact=r["artifact"], precision=r["precision"], backend=r["backend"],
            provider=r["provider"].replace("ExecutionProvider", ""), where_kind=where["kind"],
            where_name=where.get("hostname") or where.get("target", ""), size_bytes=r.get("size_bytes"),
            params=r.get("params"), macs=r.get("macs"), accuracy=r.get("accuracy"),
            heads={k: h.get("accuracy") for k, h in (r.get("heads") or {}).items()},
            delta_vs_teacher=r.get("delta_vs_teacher"),
            p50_ms=lat.get("lower_bound") if kind == "estimate" else lat.get("p50"),
            p95_ms=lat.get("p95") if measured else None,
            img_s_b1=(r.get("throughput") or {}).get("1") if measured else None,
            energy_mj=r.get("energy_mj") if kind != "skipped" else None, how=kind, energy_how=r.get("energy_how"),
            status=r["status"], reason=r.get("reason")))
    return out


SUFFIX = {"target": "", "host": "h", "estimate": "e"}  # the tables' mark for how a figure was obtained


def cells(t: TableRow) -> dict[str, str]:
    """The row's text per HEADER column (status without its reason: each table shows reasons its own way)."""
    tag = SUFFIX.get(t.how, "")
    etag = "e" if t.energy_how == "estimated" else tag

    def fig(v: float | None, digits: int, suffix: str) -> str:
        return "—" if v is None else f"{v:.{digits}f}{suffix}"
    return {"artifact": t.artifact, "prec": t.precision, "backend/provider": f"{t.backend}/{t.provider}",
            "where": f"{t.where_kind}:{t.where_name}",
            "KiB": "—" if t.size_bytes is None else f"{t.size_bytes / 1024:.1f}",
            "params": "—" if t.params is None else f"{t.params:,}",
            "MACs": "—" if t.macs is None else f"{t.macs:,}",
            "acc": fmt(t.accuracy, 4), "Δ teacher": fmt(t.delta_vs_teacher, 4),
            "p50 ms": ("≥" if t.how == "estimate" and t.p50_ms is not None else "") + fig(t.p50_ms, 4, tag),
            "p95 ms": fig(t.p95_ms, 4, tag), "img/s b1": fig(t.img_s_b1, 0, tag),
            "mJ/inf": fig(t.energy_mj, 4, etag), "status": t.status,
            **{f"acc {k}": fmt(v, 4) for k, v in t.heads.items()}}  # multi-task: see header()


HEADER = ["artifact", "prec", "backend/provider", "where", "KiB", "params", "MACs", "acc", "Δ teacher",
          "p50 ms", "p95 ms", "img/s b1", "mJ/inf", "status"]


def task_names(report: dict) -> list[str]:
    """The heads of a multi-task report in output order; [] for one task (the tables then show one 'acc')."""
    names = [t["name"] for t in report.get("tasks") or []]
    return names if len(names) > 1 else []


def accuracy_columns(report: dict) -> list[str]:
    """['acc'], or one column per head: ['acc digit', 'acc parity'] (keys of cells())."""
    return [f"acc {n}" for n in task_names(report)] or ["acc"]


def header(report: dict, columns: list[str] = HEADER) -> list[str]:
    """columns with 'acc' replaced by one accuracy column per head when the report has several tasks."""
    return [c for h in columns for c in (accuracy_columns(report) if h == "acc" else [h])]


def tasks_line(report: dict) -> str | None:
    """'Tasks (one output head each, in order): digit (10 classes, loss weight 1, labels class), ...', or None."""
    if not task_names(report):
        return None

    def one(t: dict) -> str:
        n = f"{len(t['classes'])} classes, " if t.get("classes") else ""
        return f"{t['name']} ({n}loss weight {t.get('weight', 1.0):g}, labels {t.get('labels', 'class')})"
    return ("Tasks (one output head each, in output order): " + ", ".join(one(t) for t in report["tasks"])
            + f"; Δ teacher, the plots and the budgets without a head name are the first head's "
              f"({report['tasks'][0]['name']}).")


def budget_md(report: dict) -> list[str]:
    """Each candidate against each budget (pipeline/report/budgets.py), as a Markdown table."""
    heads = budgets.limits(report)
    out = [f"Budgets of profile `{report['profile']['name']}`, judged on the target (latency: p95 + noise margin; "
           "accuracy: the worst provider):", "", "| artifact | " + " | ".join(heads.values()) + " |",
           "|" + "---|" * (len(heads) + 1)]
    out += ["| " + " | ".join([s.artifact, *(budgets.short(s.checks[k]) for k in heads)]) + " |"
            for s in budgets.table(report)]
    return out + [""]


def render_md(report: dict) -> str:
    lines = [f"# Report {report['run_id']}", "",
             f"Recipe `{report['recipe']['name']}`, profile `{report['profile']['name']}` "
             f"(target: {report['profile']['target']['name']}).", ""]
    cols = header(report)
    if tasks_line(report):
        lines += [tasks_line(report), ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for t in table_rows(report):
        c = cells(t)
        c["status"] += f": {t.reason}" if t.reason else ""
        lines.append("| " + " | ".join(c.get(h, "—").replace("|", "/") for h in cols) + " |")
    lines += ["", "Suffixes: none = measured on the profile's target; `h` = measured on this host, not the target; "
                  "`e` = estimated (formula in report.json); `—` = skipped or not applicable.", ""]
    d = report.get("distill") or {}
    if d:
        lines.append(f"Distillation ({d.get('method')}), test split, PyTorch:")
        lines += [f"- {k}: {v}" for k, v in distill_facts(d)]
        lines.append("")
    lines += budget_md(report) + [budgets.verdict_line(report), ""]
    if report.get("search"):
        lines += search_md(report["search"])
    for f in report.get("flags", []):
        lines.append(f"- flag {f['kind']}: `{f['artifact']}` on {f['provider']}: {f['detail']}")
    for n in report.get("notes", []):
        lines.append(f"- note: {n}")
    return "\n".join(lines) + "\n"


SEARCH_HEADER = ["candidate", "student", "prec", "epochs", "acc", "p95 ms", "KiB", "mJ/inf", "how", "cost min",
                 "front", "verdict"]


def search_cells(c: dict) -> dict[str, str]:
    """One candidate of a search report (report['search']['candidates']) as text per SEARCH_HEADER column."""
    p95 = fmt(c.get("p95_ms"), 4) if c.get("p95_ms") is not None else (
        f"≥{c['lower_bound_ms']:.4f}e" if c.get("lower_bound_ms") is not None else "—")
    energy = fmt(c.get("energy_mj"), 4) + ("e" if c.get("energy_how") == "estimated" else "")
    return {"candidate": c["artifact"], "student": c["label"], "prec": c["precision"], "epochs": str(c["epochs"]),
            "acc": fmt(c.get("accuracy"), 4), "p95 ms": p95,
            "KiB": "—" if c.get("size_bytes") is None else f"{c['size_bytes'] / 1024:.1f}",
            "mJ/inf": energy if c.get("energy_mj") is not None else "—", "how": c["provenance"],
            "cost min": f"{c['cost_min']:.1f}", "front": "yes" if c.get("on_front") else "",
            "verdict": short_verdict(c)}


def short_verdict(c: dict) -> str:
    """'meets every budget', or 'misses min_accuracy by 0.0133, ...' and what is unmeasured."""
    if c.get("meets_all"):
        return "meets every budget"
    parts = [f"misses {m['budget']} by {m['by']:.3g}" for m in c.get("missed", [])]
    parts += [f"{b} unmeasured" for b in c.get("unmeasured", [])]
    return "; ".join(parts) or c.get("verdict", "")


def search_md(s: dict) -> list[str]:
    """The search section of report.md: every candidate, the Pareto front, what the search cost."""
    t = s.get("teacher") or {}
    lines = [f"## Search `{s['id']}`", "",
             f"{s['trials']} trials, {s['runs']} runs ({s['runs_failed']} failed), wall time {s['wall_s'] / 60:.1f} "
             f"min (CPU {s.get('cpu_s', 0) / 60:.1f} min) over {s.get('sessions', 1)} session(s); teacher {'reused' if t.get('reused') else 'trained'} "
             f"({(t.get('wall_s') or 0) / 60:.1f} min here)." + (f" Stopped: {s['stopped']}." if s.get("stopped")
                                                                   else ""), "",
             "Pareto front (accuracy against measured p95 latency, fastest first): "
             + (", ".join(f"`{a}`" for a in s["front"]) or "empty (nothing measured on the target)") + ".", "",
             "| " + " | ".join(SEARCH_HEADER) + " |", "|" + "---|" * len(SEARCH_HEADER)]
    for c in s["candidates"]:
        cells = search_cells(c)
        lines.append("| " + " | ".join(cells[h].replace("|", "/") for h in SEARCH_HEADER) + " |")
    lines += ["", "how: measured = p95 measured on the target; estimated = a roofline lower bound, never a budget "
                  "met; cost: the candidate's trial, all its runs (the shared teacher not included).", ""]
    return lines
