import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(2)

# dtype "auto" means bf16 on CPUs with native bf16 (ctrlnet.runtime.device.auto_dtype), so the same
# test would compute in bf16 on one machine and in fp32 on another. The suite's parity checks
# (against diffusers, transformers, transcriptions of the original code) are stated for fp32: pin
# it for the whole session (module-scoped fixtures and server subprocesses included), so results
# do not depend on the CPU the suite runs on. Tests of the automatic choice itself clear the
# variable (tests/test_dtype_choice.py); tests/test_step_shortcuts.py checks bf16 against fp32.
os.environ["CTRLNET_DTYPE"] = "fp32"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _threads():
    # the recipes set torch's thread count for their run (``--threads``, default 1); a later test's
    # float sums (and so its measured differences) must not depend on which tests ran before it
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# --- device-sensitive tests -------------------------------------------------------------------------
# ``pytest -m device --device cuda`` runs the tests marked ``device`` (precision, memory layout,
# offloading) on a GPU; without the option they run on the CPU with the rest of the suite.


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda", "mps"],
                     help="device for the tests marked `device` (default cpu)")


@pytest.fixture
def device(request) -> torch.device:
    """The device asked for with ``--device``; the test is skipped if this machine lacks it."""
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda, but PyTorch sees no CUDA GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        pytest.skip("--device mps, but Apple MPS is not available")
    return torch.device(name)


@pytest.fixture
def half_dtype(device) -> torch.dtype:
    """The reduced precision the device runs in: fp16 on CUDA and MPS, bf16 on CPUs."""
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def pytest_collection_modifyitems(config, items):
    """Run the OpenVINO backend's tests last. A process that has run OpenVINO's CPU plugin and then
    forks (a data loader's workers in the training tests) ends in a segmentation fault at exit
    (OpenVINO 2026.4 with torch 2.13 and 2.14; every test passes, the exit status is 139); forking
    after OpenVINO's threads exist is unsafe, and no ctrlnet command does both in one process."""
    items.sort(key=lambda item: item.path.name == "test_openvino.py")  # stable: the rest keep their order
