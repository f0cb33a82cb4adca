"""What a stage gets besides its inputs and its config: where to write, the recipe, the profile, the data."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from pipeline.config import Profile, RecipeBase

if TYPE_CHECKING:
    from pipeline.train.data import Splits
    from pipeline.train.loop import Resume


@dataclass
class Context:
    run_dir: Path
    recipe: RecipeBase
    profile: Profile
    console: Console = field(default_factory=Console)
    debug: bool = False
    results: dict[str, Any] = field(default_factory=dict)  # per-stage metrics, written to run.json
    stage: str = ""      # the stage running now, and its cache key (set by the runner)
    stage_key: str = ""
    _splits: "Splits | None" = None

    @property
    def rank(self) -> int:
        """Rank under torchrun; only rank 0 writes artifacts."""
        return int(os.environ.get("RANK", "0"))

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    def path(self, name: str) -> Path:
        return self.run_dir / name

    def data(self) -> "Splits":
        """Preprocessed splits, loaded once per process and shared by every stage."""
        if self._splits is None:
            from pipeline.train.data import load_splits
            self._splits = load_splits(self.recipe.data, self.recipe.seed, self.run_dir, self.recipe.tasks)
        return self._splits

    def checkpoints(self) -> Path:
        """Where this stage's training checkpoints go (removed by the runner once the stage succeeds)."""
        return self.run_dir / ".checkpoints" / self.stage

    def resume(self, desc: str) -> "Resume":
        """The checkpoint of one fit() in this stage: keyed by the stage's cache key and the fit's description."""
        import hashlib

        from pipeline.train.loop import Resume
        slug = hashlib.sha256(desc.encode()).hexdigest()[:12]
        return Resume(self.checkpoints() / f"{slug}.pt", f"{self.stage_key}:{desc}")

    def log(self, msg: str) -> None:
        if self.rank == 0:
            self.console.print(msg)
