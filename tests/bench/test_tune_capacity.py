"""moe-dist tune-capacity: drop counts match the capacity arithmetic (one process and 2 ranks, per rank),
a skewed router raises the recommendation, a balanced one gives 1.0, and the command writes its results."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from moe_dist import config
from moe_dist.bench import tune_capacity as tc
from moe_dist.train.data import prepare

E, K, B, S = 8, 2, 2, 32     # experts, top-k, sequences per rank, sequence length: T = 64 tokens per rank


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tok.bin"
    prepare(None, path, max_bytes=200_000)
    return path


def small_cfg(tokens, *extra: str) -> config.Config:
    raw = {"model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": S, "dense_hidden": 64},
           "moe": {"num_experts": E, "top_k": K, "expert_hidden": 32, "renormalize": True, "min_capacity": 1},
           "train": {"batch_size": B, "seq_len": S, "warmup_steps": 0, "out_dir": str(tokens.parent / "run")},
           "data": {"path": str(tokens)}}
    cfg = config.apply_overrides(config.from_dict(raw), list(extra))
    config.validate(cfg)
    return cfg


def skew_to_two_experts(model) -> None:
    """The skewed router: a selection bias of +1 on experts 0 and 1 (softmax scores are < 1, so these two
    win every token's top-2); bias_update_rate=0 keeps it. The gate weights themselves stay learned."""
    for layer in model.moe_layers:
        bias = torch.zeros(E)
        bias[:2] = 1.0
        layer.router.expert_bias_E.copy_(bias)


SKEW = ("--moe.expert_bias=true", "--moe.bias_update_rate=0")


def expected_two_expert_drop(cf: float, tokens_per_rank: int) -> float:
    """All T tokens go to experts 0 and 1 (T assignments each); each keeps C = ceil(K·T/E·cf)."""
    cap = max(math.ceil(K * tokens_per_rank / E * cf), 1)
    return max(tokens_per_rank - cap, 0) / tokens_per_rank


@pytest.fixture(scope="module")
def skewed_two_ranks(tokens):
    cfg = small_cfg(tokens, *SKEW, "--parallel.ep=2")
    return tc.sweep(cfg, [1.0, 4.0, None], steps=2, ranks=2, warmup=1, model_hook=skew_to_two_experts,
                    log=lambda s: None)


def test_skewed_router_drops_per_rank_as_capacity_predicts_and_raises_the_factor(skewed_two_ranks):
    rows = skewed_two_ranks
    T = B * S
    for r in rows:
        want = 0.0 if r["factor"] is None else expected_two_expert_drop(r["factor"], T)
        # Each rank applies capacity to its own T tokens: the per-rank share is exact, every layer, every rank.
        assert r["drop_share_per_rank"] == pytest.approx([want, want]), r["label"]
        assert r["drop_share_per_layer"] == pytest.approx([want, want]), r["label"]
        steps = len(r["lm_loss_curve"])
        assert [sum(k) + sum(d) for k, d in zip(r["kept_per_rank_per_layer"], r["dropped_per_rank_per_layer"])] \
            == [2 * steps * T * K] * 2            # 2 layers x steps x T·K assignments per rank, none lost
        assert r["a2a_dispatch_bytes_per_rank_step"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0
    assert rows[-1]["loss_vs_dropless"] == 0.0
    # cf=4 keeps everything (C = T): same routing as dropless, so the same loss, and it is recommended.
    assert rows[1]["drop_share"] == 0.0 and abs(rows[1]["loss_vs_dropless"]) < 1e-4
    rec = tc.recommend(rows, drop_target=0.01, loss_tol=0.01)
    assert rec["factor"] == 4.0
    assert set(rec["rejected"]) == {"1"}
    # Both options act: looser drop targets admit smaller factors; a loss tolerance nothing meets gives dropless.
    assert tc.recommend(rows, drop_target=0.8, loss_tol=1.0)["factor"] == 1.0
    assert tc.recommend(rows, drop_target=0.8, loss_tol=-1.0)["label"] == "dropless"


def test_balanced_router_recommends_one_on_one_process(tokens, tmp_path):
    # Through the command itself: config file + overrides, JSON and PNG written.
    cfg_path = tmp_path / "small.yaml"
    import yaml
    import dataclasses
    cfg = small_cfg(tokens, "--moe.force_balanced=true")
    cfg_path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    args = argparse.Namespace(config=str(cfg_path), factors="1.0", steps=3, warmup=1, ranks=1,
                              drop_target=0.0, loss_tol=0.001, quick=False, out=str(tmp_path / "tc"),
                              overrides=[])
    assert tc.run(args) == 0
    res = json.loads((tmp_path / "tc.json").read_text())
    assert res["recommendation"]["factor"] == 1.0
    assert [r["label"] for r in res["rows"]] == ["1", "dropless"]     # dropless added for the loss
    assert all(r["drop_share"] == 0.0 for r in res["rows"])
    assert res["machine"]["cpu_count"] >= 1 and "torch" in res["machine"]["versions"]
    assert (tmp_path / "tc.png").stat().st_size > 10_000


def test_results_go_under_runs_bench_of_the_current_directory_by_default(tokens, tmp_path, monkeypatch):
    import dataclasses
    from pathlib import Path

    import yaml
    committed = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime for p in committed.iterdir()}
    cfg_path = tmp_path / "small.yaml"
    cfg_path.write_text(yaml.safe_dump(dataclasses.asdict(small_cfg(tokens))))
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(config=str(cfg_path), factors="dropless", steps=2, warmup=1, ranks=1,
                              drop_target=0.01, loss_tol=0.01, quick=False, out=None, overrides=[])
    assert tc.run(args) == 0
    res = json.loads((tmp_path / "runs" / "bench" / "tune_capacity_small.json").read_text())
    assert [r["label"] for r in res["rows"]] == ["dropless"]
    assert (tmp_path / "runs" / "bench" / "tune_capacity_small.png").is_file()
    assert {p.name: p.stat().st_mtime for p in committed.iterdir()} == before


def test_factor_list_and_arguments_are_checked(tokens, tmp_path):
    assert tc.parse_factors("2, dropless,1.25") == [1.25, 2.0, None]
    with pytest.raises(ValueError, match="--factors: 'abc' is not a number"):
        tc.parse_factors("1.0,abc")
    with pytest.raises(ValueError, match="must be a positive"):
        tc.parse_factors("0")
    with pytest.raises(ValueError, match="twice"):
        tc.parse_factors("1,1.0")
    base = dict(config="configs/tiny-cpu.yaml", factors="1.0", steps=3, warmup=1, ranks=1, drop_target=0.01,
                loss_tol=0.01, quick=True, out=str(tmp_path / "x"), overrides=[])
    with pytest.raises(config.ConfigError, match="data.path=.*prepare-data"):
        tc.run(argparse.Namespace(**base | {"overrides": [f"--data.path={tmp_path / 'missing.bin'}"]}))
    with pytest.raises(config.ConfigError, match=r"parallel\.ep.*--ranks=3"):
        tc.run(argparse.Namespace(**base | {"ranks": 3, "overrides": ["--parallel.ep=2"]}))
    with pytest.raises(config.ConfigError, match="--warmup=3 leaves no timed step"):
        tc.run(argparse.Namespace(**base | {"warmup": 3}))
