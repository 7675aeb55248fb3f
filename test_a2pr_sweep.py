"""Tests for a2pr_sweep.py. Run: pytest test_a2pr_sweep.py  (the Ray tests skip without Ray, the rliable checks
without rliable: pip install -r requirements-dev.txt)."""

from __future__ import annotations

import _socket
import contextlib
import csv
import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch


import a2pr  # noqa: E402
from conftest import HERE, assert_same_state, checkpoint  # noqa: E402
import a2pr_sweep  # noqa: E402


# ================================================================================================================
# Shared helpers (the isolation fixtures, loopback only and nothing outside tmp_path, are in conftest.py)
# ================================================================================================================
def run_sweep_cli(*argv, timeout=120, cwd=HERE):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(HERE / "a2pr_sweep.py"), *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


SWEEP_TINY = ["--total-steps", "40", "--eval-freq", "20", "--eval-episodes", "1", "--batch-size", "16",
              "--actor-hidden", "8", "--critic-hidden", "8", "--value-hidden", "8", "--vae-hidden", "8"]
TIMING_COLUMNS = ("steps_per_s", "wall_s", "host", "run_dir")
PNG = b"\x89PNG\r\n\x1a\n"


def sweep_args(sweep_dir, suite, *argv) -> a2pr_sweep.SweepArgs:
    return a2pr_sweep.parse_args([suite, *SWEEP_TINY, "--sweep-dir", str(sweep_dir), *argv])


def results_table(sweep_dir) -> list[dict]:
    """results.csv without the columns that legitimately differ between two sweeps (timings, folders)."""
    with open(Path(sweep_dir) / "results.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


# ================================================================================================================
# Statistics: by hand, and against rliable on the same arrays
# ================================================================================================================
def test_iqm_by_hand():
    assert a2pr_sweep.iqm(np.arange(1, 9)) == 4.5                 # middle 50 % of 1..8: 3, 4, 5, 6
    assert a2pr_sweep.iqm([100, 1, 2, 3, 4]) == 3.0               # n = 5: int(5/4) = 1 cut at each end: 2, 3, 4
    assert a2pr_sweep.iqm([7.0]) == 7.0 and a2pr_sweep.iqm([1, 3]) == 2.0
    np.testing.assert_array_equal(a2pr_sweep.iqm(np.array([[1, 2, 3, 4], [4, 0, 0, 8]]), axis=-1), [2.5, 2.0])
    assert a2pr_sweep.aggregate_iqm([[1, 2], [3, 4, 5, 6, 7, 8]]) == 4.5
    assert a2pr_sweep.aggregate_mean([[0, 2], [10, 10, 10, 10]]) == 5.5   # each task counts once


def test_probability_of_improvement_by_hand():
    poi = a2pr_sweep.probability_of_improvement
    assert poi([[1, 1]], [[1, 1]]) == 0.5            # ties count 1/2
    assert poi([[2, 3]], [[1, 3]]) == 0.625          # (1 + 0 + 1 + 1/2) / 4
    assert poi([[5], [0]], [[1], [1]]) == 0.5        # averaged over tasks
    assert poi([[5, 6]], [[1, 2, 3]]) == 1.0
    x, y = [np.array([3.0, 1, 2])], [np.array([2.0, 2, 0])]
    assert poi(x, y) + poi(y, x) == 1.0
    with pytest.raises(ValueError):
        poi([[1]], [[1], [2]])


def test_stratified_bootstrap_ci():
    ci = a2pr_sweep.stratified_bootstrap_ci
    assert ci([np.full(5, 3.0)], a2pr_sweep.aggregate_iqm, reps=200) == (3.0, 3.0, 3.0)
    # stratified: each task keeps its own runs, so two constant tasks give a constant mean (a pooled bootstrap
    # would mix them and vary)
    assert ci([[0.0, 0.0], [10.0, 10.0, 10.0]], a2pr_sweep.aggregate_mean, reps=200) == (5.0, 5.0, 5.0)
    scores = [np.random.default_rng(t).normal(50, 10, 5) for t in range(4)]
    p, lo, hi = ci(scores, a2pr_sweep.aggregate_mean, reps=2000, seed=1)
    assert p == pytest.approx(np.mean([s.mean() for s in scores])) and lo < p < hi
    assert ci(scores, a2pr_sweep.aggregate_mean, reps=2000, seed=1) == (p, lo, hi)
    assert ci(scores, a2pr_sweep.aggregate_mean, reps=2000, seed=2) != (p, lo, hi)
    # the percentile interval of the bootstrap means by hand, one task
    one, rng = np.array([1.0, 2.0, 4.0]), np.random.default_rng(0)
    means = one[rng.integers(0, 3, size=(500, 3))].mean(1)
    assert ci([one], a2pr_sweep.aggregate_mean, reps=500, seed=0)[1:] == \
        pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    poi = ci([[2, 3], [1, 3]], lambda g: a2pr_sweep.probability_of_improvement(g[:1], g[1:]))
    assert poi[0] == 0.625 and 0 <= poi[1] <= 0.625 <= poi[2] <= 1


@contextlib.contextmanager
def numpy_global_seed(seed: int):
    """rliable's bootstraps draw from numpy's global generator: seed it for the test, then put it back as it was."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def rliable_scores():
    """(runs, tasks) score matrices, rliable's layout: X on 4 tasks x 10 runs, Y on the same tasks x 7 runs, with
    scores rounded to integers so that X and Y tie often."""
    rng = np.random.default_rng(3)
    x = np.round(rng.normal([60, 40, 80, 20], 12, size=(10, 4)))
    y = np.round(rng.normal([55, 45, 70, 20], 12, size=(7, 4)))
    return x, y


def test_point_estimates_equal_rliable():
    pytest.importorskip("rliable")
    from rliable import metrics

    x, y = rliable_scores()
    tasks_x = list(x.T)
    assert a2pr_sweep.aggregate_mean(tasks_x) == pytest.approx(metrics.aggregate_mean(x), rel=1e-12)
    assert a2pr_sweep.aggregate_iqm(tasks_x) == pytest.approx(metrics.aggregate_iqm(x), rel=1e-12)
    for n in range(1, 14):  # every remainder of n / 4: how many scores are cut at each end
        assert a2pr_sweep.iqm(x.ravel()[:n]) == pytest.approx(metrics.aggregate_iqm(x.ravel()[:n, None]), rel=1e-12)
    for a, b in ((x, y), (y, x), (x, x), (x[:, :1], np.full((3, 1), 60.0))):
        assert a2pr_sweep.probability_of_improvement(list(a.T), list(b.T)) == \
            pytest.approx(metrics.probability_of_improvement(a, b), rel=1e-12)


def test_bootstrap_intervals_agree_with_rliable():
    """Same point estimates; interval ends close to rliable's: both are Monte Carlo estimates of the same percentile
    interval from different resamples (rliable's PoI runs scipy once per resample, so it gets fewer of them)."""
    pytest.importorskip("rliable")
    from rliable import library as rly
    from rliable import metrics

    x, y = rliable_scores()
    with numpy_global_seed(0):
        points, intervals = rly.get_interval_estimates(
            {"x": x}, lambda s: np.array([metrics.aggregate_mean(s), metrics.aggregate_iqm(s)]), reps=10_000)
        poi_point, poi_interval = rly.get_interval_estimates(
            {"x,y": [x, y]}, lambda a, b: np.array([metrics.probability_of_improvement(a, b)]), reps=1000)
    ours = [a2pr_sweep.stratified_bootstrap_ci(list(x.T), stat, reps=20_000)
            for stat in (a2pr_sweep.aggregate_mean, a2pr_sweep.aggregate_iqm)]
    ours.append(a2pr_sweep.stratified_bootstrap_ci(
        list(x.T) + list(y.T), lambda g: a2pr_sweep.probability_of_improvement(g[:4], g[4:]), reps=20_000))
    theirs = [(points["x"][0], *intervals["x"][:, 0]), (points["x"][1], *intervals["x"][:, 1]),
              (poi_point["x,y"][0], *poi_interval["x,y"][:, 0])]
    # tolerances: a fraction of the interval's width, about twice the largest gap over ten seeds
    for (p, lo, hi), (tp, tlo, thi), tol in zip(ours, theirs, (0.05, 0.05, 0.1)):
        assert p == pytest.approx(tp, rel=1e-12)
        assert tlo < tp < thi
        assert lo == pytest.approx(tlo, abs=tol * (thi - tlo)) and hi == pytest.approx(thi, abs=tol * (thi - tlo))


def score_rows(runs_per_cell: dict) -> list[dict]:
    """results.csv's rows by hand: {(dataset, variant): number of runs}, scores spread by variant and seed."""
    rows = []
    for (d, v), n in runs_per_cell.items():
        for seed in range(n):
            score = (60.0 if v == "a2pr" else 40.0) + 3.0 * seed + len(d)
            rows.append(dict(dataset=d, variant=v, seed=seed, final_score=score, best_score=score + 1, steps=40,
                             steps_per_s="", wall_s=1.0, run_dir=f"{d}__{v}", **{"noise_0.1": score - 5}))
    return rows


def test_single_runs_give_no_interval_and_no_probability_of_improvement():
    """One run per dataset: every resample of the stratified bootstrap is that run, so there is no interval to show
    (no `x [x, x]` bracket) and no probability of improvement; the table and the driver's last lines say so."""
    variants = ["a2pr", "td3bc"]
    one = score_rows({(d, v): 1 for d in ("ds-a", "ds-b") for v in variants})
    md = a2pr_sweep.sweep_tables(one, [0.1], variants)
    aggregate = md.split("## Aggregate")[1]
    assert " [" not in aggregate.replace("[95 % CI]", "")  # no bracket anywhere below the per-dataset table
    assert "| a2pr | 2 | 2 | 64.0 (1 run: no interval) | 64.0 (1 run: no interval) |" in md
    assert "| ds-a | a2pr | 1 | 64.0 (1 run: no std) |" in md
    assert "| P(a2pr > td3bc) | 2 | – (needs >= 2 runs per variant on every dataset; give --seeds 2 or more) |" in md
    assert "| **mean over datasets** [95 % CI] | td3bc | 39.0 (1 run: no interval) |" in md
    assert a2pr_sweep.summary_lines(one, variants) == [
        "a2pr, final score over 2 datasets (2 runs): mean 64.0 (1 run: no interval), IQM 64.0 (1 run: no interval)",
        "td3bc, final score over 2 datasets (2 runs): mean 44.0 (1 run: no interval), IQM 44.0 (1 run: no interval)",
        "P(a2pr > td3bc): needs >= 2 runs per variant on every dataset; give --seeds 2 or more"]
    # one dataset of one variant with a single run: still no interval and no P for that variant, the other has both
    mixed = score_rows({("ds-a", "a2pr"): 3, ("ds-b", "a2pr"): 1, ("ds-a", "td3bc"): 3, ("ds-b", "td3bc"): 3})
    agg, poi = a2pr_sweep.aggregate_cells(mixed, variants)
    assert agg["a2pr"][2] == "65.5 (1 run on 1 of 2 datasets: no interval)" and poi["td3bc"] == (2, None)
    assert " [" in agg["td3bc"][2] and " [" in agg["td3bc"][3]
    three = score_rows({(d, v): 3 for d in ("ds-a", "ds-b") for v in variants})
    agg, poi = a2pr_sweep.aggregate_cells(three, variants)
    assert agg["a2pr"][2].startswith("67.0 [") and poi["td3bc"][1].startswith("1.00 [")
    assert "run: no interval" not in a2pr_sweep.sweep_tables(three, [0.1], variants)


def test_results_compare_a2pr_with_each_variant_per_dataset_and_say_where_it_is_above():
    """Per dataset, A2PR − X on final and best scores and P(A2PR > X), with bootstrap intervals; the closing lines
    name the datasets where the whole interval lies above 0, and a single run gives no interval."""
    rows = score_rows({(d, v): 3 for d in ("ds-a", "ds-b") for v in ("a2pr", "td3", "td3bc")})
    for r in rows:  # td3 beats a2pr by 30 on ds-b (a2pr's best is +1 over its final there too)
        if (r["dataset"], r["variant"]) == ("ds-b", "td3"):
            r["final_score"] += 50.0
            r["best_score"] += 50.0
    md = a2pr_sweep.sweep_tables(rows, [], ["a2pr", "td3", "td3bc"])
    assert "| ds-a | td3bc | +20.0 [+" in md and "| ds-b | td3 | -30.0 [-" in md
    assert "| ds-a | td3 | +20.0 [+16.0, +24.0] | +20.0 [+16.0, +24.0] | – | 1.00 [1.00, 1.00] |" in md
    assert "- td3: final on ds-a; best on ds-a; over the run on no dataset" in md
    assert "- td3bc: final on ds-a, ds-b; best on ds-a, ds-b; over the run on no dataset" in md
    for r in rows:  # with each run's mean over its evaluations (results.csv's run_mean_score): its own column
        r["run_mean_score"] = r["final_score"] / 2
    md = a2pr_sweep.sweep_tables(rows, [], ["a2pr", "td3", "td3bc"])
    assert "| ds-a | td3 | +20.0 [+16.0, +24.0] | +20.0 [+16.0, +24.0] | +10.0 [+8.0, +12.0] | 1.00 [" in md
    assert "- td3: final on ds-a; best on ds-a; over the run on ds-a" in md
    one = score_rows({("ds-a", v): 1 for v in ("a2pr", "td3")})
    assert f"| ds-a | td3 | – ({a2pr_sweep.POI_NEEDS}) |" in a2pr_sweep.sweep_tables(one, [], ["a2pr", "td3"])
    assert "- td3: final on no dataset; best on no dataset; over the run on no dataset" in \
        a2pr_sweep.sweep_tables(one, [], ["a2pr", "td3"])


@pytest.mark.parametrize("runs", [1, 3])
def test_aggregate_panels_show_every_mark_inside_their_axes(runs):
    """results.png's mean and IQM panels: every point and interval end lies inside the axes, a margin away from the
    edges (a single run's interval of width 0 used to sit on the edge, invisible)."""
    variants = ["a2pr", "td3bc", "no-gate"]
    rows = score_rows({(d, v): runs for d in ("ds-a", "ds-b", "ds-c") for v in variants})
    runs_planned = [dict(dataset=r["dataset"], variant=r["variant"], seeds=[0], run_dir=r["run_dir"]) for r in rows]
    fig = a2pr_sweep.sweep_figure(runs_planned, rows, [], variants, "test")
    panels = [ax for ax in fig.axes if " over datasets" in ax.get_title()]
    assert len(panels) == 2
    for ax in panels:
        assert ("1 run: no interval" in ax.get_title()) == (runs == 1)
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        marks = [(x, y) for line in ax.get_lines() for x, y in zip(line.get_xdata(), line.get_ydata())]
        assert len(marks) >= len(variants)
        margin = 0.02 * (x1 - x0)
        for x, y in marks:
            assert x0 + margin < x < x1 - margin and y0 < y < y1, (ax.get_title(), x, (x0, x1))
        for i in range(len(variants)):  # each variant visible: a marker, or an interval of some width
            at = [line for line in ax.get_lines() if set(line.get_ydata()) == {i}]
            assert any(line.get_marker() not in ("None", "", None) or np.ptp(line.get_xdata()) > 0 for line in at)


# ================================================================================================================
# The plan and the command line
# ================================================================================================================
def test_plan_suites_seed_blocks_variants_and_flags_over_presets(tmp_path):
    runs = a2pr_sweep.plan_sweep(sweep_args(tmp_path, "paper", "--seeds", "5", "--num-seeds", "2",
                                            "--variants", "a2pr,td3bc,no-gate,vae-only"))
    assert len(runs) == 9 * 4 * 3
    assert sorted({r["dataset"] for r in runs}) == sorted(a2pr_sweep.PAPER_SCORES)
    assert [r["seeds"] for r in runs[:3]] == [[0, 1], [2, 3], [4]]
    assert [Path(r["run_dir"]).name for r in runs[:3]] == [
        "hopper-medium-v2__a2pr__seeds0-1", "hopper-medium-v2__a2pr__seeds2-3", "hopper-medium-v2__a2pr__seeds4-4"]
    by = {(r["dataset"], r["variant"], r["seeds"][0]): a2pr.resolve_args(r["args"])[0] for r in runs}
    cheetah = by[("halfcheetah-medium-expert-v2", "td3bc", 2)]
    assert (cheetah.alpha, cheetah.bc_weight, cheetah.seed, cheetah.num_seeds) == (40.0, 10.0, 2, 2)  # its preset
    assert (cheetah.bc_target, cheetah.gate) == ("data", "always")
    assert cheetah.total_steps == 40 and cheetah.eval_freq == 20 and cheetah.critic_hidden == 8  # flags win
    no_gate = by[("hopper-medium-v2", "no-gate", 0)]
    assert (no_gate.bc_target, no_gate.gate) == ("select", "always")
    assert by[("hopper-medium-v2", "vae-only", 0)].bc_target == "vae"
    assert by[("hopper-medium-v2", "a2pr", 4)].num_seeds == 1
    assert cheetah.save_dir == str(tmp_path) and cheetah.run_name == "halfcheetah-medium-expert-v2__td3bc__seeds2-3"
    alpha = a2pr_sweep.plan_sweep(sweep_args(tmp_path, "paper", "--seeds", "1", "--alpha", "7"))
    assert {a2pr.resolve_args(r["args"])[0].alpha for r in alpha} == {7.0}
    mixes = a2pr_sweep.plan_sweep(sweep_args(tmp_path, "mixes", "--seeds", "1"))
    assert len(mixes) == 12 and (mixes[0]["args"].env, mixes[0]["args"].mix) == \
        ("hopper-random-v2", "hopper-expert-v2:0.01")
    assert {r["args"].mix.split(":")[1] for r in mixes} == {"0.01", "0.05"}
    builtin = a2pr_sweep.plan_sweep(a2pr_sweep.parse_args(["builtin", "--seeds", "1"]))
    assert [r["env"] for r in builtin] == [f"pendulum-{k}-v0" for k in ("random", "medium", "expert", "mostly-random")]
    assert builtin[0]["run_dir"] == str(Path("sweeps/builtin/pendulum-random-v0__a2pr__seeds0-0"))
    assert a2pr.resolve_args(builtin[0]["args"])[0].preset == "pendulum-cpu"


def test_td3_is_offline_td3_and_the_situations_suite_runs_the_four_learners_side_by_side(tmp_path):
    runs = a2pr_sweep.plan_sweep(sweep_args(tmp_path, "situations", "--seeds", "2",
                                            "--variants", "td3,td3bc,no-gate,a2pr", "--bc-weight", "3"))
    assert len(runs) == 5 * 4 and len({r["dataset"] for r in runs}) == 5
    by = {(r["dataset"], r["variant"]): a2pr.resolve_args(r["args"])[0] for r in runs}
    mix = "pendulum-damped-v0+pendulum-expert-v0:0.05"
    td3, td3bc, a2pr_ = by[mix, "td3"], by[mix, "td3bc"], by[mix, "a2pr"]
    assert (td3.env, td3.mix, td3.preset) == ("pendulum-damped-v0", "pendulum-expert-v0:0.05", "pendulum-cpu")
    assert td3.bc_weight == 0.0 and (td3bc.bc_weight, a2pr_.bc_weight) == (3.0, 3.0)  # only td3 drops the constraint
    # with bc_weight 0 the gate is 0 in every state: the actor loss is TD3's -lambda Q alone
    adv = torch.tensor([[1.0, -1.0, 0.0]])
    _, gate, _ = a2pr.select_bc_target(adv, adv, torch.zeros(1, 3, 1), torch.ones(1, 3, 1), td3.bc_weight, td3.eps_a,
                                       bc_target=td3.bc_target, gate=td3.gate)
    assert gate.abs().max() == 0
    assert "td3 (--bc-target data --gate always --bc-weight 0.0)" in a2pr_sweep.variants_line(["td3"])


def test_plan_trains_all_seeds_of_a_task_as_one_batched_run_unless_num_seeds_is_given(tmp_path):
    envs = a2pr_sweep.plan_sweep(a2pr_sweep.parse_args(["envs", "--envs", "pendulum-medium-v0+pendulum-expert-v0:0.05",
                                                        "--seed", "3"]))
    assert len(envs) == 1 and envs[0]["seeds"] == [3, 4, 5, 6, 7] and envs[0]["args"].num_seeds == 5
    assert (envs[0]["args"].env, envs[0]["args"].mix) == ("pendulum-medium-v0", "pendulum-expert-v0:0.05")
    assert Path(envs[0]["run_dir"]).name == "pendulum-medium-v0+pendulum-expert-v0_0.05__a2pr__seeds3-7"
    one = a2pr_sweep.plan_sweep(sweep_args(tmp_path, "builtin", "--seeds", "3", "--num-seeds", "1"))
    assert len(one) == 4 * 3 and {r["args"].num_seeds for r in one} == {1}
    # from Python: given defaults to the training fields that differ from a2pr.Args()
    py = a2pr_sweep.SweepArgs("builtin", seeds=2, train=a2pr.Args(total_steps=40))
    assert py.given == {"total_steps"} and [r["seeds"] for r in a2pr_sweep.plan_sweep(py)] == [[0, 1]] * 4


def test_parser_has_every_a2pr_flag_and_the_sweeps_own(tmp_path):
    text = a2pr_sweep.build_parser().format_help()
    for flag in ("SUITE", "--envs", "--seeds", "--variants", "--sweep-dir", "--task-cpus", "--task-gpus",
                 "--task-retries", "--ray-address", "--noise-levels", "--total-steps", "--eval-freq", "--num-seeds",
                 "--alpha", "--cuda"):
        assert flag in text, flag
    sw = sweep_args(tmp_path, "builtin", "--seeds", "3", "--task-cpus", "2", "--no-normalize-states", "--cuda",
                    "--task-gpus", "0.5")
    assert (sw.suite, sw.seeds, sw.task_cpus, sw.task_gpus, sw.task_retries) == ("builtin", 3, 2.0, 0.5, 3)
    assert (sw.train.total_steps, sw.train.normalize_states, sw.train.cuda) == (40, False, True)
    assert sw.given == {"total_steps", "eval_freq", "eval_episodes", "batch_size", "actor_hidden", "critic_hidden",
                        "value_hidden", "vae_hidden", "normalize_states", "cuda"}
    # results.md's command line is the command: parsed again, it gives the same sweep
    again = a2pr_sweep.parse_args(shlex.split(a2pr_sweep.command_line(sw))[2:])
    assert again == sw


def test_config_file_gives_the_training_settings_and_flags_win(tmp_path):
    settings = dataclasses.asdict(a2pr.Args(alpha=7.0, total_steps=123, tau=0.01))
    (tmp_path / "config.json").write_text(json.dumps(dict(settings=settings)))
    sw = a2pr_sweep.parse_args(["builtin", "--config", str(tmp_path / "config.json"), "--total-steps", "40"])
    assert (sw.train.alpha, sw.train.tau, sw.train.total_steps) == (7.0, 0.01, 40)
    assert "alpha" not in sw.given and "total_steps" in sw.given


@pytest.mark.parametrize("argv, expect", [
    (["builtin", "--variants", "a2pr,best"], "--variants must list distinct names among"),
    (["builtin", "--seeds", "0"], "--seeds must be a positive integer"),
    (["builtin", "--num-seeds", "0"], "--num-seeds must be a positive integer"),
    (["builtin", "--task-retries", "-1"], "--task-retries must be an integer >= 0"),
    (["builtin", "--task-cpus", "0"], "--task-cpus must be a positive number"),
    (["builtin", "--task-cpus", "1e300"], "--task-cpus must be at most 2,147,483,647, got 1e+300"),
    (["builtin", "--seeds", "10000000000000000000"], "--seeds must be at most 2,147,483,647, got a 20-digit number"),
    (["builtin", "--gate", "always"], "--gate is set per run by the sweep; use --variants"),
    (["builtin", "--env", "hopper-medium-v2"], "--env is set per run by the sweep; use the suite, or envs --envs"),
    (["builtin", "--resume", "x"], "--resume is set per run by the sweep; use the same a2pr_sweep.py command"),
    (["builtin", "--export", "x"], "--export is not a sweep flag; use python a2pr.py --export RUN_DIR"),
    (["envs"], "the suite envs needs --envs A,B"),
    (["builtin", "--envs", "pendulum-medium-v0"], "--envs goes with the suite envs, not builtin"),
    (["builtin", "--noise-levels", "0,-1"], "--noise-levels must be stds >= 0"),
    (["builtin", "--cuda", "--task-gpus", "0"], "--cuda with --task-gpus 0"),
    (["builtin", "--total-steps", "-1"], "--total-steps must be a positive integer"),
    (["all"], "invalid choice: 'all'"),
    ([], "the following arguments are required: SUITE"),
    (["builtin", "--totl-steps", "5"], "did you mean --total-steps?"),
])
def test_bad_flags_get_one_line_errors(tmp_path, capsys, argv, expect):
    try:  # in-process (a subprocess per case would cost a torch import each)
        code = a2pr_sweep.main([*argv, "--sweep-dir", str(tmp_path / "sw")])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0, err
    assert err.startswith("a2pr_sweep.py: error: ") and expect in err, err
    assert not (tmp_path / "sw").exists()


def test_without_ray_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert a2pr_sweep.main(["builtin", "--sweep-dir", str(tmp_path / "sw")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs Ray" in err and "pip install -r requirements-sweep.txt" in err, err
    assert not (tmp_path / "sw").exists()


def test_importing_a2pr_sweep_does_not_import_ray_and_a2pr_does_not_import_the_sweep():
    code = ("import a2pr, sys; alone = 'a2pr_sweep' in sys.modules; import a2pr_sweep; "
            "print(alone, 'ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False False", r.stderr


# ================================================================================================================
# Runs: one task called directly, then sweeps on a local Ray and on a two-node cluster
# ================================================================================================================
def test_task_resumes_an_unfinished_run_to_the_uninterrupted_result(tmp_path):
    """The task a Ray worker runs, called directly: a run folder cut short (a checkpoint, no finished summary) is
    resumed and ends bit-identical to the uninterrupted run; a finished folder is left alone."""
    run = a2pr_sweep.plan_sweep(sweep_args(tmp_path / "sw", "envs", "--envs", "pendulum-medium-v0", "--seeds", "1"))[0]
    whole = a2pr.train(dataclasses.replace(run["args"], save_dir=str(tmp_path), run_name="whole"))
    a2pr.train(dataclasses.replace(run["args"], total_steps=20))  # the same folder, cut at step 20
    resolved = a2pr.resolve_args(run["args"])[0]
    assert a2pr_sweep.sweep_run_state(run, resolved.total_steps, []) == "resume"
    task = dict(run_dir=run["run_dir"], args=dataclasses.asdict(run["args"]), total_steps=40, noise_levels=[0.0],
                eval_episodes=1, threads=1)
    a2pr_sweep.run_sweep_task(task)
    assert a2pr_sweep.sweep_run_state(run, 40, [0.0]) == "done"
    assert_same_state(checkpoint(run["run_dir"])["agent"], checkpoint(whole["run_dir"])["agent"])
    info = json.loads((Path(run["run_dir"]) / "sweep.json").read_text())
    assert info["resumed_at"] == [20] and info["threads"] == 1
    noise = json.loads((Path(run["run_dir"]) / "noise.json").read_text())
    assert noise["episodes"] == 1 and len(noise["scores"]["0.0"]) == 1
    before = (Path(run["run_dir"]) / "checkpoint.pt").stat().st_mtime_ns
    a2pr_sweep.run_sweep_task(task)
    assert (Path(run["run_dir"]) / "checkpoint.pt").stat().st_mtime_ns == before


def test_results_files_before_any_run_has_finished(tmp_path):
    """results.csv (a2pr's CSV writer) has the sweep's columns, a noise column per level, and no rows yet."""
    sw = sweep_args(tmp_path / "sw", "builtin", "--noise-levels", "0.1")
    a2pr_sweep.write_sweep_results(sw, a2pr_sweep.plan_sweep(sw), tmp_path / "sw", [0.1])
    with open(tmp_path / "sw" / "results.csv", newline="") as f:
        assert list(csv.reader(f)) == [["dataset", "variant", "seed", "final_score", "best_score", "run_mean_score",
                                        "noise_0.1", "steps", "steps_per_s", "wall_s", "seeds_in_run", "host",
                                        "run_dir"]]
    assert "0 of 4 run folders finished" in (tmp_path / "sw" / "results.md").read_text()
    assert not (tmp_path / "sw" / "results.png").exists()


@pytest.mark.slow
def test_builtin_end_to_end_on_a_local_ray_and_rerun_does_nothing(tmp_path):
    """The README's first sweep (the pendulum-cpu preset's networks), made short: 4 datasets x 2 variants, each
    task training its 2 seeds as one batched run; then the same command again finds everything done."""
    pytest.importorskip("ray")
    argv = ["builtin", "--seeds", "2", "--variants", "a2pr,td3bc", "--noise-levels", "0,0.1", "--total-steps", "200",
            "--eval-freq", "100", "--eval-episodes", "2", "--sweep-dir", "DIR"]
    r = run_sweep_cli(*argv, timeout=400, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "8 new" in r.stderr and "8/8 done, 0 running, 0 queued" in r.stderr
    sw = tmp_path / "DIR"
    with open(sw / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2 * 2 and {r["variant"] for r in rows} == {"a2pr", "td3bc"}
    assert {r["seeds_in_run"] for r in rows} == {"2"}  # both seeds of a task trained as one batched run
    assert all(np.isfinite(float(r[c])) for r in rows for c in ("final_score", "best_score", "noise_0", "noise_0.1"))
    assert {r["steps"] for r in rows} == {"200"}
    md = (sw / "results.md").read_text()
    for text in ("| pendulum-random-v0 | a2pr | 2 |", "| pendulum-expert-v0 | td3bc | 2 |", "| mean | IQM |",
                 "| a2pr | 4 | 8 |", "| td3bc | 4 | 8 |", "P(a2pr > td3bc)", "σ = 0.1", "torch 2", "ray 2",
                 "2 per Ray task (one batched computation)", "`python a2pr_sweep.py builtin --seeds 2"):
        assert text in md, text
    assert md.count(" [") >= 6  # confidence intervals
    assert (sw / "results.png").read_bytes()[:8] == PNG
    files = sorted(p for p in sw.glob("*/*") if p.suffix in (".pt", ".json", ".csv"))
    stamps = [p.stat().st_mtime_ns for p in files]
    again = run_sweep_cli(*argv, timeout=200, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "(8 finished, 0 to resume, 0 new, 0 to evaluate under noise)" in again.stderr
    assert "Ray tasks" not in again.stderr
    assert [p.stat().st_mtime_ns for p in files] == stamps  # no run trained or evaluated again
    assert results_table(sw) == [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes of one CPU each on this machine, shared by the cluster tests."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # Ray >= 2.5x turns token auth on for a local cluster once this process has started one (RAY_AUTH_MODE=token in
    # os.environ), and looks for the token under ~/.ray; every test here has its own HOME, so a cluster shared by
    # several tests would find none and its GCS would abort. A loopback-only test cluster runs without tokens.
    with pytest.MonkeyPatch.context() as mp:  # a module-scoped fixture cannot take the monkeypatch fixture
        mp.setenv("RAY_AUTH_MODE", "disabled")
        cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=False))
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
        import ray

        ray.shutdown()
        cluster.shutdown()


# Two single-seed runs (--num-seeds 1: two Ray tasks), long enough to be killed between checkpoints.
KILL_SWEEP = ["--envs", "pendulum-medium-v0", "--seeds", "2", "--num-seeds", "1", "--total-steps", "400",
              "--eval-freq", "100"]


@pytest.fixture(scope="module")
def cluster_sweep(ray_cluster, tmp_path_factory):
    """An uninterrupted sweep of two single-seed runs on the two-node cluster, reached through --ray-address."""
    sw = tmp_path_factory.mktemp("cluster") / "sw"
    out = a2pr_sweep.sweep(sweep_args(sw, "envs", *KILL_SWEEP, "--ray-address", ray_cluster.address))
    return sw, out


@pytest.mark.slow
def test_runs_on_a_two_node_cluster_through_ray_address(cluster_sweep):
    sw, out = cluster_sweep
    assert len(out["ran"]) == 2 and not out["failed"]
    nodes = {json.loads((Path(d) / "sweep.json").read_text())["node"] for d in out["ran"]}
    assert len(nodes) == 2  # one CPU per node and one CPU per task: the two tasks ran on different nodes
    assert len(results_table(sw)) == 2


@contextlib.contextmanager
def kill_each_writer_after_its_first_checkpoint(sweep_dir: Path, first: str = "checkpoint.pt"):
    """SIGKILL, once per run folder, the process writing it as soon as the folder has `first` (checkpoint.pt; or
    config.json, before any checkpoint) and no summary: a2pr's .lock in the folder holds that process's pid (here a
    Ray worker). Yields {run folder: killed pid}."""
    killed, stop = {}, threading.Event()

    def watch():
        while not stop.wait(0.005):
            for f in sweep_dir.glob(f"*/{first}"):
                d = f.parent
                if d in killed or (d / "summary.json").exists():
                    continue
                if first == "config.json" and (d / "checkpoint.pt").exists():
                    continue
                pid = (d / ".lock").read_text().strip()  # empty for an instant: the lock is taken, the pid not written
                if pid and int(pid) != os.getpid():
                    os.kill(int(pid), signal.SIGKILL)
                    killed[d] = int(pid)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield killed
    finally:
        stop.set()
        watcher.join()


@pytest.fixture
def cluster_reachable(ray_cluster, monkeypatch):
    """The test cluster listens on this machine's own address, not on loopback, which is all conftest's isolation
    lets Python connect to: the driver's check that --ray-address answers (a plain TCP connection) reaches it as Ray's
    own connection, made outside Python, does."""
    host, isolated, lookup = ray_cluster.address.rpartition(":")[0], socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if isinstance(address, tuple) and address[0] == host:
            return _socket.socket.connect(self, address)
        return isolated(self, address)

    def getaddrinfo(name, *a, **k):
        return (_socket.getaddrinfo if name == host else lookup)(name, *a, **k)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.slow
def test_worker_killed_mid_run_is_retried_and_the_table_equals_the_uninterrupted_one(
        cluster_sweep, ray_cluster, cluster_reachable, tmp_path):
    reference, _ = cluster_sweep
    sw = tmp_path / "sw"
    with kill_each_writer_after_its_first_checkpoint(sw) as killed:
        out = a2pr_sweep.sweep(sweep_args(sw, "envs", *KILL_SWEEP, "--ray-address", ray_cluster.address))
    assert not out["failed"]
    assert sorted(killed) == sorted(Path(d) for d in out["ran"]), "every run's worker should have been killed once"
    for d in out["ran"]:
        info = json.loads((Path(d) / "sweep.json").read_text())
        assert info["resumed_at"] and info["attempts"] == 1  # the killed attempt never finished; its rerun resumed
    assert results_table(sw) == results_table(reference)


@pytest.mark.slow
def test_worker_killed_before_its_first_checkpoint_is_retried_from_scratch_to_the_same_table(
        cluster_sweep, ray_cluster, cluster_reachable, tmp_path):
    """Its folder holds config.json and a dead writer's .lock: the retry takes the folder over and starts the run."""
    reference, _ = cluster_sweep
    sw = tmp_path / "sw"
    with kill_each_writer_after_its_first_checkpoint(sw, first="config.json") as killed:
        out = a2pr_sweep.sweep(sweep_args(sw, "envs", *KILL_SWEEP, "--ray-address", ray_cluster.address))
    assert not out["failed"]
    assert sorted(killed) == sorted(Path(d) for d in out["ran"]), "every run's worker should have been killed once"
    assert results_table(sw) == results_table(reference)


# ================================================================================================================
# What a sweep meets: strangers' files in its folder, a second sweep, SIGTERM, an address where nothing listens
# ================================================================================================================
ONE_RUN = ["envs", "--envs", "pendulum-medium-v0", "--seeds", "1", "--noise-levels", "0"]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A sweep folder holding one finished run (its task called directly, no Ray) and no results yet."""
    sw = tmp_path_factory.mktemp("finished") / "sw"
    run = a2pr_sweep.plan_sweep(sweep_args(sw, *ONE_RUN))[0]
    a2pr_sweep.run_sweep_task(dict(run_dir=run["run_dir"], args=dataclasses.asdict(run["args"]), total_steps=40,
                                   noise_levels=[0.0], eval_episodes=1, threads=1))
    return Path(run["run_dir"])


def folder_state(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncated(text: str) -> str:
    return text[:len(text) // 2]


def with_field(name, value):
    return lambda text: json.dumps({**json.loads(text), name: value})


@pytest.mark.parametrize("name, spoil, why, fix", [
    ("summary.json", lambda t: "\x00garbage{", "not JSON", "remove the folder"),
    ("summary.json", truncated, "not JSON", "remove the folder"),
    ("summary.json", lambda t: "[1, 2]", "a JSON list, not an object", "remove the folder"),
    ("summary.json", with_field("final_scores", "abc"), "its final_scores is 'abc'", "remove the folder"),
    ("summary.json", with_field("final_scores", [1.0, 2.0]), "not one score per seed", "remove the folder"),
    ("sweep.json", lambda t: "\x00garbage{", "not JSON", "remove that file (it holds only the run's wall time"),
    ("sweep.json", with_field("wall_s", "x"), "its wall_s is 'x'", "remove that file"),
    ("noise.json", truncated, "not JSON", "the same command then evaluates the noise levels again"),
    ("metrics.csv", lambda t: "\x00\udcff garbage", "not a CSV file", "remove the folder"),  # not UTF-8
    ("metrics.csv", lambda t: "\x00 garbage\n", "no step and time_s columns", "remove the folder"),
    ("metrics.csv", truncated, "is not a row of a2pr's metrics", "remove the folder"),
    ("metrics.csv", lambda t: "step,time_s\n1,2\nx,3\n", "line 3 is not a row of a2pr's metrics", "remove the"),
])
def test_a_bad_file_in_a_run_folder_is_one_line_naming_it_and_nothing_is_written(
        finished_sweep, tmp_path, capsys, name, spoil, why, fix):
    sw = tmp_path / "sw"
    run_dir = sw / finished_sweep.name
    shutil.copytree(finished_sweep, run_dir)
    argv = [*ONE_RUN, *SWEEP_TINY, "--sweep-dir", str(sw)]
    path = run_dir / name
    path.write_bytes(spoil(path.read_text()).encode("utf-8", "surrogateescape"))
    before = folder_state(sw)
    assert a2pr_sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"a2pr_sweep.py: error: {path} cannot be read ("), err
    assert why in err and fix in err, err
    assert folder_state(sw) == before  # nothing written: no results, no lock file, the run folder as it was


def test_the_intact_finished_folder_gives_results(finished_sweep, tmp_path, capsys):
    """The same copy as above, unspoilt: the sweep finds the run finished and writes the results (without Ray)."""
    shutil.copytree(finished_sweep, tmp_path / "sw" / finished_sweep.name)
    assert a2pr_sweep.main([*ONE_RUN, *SWEEP_TINY, "--sweep-dir", str(tmp_path / "sw")]) == 0, capsys.readouterr().err
    assert "1 of 1 run folders finished" in (tmp_path / "sw" / "results.md").read_text()


def start_sweep(*argv, cwd) -> tuple[subprocess.Popen, Path]:
    """A sweep driver in the background, its stderr in a file."""
    err = Path(cwd) / f"driver-{len(list(Path(cwd).glob('driver-*')))}.err"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, str(HERE / "a2pr_sweep.py"), *argv], stderr=f, stdout=f, env=env,
                                cwd=cwd)
    return proc, err


def wait_until(condition, timeout: float, proc: subprocess.Popen, err: Path):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the sweep ended before the test could act: {err.read_text()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def training(sw: Path) -> bool:
    """A Ray worker holds a run folder of the sweep (its pid in the folder's .lock)."""
    return any(p.read_text().strip() for p in sw.glob("*/.lock"))


LONG_RUN = ["envs", "--envs", "pendulum-medium-v0", "--seeds", "1", *SWEEP_TINY, "--total-steps", "4000",
            "--eval-freq", "1000"]


@pytest.mark.slow
def test_a_second_sweep_into_the_same_folder_says_the_first_is_running_those_runs(tmp_path):
    pytest.importorskip("ray")
    first, first_err = start_sweep(*LONG_RUN, "--sweep-dir", "sw", cwd=tmp_path)
    worker = None
    try:
        wait_until(lambda: training(tmp_path / "sw"), 120, first, first_err)
        # Held where the test needs it, whatever the machine's speed: the worker training the run (its pid is in
        # the run folder's .lock) is stopped while the second sweep tries, and continued afterwards.
        worker = int(next(p for p in (tmp_path / "sw").glob("*/.lock") if p.read_text().strip()).read_text())
        os.kill(worker, signal.SIGSTOP)
        second = run_sweep_cli(*LONG_RUN, "--sweep-dir", "sw", cwd=tmp_path)
        assert first.poll() is None, "the first sweep should still be running"
        os.kill(worker, signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        assert second.stderr == (f"a2pr_sweep.py: error: another sweep (pid {first.pid}) is running in sw and is "
                                 "training those runs; wait for it to end, then run this command again (it keeps what "
                                 "the other finished), or give another --sweep-dir\n")
        assert first.wait(300) == 0, first_err.read_text()  # the first sweep undisturbed
    finally:
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGCONT)
        if first.poll() is None:
            first.kill()
    assert "1 of 1 run folders finished" in (tmp_path / "sw" / "results.md").read_text()
    again = run_sweep_cli(*LONG_RUN, "--sweep-dir", "sw", cwd=tmp_path)
    assert again.returncode == 0 and "(1 finished, 0 to resume, 0 new" in again.stderr, again.stderr


@pytest.mark.slow
def test_sigterm_to_the_driver_is_the_usual_interrupted_line_and_exit_143(tmp_path):
    pytest.importorskip("ray")
    driver, err = start_sweep(*LONG_RUN, "--total-steps", "40000", "--sweep-dir", "sw", cwd=tmp_path)
    try:
        wait_until(lambda: training(tmp_path / "sw"), 120, driver, err)
        before = err.read_text()
        driver.send_signal(signal.SIGTERM)
        code = driver.wait(120)
    finally:
        if driver.poll() is None:
            driver.kill()
    after = err.read_text()[len(before):]
    assert code == 143, after
    assert after.strip().splitlines() == [
        "sweep interrupted by SIGTERM: finished runs are kept; the same command resumes the others from their "
        "checkpoints", "a2pr_sweep.py: interrupted by SIGTERM"]  # no Ray stack dump, no traceback


def test_ray_address_where_nothing_listens_fails_in_bounded_time_with_one_line(tmp_path):
    pytest.importorskip("ray")  # without Ray the sweep stops earlier, saying it needs Ray
    with socket.socket() as s:  # a port of this machine that nothing listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    r = run_sweep_cli(*ONE_RUN, *SWEEP_TINY, "--ray-address", f"127.0.0.1:{port}", "--sweep-dir", "sw", timeout=60,
                      cwd=tmp_path)
    assert time.monotonic() - t0 < 30
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"a2pr_sweep.py: error: no Ray cluster at 127.0.0.1:{port} (Connection refused); "
                               f"start one there (ray start --head --port {port})"), r.stderr
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("listener", ["silent", "http/1.1"])
def test_ray_address_where_something_else_listens_fails_in_bounded_time(monkeypatch, listener):
    """A port that accepts connections but is not Ray (a silent one, or a web server such as Ray's own dashboard
    port) makes ray.init retry for ever, inside Ray's C++ client where no Python signal reaches: the driver's gRPC
    readiness check says so within RAY_CONNECT_TIMEOUT_S instead."""
    pytest.importorskip("grpc")  # requirements-sweep.txt
    monkeypatch.setattr(a2pr_sweep, "RAY_CONNECT_TIMEOUT_S", 1)
    if listener == "silent":
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)  # connections complete in the backlog, but nothing is ever sent back
        port, close = srv.getsockname()[1], srv.close
    else:
        import http.server

        quiet = type("Quiet", (http.server.BaseHTTPRequestHandler,), dict(log_message=lambda *a: None))
        web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), quiet)  # a web server: it speaks HTTP/1.1, not gRPC
        threading.Thread(target=web.serve_forever, daemon=True).start()
        port, close = web.server_address[1], lambda: (web.shutdown(), web.server_close())
    t0 = time.monotonic()
    try:
        with pytest.raises(a2pr.A2PRError) as e:
            a2pr_sweep.check_ray_address(f"127.0.0.1:{port}")
    finally:
        close()
    assert time.monotonic() - t0 < 5
    why = "nothing there answers as Ray does within 1 s"  # a silent port and a web server alike
    assert str(e.value) == (f"no Ray cluster at 127.0.0.1:{port} ({why}); start one there (ray start --head --port "
                            f"{port}) or give --ray-address the address that ray start printed")


def test_ctrl_c_while_torch_loads_is_one_line_and_exit_130(tmp_path):
    """As for a2pr.py: a Ctrl-C during the seconds torch takes to import (here a torch whose import raises
    KeyboardInterrupt, first on the path) is one line, not the import machinery's traceback."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise KeyboardInterrupt\n")
    r = subprocess.run([sys.executable, str(HERE / "a2pr_sweep.py"), "builtin"], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=str(tmp_path)), cwd=tmp_path)
    assert (r.returncode, r.stderr, r.stdout) == (130, "a2pr_sweep.py: interrupted while starting\n", "")


@pytest.mark.parametrize("address", [":", "127.0.0.1:99999", "127.0.0.1:", ":6379", "127.0.0.1:0"])
def test_a_ray_address_that_is_not_host_and_port_is_one_line_before_ray_starts(address):
    with pytest.raises(a2pr.A2PRError, match=r"--ray-address must be auto or HOST:PORT with a port from 1 to 65535"):
        a2pr_sweep.check_ray_address(address)


def test_the_sweep_uses_only_the_a2pr_names_that_a2pr_declares_for_it():
    """a2pr.COMPANION_NAMES is the interface between the two files: every a2pr.NAME in a2pr_sweep.py is one of them,
    and each of them exists, so a change to a2pr.py that breaks the companion is seen here, not in a sweep."""
    import ast

    tree = ast.parse((HERE / "a2pr_sweep.py").read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "a2pr"} - {"__file__"}
    assert used <= set(a2pr.COMPANION_NAMES), sorted(used - set(a2pr.COMPANION_NAMES))
    assert all(hasattr(a2pr, name) for name in a2pr.COMPANION_NAMES)
