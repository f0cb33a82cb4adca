"""The packages are layers and imports point one way; a forbidden import in any module fails this test.

Rules (README: Where things are):
- pipeline/device imports nothing of ours outside itself: it is copied alone onto devices;
- stages never import the CLI, and a stage never imports another stage (shared pieces live in stages/_common
  or a layer below);
- pipeline/train never imports pipeline/report; pipeline/report imports neither torch nor pipeline/train;
- pipeline/ship never imports stages.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from stages import STAGES

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, module) for every import in a file: `from a import b` counts as a and as a.b (b may be a module);
    relative imports are resolved against the file's package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            base = ".".join(parts + ([node.module] if node.module else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(root: Path) -> list[str]:
    """Every import that breaks a layer rule, as 'file:line: importer -> imported (rule)'."""
    out = []
    for path in sorted(root.glob("pipeline/**/*.py")) + sorted(root.glob("stages/*.py")):
        rel = path.relative_to(root)
        module = ".".join(rel.with_suffix("").parts)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        if module.endswith(".__init__"):
            module = module[:-len(".__init__")]
        for line, imp in _imports(path, package):
            rule = _rule(module, imp)
            if rule:
                out.append(f"{rel}:{line}: {module} -> {imp} ({rule})")
    return out


def _rule(module: str, imp: str) -> str | None:
    ours = _within(imp, "pipeline") or _within(imp, "stages")
    if _within(module, "pipeline.device") and ours and not _within(imp, "pipeline.device"):
        return "pipeline/device imports nothing of ours outside itself"
    if _within(module, "stages") and _within(imp, "pipeline.cli"):
        return "stages never import the CLI"
    other = imp.split(".")[1] if _within(imp, "stages") and imp.count(".") else None
    if _within(module, "stages") and other in STAGES and module != f"stages.{other}":
        return "a stage never imports another stage"
    if _within(module, "pipeline.train") and _within(imp, "pipeline.report"):
        return "pipeline/train never imports pipeline/report"
    if _within(module, "pipeline.report") and (_within(imp, "torch") or _within(imp, "torchvision")
                                               or _within(imp, "pipeline.train")):
        return "pipeline/report imports neither torch nor pipeline/train"
    if _within(module, "pipeline.ship") and _within(imp, "stages"):
        return "pipeline/ship never imports stages"
    return None


def test_the_tree_keeps_its_layers():
    assert violations(ROOT) == []


def test_a_planted_forbidden_import_is_found(tmp_path):
    for part in ("pipeline", "stages"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    assert violations(tmp_path) == []
    plants = {"pipeline/report/build.py": "import torch\n", "pipeline/device/measure.py": "from pipeline import config\n",
              "pipeline/train/loop.py": "from pipeline.report import gate\n", "stages/prune.py": "from stages import distill\n",
              "stages/export.py": "from pipeline.cli import app\n", "pipeline/ship/bundle.py": "import stages.benchmark\n",
              "pipeline/device/runner.py": "from .. import artifacts\n"}
    for rel, line in plants.items():
        path = tmp_path / rel
        path.write_text(path.read_text() + line)
    found = violations(tmp_path)
    assert sorted({f.split(":")[0] for f in found}) == sorted(plants)


def test_importing_the_report_layer_does_not_import_torch():
    code = ("import sys; import pipeline.report, pipeline.report.build, pipeline.report.gate, "
            "pipeline.report.html, pipeline.report.schema, pipeline.report.rerender, pipeline.report.estimate; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'pipeline')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    loaded = eval(out)
    assert not [m for m in loaded if m.startswith(("torch", "pipeline.train"))], loaded
    assert "pipeline.report.gate" in loaded  # the import did happen
