"""Mutation testing of refquant's numeric core with mutmut (not part of CI).

    python tools/mutation.py                 # affine, packing, formats, gptq
    python tools/mutation.py packing         # one module

Each module is mutated in a scratch copy of the repository (mutmut works in ``mutants/``
beside the code, so the checkout stays clean) and tested by the test files that exercise
it (``TESTS``). Prints, and writes to ``benchmarks/results/mutation.json``, the number of
mutants killed / survived / timed out per module and the surviving mutants' names
(``mutmut show NAME`` in the scratch copy prints the diff).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = {
    "affine": ["tests/test_affine.py", "tests/test_packing.py"],
    "packing": ["tests/test_packing.py"],
    "formats": ["tests/test_formats.py"],
    "gptq": ["tests/test_gptq.py"],
}


def run(module: str, tests: list[str], workdir: Path) -> dict:
    """Mutate ``refquant/<module>.py`` in a copy of the repo under ``workdir``; the counts."""
    copy = workdir / module
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "mutants", "*.egg-info",
                                                              "__pycache__", "figures", "checkpoints"))
    cfg = copy / "setup.cfg"
    cfg.write_text(cfg.read_text() + "\n[mutmut]\nsource_paths = refquant\n"
                   f"only_mutate = refquant/{module}.py\n"
                   "pytest_add_cli_args_test_selection =\n" + "".join(f"    {t}\n" for t in tests)
                   + "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -x\n    -q\n")
    # mutmut forks a child per mutant from a process that has run the tests: numba's OpenMP
    # threading layer aborts such children ("fork() called from a process already using GNU
    # OpenMP"), which mutmut counts as "suspicious"; its workqueue layer survives a fork
    env = dict(os.environ, HYPOTHESIS_PROFILE="mutation", PYTHONPATH=str(copy), NUMBA_THREADING_LAYER="workqueue")
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", "2"], cwd=copy, env=env, check=False)
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=copy, env=env,
                         capture_output=True, text=True).stdout
    status: dict[str, list[str]] = {}
    for line in out.splitlines():
        if ":" in line:
            name, st = line.rsplit(":", 1)
            status.setdefault(st.strip(), []).append(name.strip())
    counts = {k: len(v) for k, v in status.items()}
    decided = sum(counts.values()) - counts.get("not checked", 0)
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    return {"counts": counts, "score": killed / decided if decided else None,
            "survived": sorted(status.get("survived", [])), "workdir": str(copy)}


def main(argv=None):
    mods = (argv if argv is not None else sys.argv[1:]) or list(TESTS)
    workdir = Path(tempfile.mkdtemp(prefix="refquant-mutation-"))
    results = {}
    for m in mods:
        results[m] = run(m, TESTS[m], workdir)
        r = results[m]
        print(f"{m}: score {r['score']:.1%}  {r['counts']}  ({len(r['survived'])} survived; in {r['workdir']})",
              flush=True)
    path = ROOT / "benchmarks" / "results" / "mutation.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(results)
    path.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
