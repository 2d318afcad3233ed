"""Tests for `moe-dist plan` (moe_dist.plan): groups against Megatron-core, parameter counts against the
meta-device model of every layout, bytes and memory against hand arithmetic, the CLI and its errors."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from moe_dist import cli, config
from moe_dist.models.gpt import MoEGPT, is_moe_layer
from moe_dist.parallel.topology import ParallelDims, Topology
from moe_dist.plan import alltoall_rows_per_layer, format_plan, make_plan, param_counts, to_json

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = str(CONFIGS / "tiny-cpu.yaml")
MIXTRAL = str(CONFIGS / "mixtral-8x7b.yaml")


def _cfg(name: str, tp: int = 1, ep: int = 1, etp: int = 1, *extra: str) -> config.Config:
    return config.load(CONFIGS / f"{name}.yaml", [f"--parallel.tp={tp}", f"--parallel.ep={ep}",
                                                 f"--parallel.etp={etp}", *extra])


# (config, world, tp, ep, etp)
LAYOUTS = [("tiny-cpu", 1, 1, 1, 1), ("tiny-cpu", 4, 1, 4, 1), ("tiny-cpu", 4, 1, 2, 1), ("tiny-cpu", 4, 2, 2, 1),
           ("tiny-cpu", 4, 1, 2, 2), ("tiny-cpu", 8, 2, 2, 2), ("tiny-cpu", 8, 4, 8, 1), ("tiny-cpu", 16, 2, 2, 4),
           ("deepseek-tiny", 16, 4, 8, 2), ("mixtral-8x7b", 64, 8, 8, 1), ("mixtral-8x7b", 32, 4, 2, 4)]


# ------------------------------------------------------------------------------------------- groups

@pytest.mark.parametrize("name,world,tp,ep,etp", LAYOUTS)
def test_groups_equal_megatron_rank_generator(name, world, tp, ep, etp) -> None:
    from megatron.core.parallel_state import RankGenerator
    plan = make_plan(_cfg(name, tp, ep, etp), world)
    d = plan.dims
    dense = RankGenerator(tp=d.tp, ep=1, dp=d.dp, pp=1, cp=1, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=d.etp, ep=d.ep, dp=d.edp, pp=1, cp=1, order="tp-cp-ep-dp-pp")
    assert plan.groups["tp"] == dense.get_ranks("tp")
    assert plan.groups["dp"] == dense.get_ranks("dp")
    assert plan.groups["etp"] == expert.get_ranks("tp")
    assert plan.groups["ep"] == expert.get_ranks("ep")
    assert plan.groups["edp"] == expert.get_ranks("dp")
    assert plan.groups["expert_mp"] == expert.get_ranks("tp-ep")
    # Every rank sits in the group its coordinates name.
    for r, co in enumerate(plan.coords):
        assert plan.groups["ep"][co["etp"] + d.etp * co["edp"]][co["ep"]] == r
        assert plan.groups["tp"][co["dp"]][co["tp"]] == r


# --------------------------------------------------------------------------------------- parameters

def test_mixtral_8x7b_published_sizes_and_fast() -> None:
    start = time.perf_counter()
    plan = make_plan(_cfg("mixtral-8x7b"), 1)         # the preset's ep=8 needs 8 ranks
    make_plan(config.load(MIXTRAL), 64)
    assert time.perf_counter() - start < 0.5          # analytic: no model is built
    assert round(plan.params_global.total / 1e9, 2) == 46.70
    assert round(plan.params_global.active / 1e9, 2) == 12.88
    assert plan.params_rank == plan.params_global     # one rank holds everything


@pytest.mark.parametrize("name,world,tp,ep,etp", [l for l in LAYOUTS if l[0] != "mixtral-8x7b"])
def test_per_rank_counts_equal_meta_device_model(name, world, tp, ep, etp) -> None:
    cfg = _cfg(name, tp, ep, etp)
    dims = ParallelDims(world=world, tp=tp, ep=ep, etp=etp)
    want = param_counts(cfg, dims)
    for rank in {0, world - 1}:                      # every rank holds the same shapes; check both ends
        with torch.device("meta"):
            model = MoEGPT(cfg, Topology.virtual(dims, rank))
        expert = sum(p.numel() for p in model.expert_parameters())
        total = sum(p.numel() for p in model.parameters())
        assert (total, expert) == (want.total, want.expert)


@pytest.mark.parametrize("name,extra,world,tp,ep,etp", [
    ("tiny-cpu", ["--model.head_dim=48"], 4, 2, 2, 1), ("tiny-cpu", ["--model.qkv_bias=true"], 4, 2, 2, 1),
    ("tiny-cpu", ["--model.qk_norm=per_head"], 4, 2, 1, 2), ("tiny-cpu", ["--model.qk_norm=full"], 4, 2, 2, 1),
    ("deepseek-tiny", ["--moe.shared_expert_gate=true", "--model.qk_norm=full", "--model.qkv_bias=true"],
     8, 2, 4, 2)])
def test_model_feature_counts_equal_meta_device_model(name, extra, world, tp, ep, etp) -> None:
    cfg = _cfg(name, tp, ep, etp, *extra)
    dims = ParallelDims(world=world, tp=tp, ep=ep, etp=etp)
    want = param_counts(cfg, dims)
    with torch.device("meta"):
        model = MoEGPT(cfg, Topology.virtual(dims, world - 1))
    assert (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.expert_parameters())) == (want.total, want.expert)


@pytest.mark.parametrize("name,world,tp,ep,etp", LAYOUTS)
def test_per_rank_counts_add_up_to_the_model(name, world, tp, ep, etp) -> None:
    cfg = _cfg(name, tp, ep, etp)
    plan = make_plan(cfg, world)
    whole, rank = plan.params_global, plan.params_rank
    # Each expert-model-parallel group (ep·etp ranks) holds every routed weight exactly once.
    assert rank.expert * ep * etp == whole.expert
    # The ranks' shares of the per-token active routed weights add up to the model's (up to rounding).
    assert abs((rank.active - rank.dense) * ep * etp - (whole.active - whole.dense)) < ep * etp
    # Dense weights: a replicated part plus a part split over tp, the same for every tp.
    split = (whole.dense - rank.dense) * tp // (tp - 1) if tp > 1 else None
    if split is not None:
        tp2 = make_plan(_cfg(name, 2, 1, 1), 2).params_rank.dense
        assert (whole.dense - tp2) * 2 == split


# ---------------------------------------------------------------------------------------- all-to-all

def test_bytes_by_hand_tiny_ep2() -> None:
    # tiny-cpu: T = 8·128 = 1024 tokens, K = 2, D = 128, fp32, 4 MoE layers. ep = 2: half the 2048
    # assignments go to the other rank: 1024 rows · 128 · 4 B = 512 KiB per all-to-all per layer.
    plan = make_plan(_cfg("tiny-cpu", 1, 2, 1), 4)
    assert alltoall_rows_per_layer(_cfg("tiny-cpu", 1, 2, 1), plan.dims) == {
        "tokens": 1024, "assigned": 2048, "kept": 2048, "sent": 1024, "home": 1024, "etp_gathered": 0}
    j = to_json(plan)["alltoall"]
    assert j["bytes_per_layer"] == {"dispatch_fwd": 524288, "combine_fwd": 524288, "dispatch_bwd": 524288,
                                    "combine_bwd": 524288, "gather_fwd": 0, "scatter_fwd": 0, "gather_bwd": 0,
                                    "scatter_bwd": 0}
    assert j["moe_layers"] == 4 and j["bytes_per_step_total"] == 4 * 4 * 524288


def test_bytes_by_hand_tp_and_etp() -> None:
    # tp = 2: each tp rank routes 512 tokens (1024 rows); ep = 2 sends half.
    rows = make_plan(_cfg("tiny-cpu", 2, 2, 1), 4).comm.rows
    assert (rows["tokens"], rows["sent"], rows["etp_gathered"]) == (512, 512, 0)
    # etp = 2: the 2048 rows the rank keeps are all-gathered from its one ETP peer (2048 rows · 512 B).
    plan = make_plan(_cfg("tiny-cpu", 1, 2, 2), 4)
    assert plan.comm.rows["etp_gathered"] == 2048
    assert plan.comm.etp_bytes == {k: 2048 * 512 for k in ("gather_fwd", "scatter_fwd", "gather_bwd", "scatter_bwd")}
    # ep = 4 of 8 experts: 3/4 of the rows leave. Mixtral in bf16 at tp = 8, ep = 8: 512 tokens, 1024 rows,
    # 7/8 leave, each 4096 · 2 B.
    assert make_plan(_cfg("tiny-cpu", 1, 4, 1), 4).comm.rows["sent"] == 1536
    mix = make_plan(_cfg("mixtral-8x7b", 8, 8, 1), 64).comm
    assert mix.alltoall_bytes["dispatch_fwd"] == 896 * 4096 * 2 and mix.moe_layers == 32


def test_capacity_limits_rows() -> None:
    # switch-tiny: top-1 of 16, 2 MoE layers, T = 1024. cf = 0.5: C = ceil(1024/16·0.5) = 32 < 64 per expert,
    # so 16·32 = 512 rows are kept; with ep = 4, 3/4 of them leave.
    rows = alltoall_rows_per_layer(_cfg("switch-tiny", 1, 4, 1, "--moe.capacity_factor=0.5"),
                                   ParallelDims(world=4, ep=4))
    assert (rows["kept"], rows["sent"]) == (512, 384)
    # cf = 1.25 leaves uniform routing untouched (C = 80 > 64).
    assert alltoall_rows_per_layer(_cfg("switch-tiny", 1, 4, 1), ParallelDims(world=4, ep=4))["kept"] == 1024
    # Four GShard groups of 256 tokens: C = max(ceil(16·0.5), min_capacity 20) = 20 > 16: nothing dropped.
    cfg = _cfg("switch-tiny", 1, 4, 1, "--moe.capacity_factor=0.5", "--moe.capacity_groups=4", "--moe.min_capacity=20")
    assert alltoall_rows_per_layer(cfg, ParallelDims(world=4, ep=4))["kept"] == 1024


# -------------------------------------------------------------------------------------------- memory

def test_memory_by_hand_tiny() -> None:
    plan = make_plan(config.load(TINY), 1)
    n = plan.params_rank.total
    # fp32 weights: 4 B weights, 4 B .grad tensors, 8 B AdamW moments and no master copy (the weights are it).
    assert (plan.memory.weights, plan.memory.grads, plan.memory.optimizer) == (4 * n, 4 * n, 8 * n)
    # Per block 2·T·D + T·Dh·(2H + 2Hkv) = 262,144 + 524,288; per MoE layer R·D·(2 + 2) + R·3F with R = 2048
    # = 1,048,576 + 1,572,864; head 2·T·D + T·V = 524,288 elements; ×4 B, plus fp32 router logits/probs
    # 4·T·E·2·4 B and fp32 logits T·V·4 B.
    elements = 4 * (262_144 + 524_288) + 4 * (1_048_576 + 1_572_864) + 524_288
    assert plan.memory.activations == elements * 4 + 4 * 1024 * 8 * 2 * 4 + 1024 * 256 * 4
    # bf16 on a GPU: bf16 weights (half), fp32 gradient buffers, optimizer 12 B (two moments + fp32 master).
    bf = make_plan(config.load(TINY, ["--train.dtype=bfloat16"]), 1).memory
    assert (bf.weights, bf.grads, bf.optimizer) == (2 * n, 4 * n, 12 * n)
    assert bf.weights * 2 == plan.memory.weights
    # Sharding attention and experts lowers what each rank keeps.
    assert make_plan(_cfg("tiny-cpu", 2, 2, 2), 8).memory.activations < plan.memory.activations


def test_memory_terms_are_stated(capsys) -> None:
    assert cli.main(["plan", MIXTRAL, "--world", "64", "--train.shard_optimizer=states"]) == 0
    out = capsys.readouterr().out
    assert "train.shard_optimizer=states over dp=64 (dense) and edp=8 (experts); train.recompute=none" in out
    assert "2 B × (P_d 1,605,636,096 + P_e 5,637,144,576) bf16" in out
    assert "8 B × (P_d/64 + P_e/8) AdamW moments + 4 B × (P_d/64 + P_e/8) fp32 master weights" in out
    assert "4 B × (P_d + P_e) fp32 accumulation buffers" in out


def test_model_features_in_param_counts() -> None:
    # tiny-cpu: D = 128, H = 4, 4 layers, all MoE. head_dim 48 (not D/H = 32): wq [128, 192], wkv [128, 384],
    # wo [192, 128] per block instead of 4·128·128.
    base = param_counts(config.load(TINY), ParallelDims(world=1))
    hd = param_counts(config.load(TINY, ["--model.head_dim=48"]), ParallelDims(world=1))
    assert hd.dense - base.dense == 4 * (128 * (192 + 384) + 192 * 128 - 4 * 128 * 128)
    # q, k, v biases: H·Dh + 2·Hkv·Dh = 384 per block; split over tp with their columns.
    bias = param_counts(config.load(TINY, ["--model.qkv_bias=true"]), ParallelDims(world=1))
    assert bias.dense - base.dense == 4 * 384
    tp2 = ParallelDims(world=2, tp=2)
    assert (param_counts(config.load(TINY, ["--model.qkv_bias=true"]), tp2).dense
            - param_counts(config.load(TINY), tp2).dense) == 4 * 192
    # qk_norm per_head: a q and a k weight of Dh each per block; full: H·Dh + Hkv·Dh per block.
    per_head = param_counts(config.load(TINY, ["--model.qk_norm=per_head"]), ParallelDims(world=1))
    full = param_counts(config.load(TINY, ["--model.qk_norm=full"]), ParallelDims(world=1))
    assert (per_head.dense - base.dense, full.dense - base.dense) == (4 * 2 * 32, 4 * (128 + 128))
    # The shared-expert gate: one [D] vector per MoE layer (deepseek-tiny has shared experts).
    ds = config.load(CONFIGS / "deepseek-tiny.yaml")
    gate = config.load(CONFIGS / "deepseek-tiny.yaml", ["--moe.shared_expert_gate=true"])
    n_moe = sum(is_moe_layer(ds.model, i) for i in range(ds.model.n_layers))
    one = ParallelDims(world=1)
    assert param_counts(gate, one).dense - param_counts(ds, one).dense == n_moe * ds.model.dim
    assert param_counts(gate, one).expert == param_counts(ds, one).expert


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_text(capsys) -> None:
    assert cli.main(["plan", TINY, "--world", "4", "--parallel.ep=2"]) == 0
    out = capsys.readouterr().out
    assert "world=4 dense: dp=4×tp=1  expert: edp=2×ep=2×etp=1 | float32" in out
    assert "  ep        [0,1] [2,3]" in out and "  edp       [0,2] [1,3]" in out
    assert "   3     0     3     0     1     1  4-7" in out           # rank 3: ep rank 1 holds experts 4-7
    assert "  expert             3,145,728         1,572,864" in out
    assert "  dispatch_fwd            0.50 MiB        2.00 MiB" in out
    assert "gather_fwd" not in out                               # no ETP rows without etp


def test_cli_json(capsys) -> None:
    assert cli.main(["plan", MIXTRAL, "--world", "64", "--parallel.tp=8", "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert list(j) == ["layout", "train", "groups", "ranks", "params", "memory_bytes", "memory_terms",
                       "activations_bytes", "alltoall", "pipeline"]
    assert j["train"] == {"weight_bytes": 2, "shard_optimizer": "none", "recompute": "none", "batch_size": 1,
                          "seq_len": 4096, "grad_accum_steps": 1}
    assert set(j["memory_terms"]) == {"weights", "grads", "optimizer", "activations"}
    assert sum(j["activations_bytes"].values()) == j["memory_bytes"]["activations"]
    assert j["layout"] == {"world": 64, "tp": 8, "dp": 8, "ep": 8, "etp": 1, "edp": 8, "pp": 1, "dtype": "bfloat16"}
    assert list(j["groups"]) == ["tp", "dp", "etp", "ep", "edp", "expert_mp", "pp", "stage", "embed"]
    assert j["groups"]["stage"] == [list(range(64))] and j["groups"]["pp"][5] == [5]
    assert j["ranks"][9] == {"rank": 9, "tp": 1, "dp": 1, "etp": 0, "ep": 1, "edp": 1, "pp": 0, "experts": [1, 1]}
    # One stage: the pipeline section is trivial (no bubble, no P2P) and its stage is the whole rank.
    pl = j["pipeline"]
    assert (pl["pp"], pl["schedule"], pl["bubble_fraction"], pl["p2p"]["bytes_per_step"]) == (1, "none", 0.0, 0)
    assert pl["stages"][0]["memory_bytes"] == j["memory_bytes"] and pl["stages"][0]["layers"] == [[0, 31]]
    assert j["params"]["global"]["total"] == 46_702_792_704
    assert j["params"]["per_rank"]["expert"] * 8 == j["params"]["global"]["expert"]
    assert set(j["memory_bytes"]) == {"weights", "grads", "optimizer", "activations", "total"}
    assert set(j["alltoall"]) == {"moe_layers", "micro_batches", "rows_per_layer", "bytes_per_layer",
                                  "bytes_per_layer_total", "bytes_per_step_total"}
    assert j["alltoall"]["bytes_per_step_total"] == 32 * 4 * 896 * 4096 * 2
    assert j == to_json(make_plan(config.load(MIXTRAL, ["--parallel.tp=8"]), 64))


def test_cli_world_from_config(capsys) -> None:
    assert cli.main(["plan", TINY, "--parallel.world_size=2", "--parallel.ep=2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"]["world"] == 2


@pytest.mark.parametrize("argv,message", [
    (["--world", "3", "--parallel.tp=2"], "world size 3 is not divisible by parallel.tp=2; launch a multiple of 2 "
                                          "ranks or change tp"),
    (["--world", "6", "--parallel.ep=4"], "world size 6 is not divisible by parallel.ep·parallel.etp=4·1; launch "
                                          "a multiple of 4 ranks or change ep/etp"),
    (["--world", "3", "--parallel.ep=3"], "moe.num_experts=8 is not divisible by parallel.ep=3; choose ep that "
                                          "divides the expert count"),
    (["--world", "4", "--parallel.world_size=8"], "parallel.world_size=8 but 4 ranks were launched; launch 8 "
                                                  "ranks or set parallel.world_size=4"),
    (["--world", "0"], "world size 0: must be >= 1; launch at least one rank"),
    ([], "no world size: pass --world N (or set parallel.world_size in the config)"),
    (["--world", "8", "--parallel.tp=8"], "model.n_heads=4 is not divisible by parallel.tp=8; choose tp that "
                                          "divides it"),
])
def test_cli_errors(capsys, argv, message) -> None:
    assert cli.main(["plan", TINY, *argv]) == 2
    kind = "config" if message.startswith("no world size") else "layout"     # layouts: check_layout's one message
    assert capsys.readouterr().err.strip() == f"moe-dist: {kind} error: {message}"


def test_make_plan_raises_the_layout_error() -> None:
    from moe_dist.parallel.layout import LayoutError
    with pytest.raises(LayoutError, match=r"world size -1: must be >= 1"):
        make_plan(config.load(TINY), -1)


# ------------------------------------------------------------------------------------- pipeline stages

# tiny-cpu per-micro-batch activation bytes (fp32, T = 1024, D = 128, 4 MoE layers): one block with its MoE
# layer L = (786,432 + 2,621,440)·4 B + fp32 router logits/probs 1024·8·2·4 B; the head H = 524,288·4 B + the fp32
# logits 1024·256·4 B (see test_memory_by_hand_tiny).
LAYER = (786_432 + 2_621_440) * 4 + 1024 * 8 * 2 * 4
HEAD = 524_288 * 4 + 1024 * 256 * 4


def _pp(world: int, pp: int, *extra: str, name: str = "tiny-cpu") -> tuple[config.Config, "Plan"]:
    cfg = config.load(CONFIGS / f"{name}.yaml", [f"--parallel.pp={pp}", *extra])
    return cfg, make_plan(cfg, world)


@pytest.mark.parametrize("name,world,pp,tp,ep,etp", [("tiny-cpu", 4, 2, 1, 2, 1), ("tiny-cpu", 8, 2, 2, 2, 1),
                                                     ("tiny-cpu", 16, 4, 2, 2, 2), ("mixtral-8x7b", 64, 4, 1, 8, 1)])
def test_pipeline_groups_equal_megatron_rank_generator(name, world, pp, tp, ep, etp) -> None:
    from megatron.core.parallel_state import RankGenerator
    plan = make_plan(_cfg(name, tp, ep, etp, f"--parallel.pp={pp}"), world)
    d = plan.dims
    dense = RankGenerator(tp=d.tp, ep=1, dp=d.dp, pp=d.pp, cp=1, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=d.etp, ep=d.ep, dp=d.edp, pp=d.pp, cp=1, order="tp-cp-ep-dp-pp")
    for ours, gen, theirs in (("tp", dense, "tp"), ("dp", dense, "dp"), ("pp", dense, "pp"), ("etp", expert, "tp"),
                              ("ep", expert, "ep"), ("edp", expert, "dp"), ("expert_mp", expert, "tp-ep")):
        assert plan.groups[ours] == gen.get_ranks(theirs), ours
    assert plan.groups["pp"] == expert.get_ranks("pp")          # both views agree on the stages
    assert plan.groups["embed"] == [[g[0], g[-1]] for g in plan.groups["pp"]]
    for r, co in enumerate(plan.coords):
        assert plan.groups["pp"][co["tp"] + d.tp * co["dp"]][co["pp"]] == r


@pytest.mark.parametrize("extra", [[], ["--model.tie_embeddings=true"], ["--parallel.pp_layers=[1,3]"]])
def test_stage_params_add_up_to_the_model(extra) -> None:
    cfg, plan = _pp(2, 2, *extra)
    whole = plan.params_global
    stages_ = [sp.params for sp in plan.stages]
    tied = cfg.model.tie_embeddings
    # Every layer on exactly one stage; the embedding on the first, norm and head on the last (with tied
    # embeddings the last stage keeps its own copy of the matrix as the head).
    assert sum(p.total for p in stages_) == whole.total + (256 * 128 if tied else 0)
    assert sum(p.expert for p in stages_) == whole.expert
    layers = [sp.stage.layers for sp in plan.stages]
    assert layers == ([(0,), (1, 2, 3)] if "--parallel.pp_layers=[1,3]" in extra else [(0, 1), (2, 3)])
    assert plan.params_rank == plan.stages[plan.heaviest].params


def test_stage_params_equal_meta_device_model() -> None:
    # Each rank of a PP2×EP2 and an interleaved PP2×2 layout builds only its stage's layers.
    for extra, world in ((["--parallel.ep=2"], 4),
                         (["--parallel.pp_virtual=2", "--parallel.pp_schedule=interleaved",
                           "--train.grad_accum_steps=2"], 2),
                         (["--model.tie_embeddings=true", "--parallel.pp_layers=[1,3]"], 2)):
        cfg, plan = _pp(world, 2, *extra)
        for rank in range(world):
            with torch.device("meta"):
                model = MoEGPT(cfg, Topology.virtual(plan.dims, rank))
            want = plan.stages[plan.coords[rank]["pp"]].params
            assert (sum(p.numel() for p in model.parameters()),
                    sum(p.numel() for p in model.expert_parameters())) == (want.total, want.expert), (extra, rank)


@pytest.mark.parametrize("pp,v,m", [(2, 1, 1), (2, 1, 4), (3, 1, 2), (4, 1, 8), (2, 2, 2), (2, 2, 4), (4, 2, 8),
                                    (3, 3, 6), (4, 2, 4)])
def test_in_flight_is_the_stated_formula_and_the_schedules(pp, v, m) -> None:
    from moe_dist.pipeline import schedules
    from moe_dist.plan import in_flight
    for r in range(pp):
        for kind in (("interleaved",) if v > 1 else ("gpipe", "1f1b")):
            got = in_flight(kind, pp, v, m, r)
            if kind == "gpipe":
                want = m
            elif kind == "1f1b":
                want = min(pp - r, m)
            else:       # Megatron-core's warm-up + 1, all of them when m = pp
                want = v * m if m == pp else min(2 * (pp - r - 1) + (v - 1) * pp + 1, v * m)
            assert sum(got) == want == schedules.in_flight(schedules.build_schedule(kind, pp, v, m, r)), (kind, r)


def test_pipeline_activations_by_hand_tiny() -> None:
    # 1F1B, 4 micro-batches on 2 stages of 2 layers: the first stage holds 2 micro-batches, the last 1 (and the head).
    _, plan = _pp(2, 2, "--train.grad_accum_steps=4")
    acts = [sp.memory.activations for sp in plan.stages]
    assert [sp.in_flight for sp in plan.stages] == [(2,), (1,)]
    assert acts == [2 * 2 * LAYER, 2 * LAYER + HEAD]
    assert plan.heaviest == 0 and plan.memory == plan.stages[0].memory
    # Fewer micro-batches than stages: at most m in flight, and the layout check's warning in the plan.
    _, one = _pp(2, 2, "--train.grad_accum_steps=1")
    assert [sp.in_flight for sp in one.stages] == [(1,), (1,)]
    assert len(one.pipeline["warnings"]) == 1 and "train.grad_accum_steps=1 is below parallel.pp=2" in \
        one.pipeline["warnings"][0]
    assert "warning: train.grad_accum_steps=1 is below parallel.pp=2" in format_plan(one)
    # GPipe: every stage keeps all 4 (the last with 4 heads).
    _, gp = _pp(2, 2, "--train.grad_accum_steps=4", "--parallel.pp_schedule=gpipe")
    assert [sp.memory.activations for sp in gp.stages] == [4 * 2 * LAYER, 4 * (2 * LAYER + HEAD)]
    assert gp.heaviest == 1
    # Interleaved, 2 chunks of 1 layer per rank, m = 4: rank 0 warms up 2·1 + 1·2 = 4 forwards and holds 5 chunk
    # micro-batches (3 of chunk 0, 2 of chunk 1); rank 1 holds 3, at most one of them on its head chunk.
    _, il = _pp(2, 2, "--train.grad_accum_steps=4", "--parallel.pp_virtual=2", "--parallel.pp_schedule=interleaved")
    assert [sp.in_flight for sp in il.stages] == [(3, 2), (2, 1)]
    assert [sp.memory.activations for sp in il.stages] == [5 * LAYER, 3 * LAYER + HEAD]
    # Recompute keeps its one working set per rank, not per micro-batch.
    _, rc = _pp(2, 2, "--train.grad_accum_steps=4", "--train.recompute=block")
    assert rc.stages[0].activation_parts == {"block_inputs": 2 * 2 * 1024 * 128 * 4,
                                             "working_set": LAYER, "head": 0}


def test_p2p_bytes_by_hand() -> None:
    # One activation [8, 128, 128] fp32 = 512 KiB forward and its gradient backward per micro-batch and boundary.
    _, plan = _pp(2, 2, "--train.grad_accum_steps=4")
    one = 8 * 128 * 128 * 4
    assert (plan.p2p.transfer_bytes, plan.p2p.boundaries, plan.p2p.per_step) == (one, 1, 2 * 1 * 4 * one)
    assert plan.p2p.sent_per_rank == (4 * one, 4 * one)
    # Interleaved 2×2: three boundaries (virtual stages 0|1|2|3 alternate between the two ranks); each rank sends
    # three messages per micro-batch. bf16 halves them.
    _, il = _pp(2, 2, "--train.grad_accum_steps=4", "--parallel.pp_virtual=2", "--parallel.pp_schedule=interleaved",
                "--train.dtype=bfloat16")
    half = one // 2
    assert (il.p2p.boundaries, il.p2p.per_step, il.p2p.sent_per_rank) == (3, 2 * 3 * 4 * half,
                                                                            (12 * half, 12 * half))
    assert make_plan(config.load(TINY), 1).p2p.per_step == 0


def test_cli_text_and_json_with_stages(capsys) -> None:
    assert cli.main(["plan", TINY, "--world", "4", "--parallel.pp=2", "--parallel.ep=2",
                     "--train.grad_accum_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "world=4 dense: pp=2×dp=2×tp=1  expert: pp=2×edp=1×ep=2×etp=1" in out
    assert "  pp        [0,2] [1,3]" in out and "  embed     [0,2] [1,3]" in out
    assert "pipeline: 2 stages × 1 chunk, schedule 1f1b, 4 micro-batches per step" in out
    assert "bubble 20.0% of the step = (p-1)/(m+p-1)" in out
    assert "memory per the heaviest stage's ranks (stage 0)" in out
    assert "2 micro-batches in flight (1f1b, stage 0 of 2)" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("  0     0-1 ") or ln.startswith("  1     2-3 ")]
    assert len(lines) == 2 and "embed" in lines[0] and "head" in lines[1] and lines[0].endswith(" *")
    assert cli.main(["plan", TINY, "--world", "4", "--parallel.pp=2", "--parallel.ep=2",
                     "--train.grad_accum_steps=4", "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    pl = j["pipeline"]
    assert (pl["pp"], pl["virtual"], pl["schedule"], pl["micro_batches"]) == (2, 1, "1f1b", 4)
    assert pl["bubble_fraction"] == pytest.approx(1 / 5) and pl["heaviest_stage"] == 0
    assert [s["layers"] for s in pl["stages"]] == [[[0, 1]], [[2, 3]]]
    assert [(s["embedding"], s["head"], s["in_flight"]) for s in pl["stages"]] == [(True, False, [2]),
                                                                                  (False, True, [1])]
    assert pl["stages"][0]["memory_bytes"] == j["memory_bytes"]
    assert pl["p2p"]["bytes_per_step"] == 2 * 4 * 8 * 128 * 128 * 4 and pl["warnings"] == []
    assert j["ranks"][3]["pp"] == 1 and j["layout"]["pp"] == 2
    # All-to-alls: a stage's 2 MoE layers, every micro-batch (ep = 2 sends half of 2048 rows of 512 B).
    assert (j["alltoall"]["moe_layers"], j["alltoall"]["micro_batches"]) == (2, 4)
    assert j["alltoall"]["bytes_per_step_total"] == 4 * 2 * 4 * 524288
