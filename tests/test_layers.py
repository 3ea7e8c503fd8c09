"""Layers point down: refquant knows no model and no benchmark, and ``import refquant``
stays a NumPy import (numba loads when a kernel is first used)."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imported_modules(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module)
    return mods


def test_refquant_imports_no_model_and_no_benchmark():
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in (ROOT / "refquant").rglob("*.py")
           for m in _imported_modules(p) if m.split(".")[0] in ("minigpt_np", "benchmarks")}
    assert not bad, sorted(bad)


def test_import_refquant_does_not_load_numba():
    code = "import sys, refquant, refquant.schemes; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
