"""The SigLIP 2 tests run torch on one thread: their tensors are tiny, and on two cores shared with other jobs a
second thread mostly waits (a tiny decoder's Adam step measured 4 ms on one thread, 40-70 ms on two)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
