"""Profiles and recipes: all shipped ones validate; bad input names the file, the field and the fix."""
from __future__ import annotations

import pytest
import yaml

from pipeline.config import DEFAULT_RECIPE, RECIPES_DIR, available_profiles, load_profile, load_recipe
from pipeline.errors import ConfigError


def test_shipped_profiles_load():
    assert {"edge-cpu", "server-gpu", "jetson"} <= set(available_profiles())
    for name in available_profiles():
        p = load_profile(name)
        assert p.name == name and 1 in p.target.batch_sizes and p.hardware.power_w > 0


@pytest.mark.parametrize("recipe", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_under_every_profile(recipe):
    for name in available_profiles():
        r = load_recipe(recipe, load_profile(name))
        assert r.teacher.epochs >= 0


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"Unknown profile 'jetsn'. Available: edge-cpu, jetson, server-gpu"):
        load_profile("jetsn")


def _write(tmp_path, name, data) -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_unknown_key_in_a_profile_names_file_and_field(tmp_path):
    data = yaml.safe_load(open("profiles/edge-cpu.yaml"))
    data["budgets"]["p95_latncy_ms"] = 3
    path = _write(tmp_path, "typo.yaml", data)
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    assert path in str(e.value) and "budgets.p95_latncy_ms: unknown key" in str(e.value)


def test_wrong_type_names_the_field(tmp_path):
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    data["distill"]["temperature"] = "hot"
    with pytest.raises(ConfigError, match=r"distill.temperature: .*'hot'"):
        load_recipe(_write(tmp_path, "r.yaml", data))


def test_missing_checkpoint_is_caught_before_the_run(tmp_path):
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    data["models"]["teacher"]["checkpoint"] = "nowhere/teacher.pt"
    with pytest.raises(ConfigError, match=r"models.teacher.checkpoint: 'nowhere/teacher.pt' does not exist"):
        load_recipe(_write(tmp_path, "r.yaml", data))


def test_profile_overrides_win_and_must_name_a_stage(tmp_path):
    jetson = load_profile("jetson")
    assert load_recipe(DEFAULT_RECIPE, jetson).quantize.preset == "tensorrt"
    jetson.overrides["quantise"] = {"enabled": True}
    with pytest.raises(ConfigError, match="overrides.quantise: not a stage"):
        load_recipe(DEFAULT_RECIPE, jetson)


def test_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_profile(str(p))
