"""Test-session settings: one torch thread per process (the suite is many tiny ops, where
thread hand-off costs more than it gains on a 2-core machine)."""

import torch

torch.set_num_threads(1)
