"""Training-mode causality (ultramem.eval.causality): logits and gradients before the cut do
not see the tokens after it, for every layer type; a leaking model is caught."""

import pytest
import torch

from ultramem.eval.causality import check_causality
from ultramem.experiment import find_experiment, load_experiment, run_configs
from ultramem.layers.tdqkr import CausalQueryConv
from ultramem.model.transformer import Transformer
from ultramem.presets import preset_names
from ultramem.resolve import load_config

TINY = [n for n in preset_names() if n.startswith("tiny-") and n != "tiny-pkm"]


def _tiny(name: str, *overrides: str) -> Transformer:
    cfg = load_config(name, overrides=["model.vocab_size=97", "model.dropout=0.1", *overrides])
    return Transformer.build(cfg.model)


@pytest.mark.parametrize("name", TINY)
def test_training_mode_forward_and_backward_are_causal(name):
    model = _tiny(name)
    idx = torch.randint(0, 97, (2, 24))
    rep = check_causality(model, idx, cut=11)
    assert not rep["leak"], rep
    assert rep["later_logits_change"] > 1e-3  # the perturbation reached the model
    assert max(rep[k]["rel"] for k in ("logits", "embed_grad", "param_grad")) < 1e-5  # rounding at most


def test_pkm_batchnorm_queries_see_the_batch_in_training():
    """PKM's BatchNorm query norm (Lample et al.) normalises with the batch's statistics in
    training, so later tokens do move earlier outputs; with LayerNorm queries it is causal."""
    idx = torch.randint(0, 97, (2, 24))
    assert check_causality(_tiny("tiny-pkm", "model.memory.query_norm=batchnorm"), idx, cut=11)["leak"]
    assert not check_causality(_tiny("tiny-pkm", "model.memory.query_norm=layernorm"), idx, cut=11)["leak"]


def test_a_leaking_query_conv_is_caught(monkeypatch):
    """Control: a query conv padded on the right (token t sees t+1..t+3) must be reported."""

    def leaky(self, x, state=None):
        xt = torch.nn.functional.pad(x.transpose(1, 2), (0, self.kernel - 1))
        return torch.nn.functional.conv1d(xt, self.weight.to(x.dtype), groups=xt.shape[1]).transpose(1, 2)

    model = _tiny("tiny-ultramem")
    for m in model.modules():
        if isinstance(m, CausalQueryConv):
            with torch.no_grad():
                m.weight.normal_()
    idx = torch.randint(0, 97, (2, 24))
    assert not check_causality(model, idx, cut=11)["leak"]
    monkeypatch.setattr(CausalQueryConv, "forward", leaky)
    rep = check_causality(model, idx, cut=11)
    assert rep["leak"] and rep["logits"]["leak"] and rep["embed_grad"]["leak"]


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["v1-family", "v2-family"])
def test_family_models_are_causal_on_the_gpu_kernels(family):
    """The families' exact models (bf16 autocast, the Triton kernels, 16 x 1024 tokens as in
    training), forward and backward."""
    spec = load_experiment(find_experiment(family))
    for run, cfg in run_configs(spec, []):
        torch.manual_seed(0)
        model = Transformer.build(cfg.model, "cuda")
        idx = torch.randint(0, cfg.model.vocab_size, (16, 1024), device="cuda")
        rep = check_causality(model, idx, cut=517, autocast=torch.autocast("cuda", dtype=torch.bfloat16), rel=1e-2)
        batchnorm = getattr(cfg.model.memory, "query_norm", None) == "batchnorm"  # PKM: sees the batch (above)
        assert rep["leak"] == batchnorm, (run["name"], rep)
        del model
