"""Tests for a2pr.py. Run: pytest  (heavier hypothesis search: A2PR_HYPOTHESIS_PROFILE=thorough pytest)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# Tests never write into the user's home: matplotlib's cache and a2pr's dataset cache go to a temporary folder.
_TMP = Path(tempfile.mkdtemp(prefix="a2pr-tests-"))
os.environ.setdefault("MPLCONFIGDIR", str(_TMP / "mpl"))
os.environ["A2PR_DATA_DIR"] = str(_TMP / "data")

import a2pr  # noqa: E402

HERE = Path(__file__).resolve().parent


def tiny(tmp_path, **kw) -> a2pr.Args:
    """A run small enough for a test: narrow networks, short, two evaluation episodes."""
    base = dict(env="pendulum-mostly-random-v0", total_steps=200, batch_size=32, actor_hidden=16, critic_hidden=16,
                value_hidden=16, vae_hidden=16, eval_freq=100, log_freq=50, eval_episodes=1,
                save_dir=str(tmp_path), run_name="run", quiet=True)
    base.update(kw)
    return a2pr.Args(**base)


def run_cli(*argv, timeout=120, **popen):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(HERE / "a2pr.py"), *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=popen.get("cwd", HERE))


def checkpoint(run_dir) -> dict:
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)


def comparable(history: list[dict]) -> list[dict]:
    """A run's metrics without the wall-clock columns, which legitimately differ between runs."""
    return [{k: v for k, v in r.items() if k not in ("time_s", "charts/SPS")} for r in history]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------------------------
# The trainer end to end
# ----------------------------------------------------------------------------------------------------------------
def test_train_end_to_end_writes_every_result(tmp_path):
    s = a2pr.train(tiny(tmp_path))
    run = Path(s["run_dir"])
    assert s["steps"] == 200 and not s["interrupted"]
    assert np.isfinite(s["final_score"]) and np.isfinite(s["best_score"]) and s["best_score"] >= s["final_score"]
    assert np.isfinite(s["dataset_score"])
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [50, 100, 150, 200]
    for col in ("losses/critic", "losses/value", "losses/vae", "losses/actor", "losses/bc", "charts/SPS",
                "charts/gate_fraction", "charts/vae_target_fraction", "eval/normalized_score_mean"):
        assert all(np.isfinite(float(r[col])) for r in rows if r[col] != ""), col
    assert [r["eval/normalized_score_mean"] != "" for r in rows] == [False, True, False, True]
    assert (run / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "summary.json").read_text())["final_score"] == pytest.approx(s["final_score"])
    ck = checkpoint(run)
    assert ck["step"] == 200 and ck["obs_mean"].shape == (3,)


def test_same_seed_is_bit_identical_and_other_seed_differs(tmp_path):
    a = a2pr.train(tiny(tmp_path, run_name="a"))
    b = a2pr.train(tiny(tmp_path, run_name="b"))
    c = a2pr.train(tiny(tmp_path, run_name="c", seed=1))
    ca, cb, cc = (checkpoint(x["run_dir"]) for x in (a, b, c))
    assert_same_state(ca["agent"], cb["agent"])
    assert comparable(ca["history"]) == comparable(cb["history"])
    assert not torch.equal(ca["agent"]["actor.net.0.weight"], cc["agent"]["actor.net.0.weight"])


def test_resume_equals_uninterrupted(tmp_path):
    whole = a2pr.train(tiny(tmp_path, run_name="whole"))
    a2pr.train(tiny(tmp_path, run_name="split", total_steps=100))
    part = a2pr.train(a2pr.Args(resume=str(tmp_path / "split"), total_steps=200, quiet=True))
    cw, cp = checkpoint(whole["run_dir"]), checkpoint(part["run_dir"])
    assert cp["step"] == 200
    assert_same_state(cw["agent"], cp["agent"])
    assert comparable(cw["history"]) == comparable(cp["history"])
    assert part["final_score"] == whole["final_score"]


def test_ctrl_c_saves_and_resume_is_exact(tmp_path):
    """A real SIGINT at an arbitrary step: the checkpoint is taken between updates, and resuming from it ends
    exactly where the uninterrupted run ends."""
    flags = ["--total-steps", "1500", "--batch-size", "32", "--actor-hidden", "16", "--critic-hidden", "16",
             "--value-hidden", "16", "--vae-hidden", "16", "--eval-freq", "500", "--log-freq", "100",
             "--eval-episodes", "1", "--save-dir", str(tmp_path), "--quiet"]
    proc = subprocess.Popen([sys.executable, str(HERE / "a2pr.py"), *flags, "--run-name", "cut"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck_path = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.time() + 90
    while not ck_path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    step = checkpoint(tmp_path / "cut")["step"]
    assert 0 < step < 1500, "the interrupt should land mid-run"
    assert "--resume" in out + err
    a2pr.train(a2pr.Args(resume=str(tmp_path / "cut"), quiet=True))
    a2pr.main([*flags, "--run-name", "whole"])
    cw, cc = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "cut")
    assert cc["step"] == 1500
    assert_same_state(cw["agent"], cc["agent"])
    assert comparable(cw["history"]) == comparable(cc["history"])


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = a2pr.value_loss

    def poisoned(*args):
        calls["n"] += 1
        out = real(*args)
        return out * float("nan") if calls["n"] >= 130 else out

    monkeypatch.setattr(a2pr, "value_loss", poisoned)
    with pytest.raises(a2pr.A2PRError, match=r"non-finite value loss at step 130.*last good checkpoint"):
        a2pr.train(tiny(tmp_path, save_freq=50))
    ck = checkpoint(tmp_path / "run")
    assert ck["step"] == 100
    assert all(torch.isfinite(v).all() for v in ck["agent"].values())


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_stops_at_once_with_a_clear_message(tmp_path):
    t0 = time.time()
    r = run_cli("--cuda", "--save-dir", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "--cuda" in r.stderr and "no CUDA GPU" in r.stderr
    assert not (tmp_path / "runs").exists() and not list(tmp_path.iterdir())
    assert time.time() - t0 < 30


@pytest.mark.parametrize("argv, expect", [
    (["--batch-size", "-5"], "--batch-size must be a positive integer, got -5"),
    (["--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
    (["--env", "pendulum-expret-v0"], "unknown dataset 'pendulum-expret-v0'; closest: pendulum-expert-v0"),
    (["--preset", "hopper-medum-v2"], "unknown preset 'hopper-medum-v2'"),
    (["--discount", "1.5"], "--discount must be in [0, 1)"),
    (["--bc-target", "best"], "argument --bc-target: invalid choice: 'best'"),
])
def test_bad_flags_get_one_line_errors(tmp_path, argv, expect):
    r = run_cli(*argv, "--save-dir", str(tmp_path), "--total-steps", "10")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert expect in r.stderr


def test_help_has_one_line_per_flag():
    text = a2pr.build_parser().format_help()
    for f in a2pr.dataclasses.fields(a2pr.Args):
        assert f"--{f.name.replace('_', '-')}" in text
        assert f.metadata["help"] and "\n" not in f.metadata["help"]
    assert "--mask" in text


# ----------------------------------------------------------------------------------------------------------------
# Presets and ablation flags
# ----------------------------------------------------------------------------------------------------------------
def test_presets_fill_unset_fields_and_explicit_flags_win():
    args, source = a2pr.resolve_args(a2pr.Args(env="hopper-medium-v2"))
    assert (args.alpha, args.vae_weight, args.bc_weight, args.discount) == (2.5, 1.0, 0.4, 0.995)
    assert args.critic_hidden == 256 and args.vae_hidden == 750 and args.total_steps == 1_000_000
    assert source["bc_weight"] == "preset hopper-medium-v2" and source["batch_size"] == "spec default"
    explicit = a2pr.resolve_args(a2pr.parse_args(["--env", "hopper-medium-v2", "--mask", "2.0"]))[0]
    assert explicit.bc_weight == 2.0 and explicit.discount == 0.995
    spec = a2pr.resolve_args(a2pr.Args(env="hopper-medium-v2", preset="spec"))[0]
    assert (spec.bc_weight, spec.discount) == (1.0, 0.99)
    cpu = a2pr.resolve_args(a2pr.Args())[0]
    assert cpu.preset == "pendulum-cpu" and cpu.actor_hidden < 256


# ----------------------------------------------------------------------------------------------------------------
# Built-in datasets
# ----------------------------------------------------------------------------------------------------------------
def test_builtin_dataset_is_cached_reproducible_and_in_d4rl_layout(tmp_path):
    args = a2pr.Args(env="pendulum-mostly-random-v0", data_dir=str(tmp_path))
    ds = a2pr.load_dataset(args, log=lambda *_: None)
    files = list(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".hdf5"]
    rows, attrs = a2pr.read_d4rl_hdf5(files[0])
    assert set(a2pr.D4RL_KEYS) <= set(rows)
    assert attrs["env_id"] == "Pendulum-v1" and attrs["ref_min_score"] < attrs["ref_max_score"]
    mtime = files[0].stat().st_mtime_ns
    again = a2pr.load_dataset(args, log=lambda *_: None)
    assert files[0].stat().st_mtime_ns == mtime  # read from the cache, not made again
    np.testing.assert_array_equal(ds.observations, again.observations)
    # 200 episodes of 200 steps; the time-out row of every episode has no next state and is dropped
    assert len(ds.rewards) == 200 * 199 and not ds.terminals.any()
    # trajectory-wise 95/5 mix: the last 10 of 200 episodes are the expert's
    scores = a2pr.normalized_score(ds.episode_returns, ds.ref_min_score, ds.ref_max_score)
    assert len(scores) == 200
    assert scores[-10:].min() > 60 and np.median(scores[:190]) < 30


def test_builtin_family_orders_by_quality(tmp_path):
    avg = {}
    for name in ("random", "medium", "expert"):
        ds = a2pr.load_dataset(a2pr.Args(env=f"pendulum-{name}-v0", data_dir=str(tmp_path)), log=lambda *_: None)
        avg[name] = a2pr.normalized_score(ds.episode_returns, ds.ref_min_score, ds.ref_max_score).mean()
    assert abs(avg["random"]) < 10 and 90 < avg["expert"] < 110
    assert avg["random"] + 15 < avg["medium"] < avg["expert"] - 15


def test_qlearning_transitions_follow_d4rl_convention():
    obs = np.arange(6, dtype=np.float32)[:, None]
    rows = dict(observations=obs, actions=obs, rewards=obs[:, 0],
                terminals=np.array([0, 1, 0, 0, 0, 0], bool), timeouts=np.array([0, 0, 0, 1, 0, 0], bool))
    tr = a2pr.qlearning_transitions(rows)
    # row 3 is cut by a time-out (dropped), row 5 is the file's last (dropped); row 1 is a true terminal
    np.testing.assert_array_equal(tr["observations"][:, 0], [0, 1, 2, 4])
    np.testing.assert_array_equal(tr["next_observations"][:, 0], [1, 2, 3, 5])
    np.testing.assert_array_equal(tr["terminals"], [0, 1, 0, 0])


def test_normalized_score_matches_d4rl_definition():
    assert a2pr.normalized_score(-20.272305, -20.272305, 3234.3) == pytest.approx(0.0)
    assert a2pr.normalized_score(3234.3, -20.272305, 3234.3) == pytest.approx(100.0)
    assert a2pr.normalized_score(1607.0139, -20.272305, 3234.3) == pytest.approx(50.0, abs=1e-4)


def test_eval_obs_noise_changes_returns_and_zero_noise_is_deterministic(tmp_path):
    s = a2pr.train(tiny(tmp_path, total_steps=100))
    ck = checkpoint(s["run_dir"])
    args = a2pr.resolve_args(a2pr.Args(**ck["args"]))[0]
    agent = a2pr.Agent([args.seed], 3, 1, args)
    agent.load_state_dict(ck["agent"])
    ev = dict(env_id="Pendulum-v1", obs_mean=ck["obs_mean"], obs_std=ck["obs_std"], action_low=ck["action_low"],
              action_high=ck["action_high"], episodes=2, seed=7)
    clean1, clean2 = a2pr.evaluate(agent.actor, **ev), a2pr.evaluate(agent.actor, **ev)
    noisy = a2pr.evaluate(agent.actor, **ev, obs_noise=0.5)
    np.testing.assert_array_equal(clean1, clean2)
    assert not np.allclose(clean1, noisy)
