"""Profiles (where the model runs, and its budgets) and recipes (what to compress), as strict pydantic models.

Both are YAML files a person reads on one screen. Unknown keys are errors at load time, so a typo
fails in a second with the file and field named, not an hour into a run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

import stages
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = ROOT / "profiles"
RECIPES_DIR = ROOT / "recipes"
DEFAULT_RECIPE = RECIPES_DIR / "digits.yaml"


class Strict(BaseModel, extra="forbid"):
    pass


# ---------------------------------------------------------------- profile
class Target(Strict):
    kind: Literal["cpu", "gpu", "jetson"] = Field(description="what the device is; labels every number")
    name: str = Field(description="the device in words, e.g. 'Jetson Orin Nano 8GB'")
    providers: list[Literal["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]] = Field(
        min_length=1, description="onnxruntime execution providers to benchmark, each on its own row")
    tensorrt: bool = Field(False, description="also build and time native TensorRT engines with trtexec")
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(["fp32"], description="artifacts quantize builds")
    threads: list[int] = Field([1], description="intra-op thread counts to try; the fastest is reported")
    batch_sizes: list[int] = Field([1], description="throughput is measured at each; latency budgets use 1")

    @model_validator(mode="after")
    def _batch_one_first(self) -> "Target":
        if 1 not in self.batch_sizes:
            raise ValueError("batch_sizes must include 1: latency budgets are defined at batch 1")
        return self


class Hardware(Strict):
    """Datasheet figures of the target, used only for estimates that are labelled as such."""
    peak_tflops: dict[str, float] = Field(description="dense peak per precision, e.g. {fp32: 1.3, fp16: 2.6}")
    memory_bandwidth_gbs: float = Field(gt=0, description="DRAM bandwidth, GB/s")
    power_w: float = Field(gt=0, description="typical power under load, W; energy estimate = power x time")
    source: str = Field("", description="where these figures come from")


class Budgets(Strict):
    p95_latency_ms: float | None = Field(None, gt=0, description="at batch 1 on the target")
    min_accuracy: float | None = Field(None, ge=0, le=1)
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="vs the teacher, absolute")
    max_size_mb: float | None = Field(None, gt=0)
    max_energy_mj: float | None = Field(None, gt=0, description="per inference at batch 1")


class DeviceSpec(Strict):
    host: str
    user: str | None = None
    port: int = 22
    python: str = "python3"
    workdir: str = "~/.cache/compress-pipeline"
    identity_file: str | None = None
    known_hosts: str | None = None


class Profile(Strict):
    name: str
    description: str = ""
    target: Target
    hardware: Hardware
    budgets: Budgets = Budgets()
    device: DeviceSpec | None = Field(None, description="benchmark on this device over SSH")
    overrides: dict[str, dict[str, Any]] = Field({}, description="stage settings that win over the recipe's")


# ---------------------------------------------------------------- recipe
class Augment(Strict):
    rotation_deg: float = 0.0
    hflip: float = Field(0.0, ge=0, le=1, description="probability")
    vflip: float = Field(0.0, ge=0, le=1, description="probability")
    scale: tuple[float, float] | None = Field(None, description="random affine scale range, e.g. [0.9, 1.1]")
    random_crop_padding: int = Field(0, ge=0, description="pad then crop back to size")
    color_jitter: float = Field(0.0, ge=0, description="brightness/contrast jitter strength")
    gaussian_noise: float = Field(0.0, ge=0, description="std of added noise, in normalised units")


class DataConfig(Strict):
    kind: Literal["digits", "imagefolder"] = "digits"
    root: Path | None = Field(None, description="imagefolder: a folder with train/ and test/, or class folders")
    image_size: int = Field(8, gt=0, description="square side in pixels after resize")
    channels: Literal[1, 3] = 1
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="used when the data has no test/ folder")
    mean: list[float] | None = Field(None, description="per channel; computed on train when omitted")
    std: list[float] | None = None
    augment: Augment = Augment()


class ModelSpec(Strict):
    arch: str = Field(description="'cnn', 'mlp', 'resnet', a torchvision name (resnet18, ...), or 'pkg.module:factory'")
    kwargs: dict[str, Any] = {}
    checkpoint: Path | None = Field(None, description="state_dict (.pt); loaded with weights_only=True")
    onnx: Path | None = Field(None, description="teacher only: an ONNX file run through onnxruntime")


class Models(Strict):
    teacher: ModelSpec
    student: ModelSpec
    extra_teachers: list[ModelSpec] = Field([], description="ensemble KD: more teachers, soft targets averaged; "
                                          "the teacher stage saves them as teacher-<i>.pt (KD inputs only: "
                                          "not exported or benchmarked)")


def _stage_configs() -> dict[str, Any]:
    return {name: (stages.load(name).Config, Field(default_factory=stages.load(name).Config)) for name in stages.STAGES}


class RecipeBase(Strict):
    name: str
    seed: int = 0
    data: DataConfig = DataConfig()
    models: Models
    max_accuracy_drop_per_stage: float = Field(0.01, ge=0, le=1, description="a stage losing more is flagged")


_recipe_cls: type[RecipeBase] | None = None


def recipe_model() -> type[RecipeBase]:
    """The Recipe model: common sections plus one section per stage, typed by that stage's Config."""
    global _recipe_cls
    if _recipe_cls is None:
        _recipe_cls = create_model("Recipe", __base__=RecipeBase, **_stage_configs())
    return _recipe_cls


# ---------------------------------------------------------------- loading
def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file. Check the path, or list what exists with `pipeline profiles`.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, found {type(data).__name__}.")
    return data


def _explain(path: Path, err: ValidationError) -> ConfigError:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key. Remove it or fix its spelling (see README: profiles and recipes).")
        else:
            lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r}).")
    return ConfigError(f"{path}: {len(lines)} invalid setting(s):\n" + "\n".join(lines))


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def resolve_profile_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"Unknown profile '{name_or_path}'. Available: {', '.join(available_profiles())} "
                          f"(or give a path to a .yaml file).")
    return path


def load_profile(name_or_path: str) -> Profile:
    path = resolve_profile_path(name_or_path)
    try:
        return Profile.model_validate(_read_yaml(path))
    except ValidationError as e:
        raise _explain(path, e) from None


def load_recipe(path: Path, profile: Profile | None = None) -> RecipeBase:
    """Load a recipe; the profile's `overrides` win over the recipe's stage sections."""
    path = Path(path)
    data = _read_yaml(path)
    if profile is not None:
        for stage, over in profile.overrides.items():
            if stage not in stages.STAGES:
                raise ConfigError(f"profile '{profile.name}': overrides.{stage}: not a stage. "
                                  f"Stages: {', '.join(stages.STAGES)}.")
            data[stage] = {**(data.get(stage) or {}), **over}
    try:
        recipe = recipe_model().model_validate(data)
    except ValidationError as e:
        raise _explain(path, e) from None
    _check_paths(path, recipe)
    if recipe.models.extra_teachers and recipe.distill.method != "ensemble":  # else trained for nothing
        raise ConfigError(f"{path}: models.extra_teachers: only distill.method 'ensemble' uses extra teachers, "
                          f"and the method is '{recipe.distill.method}'. Set distill.method: ensemble, or remove "
                          f"models.extra_teachers.")
    return recipe


def _check_paths(path: Path, recipe: RecipeBase) -> None:
    """Paths in a recipe are relative to the recipe file; a missing one fails now, not mid-run."""
    base = path.resolve().parent
    specs = {"models.teacher": recipe.models.teacher, "models.student": recipe.models.student}
    specs.update({f"models.extra_teachers.{i}": s for i, s in enumerate(recipe.models.extra_teachers)})
    for field, spec in specs.items():
        for attr in ("checkpoint", "onnx"):
            value = getattr(spec, attr)
            if value is None:
                continue
            full = value if value.is_absolute() else base / value
            if not full.exists():
                raise ConfigError(f"{path}: {field}.{attr}: '{value}' does not exist (resolved to {full}). "
                                  f"Fix the path, or remove the key to train the model from scratch.")
            setattr(spec, attr, full)
    if recipe.data.root is not None:
        root = recipe.data.root if recipe.data.root.is_absolute() else base / recipe.data.root
        if not root.is_dir():
            raise ConfigError(f"{path}: data.root: '{recipe.data.root}' is not a directory (resolved to {root}).")
        recipe.data.root = root
    elif recipe.data.kind == "imagefolder":
        raise ConfigError(f"{path}: data.root: required when data.kind is 'imagefolder'.")
