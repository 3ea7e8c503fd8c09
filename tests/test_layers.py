"""Layers point down: refquant knows no model and no benchmark, minigpt_np no benchmark,
no module imports itself through others (no cycles), and ``import refquant`` stays a NumPy
import (numba loads when a kernel is first used). Imports inside functions count."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


PACKAGES = ("refquant", "minigpt_np", "benchmarks")
# package -> top-level packages it must not import
FORBIDDEN = {"refquant": {"minigpt_np", "benchmarks"}, "minigpt_np": {"benchmarks"}, "benchmarks": set()}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Our modules -> our modules they import (``from pkg import mod`` is an edge to
    ``pkg.mod`` when that is a module, else to ``pkg``)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                    pkg = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                    base = f"{pkg}.{base}" if base else pkg
                for a in node.names:
                    out |= {f"{base}.{a.name}"} if f"{base}.{a.name}" in files else ({base} & files.keys())
        graph[name] = out - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_layers_point_down():
    bad = sorted(f"{m} imports {d}" for m, deps in import_graph().items() for d in deps
                 if d.split(".")[0] in FORBIDDEN[m.split(".")[0]])
    assert not bad, bad


# refquant.kernels is a leaf: besides itself, only the tensor type and the input checks (the
# format rows and schemes pass it what it needs: fields and layouts, x's rounding)
KERNELS_MAY_IMPORT = ("refquant.kernels", "refquant.tensor", "refquant._checks")


def test_kernels_are_a_leaf():
    bad = sorted(f"{m} imports {d}" for m, deps in import_graph().items() if m.startswith("refquant.kernels")
                 for d in deps if not d.startswith(KERNELS_MAY_IMPORT))
    assert not bad, bad


def test_a_scheme_has_its_kernel_whatever_is_imported_first():
    """The kernel is part of a scheme's registration: importing one family alone (no
    ``import refquant`` to wire anything afterwards) gives its schemes their kernels."""
    code = ("import refquant.awq, refquant.smoothquant; from refquant import schemes; "
            "print(sorted(n for n in ('awq_int4_g128', 'w8a8', 'int4_g32') if schemes.get(n).kernel is not None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['awq_int4_g128', 'int4_g32', 'w8a8']"


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_graph_checks_bite():
    """The checks find what they look for: a made-up cycle and the real edges."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    g = import_graph()
    assert "refquant.kernels.bytedot" in g["refquant.kernels.table"]    # an import inside a function
    assert "refquant.kernels.bytedot" in g["refquant.gguf.quants.core"]   # the format rows call the kernels
    assert "refquant.gguf.quants" in g["refquant.gguf.file"] and "minigpt_np.model" in g["minigpt_np.corpus"]


def test_import_refquant_does_not_load_numba():
    code = "import sys, refquant, refquant.schemes; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
