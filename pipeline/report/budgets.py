"""One answer to "does this artifact meet the profile's budgets", used by recommend, gate, report.md, report.html
and the terminal table, so that none of them can disagree with another.

For each artifact and budget the answer is met, missed, unmeasured or not_set (null in the profile), with the
figure compared, the limit and the margin (room left when positive, the miss when negative). Figures:
  p95_latency_ms     p95 + noise margin (noise_margin_ms, q="p95") of the artifact's fastest measured batch-1 row
                     on the target: a noisy machine cannot pass a budget it only ties
  min_accuracy,      the worst accuracy measured on the target (the deployed provider may be any of them);
  max_accuracy_drop  the drop is against the teacher on the same provider and machine when measured there
  max_size_mb        the file with its external data, MB = 10^6 bytes
  max_energy_mj      the lowest energy per inference measured (energy_how) on the target
A number for min_accuracy or max_accuracy_drop judges the model's first head (row["accuracy"]); a mapping
{task: value} judges each head it names, as one check keyed "min_accuracy[task]", on row["heads"][task] with
the same rules (the teacher's figure: its head of that task). A head the artifact does not have is unmeasured.
Estimates and host-only figures never meet a target budget; with allow_estimates they are judged, labelled
`estimated` (latency: the roofline lower bound; accuracy: a host measurement; energy: a formula).

The choice: among candidate artifacts (pipeline.artifacts.is_candidate) meeting every budget, the most accurate
wins; equal accuracy goes to the faster unless their latencies are within the noise margin, then to the smaller
file, then to the name. When none does, `nearest_miss` names the candidate that misses least.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pipeline.artifacts import is_candidate

BUDGETS = ("p95_latency_ms", "min_accuracy", "max_accuracy_drop", "max_size_mb", "max_energy_mj")
UNITS = {"p95_latency_ms": "ms", "min_accuracy": "", "max_accuracy_drop": "", "max_size_mb": "MB",
         "max_energy_mj": "mJ"}
Status = Literal["met", "missed", "unmeasured", "not_set"]
EPS = 1e-9  # float representation, not leniency: 0.97 - 0.94 is 0.030000000000000027, a drop of exactly 0.03
PER_HEAD = ("min_accuracy", "max_accuracy_drop")  # budgets that take {task: value}, one check per head


def keys(b: dict) -> list[str]:
    """Every check's key in order: the budget's name, or 'min_accuracy[parity]' per head a mapping names."""
    return [key for k in BUDGETS for key in ([f"{k}[{t}]" for t in b[k]] if _per_head(k, b.get(k)) else [k])]


def split(key: str) -> tuple[str, str | None]:
    """'min_accuracy[parity]' -> ('min_accuracy', 'parity'); 'min_accuracy' -> ('min_accuracy', None)."""
    name, _, task = key.partition("[")
    return name, (task[:-1] if task else None)


def limit_of(b: dict, key: str) -> float | None:
    """The limit a check key stands for (None: not set)."""
    name, task = split(key)
    v = b.get(name)
    return v.get(task) if task is not None and isinstance(v, dict) else (None if isinstance(v, dict) else v)


def first_head_limit(report: dict, name: str) -> tuple[float | None, str]:
    """(limit, ' (digit head)') for a figure of the first head, e.g. the accuracy a plot draws; a mapping that
    does not name the first task gives None."""
    v = (report["profile"].get("budgets") or {}).get(name)
    if not isinstance(v, dict):
        return v, ""
    first = next((t["name"] for t in report.get("tasks") or []), None)
    return (v.get(first), f" ({first} head)") if first is not None else (None, "")


def _per_head(budget: str, v: object) -> bool:
    return budget in PER_HEAD and isinstance(v, dict) and bool(v)  # {} names no head: the budget is not set


def noise_margin_ms(a: dict, b: dict | None = None, q: str = "p50") -> float:
    """Twice the combined standard error of a percentile (1.2533·σ/√n for the median), floored at 2 % of it.

    Two figures closer than this are a tie: a noisy machine must not flip a verdict.
    """
    def se(lat: dict) -> float:
        return 1.2533 * lat["std"] / math.sqrt(max(lat["n"], 1))
    err = se(a) ** 2 + (se(b) ** 2 if b else 0.0)
    return max(2 * math.sqrt(err), 0.02 * a[q])


def measured_rows(rows: list[dict], artifact: str, on_target: bool) -> list[dict]:
    """The artifact's measured batch-1 rows, on the profile's target or not."""
    return [r for r in rows if r["artifact"] == artifact and r["status"] == "measured"
            and bool(r.get("on_target", False)) == on_target and r.get("batch") == 1]


@dataclass
class Check:
    budget: str
    status: Status
    limit: float | None = None
    value: float | None = None      # the figure compared with the limit (p95 + noise margin for latency)
    margin: float | None = None     # limit - value (value - limit for min_accuracy): < 0 is a miss by -margin
    noise_ms: float | None = None   # latency: the noise margin added to p95
    estimated: bool = False         # judged on an estimate or a host figure (only with allow_estimates)
    source: str = ""                # how the figure was obtained
    message: str = ""               # one line: the comparison, or why there is none

    @property
    def relative_miss(self) -> float:
        """How far over the limit, as a share of it (absolute when the limit is 0); 0 when not missed."""
        if self.status != "missed":
            return 0.0
        return -self.margin / abs(self.limit) if self.limit else -self.margin


@dataclass
class Standing:
    """An artifact against every budget, and the figures the choice ranks by."""
    artifact: str
    role: str | None
    checks: dict[str, Check] = field(default_factory=dict)
    accuracy: float | None = None   # the accuracy the budgets judged (None: unmeasured)
    latency: dict | None = None     # the latency row the budgets judged: its latency_ms (None: unmeasured)
    size_bytes: int | None = None
    estimated: bool = False         # some figure is an estimate or from the host

    @property
    def meets_all(self) -> bool:
        return all(c.status in ("met", "not_set") for c in self.checks.values())

    @property
    def missed(self) -> list[Check]:
        return [c for c in self.checks.values() if c.status == "missed"]

    @property
    def unmeasured(self) -> list[Check]:
        return [c for c in self.checks.values() if c.status == "unmeasured"]


def evaluate(report: dict, budgets: dict | None = None, allow_estimates: bool = False) -> dict[str, Standing]:
    """Every artifact of the report against `budgets` (default: the report's profile's), in row order."""
    b = (report["profile"].get("budgets") or {}) if budgets is None else budgets
    rows = report["rows"]
    out: dict[str, Standing] = {}
    for art in dict.fromkeys(r["artifact"] for r in rows):
        out[art] = _standing(art, rows, b, allow_estimates)
    return out


def choose(standings: dict[str, Standing]) -> Standing | None:
    """The candidate that meets every budget and ranks first (see the module docstring), or None."""
    ok = [s for s in standings.values() if is_candidate(s.role) and s.meets_all and s.accuracy is not None]
    if not ok:
        return None
    top = max(s.accuracy for s in ok)
    best = [s for s in ok if s.accuracy == top]
    timed = [s for s in best if s.latency]
    if timed:  # equal accuracy: the faster, unless within the noise margin of the fastest
        fast = min(timed, key=lambda s: _p95(s))
        best = [s for s in timed if _p95(s) - _p95(fast) <= noise_margin_ms(s.latency, fast.latency, q="p95")]
    return min(best, key=lambda s: (s.size_bytes if s.size_bytes is not None else math.inf, s.artifact))


def nearest_miss(standings: dict[str, Standing]) -> Standing | None:
    """The candidate closest to meeting every budget: fewest misses, then the smallest relative miss."""
    cands = [s for s in standings.values() if is_candidate(s.role)]
    if not cands:
        return None
    return min(cands, key=lambda s: (len(s.missed), max((c.relative_miss for c in s.missed), default=0.0),
                                     len(s.unmeasured), -(s.accuracy or 0.0), s.artifact))


def recommendation(report: dict) -> tuple[dict | None, dict | None]:
    """(recommended, nearest_miss) for report.json, with the report's own budgets.

    Recommended: the choice among artifacts meeting every budget on the target (basis "target"); failing that,
    the choice when estimates and host figures are allowed (basis says so: the gate then exits 2 unless
    --allow-estimates). The nearest miss is given when nothing is recommended.
    """
    for allow, basis in ((False, "target"), (True, "estimates: not measured on the target")):
        s = choose(evaluate(report, allow_estimates=allow))
        if s is not None:
            lat = s.latency or {}
            return {"artifact": s.artifact, "basis": basis, "p50_ms": lat.get("p50"), "p95_ms": lat.get("p95"),
                    "accuracy": s.accuracy, "size_bytes": s.size_bytes}, None
    near = nearest_miss(evaluate(report))
    if near is None:
        return None, None
    worst = max(near.missed, key=lambda c: c.relative_miss, default=None) or (near.unmeasured or [None])[0]
    return None, {"artifact": near.artifact, "budget": worst.budget if worst else None,
                  "status": worst.status if worst else None, "value": worst.value if worst else None,
                  "limit": worst.limit if worst else None, "by": -worst.margin if worst and worst.margin else None,
                  "message": describe_miss(near)}


def describe_miss(s: Standing) -> str:
    """'student.onnx misses p95_latency_ms: ... (and 1 more)', or what is unmeasured."""
    if s.missed:
        first = max(s.missed, key=lambda c: c.relative_miss)
        more = f" (and {len(s.missed) - 1} more)" if len(s.missed) > 1 else ""
        return f"{s.artifact} misses {first.budget}: {first.message}{more}"
    if s.unmeasured:
        return f"{s.artifact}: no measurement on the target for {', '.join(c.budget for c in s.unmeasured)}"
    return f"{s.artifact} meets every budget"


# ---------------------------------------------------------------- one artifact
def _p95(s: Standing) -> float:
    return s.latency["p95"]


def _standing(art: str, rows: list[dict], b: dict, allow_estimates: bool) -> Standing:
    mine = [r for r in rows if r["artifact"] == art]
    on = measured_rows(rows, art, True)
    s = Standing(art, mine[0].get("role"),
                 size_bytes=next((r["size_bytes"] for r in mine if r.get("size_bytes") is not None), None))
    acc_rows, acc_est = _accuracy_rows(on, measured_rows(rows, art, False), allow_estimates)
    acc = min(acc_rows, key=lambda r: r["accuracy"]) if acc_rows else None
    s.accuracy = acc["accuracy"] if acc else None
    lat_rows = [r for r in on if r["latency_ms"].get("p95") is not None]
    lat = min(lat_rows, key=lambda r: r["latency_ms"]["p95"] + noise_margin_ms(r["latency_ms"], q="p95")) \
        if lat_rows else None
    s.latency = lat["latency_ms"] if lat else None
    for budget in BUDGETS:
        limit = b.get(budget)
        if _per_head(budget, limit):  # one check per head the mapping names
            for task, value in limit.items():
                key = f"{budget}[{task}]"
                s.checks[key] = _head(key, task, value, on, measured_rows(rows, art, False), allow_estimates, rows)
            continue
        if limit is None or isinstance(limit, dict):
            s.checks[budget] = Check(budget, "not_set", message="not set in the profile")
        elif budget == "p95_latency_ms":
            s.checks[budget] = _latency(limit, lat, [r for r in mine if r["status"] == "estimated"], allow_estimates)
        elif budget == "max_size_mb":
            s.checks[budget] = _size(limit, s.size_bytes)
        elif budget == "max_energy_mj":
            s.checks[budget] = _energy(limit, on, [r for r in mine if r["status"] == "estimated"], allow_estimates)
        else:
            s.checks[budget] = _accuracy(budget, limit, acc, acc_est, rows)
    s.estimated = any(c.estimated for c in s.checks.values())
    return s


def _accuracy_rows(on: list[dict], host: list[dict], allow_estimates: bool,
                   task: str | None = None) -> tuple[list[dict], bool]:
    found = [r for r in on if _acc(r, task) is not None]
    if found or not allow_estimates:
        return found, False
    host = [r for r in host if _acc(r, task) is not None]  # the same model on another machine
    return host, bool(host)


def _acc(row: dict, task: str | None) -> float | None:
    """The row's accuracy: its first head's (task None) or the named head's (None when it has no such head)."""
    if task is None:
        return row.get("accuracy")
    return ((row.get("heads") or {}).get(task) or {}).get("accuracy")


def _head(key: str, task: str, limit: float, on: list[dict], host: list[dict], allow_estimates: bool,
          rows: list[dict]) -> Check:
    """A per-head accuracy budget: the worst accuracy of head `task` on the target, as for the first head."""
    found, est = _accuracy_rows(on, host, allow_estimates, task)
    if found:
        return _accuracy(key, limit, min(found, key=lambda r: _acc(r, task)), est, rows, task)
    mine = on + host
    heads = list(dict.fromkeys(h for r in mine for h in r.get("heads") or {}))
    if mine and not heads:
        why = (f"no head '{task}': the artifact's rows have no per-head accuracy (a single-head model; a number "
               f"for {split(key)[0]} judges its only head)")
    elif heads and task not in heads:
        why = f"no head '{task}' in the artifact (its heads: {', '.join(heads)})"
    else:
        why = f"no accuracy of head '{task}' measured on the target"
    return Check(key, "unmeasured", limit, message=why)


def compare(budget: str, value: float, limit: float, source: str, *, estimated: bool = False,
            shown: str | None = None, noise_ms: float | None = None) -> Check:
    """value against limit (min_accuracy: at least; every other budget: at most), with the one-line message.

    budget is a check's key: a budget's name, or 'min_accuracy[task]' for one head.
    """
    unit, at_least = UNITS[split(budget)[0]], split(budget)[0] == "min_accuracy"
    ok = value >= limit - EPS if at_least else value <= limit + EPS
    margin = value - limit if at_least else limit - value
    rel = f" ({abs(margin) / limit:.0%})" if limit else ""
    what = shown or f"{value:.4g} {unit}".strip()
    cmp = ("≥" if ok else "<") if at_least else ("≤" if ok else ">")
    msg = f"{what} {cmp} {limit:g} {unit}".strip() + ("" if ok else f": missed by {abs(margin):.4g} {unit}".rstrip()
                                                      + rel)
    return Check(budget, "met" if ok else "missed", limit, value, margin, noise_ms, estimated, source,
                 msg + (" [estimated]" if estimated else ""))


def _latency(limit: float, row: dict | None, estimates: list[dict], allow_estimates: bool) -> Check:
    if row is not None:
        p95 = row["latency_ms"]["p95"]
        margin = noise_margin_ms(row["latency_ms"], q="p95")
        where = f"{row['backend']}/{row['provider']} on {row['where'].get('hostname') or row['where'].get('kind')}"
        return compare("p95_latency_ms", p95 + margin, limit, f"{row.get('latency_source')} ({where})",
                       shown=f"p95 {p95:.4g} ms + noise margin {margin:.4g} ms = {p95 + margin:.4g} ms",
                       noise_ms=margin)
    if allow_estimates and estimates:
        r = min(estimates, key=lambda r: r["latency_ms"]["lower_bound"])
        lb = r["latency_ms"]["lower_bound"]
        return compare("p95_latency_ms", lb, limit, r["latency_source"], estimated=True,
                       shown=f"estimated lower bound {lb:.4g} ms (no measurement on the target)")
    hint = " (an estimate exists: --allow-estimates judges on it)" if estimates else ""
    return Check("p95_latency_ms", "unmeasured", limit, message=f"no latency measured on the target at batch 1{hint}")


def _size(limit: float, size: int | None) -> Check:
    if size is None:
        return Check("max_size_mb", "unmeasured", limit, message="no file size recorded for the artifact")
    return compare("max_size_mb", size / 1e6, limit, "file size with its external data, MB = 10^6 bytes")


def _energy(limit: float, on: list[dict], estimates: list[dict], allow_estimates: bool) -> Check:
    found = [r for r in on + estimates if r.get("energy_mj") is not None]
    measured = [r for r in on if r.get("energy_mj") is not None and r.get("energy_how") == "measured"]
    use = measured or (found if allow_estimates else [])
    if not use:
        why = "only an estimate (power x latency): --allow-estimates judges on it" if found else "no energy figure"
        return Check("max_energy_mj", "unmeasured", limit, message=f"no energy measured on the target ({why})")
    r = min(use, key=lambda r: r["energy_mj"])
    return compare("max_energy_mj", r["energy_mj"], limit, r.get("energy_source", ""), estimated=not measured,
                   shown=f"{r['energy_mj']:.4g} mJ per inference")


def _accuracy(budget: str, limit: float, row: dict | None, estimated: bool, rows: list[dict],
              task: str | None = None) -> Check:
    """budget: 'min_accuracy' / 'max_accuracy_drop' on the first head, or their 'name[task]' keys on head task."""
    if row is None:
        return Check(budget, "unmeasured", limit, message="no accuracy measured on the target")
    src = row.get("accuracy_source", "") + (" (on the host, not the target)" if estimated else "")
    acc, head = _acc(row, task), "" if task is None else f"{task} "
    if split(budget)[0] == "min_accuracy":
        return compare(budget, acc, limit, src, estimated=estimated,
                       shown=None if task is None else f"{head}{acc:.4g}")
    teacher = _teacher_accuracy(rows, row, task)
    if teacher is None:
        return Check(budget, "unmeasured", limit, message="no measured teacher accuracy to compare with" if task
                     is None else f"no measured teacher accuracy of head '{task}' to compare with (no teacher row "
                                  f"has that head)")
    drop = teacher - acc
    return compare(budget, drop, limit, f"{src}; {head}teacher {teacher:.4f}", estimated=estimated,
                   shown=f"{head}drop {drop:.4f} (teacher {teacher:.4f} - {acc:.4f})")


def _teacher_accuracy(rows: list[dict], like: dict, task: str | None = None) -> float | None:
    """The teacher's accuracy on the same provider and machine if measured there, else any measured one.

    A head (task) is compared with the teacher's head of that task, else with the extra teacher that predicts it.
    """
    # an extra teacher (recipe tasks) is the reference of the heads it predicts and the teacher lacks
    for roles in (("teacher",), ("extra-teacher",)) if task is not None else (("teacher",),):
        teach = [r for r in rows if r.get("role") in roles and r["status"] == "measured"
                 and _acc(r, task) is not None]
        same = [r for r in teach if r["provider"] == like["provider"] and r["where"] == like["where"]]
        if same or teach:
            return _acc((same or teach)[0], task)
    return None


# ---------------------------------------------------------------- one table for report.md, report.html, the terminal
def limits(report: dict) -> dict[str, str]:
    """Each check's column heading: 'p95_latency_ms ≤ 2 ms', 'min_accuracy ≥ 0.93', 'max_energy_mj (not set)',
    'min_accuracy[parity] ≥ 0.99' (keyed like Standing.checks)."""
    b = report["profile"].get("budgets") or {}
    out = {}
    for k in keys(b):
        name, limit = split(k)[0], limit_of(b, k)
        cmp = "≥" if name == "min_accuracy" else "≤"
        out[k] = f"{k} (not set)" if limit is None else f"{k} {cmp} {limit:g} {UNITS[name]}".strip()
    return out


def short(c: Check) -> str:
    """One table cell: 'met 1.234', 'MISSED 2.5 (by 0.5)', 'unmeasured', 'not set'; `e` marks an estimate."""
    if c.status in ("unmeasured", "not_set"):
        return c.status.replace("_", " ")
    e = "e" if c.estimated else ""
    return f"met {c.value:.4g}{e}" if c.status == "met" else f"MISSED {c.value:.4g}{e} (by {-c.margin:.3g})"


def table(report: dict) -> list[Standing]:
    """The candidates' standings against the report's own budgets, in row order."""
    return [s for s in evaluate(report).values() if is_candidate(s.role)]


def verdict_line(report: dict) -> str:
    """The recommendation in one sentence, or the nearest miss with the budget and by how much."""
    rec, near = report.get("recommended"), report.get("nearest_miss")
    if rec:
        how = "measured on the target" if rec["basis"] == "target" else f"on {rec['basis']}"
        return (f"Recommended artifact: {rec['artifact']}, the most accurate of the artifacts meeting every budget "
                f"({how}).")
    if near:
        return f"Recommended artifact: none meets every budget. Nearest miss: {near['message']}."
    return "Recommended artifact: none (the report has no candidate artifact)."
