import os

import pytest

# Keep BLAS and OpenCV from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small built-in synthetic set (COCO 2017 layout), shared by the whole session."""
    from rgnn.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), train=24, val=12, seed=0)
