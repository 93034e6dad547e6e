import sys
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
sys.path.insert(0, str(Path(__file__).parent))  # tests import their reference helpers


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny problems: intra-op threads only add contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
