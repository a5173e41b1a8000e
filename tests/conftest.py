import os
from pathlib import Path

import pytest
import torch

SLICE = Path(__file__).resolve().parents[1] / "ultramem" / "assets" / "corpus_slice.txt"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def slice_data(tmp_path_factory) -> Path:
    """The committed corpus slice, prepared (5 % validation); shared by data and train tests."""
    from ultramem.data.corpus import read_file
    from ultramem.data.prepare import prepare_documents

    out = tmp_path_factory.mktemp("slice")
    prepare_documents(read_file(SLICE), out, val_fraction=0.05)
    return out


@pytest.fixture(scope="session")
def slice_path() -> Path:
    return SLICE
