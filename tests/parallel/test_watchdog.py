"""The watchdog names a stalled collective (which one, where, who has not arrived), and debug-sync stops a
desynced all-to-all on every member instead of letting it hang. Two gloo ranks each, tiny tensors."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch

from distributed import run_ranks
from moe_dist.parallel import comm
from moe_dist.parallel.topology import ParallelDims, Topology
from moe_dist.parallel.watchdog import Watchdog


def _topo(world: int, ep: int = 1) -> Topology:
    return Topology.build(ParallelDims(world=world, ep=ep), timeout_s=60)


def _late_rank(rank, world):
    """Rank 1 computes for 3 s before joining an all-reduce that rank 0 entered at once."""
    topo = _topo(world)
    lines = []
    with Watchdog(topo, stall_warn_s=1.0, timeout_s=60, poll_s=0.2, say=lines.append):
        comm.barrier(topo.world)                        # both watchdogs have published once the barrier returns
        time.sleep(0.5)
        with comm.where(step=3, layer="blocks.1.mlp"):
            if rank == 1:
                time.sleep(3.0)
            x = torch.ones(4)
            comm.all_reduce_(x, topo.world)
    return lines, float(x[0])


def test_rank_zero_names_the_collective_the_place_and_the_late_rank():
    (lines0, total0), (lines1, total1) = run_ranks(_late_rank, 2, timeout=120)
    assert total0 == total1 == 2.0                      # the collective completed: the watchdog only reports
    assert lines0, "rank 0 reported nothing although it waited 3 s with stall_warn_s=1"
    first = lines0[0]
    assert first.startswith("moe-dist: watchdog: all_reduce #")
    assert "(step 3, blocks.1.mlp)" in first
    assert "not arrived: rank 1 (computing (step 3, blocks.1.mlp)" in first
    assert "parallel.timeout_s ends the run in" in first
    assert lines1 == []                                 # rank 1 was never inside a stalled collective


def _frozen_rank(rank, world):
    """Rank 1 stops itself (SIGSTOP: every thread, its watchdog included); rank 0's report says it stopped
    reporting, and the test's report callback resumes it (SIGCONT) so that the run completes."""
    topo = _topo(world)
    pids = [None, None]
    torch.distributed.all_gather_object(pids, os.getpid())
    lines = []

    def say(line):
        lines.append(line)
        if "frozen or dead" in line:
            os.kill(pids[1], signal.SIGCONT)

    with Watchdog(topo, stall_warn_s=1.0, timeout_s=60, poll_s=0.2, say=say):
        comm.barrier(topo.world)
        time.sleep(0.5)
        with comm.where(step=7):
            if rank == 1:
                os.kill(os.getpid(), signal.SIGSTOP)
            x = torch.ones(2)
            comm.all_reduce_(x, topo.world)
    return lines


def test_a_frozen_rank_is_named_as_no_longer_reporting():
    lines0, _ = run_ranks(_frozen_rank, 2, timeout=120)
    frozen = [line for line in lines0 if "frozen or dead" in line]
    assert frozen, f"no report named the frozen rank: {lines0}"
    assert "rank 1 (no report for" in frozen[0] and "(step 7)" in frozen[0]


def _desync(rank, world, enabled):
    topo = _topo(world, ep=2)
    x = torch.arange(8.0).view(4, 2)
    send = [2, 2]
    recv = [2, 2] if rank == 0 else [3, 2]              # rank 1 expects 3 rows from rank 0, which sends 2
    with comm.debug_sync(enabled), comm.where(step=5, layer="blocks.2.mlp"):
        try:
            comm.all_to_all(x, send, recv, topo.ep)
        except comm.DesyncError as e:
            return str(e)
    return None


def test_debug_sync_stops_every_member_at_a_split_mismatch_naming_ranks_and_layer():
    msgs = run_ranks(_desync, 2, True, timeout=120)
    for m in msgs:
        assert m is not None
        assert "rank 0 sends 2 rows to rank 1, which expects 3" in m
        assert "rank 0: step 5, blocks.2.mlp" in m and "rank 1: step 5, blocks.2.mlp" in m


def _agreeing(rank, world):
    """A consistent all-to-all under debug_sync: forward and backward pass their checks; the labels follow
    the forward into backward."""
    topo = _topo(world, ep=2)
    seen = []
    x = torch.arange(6.0, requires_grad=True).view(3, 2) + rank
    send = [1, 2] if rank == 0 else [2, 1]          # rows to rank 0, rows to rank 1
    recv = send                                     # each receives what the other sends it (2 ranks, symmetric)
    with comm.observe_collectives(lambda c: seen.append((c.op, dict(comm._PROGRESS.where)))):
        with comm.debug_sync(True):
            with comm.where(step=1, layer="blocks.0.mlp"):
                y = comm.all_to_all(x, send, recv, topo.ep)
            y.sum().backward()                      # outside the forward's labels, as in a training step
    return [op for op, _ in seen], [w.get("phase") for _, w in seen]


def test_debug_sync_passes_a_consistent_all_to_all_and_labels_backward():
    (ops0, phases0), _ = run_ranks(_agreeing, 2, timeout=120)
    # forward: digest all_gather + all_to_all; backward: digest + all_to_all, labelled as backward
    assert ops0 == ["all_gather", "all_to_all", "all_gather", "all_to_all"]
    assert phases0 == [None, None, "backward", "backward"]


def test_where_labels_nest_and_restore():
    with comm.where(step=1):
        with comm.where(layer="blocks.0.mlp"):
            assert comm._PROGRESS.where == {"step": 1, "layer": "blocks.0.mlp"}
        assert comm._PROGRESS.where == {"step": 1}
    assert comm._PROGRESS.where == {}


@pytest.mark.parametrize("labels, text", [({}, "outside any labelled step"),
                                          ({"step": 2, "layer": "blocks.1.mlp", "phase": "backward"},
                                           "step 2, blocks.1.mlp, backward")])
def test_places_are_described_for_people(labels, text):
    assert comm._describe_where(labels) == text


def _late_stage(rank, world):
    """pp=2: stage 0 waits for an activation that stage 1 sends only after 3 s of computing."""
    topo = Topology.build(ParallelDims(world=world, pp=2), timeout_s=60)
    lines = []
    buf = torch.full((3,), float(rank))
    with Watchdog(topo, stall_warn_s=1.0, timeout_s=60, poll_s=0.2, say=lines.append):
        comm.barrier(topo.world)
        time.sleep(0.5)
        with comm.where(step=4, stage=1 - rank, micro=2):
            if rank == 1:
                with comm.where(phase="forward"):
                    time.sleep(3.0)
            op = "recv" if rank == 0 else "send"
            with comm.where(kind=f"{op} activation", phase=f"pipeline {op} activation (stage 1, micro 2)"):
                comm.exchange([comm.PeerOp(op, buf, 1 - rank)], topo.pp)
    return lines, buf.tolist()


def test_a_stalled_pipeline_receive_is_named_with_its_place_and_what_the_peer_does():
    (lines0, got0), (lines1, _) = run_ranks(_late_stage, 2, timeout=120)
    assert got0 == [1.0, 1.0, 1.0]                       # the transfer completed: the watchdog only reports
    assert lines0, "rank 0 reported nothing although its receive waited 3 s with stall_warn_s=1"
    first = lines0[0]
    assert re.match(r"moe-dist: watchdog: send_recv #\d+ with ranks \[0, 1\] \(step 4, pipeline recv activation "
                    r"\(stage 1, micro 2\)\) has made no progress for", first), first
    assert "its peers: rank 1 (computing (step 4, stage 0, micro-batch 2, forward))" in first
    assert "parallel.timeout_s ends the run in" in first
    assert lines1 == []
