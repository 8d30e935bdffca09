"""Test setup shared by the whole suite.

Triton kernels run on CPU under the interpreter; TRITON_INTERPRET must be set before triton is
imported anywhere, hence here, at collection time, and only when there is no GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Under pytest-xdist (`make test` runs one worker per core) the workers share the cores: each
# takes its share of intra-op threads instead of all of them (most of a test's time is Dynamo
# and inductor compiling, in one Python thread, which is what the extra workers overlap).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with an empty Dynamo cache so graphs from other tests don't leak in."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
