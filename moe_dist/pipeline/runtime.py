"""Run a pipeline schedule (moe_dist.pipeline.schedules) on this rank's model chunks.

For each entry of the schedule's point-to-point plan (`schedules.exchanges`) the runtime posts one batch of
sends and receives through `moe_dist.parallel.comm.exchange` (the watchdog and observers see it; a dead peer
ends the receive within parallel.timeout_s), waits for it, then runs the entry's actions:

    F(micro, chunk)   input = the activation received from the previous virtual stage (requires_grad_),
                      or nothing on virtual stage 0; output = chunk.forward(micro, input); the output is sent
                      to the next virtual stage in the next batch, or is the scalar loss on the last one.
    B(micro, chunk)   backward of the output with the gradient received from the next virtual stage (of the
                      loss on the last one); the input's gradient is sent back in the next batch; the input and
                      output are released, so a rank holds the activations of the schedule's in-flight
                      micro-batches only (`schedules.in_flight`).

Hand-overs between two chunks of one rank (pp = 1 with several chunks) stay local. Every transfer is labelled
with `comm.where(stage=<virtual stage>, micro=…, kind=…, phase=…)`, every forward and backward with its
stage, micro-batch and phase, so a stalled MoE collective or transfer names its place.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch

from moe_dist.parallel import comm
from moe_dist.parallel.topology import Topology
from moe_dist.pipeline.schedules import Action, Transfer, exchanges, forward_schedule, kind_of


class StageChunk(Protocol):
    """One local model chunk (virtual stage) as the runtime drives it; implemented by the model's owner."""
    first: bool             # holds virtual stage 0: its input is the token ids, nothing is received
    last: bool              # holds the last virtual stage: forward returns the scalar loss, nothing is sent
    dtype: torch.dtype      # the wire dtype, the same on every chunk of the model: activations are sent in it
                            # (an autocast output is cast), gradients come back in it
    # Optional: `device` (torch.device or str), where received tensors are allocated; CPU without it.

    def forward(self, micro: int, inp: Optional[torch.Tensor]) -> torch.Tensor:
        """Not last: the activation to send (requires grad). Last: the micro-batch's scalar loss, already
        scaled by 1/micro_batches, auxiliary losses attached."""
        ...

    def activation_shape(self) -> tuple[int, ...]:
        """The shape of the activation the previous chunk sends to this one."""
        ...


def _tag(t: Transfer, n_stages: int) -> int:
    """The same number at both ends of one message (gloo matches by peer and tag)."""
    return (t.micro * n_stages + t.stage) * 2 + (t.what == "gradient")


def _device(chunk: StageChunk) -> torch.device:
    # Optional attribute: chunks on an accelerator say where received tensors go.
    return torch.device(getattr(chunk, "device", "cpu"))


def _describe(batch: Sequence[Transfer], pp_ranks: Sequence[int]) -> str:
    return " + ".join(f"{t.op} {t.what} (stage {t.stage}, micro {t.micro}) {'to' if t.op == 'send' else 'from'} "
                      f"rank {pp_ranks[t.peer]}" for t in batch)


def _check_chunks(topo: Topology, chunks: Sequence[StageChunk]) -> tuple[int, int, int]:
    pp, r, virtual = topo.pp.size, topo.pp.rank, len(chunks)
    if virtual < 1:
        raise ValueError("no model chunks on this rank")
    for c, chunk in enumerate(chunks):
        v = r + c * pp
        if bool(chunk.first) != (v == 0) or bool(chunk.last) != (v == pp * virtual - 1):
            raise ValueError(f"chunk {c} of pp rank {r} is virtual stage {v} of {pp * virtual}: first should be "
                             f"{v == 0} and last {v == pp * virtual - 1}, got first={chunk.first} last={chunk.last}")
    return pp, r, virtual


class _Runner:
    """The state of one pipeline step on one rank: received tensors not consumed yet, results not sent yet,
    and the inputs/outputs of the micro-batches in flight."""

    def __init__(self, topo: Topology, chunks: Sequence[StageChunk], grad: bool):
        self.topo, self.chunks, self.grad = topo, chunks, grad
        self.pp, self.rank = topo.pp.size, topo.pp.rank
        self.n_stages = self.pp * len(chunks)
        self.inbox: dict[tuple[str, int, int], torch.Tensor] = {}     # received, keyed by Transfer.key
        self.outbox: dict[tuple[str, int, int], torch.Tensor] = {}    # to send, keyed by Transfer.key
        self.inputs: dict[tuple[int, int], Optional[torch.Tensor]] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.losses: dict[int, torch.Tensor] = {}

    def stage(self, chunk: int) -> int:
        return self.rank + chunk * self.pp

    def post(self, batch: Sequence[Transfer], label: tuple[int, int]) -> None:
        """Send what the previous actions produced, receive what the next ones need (one exchange)."""
        ops, received = [], []
        for t in batch:
            tag = _tag(t, self.n_stages)
            peer = self.topo.pp.ranks[t.peer]
            if t.op == "send":
                ops.append(comm.PeerOp("send", self.outbox.pop(t.key), peer, tag))
                continue
            if t.what == "activation":
                chunk = self.chunks[(t.stage + 1) // self.pp]
                buf = torch.empty(tuple(chunk.activation_shape()), dtype=chunk.dtype, device=_device(chunk))
            else:                                  # the gradient of our output of stage t.stage − 1
                chunk = self.chunks[(t.stage - 1) // self.pp]
                out = self.outputs[((t.stage - 1) // self.pp, t.micro)]
                buf = torch.empty(out.shape, dtype=chunk.dtype, device=out.device)
            ops.append(comm.PeerOp("recv", buf, peer, tag))
            received.append((t.key, buf))
        if not ops:
            return
        stage, micro = label
        kind = _describe(batch, self.topo.pp.ranks)
        with comm.where(stage=stage, micro=micro, kind=kind, phase=f"pipeline {kind}"):
            try:
                comm.exchange(ops, self.topo.pp)
            except RuntimeError as e:        # gloo's timeout or closed connection: say which transfer
                raise type(e)(f"pipeline {kind} failed on rank {self.topo.rank} (pp stage {self.rank}): {e}") from e
        self.inbox.update(received)

    def hand_over(self, key: tuple[str, int, int], value: torch.Tensor, to_chunk_of_this_rank: bool) -> None:
        if to_chunk_of_this_rank:              # pp = 1: the next (or previous) stage is a chunk of this rank
            self.inbox[key] = value
        else:
            self.outbox[key] = value.contiguous()

    def forward(self, a: Action) -> None:
        chunk, v = self.chunks[a.chunk], self.stage(a.chunk)
        inp = None
        if not chunk.first:
            inp = self.inbox.pop(("activation", v - 1, a.micro))
            if self.grad:
                inp.requires_grad_()
        with comm.where(stage=v, micro=a.micro, phase="forward"):
            out = chunk.forward(a.micro, inp)
        if self.grad:
            self.inputs[(a.chunk, a.micro)] = inp
            self.outputs[(a.chunk, a.micro)] = out
        if chunk.last:
            if out.numel() != 1:
                raise ValueError(f"the last stage's forward must return the scalar loss, got shape {tuple(out.shape)}")
            self.losses[a.micro] = out.detach()
            return
        # On the wire in the chunks' dtype, whatever autocast made of the output: the receiver allocated that.
        self.hand_over(("activation", v, a.micro), out.detach().to(chunk.dtype), (v + 1) % self.pp == self.rank)

    def backward(self, a: Action) -> None:
        chunk, v = self.chunks[a.chunk], self.stage(a.chunk)
        out = self.outputs.pop((a.chunk, a.micro))
        inp = self.inputs.pop((a.chunk, a.micro), None)
        with comm.where(stage=v, micro=a.micro, phase="backward"):
            if chunk.last:
                torch.autograd.backward(out)
            else:
                torch.autograd.backward(out, self.inbox.pop(("gradient", v + 1, a.micro)))
        del out
        if not chunk.first:
            g = inp.grad if inp.grad is not None else torch.zeros_like(inp)
            self.hand_over(("gradient", v, a.micro), g, (v - 1) % self.pp == self.rank)

    def run(self, kind: str, actions: Sequence[Action]) -> None:
        plan = exchanges(kind, actions, self.rank, self.pp, len(self.chunks))
        last = actions[-1] if actions else Action("F", 0, 0)
        for batch, group in plan:
            nxt = group[0] if group else last
            self.post(batch, (self.stage(nxt.chunk), nxt.micro))
            for a in group:
                if a.kind == "F":
                    self.forward(a)
                else:
                    self.backward(a)
        leftover = [*self.inbox, *self.outbox]
        if leftover or (self.grad and self.outputs):
            raise RuntimeError(f"pipeline step ended with transfers or activations left: {leftover} "
                               f"{sorted(self.outputs)}")


def run_schedule(actions: Sequence[Action], topo: Topology, chunks: Sequence[StageChunk],
                 micro_batches: int) -> None:
    """Forward and backward of `micro_batches` micro-batches through this rank's `chunks` (indexed by local chunk
    c = virtual stage (v − pp rank) / pp) in the order of `actions` (build_schedule(kind, topo.pp.size,
    len(chunks), micro_batches, topo.pp.rank)). Every rank of topo.pp calls it at the same time. Gradients
    accumulate in the chunks' parameters; the losses stay with the chunks (the last stage's forward made them)."""
    pp, r, virtual = _check_chunks(topo, chunks)
    kind = kind_of(actions, pp, virtual, micro_batches, r)
    _Runner(topo, chunks, grad=True).run(kind, list(actions))


def run_forward(topo: Topology, chunks: Sequence[StageChunk], micro_batches: int) -> list[Optional[torch.Tensor]]:
    """Forward only, without autograd (evaluation): the losses of the `micro_batches` micro-batches on the rank
    that holds the last virtual stage, None for each elsewhere."""
    pp, r, virtual = _check_chunks(topo, chunks)
    runner = _Runner(topo, chunks, grad=False)
    with torch.no_grad():
        runner.run("gpipe", forward_schedule(pp, virtual, micro_batches, r))
    return [runner.losses.get(m) for m in range(micro_batches)]
