"""The CI gate: a profile's budgets against the measured rows of the recommended artifact on the target.

Exit codes (Verdict.code):
  0  every budget that is set is met by a measurement on the target
  1  a budget is missed (the case says which and by how much), or the report recommends no artifact; a budget
     given per head ({task: value}) is one case per head, so one head missing its budget fails the gate
  2  no measurement on the target for a budget that is set (estimates pass only with allow_estimates)
  3  unusable input: no such run, no report.json, another schema_version, a profile for another target
A miss outranks a missing measurement: 1 wins over 2, because what was measured already fails.

Budgets that are null in the profile are "not set": they are listed (and written to JUnit as skipped test
cases) but never count as passed, so a profile that forgot a budget cannot look stricter than it is.
Which figure meets which budget is decided in pipeline/report/budgets.py, the same code that chose the report's
recommendation, so the recommended artifact passes here whenever any artifact would. Latency compares p95 plus
the noise margin with the budget, so a noisy runner cannot pass a budget it only ties; the margin is printed
with the figure. Without a recommendation the gate checks the nearest miss and fails.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

from pipeline.config import Profile, load_profile
from pipeline.errors import ConfigError
from pipeline.report import budgets
from pipeline.report import schema as reportschema
from pipeline.report.budgets import BUDGETS
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
        width = max([18, *(len(c.budget) for c in self.cases)])  # 'min_accuracy[parity]': one check per head
        lines = [head] + [f"  {c.status.upper():<15} {c.budget:<{width}} {c.message}" for c in self.cases]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def junit(self) -> str:
        """JUnit XML: one test case per budget and head (not-set budgets skipped), plus one for the recommendation."""
        counts = {"failures": 0, "errors": 0, "skipped": 0}
        cases = self.cases or [Case(b, "error", message=self.notes[0] if self.notes else self.verdict)
                               for b in BUDGETS]  # unusable input: every budget errs, none vanishes from CI
        suite = ET.Element("testsuite", name=f"gate.{self.profile}", tests=str(len(cases) + 1))
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
            return Case("recommended_artifact", "failed", message="the report has no candidate artifact")
        if self.recommended:
            return Case("recommended_artifact", "passed", message=f"{self.artifact} is the report's recommendation")
        return Case("recommended_artifact", "failed", message=f"the report recommends no artifact; "
                                                              f"checked the nearest miss {self.artifact}")


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
    # the same standings the report's recommendation came from: what the report recommends is what ship bundles
    standings = budgets.evaluate(report, prof.budgets.model_dump(), allow_estimates)
    rec = report.get("recommended")
    if rec and rec["artifact"] in standings:
        picked, v.recommended = standings[rec["artifact"]], True
    else:
        picked = budgets.choose(standings) or budgets.nearest_miss(standings)
    if picked is None:
        v.code, v.notes = MISSED, ["the report has no candidate artifact to check (only teachers and the "
                                   "no-teacher control)"]
        return v
    v.artifact = picked.artifact
    v.cases = [_case(c) for c in picked.checks.values()]  # every budget in BUDGETS order, a mapping per head
    if allow_estimates and picked.estimated:
        v.notes.append("--allow-estimates: some budgets were judged on estimates or host figures, not on "
                       "measurements on the target (marked 'estimated'); this is not a measured pass.")
    failed = any(c.status == "failed" for c in v.cases) or not v.recommended
    v.code = MISSED if failed else NO_MEASUREMENT if any(c.status == "no_measurement" for c in v.cases) else MET
    if not v.recommended:
        near = (report.get("nearest_miss") or {}).get("message")
        v.notes.append(f"the report recommends no artifact{f' (nearest miss: {near})' if near else ''}; the gate "
                       f"checked {picked.artifact} and fails: `pipeline ship` bundles only a recommended artifact.")
    return v


STATUS = {"met": "passed", "missed": "failed", "unmeasured": "no_measurement", "not_set": "not_set"}


def _case(c: budgets.Check) -> Case:
    return Case(c.budget, STATUS[c.status], c.limit, c.value, c.message, c.source, c.estimated)


def _same_target(report: dict, prof: Profile) -> None:
    """Budgets may differ from the run's profile (a stricter copy); the target must not: on_target means it."""
    ran = report["profile"]
    if ran.get("target") != prof.target.model_dump(mode="json"):
        raise ConfigError(f"the run was measured for profile '{ran['name']}' (target {ran['target'].get('name')!r}); "
                          f"profile '{prof.name}' describes another target ({prof.target.name!r}). Gate with "
                          f"--profile {ran['name']}, or run the pipeline with --profile {prof.name}.")


def write_junit(verdict: Verdict, path: Path) -> None:
    """Write the JUnit XML; ConfigError (unusable input, exit 3) when the path cannot be written."""
    from pipeline.artifacts import atomic_write_text
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, verdict.junit())
    except OSError as e:
        raise ConfigError(f"--junit {path}: cannot write it ({e.strerror or type(e).__name__}); give a path in a "
                          f"writable directory.") from None
