"""moe_dist.pipeline.stages: the layer split over (virtual) pipeline stages. Contiguous ranges covering every
layer once; the even split puts the extra layers on the middle stages; the interleaving and the layer offsets
equal Megatron-core's (`get_transformer_layer_offset`, `get_num_layers_to_build`)."""
from __future__ import annotations

import itertools

import pytest

from moe_dist.pipeline.stages import (is_first, is_last, layers_of_rank, rank_of_virtual_stage, stage_layers,
                                      stage_of_layer, stage_sizes, virtual_stages_of)


@pytest.mark.parametrize("n_layers,pp,virtual", [(n, p, v) for n in range(1, 13) for p in (1, 2, 3, 4)
                                                 for v in (1, 2, 3) if p * v <= n])
def test_even_split_is_contiguous_balanced_and_complete(n_layers, pp, virtual) -> None:
    ranges = stage_layers(n_layers, pp, virtual)
    assert len(ranges) == pp * virtual
    assert [i for r in ranges for i in r] == list(range(n_layers))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    for layer in range(n_layers):
        assert layer in ranges[stage_of_layer(layer, n_layers, pp, virtual)]


def test_extra_layers_go_to_the_middle_stages_first() -> None:
    assert stage_sizes(6, 4) == [1, 2, 2, 1]
    assert stage_sizes(7, 4) == [2, 2, 2, 1]          # the middle ones, then the first (ties: earlier)
    assert stage_sizes(5, 4) == [1, 2, 1, 1]
    assert stage_sizes(8, 5) == [1, 2, 2, 2, 1]
    assert stage_sizes(6, 5) == [1, 1, 2, 1, 1]
    assert stage_sizes(4, 1) == [4]


def test_explicit_split_is_kept_and_may_leave_the_ends_empty() -> None:
    assert stage_layers(8, 2, 2, [1, 3, 3, 1]) == [range(0, 1), range(1, 4), range(4, 7), range(7, 8)]
    assert stage_layers(4, 3, 1, [0, 4, 0]) == [range(0, 0), range(0, 4), range(4, 4)]
    with pytest.raises(ValueError):
        stage_layers(4, 2, 1, [1, 2])
    with pytest.raises(ValueError):
        stage_layers(2, 3)


def test_interleaving_is_megatrons() -> None:
    assert virtual_stages_of(1, 4, 2) == [1, 5]
    assert virtual_stages_of(0, 2) == [0]
    assert [rank_of_virtual_stage(v, 4) for v in (0, 5, 7)] == [(0, 0), (1, 1), (3, 1)]
    assert layers_of_rank(1, 8, 2, 2) == [range(2, 4), range(6, 8)]
    assert is_first(0) and not is_first(0, 1) and not is_first(1)
    assert is_last(3, 4) and is_last(1, 2, chunk=1, virtual=2) and not is_last(1, 2, chunk=0, virtual=2)
    for pp, virtual in itertools.product((2, 3, 4), (1, 2, 3)):
        owners = sorted(v for r in range(pp) for v in virtual_stages_of(r, pp, virtual))
        assert owners == list(range(pp * virtual))


def _megatron(n_layers, pp, virtual, first=None, last=None):
    """(offset, count) per (pp rank, chunk) from Megatron-core's own functions."""
    import torch
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    cfg = TransformerConfig(num_layers=n_layers, hidden_size=64, num_attention_heads=4, pipeline_dtype=torch.float32,
                            pipeline_model_parallel_size=pp,
                            virtual_pipeline_model_parallel_size=virtual if virtual > 1 else None,
                            num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)
    vp = (lambda c: c) if virtual > 1 else (lambda c: None)
    return {(r, c): (get_transformer_layer_offset(cfg, vp_stage=vp(c), pp_rank=r),
                     get_num_layers_to_build(cfg, vp_stage=vp(c), pp_rank=r))
            for r in range(pp) for c in range(virtual)}


@pytest.mark.parametrize("n_layers,pp,virtual", [(8, 2, 1), (8, 2, 2), (16, 4, 2), (12, 4, 3), (12, 3, 1)])
def test_layer_offsets_equal_megatron_core(n_layers, pp, virtual) -> None:
    want = _megatron(n_layers, pp, virtual)
    for r in range(pp):
        for c, layers in enumerate(layers_of_rank(r, n_layers, pp, virtual)):
            assert (layers.start, len(layers)) == want[r, c], (r, c)


def test_uneven_first_and_last_stage_equal_megatron_core() -> None:
    want = _megatron(10, 4, 1, first=1, last=3)
    got = stage_layers(10, 4, 1, [1, 3, 3, 3])
    assert [(r.start, len(r)) for r in got] == [want[r, 0] for r in range(4)]
