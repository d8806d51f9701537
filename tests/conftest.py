import os

import pytest
import torch

# Two cores in CI: keep each test single-threaded so parallel work does not oversubscribe.
torch.set_num_threads(1)


@pytest.fixture
def data_root():
    """Root of the real image data (``SOCO_DATA_ROOT``); skips the test when unset."""
    root = os.environ.get("SOCO_DATA_ROOT", "")
    if not root or not os.path.isdir(root):
        pytest.skip("SOCO_DATA_ROOT is not set (real-data test)")
    return root
