"""Test-session settings: one torch thread per process (the suite is many tiny ops, where
thread hand-off costs more than it gains on a 2-core machine)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def float64_seeded():
    """float64 as the default dtype and torch seeded with 0, for one test (restored after);
    a module opts in with ``pytestmark = pytest.mark.usefixtures("float64_seeded")``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)
