"""Shared fixtures: a real sshd (tests/sshd_fixture.py) and one real, small pipeline run per session."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.sshd_fixture"]

FAST = {"teacher": {"epochs": 12}, "distill": {"epochs": 8},
        "benchmark": {"warmup": 3, "min_runs": 20, "min_duration_s": 0.05, "throughput_duration_s": 0.05,
                      "energy_window_s": 0.1}}


def fast_recipe(profile, **over):
    """The default digits recipe with few epochs and a short benchmark: behaviour, not numbers."""
    import yaml

    from pipeline.config import DEFAULT_RECIPE, recipe_model
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    for stage, values in {**FAST, **over}.items():
        data[stage] = {**(data.get(stage) or {}), **values}
    for stage, values in profile.overrides.items():
        data[stage] = {**(data.get(stage) or {}), **values}
    return recipe_model().model_validate(data)


@pytest.fixture(scope="session")
def real_run(tmp_path_factory) -> Path:
    """A completed default pipeline run (edge-cpu, few epochs), shared by the report/gate/ship tests."""
    from rich.console import Console

    from pipeline.config import DEFAULT_RECIPE, load_profile
    from pipeline.runner import run_pipeline
    profile = load_profile("edge-cpu")
    runs = tmp_path_factory.mktemp("runs")
    return run_pipeline(fast_recipe(profile), profile, recipe_path=DEFAULT_RECIPE, runs_dir=runs,
                        console=Console(quiet=True))
