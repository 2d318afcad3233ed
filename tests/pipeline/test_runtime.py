"""The pipeline runtime on gloo ranks: a chain of Linear+tanh chunks split over pp ranks (and `virtual` chunks
per rank) gives the loss and the gradients of one process running every chunk on the whole batch, for GPipe,
1F1B and interleaved 1F1B; forward-only evaluation gives the same losses; every transfer is labelled; a peer
that dies or stops makes its neighbour fail within the process group's timeout instead of hanging."""
from __future__ import annotations

import os
import time
import weakref

import pytest
import torch

from distributed import run_ranks
from moe_dist.parallel import comm
from moe_dist.parallel.topology import ParallelDims, Topology
from moe_dist.parallel.watchdog import Watchdog
from moe_dist.pipeline.runtime import run_forward, run_schedule
from moe_dist.pipeline.schedules import build_schedule, in_flight

B, D = 3, 5            # rows per micro-batch, width


def _data(micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(micro_batches * B, D, generator=g), torch.randn(micro_batches * B, D, generator=g)


def _layer(v: int) -> torch.nn.Linear:
    torch.manual_seed(100 + v)
    return torch.nn.Linear(D, D)


# Activations alive in this process (each rank is its own process): the chunks count their outputs, and the
# runtime must let each go after its backward, so the peak is the schedule's in-flight count.
LIVE = {"now": 0, "peak": 0}


def _release():
    LIVE["now"] -= 1


class ToyChunk:
    """Virtual stage v of the chain: Linear + tanh; stage 0 reads its micro-batch of x, the last stage returns
    the micro-batch's mean squared error / micro_batches."""

    def __init__(self, v: int, n_stages: int, micro_batches: int, out_dtype: torch.dtype = torch.float32):
        self.v, self.first, self.last = v, v == 0, v == n_stages - 1
        self.layer, self.m, self.out_dtype = _layer(v), micro_batches, out_dtype
        self.x, self.y = _data(micro_batches)
        self.dtype = torch.float32

    def activation_shape(self):
        return (B, D)

    def forward(self, micro, inp):
        h = self.x[micro * B:(micro + 1) * B] if self.first else inp
        out = torch.tanh(self.layer(h))
        if self.last:
            out = torch.nn.functional.mse_loss(out, self.y[micro * B:(micro + 1) * B]) / self.m
        else:
            out = out.to(self.out_dtype)        # float64: an output in another dtype than the wire's (autocast)
        if torch.is_grad_enabled():             # the runtime holds what forward returns until its backward
            LIVE["now"] += 1
            LIVE["peak"] = max(LIVE["peak"], LIVE["now"])
            weakref.finalize(out, _release)
        return out


def _reference(n_stages: int, micro_batches: int):
    x, y = _data(micro_batches)
    layers = [_layer(v) for v in range(n_stages)]
    h = x
    for layer in layers:
        h = torch.tanh(layer(h))
    loss = torch.nn.functional.mse_loss(h, y)
    loss.backward()
    return loss.item(), {v: (l.weight.grad, l.bias.grad) for v, l in enumerate(layers)}


def _pipeline_rank(rank, world, cases):
    topo = Topology.build(ParallelDims(world=world, pp=world), timeout_s=30)
    labels, out = [], []

    def see(call):
        if call.op == "send_recv":
            labels.append(comm.progress()[2])

    with comm.observe_collectives(see):
        for kind, virtual, m, *out_dtype in cases:
            n_stages = world * virtual
            chunks = [ToyChunk(topo.pp.rank + c * world, n_stages, m, *out_dtype) for c in range(virtual)]
            actions = build_schedule(kind, world, virtual, m, topo.pp.rank)
            LIVE.update(now=0, peak=0)
            run_schedule(actions, topo, chunks, m)
            held = (LIVE["peak"], LIVE["now"], in_flight(actions))
            grads = {ch.v: (ch.layer.weight.grad, ch.layer.bias.grad) for ch in chunks}
            losses = run_forward(topo, chunks, m)
            out.append((grads, losses, held))
    return out, labels


def _check(results, cases, world):
    for i, (kind, virtual, m, *_) in enumerate(cases):
        loss, ref = _reference(world * virtual, m)
        grads = {}
        for r in range(world):
            g, losses, (peak, left, want) = results[r][0][i]
            grads.update(g)
            assert (peak, left) == (want, 0), f"{kind} rank {r}: held {peak} activations at most, {left} at the end"
            last = r == world - 1
            assert all((x is not None) == last for x in losses), f"{kind}: only the last stage gets losses"
            if last:
                assert sum(float(x) for x in losses) == pytest.approx(loss, rel=1e-6), kind
        assert sorted(grads) == list(range(world * virtual))
        for v, (w, b) in ref.items():
            torch.testing.assert_close(grads[v][0], w, rtol=1e-5, atol=1e-7, msg=f"{kind} stage {v} weight")
            torch.testing.assert_close(grads[v][1], b, rtol=1e-5, atol=1e-7, msg=f"{kind} stage {v} bias")


def test_two_stages_match_one_process_for_every_schedule():
    cases = [("gpipe", 1, 3), ("1f1b", 1, 4), ("1f1b", 1, 1), ("interleaved", 2, 4), ("interleaved", 2, 2),
             ("1f1b", 1, 2, torch.float64)]
    results = run_ranks(_pipeline_rank, 2, cases, timeout=120)
    _check(results, cases, 2)
    labels = results[0][1]
    assert labels and all({"stage", "micro", "kind", "phase"} <= set(lab) for lab in labels)
    assert any("send activation (stage 0, micro 0) to rank 1" in lab["kind"] for lab in labels)
    assert any("recv gradient (stage 1, micro 0) from rank 1" in lab["kind"] for lab in labels)


@pytest.mark.slow
def test_four_stages_match_one_process_for_every_schedule():
    cases = [("gpipe", 1, 5), ("1f1b", 1, 6), ("1f1b", 1, 2), ("interleaved", 2, 8), ("interleaved", 3, 4)]
    _check(run_ranks(_pipeline_rank, 4, cases, timeout=240), cases, 4)


def test_chunks_of_one_rank_hand_over_locally():
    """pp = 1 with two chunks (one process, no process group): the hand-over between them stays on the rank."""
    calls = []
    with comm.observe_collectives(calls.append):
        chunks = [ToyChunk(c, 2, 2) for c in range(2)]
        run_schedule(build_schedule("interleaved", 1, 2, 2, 0), Topology.single(), chunks, 2)
        losses = run_forward(Topology.single(), chunks, 2)
    assert calls == []
    loss, ref = _reference(2, 2)
    assert sum(float(x) for x in losses) == pytest.approx(loss, rel=1e-6)
    for ch in chunks:
        torch.testing.assert_close(ch.layer.weight.grad, ref[ch.v][0])
        torch.testing.assert_close(ch.layer.bias.grad, ref[ch.v][1])


def test_chunks_that_do_not_fit_the_schedule_are_refused():
    chunks = [ToyChunk(c, 2, 2) for c in range(2)]
    with pytest.raises(ValueError, match="not a gpipe, 1f1b or interleaved schedule"):
        run_schedule(build_schedule("interleaved", 1, 2, 2, 0)[::-1], Topology.single(), chunks, 2)
    with pytest.raises(ValueError, match="chunk 1 of pp rank 0 is virtual stage 1 of 2: first should be False"):
        run_schedule(build_schedule("interleaved", 1, 2, 2, 0), Topology.single(), [chunks[0], chunks[0]], 2)


TIMEOUT_S = 2


def _dead_peer(rank, world, how):
    """Rank 1 (the last stage) exits, or stays alive and silent, instead of running its part of the schedule;
    rank 0 must fail within the pp group's timeout."""
    topo = Topology.build(ParallelDims(world=world, pp=world), timeout_s=TIMEOUT_S)
    torch.distributed.barrier()
    if rank == 1:
        if how == "exits":
            os._exit(1)
        time.sleep(TIMEOUT_S + 1)
        return None
    chunks = [ToyChunk(0, 2, 4)]
    lines = []
    t0 = time.monotonic()
    try:
        with Watchdog(topo, stall_warn_s=0.5, timeout_s=TIMEOUT_S, poll_s=0.2, say=lines.append):
            run_schedule(build_schedule("1f1b", 2, 1, 4, 0), topo, chunks, 4)
    except RuntimeError as e:
        return time.monotonic() - t0, str(e), lines
    return time.monotonic() - t0, "no error", lines


@pytest.mark.parametrize("how", ["exits", "silent"])
def test_a_dead_or_silent_peer_fails_its_neighbour_within_the_timeout(how):
    results = run_ranks(_dead_peer, 2, how, timeout=60, may_die=(1,))
    waited, message, lines = results[0]
    assert message != "no error"
    assert waited < TIMEOUT_S + 2, f"rank 0 waited {waited:.1f}s (timeout {TIMEOUT_S}s): {message}"
    assert "pipeline send activation (stage 0, micro 0) to rank 1" in message, message
    if how == "silent":               # the watchdog named the stalled transfer before the timeout ended it
        assert any("send_recv" in line and "pipeline send activation (stage 0, micro 0)" in line for line in lines), lines
