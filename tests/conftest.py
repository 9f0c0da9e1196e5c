import pytest
import torch

from tritonformer import runtime


@pytest.fixture(autouse=True)
def _poison_and_seed():
    """Every test: NaN-filled kernel outputs (unwritten elements fail) and a fixed seed; after
    it, cached GPU memory goes back to the driver (several test processes share one card)."""
    runtime.set_poison_outputs(True)
    torch.manual_seed(0)
    yield
    runtime.set_poison_outputs(False)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
