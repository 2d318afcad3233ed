"""The step-time model behind `moe-dist bench scaling` and `moe-dist plan --fit`: compute at named throughputs
plus an alpha-beta (latency + bytes/bandwidth) model of the collectives, with intra-node and inter-node links as
named inputs. Every term is explicit and every constant is named in `Compute` or `Network` with its source;
none is fitted to a training throughput the model is compared with.

One optimizer step of one rank, m = train.grad_accum_steps micro-batches:

    step = gemm + non_gemm + recompute + all_to_all + tp + dp_exposed + optimizer + bubble + pipeline_p2p
    gemm        m · (dense GEMM FLOPs / dense_tflops + expert FLOPs / expert_tflops)
    non_gemm    m · (attention core FLOPs · 1/2 (causal) / attention_tflops
                     + elementwise bytes · 3 / (hbm_tbps · memory_bound_efficiency))
                the fused attention kernel runs below GEMM speed; norms, rotary, residual adds, activations,
                permute/unpermute and the loss are memory-bound (`elementwise_bytes`: each op reads its inputs
                and writes its output once in forward; backward moves about twice that)
    recompute   m · the forward that train.recompute runs again inside backward: moe_act the experts'
                activation (memory-bound); moe the MoE layers (router, shared and routed expert GEMMs, their
                elementwise work, dispatch and combine all-to-alls, ETP gathers); block every block (all but
                the head), with its all-to-alls (its TP collectives are in `tp_collectives`)
    all_to_all  m · 4·L_moe·a2a(bytes_sent) + ETP gathers/scatters
    tp          `tp_collectives` (already per step: m micro-batches)
    dp_exposed  the part of the gradient reduction that backward does not hide (`grad_reduction`):
                shard_optimizer none: all-reduce of the fp32 gradients once per step, overlapped with the
                last micro-batch's backward; states: reduce-scatter once per step, the same overlap, then an
                all-gather of the updated w-byte weights after the optimizer step (exposed: nothing runs
                beside it); states+grads: the reduce-scatter runs in every micro-batch's backward (m times),
                then the same all-gather. Overlap: exposed = max(0, reduction - backward) + the last
                bucket's share of the reduction (backward has finished when the last bucket is full).
                overlap_dp=False exposes the whole reduction.
    optimizer   memory-bound: fp32 accumulation of each micro-batch's gradient when weights are bf16
                (10 B per element per micro-batch), then clipping and AdamW over the rank's shard (34 B per
                element with an fp32 master, 32 without)
    bubble      pipeline parallelism (p = parallel.pp stages, v = parallel.pp_virtual chunks, m micro-batches):
                every term above is the bottleneck stage's (the pp rank with the longest own step), and the
                stages idle for (p-1) slots of one micro-batch on the slowest stage (its gemm + non_gemm +
                recompute + all_to_all + tp/m), 1/v of a slot each with interleaving (`pipeline_bubble_seconds`):
                bubble share of the pipelined part (p-1)/(m+p-1) for 1F1B and GPipe, (p-1)/(v·m+p-1) interleaved.
                The stages' gradient reductions are not credited with their head start in the drain (stage s
                finishes its backward about s slots before stage 0): an upper bound. With tied embeddings and
                p > 1 the first and last stage also all-reduce the embedding's fp32 gradient (in dp_exposed).
    pipeline_p2p  2·(v·m + p - 1) · p2p(mb·S·D·w): one activation and one gradient transfer per slot of the
                critical path, not overlapped with compute; p2p(b) = alpha + b / B over the link between
                neighbouring stages (pp is the slowest axis: stages world/pp ranks apart, InfiniBand as soon as
                a stage fills a node)
    a2a(b)        = alpha_link + max(b_intra / B_intra, b_inter / B_inter)
                    a rank sends b bytes split evenly over its ep-1 peers; the peers on its node take the
                    NVLink share, the others the NIC share, and both go at once (NCCL posts every send);
                    alpha_link is the inter-node latency as soon as one peer is off the node
    all_reduce(b) = 2·(n-1)·alpha + 2·(n-1)/n·b / B   (ring), over the slowest link the group spans
    all_gather(b) = reduce_scatter(b) = (n-1)·alpha + (n-1)/n·b / B   (ring; b = the full tensor)

TP collectives (`tp_collectives`, counted from the code, not assumed): Megatron f/g operators on the
[T, D] activations of a dp rank's micro-batch (T = batch_size·seq_len), per block, forward + backward:
    attention   wq and wkv each copy_to_group (bwd all-reduce, 2) + wo reduce_from_group (fwd all-reduce, 1)
    dense MLP   w_in copy_to_group (bwd all-reduce) + w_out reduce_from_group (fwd all-reduce)
    MoE layer   split_rows (bwd all-gather of [T, D]) + gather_rows (fwd all-gather of [T, D]); the
                load-balancing counts (E+1 int64, fwd all-reduce) when balance_over=micro_batch
    qk_norm=full  the q/k sums of squares ([T, 2] fp32), one all-reduce forward and one backward
under recompute=block wo's and the qk-norm all-reduces and the counts run again, under recompute=moe the counts
(torch stops the recompute at the last tensor saved for backward, before the block's or the MoE layer's final
collective); all of it once per micro-batch; then once per step the tp-partial gradients (router, shared experts
and their gate, per-head q/k norms; fp32) and the gradient norm's tp part (one fp32).
They are on the critical path (no overlap modelled), over the tp group's link (NVLink while tp ≤ a node).

FLOPs per rank and micro-batch (training = 3x forward; each matmul row costs 2 FLOPs per weight):
    dense     6·T·(dense weights used per token, over tp), the head's 6·T·V·D included (tied or not; the input
              embedding is a lookup, not a matmul), the router on the Ts tokens the rank routes
    attention 12·L·T·S·H·Dh/tp  (scores and values, counted in full like Megatron's MFU formula)
    experts   6·R·D·w(F)/etp·etp per MoE layer, R = rows the rank's experts run (`plan.alltoall_rows_per_layer`
              'kept', uniform routing), w(F) = 3F for SwiGLU
Bytes come from `moe_dist.plan` (rows per layer under uniform routing), so the model and `moe-dist plan`
cannot disagree. Not modelled: overlap of all-to-all with compute, load imbalance, contention between the
gradient reduction and the all-to-all, kernel launch gaps, the first micro-batch's parameter all-gather
overlap that some engines do (ours runs it after the optimizer step, exposed).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moe_dist.config import Config
from moe_dist.parallel.topology import ParallelDims
from moe_dist.plan import (DTYPE_BYTES, FP32, Stage, _in_width, _shared_hidden, _width, alltoall_rows_per_layer,
                           bucket_elements, head_dim, p2p_per_step, param_counts, schedule_name,
                           shard_elements, stages, virtual_size, weight_bytes)


@dataclass(frozen=True, kw_only=True)
class Network:
    """Per-GPU link figures. Defaults: H100 SXM NVLink 4 (900 GB/s bidirectional = 450 GB/s each way, NVIDIA's
    spec) and one 400 Gb/s InfiniBand NDR NIC per GPU (50 GB/s each way, the DGX H100 layout); latencies are
    typical NCCL small-message figures."""
    gpus_per_node: int = 8
    intra_gbps: float = 450.0          # GB/s one direction, per GPU
    inter_gbps: float = 50.0           # GB/s one direction, per GPU
    intra_latency_us: float = 3.0
    inter_latency_us: float = 10.0


@dataclass(frozen=True, kw_only=True)
class Compute:
    """Sustained H100 SXM bf16 figures; each is a kernel-level measurement class or a vendor spec, not a fit
    to any training throughput.
    dense_tflops       dense GEMM at transformer shapes: cuBLAS sustains ≈ 720 of the 989 TFLOP/s dense peak
    expert_tflops      grouped GEMM at Mixtral's expert shapes (a few thousand rows per expert) ≈ 600
    attention_tflops   fused causal attention forward + backward at head dim 128, 4k tokens, on the FLOPs the
                       kernel executes (FlashAttention-2 class, the kernel behind torch's SDPA flash backend:
                       ≈ 330 forward, ≈ 290 backward) ≈ 300
    hbm_tbps           HBM3 bandwidth, 3.35 TB/s (NVIDIA's spec for H100 SXM)
    memory_bound_efficiency  share of that bandwidth the elementwise kernels reach, 0.7: long streaming copies
                       reach ≈ 0.9 of peak, but norms, rotary, SwiGLU, permute and the loss are short kernels,
                       several of them upcast to fp32 or gather rows, so they lose a fifth or more to launch
                       tails and uncoalesced reads"""
    expert_tflops: float = 600.0
    dense_tflops: float = 720.0
    attention_tflops: float = 300.0
    hbm_tbps: float = 3.35
    memory_bound_efficiency: float = 0.7

    def memory_bound_seconds(self, nbytes: float) -> float:
        return nbytes / (self.hbm_tbps * 1e12 * self.memory_bound_efficiency)


def _span(group_stride: int, size: int, gpus_per_node: int) -> tuple[int, int]:
    """(peers on my node, peers off it) for a group of `size` ranks `group_stride` apart (Megatron order:
    tp fastest, then ep), ranks filling nodes in order."""
    per_node = max(1, min(size, gpus_per_node // group_stride)) if group_stride <= gpus_per_node else 1
    return per_node - 1, size - per_node


def alltoall_seconds(bytes_sent: float, ep: int, tp: int, net: Network) -> float:
    """The ep group's all-to-all; `tp` is the distance between its ranks. In the expert view ranks run etp
    fastest, then ep, so `estimate` passes dims.etp (equal to tp in the usual layouts, tp = etp)."""
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


def _pick(cfg: Config, dims: ParallelDims, stage: int | Stage | None, fn, key) -> dict:
    """fn(stage) for one pipeline stage, or (stage None) the stage whose result has the largest key."""
    if stage is not None:
        return fn(stage if isinstance(stage, Stage) else stages(cfg, dims)[stage])
    return max((fn(st) for st in stages(cfg, dims)), key=key)


def flops_per_rank(cfg: Config, dims: ParallelDims, stage: int | Stage | None = None) -> dict[str, float]:
    """Training FLOPs one rank does in one micro-batch: dense GEMMs (head and router included, `head` and
    `moe_dense` say how much of it those are), attention core, routed experts (see the module docstring).
    The three kinds `dense`, `attention`, `experts` add up to the total; the other keys are parts of `dense`.
    With pipeline stages: a rank of `stage` (None: the stage doing the most)."""
    return _pick(cfg, dims, stage, lambda st: _flops(cfg, dims, st), lambda f: _total_flops(f))


def _flops(cfg: Config, dims: ParallelDims, st: Stage) -> dict[str, float]:
    m, e, t = cfg.model, cfg.moe, cfg.train
    T, S = t.batch_size * t.seq_len, t.seq_len
    p = param_counts(cfg, dims, st)
    n_moe = st.n_moe
    vd = m.vocab_size * m.dim
    head = 6 * T * vd if st.last else 0       # the output projection (the input embedding is a lookup)
    router = 6 * alltoall_rows_per_layer(cfg, dims)["tokens"] * e.num_experts * m.dim * n_moe
    shared = 6 * T * m.dim * _width(_shared_hidden(e), e.activation) * n_moe
    ends = vd * (st.first + st.last) - (vd if st.first and st.last and m.tie_embeddings else 0)
    matmul_weights = p.dense - ends - n_moe * e.num_experts * m.dim
    dense = 6 * T * matmul_weights + head + router
    attention = 12 * st.n_layers * T * S * m.n_heads * head_dim(m) / dims.tp
    rows = alltoall_rows_per_layer(cfg, dims)["kept"]
    experts = 6 * rows * m.dim * _width(e.expert_hidden, e.activation) * n_moe
    return {"dense": dense, "attention": attention, "experts": experts, "head": head, "moe_dense": router + shared}


def _total_flops(f: dict[str, float]) -> float:
    return f["dense"] + f["attention"] + f["experts"]


def model_flops_per_token(cfg: Config) -> float:
    """Model FLOPs of one token (fwd+bwd) on one process, the numerator of TFLOPS/GPU and MFU figures."""
    return _total_flops(flops_per_rank(cfg, ParallelDims(world=1))) / (cfg.train.batch_size * cfg.train.seq_len)


def elementwise_bytes(cfg: Config, dims: ParallelDims, stage: int | Stage | None = None) -> dict[str, float]:
    """HBM bytes the memory-bound kernels move in one micro-batch's forward on one rank (each op reads its
    inputs and writes its output once; b bytes per activation element):
    blocks   per block: two RMSNorms 2·2·T·D, two residual adds 2·3·T·D, rotary on q and k 2·T·(H+Hkv)·Dh/tp
    dense    per dense-MLP layer: the activation, T·(wi + Fd)/tp
    moe      per MoE layer: permute (Ts + R)·D, unpermute with the weighted sum (R + Ts)·D, the routed
             activation R·(wi + F), the shared experts' activation Ts·(wis + Fs) and their add 3·Ts·D
    head     the final norm 2·T·D, the loss over the logits T·V·(b + 12) (read, fp32 copy, softmax in fp32)
    With pipeline stages: the layers (and head) of `stage` (None: the stage moving the most)."""
    return _pick(cfg, dims, stage, lambda st: _elementwise(cfg, dims, st), lambda d: sum(d.values()))


def _elementwise(cfg: Config, dims: ParallelDims, st: Stage) -> dict[str, float]:
    m, e, t = cfg.model, cfg.moe, cfg.train
    b = DTYPE_BYTES[t.dtype]
    T = t.batch_size * t.seq_len
    rows = alltoall_rows_per_layer(cfg, dims)
    R, Ts = rows["kept"], rows["tokens"]
    n_moe, n_layers = st.n_moe, st.n_layers
    kv = m.n_kv_heads or m.n_heads
    blocks = n_layers * T * (10 * m.dim + 2 * (m.n_heads + kv) * head_dim(m) / dims.tp) * b
    dense = (n_layers - n_moe) * T * (_in_width(m.dense_hidden, e.activation) + m.dense_hidden) / dims.tp * b
    fs = _shared_hidden(e)
    moe = n_moe * b * (2 * (Ts + R) * m.dim + R * (_in_width(e.expert_hidden, e.activation) + e.expert_hidden)
                       + (Ts * (_in_width(fs, e.activation) + fs) + 3 * Ts * m.dim if fs else 0))
    head = 2 * T * m.dim * b + T * m.vocab_size * (b + 12) if st.last else 0
    return {"blocks": blocks, "dense": dense, "moe": moe, "head": head}


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


def tp_collectives(cfg: Config, dims: ParallelDims, stage: int | Stage | None = None) -> TpCollectives:
    """Every collective this code runs over the tp group in one `Trainer.train_step` (see the module
    docstring for where each comes from); zero when tp = 1. `test_bench_scaling` checks it against the
    calls counted on gloo ranks. With pipeline stages: the layers of `stage` (None: the stage moving the most)."""
    if dims.tp <= 1:
        return TpCollectives()
    return _pick(cfg, dims, stage, lambda st: _tp_collectives(cfg, dims, st), lambda c: c.bytes)


def _tp_collectives(cfg: Config, dims: ParallelDims, st: Stage) -> TpCollectives:
    m, e, t = cfg.model, cfg.moe, cfg.train
    n_layers, n_moe = st.n_layers, st.n_moe
    n_dense = n_layers - n_moe
    act = t.batch_size * t.seq_len * m.dim * DTYPE_BYTES[t.dtype]        # one [T, D] activation
    fwd_ar = n_layers + n_dense                                         # wo, dense w_out
    bwd_ar = 2 * n_layers + n_dense                                     # wq, wkv, dense w_in
    counts_ar = n_moe if (e.aux_loss_coef > 0 and e.aux_loss_type == "global"
                          and e.balance_over == "micro_batch") else 0
    # qk_norm=full: the q and k sums of squares ([T, 2] fp32) are added over tp, once each way per block.
    qk = n_layers if m.qk_norm == "full" else 0
    qk_bytes = t.batch_size * t.seq_len * 2 * FP32
    # Recompute (torch's non-reentrant checkpoint, which stops recomputing once the last tensor saved for
    # backward is back). block: attention's wo all-reduce, the qk-norm all-reduce and the load-balancing
    # counts rerun; the block's last collective (dense w_out all-reduce, MoE gather_rows) feeds only the
    # residual add and does not. moe: inside the MoE layer only the counts rerun (gather_rows is its last op).
    re_wo = n_layers if t.recompute == "block" else 0
    re_qk = qk if t.recompute == "block" else 0
    re_counts = counts_ar if t.recompute in ("block", "moe") else 0
    micro = t.grad_accum_steps
    ar_calls = micro * (fwd_ar + counts_ar + bwd_ar + 2 * qk + re_wo + re_qk + re_counts)
    ar_bytes = micro * ((fwd_ar + bwd_ar + re_wo) * act + (2 * qk + re_qk) * qk_bytes
                        + (counts_ar + re_counts) * 8 * (e.num_experts + 1))
    ag_calls = micro * 2 * n_moe                                          # gather_rows fwd, split_rows bwd
    ag_bytes = ag_calls * act
    # Once per step: tp-partial grads (router E·D, shared experts and their gate, per-head q/k norms) in one
    # flat fp32 buffer, and the norm.
    gate = m.dim if (e.shared_expert_gate and e.num_shared_experts) else 0
    partial = n_moe * (e.num_experts * m.dim + m.dim * _width(_shared_hidden(e), e.activation) + gate)
    partial += n_layers * 2 * head_dim(m) if m.qk_norm == "per_head" else 0
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


def reduce_scatter_seconds(nbytes: float, n: int, stride: int, net: Network) -> float:
    """Ring reduce-scatter of an `nbytes` input over n ranks `stride` apart (the same traffic as all-gather)."""
    return allgather_seconds(nbytes, n, stride, net)


def pipeline_bubble_seconds(micro_batch_s: float, pp: int, virtual: int = 1) -> float:
    """The pipeline's fill and drain: pp-1 slots in which a stage idles for one micro-batch's forward and backward
    on the slowest stage (1F1B and GPipe alike), or for one chunk's, 1/virtual of it (interleaved). 0 for pp = 1."""
    return (pp - 1) * micro_batch_s / virtual


def p2p_seconds(nbytes: float, dims: ParallelDims, net: Network) -> float:
    """One activation (or gradient) from a stage to its neighbour: the pp group's ranks are world/pp apart."""
    if dims.pp <= 1 or nbytes <= 0:
        return 0.0
    _, off = _span(dims.world // dims.pp, dims.pp, net.gpus_per_node)
    bw, lat = (net.inter_gbps, net.inter_latency_us) if off else (net.intra_gbps, net.intra_latency_us)
    return lat * 1e-6 + nbytes / (bw * 1e9)


@dataclass(frozen=True)
class GradReduction:
    """One rank's gradient reduction over dp (dense) and edp (experts) per optimizer step, before overlap."""
    reduce_s: float        # one reduction (all-reduce, or reduce-scatter when sharded) of all fp32 gradients
    reductions: int        # how many per step: m for states+grads (every micro-batch), else 1
    gather_s: float        # all-gather of the updated weights after a sharded optimizer step (0 unsharded)
    last_bucket_share: float   # the share of one reduction that no backward is left to hide
    embed_s: float = 0.0   # tied embeddings with pp > 1: the fp32 embedding gradient all-reduced first ↔ last


def grad_reduction(cfg: Config, dims: ParallelDims, net: Network, stage: int | Stage | None = None) -> GradReduction:
    """Dense parameters reduce over the dp group (ranks tp apart), experts over edp (ranks ep·etp apart);
    gradients travel in fp32, gathered weights in their own w bytes. With pipeline stages: the parameters of one
    rank of `stage` (None: the stage holding the most)."""
    st = stage if isinstance(stage, Stage) else (None if stage is None else stages(cfg, dims)[stage])
    p, mode = param_counts(cfg, dims, st), cfg.train.shard_optimizer
    if st is None:
        st = max(stages(cfg, dims), key=lambda x: param_counts(cfg, dims, x).total)
    dp_stride, edp_stride = dims.tp, dims.ep * dims.etp
    w = weight_bytes(cfg)
    if mode == "none":
        reduce = (allreduce_seconds(FP32 * p.dense, dims.dp, dp_stride, net)
                  + allreduce_seconds(FP32 * p.expert, dims.edp, edp_stride, net))
        gather = 0.0
    else:
        reduce = (reduce_scatter_seconds(FP32 * p.dense, dims.dp, dp_stride, net)
                  + reduce_scatter_seconds(FP32 * p.expert, dims.edp, edp_stride, net))
        gather = (allgather_seconds(w * p.dense, dims.dp, dp_stride, net)
                  + allgather_seconds(w * p.expert, dims.edp, edp_stride, net))
    reductions = cfg.train.grad_accum_steps if mode == "states+grads" else 1
    embed = 0.0
    if dims.pp > 1 and cfg.model.tie_embeddings and (st.first or st.last):
        stride = dims.world // dims.pp * (dims.pp - 1)          # first and last stage of one pp group
        embed = allreduce_seconds(FP32 * cfg.model.vocab_size * cfg.model.dim, 2, stride, net)
    return GradReduction(reduce, reductions, gather, bucket_elements(cfg, dims, p, st) / p.total, embed)


def optimizer_seconds(cfg: Config, dims: ParallelDims, comp: Compute, stage: int | Stage | None = None) -> float:
    """Memory-bound optimizer work of one step: with bf16 weights each micro-batch's gradient is added into the
    fp32 buffer (read 2 + read 4 + write 4 B per element); then the norm reads the rank's fp32 gradient shard
    (4 B) and AdamW reads it again (4 B), reads and writes both moments (16 B) and the fp32 master (8 B) and
    writes the bf16 weight (2 B); with fp32 weights the weight is the master (8 B, no copy). Pipeline stages:
    a rank of `stage` (None: the stage holding the most)."""
    p, w = param_counts(cfg, dims, stage), weight_bytes(cfg)
    accumulate = 10 * p.total * cfg.train.grad_accum_steps if w == 2 else 0
    step = shard_elements(cfg, dims, p) * (4 + 4 + 16 + 8 + (2 if w == 2 else 0))
    return comp.memory_bound_seconds(accumulate + step)


@dataclass(frozen=True)
class StepEstimate:
    compute_s: float               # GEMMs at the GEMM throughputs (all micro-batches)
    alltoall_s: float              # all-to-alls and ETP gathers/scatters (recompute's repeats are in recompute_s)
    dp_allreduce_s: float          # exposed gradient reduction + weight all-gather (see grad_reduction)
    step_s: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    alltoall_share: float
    tp_s: float = 0.0              # tensor-parallel activation (and tp-partial gradient) collectives
    non_gemm_s: float = 0.0        # attention core + memory-bound elementwise kernels
    recompute_s: float = 0.0       # the forward that train.recompute runs again
    optimizer_s: float = 0.0       # fp32 gradient accumulation, clipping, AdamW (memory-bound)
    bubble_s: float = 0.0          # pipeline fill and drain (0 for pp = 1)
    dp_total_s: float = 0.0        # the whole gradient reduction and gather, hidden or not
    p2p_s: float = 0.0             # pipeline activations and gradients between stages (0 for pp = 1)
    stage: int = 0                 # the bottleneck stage whose terms these are
    slot_s: float = 0.0            # one micro-batch on the slowest stage (forward + backward + its tp share)
    stage_step_s: tuple[float, ...] = ()   # each stage's own m·slot + tp + dp_exposed + optimizer

    def terms(self) -> dict[str, float]:
        """The additive terms of step_s."""
        return {"gemm": self.compute_s, "non_gemm": self.non_gemm_s, "recompute": self.recompute_s,
                "all_to_all": self.alltoall_s, "tp": self.tp_s, "dp_exposed": self.dp_allreduce_s,
                "optimizer": self.optimizer_s, "pipeline_bubble": self.bubble_s, "pipeline_p2p": self.p2p_s}

    @property
    def bubble_fraction(self) -> float:
        """Bubble over the pipelined part of the step (micro-batches + bubble): (p-1)/(m+p-1) for 1F1B when
        every stage is equally slow."""
        busy = self.compute_s + self.non_gemm_s + self.recompute_s + self.alltoall_s + self.tp_s
        return self.bubble_s / (busy + self.bubble_s) if self.bubble_s else 0.0


@dataclass(frozen=True)
class _StageTime:
    gemm: float
    non_gemm: float
    recompute: float
    a2a: float
    tp: float                      # per step
    exposed_dp: float
    total_dp: float
    optimizer: float

    def micro_s(self) -> float:
        return self.gemm + self.non_gemm + self.recompute + self.a2a


def _stage_time(cfg: Config, dims: ParallelDims, st: Stage, net: Network, comp: Compute,
                overlap_dp: bool) -> _StageTime:
    m, t = cfg.model, cfg.train
    f = _flops(cfg, dims, st)
    gemm = f["dense"] / (comp.dense_tflops * 1e12) + f["experts"] / (comp.expert_tflops * 1e12)
    attention = f["attention"] * 0.5 / (comp.attention_tflops * 1e12)      # causal: the kernel skips half
    eb = _elementwise(cfg, dims, st)
    non_gemm = attention + comp.memory_bound_seconds(3 * sum(eb.values()))
    b = DTYPE_BYTES[t.dtype]
    rows = alltoall_rows_per_layer(cfg, dims)
    n_moe = st.n_moe
    # Expert view (parallel folding): etp groups are adjacent ranks, ep groups are etp apart, edp ep·etp apart.
    one_a2a = alltoall_seconds(rows["sent"] * m.dim * b, dims.ep, dims.etp, net)
    # ETP all-gather and reduce-scatter: each moves the `etp_gathered` rows into the rank over the group's link
    # (adjacent ranks, so NVLink unless etp exceeds a node).
    _, off = _span(1, dims.etp, net.gpus_per_node)
    bw, lat = (net.inter_gbps, net.inter_latency_us) if off else (net.intra_gbps, net.intra_latency_us)
    one_etp = (lat * 1e-6 + rows["etp_gathered"] * m.dim * b / (bw * 1e9)) if dims.etp > 1 else 0.0
    a2a = 4 * n_moe * (one_a2a + one_etp)
    # What train.recompute runs again inside backward: forward is a third of the training FLOPs.
    moe_fwd = (f["experts"] / 3 / (comp.expert_tflops * 1e12) + f["moe_dense"] / 3 / (comp.dense_tflops * 1e12)
               + comp.memory_bound_seconds(eb["moe"]) + 2 * n_moe * (one_a2a + one_etp))
    if t.recompute == "moe_act":
        e = cfg.moe
        recompute = comp.memory_bound_seconds(n_moe * rows["kept"] * b
                                              * (_in_width(e.expert_hidden, e.activation) + e.expert_hidden))
    elif t.recompute == "moe":
        recompute = moe_fwd
    elif t.recompute == "block":
        recompute = ((f["dense"] - f["head"] - f["moe_dense"]) / 3 / (comp.dense_tflops * 1e12) + attention / 3
                     + comp.memory_bound_seconds(eb["blocks"] + eb["dense"]) + moe_fwd)
    else:
        recompute = 0.0
    red = grad_reduction(cfg, dims, net, st)
    total_dp = red.reductions * red.reduce_s + red.gather_s + red.embed_s
    if overlap_dp:
        # Each reduction runs beside its micro-batch's backward (two thirds of the compute, plus the recompute).
        window = 2 / 3 * (gemm + non_gemm) + recompute
        exposed_dp = (red.reductions * (max(0.0, red.reduce_s - window) + red.last_bucket_share * red.reduce_s)
                      + red.gather_s + red.embed_s)
        exposed_dp = min(exposed_dp, total_dp)
    else:
        exposed_dp = total_dp
    tp = tp_seconds(_tp_collectives(cfg, dims, st), dims.tp, net) if dims.tp > 1 else 0.0
    return _StageTime(gemm, non_gemm, recompute, a2a, tp, exposed_dp, total_dp,
                      optimizer_seconds(cfg, dims, comp, st))


def estimate(cfg: Config, dims: ParallelDims, net: Network = Network(), comp: Compute = Compute(),
             overlap_dp: bool = True) -> StepEstimate:
    """One optimizer step of `cfg` on the layout `dims` (batch_size is per dp rank and micro-batch; the step runs
    train.grad_accum_steps micro-batches). Terms as in the module docstring: with pipeline stages each stage is
    timed on its own layers, the bottleneck stage's terms make up the step, plus bubble and P2P."""
    t = cfg.train
    micro = t.grad_accum_steps
    per = [_stage_time(cfg, dims, st, net, comp, overlap_dp) for st in stages(cfg, dims)]
    own = tuple(micro * x.micro_s() + x.tp + x.exposed_dp + x.optimizer for x in per)
    k = own.index(max(own))
    s = per[k]
    slot = max(x.micro_s() + x.tp / micro for x in per)
    sched, v = schedule_name(cfg, dims), virtual_size(cfg, dims)
    bubble = pipeline_bubble_seconds(slot, dims.pp, v if sched == "interleaved" else 1)
    p2p = (2 * (v * micro + dims.pp - 1) * p2p_seconds(p2p_per_step(cfg, dims).transfer_bytes, dims, net)
           if dims.pp > 1 else 0.0)
    step = own[k] + bubble + p2p
    tokens_gpu = t.batch_size * t.seq_len * micro * dims.dp / dims.world / step
    return StepEstimate(micro * s.gemm, micro * s.a2a, s.exposed_dp, step, tokens_gpu,
                        tokens_gpu * model_flops_per_token(cfg) / 1e12, micro * s.a2a / step, s.tp,
                        micro * s.non_gemm, micro * s.recompute, s.optimizer, bubble, s.total_dp, p2p, k, slot, own)


def with_layout(cfg: Config, *, tp: int = 1, ep: int = 1, etp: int = 1, batch_size: int | None = None,
                num_experts: int | None = None, shard_optimizer: str | None = None, recompute: str | None = None,
                grad_accum_steps: int | None = None, pp: int = 1, pp_virtual: int = 1,
                pp_schedule: str | None = None) -> Config:
    t = cfg.train
    sched = pp_schedule or ("interleaved" if pp_virtual > 1 else cfg.parallel.pp_schedule)
    return dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, tp=tp, ep=ep, etp=etp, pp=pp, pp_virtual=pp_virtual,
                                          pp_schedule=sched, pp_layers=None if pp == 1 else cfg.parallel.pp_layers),
        moe=dataclasses.replace(cfg.moe, num_experts=num_experts or cfg.moe.num_experts),
        train=dataclasses.replace(t, batch_size=batch_size or t.batch_size,
                                  shard_optimizer=shard_optimizer or t.shard_optimizer,
                                  recompute=recompute or t.recompute,
                                  grad_accum_steps=grad_accum_steps or t.grad_accum_steps))


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
