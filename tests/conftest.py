"""Session-wide test settings."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tests run tiny models: threads gain nothing there, and lose a lot when other work
    shares the CPUs (spin-waiting for cores that are busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
