"""Profiles (where the model runs, and its budgets) and recipes (what to compress), as strict pydantic models.

Both are YAML files a person reads on one screen. Unknown keys are errors at load time, so a typo
fails in a second with the file and field named, not an hour into a run.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, PrivateAttr, ValidationError, create_model, field_validator, model_validator

import stages
from pipeline.errors import ConfigError, first_line
from pipeline.settings import Strict

ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = ROOT / "profiles"
RECIPES_DIR = ROOT / "recipes"
DEFAULT_RECIPE = RECIPES_DIR / "digits.yaml"


def _file_name(value: str) -> str:
    # recipe and profile names become the run directory's name (runs/<stamp>-<recipe>-<profile>)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value) or ".." in value:
        raise ValueError("it names the run directory: use 1 to 64 letters, digits and . _ - (starting with a "
                         "letter or digit, no '..')")
    return value


FileName = Annotated[str, AfterValidator(_file_name)]


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


Share = Annotated[float, Field(ge=0, le=1)]


class Budgets(Strict):
    p95_latency_ms: float | None = Field(None, gt=0, description="at batch 1 on the target")
    # a number judges the first task's head (the only one of a single-task model); a mapping {task: value} judges
    # each head it names (recipe `tasks:`), so one head missing its budget fails the gate
    min_accuracy: Share | dict[str, Share] | None = None
    max_accuracy_drop: Share | dict[str, Share] | None = Field(None, description="vs the teacher, absolute")
    max_size_mb: float | None = Field(None, gt=0)
    max_energy_mj: float | None = Field(None, gt=0, description="per inference at batch 1")


_SSH_NAME = re.compile(r"[A-Za-z0-9._-]+")  # user and DNS names


def _ssh_host(value: str) -> str:
    # a host starting with '-' would reach ssh/scp as an option (-oProxyCommand=...); other characters than these
    # could be read as syntax by ssh or scp. An IPv6 literal has a ':' (and maybe a %zone).
    ip6 = ":" in value and re.fullmatch(r"[0-9A-Fa-f:.]+(%[A-Za-z0-9]+)?", value)
    if value.startswith("-") or not (ip6 or _SSH_NAME.fullmatch(value)):
        raise ValueError(f"Bad SSH host {value!r}: expected a DNS name or an IP address")
    return value


def _ssh_user(value: str) -> str:
    if value.startswith("-") or not _SSH_NAME.fullmatch(value):
        raise ValueError(f"Bad SSH user {value!r}: use letters, digits and . _ - only")
    return value


class DeviceSpec(Strict):
    """A device reached over SSH: a profile's `device:`. Declared once: ship/ssh.Remote is this plus its $HOME."""
    host: Annotated[str, AfterValidator(_ssh_host)] = Field(description="a DNS name or an IP address")
    user: Annotated[str, AfterValidator(_ssh_user)] | None = None
    port: int = Field(22, ge=1, le=65535)
    python: str = Field("python3", description="the device's interpreter: needs numpy and onnxruntime")
    workdir: str = Field("~/.cache/compress-pipeline", description="where benchmark kits are copied")
    identity_file: Path | None = Field(None, description="the private key; default: ssh's own choice")
    known_hosts: Path | None = Field(None, description="the whole trust list for this device; default: ssh's")


class Profile(Strict):
    name: FileName
    description: str = ""
    target: Target
    hardware: Hardware
    budgets: Budgets = Budgets()
    device: DeviceSpec | None = Field(None, description="benchmark on this device over SSH")
    overrides: dict[str, dict[str, Any]] = Field({}, description="stage settings that win over the recipe's")
    _path: Path | None = PrivateAttr(None)  # the file it was read from: errors in its overrides name it

    @property
    def where(self) -> str:
        """The profile's file, or its name when it was not read from one."""
        return str(self._path) if self._path else f"profile '{self.name}'"


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
    image_size: int = Field(8, gt=0, le=4096, description="square side in pixels after resize (a 4096 x 4096 "
                                                           "float batch of 16 is already 3 GB)")
    channels: Literal[1, 3] = 1
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="used when the data has no test/ folder")
    mean: list[float] | None = Field(None, description="per channel; computed on train when omitted")
    std: list[float] | None = None
    augment: Augment = Augment()
    workers: int | None = Field(None, ge=0, description="DataLoader processes that decode images; None = the usable "
                                                       "cores, 0 = decode in the main process")
    cache: bool = Field(False, description="decode once into a uint8 memory-mapped file keyed by the file list and "
                                           "the preprocessing: for small images (32x32, 64x64) read every epoch")
    cache_dir: Path | None = Field(None, description="where data.cache files go; default <runs dir>/.data-cache")
    skip_bad: bool = Field(False, description="skip images that do not decode (counted in run.json) instead of "
                                              "stopping with the file named")


class Task(Strict):
    """One thing a multi-task model predicts: one output head of the student (and of the teacher that teaches it)."""
    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,31}$",
                               description="the head's name: its ONNX output, report column and budget key")]
    labels: str = Field("class", description="'class': the ImageFolder class folder (digits: the digit), required "
                                             "for the first task; digits also has 'parity' (even, odd) and 'ge5' "
                                             "(digit < 5, >= 5); else a CSV file of relative_path,label rows "
                                             "(paths relative to data.root; the file relative to the recipe)")
    weight: float = Field(1.0, gt=0, description="the loss is the sum over tasks of weight x the task's loss")


DIGITS_TASKS = ("class", "parity", "ge5")


class ModelSpec(Strict):
    arch: str = Field(description="'cnn', 'mlp', 'resnet', a torchvision name (resnet18, ...), or 'pkg.module:factory'")
    heads: list[str] | None = Field(None, description="with tasks: the tasks this model predicts, one output head "
                                                      "each over one shared backbone (its last layer gives every "
                                                      "head's logits, split by task); default: every task. The "
                                                      "student predicts every task; an extra teacher that names "
                                                      "heads teaches those tasks")
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


class SearchConfig(Strict):
    """`pipeline search`: the space of students it tries and what it may spend (README: Search)."""
    students: list[ModelSpec] = Field([], description="student specs to try; empty = models.student")
    width_multipliers: list[Annotated[float, Field(gt=0)]] = Field(
        [1.0], min_length=1, description="each student's widths scaled (resnet widths, cnn channels and hidden, mlp "
                                         "hidden), rounded, at least 1")
    prune_ratios: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        [], description="prune.ratio values; 0 = not pruned; empty = the recipe's prune (0 when disabled)")
    precisions: list[Literal["fp32", "int8"]] = Field([], description="deployed precisions; empty = the profile's "
                                                                      "fp32 and int8")
    temperatures: list[Annotated[float, Field(gt=0)]] = Field([], description="KD temperatures; empty = "
                                                                              "distill.temperature")
    epochs: list[Annotated[int, Field(ge=1)]] = Field(
        [2, 6], min_length=1, description="distill epochs of each successive-halving rung, increasing: every trial "
                                          "runs the first, the best `keep` share of a rung the next")
    keep: float = Field(0.5, gt=0, le=1, description="share of a rung's trials (rounded up) that continue")
    max_trials: int = Field(16, ge=1, description="trials at most; a larger space is sampled (seeded)")
    max_minutes: float = Field(60.0, gt=0, description="no run starts once the search's wall time plus its expected "
                                                       "duration (the trial's last run scaled by epochs, else the "
                                                       "rung's mean) would pass this")

    @field_validator("epochs")
    @classmethod
    def _rungs_grow(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("must increase from rung to rung, e.g. [2, 6]")
        return v


class RecipeBase(Strict):
    name: FileName
    seed: int = 0
    data: DataConfig = DataConfig()
    models: Models
    tasks: list[Task] = Field([], description="multi-task: what each output head predicts (README: Multi-task); "
                                              "empty: one task, the class")
    max_accuracy_drop_per_stage: float = Field(0.01, ge=0, le=1, description="a stage losing more is flagged")
    search: SearchConfig = Field(default_factory=SearchConfig, description="pipeline search only")


_recipe_cls: type[RecipeBase] | None = None


def recipe_model() -> type[RecipeBase]:
    """The Recipe model: common sections plus one section per stage, typed by that stage's Config."""
    global _recipe_cls
    if _recipe_cls is None:
        _recipe_cls = create_model("Recipe", __base__=RecipeBase, **_stage_configs())
    return _recipe_cls


# ---------------------------------------------------------------- loading
def _read_yaml(path: Path) -> dict:
    if not _is_file(path):
        raise ConfigError(f"{path}: no such file. Check the path, or list what exists with `pipeline profiles`.")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, found {type(data).__name__}.")
    return data


def _explain(path: Path | str, errors: list[dict], prefix: str = "") -> ConfigError:
    lines = []
    for e in errors:
        field = prefix + ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key. Remove it or fix its spelling (see README: profiles and recipes).")
        else:
            got = repr(e.get("input"))
            lines.append(f"  {field}: {e['msg']} (got {got if len(got) <= 80 else got[:77] + '...'}).")
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
        profile = Profile.model_validate(_read_yaml(path))
    except ValidationError as e:
        raise _explain(path, e.errors()) from None
    profile._path = path
    return profile


def load_recipe(path: Path, profile: Profile | None = None, sets: list[str] = ()) -> RecipeBase:
    """Load a recipe (the profile's `overrides` win over its stage sections, `sets` over both) and check
    everything a run reads: its files, and every model built once on the meta device against the data's shape
    and class count."""
    path = Path(path)
    recipe = parse_recipe(path, profile, sets)
    check_paths(path, recipe)
    classes = num_classes(recipe.data, path)
    for field, spec in model_specs(recipe).items():
        check_model(path, field, spec, recipe.data, model_outputs(recipe, spec, classes, path))
    return recipe


def apply_sets(data: dict, sets: list[str]) -> set[tuple[str, ...]]:
    """`--set KEY=VALUE` assignments (KEY a dotted recipe path, VALUE read as YAML) applied to a recipe's data in
    place; returns the paths set. ConfigError names an assignment that is not KEY=VALUE."""
    done = set()
    for s in sets:
        key, eq, value = s.partition("=")
        parts = tuple(key.strip().split("."))
        if not eq or not all(parts):
            raise ConfigError(f"--set {s!r}: expected KEY=VALUE with KEY a dotted recipe path, e.g. "
                              f"--set distill.method=dkd or --set 'models.student.kwargs={{hidden: [32]}}'.")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {s!r}: the value is not valid YAML ({first_line(e)}).") from None
        node: Any = data
        for i, k in enumerate(parts):
            where = ".".join(parts[:i + 1])
            if isinstance(node, list):  # tasks.1.weight, models.extra_teachers.0.arch
                if not k.isdigit() or int(k) >= len(node):
                    raise ConfigError(f"--set {s!r}: {where}: the recipe's list has {len(node)} item(s); index "
                                      f"one of them (0 to {len(node) - 1}), or set the list whole.")
                k = int(k)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {s!r}: {'.'.join(parts[:i])} is a {type(node).__name__} in the recipe, "
                                  f"not a section; set it whole: --set {'.'.join(parts[:i])}=...")
            if i == len(parts) - 1:
                node[k] = parsed
            else:
                if isinstance(node, dict) and node.get(k) is None:
                    node[k] = {}
                node = node[k]
        done.add(parts)
    return done


def parse_recipe(path: Path, profile: Profile | None = None, sets: list[str] = ()) -> RecipeBase:
    """The recipe's settings with the profile's overrides and the command line's `sets`, validated; an error in
    an override names the profile, in a --set the assignment."""
    path = Path(path)
    data = _read_yaml(path)
    overridden: set[tuple[str, str]] = set()
    if profile is not None:
        for stage, over in profile.overrides.items():
            if stage not in stages.STAGES:
                raise ConfigError(f"{profile.where}: overrides.{stage}: not a stage. "
                                  f"Stages: {', '.join(stages.STAGES)}.")
            section = data.get(stage)
            if section is not None and not isinstance(section, dict):
                raise ConfigError(f"{path}: {stage}: expected a mapping of settings, found "
                                  f"{type(section).__name__}.")
            data[stage] = {**(section or {}), **over}
            overridden.update((stage, key) for key in over)
    cli = apply_sets(data, list(sets))
    try:
        recipe = recipe_model().model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # an error at or below a --set path is the command line's; so is an unknown key that --set created
        mine = [x for x in errors if any(tuple(map(str, x["loc"][:len(p)])) == p or (
            x["type"] == "extra_forbidden" and p[:len(x["loc"])] == tuple(map(str, x["loc"]))) for p in cli)]
        theirs = [x for x in errors if tuple(x["loc"][:2]) in overridden and x not in mine]
        ours = [x for x in errors if x not in theirs and x not in mine]
        parts = ([str(_explain("--set", mine))] if mine else []) + \
            ([str(_explain(profile.where, theirs, "overrides."))] if theirs else []) + \
            ([str(_explain(path, ours))] if ours else [])
        raise ConfigError("\n".join(parts)) from None
    if recipe.tasks:
        check_tasks(path, recipe)
    elif recipe.models.extra_teachers and recipe.distill.method != "ensemble":  # else trained for nothing
        raise ConfigError(f"{path}: models.extra_teachers: only distill.method 'ensemble' uses extra teachers, "
                          f"and the method is '{recipe.distill.method}'. Set distill.method: ensemble, or remove "
                          f"models.extra_teachers.")
    return recipe


def check_tasks(path: Path, recipe: RecipeBase) -> None:
    """What multi-task needs of the rest of the recipe; everything a run would otherwise trip over mid-way."""
    names = [t.name for t in recipe.tasks]
    where = f"{path}: tasks"
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: task names must differ, got {names}. Rename the repeated one.")
    if recipe.tasks[0].labels != "class":
        raise ConfigError(f"{where}.0.labels: the first task is the class ('class'), got "
                          f"'{recipe.tasks[0].labels}'. Put the class task first: it is the model's primary head.")
    for i, t in enumerate(recipe.tasks[1:], 1):
        if recipe.data.kind == "digits" and t.labels not in DIGITS_TASKS:
            raise ConfigError(f"{where}.{i}.labels: digits has the built-in tasks {', '.join(DIGITS_TASKS)}; "
                              f"got '{t.labels}'.")
        if recipe.data.kind == "imagefolder" and not t.labels.endswith(".csv"):
            raise ConfigError(f"{where}.{i}.labels: an ImageFolder's other tasks come from a CSV file "
                              f"(relative_path,label); got '{t.labels}'. Name a .csv file.")
    m = recipe.models
    for field, spec in model_specs(recipe).items():
        unknown = [h for h in spec.heads or [] if h not in names]
        if unknown:
            raise ConfigError(f"{path}: {field}.heads: {unknown[0]!r} is not a task (tasks: {', '.join(names)}).")
    if m.student.heads is not None and m.student.heads != names:
        raise ConfigError(f"{path}: models.student.heads: the student predicts every task, in the order of tasks: "
                          f"{names}. Remove models.student.heads, or list them in that order.")
    if m.teacher.heads is not None and names[0] not in m.teacher.heads:
        raise ConfigError(f"{path}: models.teacher.heads: the teacher is the reference of the first task "
                          f"('{names[0]}'): include it.")
    if m.teacher.onnx is not None:
        raise ConfigError(f"{path}: models.teacher.onnx: an ONNX teacher with tasks is not supported (its heads "
                          f"cannot be told apart). Give it as arch + checkpoint.")
    for i, spec in enumerate(m.extra_teachers):
        if not spec.heads:
            raise ConfigError(f"{path}: models.extra_teachers.{i}.heads: with tasks, an extra teacher is the "
                              f"teacher of the tasks it names (ensembles are single-task). Name its tasks.")
    covered = set(heads_of(m.teacher, names)) | {h for s in m.extra_teachers for h in s.heads or []}
    missing = [n for n in names if n not in covered]
    if missing:
        raise ConfigError(f"{path}: tasks: no teacher predicts '{missing[0]}'. Add it to models.teacher.heads, or "
                          f"give it a teacher under models.extra_teachers with heads: [{missing[0]}].")
    unsupported = {"feature", "adversarial", "ensemble"}
    if recipe.distill.method in unsupported:
        raise ConfigError(f"{path}: distill.method: '{recipe.distill.method}' is single-task; with tasks use "
                          f"hinton, dynamic, self, dkd or dist.")
    if recipe.distill.mixup:
        raise ConfigError(f"{path}: distill.mixup: mixup mixes one label per image; with tasks set it to 0.")
    if recipe.quantize.qat is not None:
        raise ConfigError(f"{path}: quantize.qat: fine-tunes one head; with tasks remove it (post-training "
                          f"calibration and exclusion judge the first task's head).")


def model_outputs(recipe: RecipeBase, spec: ModelSpec, classes: int, path: Path | None = None) -> int:
    """The scores a model gives: the class count, or with tasks the sum of its heads' class counts."""
    if not recipe.tasks:
        return classes
    from pipeline.train.tasks import task_classes
    try:
        counts = {t.name: len(task_classes(t.labels, [""] * classes)) for t in recipe.tasks}
    except ConfigError as e:  # a CSV that cannot be read
        raise ConfigError(f"{path}: tasks: {e}" if path else str(e)) from None
    return sum(counts[h] for h in heads_of(spec, list(counts)))


def heads_of(spec: ModelSpec, tasks: list[str]) -> list[str]:
    """The tasks a model predicts, in the recipe's task order (its outputs' order)."""
    return [t for t in tasks if spec.heads is None or t in spec.heads]


def model_specs(recipe: RecipeBase) -> dict[str, ModelSpec]:
    """Every model the recipe names, by its field."""
    specs = {"models.teacher": recipe.models.teacher, "models.student": recipe.models.student}
    specs.update({f"models.extra_teachers.{i}": s for i, s in enumerate(recipe.models.extra_teachers)})
    return specs


def check_paths(path: Path, recipe: RecipeBase) -> None:
    """Paths in a recipe are relative to the recipe file; a missing one fails now, not mid-run. An ONNX model's
    external weights must lie beside it: they are checked here, before any stage copies them."""
    from pipeline.artifacts import check_external_data
    base = path.resolve().parent
    for field, spec in model_specs(recipe).items():
        for attr in ("checkpoint", "onnx"):
            value = getattr(spec, attr)
            if value is None:
                continue
            full = value if value.is_absolute() else base / value
            if not _is_file(full):
                what = "is not a regular file (a folder or a device)" if _exists(full) else "does not exist"
                raise ConfigError(f"{path}: {field}.{attr}: '{value}' {what} (resolved to {full}). "
                                  f"Fix the path, or remove the key to train the model from scratch.")
            if attr == "onnx":
                try:
                    check_external_data(full)
                except ConfigError as e:
                    raise ConfigError(f"{path}: {field}.onnx: {e}") from None
            setattr(spec, attr, full)
    for i, t in enumerate(recipe.tasks):
        if t.labels.endswith(".csv"):
            full = Path(t.labels) if Path(t.labels).is_absolute() else base / t.labels
            if not _is_file(full):
                raise ConfigError(f"{path}: tasks.{i}.labels: '{t.labels}' is not a file (resolved to {full}). Fix "
                                  f"the path (relative to the recipe) of the relative_path,label CSV.")
            t.labels = str(full)
    if recipe.data.root is not None:
        root = recipe.data.root if recipe.data.root.is_absolute() else base / recipe.data.root
        if not _is_dir(root):
            raise ConfigError(f"{path}: data.root: '{recipe.data.root}' is not a directory (resolved to {root}).")
        recipe.data.root = root
    elif recipe.data.kind == "imagefolder":
        raise ConfigError(f"{path}: data.root: required when data.kind is 'imagefolder'.")


def num_classes(data: DataConfig, path: Path) -> int:
    """The class count from a listing alone: 10 digits, or the class folders of data.root/train (else data.root),
    found as pipeline/train/data.py finds them (torchvision's find_classes)."""
    if data.kind == "digits":
        return 10
    from torchvision.datasets.folder import find_classes
    assert data.root is not None  # check_paths requires it for imagefolder
    root = data.root / "train" if _is_dir(data.root / "train") else data.root
    try:
        return len(find_classes(str(root))[0])
    except (OSError, ValueError):  # FileNotFoundError: no class folders
        raise ConfigError(f"{path}: data.root: {root} has no class sub-folders (expected e.g. "
                          f"{root}/cat/*.png).") from None


def check_model(path: Path, field: str, spec: ModelSpec, data: DataConfig, classes: int) -> None:
    """Build a model spec once, cheaply (models.probe, models.probe_onnx), so a bad kwarg, a checkpoint that does not
    fit or a wrong class count fails at load and not after the teacher has trained."""
    from pipeline.train import models
    try:
        if spec.onnx is not None:
            if field == "models.student":
                raise ConfigError(f"{field}.onnx: only teachers can be ONNX files (the student is trained in "
                                  f"PyTorch). Remove {field}.onnx.")
            models.probe_onnx(spec.onnx, data.channels, classes, data.image_size, field=field)
        else:
            models.probe(spec, data.channels, classes, data.image_size, field=field)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return False


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError):
        return False


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except (OSError, ValueError):
        return False
