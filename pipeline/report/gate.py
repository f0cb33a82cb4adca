"""The CI gate: a profile's budgets against the measured rows of the recommended artifact on the target.

Exit codes (Verdict.code):
  0  every budget that is set is met by a measurement on the target
  1  a budget is missed (the case says which and by how much), or the report recommends no artifact
  2  no measurement on the target for a budget that is set (estimates pass only with allow_estimates)
  3  unusable input: no such run, no report.json, another schema_version, a profile for another target
A miss outranks a missing measurement: 1 wins over 2, because what was measured already fails.

Budgets that are null in the profile are "not set": they are listed (and written to JUnit as skipped test
cases) but never count as passed, so a profile that forgot a budget cannot look stricter than it is.
Latency compares p95 plus the noise margin (pipeline.report.build.noise_margin_ms, q="p95") with the budget, so a
noisy runner cannot pass a budget it only ties; the margin is printed with the figure.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

from pipeline.artifacts import is_candidate
from pipeline.config import Profile, load_profile
from pipeline.errors import ConfigError
from pipeline.report import schema as reportschema
from pipeline.report.build import measured_rows, noise_margin_ms

BUDGETS = ("p95_latency_ms", "min_accuracy", "max_accuracy_drop", "max_size_mb", "max_energy_mj")
MET, MISSED, NO_MEASUREMENT, UNUSABLE = 0, 1, 2, 3
VERDICTS = {MET: "met", MISSED: "missed", NO_MEASUREMENT: "no measurement on the target", UNUSABLE: "unusable input"}


@dataclass
class Case:
    budget: str
    status: str                 # passed / failed / no_measurement / not_set (error: only in JUnit, input unusable)
    limit: float | None = None
    value: float | None = None  # the figure compared with the limit (p95 + margin for latency)
    message: str = ""
    source: str = ""            # how the figure was obtained
    estimated: bool = False     # passed or failed on an estimate (only with allow_estimates)


@dataclass
class Verdict:
    code: int
    run_dir: str
    profile: str
    artifact: str | None = None
    recommended: bool = False
    allow_estimates: bool = False
    cases: list[Case] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return VERDICTS[self.code]

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "code": self.code, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def text(self) -> str:
        head = f"gate {self.verdict.upper()} (exit {self.code}): profile {self.profile}, run {self.run_dir}"
        if self.artifact:
            head += f", artifact {self.artifact}" + ("" if self.recommended else " (not recommended)")
        lines = [head] + [f"  {c.status.upper():<15} {c.budget:<18} {c.message}" for c in self.cases]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def junit(self) -> str:
        """JUnit XML: one test case per budget (not-set budgets skipped), plus one for the recommendation."""
        suite = ET.Element("testsuite", name=f"gate.{self.profile}", tests=str(len(BUDGETS) + 1))
        counts = {"failures": 0, "errors": 0, "skipped": 0}
        cases = self.cases or [Case(b, "error", message=self.notes[0] if self.notes else self.verdict)
                               for b in BUDGETS]  # unusable input: every budget errs, none vanishes from CI
        for c in [*cases, self._recommendation_case()]:
            tc = ET.SubElement(suite, "testcase", classname=f"gate.{self.profile}", name=c.budget)
            tag = {"failed": "failure", "no_measurement": "error", "error": "error", "not_set": "skipped"}.get(c.status)
            if tag:
                ET.SubElement(tc, tag, message=c.message).text = c.source or c.message
                counts[{"failure": "failures", "error": "errors", "skipped": "skipped"}[tag]] += 1
            elif c.message:
                ET.SubElement(tc, "system-out").text = c.message
        suite.attrib.update({k: str(v) for k, v in counts.items()})
        if self.notes:
            ET.SubElement(suite, "system-out").text = "\n".join(self.notes)
        return ET.tostring(suite, encoding="unicode", xml_declaration=True)

    def _recommendation_case(self) -> Case:
        if self.code == UNUSABLE:
            return Case("recommended_artifact", "error", message=self.notes[0] if self.notes else self.verdict)
        if self.artifact is None:
            return Case("recommended_artifact", "failed", message="the report has no student artifact")
        if self.recommended:
            return Case("recommended_artifact", "passed", message=f"{self.artifact} is the report's recommendation")
        return Case("recommended_artifact", "failed", message=f"the report recommends no artifact; "
                                                              f"checked the best student {self.artifact}")


def gate(run_dir: Path, profile: Profile | str, allow_estimates: bool = False) -> Verdict:
    """Check the profile's budgets against run_dir/report.json; never raises for bad input (code 3)."""
    name = profile if isinstance(profile, str) else profile.name
    v = Verdict(UNUSABLE, str(run_dir), name, allow_estimates=allow_estimates)
    try:
        report = reportschema.load(Path(run_dir))
        prof = load_profile(profile) if isinstance(profile, str) else profile
        v.profile = prof.name
        _same_target(report, prof)
    except ConfigError as e:
        v.notes.append(str(e))
        return v
    rows = report["rows"]
    rec = report.get("recommended")
    v.artifact, v.recommended = (rec["artifact"], True) if rec else (_best_student(rows), False)
    if v.artifact is None:
        v.code, v.notes = MISSED, ["the report has no student artifact to check"]
        return v
    budgets = prof.budgets.model_dump()
    v.cases = [_check(b, budgets[b], v.artifact, report, allow_estimates) for b in BUDGETS]
    if allow_estimates and any(c.estimated for c in v.cases):
        v.notes.append("--allow-estimates: some budgets were judged on estimates or host figures, not on "
                       "measurements on the target (marked 'estimated'); this is not a measured pass.")
    failed = any(c.status == "failed" for c in v.cases) or not v.recommended
    v.code = MISSED if failed else NO_MEASUREMENT if any(c.status == "no_measurement" for c in v.cases) else MET
    if not v.recommended:
        v.notes.append(f"the report recommends no artifact (none meets the budgets, or every candidate was "
                       f"flagged); the gate checked the best student artifact, {v.artifact}, and fails.")
    return v


def _same_target(report: dict, prof: Profile) -> None:
    """Budgets may differ from the run's profile (a stricter copy); the target must not: on_target means it."""
    ran = report["profile"]
    if ran.get("target") != prof.target.model_dump(mode="json"):
        raise ConfigError(f"the run was measured for profile '{ran['name']}' (target {ran['target'].get('name')!r}); "
                          f"profile '{prof.name}' describes another target ({prof.target.name!r}). Gate with "
                          f"--profile {ran['name']}, or run the pipeline with --profile {prof.name}.")


def _best_student(rows: list[dict]) -> str | None:
    """Without a recommendation: the student artifact with the fastest on-target p95 (else the most accurate)."""
    students = {r["artifact"] for r in rows if is_candidate(r.get("role"))}

    def key(a: str) -> tuple:
        lat = [r["latency_ms"]["p95"] for r in measured_rows(rows, a, True) if r["latency_ms"].get("p95") is not None]
        acc = max((r["accuracy"] for r in rows if r["artifact"] == a and r.get("accuracy") is not None), default=0)
        return (not lat, min(lat, default=math.inf), -acc, a)
    return min(students, key=key) if students else None


def _check(budget: str, limit: float | None, artifact: str, report: dict, allow_estimates: bool) -> Case:
    if limit is None:
        return Case(budget, "not_set", message="not set in the profile")
    rows = report["rows"]
    on_target = measured_rows(rows, artifact, True)
    if budget == "p95_latency_ms":
        return _latency(limit, on_target, [r for r in rows if r["artifact"] == artifact
                                           and r["status"] == "estimated"], allow_estimates)
    if budget == "max_size_mb":
        size = next((r["size_bytes"] for r in rows if r["artifact"] == artifact and r.get("size_bytes") is not None),
                    None)
        if size is None:
            return Case(budget, "no_measurement", limit, message="no file size recorded for the artifact")
        return _compare(budget, size / 1e6, limit, "MB", "file size with its external data, MB = 10^6 bytes")
    if budget == "max_energy_mj":
        return _energy(limit, on_target, allow_estimates)
    return _accuracy(budget, limit, artifact, report, on_target, allow_estimates)


def _compare(budget: str, value: float, limit: float, unit: str, source: str, lower_is_better: bool = True,
             estimated: bool = False, shown: str | None = None) -> Case:
    ok = value <= limit if lower_is_better else value >= limit
    by = abs(value - limit)
    rel = f" ({by / limit:.0%})" if limit else ""
    what = shown or f"{value:.4g} {unit}".strip()
    cmp = ("≤" if ok else ">") if lower_is_better else ("≥" if ok else "<")
    msg = f"{what} {cmp} {limit:g} {unit}".strip() + ("" if ok else f": missed by {by:.4g} {unit}".rstrip() + rel)
    return Case(budget, "passed" if ok else "failed", limit, value, msg + (" [estimated]" if estimated else ""),
                source, estimated)


def _latency(limit: float, on_target: list[dict], estimates: list[dict], allow_estimates: bool) -> Case:
    rows = [r for r in on_target if r["latency_ms"].get("p95") is not None]
    if rows:
        r = min(rows, key=lambda r: r["latency_ms"]["p95"])
        p95, margin = r["latency_ms"]["p95"], noise_margin_ms(r["latency_ms"], q="p95")
        where = f"{r['backend']}/{r['provider']} on {r['where'].get('hostname') or r['where'].get('kind')}"
        return _compare("p95_latency_ms", p95 + margin, limit, "ms", f"{r.get('latency_source')} ({where})",
                        shown=f"p95 {p95:.4g} ms + noise margin {margin:.4g} ms = {p95 + margin:.4g} ms")
    if allow_estimates and estimates:
        lb = min(r["latency_ms"]["lower_bound"] for r in estimates)
        src = next(r["latency_source"] for r in estimates if r["latency_ms"]["lower_bound"] == lb)
        return _compare("p95_latency_ms", lb, limit, "ms", src, estimated=True,
                        shown=f"estimated lower bound {lb:.4g} ms (no measurement on the target)")
    hint = " (an estimate exists: --allow-estimates judges on it)" if estimates else ""
    return Case("p95_latency_ms", "no_measurement", limit,
                message=f"no latency measured on the target at batch 1{hint}")


def _energy(limit: float, on_target: list[dict], allow_estimates: bool) -> Case:
    found = [r for r in on_target if r.get("energy_mj") is not None]
    measured = [r for r in found if r.get("energy_how") == "measured"]
    use = measured or (found if allow_estimates else [])
    if not use:
        why = "only an estimate (power x latency): --allow-estimates judges on it" if found else "no energy figure"
        return Case("max_energy_mj", "no_measurement", limit, message=f"no energy measured on the target ({why})")
    r = min(use, key=lambda r: r["energy_mj"])
    return _compare("max_energy_mj", r["energy_mj"], limit, "mJ", r.get("energy_source", ""),
                    estimated=not measured, shown=f"{r['energy_mj']:.4g} mJ per inference")


def _accuracy(budget: str, limit: float, artifact: str, report: dict, on_target: list[dict],
              allow_estimates: bool) -> Case:
    rows = [r for r in on_target if r.get("accuracy") is not None]
    estimated = False
    if not rows and allow_estimates:  # accuracy measured on the host: the same model, another machine
        rows = [r for r in report["rows"] if r["artifact"] == artifact and r["status"] == "measured"
                and r.get("accuracy") is not None]
        estimated = bool(rows)
    if not rows:
        return Case(budget, "no_measurement", limit, message="no accuracy measured on the target")
    r = min(rows, key=lambda r: r["accuracy"])  # the worst provider: the deployed one may be any of them
    src = r.get("accuracy_source", "") + (" (on the host, not the target)" if estimated else "")
    if budget == "min_accuracy":
        return _compare(budget, r["accuracy"], limit, "", src, lower_is_better=False, estimated=estimated)
    teacher = _teacher_accuracy(report["rows"], r)
    if teacher is None:
        return Case(budget, "no_measurement", limit, message="no measured teacher accuracy to compare with")
    drop = teacher - r["accuracy"]
    return _compare(budget, drop, limit, "", f"{src}; teacher {teacher:.4f}", estimated=estimated,
                    shown=f"drop {drop:.4f} (teacher {teacher:.4f} - {r['accuracy']:.4f})")


def _teacher_accuracy(rows: list[dict], like: dict) -> float | None:
    """The teacher's accuracy on the same provider and machine if measured there, else any measured one."""
    teach = [r for r in rows if r.get("role") == "teacher" and r["status"] == "measured"
             and r.get("accuracy") is not None]
    same = [r for r in teach if r["provider"] == like["provider"] and r["where"] == like["where"]]
    return (same or teach)[0]["accuracy"] if (same or teach) else None


def write_junit(verdict: Verdict, path: Path) -> None:
    from pipeline.artifacts import atomic_write_text
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), verdict.junit())
