import pytest
import torch

from tritonformer import runtime


@pytest.fixture(autouse=True)
def _poison_and_seed():
    """Every test: NaN-filled kernel outputs (unwritten elements fail) and a fixed seed."""
    runtime.set_poison_outputs(True)
    torch.manual_seed(0)
    yield
    runtime.set_poison_outputs(False)
