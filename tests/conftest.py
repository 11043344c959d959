"""GPU tests skip cleanly where there is no CUDA device."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run on the device with: python3 -m pytest -m gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
