"""Profiles and recipes: all shipped ones validate; bad input names the file, the field and the fix."""
from __future__ import annotations

import pytest
import yaml

from pipeline.config import (DEFAULT_RECIPE, RECIPES_DIR, available_profiles, load_profile, load_recipe,
                             parse_recipe)
from pipeline.errors import ConfigError


def test_shipped_profiles_load():
    assert {"edge-cpu", "server-gpu", "jetson"} <= set(available_profiles())
    for name in available_profiles():
        p = load_profile(name)
        assert p.name == name and 1 in p.target.batch_sizes and p.hardware.power_w > 0


@pytest.mark.parametrize("recipe", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_under_every_profile(recipe):
    # an imagefolder recipe is a template naming your data and weights: its settings are checked, not its files
    template = (yaml.safe_load(recipe.read_text()).get("data") or {}).get("kind") == "imagefolder"
    for name in available_profiles():
        r = (parse_recipe if template else load_recipe)(recipe, load_profile(name))
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


@pytest.mark.parametrize("section,key,value", [("teacher", "lr", float("inf")), ("distill", "temperature", float("nan")),
                                               ("export", "atol", float("nan")), ("benchmark", "min_duration_s",
                                                                                  float("inf"))])
def test_a_non_finite_number_in_a_recipe_is_refused_naming_the_field(tmp_path, section, key, value):
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    data.setdefault(section, {})[key] = value  # YAML's .inf / .nan
    with pytest.raises(ConfigError, match=rf"{section}.{key}: Input should be a finite number"):
        load_recipe(_write(tmp_path, "r.yaml", data))


def test_an_infinite_budget_in_a_profile_is_refused_naming_the_field(tmp_path):
    data = yaml.safe_load(open("profiles/edge-cpu.yaml"))
    data["budgets"]["max_size_mb"] = float("inf")  # no budget is null, not .inf
    with pytest.raises(ConfigError, match=r"budgets.max_size_mb: Input should be a finite number"):
        load_profile(_write(tmp_path, "inf.yaml", data))


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


@pytest.mark.parametrize("name, ok", [("digits-64", True), ("cifar10_v2.1", True), ("../evil", False),
                                      ("a/b", False), ("a..b", False), (".hidden", False), ("x y", False),
                                      ("", False), ("n" * 65, False), ("é", False)])
def test_recipe_and_profile_names_must_be_safe_run_directory_names(tmp_path, name, ok):
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    profile = yaml.safe_load(open("profiles/edge-cpu.yaml"))
    recipe["name"] = profile["name"] = name
    for load, data in ((load_recipe, recipe), (load_profile, profile)):
        path = _write(tmp_path, "x.yaml", data)
        if ok:
            assert load(path).name == name
        else:
            with pytest.raises(ConfigError, match=r"  name: Value error, it names the run directory: use 1 to 64 "
                                                  r"letters, digits and \. _ -"):
                load(path)


def test_an_override_error_names_the_profile_file_and_a_recipe_error_the_recipe(tmp_path):
    profile = yaml.safe_load(open("profiles/edge-cpu.yaml"))
    profile["overrides"]["quantize"] = {"preset": "ort-gpu-fast"}
    prof = load_profile(_write(tmp_path, "p.yaml", profile))
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    recipe["distill"]["alpah"] = 0.5
    with pytest.raises(ConfigError) as e:
        load_recipe(_write(tmp_path, "r.yaml", recipe), prof)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{tmp_path / 'p.yaml'}: 1 invalid setting(s):"
    assert lines[1].startswith("  overrides.quantize.preset: Input should be ")
    assert lines[2] == f"{tmp_path / 'r.yaml'}: 1 invalid setting(s):"
    assert lines[3].startswith("  distill.alpah: unknown key")


def test_an_override_of_a_section_that_is_not_a_mapping_is_an_error(tmp_path):
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    recipe["quantize"] = 5
    with pytest.raises(ConfigError, match=r"r\.yaml: quantize: expected a mapping of settings, found int"):
        load_recipe(_write(tmp_path, "r.yaml", recipe), load_profile("edge-cpu"))


def test_model_kwargs_are_checked_at_load_naming_the_field(tmp_path):
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    recipe["models"]["student"]["kwargs"] = {"nonsense": 1}
    path = _write(tmp_path, "r.yaml", recipe)
    with pytest.raises(ConfigError, match=rf"^{path}: models\.student\.kwargs: arch 'mlp' with kwargs"):
        load_recipe(path)


def test_an_image_folder_without_class_folders_fails_at_load(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    recipe["data"] = {"kind": "imagefolder", "root": "flat"}
    with pytest.raises(ConfigError, match=r"data\.root: .*flat has no class sub-folders"):
        load_recipe(_write(tmp_path, "r.yaml", recipe))


def test_a_checkpoint_that_is_a_folder_is_not_a_file(tmp_path):
    (tmp_path / "ckpt").mkdir()
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    recipe["models"]["teacher"]["checkpoint"] = "ckpt"
    with pytest.raises(ConfigError, match=r"models\.teacher\.checkpoint: 'ckpt' is not a regular file"):
        load_recipe(_write(tmp_path, "r.yaml", recipe))
