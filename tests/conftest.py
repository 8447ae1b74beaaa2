import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(2)


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
