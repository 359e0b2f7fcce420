"""Test environment: the kernels run on CUDA when there is a GPU, else in the Triton interpreter.

Both switches must be set before fusedres (and so triton's @jit) is imported. FUSEDRES_STRICT=1
turns any PyTorch fallback into an error, so a kernel test can never pass on the reference.
"""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FUSEDRES_STRICT", "1")

import pytest  # noqa: E402

import fusedres  # noqa: E402,F401


def pytest_configure(config):
    # Any fallback that slips past strict mode still fails the test. Added here, not in pytest.ini,
    # because resolving the class there would import fusedres before TRITON_INTERPRET is set.
    config.addinivalue_line("filterwarnings", "error::fusedres.FusedResFallbackWarning")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def no_tf32():
    """Parity tests compare fp32 against IEEE fp32: TF32 off for cuDNN and our kernels, then restored."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A different seed per test (stable per test id), never zeros or ones."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# Hypothesis profiles for the property tests (tests/test_properties.py). "ci", the default: a fixed
# set of examples (derandomized), sized so the property file takes about 1.5 minutes in the
# interpreter on 2 cores; "long": many more, freshly random examples (FUSEDRES_HYPOTHESIS_PROFILE=long).
# FUSEDRES_HYPOTHESIS_MAX_EXAMPLES overrides the count (the GPU check sizes its run with it).
# too_slow is suppressed: one interpreted example takes 0.1-2 s.
from hypothesis import HealthCheck, settings  # noqa: E402

_examples = os.environ.get("FUSEDRES_HYPOTHESIS_MAX_EXAMPLES")
_common = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, database=None, max_examples=int(_examples or 100), **_common)
settings.register_profile("long", max_examples=int(_examples or 400), **_common)
# "seeded": the ci profile's size with the examples drawn from --hypothesis-seed=N (derandomize would
# ignore the seed). CI's second run uses it, so a verdict that holds for one seed only fails there.
settings.register_profile("seeded", database=None, max_examples=int(_examples or 100), **_common)
settings.load_profile(os.environ.get("FUSEDRES_HYPOTHESIS_PROFILE", "ci"))
