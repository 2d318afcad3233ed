"""`moe-dist bench layer`: the command writes the JSON and plots it promises (machine, versions, config,
DeepSpeed at every k with the same expert loads as ours, ratios consistent with the medians, a breakdown whose
stages are named and that runs the layer's own public steps), writes under runs/bench/ of the current directory
unless --out names a file, the default preset holds E=64 k=6, and bad sweeps are refused naming the flag.
Timings themselves are never asserted: the JSON files hold them. DeepSpeed's parity with ours is in
test_deepspeed_ref.py."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_dist.bench import layer as bench_layer

pytest.importorskip("deepspeed")


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench_layer.add_arguments(p)
    return p.parse_args(list(argv))


def _bench(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_dist.cli", "bench", "layer", *argv],
                          capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})


# Slow (about 31 s: the whole command, DeepSpeed-MoE included); its options, defaults and breakdown are tested below.
@pytest.mark.slow
def test_command_writes_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "layer_quick.json"
    r = _bench("--preset", "quick", "--tokens", "64", "--dim", "32", "--hidden", "32", "--experts", "8",
               "--top-k", "2", "6", "--repeats", "1", "--warmup", "0", "--clock", "cpu", "--reuse-freed-memory",
               "--out", str(out), cwd=tmp_path)
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
        # DeepSpeed at every k (topkgating at k=6), routing alike: the same loads per expert as ours.
        assert "deepspeed" in med and row["deepspeed_same_loads"] is True, (k, mode)
        assert row["deepspeed_drop_fraction"] == pytest.approx(row["ours_grouped_mm_drop_fraction"])
        assert row["ratios"]["grouped_mm_speed_vs_deepspeed"] == pytest.approx(
            med["deepspeed"] / med["ours_grouped_mm"])
        assert row["ratios"]["grouped_mm_speed_vs_dense"] == pytest.approx(med["dense"] / med["ours_grouped_mm"])
        assert (row["capacity"] is None) == (mode == "dropless")
    bd = data["breakdown"]
    assert [(b["top_k"], b["mode"]) for b in bd] == sorted(rows)
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


def test_default_output_is_a_run_folder_of_the_current_directory(tmp_path: Path) -> None:
    """Without --out the command writes runs/bench/layer_cpu_quick.json (+ PNG) under the directory it runs
    in, and nothing into the package's source tree."""
    r = _bench("--quick", "--tokens", "32", "--dim", "32", "--hidden", "32", "--experts", "4", "--top-k", "1",
               "--modes", "dropless", "--no-deepspeed", "--no-breakdown", "--repeats", "1", "--warmup", "0",
               "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "bench" / "layer_cpu_quick.json"
    assert json.loads(out.read_text())["preset"] == "quick"
    assert out.with_suffix(".png").stat().st_size > 0
    assert bench_layer.default_out("cpu", "default") == Path("runs", "bench", "layer_cpu.json")


def test_default_preset_holds_fine_grained_k6_and_flags_replace_the_sweep() -> None:
    assert (64, 6) in bench_layer._settings(_parse())["pairs"]
    assert bench_layer._settings(_parse("--experts", "8", "16"))["pairs"] == [(8, 1), (8, 2), (16, 1), (16, 2)]
    assert bench_layer._settings(_parse("--top-k", "6"))["pairs"] == [(8, 6), (16, 6), (64, 6), (128, 6)]


def test_breakdown_runs_the_layers_public_steps(monkeypatch) -> None:
    """The breakdown times MoELayer's own steps (the ones forward composes), not a copy of the pipeline:
    each is called, and the unpermute stage passes the router weights as a leaf through combine."""
    from moe_dist.moe.layer import MoELayer
    calls: dict[str, int] = {}
    for name in ("route", "capacity", "dispatch", "run_experts", "combine"):
        original = getattr(MoELayer, name)

        def counted(self, *a, _name=name, _original=original, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            if _name == "combine" and "weights_TK" in kw:
                calls["combine_with_leaf"] = calls.get("combine_with_leaf", 0) + int(kw["weights_TK"].is_leaf)
            return _original(self, *a, **kw)
        monkeypatch.setattr(MoELayer, name, counted)
    args = _parse("--quick", "--dim", "32", "--hidden", "32", "--repeats", "1", "--warmup", "0")
    s = bench_layer._settings(args)
    b = bench_layer.breakdown_case(bench_layer.Case(64, 4, 2, "capacity"), s, args, torch.float32, "cpu",
                                   "loop")
    # One untimed forward, then 1 round of the four stages and the whole layer.
    assert calls["route"] >= 3 and calls["capacity"] >= 3 and calls["dispatch"] >= 3
    assert calls["run_experts"] >= 3 and calls["combine"] >= 2 and calls["combine_with_leaf"] == 1
    assert b["stages_ms"]["router"] > 0 and b["stages_ms"]["unpermute"] > 0
