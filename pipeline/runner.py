"""The runner: owns stage order, the run directory, caching and resume. Stages know none of this.

run.json records, per stage: status, the effective config, a cache key (config + content hashes of the
input artifacts), the outputs with their hashes, metrics, duration and the error if it failed. A rerun with
`--resume` skips a stage whose key is unchanged and whose outputs are still on disk with the same hashes.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

import stages
from pipeline.artifacts import Artifact, Artifacts, atomic_write_text, fingerprint, make_output_dir
from pipeline.config import Profile, RecipeBase
from pipeline.context import Context
from pipeline.errors import ConfigError, StageError

RUN_SCHEMA = 1
DISTRIBUTED_STAGES = ("teacher", "distill")  # the training stages that run under torchrun with --nproc > 1


def new_run_dir(runs_dir: Path, profile: Profile, recipe: RecipeBase, prefix: str = "") -> Path:
    """A fresh run (or, with prefix 'search-', search) directory; mkdir itself decides between parallel starts
    in the same second."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        run_dir = runs_dir / f"{prefix}{stamp}-{recipe.name}-{profile.name}{f'-{n}' if n > 1 else ''}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise ConfigError(f"{runs_dir}: 10,000 {prefix}runs started in one second; clean up the runs directory.")


def latest_run(runs_dir: Path) -> Path:
    link = runs_dir / "latest"
    if not link.exists():
        raise ConfigError(f"No run to resume in {runs_dir}/: start one with `pipeline run` (or `make pipeline`).")
    return link.resolve()


def point_latest(runs_dir: Path, run_dir: Path, name: str = "latest") -> None:
    """runs_dir/<name> -> run_dir, replaced atomically (a reader never sees it missing)."""
    tmp = runs_dir / f".{name}-{time.time_ns()}"
    tmp.symlink_to(run_dir.name)
    tmp.replace(runs_dir / name)


def _key(name: str, cfg: Any, recipe: RecipeBase, profile: Profile, inputs: Artifacts, nproc: int = 1) -> str:
    payload = {
        "stage": name,
        "config": cfg.model_dump(mode="json"),
        "recipe": recipe.model_dump(mode="json", include={"seed", "data", "models", "max_accuracy_drop_per_stage"}),
        "inputs": {k: a.sha256 for k, a in sorted(inputs.items())},
    }
    if name in DISTRIBUTED_STAGES and nproc > 1:  # DDP results differ slightly from one process's
        payload["nproc"] = nproc
    payload["recipe"]["data"].pop("workers", None)  # how many processes decode changes no result
    for dotted in getattr(stages.load(name), "NOT_READ", ()):
        *parents, leaf = dotted.split(".")
        node = payload["recipe"]
        for k in parents:
            node = node.get(k) or {}
        node.pop(leaf, None)
    if recipe.tasks:  # only then: a single-task run keeps the keys it had before tasks existed
        payload["recipe"]["tasks"] = [t.model_dump(mode="json") for t in recipe.tasks]
    if getattr(stages.load(name), "USES_PROFILE", False):
        payload["profile"] = profile.model_dump(mode="json", exclude={"description", "device"})
        # where rows are measured: a device named after a run must not reuse the host-only benchmark
        payload["device"] = os.environ.get("PIPELINE_DEVICE") or (profile.device.host if profile.device else None)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _still_valid(run_dir: Path, outputs: dict[str, dict]) -> bool:
    for rec in outputs.values():
        path = run_dir / rec["name"]
        if not path.exists() or fingerprint(path)[0] != rec["sha256"]:
            return False
    return True


class Runner:
    def __init__(self, run_dir: Path, recipe: RecipeBase, profile: Profile, *, recipe_path: Path,
                 console: Console | None = None, debug: bool = False, nproc: int = 1):
        self.run_dir = run_dir
        self.ctx = Context(run_dir=run_dir, recipe=recipe, profile=profile, console=console or Console(),
                           debug=debug)
        self.nproc = nproc
        self.record_path = run_dir / "run.json"
        prior = json.loads(self.record_path.read_text()) if self.record_path.exists() else {}
        self.record: dict[str, Any] = {
            "schema": RUN_SCHEMA,
            "run_id": run_dir.name,
            "created": prior.get("created", datetime.now(timezone.utc).isoformat(timespec="seconds")),
            "recipe": {"name": recipe.name, "path": str(recipe_path)},
            "profile": profile.name,
            "stages": prior.get("stages", {}),
        }

    def _save(self) -> None:
        atomic_write_text(self.record_path, json.dumps(self.record, indent=2, default=str))

    def _fail(self, name: str) -> None:
        """Mark the run failed and move report.json aside: gate and ship must never pass an older report."""
        self.record.update(status="failed", failed_stage=name)
        report = self.run_dir / "report.json"
        if report.exists():
            os.replace(report, self.run_dir / "report.stale.json")
        try:
            self._save()
        except OSError:  # a full disk: the failure is in the message; run.json keeps its last good state
            pass

    def run(self, resume: bool = False, until: str | None = None) -> Artifacts:
        with locked(self.run_dir):
            artifacts = self._run(resume, until)
        return artifacts

    def _run(self, resume: bool, until: str | None) -> Artifacts:
        ctx, artifacts = self.ctx, {}
        atomic_write_text(self.run_dir / "recipe.json", ctx.recipe.model_dump_json(indent=2))
        atomic_write_text(self.run_dir / "profile.json", ctx.profile.model_dump_json(indent=2))
        self.record.update(status="running", failed_stage=None)
        for name in stages.STAGES:
            mod = stages.load(name)
            cfg = getattr(ctx.recipe, name)
            if not getattr(cfg, "enabled", True):
                self.record["stages"][name] = {"status": "disabled", "config": cfg.model_dump(mode="json")}
                self._save()
                ctx.log(f"[dim]· {name}: disabled in the recipe[/]")
                continue
            key = _key(name, cfg, ctx.recipe, ctx.profile, artifacts, self.nproc)
            prev = self.record["stages"].get(name, {})
            if resume and prev.get("status") == "ok" and prev.get("key") == key \
                    and _still_valid(self.run_dir, prev.get("outputs", {})):
                outputs = {k: Artifact.model_validate(v) for k, v in prev["outputs"].items()}
                artifacts.update(outputs)
                ctx.results[name] = prev.get("results", {})
                prev["reused"] = True
                self._save()
                ctx.log(f"[green]✓ {name}[/]: unchanged, reused ({len(outputs)} artifacts)")
            else:
                artifacts.update(self._run_stage(name, mod, cfg, key, artifacts))
            if name == until:  # also when reused: a resumed run `until` a stage stops there
                break
        if until is None:
            self.record["status"] = "ok"
            self._save()
        return artifacts

    def _run_stage(self, name: str, mod, cfg: Any, key: str, inputs: Artifacts) -> Artifacts:
        ctx = self.ctx
        rec: dict[str, Any] = {"status": "running", "config": cfg.model_dump(mode="json"), "key": key,
                               "inputs": {k: a.sha256 for k, a in inputs.items()},
                               "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.record["stages"][name] = rec
        self._save()
        ctx.log(f"[bold cyan]▶ {name}[/]")
        ctx.stage, ctx.stage_key = name, key
        t0 = time.perf_counter()
        try:
            if self.nproc > 1 and name in DISTRIBUTED_STAGES:
                from pipeline.distributed import run_stage_distributed
                outputs, ctx.results[name] = run_stage_distributed(self.run_dir, name, self.nproc, key,
                                                                   quiet=ctx.console.quiet)
            else:
                outputs = mod.run(dict(inputs), cfg, ctx)
            for art in outputs.values():
                art.sha256, art.size_bytes = fingerprint(self.run_dir / art.name)
        except BaseException as e:  # recorded, then re-raised: the CLI decides how loud to be
            disk_full = isinstance(e, OSError) and e.errno == errno.ENOSPC
            err = _disk_full(e, self.run_dir) if disk_full else e
            rec.update(status="failed", duration_s=round(time.perf_counter() - t0, 2),
                       error=f"{type(err).__name__}: {err}")
            if not isinstance(err, (StageError, ConfigError, KeyboardInterrupt)):
                rec["traceback"] = traceback.format_exc()
            self._fail(name)
            if disk_full:
                raise err from None
            raise
        rec.update(status="ok", duration_s=round(time.perf_counter() - t0, 2),
                   outputs={k: a.model_dump(mode="json") for k, a in outputs.items()},
                   results=ctx.results.get(name, {}))
        skipped = ctx._splits.skipped() if ctx._splits is not None else {}
        if skipped:  # data.skip_bad: the images this stage could not read, counted and named
            rec["skipped_images"] = {k: {"count": len(v), "files": v[:20]} for k, v in skipped.items()}
            ctx.log(f"  [yellow]skipped {sum(map(len, skipped.values()))} unreadable image(s)[/] (data.skip_bad; "
                    f"listed in run.json)")
        self._save()
        shutil.rmtree(ctx.checkpoints(), ignore_errors=True)  # the stage's outputs now stand for them
        with contextlib.suppress(OSError):
            ctx.checkpoints().parent.rmdir()  # .checkpoints/, once no stage has any
        ctx.log(f"[green]✓ {name}[/] in {rec['duration_s']:.1f} s")
        return outputs


@contextlib.contextmanager
def locked(run_dir: Path, holder_cmd: str = "pipeline run",
           fix: str = "Wait for it to finish, or start a new run without --resume."):
    """An exclusive lock on a run (or search) directory while it works: a second process is refused."""
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise ConfigError(f"{run_dir}: in use by {holder_cmd} (pid {holder}). {fix}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _disk_full(e: OSError, run_dir: Path) -> StageError:
    free = shutil.disk_usage(run_dir).free
    return StageError(f"{e.filename or run_dir}: no space left on the device ({free / 2**20:.0f} MiB free in "
                      f"{run_dir.parent}). Free some space, then rerun with --resume: finished stages are kept.")


def run_pipeline(recipe: RecipeBase, profile: Profile, *, recipe_path: Path, runs_dir: Path = Path("runs"),
                 resume: bool = False, console: Console | None = None, debug: bool = False,
                 nproc: int = 1) -> Path:
    make_output_dir(runs_dir, "--runs-dir")
    run_dir = latest_run(runs_dir) if resume else new_run_dir(runs_dir, profile, recipe)
    point_latest(runs_dir, run_dir)
    Runner(run_dir, recipe, profile, recipe_path=recipe_path, console=console, debug=debug,
           nproc=nproc).run(resume=resume)
    return run_dir
