from pathlib import Path

import pytest

from ultramem.data.corpus import read_file
from ultramem.data.prepare import prepare_documents

SLICE = Path(__file__).resolve().parents[2] / "ultramem" / "assets" / "corpus_slice.txt"


@pytest.fixture(scope="session")
def slice_data(tmp_path_factory) -> Path:
    """The committed corpus slice, prepared (5 % validation)."""
    out = tmp_path_factory.mktemp("slice")
    prepare_documents(read_file(SLICE), out, val_fraction=0.05)
    return out


@pytest.fixture(scope="session")
def slice_path() -> Path:
    return SLICE
