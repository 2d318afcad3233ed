"""benchmarks/experts.py and benchmarks/kernels.py: they time through the shared harness
(`moe_dist.bench.timing`), keep the JSON keys the README and the committed results use, and write under
runs/bench/ in the current directory by default, never into benchmarks/results/."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_script(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed_results() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in (REPO / "benchmarks" / "results").iterdir()}


def test_kernels_bench_runs_every_candidate_warmup_plus_repeats_times():
    kernels = load_script("kernels")
    assert not kernels.GPU          # the test environment sets TRITON_INTERPRET=1
    calls = {"a": 0, "b": 0}

    def candidate(name):
        def f():
            calls[name] += 1
        return f
    med = kernels.bench({n: candidate(n) for n in calls}, repeats=3, warmup=2)
    assert calls == {"a": 5, "b": 5} and set(med) == {"a", "b"} and all(t >= 0 for t in med.values())


def test_kernels_script_writes_under_runs_bench_by_default(tmp_path, monkeypatch):
    kernels = load_script("kernels")
    # One tiny shape, unscaled, so the whole script runs in seconds.
    monkeypatch.setattr(kernels, "SHAPES", {"tiny_E4_k2": (40, 32, 24, 4, 2)})
    monkeypatch.setattr(kernels, "CPU_SCALE", (1, 1, 1))
    monkeypatch.setattr(kernels, "INTERPRETER_SHAPE", (12, 16))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--repeats", "2"])
    before = committed_results()
    kernels.main()
    assert committed_results() == before
    report = json.loads((tmp_path / "runs" / "bench" / "kernels_cpu.json").read_text())
    row = report["results"][0]
    assert set(row["gemm"]) >= {"fwd_s", "fwd_bwd_s", "fwd_tflops", "fwd_bwd_tflops", "speedup_grouped_mm_over_loop"}
    assert set(row["rows"]["gb_per_s"]) == {"permute", "unpermute", "copy"}
    assert max(v for k, v in row["interpreter_max_abs_error"].items() if k != "shape") < 1e-3
    assert (tmp_path / "runs" / "bench" / "kernels_cpu.png").stat().st_size > 10_000


def test_experts_script_times_both_backends_and_writes_under_runs_bench_by_default(tmp_path, monkeypatch):
    experts = load_script("experts")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["experts.py", "--tokens", "64", "--dim", "16", "--hidden", "32",
                                      "--experts", "4", "--repeats", "2", "--warmup", "1"])
    before = committed_results()
    experts.main()
    assert committed_results() == before
    report = json.loads((tmp_path / "runs" / "bench" / "experts_cpu.json").read_text())
    (row,) = report["results"]
    assert row["shape"]["rows"] == 64 * 2
    assert set(row["median_s"]) == {"grouped_mm", "loop"} and all(t > 0 for t in row["median_s"].values())
    assert row["ratio_grouped_mm_over_loop_speed"] == pytest.approx(row["median_s"]["loop"]
                                                                   / row["median_s"]["grouped_mm"])
    assert (tmp_path / "runs" / "bench" / "experts_cpu.png").stat().st_size > 5_000
