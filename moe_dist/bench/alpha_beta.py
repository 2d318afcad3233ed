"""The step-time model behind `moe-dist bench scaling`: compute at named throughputs plus an alpha-beta
(latency + bytes/bandwidth) model of the collectives, with intra-node and inter-node links as named inputs.

    step = compute + 4·L_moe·a2a(bytes_sent) + ETP gathers + TP collectives
           + (DP gradient all-reduce unless overlapped)
    a2a(b)        = alpha_link + max(b_intra / B_intra, b_inter / B_inter)
                    a rank sends b bytes split evenly over its ep-1 peers; the peers on its node take the
                    NVLink share, the others the NIC share, and both go at once (NCCL posts every send);
                    alpha_link is the inter-node latency as soon as one peer is off the node
    all_reduce(b) = 2·(n-1)·alpha + 2·(n-1)/n·b / B   (ring), over the slowest link the group spans
    all_gather(b) = (n-1)·alpha + (n-1)/n·b / B       (ring; b = the gathered output)
    compute       = dense FLOPs / dense_tflops + expert FLOPs / expert_tflops

TP collectives (`tp_collectives`, counted from the code, not assumed): Megatron f/g operators on the
[T, D] activations of a dp rank's micro-batch (T = batch_size·seq_len), per block, forward + backward:
    attention   wq and wkv each copy_to_group (bwd all-reduce, 2) + wo reduce_from_group (fwd all-reduce, 1)
    dense MLP   w_in copy_to_group (bwd all-reduce) + w_out reduce_from_group (fwd all-reduce)
    MoE layer   split_rows (bwd all-gather of [T, D]) + gather_rows (fwd all-gather of [T, D]); the
                load-balancing counts (E+1 int64, fwd all-reduce) when balance_over=micro_batch
under activation checkpointing wo's all-reduce and the counts run again (torch stops the recompute at the
last tensor saved for backward, before the block's final collective); all of it once per micro-batch; then once per step
the tp-partial gradients (router, shared experts, fp32) and the gradient norm's tp part (one fp32).
They are on the critical path (no overlap modelled), over the tp group's link (NVLink while tp ≤ a node).

FLOPs per rank and step (training = 3x forward; each matmul row costs 2 FLOPs per weight):
    dense   6·T·(dense weights used per token, over tp) + 12·L·T·S·D/tp  (attention scores and values,
            counted in full like Megatron's MFU formula; the input embedding is a lookup, not a matmul)
    experts 6·R·D·w(F)/etp·etp per MoE layer, R = rows the rank's experts run (`plan.alltoall_rows_per_layer`
            'kept', uniform routing), w(F) = 3F for SwiGLU
Bytes come from `moe_dist.plan` (rows per layer under uniform routing), so the model and `moe-dist plan`
cannot disagree. Not modelled: pipeline bubbles, overlap of all-to-all with compute, kernel efficiency
below the named throughputs (attention, norms, permute), load imbalance.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moe_dist.config import Config
from moe_dist.models.gpt import is_moe_layer
from moe_dist.parallel.topology import ParallelDims
from moe_dist.plan import DTYPE_BYTES, _shared_hidden, _width, alltoall_rows_per_layer, param_counts


@dataclass(frozen=True, kw_only=True)
class Network:
    """Per-GPU link figures. Defaults: H100 SXM NVLink 4 (900 GB/s bidirectional = 450 GB/s each way) and one
    400 Gb/s InfiniBand NIC per GPU (50 GB/s each way); latencies are typical NCCL small-message figures."""
    gpus_per_node: int = 8
    intra_gbps: float = 450.0          # GB/s one direction, per GPU
    inter_gbps: float = 50.0           # GB/s one direction, per GPU
    intra_latency_us: float = 3.0
    inter_latency_us: float = 10.0


@dataclass(frozen=True, kw_only=True)
class Compute:
    """Sustained throughputs (TFLOP/s). Defaults: H100 bf16, grouped GEMM at Mixtral shapes ≈ 600 and dense
    GEMM ≈ 720 (our measurements)."""
    expert_tflops: float = 600.0
    dense_tflops: float = 720.0


def _span(group_stride: int, size: int, gpus_per_node: int) -> tuple[int, int]:
    """(peers on my node, peers off it) for a group of `size` ranks `group_stride` apart (Megatron order:
    tp fastest, then ep), ranks filling nodes in order."""
    per_node = max(1, min(size, gpus_per_node // group_stride)) if group_stride <= gpus_per_node else 1
    return per_node - 1, size - per_node


def alltoall_seconds(bytes_sent: float, ep: int, tp: int, net: Network) -> float:
    if ep <= 1 or bytes_sent <= 0:
        return 0.0
    intra, inter = _span(tp, ep, net.gpus_per_node)
    per_peer = bytes_sent / (ep - 1)
    alpha = (net.inter_latency_us if inter else net.intra_latency_us) * 1e-6
    return alpha + max(per_peer * intra / (net.intra_gbps * 1e9), per_peer * inter / (net.inter_gbps * 1e9))


def allreduce_seconds(nbytes: float, n: int, stride: int, net: Network) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    _, inter = _span(stride, n, net.gpus_per_node)
    bw, lat = ((net.inter_gbps, net.inter_latency_us) if inter else (net.intra_gbps, net.intra_latency_us))
    return 2 * (n - 1) * lat * 1e-6 + 2 * (n - 1) / n * nbytes / (bw * 1e9)


def flops_per_rank(cfg: Config, dims: ParallelDims) -> dict[str, float]:
    """Training FLOPs one rank does in one step, split dense / experts (see the module docstring)."""
    m, e, t = cfg.model, cfg.moe, cfg.train
    T, S = t.batch_size * t.seq_len, t.seq_len
    p = param_counts(cfg, dims)
    embed = m.vocab_size * m.dim              # the input lookup, replicated; the head (if untied) is a matmul
    n_moe = sum(is_moe_layer(m, i) for i in range(m.n_layers))
    dense = 6 * T * (p.dense - embed - n_moe * e.num_experts * m.dim) + 12 * m.n_layers * T * S * m.dim / dims.tp
    router = 6 * alltoall_rows_per_layer(cfg, dims)["tokens"] * e.num_experts * m.dim * n_moe
    rows = alltoall_rows_per_layer(cfg, dims)["kept"]
    experts = 6 * rows * m.dim * _width(e.expert_hidden, e.activation) * n_moe
    return {"dense": dense + router, "experts": experts}


def model_flops_per_token(cfg: Config) -> float:
    """Model FLOPs of one token (fwd+bwd) on one process, the numerator of TFLOPS/GPU and MFU figures."""
    one = ParallelDims(world=1)
    f = flops_per_rank(cfg, one)
    return (f["dense"] + f["experts"]) / (cfg.train.batch_size * cfg.train.seq_len)


@dataclass(frozen=True)
class TpCollectives:
    """Tensor-parallel collectives of one rank and one training step. Bytes are each call's tensor
    (all-reduce) or gathered output (all-gather), summed over calls."""
    all_reduce_calls: int = 0
    all_reduce_bytes: float = 0.0
    all_gather_calls: int = 0
    all_gather_bytes: float = 0.0

    @property
    def calls(self) -> int:
        return self.all_reduce_calls + self.all_gather_calls

    @property
    def bytes(self) -> float:
        return self.all_reduce_bytes + self.all_gather_bytes


def tp_collectives(cfg: Config, dims: ParallelDims) -> TpCollectives:
    """Every collective this code runs over the tp group in one `Trainer.train_step` (see the module
    docstring for where each comes from); zero when tp = 1. `test_bench_scaling` checks it against the
    calls counted on gloo ranks."""
    if dims.tp <= 1:
        return TpCollectives()
    m, e, t = cfg.model, cfg.moe, cfg.train
    n_moe = sum(is_moe_layer(m, i) for i in range(m.n_layers))
    n_dense = m.n_layers - n_moe
    act = t.batch_size * t.seq_len * m.dim * DTYPE_BYTES[t.dtype]        # one [T, D] activation
    fwd_ar = m.n_layers + n_dense                                         # wo, dense w_out
    bwd_ar = 2 * m.n_layers + n_dense                                     # wq, wkv, dense w_in
    counts_ar = n_moe if (e.aux_loss_coef > 0 and e.aux_loss_type == "global"
                          and e.balance_over == "micro_batch") else 0
    # Activation checkpointing (torch's non-reentrant checkpoint, which stops recomputing once the last
    # tensor saved for backward is back): attention's wo all-reduce and the load-balancing counts rerun; the
    # block's last collective (dense w_out all-reduce, MoE gather_rows) feeds only the residual add and does not.
    re_ar = (m.n_layers + counts_ar) if t.recompute == "block" else 0
    micro = t.grad_accum_steps
    ar_calls = micro * (fwd_ar + counts_ar + re_ar + bwd_ar)
    ar_bytes = micro * ((fwd_ar + bwd_ar + (m.n_layers if re_ar else 0)) * act
                        + (counts_ar + (counts_ar if re_ar else 0)) * 8 * (e.num_experts + 1))
    ag_calls = micro * 2 * n_moe                                          # gather_rows fwd, split_rows bwd
    ag_bytes = ag_calls * act
    # Once per step: tp-partial grads (router E·D, shared experts) in one flat fp32 buffer, and the norm.
    partial = n_moe * (e.num_experts * m.dim + m.dim * _width(_shared_hidden(e), e.activation))
    ar_calls += 2
    ar_bytes += 4 * partial + 4
    return TpCollectives(ar_calls, float(ar_bytes), ag_calls, float(ag_bytes))


def allgather_seconds(nbytes: float, n: int, stride: int, net: Network) -> float:
    """Ring all-gather of `nbytes` of output over n ranks `stride` apart."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    _, inter = _span(stride, n, net.gpus_per_node)
    bw, lat = ((net.inter_gbps, net.inter_latency_us) if inter else (net.intra_gbps, net.intra_latency_us))
    return (n - 1) * lat * 1e-6 + (n - 1) / n * nbytes / (bw * 1e9)


def tp_seconds(tc: TpCollectives, tp: int, net: Network) -> float:
    """The step's TP collectives over the tp group (adjacent ranks, stride 1). Calls of one kind have the
    same size except the few small ones, so each call is costed at the mean size of its kind: exact for
    the bandwidth term, and the latency term counts every call."""
    ar = (tc.all_reduce_calls * allreduce_seconds(tc.all_reduce_bytes / tc.all_reduce_calls, tp, 1, net)
          if tc.all_reduce_calls else 0.0)
    ag = (tc.all_gather_calls * allgather_seconds(tc.all_gather_bytes / tc.all_gather_calls, tp, 1, net)
          if tc.all_gather_calls else 0.0)
    return ar + ag


@dataclass(frozen=True)
class StepEstimate:
    compute_s: float
    alltoall_s: float
    dp_allreduce_s: float          # exposed part only (0 when overlapped)
    step_s: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    alltoall_share: float
    tp_s: float = 0.0              # tensor-parallel activation (and tp-partial gradient) collectives


def estimate(cfg: Config, dims: ParallelDims, net: Network = Network(), comp: Compute = Compute(),
             overlap_dp: bool = True) -> StepEstimate:
    """One training step of `cfg` on the layout `dims` (batch_size is per dp rank)."""
    m, t = cfg.model, cfg.train
    f = flops_per_rank(cfg, dims)
    compute = f["dense"] / (comp.dense_tflops * 1e12) + f["experts"] / (comp.expert_tflops * 1e12)
    b = DTYPE_BYTES[t.dtype]
    rows = alltoall_rows_per_layer(cfg, dims)
    n_moe = sum(is_moe_layer(m, i) for i in range(m.n_layers))
    a2a = 4 * n_moe * alltoall_seconds(rows["sent"] * m.dim * b, dims.ep, dims.tp, net)
    # ETP all-gather and reduce-scatter, forward and backward: each moves the `etp_gathered` rows into the rank
    # over the group's link (adjacent ranks, so NVLink unless etp·tp exceeds a node).
    _, off = _span(dims.tp, dims.etp, net.gpus_per_node)
    bw, lat = (net.inter_gbps, net.inter_latency_us) if off else (net.intra_gbps, net.intra_latency_us)
    etp = 4 * n_moe * (lat * 1e-6 + rows["etp_gathered"] * m.dim * b / (bw * 1e9)) if dims.etp > 1 else 0.0
    p = param_counts(cfg, dims)
    # Dense grads over dp, expert grads over edp; ranks of one dp group are tp·… apart (stride tp).
    dp = allreduce_seconds(p.dense * b, dims.dp, dims.tp, net) + \
        allreduce_seconds(p.expert * b, dims.edp, dims.tp * dims.ep * dims.etp, net)
    exposed_dp = 0.0 if overlap_dp else dp
    tp = tp_seconds(tp_collectives(cfg, dims), dims.tp, net)
    step = compute + a2a + etp + tp + exposed_dp
    tokens_gpu = t.batch_size * t.seq_len * dims.dp / dims.world / step
    return StepEstimate(compute, a2a + etp, exposed_dp, step, tokens_gpu,
                        tokens_gpu * model_flops_per_token(cfg) / 1e12, (a2a + etp) / step, tp)


def with_layout(cfg: Config, *, tp: int = 1, ep: int = 1, etp: int = 1, batch_size: int | None = None,
                num_experts: int | None = None) -> Config:
    return dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, tp=tp, ep=ep, etp=etp),
        moe=dataclasses.replace(cfg.moe, num_experts=num_experts or cfg.moe.num_experts),
        train=dataclasses.replace(cfg.train, batch_size=batch_size or cfg.train.batch_size))


# --- the CPU fit: gloo ranks sharing a few cores ----------------------------------------------------------

@dataclass(frozen=True)
class CpuFit:
    """Measured-point model for gloo CPU ranks with one thread each:
        step(N) = compute_1 · work_ratio · max(1, N / cores) + a2a_calls·alpha + bytes/beta
                  + tp_calls·tp_alpha + tp_bytes/tp_beta
    compute_1 is the 1-rank step time (no all-to-all there), work_ratio the rank's FLOPs relative to the
    1-rank run, max(1, N/cores) the core-sharing slowdown once ranks outnumber cores; alpha and beta are
    least-squares fits to the measured all-to-all seconds (so the line passes near the measured points by
    construction there, and anything beyond them is extrapolation). tp_alpha/tp_beta cost the tensor-parallel
    collectives (`tp_collectives`); `fit_tp` says where they come from."""
    compute_1: float
    cores: int
    alpha_s: float
    beta_bytes_per_s: float
    tp_alpha_s: float = 0.0
    tp_beta_bytes_per_s: float = 0.0

    def step(self, n: int, work_ratio: float, a2a_calls: float, a2a_bytes: float,
             tp_calls: float = 0.0, tp_bytes: float = 0.0) -> float:
        comm = a2a_calls * self.alpha_s + (a2a_bytes / self.beta_bytes_per_s if self.beta_bytes_per_s else 0.0)
        comm += tp_calls * self.tp_alpha_s + (tp_bytes / self.tp_beta_bytes_per_s if self.tp_beta_bytes_per_s else 0.0)
        return self.compute_1 * work_ratio * max(1.0, n / self.cores) + comm


def fit_tp(points: list[tuple[float, float, float]], a2a_alpha: float, a2a_beta: float) -> tuple[float, float, str]:
    """(alpha, beta, method) for the TP collectives from measured (calls, bytes, seconds):
    'fitted' when the points determine both (two different calls/bytes ratios and a non-negative solution),
    'fitted, latency only' / 'bandwidth only' when they do but one term would be negative;
    'beta fitted, alpha from the all-to-all fit' when they only fix one number (e.g. equal sizes at every
    point): the all-to-all's per-call latency, and the bandwidth that explains what is left; 'all-to-all fit
    reused' with no TP point measured (or nothing left to explain)."""
    import numpy as np
    pts = [p for p in points if p[0] > 0]
    if pts:
        A = np.array([[c, b] for c, b, _ in pts], dtype=float)
        if np.linalg.matrix_rank(A) == 2:
            # fit_alpha_beta keeps both terms non-negative; when the data want a negative one it puts
            # everything on the other (the times do not grow with bytes: latency only, and vice versa).
            alpha, beta = fit_alpha_beta(pts)
            if alpha > 0 and beta > 0:
                return alpha, beta, "fitted"
            if alpha > 0 or beta > 0:
                return alpha, beta, "fitted, " + ("latency only" if alpha > 0 else "bandwidth only")
        rest = sum(s - c * a2a_alpha for c, _, s in pts)
        if rest > 0:
            return a2a_alpha, sum(b for _, b, _ in pts) / rest, "beta fitted, alpha from the all-to-all fit"
    return a2a_alpha, a2a_beta, "all-to-all fit reused"


def fit_alpha_beta(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(alpha seconds per call, beta bytes/s) from (calls, bytes, seconds) by non-negative least squares over
    the two unknowns (alpha, 1/beta); with fewer than two informative points beta comes from the mean."""
    import numpy as np
    pts = [p for p in points if p[0] > 0]
    if not pts:
        return 0.0, 0.0
    A = np.array([[c, b] for c, b, _ in pts], dtype=float)
    y = np.array([s for _, _, s in pts], dtype=float)
    sol, *_ = np.linalg.lstsq(A, y, rcond=None)
    alpha, inv_beta = float(sol[0]), float(sol[1])
    if alpha < 0 or inv_beta <= 0:             # not identifiable: one term carries it all
        if inv_beta <= 0:
            alpha, inv_beta = float(np.sum(y) / np.sum(A[:, 0])), 0.0
        else:
            alpha, inv_beta = 0.0, float(np.sum(y) / np.sum(A[:, 1]))
    return alpha, (1.0 / inv_beta if inv_beta > 0 else 0.0)
