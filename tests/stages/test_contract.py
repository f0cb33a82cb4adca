"""Every stage in the order honours the contract: typed strict Config, run(inputs, cfg, ctx), a docstring."""
from __future__ import annotations

import inspect

import pytest
from pydantic import BaseModel, ValidationError

from stages import STAGES
from stages import load as stage_module


def test_the_readme_lists_the_stages_in_their_order():
    """The README's stage table is documentation of STAGES: same names, same order."""
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    listed = re.findall(r"^\| \d+ \| (\w+) \|", readme, flags=re.M)
    assert tuple(listed) == STAGES


@pytest.mark.parametrize("name", STAGES)
def test_stage_contract(name):
    mod = stage_module(name)
    assert issubclass(mod.Config, BaseModel)
    cfg = mod.Config()  # defaults alone are a valid config
    with pytest.raises(ValidationError):
        mod.Config(not_a_setting=1)  # typos fail at load time
    params = list(inspect.signature(mod.run).parameters)
    assert params == ["inputs", "cfg", "ctx"]
    assert (mod.run.__doc__ or "").strip(), f"stages/{name}.py: run() needs a one-line docstring"
    for field, info in mod.Config.model_fields.items():
        assert info.annotation is not None, f"{name}.{field} has no type"
    assert cfg.model_dump() == mod.Config.model_validate(cfg.model_dump()).model_dump()


@pytest.mark.parametrize("name", STAGES)
def test_stage_outputs_are_recorded(real_run, name):
    """In a real run every stage is recorded; enabled ones as ok with hashed outputs."""
    import json
    rec = json.loads((real_run / "run.json").read_text())["stages"][name]
    assert rec["status"] in ("ok", "disabled")
    if rec["status"] == "ok":
        assert rec["duration_s"] >= 0
        for out in rec["outputs"].values():
            assert len(out["sha256"]) == 64 and (real_run / out["name"]).exists()
