"""``ultramem.outdir.make_out_dir``: the ``--out`` checks of ``data prepare`` and ``train``."""

import pytest

from ultramem.errors import ConfigError, DataError
from ultramem.outdir import make_out_dir


@pytest.mark.parametrize("error", [DataError, ConfigError])
def test_out_dir_errors_name_out_and_use_the_commands_class(tmp_path, error):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(error, match=r"^--out .*afile: exists and is not a directory; choose another --out$"):
        make_out_dir(afile, error)
    with pytest.raises(error, match=r"^--out .*afile/sub: cannot create it \(.+\); choose another --out$"):
        make_out_dir(afile / "sub", error)


def test_out_dir_is_created_with_parents(tmp_path):
    out = make_out_dir(str(tmp_path / "a" / "b"), DataError)
    assert out == tmp_path / "a" / "b" and out.is_dir()
    assert make_out_dir(out, DataError) == out  # an existing directory is fine
