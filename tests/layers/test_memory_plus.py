"""Memory+ layer (math.md §5): one value table shared by every memory layer of the model."""

from ultramem.layers.memory_plus import MemoryPlusConfig
from ultramem.layers.registry import ShapeContext
from ultramem.model.transformer import Transformer
from ultramem.resolve import load_config


def test_memory_plus_shares_one_table():
    model = Transformer.build(load_config("tiny-memory-plus").model)
    tables = {id(layer.shared.values) for layer in model.memory}
    assert len(model.memory) == 2 and len(tables) == 1
    hints = [h for layer in model.memory for h in layer.param_group_hints()]
    assert len(hints) == 1 and hints[0].params[0] is model.memory_shared.values
    cfg = MemoryPlusConfig()
    assert cfg.shared_num_params(ShapeContext(d_model=64, n_layers=2)) == 512 * 512 * 64
