"""report.json against its JSON Schema (pipeline/report/report.schema.json, draft 2020-12).

The schema is the contract between the report stage and what reads a report later: rerender, gate, ship.
A report of another schema_version is refused first, with its own message, because "2 is not 1" deep in a
list of schema errors does not tell anyone what to do.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.report.build import SCHEMA_VERSION

SCHEMA_PATH = Path(__file__).resolve().parent / "report.schema.json"
MAX_LISTED = 8  # errors listed in a message; the rest are counted
STALE = "report.stale.json"  # where the runner moves report.json when a stage of a resumed run fails


@lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator
    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def errors(report: dict) -> list[str]:
    """Every schema violation as 'path: message', in document order; empty when the report is valid."""
    found = sorted(_validator().iter_errors(report), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}" for e in found]


def validate(report: dict) -> None:
    """Raise ConfigError (saying what differs) unless `report` is a report.json this version reads."""
    if not isinstance(report, dict):
        raise ConfigError(f"report.json: expected an object at the top level, found {type(report).__name__}.")
    version = report.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ConfigError(f"report.json has schema_version {version!r}; this pipeline reads version "
                          f"{SCHEMA_VERSION}. Rerun the pipeline with this version (`pipeline run`), or use "
                          f"the version that wrote the report.")
    found = errors(report)
    if found:
        more = f"\n  ... and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""
        raise ConfigError("report.json does not follow pipeline/report/report.schema.json (written by another "
                          "version, or edited; run the pipeline again with this version: `pipeline run`):\n  "
                          + "\n  ".join(found[:MAX_LISTED]) + more)


def load(run_dir: Path) -> dict:
    """report.json of a run directory, validated; ConfigError for a missing run or an unreadable report."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory. Runs live in runs/<id>/ (runs/latest is the "
                          f"newest); start one with `pipeline run`.")
    _refuse_failed(run_dir)
    path = run_dir / "report.json"
    if not path.is_file():
        stale = " (report.stale.json is an earlier attempt's, not this run's)" if (run_dir / STALE).is_file() else ""
        raise ConfigError(f"{path}: missing{stale}. The run did not reach its report stage; finish it with "
                          f"`pipeline run --resume` (or `make pipeline RESUME=1`).")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}). Rerun the report stage: `pipeline run --resume`.") from None
    validate(report)
    return report


def _refuse_failed(run_dir: Path) -> None:
    """A run whose last attempt failed has no current report, whatever report.json still says."""
    path = run_dir / "run.json"
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); the run's record is damaged. Run the pipeline again: "
                          f"`pipeline run`.") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: expected an object at the top level; run the pipeline again: `pipeline run`.")
    stages = record.get("stages") if isinstance(record.get("stages"), dict) else {}
    failed = [n for n, s in stages.items() if isinstance(s, dict) and s.get("status") == "failed"]
    if record.get("status") == "failed" or failed:
        stage = record.get("failed_stage") or (failed[0] if failed else "unknown")
        raise ConfigError(f"{run_dir}: the run failed at stage '{stage}' (run.json), so its report is not this "
                          f"run's; fix the cause and finish it with `pipeline run --resume` (or `make pipeline "
                          f"RESUME=1`).")
