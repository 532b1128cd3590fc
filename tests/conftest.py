"""Shared fixtures: every test starts from fixed seeds and an empty Pyro parameter store."""

import numpy as np
import pyro
import pytest
import torch

# Tiny tensors: one thread avoids oversubscribing the 2 CI cores (measured 8 s vs 283 s for the
# spec tests on a loaded machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_and_clean():
    np.random.seed(0)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()
