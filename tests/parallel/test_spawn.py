"""moe_dist.parallel.spawn: the one free-port helper (package and tests), and spawned ranks that keep their own
rendezvous store when the parent was started by torchrun."""
import socket

import pytest

from moe_dist.parallel.spawn import RanksFailed, free_port, run_ranks


@pytest.mark.parametrize("host", ["127.0.0.1", ""])
def test_free_port_can_be_bound_on_its_host(host):
    port = free_port(host=host)
    with socket.socket() as s:
        s.bind((host, port))  # "" is every interface: what a store that other nodes reach listens on


def test_free_port_in_a_range():
    ports = {free_port(20000, 20100) for _ in range(20)}
    assert all(20000 <= p < 20100 for p in ports)
    assert len(ports) > 1  # drawn at random, not the first free one every time


@pytest.mark.parametrize("lo, hi", [(20000, None), (None, 30000), (30000, 20000), (0, 100), (60000, 70000)])
def test_free_port_refuses_bad_bounds(lo, hi):
    with pytest.raises(ValueError, match=rf"free_port\(lo={lo}, hi={hi}\): give both bounds with "
                                         r"0 < lo < hi <= 65536, or neither"):
        free_port(lo, hi)


def test_free_port_says_when_the_range_is_full():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"no free port on 127.0.0.1 in \[{port}, {port + 1}\) after 200 tries"):
            free_port(port, port + 1)


def _sum_of_ranks(rank, world):
    import torch
    import torch.distributed as dist
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return t.item()


def test_ranks_spawned_under_torchrun_serve_their_own_store(monkeypatch):
    # A parent started by torchrun carries TORCHELASTIC_USE_AGENT_STORE=True. Passed on, it would make torch's
    # env:// rendezvous turn the spawned rank 0 into a client too, and every rank would wait for a store that
    # nobody serves on the spawned group's port until the timeout.
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    try:
        assert run_ranks(_sum_of_ranks, 2, timeout_s=180, collective_timeout_s=20) == [3.0, 3.0]
    except RanksFailed as e:
        raise AssertionError(str(e)) from None
