"""moe_dist.bench.ranks: a measured run counts its collectives through `comm.observe_collectives`, call for
call and byte for byte, and tells the tensor-parallel group from another group with the same members."""
from __future__ import annotations

import torch.distributed as dist

from moe_dist import config
from moe_dist.bench.ranks import on_group, run_ranks, train_and_measure
from moe_dist.parallel.comm import CollectiveCall
from moe_dist.parallel.topology import Group
from moe_dist.train.data import prepare

E, K, B, S, D, LAYERS = 4, 2, 2, 16, 16, 2     # experts, top-k, sequences, length, dim, MoE layers


def test_alltoalls_of_an_ep2_run_are_counted_exactly(tmp_path):
    tokens = tmp_path / "tok.bin"
    prepare(None, tokens, max_bytes=100_000)
    raw = {"model": {"dim": D, "n_layers": LAYERS, "n_heads": 2, "max_seq_len": S, "dense_hidden": 32},
           "moe": {"num_experts": E, "top_k": K, "expert_hidden": 16, "force_balanced": True},
           "parallel": {"ep": 2},
           "train": {"seq_len": S, "batch_size": B, "warmup_steps": 0, "out_dir": str(tmp_path / "run")},
           "data": {"path": str(tokens)}}
    cfg = config.from_dict(raw)
    config.validate(cfg)
    all_to_all_single = dist.all_to_all_single
    res = run_ranks(train_and_measure, 2, cfg, 2, 1)
    assert dist.all_to_all_single is all_to_all_single
    # Dropless, force_balanced (token t -> experts 2t, 2t+1 mod 4): each rank permutes N = T·K rows, sends
    # N/2 to each EP member and receives N/2 from each, so every row block on the wire is [N, D] fp32.
    N = B * S * K
    # Per MoE layer: forward count exchange (int64 [ep, E/ep]), dispatch, combine; backward: the adjoint
    # all-to-alls of combine and dispatch.
    calls, nbytes = 5, E * 8 + 4 * N * D * 4
    for r in res:
        assert r["a2a_calls"] == [LAYERS * calls] * 2
        assert r["a2a_bytes"] == [LAYERS * nbytes] * 2
        assert r["a2a_rows_out"] == [LAYERS * N // 2] * 2
        assert all(s > 0 for s in r["a2a_s"])
        assert r["tp_calls"] == [0, 0] and r["tp_bytes"] == [0, 0] and r["tp_calls_by_op"] == [{}, {}]


def test_on_group_needs_the_same_handle_not_only_the_same_members():
    tp_handle, world_handle = object(), object()          # stand-ins: only their identity matters here
    tp = Group(ranks=(0, 1), rank=0, handle=tp_handle)
    world = Group(ranks=(0, 1), rank=0, handle=world_handle)
    assert on_group(CollectiveCall("all_reduce", tp, 8, 0.0), tp)
    assert not on_group(CollectiveCall("all_reduce", world, 8, 0.0), tp)
    # A group of one has no handle and issues nothing: no call is ever on it.
    alone = Group(ranks=(0,), rank=0)
    assert not on_group(CollectiveCall("barrier", alone, 0, 0.0), alone)
