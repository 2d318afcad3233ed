"""Which layers each pipeline stage holds: pure arithmetic, no process group.

The model's `n_layers` blocks are cut into `pp · virtual` contiguous *virtual stages* in model order
(v = 0 .. pp·virtual − 1). Virtual stage v runs on pp rank `v % pp` as that rank's local model chunk
`v // pp` (Megatron-core's interleaving): with virtual = 1 this is the plain split, stage s = pp rank s.
Virtual stage 0 also holds the embedding, the last one the final norm and the head.

The layout (`parallel.pp`, `pp_virtual`, `pp_layers` against `model.n_layers`) is judged by
`moe_dist.parallel.layout.check_layout`, which names the config fields; the functions here raise a plain
`ValueError` when called with sizes that check would have refused.
"""
from __future__ import annotations

from typing import Optional, Sequence


def _even_sizes(n_layers: int, stages: int) -> list[int]:
    """`stages` sizes that sum to n_layers and differ by at most one; the extra layers go to the middle
    stages first (the first stage also holds the embedding and the last the head), the earlier stage first
    on a tie."""
    base, extra = divmod(n_layers, stages)
    by_centrality = sorted(range(stages), key=lambda v: (abs(2 * v - (stages - 1)), v))
    sizes = [base] * stages
    for v in by_centrality[:extra]:
        sizes[v] += 1
    return sizes


def stage_sizes(n_layers: int, pp: int, virtual: int = 1, pp_layers: Optional[Sequence[int]] = None) -> list[int]:
    """Layers per virtual stage, in model order (length pp·virtual)."""
    stages = pp * virtual
    if pp < 1 or virtual < 1:
        raise ValueError(f"pp={pp} and virtual={virtual} must be >= 1")
    if pp_layers is None:
        if stages > n_layers:
            raise ValueError(f"{stages} virtual stages for {n_layers} layers: some stage would hold none")
        return _even_sizes(n_layers, stages)
    sizes = list(pp_layers)
    if len(sizes) != stages or sum(sizes) != n_layers or min(sizes) < 0:
        raise ValueError(f"pp_layers={sizes} must have {stages} non-negative entries summing to {n_layers}")
    return sizes


def stage_layers(n_layers: int, pp: int, virtual: int = 1,
                 pp_layers: Optional[Sequence[int]] = None) -> list[range]:
    """The global layer indices of every virtual stage, indexed by virtual stage in model order: contiguous
    ranges that together cover range(n_layers)."""
    out, start = [], 0
    for size in stage_sizes(n_layers, pp, virtual, pp_layers):
        out.append(range(start, start + size))
        start += size
    return out


def virtual_stages_of(pp_rank: int, pp: int, virtual: int = 1) -> list[int]:
    """The virtual stages pp rank `pp_rank` runs, indexed by its local chunk c: pp_rank + c·pp."""
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp rank {pp_rank} is outside 0..{pp - 1}")
    return [pp_rank + c * pp for c in range(virtual)]


def rank_of_virtual_stage(v: int, pp: int) -> tuple[int, int]:
    """(pp rank, local chunk) that runs virtual stage v."""
    return v % pp, v // pp


def layers_of_rank(pp_rank: int, n_layers: int, pp: int, virtual: int = 1,
                   pp_layers: Optional[Sequence[int]] = None) -> list[range]:
    """The layers of each local chunk of pp rank `pp_rank` (indexed by chunk)."""
    ranges = stage_layers(n_layers, pp, virtual, pp_layers)
    return [ranges[v] for v in virtual_stages_of(pp_rank, pp, virtual)]


def stage_of_layer(layer: int, n_layers: int, pp: int, virtual: int = 1,
                   pp_layers: Optional[Sequence[int]] = None) -> int:
    """The virtual stage that holds global layer `layer` (its pp rank is the result % pp)."""
    for v, r in enumerate(stage_layers(n_layers, pp, virtual, pp_layers)):
        if layer in r:
            return v
    raise ValueError(f"layer {layer} is outside 0..{n_layers - 1}")


def is_first(pp_rank: int, chunk: int = 0) -> bool:
    """Whether (pp rank, local chunk) is virtual stage 0: it holds the embedding and receives nothing."""
    return pp_rank == 0 and chunk == 0


def is_last(pp_rank: int, pp: int, chunk: int = 0, virtual: int = 1) -> bool:
    """Whether (pp rank, local chunk) is the last virtual stage: it holds the head and computes the loss."""
    return pp_rank == pp - 1 and chunk == virtual - 1
