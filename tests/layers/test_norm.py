import pytest
from torch import nn

from ultramem.layers.norm import make_norm


def test_one_norm_factory_kinds_and_eps():
    assert isinstance(make_norm("none", 8), nn.Identity)
    ln, rms, bn = make_norm("layernorm", 8), make_norm("rmsnorm", 8), make_norm("batchnorm", 12)
    assert (type(ln), ln.eps, ln.normalized_shape) == (nn.LayerNorm, 1e-5, (8,))
    assert (type(rms), rms.eps) == (nn.RMSNorm, None)  # the memory layers' RMSNorm: machine epsilon
    assert (type(bn), bn.num_features) == (nn.BatchNorm1d, 12)
    assert make_norm("rmsnorm", 8, 1e-6).eps == 1e-6 and make_norm("layernorm", 8, 1e-6).eps == 1e-6
    with pytest.raises(ValueError, match="allowed: none, batchnorm, layernorm, rmsnorm"):
        make_norm("groupnorm", 8)
