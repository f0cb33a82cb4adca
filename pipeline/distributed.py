"""Run a training stage under torchrun with DistributedDataParallel (gloo on CPU, nccl on GPU).

The runner calls `run_stage_distributed(run_dir, stage, nproc)`. It launches

    python -m torch.distributed.run --standalone --nproc_per_node N -m pipeline.distributed <run_dir> <stage>

Each rank rebuilds the Context from run_dir/recipe.json and profile.json and the stage's inputs from the
outputs that run.json records for the stages before it, joins the process group, and runs the stage.
`train.fit` wraps each model in DDP and splits every global batch across the ranks (rank r takes every
world-th sample of it: a DistributedSampler that keeps the single-process batch composition). Only rank 0
writes artifacts (stages/_common.model_artifact checks ctx.rank) and the result file
run_dir/.<stage>.distributed.json, which the parent reads back: the stage's outputs and its results.

Agreement with one process: the DDP gradient is the single-process gradient except for BatchNorm, whose batch
statistics are per rank on CPU (SyncBatchNorm needs a GPU), and augmentation draws. tests/test_distributed.py
holds 2 gloo ranks to within 3 points of test accuracy of one process on the digits.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.artifacts import Artifact, Artifacts, atomic_write_text
from pipeline.errors import StageError


def result_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / f".{stage}.distributed.json"


def run_stage_distributed(run_dir: Path, stage: str, nproc: int, key: str = "", quiet: bool = False
                          ) -> tuple[Artifacts, dict]:
    """Run `stage` on nproc ranks; return its outputs (from rank 0) and its results for ctx.results."""
    run_dir = Path(run_dir).resolve()
    result = result_path(run_dir, stage)
    result.unlink(missing_ok=True)
    env = {**os.environ, "PIPELINE_QUIET": "1" if quiet else "0", "PIPELINE_STAGE_KEY": key}
    # several machines: PIPELINE_TORCHRUN_ARGS="--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500
    # --rdzv-id ID" replaces --standalone, and every other node runs the command logged below (README)
    launch = shlex.split(os.environ.get("PIPELINE_TORCHRUN_ARGS", "--standalone"))
    worker = ["-m", "pipeline.distributed", str(run_dir), stage]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={nproc}", *worker]
    if "--standalone" not in launch and not quiet:
        print(f"  {stage}: on every other node run: PIPELINE_STAGE_KEY={key} torchrun "
              f"{shlex.join([*launch, f'--nproc-per-node={nproc}', *worker])}", flush=True)
    proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
    if not result.exists():
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise StageError(f"{stage}: torchrun with {nproc} processes exited with {proc.returncode} before rank 0 "
                         f"wrote its result. Rerun with --nproc 1 to see the error directly. Last lines:\n{tail}")
    rec = json.loads(result.read_text())
    if rec.get("error"):
        from pipeline.errors import ConfigError
        raise (ConfigError if rec.get("type") == "ConfigError" else StageError)(rec["error"])
    return {k: Artifact.model_validate(v) for k, v in rec["outputs"].items()}, rec["results"]


def _inputs(run_dir: Path, stage: str) -> Artifacts:
    """The outputs run.json records for the stages before `stage`, in stage order (what the runner would pass)."""
    from stages import STAGES
    record = json.loads((run_dir / "run.json").read_text())
    inputs: Artifacts = {}
    for name in STAGES[:STAGES.index(stage)]:
        rec = record["stages"].get(name, {})
        if rec.get("status") == "ok":
            inputs.update({k: Artifact.model_validate(v) for k, v in rec.get("outputs", {}).items()})
    return inputs


def main(run_dir: Path, stage: str) -> int:
    """One rank: rebuild the context, join the group, run the stage; rank 0 writes the result file."""
    import torch
    import torch.distributed as dist
    from rich.console import Console

    import stages
    from pipeline.config import Profile, recipe_model
    from pipeline.context import Context
    from pipeline.errors import ConfigError

    run_dir = run_dir.resolve()
    recipe = recipe_model().model_validate_json((run_dir / "recipe.json").read_text())
    profile = Profile.model_validate_json((run_dir / "profile.json").read_text())
    rank = int(os.environ["RANK"])
    quiet = rank != 0 or os.environ.get("PIPELINE_QUIET") == "1"
    ctx = Context(run_dir=run_dir, recipe=recipe, profile=profile, console=Console(quiet=quiet), stage=stage,
                  stage_key=os.environ.get("PIPELINE_STAGE_KEY", ""))  # the runner's key: checkpoints match it
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    try:
        outputs = stages.load(stage).run(_inputs(run_dir, stage), getattr(recipe, stage), ctx)
        rec = {"outputs": {k: a.model_dump(mode="json") for k, a in outputs.items()},
               "results": ctx.results.get(stage, {}), "world_size": dist.get_world_size(), "backend": backend}
        code = 0
    except (StageError, ConfigError) as e:  # the parent raises the same error; other failures crash torchrun
        rec, code = {"error": str(e), "type": type(e).__name__}, 1
    if rank == 0:
        atomic_write_text(result_path(run_dir, stage), json.dumps(rec, indent=1, default=str))
    if code == 0:
        dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
