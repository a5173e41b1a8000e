import pytest

from ultramem.errors import ConfigError
from ultramem.layers.pkm import PKMConfig
from ultramem.placement import Span, parse_placement


def test_parse_paper_placements():
    assert parse_placement("3:5/6:8/9:11", 12) == [Span(3, 5), Span(6, 8), Span(9, 11)]
    assert parse_placement("28:32", 32) == [Span(28, 32)]
    assert parse_placement("full", 4) == [Span(i, i) for i in range(1, 5)]


@pytest.mark.parametrize(
    "text, match",
    [
        ("5:3", "j < i"),
        ("0:2", "out of range"),
        ("3:13", "out of range"),
        ("3-5", "not 'i:j'"),
        ("", "is empty"),
        ("3:5/5:8", "overlap at block 5"),
        ("2:2/2:2", "appears twice"),
    ],
)
def test_bad_placements(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_placement(text, 12, PKMConfig())


def test_replace_ffn_needs_parallel_spans():
    with pytest.raises(ConfigError, match="replace_ffn"):
        parse_placement("3:5", 12, PKMConfig(replace_ffn=True))


# ---- the wiring plan -------------------------------------------------------------------------
def test_wiring_plan_spans_replaced_blocks_and_shapes():
    from ultramem.layers.mlp import MLPConfig
    from ultramem.placement import plan_wiring

    ffn = MLPConfig(hidden=96, activation="swiglu")
    plan = plan_wiring(32, 6, ffn, PKMConfig(placement="2:2/4:6", n_keys=8, key_dim=8, topk=4))
    assert plan.spans == (Span(2, 2), Span(4, 6)) and plan.n_layers == 6 and plan.replaced == frozenset()
    assert [plan.reads(i) for i in range(1, 7)] == [(), (0,), (), (1,), (), ()]
    assert [s.block_index for s in plan.ffn] == [1, 2, 3, 4, 5, 6]
    assert [(s.mem_index, s.block_index) for s in plan.memory] == [(0, 2), (1, 4)]
    for s in (*plan.ffn, *plan.memory, plan.shared):
        assert (s.d_model, s.n_layers, s.n_mem_layers, s.ffn_hidden, s.ffn_gated) == (32, 6, 2, 96, True)
    replaced = plan_wiring(32, 4, ffn, PKMConfig(placement="1:1/3:3", replace_ffn=True))
    assert replaced.replaced == frozenset({1, 3}) and [s is None for s in replaced.ffn] == [True, False, True, False]
    dense = plan_wiring(32, 3, ffn, None)
    assert dense.spans == () and dense.memory == () and dense.shared.n_mem_layers == 0


def test_model_accounting_and_validation_read_one_plan():
    """The built model's layers are exactly the plan's; the accounting counts the same model."""
    from ultramem.accounting import count
    from ultramem.config import load_config
    from ultramem.model.transformer import Transformer

    cfg = load_config("tiny-pkm", overrides=["model.memory.placement=1:1/3:3", "model.memory.replace_ffn=true"]).model
    plan = cfg.wiring()
    model = Transformer.build(cfg)
    assert model.wiring == plan and len(model.memory) == len(plan.spans) == 2
    assert [b.ffn is None for b in model.blocks] == [s is None for s in plan.ffn] == [True, False, True, False]
    assert count(cfg).params == model.num_params()
    cfg.memory.placement = "1:3"  # replace_ffn needs i:i spans: validation reads the same plan
    with pytest.raises(ConfigError, match="replace_ffn"):
        cfg.validate()
