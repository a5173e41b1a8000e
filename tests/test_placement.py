import pytest

from ultramem.errors import ConfigError
from ultramem.layers.pkm import PKMConfig
from ultramem.model.placement import Span, parse_placement


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
