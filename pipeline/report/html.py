"""report.html: one self-contained page (no network, no scripts) that a person reads to decide what to ship.

Sections: the recommended artifact, the budgets, the per-row table (every figure with how it was obtained),
a latency/accuracy Pareto plot and a size chart (matplotlib SVG, inline), distillation, flags and notes,
stages and the environment. Every string from the report goes through `esc`; the plots render text as
paths (matplotlib's default svg.fonttype), so the page needs no fonts and no text reaches it unescaped.
"""
from __future__ import annotations

import html as _html
import io
import math
from typing import Any

from pipeline.errors import first_line
from pipeline.report import budgets
from pipeline.report.build import distill_facts, fmt, how, task_names, tasks_line

HOW = {"target": "measured on target", "host": "measured on host", "estimate": "estimated with formula",
       "skipped": "skipped"}
BUDGET_LABELS = {"p95_latency_ms": ("p95 latency at batch 1", "ms"), "min_accuracy": ("minimum accuracy", ""),
                 "max_accuracy_drop": ("maximum accuracy drop vs teacher", ""),
                 "max_size_mb": ("maximum size", "MB"), "max_energy_mj": ("maximum energy per inference", "mJ")}


def esc(v: Any) -> str:
    return _html.escape("" if v is None else str(v), quote=True)


def render(report: dict) -> str:
    """The whole page as one string."""
    prof = report["profile"]
    body = [f"<h1>Report <code>{esc(report['run_id'])}</code></h1>",
            f"<p class=sub>recipe <b>{esc(report['recipe'].get('name'))}</b> · profile <b>{esc(prof['name'])}</b>"
            f" · target {esc(prof['target'].get('kind'))}: {esc(prof['target'].get('name'))}"
            f" · created {esc(report.get('created'))}</p>",
            f"<p class=sub>{esc(tasks_line(report))}</p>" if tasks_line(report) else "",
            _recommended(report), _search(report) if report.get("search") else "", _budgets(report), _table(report),
            "" if report.get("search") else _plots(report), _distill(report),
            _flags_notes(report), _stages(report), _environment(report)]
    return (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>{esc(report['run_id'])}: {esc(prof['name'])}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(b for b in body if b) + "\n</body></html>\n")


# ---------------------------------------------------------------- figures and how they were obtained
def _num(v: float | None, digits: int = 4) -> str:
    return fmt(v, digits)


def _si(v: float | None) -> str:
    if v is None:
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _accuracies(report: dict) -> dict[str, float | None]:
    """Each artifact's accuracy as the budgets judge it (the worst on the target, else on the host): estimated
    and trtexec rows have none of their own and are drawn at it."""
    return {a: s.accuracy for a, s in budgets.evaluate(report, allow_estimates=True).items()}


# ---------------------------------------------------------------- sections
def _recommended(report: dict) -> str:
    rec = report.get("recommended")
    if not rec:
        return f"<div class='box bad'><b>No artifact recommended</b>: {esc(budgets.verdict_line(report))}</div>"
    return (f"<div class='box good'><b>Recommended artifact:</b> <code>{esc(rec['artifact'])}</code> "
            f"(basis: {esc(rec['basis'])}) · accuracy {_num(rec.get('accuracy'))} · p95 "
            f"{_num(rec.get('p95_ms'))} ms · {_bytes(rec.get('size_bytes'))}<br><small>the most accurate of the "
            f"artifacts meeting every budget (table below)</small></div>")


def _budgets(report: dict) -> str:
    """Each candidate against each budget: the same verdicts as the gate (pipeline/report/budgets.py)."""
    b = report["profile"].get("budgets") or {}
    keys = budgets.keys(b)  # a budget given per head ({task: value}) is one column per head

    def th(k: str) -> str:
        (name, task), limit = budgets.split(k), budgets.limit_of(b, k)
        label, unit = BUDGET_LABELS[name]
        label += f", head {task}" if task is not None else ""
        return (f"<th>{esc(label)}<br><small>{'not set' if limit is None else esc(f'{limit:g} {unit}'.strip())}"
                f"</small></th>")
    heads = "".join(th(k) for k in keys)
    trs = []
    for s in budgets.table(report):
        tds = "".join(f"<td class='b-{c.status}' title='{esc(c.source)}'>{esc(budgets.short(c))}"
                      f"<br><small>{esc(c.message)}</small></td>" for c in (s.checks[k] for k in keys))
        trs.append(f"<tr><td><code>{esc(s.artifact)}</code></td>{tds}</tr>")
    return (f"<h2>Budgets of profile <code>{esc(report['profile']['name'])}</code></h2><div class=scroll>"
            f"<table class=results><thead><tr><th>artifact</th>{heads}</tr></thead><tbody>{''.join(trs)}</tbody>"
            "</table></div><p class=legend>Judged on measurements on the target: latency is p95 plus the noise "
            "margin, accuracy the worst provider's; estimates and host figures never meet a target budget. "
            "The gate gives the same verdicts.</p>")


COLUMNS = ["stage", "artifact", "format", "precision", "backend / provider, where", "size", "params", "MACs",
           "accuracy", "Δ vs teacher", "p50", "p95", "p99", "img/s by batch", "energy mJ/inf", "how obtained"]


def _table(report: dict) -> str:
    rows = report["rows"]
    rec = (report.get("recommended") or {}).get("artifact")
    reasons = list(dict.fromkeys(r.get("reason") or "" for r in rows if r["status"] == "skipped"))
    tasks = task_names(report)  # several: one accuracy column per head instead of one
    cols = [c for h in COLUMNS for c in ([f"accuracy {t}" for t in tasks] or [h] if h == "accuracy" else [h])]
    out = ["<h2>Per-stage results</h2><div class=scroll><table class=results><thead><tr>"
           + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr></thead><tbody>"]
    for r in rows:
        kind = how(r)
        note = reasons.index(r.get("reason") or "") + 1 if kind == "skipped" else None
        tds = "".join(f"<td title='{esc(title)}'>{cell}</td>" if title else f"<td>{cell}</td>"
                      for cell, title in _cells(r, kind, note, tasks))
        out.append(f"<tr class='{kind}{' rec' if r['artifact'] == rec else ''}'>{tds}</tr>")
    out.append("</tbody></table></div>")
    if reasons:
        out.append("<p class=legend><b>Why rows were skipped</b></p><ol class=reasons>"
                   + "".join(f"<li>{esc(x)}</li>" for x in reasons) + "</ol>")
    out.append("<p class=legend>Latency in ms per call at batch 1; hover a figure for its source. "
               "<span class='badge target'>measured on target</span> on the profile's target; "
               "<span class='badge host'>measured on host</span> on the machine that ran the pipeline, not the "
               "target; <span class='badge estimate'>estimated with formula</span> a labelled lower bound (≥) from "
               "datasheet figures; <span class='badge skipped'>skipped</span> with the numbered reason above. "
               "Green rows: the recommended artifact.</p>")
    out.append(_sources(rows))
    return "\n".join(out)


def _cells(r: dict, kind: str, note: int | None, tasks: list[str] = ()) -> list[tuple[str, str | None]]:
    """(escaped HTML, hover text) per column of one row; tasks: one accuracy cell per head instead of one."""
    lat, where = r.get("latency_ms") or {}, r["where"]
    place = where.get("hostname") or where.get("target") or where.get("ssh") or ""
    if kind == "estimate":
        p50, p95, p99 = f"≥ {_num(lat.get('lower_bound'))}", "—", "—"
    else:
        p50, p95, p99 = (_num(lat.get(q)) for q in ("p50", "p95", "p99"))
    thr = "<br>".join(esc(f"b{b}: {_si(v)}") for b, v in (r.get("throughput") or {}).items()) or "—"
    esrc = r.get("energy_source") or ""
    energy = esc(_num(r.get("energy_mj")))
    if r.get("energy_mj") is not None and r.get("energy_how") != "measured":
        energy += f"<br><small>{esc(r.get('energy_how'))}</small>"
    obtained = f"<span class='badge {kind}'>{esc(HOW[kind])}{f' [{note}]' if note else ''}</span>"
    lsrc = r.get("latency_source")
    return [(esc(r.get("stage") or "—"), None), (f"<code>{esc(r['artifact'])}</code>", None),
            (esc(r.get("format")), None), (esc(r["precision"]), None),
            (f"{esc(r['backend'])} / {esc(r['provider'].replace('ExecutionProvider', ''))}<br>"
             f"<small>{esc(where['kind'])} {esc(place)}</small>", None),
            (esc(_bytes(r.get("size_bytes"))), None),
            ("—" if r.get("params") is None else f"{r['params']:,}", None),
            ("—" if r.get("macs") is None else f"{r['macs']:,}", None),
            *(_heads(r, tasks) if tasks else [(esc(_num(r.get("accuracy"))), r.get("accuracy_source"))]),
            (esc(_num(r.get("delta_vs_teacher"))), None),
            (esc(p50), lsrc), (esc(p95), lsrc), (esc(p99), lsrc), (thr, None), (energy, esrc),
            (obtained, r.get("reason"))]


def _heads(r: dict, tasks: list[str]) -> list[tuple[str, str | None]]:
    """One accuracy cell per head, hover: the source, the images and the agreement with the teacher's head."""
    out = []
    for t in tasks:
        h = (r.get("heads") or {}).get(t) or {}
        agree = (h.get("agreement") or {}).get("teacher")
        hover = "; ".join(x for x in (r.get("accuracy_source") if h else None,
                                      f"{h['accuracy_n']} images" if h.get("accuracy_n") else None,
                                      f"agreement with the teacher {agree:.4f}" if agree is not None else None) if x)
        out.append((esc(_num(h.get("accuracy"))), hover or None))
    return out


def _sources(rows: list[dict]) -> str:
    items = []
    for r in rows:
        if r["status"] == "skipped":
            continue
        parts = [f"<b>{k}</b>: {esc(v)}" for k in ("latency", "accuracy", "energy") if (v := r.get(f"{k}_source"))]
        items.append(f"<li><code>{esc(r['artifact'])}</code> · {esc(r['backend'])}/"
                     f"{esc(r['provider'].replace('ExecutionProvider', ''))} @ {esc(r['where']['kind'])}: "
                     + "; ".join(parts) + "</li>")
    return (f"<details open><summary>How each figure was obtained</summary><ul class=sources>{''.join(items)}"
            "</ul></details>")


def _plots(report: dict) -> str:
    try:
        pareto, sizes = pareto_svg(report), size_svg(report)
    except Exception as e:  # a broken plot must not cost the table: say so on the page
        return f"<h2>Plots</h2><p class=bad>plots failed: {esc(first_line(e))}</p>"
    out = ["<h2>Latency vs accuracy</h2>",
           f"<figure>{pareto}<figcaption>p95 latency at batch 1 (estimated points: the roofline lower bound) "
           "against test accuracy; marker area ∝ file size; dashed lines are the profile's budgets; the "
           "step line is the Pareto front of the measured points.</figcaption></figure>" if pareto
           else "<p>No row has both a latency and an accuracy to plot.</p>",
           "<h2>Size per artifact</h2>",
           f"<figure class=narrow>{sizes}</figure>" if sizes else "<p>No artifact sizes.</p>"]
    return "\n".join(out)


def _search(report: dict) -> str:
    """A search report: what it cost, every candidate on one plot and in one table, the front marked."""
    from pipeline.report.build import SEARCH_HEADER, search_cells, search_md
    s = report["search"]
    summary = search_md(s)[2]  # the one-line summary of report.md
    try:
        plot = search_svg(report)
    except Exception as e:  # a broken plot must not cost the table
        plot = f"<p class=bad>plot failed: {esc(first_line(e))}</p>"
    rec = (report.get("recommended") or {}).get("artifact")
    trs = []
    for c in s["candidates"]:
        cells = search_cells(c)
        cls = "rec" if c["artifact"] == rec else ("estimate" if c["provenance"] == "estimated" else "")
        trs.append(f"<tr class='{cls}'>" + "".join(f"<td>{esc(cells[h])}</td>" for h in SEARCH_HEADER) + "</tr>")
    return (f"<h2>Search <code>{esc(s['id'])}</code></h2><p>{esc(summary)}</p>"
            + (f"<figure>{plot}<figcaption>Every candidate: p95 latency at batch 1 measured on the target (hollow "
               "diamonds: estimated lower bounds, which never meet a budget and are never on the front) against "
               "test accuracy; colour = the candidate's cost in minutes (its trial's runs); dashed lines are the "
               "budgets; green rings (joined by a step line) are the Pareto front.</figcaption></figure>" if plot else
               "<p>No candidate has both a latency and an accuracy to plot.</p>")
            + "<div class=scroll><table class=results><thead><tr>"
            + "".join(f"<th>{esc(h)}</th>" for h in SEARCH_HEADER) + f"</tr></thead><tbody>{''.join(trs)}</tbody>"
            "</table></div>")


def _budget_lines(report: dict, teacher: float | None) -> list[tuple[str, float | None, str, str]]:
    """The plots' dashed budget lines (axis, value, colour, label). The plots' accuracy is the first head's, so a
    per-head budget draws the first head's line only (none when it does not name the first head)."""
    b = report["profile"].get("budgets") or {}
    acc, acc_head = budgets.first_head_limit(report, "min_accuracy")
    drop, drop_head = budgets.first_head_limit(report, "max_accuracy_drop")
    lines = [("v", b.get("p95_latency_ms"), "#d62728", f"p95 budget {b.get('p95_latency_ms')} ms"),
             ("h", acc, "#9467bd", f"min accuracy{acc_head} {acc}")]
    if drop is not None and teacher is not None:
        lines.append(("h", teacher - drop, "#8c564b", f"teacher − max drop{drop_head} {drop} = {teacher - drop:.4f}"))
    return lines


def search_svg(report: dict) -> str | None:
    """Every search candidate: latency (x) against accuracy (y), provenance by marker, cost by colour."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    cands = report["search"]["candidates"]
    pts = [{"x": c["p95_ms"] if c["provenance"] == "measured" else c.get("lower_bound_ms"), "y": c["accuracy"],
            "kind": "target" if c["provenance"] == "measured" else "estimate", "cost": c["cost_min"],
            "front": c["on_front"], "area": 70, "label": f"{c['trial']} {c['precision']}"} for c in cands]
    pts = [p for p in pts if p["x"] is not None and p["y"] is not None]
    if not pts:
        return None
    fig = Figure(figsize=(10, 5.2))
    ax = fig.add_subplot()
    costs = [p["cost"] for p in pts]
    norm, cmap = Normalize(min(costs), max(costs) if max(costs) > min(costs) else min(costs) + 1), colormaps["viridis"]
    for kind, marker in (("target", "o"), ("estimate", "D")):
        sel = [p for p in pts if p["kind"] == kind]
        if sel:
            colors = [cmap(norm(p["cost"])) for p in sel]
            ax.scatter([p["x"] for p in sel], [p["y"] for p in sel], marker=marker, s=70, zorder=3, linewidths=1.5,
                       facecolors=colors if kind == "target" else "none", edgecolors=colors)
    front = sorted((p for p in pts if p["front"]), key=lambda p: p["x"])
    if front:  # ringed, and joined by a step line when there are several
        ax.scatter([p["x"] for p in front], [p["y"] for p in front], s=220, facecolors="none", edgecolors="#2ca02c",
                   linewidths=2, zorder=4)
    if len(front) > 1:
        ax.step([p["x"] for p in front], [p["y"] for p in front], where="post", color="#2ca02c", lw=1, zorder=2)
    teacher = next((r.get("accuracy") for r in report["rows"] if r.get("role") == "teacher"
                    and r.get("accuracy") is not None and r.get("on_target")), None)
    lines = _budget_lines(report, teacher)
    handles = [Line2D([], [], ls="", marker="o", color="#444", label="measured on target"),
               Line2D([], [], ls="", marker="D", color="#444", markerfacecolor="none",
                      label="estimated lower bound"),
               Line2D([], [], ls="", marker="o", markersize=12, color="#2ca02c", markerfacecolor="none",
                      label="on the Pareto front")]
    for axis, v, color, text in lines:
        if v is not None:
            (ax.axvline if axis == "v" else ax.axhline)(v, color=color, ls="--", lw=1.2)
            handles.append(Line2D([], [], color=color, ls="--", label=text))
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="cost, minutes", pad=0.01)
    ax.legend(handles=handles, fontsize=8, loc="lower right", framealpha=0.9)
    ax.set_xlabel("p95 latency at batch 1, ms")
    ax.set_ylabel("test accuracy" + "".join(f", {t} head" for t in task_names(report)[:1]))
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.1)
    _label(fig, ax, pts)
    return _svg(fig, "search")


def _distill(report: dict) -> str:
    d = report.get("distill") or {}
    out = []
    if d:
        out.append(f"<h2>Distillation ({esc(d.get('method'))})</h2><table class=kv>"
                   + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in distill_facts(d))
                   + "</table><p class=legend>Test-split accuracy in PyTorch.</p>")
    p = report.get("prune") or {}
    if p.get("params_before"):
        out.append(f"<h2>Pruning</h2><table class=kv><tr><th>params</th><td>{p['params_before']:,} → "
                   f"{p.get('params_after', 0):,}</td></tr><tr><th>MACs</th><td>{p.get('macs_before', 0):,} → "
                   f"{p.get('macs_after', 0):,}</td></tr><tr><th>accuracy before / after prune / after fine-tune"
                   f"</th><td>{_num(p.get('acc_before'))} / {_num(p.get('acc_after_prune'))} / "
                   f"{_num(p.get('acc_after_finetune'))}</td></tr></table>")
    q = (report.get("quantize") or {}).get("artifacts") or {}
    if q:
        trs = "".join(f"<tr><th><code>{esc(n)}</code></th><td>from {esc(a.get('source'))}: test acc "
                      f"{_num(a.get('test_acc'))}, agreement with source {_num(a.get('agreement_vs_source'))}</td></tr>"
                      for n, a in q.items())
        out.append(f"<h2>Quantization</h2><table class=kv>{trs}</table>")
    return "\n".join(out)


def _flags_notes(report: dict) -> str:
    items = [f"<li class=flag><b>{esc(f['kind'])}</b> <code>{esc(f['artifact'])}</code> on {esc(f['provider'])}: "
             f"{esc(f['detail'])}</li>" for f in report.get("flags", [])]
    items += [f"<li>{esc(n)}</li>" for n in report.get("notes", [])]
    return "<h2>Flags and notes</h2>" + (f"<ul>{''.join(items)}</ul>" if items else "<p>None.</p>")


def _stages(report: dict) -> str:
    def secs(s: dict) -> str:
        return "" if s.get("duration_s") is None else f"{s['duration_s']:.1f} s"

    def status(s: dict) -> str:  # the report stage is still running while it writes this page
        st = "writing this report" if s["name"] == "report" and s.get("status") == "running" else s.get("status")
        return f"{st}{' (reused)' if s.get('reused') else ''}"
    trs = "".join(f"<tr><td>{esc(s['name'])}</td><td>{esc(status(s))}</td><td>{esc(secs(s))}</td></tr>"
                  for s in report.get("stages", []))
    return f"<h2>Stages</h2><table class=kv><tr><th>stage</th><th>status</th><th>time</th></tr>{trs}</table>"


def _environment(report: dict) -> str:
    env = report.get("environment") or {}
    cpu = env.get("cpu") or {}
    pairs = [("host", env.get("hostname")), ("kind", env.get("kind")), ("board", env.get("board")),
             ("CPU", f"{cpu.get('model', '')} ({cpu.get('arch', '')}, {cpu.get('cores', '?')} cores; "
                     f"{', '.join(str(f) for f in cpu.get('flags') or [] if f)})" if cpu else None),
             ("OS", env.get("os")), ("onnxruntime providers", ", ".join(env.get("ort_providers") or [])),
             ("energy meter", report.get("meter") or "none")]
    pairs += [(k, v) for k, v in (env.get("versions") or {}).items()]
    trs = "".join(f"<tr><th>{esc(k)}</th><td>{esc('—' if v in (None, '') else v)}</td></tr>" for k, v in pairs)
    return f"<h2>Environment</h2><table class=kv>{trs}</table>"


# ---------------------------------------------------------------- plots (matplotlib, SVG inline)
def _svg(fig, salt: str) -> str:
    import matplotlib
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt}):  # stable ids, distinct between the page's figures
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _plain(s: str) -> str:
    return str(s).replace("$", r"\$")  # no mathtext from artifact names


def _points(report: dict) -> list[dict]:
    rows, pts, accs = report["rows"], [], _accuracies(report)
    for r in rows:
        lat = r.get("latency_ms") or {}
        x = lat.get("p95") if r["status"] == "measured" and r.get("batch") == 1 else \
            lat.get("lower_bound") if r["status"] == "estimated" else None
        acc = r.get("accuracy") if r.get("accuracy") is not None else accs.get(r["artifact"])
        if x is None or acc is None:
            continue
        pts.append({"x": x, "y": acc, "kind": how(r), "size": r.get("size_bytes") or 0, "artifact": r["artifact"],
                    "label": f"{r['artifact']} ({_short(r)})"})
    return pts


def _short(r: dict) -> str:
    if r["backend"] == "tensorrt":
        return "trtexec"
    p = r["provider"]
    return "TensorRT EP" if p == "TensorrtExecutionProvider" else p.replace("ExecutionProvider", "")


STYLE = {"target": dict(marker="o", color="#1f77b4", label="measured on target"),
         "host": dict(marker="^", color="#7f7f7f", label="measured on host (not the target)"),
         "estimate": dict(marker="D", color="#ff7f0e", label="estimated: roofline lower bound")}


def pareto_svg(report: dict) -> str | None:
    """p95 latency (x) against accuracy (y); None when no row has both."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    pts = _points(report)
    if not pts:
        return None
    fig = Figure(figsize=(10, 5.2))
    ax = fig.add_subplot()
    biggest = max(p["size"] for p in pts) or 1
    for p in pts:
        p["area"] = 40 + 600 * math.sqrt(p["size"] / biggest)  # points²: marker area grows with file size
    for kind, st in STYLE.items():
        sel = [p for p in pts if p["kind"] == kind]
        if sel:
            ax.scatter([p["x"] for p in sel], [p["y"] for p in sel], marker=st["marker"],
                       s=[p["area"] for p in sel], alpha=0.75,
                       facecolors="none" if kind == "estimate" else st["color"], edgecolors=st["color"],
                       linestyles="--" if kind == "estimate" else "-", linewidths=1.5, zorder=3)
    front = _front([p for p in pts if p["kind"] == "target"] or [p for p in pts if p["kind"] == "host"])
    if len(front) > 1:
        ax.step([p["x"] for p in front], [p["y"] for p in front], where="post", color="#2ca02c", lw=1, zorder=2)
    b, handles = report["profile"].get("budgets") or {}, []
    teacher = (report.get("distill") or {}).get("acc_teacher") or _accuracies(report).get(
        next((r["artifact"] for r in report["rows"] if r.get("role") == "teacher"), ""))
    lines = _budget_lines(report, teacher)
    for axis, v, color, label in lines:
        if v is not None:
            (ax.axvline if axis == "v" else ax.axhline)(v, color=color, ls="--", lw=1.2)
            handles.append(Line2D([], [], color=color, ls="--", label=label))
    xs = [p["x"] for p in pts] + ([b["p95_latency_ms"]] if b.get("p95_latency_ms") else [])
    if min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    handles = [Line2D([], [], ls="", marker=st["marker"], color=st["color"], label=st["label"],
                      markerfacecolor="none" if k == "estimate" else st["color"])
               for k, st in STYLE.items() if any(p["kind"] == k for p in pts)] + handles
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), framealpha=0.9)
    ax.set_xlabel("p95 latency at batch 1, ms" + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("test accuracy" + "".join(f", {t} head" for t in task_names(report)[:1]))
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.15, y=0.1)
    _label(fig, ax, pts)
    return _svg(fig, "pareto")


# label offsets in points, tried in order: right, below, left, above-left, then further out
CANDIDATES = [(8, 4, "left"), (8, -12, "left"), (-8, 4, "right"), (-8, -12, "right"), (8, 16, "left"),
              (8, -24, "left"), (-8, 16, "right"), (-8, -24, "right"), (8, 28, "left"), (8, -36, "left")]


def _label(fig, ax, pts: list[dict]) -> None:
    """Name every point where its label overlaps no other label or marker (else where it overlaps least)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()
    ax.autoscale_view()
    marks = []
    for p in pts:  # a box around each marker, so labels do not hide points
        x, y = ax.transData.transform((p["x"], p["y"]))
        r = math.sqrt(p["area"]) / 2 * fig.dpi / 72
        marks.append((x - r, y - r, x + r, y + r))
    placed: list[tuple] = []
    for p in sorted(pts, key=lambda p: (p["x"], -p["y"])):
        text = _plain(p["label"] + (" est. ≥" if p["kind"] == "estimate" else ""))
        best = None
        for dx, dy, ha in CANDIDATES:
            ann = ax.annotate(text, (p["x"], p["y"]), xytext=(dx, dy), textcoords="offset points", fontsize=8, ha=ha)
            e = ann.get_window_extent(renderer)
            box = (e.x0, e.y0, e.x1, e.y1)
            cost = sum(_overlap(box, o) for o in placed + marks)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[2])


def _overlap(a: tuple, b: tuple) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _front(pts: list[dict]) -> list[dict]:
    """Points no other point beats on both latency and accuracy, fastest first."""
    out, best = [], -math.inf
    for p in sorted(pts, key=lambda p: (p["x"], -p["y"])):
        if p["y"] > best:
            out.append(p)
            best = p["y"]
    return out


def size_svg(report: dict) -> str | None:
    """One horizontal bar per artifact, in KiB, with the profile's size budget when it is in range."""
    from matplotlib.figure import Figure
    sizes: dict[str, tuple[int, str]] = {}
    for r in report["rows"]:
        if r.get("size_bytes") is not None:
            sizes.setdefault(r["artifact"], (r["size_bytes"], r.get("role") or ""))
    if not sizes:
        return None
    names = list(sizes)
    kib = [sizes[n][0] / 1024 for n in names]
    fig = Figure(figsize=(7, 0.45 * len(names) + 1.3))
    ax = fig.add_subplot()
    rec = (report.get("recommended") or {}).get("artifact")
    ax.barh(range(len(names)), kib, color=["#2ca02c" if n == rec else "#1f77b4" for n in names])
    ax.set_yticks(range(len(names)), [_plain(n) for n in names], fontsize=9)
    ax.invert_yaxis()
    for i, v in enumerate(kib):
        ax.annotate(f"{v:,.1f} KiB", (v, i), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    budget = (report["profile"].get("budgets") or {}).get("max_size_mb")
    title = "file size (ONNX with external data); green: recommended"
    if budget is not None:
        limit = budget * 1e6 / 1024
        if limit <= 3 * max(kib):
            ax.axvline(limit, color="#d62728", ls="--", lw=1.2, label=f"size budget {budget:g} MB")
            ax.legend(fontsize=8, loc="lower right")
        else:
            title += f"; budget {budget:g} MB is off scale, all well below"
    ax.set_title(_plain(title), fontsize=9)
    ax.set_xlabel("KiB")
    ax.margins(x=0.18)
    return _svg(fig, "sizes")


CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:24px auto;
 max-width:1360px;padding:0 16px;color:#1d2430;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #e3e6ea;padding-bottom:3px}
.sub{color:#555;margin:0 0 12px}code{font:12.5px ui-monospace,'DejaVu Sans Mono',monospace;background:#f3f4f6;
 padding:1px 4px;border-radius:3px}
.box{padding:10px 14px;border-radius:6px;margin:10px 0}.good{background:#e8f5e9;border:1px solid #a5d6a7}
.bad{background:#fdecea;border:1px solid #f5a9a3}
.scroll{overflow-x:auto}table{border-collapse:collapse}
table.results{font-size:12px;width:100%}
.results th,.results td{border:1px solid #dde1e6;padding:3px 5px;text-align:right;white-space:nowrap;vertical-align:top}
.results small{color:#666}
.results th{background:#f5f7fa;white-space:normal;text-align:center}
.results td:nth-child(-n+5),.results td:last-child{text-align:left}
.results td:last-child{white-space:nowrap}ol.reasons{font-size:12px;color:#333;margin-top:2px}
tr.rec td{background:#f1f9f1}td.b-met{background:#eef8ee}td.b-missed{background:#fdecea}
td.b-unmeasured{background:#fff6e0}tr.estimate td{font-style:italic;color:#8a4b00}tr.skipped td{color:#777}
.badge{display:inline-block;border-radius:10px;padding:0 7px;font-size:11.5px;font-style:normal;color:#fff}
.badge.target{background:#1f77b4}.badge.host{background:#6b7280}.badge.estimate{background:#e07b00}
.badge.skipped{background:#9ca3af}
.legend{color:#555;font-size:12.5px}ul.sources{font-size:12px;color:#333}details summary{cursor:pointer;color:#333}
table.kv th{text-align:left;font-weight:600;padding:3px 14px 3px 0;vertical-align:top}
table.kv td{padding:3px 14px 3px 0}
ul.budgets{columns:2;padding-left:18px}li.flag{color:#a11}
figure{margin:8px 0}figure svg{width:100%;max-width:1150px;height:auto}figure.narrow svg{max-width:760px}
figcaption{color:#555;font-size:12.5px}
"""
