"""benchmarks/gpu_check.py (`make gpu-check`): the time box (a part over its limit is killed with its children and
reported TIMEOUT, a crashed one ERROR with its stderr, and the parts after them still run), the judging of the
targets on a GPU and in the rehearsal, and, slow, the whole CPU rehearsal end to end: exit 0, every part present,
"no GPU figure" said in the JSON and the table, nothing PASSes."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    """benchmarks/gpu_check.py as a module (benchmarks/ is not a package); its top level imports no torch."""
    spec = importlib.util.spec_from_file_location("bench_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def python_part(gc, name: str, code: str, limit_s: float):
    return gc.PartSpec(name, [sys.executable, "-c", textwrap.dedent(code)], limit_s)


def gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# ------------------------------------------------------------------------------------------ time box


def test_a_part_over_its_limit_is_killed_with_its_children_and_later_parts_still_run(tmp_path):
    gc = load_gpu_check()
    pid_file = tmp_path / "grandchild.pid"
    slow = python_part(gc, "slow", f"""
        import json, os, subprocess, time
        child = subprocess.Popen(["sleep", "60"])          # a grandchild in the part's process group
        open({str(pid_file)!r}, "w").write(str(child.pid))
        json.dump({{"done": 1}}, open(os.environ["TIMEBOX_RESULT"], "w"))   # what it finished before the limit
        print("working", flush=True)
        time.sleep(60)
    """, limit_s=3)
    crash = python_part(gc, "crash", """
        import sys
        print("boom: the part failed", file=sys.stderr)
        sys.exit(3)
    """, limit_s=30)
    fast = python_part(gc, "fast", """
        import json, os
        json.dump({"x": 1}, open(os.environ["TIMEBOX_RESULT"], "w"))
    """, limit_s=30)
    lines, seen = [], []
    t0 = time.monotonic()
    out = gc.run_all([slow, crash, fast], budget_s=120, workdir=tmp_path,
                     on_part=lambda name, o: seen.append((name, o["status"])), say=lines.append)
    assert time.monotonic() - t0 < 30
    assert seen == [("slow", "timeout"), ("crash", "error"), ("fast", "ok")]
    assert 3 <= out["slow"]["elapsed_s"] < 15
    assert out["slow"]["result"] == {"done": 1}                # a part cut short keeps what it wrote
    assert "working" in out["slow"]["stdout_tail"]
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while not gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(grandchild), "the part's own child outlived the time limit"
    assert out["crash"]["returncode"] == 3 and "boom: the part failed" in out["crash"]["stderr_tail"]
    assert out["crash"]["result"] is None
    assert out["fast"]["result"] == {"x": 1}
    assert any(line.startswith("  slow +") and line.endswith("| working") for line in lines)   # progress, elapsed s
    assert any("slow: timeout" in line for line in lines)
    assert gc.exit_code(out, []) == 2


def test_a_part_gets_at_most_the_budget_left_and_none_starts_without_enough(tmp_path):
    gc = load_gpu_check()
    sleeper = python_part(gc, "sleeper", "import time; time.sleep(60)", limit_s=100)
    never = python_part(gc, "never", "print('ran')", limit_s=100)
    out = gc.run_all([sleeper, never], budget_s=2.5, workdir=tmp_path, say=lambda s: None, min_start_s=1.5)
    assert out["sleeper"]["status"] == "timeout" and out["sleeper"]["limit_s"] == pytest.approx(2.5, abs=0.3)
    assert out["never"]["status"] == "skipped" and "budget exhausted" in out["never"]["reason"]
    targets = gc.judge({"kernels": out["never"]}, gpu=True)
    assert targets[0]["verdict"] == "SKIP" and "budget exhausted" in targets[0]["detail"]


def test_parts_and_limits_options():
    gc = load_gpu_check()
    assert gc._parse_parts("kernels,speed,layer,train,profile") == list(gc.PART_ORDER)
    assert gc._parse_parts("train,kernels") == ["peak", "kernels", "train:triton", "train:grouped_mm", "train:auto"]
    assert gc._parse_parts("layer") == ["layer"]
    with pytest.raises(SystemExit, match="--parts 'gemm'"):
        gc._parse_parts("gemm")
    assert gc._parse_limits(["train=40", "kernels=90"]) == {"train:triton": 40, "train:grouped_mm": 40,
                                                            "train:auto": 40, "kernels": 90}
    with pytest.raises(SystemExit, match="PART=SECONDS"):
        gc._parse_limits(["kernels=0"])


# ------------------------------------------------------------------------------------------ judging


def ok(result):
    return {"status": "ok", "elapsed_s": 1.0, "result": result}


def kernel_case(err, dtype="bfloat16", finite=True):
    tol = {"bfloat16": 2e-2, "float32": 1e-4}[dtype]
    return {"op": "grouped_gemm", "case": "c", "dtype": dtype, "errors": {"out": err}, "tol": tol,
            "worst_key": "out", "worst_over_tol": err / tol, "finite": finite}


def speed_row(name, E, speedup, permute=0.95, unpermute=0.92):
    return {"name": name, "shape": {"E": E}, "gemm": {"speedup_triton_over_grouped_mm": {"fwd": 1.0, "fwd_bwd": speedup}},
            "rows": {"fraction_of_copy": {"permute": permute, "unpermute": unpermute}}}


def outcomes(kernel_err=1e-3, finite=True):
    return {
        "kernels": ok({"cases": [kernel_case(kernel_err, finite=finite), kernel_case(1e-6, "float32")]}),
        "speed": ok({"rows": [speed_row("mixtral_E8_k2", 8, 1.05), speed_row("fine_E64_k6", 64, 1.10),
                              speed_row("E32_k4", 32, 1.30)]}),
        "layer": ok({"deepspeed_skipped": "deepspeed not importable (ModuleNotFoundError: No module named "
                                          "'deepspeed')",
                     "cases": [{"label": "E=8", "backends": ["triton", "grouped_mm"], "primary": "triton",
                                "ratios": {"triton_speed_vs_dense": 0.8, "triton_speed_vs_deepspeed": None}}]}),
        "train:triton": ok({"mfu": 0.45, "tokens_per_s": 1e6, "flops_per_token": 7e8, "peak_tflops": 760.0,
                            "peak_allocated": 11 * 2**30, "plan_bytes": 10 * 2**30,
                            "loss_first10": 5.0, "loss_last10": 3.0}),
        "train:grouped_mm": {"status": "timeout", "elapsed_s": 60.0, "result": None},
    }


def test_judge_on_a_gpu_passes_and_fails_against_the_targets():
    gc = load_gpu_check()
    v = {t["id"]: t for t in gc.judge(outcomes(), gpu=True)}
    assert v["kernel_errors"]["verdict"] == "PASS"
    assert v["gemm_E8"]["verdict"] == "PASS" and v["gemm_E8"]["value"] == 1.05
    assert v["gemm_E32"]["verdict"] == "FAIL" and v["gemm_E32"]["value"] == 1.10     # the worst of E=64 and E=32
    assert v["rows_vs_copy"]["verdict"] == "PASS" and v["rows_vs_copy"]["value"] == 0.92
    assert v["layer_vs_dense"]["verdict"] == "PASS"
    assert v["layer_vs_deepspeed"]["verdict"] == "SKIP"
    assert "skipped: deepspeed not importable" in v["layer_vs_deepspeed"]["detail"]
    assert v["mfu_triton"]["verdict"] == "PASS" and "760 TFLOP/s measured" in v["mfu_triton"]["detail"]
    assert v["memory_triton"]["verdict"] == "PASS" and v["memory_triton"]["value"] == pytest.approx(0.1)
    assert v["loss_triton"]["verdict"] == "PASS"
    assert {v[f"{k}_grouped_mm"]["verdict"] for k in ("mfu", "memory", "loss")} == {"TIMEOUT"}
    assert gc.exit_code(outcomes(), list(v.values())) == 2          # a part ran over


def test_judge_fails_kernel_errors_over_tolerance_or_not_finite_and_memory_off_plan():
    gc = load_gpu_check()
    for o in (outcomes(kernel_err=3e-2), outcomes(finite=False)):
        (t,) = [t for t in gc.judge(o, gpu=True) if t["id"] == "kernel_errors"]
        assert t["verdict"] == "FAIL"
    o = outcomes()
    o["train:triton"]["result"].update(peak_allocated=12 * 2**30, mfu=0.30, loss_last10=5.5)
    o.pop("train:grouped_mm")
    v = {t["id"]: t for t in gc.judge(o, gpu=True)}
    assert v["memory_triton"]["verdict"] == "FAIL" and v["mfu_triton"]["verdict"] == "FAIL"
    assert v["loss_triton"]["verdict"] == "FAIL"
    assert v["mfu_grouped_mm"]["verdict"] == "SKIP" and v["mfu_grouped_mm"]["detail"] == "not run (--parts)"
    assert gc.exit_code(o, list(v.values())) == 1


def test_judge_in_the_rehearsal_never_passes_but_still_fails_wrong_kernels():
    gc = load_gpu_check()
    o = outcomes()
    o["train:grouped_mm"] = ok({"loss_first10": 5.0, "loss_last10": 4.9, "mfu_note": "CPU rehearsal: no MFU"})
    verdicts = {t["id"]: t["verdict"] for t in gc.judge(o, gpu=False)}
    assert "PASS" not in verdicts.values()
    assert verdicts["kernel_errors"] == verdicts["gemm_E32"] == verdicts["mfu_triton"] == "REHEARSAL"
    assert verdicts["mfu_grouped_mm"] == "SKIP" and verdicts["loss_grouped_mm"] == "REHEARSAL"
    bad = {t["id"]: t["verdict"] for t in gc.judge(outcomes(kernel_err=1.0), gpu=False)}
    assert bad["kernel_errors"] == "FAIL"


def test_kernel_check_uses_the_kernel_tests_own_shapes():
    gc = load_gpu_check()
    spec = importlib.util.spec_from_file_location("gpu_check_kernel_tests", gc.KERNEL_TESTS)
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    gemm, rows = gc.kernel_test_cases()
    assert gemm == tests.GEMM_CASES and rows == tests.PERMUTE_CASES and gemm and rows


def test_train_config_is_the_size_the_check_promises():
    from moe_dist import config
    from moe_dist.plan import make_plan
    gc = load_gpu_check()
    cfg = config.load(gc.TRAIN_CONFIG)
    p = make_plan(cfg, 1).params_global
    assert 100e6 <= p.total <= 300e6 and p.active < p.total
    assert cfg.train.dtype == "bfloat16" and cfg.moe.num_experts == 8 and cfg.moe.top_k == 2


# ------------------------------------------------------------------------------------------ the rehearsal


@pytest.mark.slow
def test_rehearsal_runs_every_part_on_the_cpu_and_says_no_gpu_figure(tmp_path):
    """About 45 CPU seconds (each part's process imports torch; the kernels run in Triton's interpreter)."""
    out = tmp_path / "gc.json"
    results = REPO / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime for p in results.iterdir()}
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=400, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "rehearsal" and report["gpu_figure"] is False
    assert "no GPU figure" in report["note"]
    gc = load_gpu_check()
    assert list(report["parts"]) == list(gc.PART_ORDER)
    assert all(o["status"] == "ok" and o["result"] and not o["result"]["partial"] for o in report["parts"].values())
    verdicts = {t["id"]: t["verdict"] for t in report["targets"]}
    assert "PASS" not in verdicts.values() and "FAIL" not in verdicts.values()
    assert verdicts["kernel_errors"] == verdicts["gemm_E8"] == verdicts["gemm_E32"] == "REHEARSAL"
    assert verdicts["layer_vs_dense"] == verdicts["loss_triton"] == "REHEARSAL"
    kernels = report["parts"]["kernels"]["result"]["cases"]
    assert {c["case"] for c in kernels} >= {"unaligned", "E64_sparse", "all_dropped"}     # the tests' shapes
    assert report["parts"]["train:triton"]["result"]["lm_loss"]
    tail = r.stdout.strip().splitlines()
    assert "no GPU figure" in tail[-2] and tail[-1].startswith("exit 0")     # the table comes last
    assert any(line.split()[-1] == "REHEARSAL" for line in tail if line.startswith("kernel error"))
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert (tmp_path / "gc_layer_E8_k2.json").exists()
    assert {p.name: p.stat().st_mtime for p in results.iterdir()} == before     # never writes the committed figures
