"""`moe-dist bench layer`: the DeepSpeed variant computes what ours computes (so the timing compares like with
like), the command writes the JSON and plots it promises (machine, versions, config, n/a for DeepSpeed at
k > 2, ratios consistent with the medians, a breakdown whose stages are named), and bad sweeps are refused
naming the flag. Timings themselves are never asserted: benchmarks/results/ holds them."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from moe_dist.bench import layer as bench_layer

pytest.importorskip("deepspeed")


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench_layer.add_arguments(p)
    return p.parse_args(list(argv))


def _same_as_ours(rank, world, mode, ks):
    return {k: _one_k(mode, k) for k in ks}


def _one_k(mode, k):
    args = _parse("--capacity-factor", "1.0", "--min-capacity", "0")
    case = bench_layer.Case(tokens=48, experts=4, top_k=k, mode=mode)
    ours = bench_layer._our_layer(case, 16, 32, "grouped_mm", args, torch.float32, "cpu")
    with torch.no_grad():                       # O(1) weights so the comparison is not of tiny numbers
        for p in ours.parameters():
            p.normal_(0.0, 0.5)
    ds = bench_layer._deepspeed_layer(case, 16, 32, args, torch.float32, "cpu")
    bench_layer.copy_weights_to_deepspeed(ds, ours)
    x = torch.randn(1, 48, 16, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, layer in (("ours", ours), ("ds", ds), ("ds_einsum", bench_layer.DeepSpeedEinsumMoE(ds))):
        xx = x.clone().requires_grad_()
        y = layer(xx)[0]
        y.square().sum().backward()
        out[name] = (y.detach(), xx.grad)
    return out


def test_deepspeed_variant_computes_the_same_layer_dropless() -> None:
    """Dropless, shared weights: DeepSpeed's output and input gradient equal ours (top-1 weight = the
    probability; top-2 renormalised over the pair, as the bench configures ours), with its current sparse
    dispatch and with the einsum dispatch the bench rebuilds from its gating functions. One world-1 process:
    DeepSpeed's groups need an initialised process group, which must not outlive the test."""
    res = run_ranks(_same_as_ours, 1, "dropless", (1, 2), timeout=240)[0]
    for k, out in res.items():
        for variant in ("ds", "ds_einsum"):
            for a, b in zip(out["ours"], out[variant]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"k={k} {variant}: {m}")


def test_command_writes_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "layer_quick.json"
    r = subprocess.run([sys.executable, "-m", "moe_dist.cli", "bench", "layer", "--preset", "quick",
                        "--tokens", "64", "--dim", "32", "--hidden", "32", "--experts", "8", "--top-k", "2", "6",
                        "--repeats", "1", "--warmup", "0", "--clock", "cpu", "--reuse-freed-memory",
                        "--out", str(out)],
                       capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[4/4]" in r.stdout                   # progress, one line per configuration
    data = json.loads(out.read_text())
    m = data["machine"]
    assert m["versions"]["torch"] == torch.__version__.split("+")[0] or m["versions"]["torch"] == torch.__version__
    assert {"deepspeed", "triton"} <= set(m["versions"])
    cfg = data["config"]
    assert cfg["dtype"] == "fp32" and cfg["threads"] >= 1 and cfg["dim"] == 32 and cfg["hidden"] == 32
    assert cfg["clock"] == "cpu" and cfg["allocator"].startswith("glibc heap")
    assert "triton" in cfg["skipped"]            # no GPU here: said, not faked
    rows = {(r["top_k"], r["mode"]): r for r in data["results"]}
    assert set(rows) == {(2, "capacity"), (2, "dropless"), (6, "capacity"), (6, "dropless")}
    for (k, mode), row in rows.items():
        med = row["median_ms"]
        assert {"ours_grouped_mm", "ours_loop", "dense"} <= set(med)
        if k == 6:
            assert "deepspeed" not in med and row["notes"]["deepspeed"].startswith("n/a")
            assert row["ratios"]["grouped_mm_speed_vs_deepspeed"] is None
        else:
            assert row["ratios"]["grouped_mm_speed_vs_deepspeed"] == pytest.approx(
                med["deepspeed"] / med["ours_grouped_mm"])
        assert row["ratios"]["grouped_mm_speed_vs_dense"] == pytest.approx(med["dense"] / med["ours_grouped_mm"])
        assert (row["capacity"] is None) == (mode == "dropless")
    bd = data["breakdown"]
    assert [(b["top_k"], b["mode"]) for b in bd] == [(2, "capacity"), (2, "dropless")]   # k ≤ 2 only
    for b in bd:
        assert list(b["stages_ms"]) == list(bench_layer.STAGES)
        assert b["stages_ms"]["all_to_all"] == 0.0 and b["stages_ms"]["experts"] > 0
        assert b["sum_of_stages_ms"] == pytest.approx(sum(b["stages_ms"].values()))
    assert data["targets"]["target_vs_deepspeed"] == 1.5
    assert out.with_suffix(".png").stat().st_size > 0
    assert (tmp_path / "layer_quick_breakdown.png").stat().st_size > 0


@pytest.mark.parametrize("argv,match", [
    (["--experts", "4", "--top-k", "6"], r"--top-k larger than --experts"),
    (["--tokens", "0"], r"--tokens \[0\]"),
    (["--capacity-factor", "0"], r"--capacity-factor=0"),
    (["--repeats", "0"], r"--repeats=0"),
])
def test_bad_sweep_names_the_flag(argv, match) -> None:
    with pytest.raises(ValueError, match=match):
        bench_layer._settings(_parse(*argv))


def test_no_runnable_backend_is_refused() -> None:
    # D=30 is no multiple of 4 floats: grouped_mm refuses it; triton needs a GPU.
    args = _parse("--preset", "quick", "--dim", "30", "--backends", "grouped_mm", "triton", "--no-deepspeed")
    with pytest.raises(ValueError, match=r"--backends .* add 'loop'"):
        bench_layer.run(args)
