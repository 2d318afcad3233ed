"""The pipeline timeline of moe_dist.bench.pipeline_cpu (the CPU measured-vs-model check's prediction): with a core
per rank it is the schedules' own dataflow timeline and the stated bubble (p-1)/(m+p-1) or (p-1)/(v·m+p-1); with
ranks sharing cores the fill and drain run faster than the steady state; transfers sit on the critical path."""
from __future__ import annotations

import pytest

from moe_dist.bench.pipeline_cpu import simulate
from moe_dist.parallel.layout import bubble_fraction
from moe_dist.pipeline import schedules


@pytest.mark.parametrize("kind,pp,v,m", [("1f1b", 2, 1, 4), ("1f1b", 4, 1, 8), ("1f1b", 3, 1, 2), ("gpipe", 3, 1, 5),
                                         ("interleaved", 2, 2, 4), ("interleaved", 4, 2, 8), ("1f1b", 2, 1, 1)])
def test_dedicated_cores_give_the_schedules_timeline_and_the_stated_bubble(kind, pp, v, m):
    t = simulate(kind, pp, v, m, 1.0, 2.0)
    ref, _ = schedules.simulate([schedules.build_schedule(kind, pp, v, m, r) for r in range(pp)], v, 1.0, 2.0)
    assert t.makespan_s == pytest.approx(ref)
    # Equal stages: every rank idles (p-1) slots of a chunk's forward + backward.
    want = bubble_fraction(pp, m, v if kind == "interleaved" else 1)
    assert t.bubble_fraction == pytest.approx((want,) * pp)
    assert t.work_s == pytest.approx((v * m * 3.0,) * pp) and t.busy_s == pytest.approx(t.work_s)


def test_shared_cores_speed_up_fill_and_drain():
    # PP2×EP2 on 2 cores, 1F1B, m = 4, forward 1 and backward 2 at full speed. Alone (the fill: stage 0's first
    # forward; the drain: its last backward) a stage's two ranks have a core each; together the four ranks run at
    # half speed. 24 in all (each rank busy 21 of them), against 2·15 = 30 if every slot ran at half speed.
    t = simulate("1f1b", 2, 1, 4, 1.0, 2.0, ranks_per_stage=2, cores=2)
    assert t.makespan_s == pytest.approx(24.0)
    assert t.work_s == (12.0, 12.0) and t.busy_s == pytest.approx((21.0, 21.0))
    assert t.bubble_fraction == pytest.approx((3 / 24, 3 / 24))
    # More cores than ranks: back to the dedicated timeline.
    assert simulate("1f1b", 2, 1, 4, 1.0, 2.0, ranks_per_stage=2, cores=8).makespan_s == pytest.approx(15.0)


def test_transfers_and_uneven_stages():
    # A hand-over between stages costs the transfer when the receiver waits for it: 1F1B pp=2, m=4, f=1, b=2,
    # transfer 0.1: the critical path (drawn by hand) crosses the first activation and stage 1's gradients three
    # more times: 4 transfers, +0.4.
    base = simulate("1f1b", 2, 1, 4, 1.0, 2.0).makespan_s
    assert simulate("1f1b", 2, 1, 4, 1.0, 2.0, transfer_s=0.1).makespan_s == pytest.approx(base + 0.4)
    # A slower last stage sets the pace: m slots of it plus the others' fill and drain.
    t = simulate("1f1b", 2, 1, 4, [1.0, 2.0], [2.0, 4.0])
    assert t.makespan_s == pytest.approx(1.0 + 4 * 6.0 + 2.0)
    with pytest.raises(ValueError, match="one value per virtual stage"):
        simulate("1f1b", 2, 1, 4, [1.0], 2.0)


def test_benchmark_normalises_a_run_by_cpu_work_and_wait_share():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "pipeline.py"
    spec = importlib.util.spec_from_file_location("bench_script_pipeline", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # Rank 0 worked 0.3 s of CPU and waited 0.2 of a 1.0 s step: at a full core its step is 0.3 / 0.8; rank 1
    # (0.5 s of work, 0.1 s waiting) sets the step: 0.5 / 0.9.
    run = {"step_s": 1.0, "cpu_s_per_rank": {0: 0.3, 1: 0.5}, "p2p_wait_s_per_rank": {0: 0.2, 1: 0.1}}
    assert bench._normalised(run) == pytest.approx(0.5 / 0.9)
