import os

import pytest
import torch

# Tests never touch the user's teacher cache (even with KDBENCH_CACHE_DIR set) or download anything.
os.environ["KDBENCH_CACHE_DIR"] = os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "kdcache")
os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def logits():
    """A reproducible batch of student and teacher logits (B=8, C=10) and labels."""
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(8, 10, generator=g) * 2
    zt = torch.randn(8, 10, generator=g) * 2
    y = torch.randint(0, 10, (8,), generator=g)
    return zs, zt, y
