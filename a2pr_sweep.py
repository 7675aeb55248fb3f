"""Many A2PR runs at once on Ray: the companion of a2pr.py for suites of datasets, seeds and ablations.

A sweep trains every (dataset, variant, block of seeds) of a suite as one Ray task, on this machine or on a Ray
cluster; each task is an ordinary `a2pr.train(args)` call in its own run folder. Finished runs are skipped and
unfinished ones resume from their checkpoints, so the same command continues a sweep that was stopped. At the end
it writes, under --sweep-dir: results.csv (one row per seed), results.md (mean ± std per dataset with the paper's
score beside it; mean and IQM over datasets with stratified-bootstrap 95 % CIs; probability of improvement; scores
under observation noise) and results.png. The statistics follow rliable (Agarwal et al., NeurIPS 2021), in numpy.

    pip install -r requirements-sweep.txt                            # Ray (a2pr.py itself never needs it)
    python a2pr_sweep.py builtin --variants a2pr,td3bc               # 4 Pendulum datasets x 2 variants x 5 seeds
    python a2pr_sweep.py paper --cuda --task-gpus 0.25 --ray-address auto    # the paper's 9 D4RL sets on a cluster
    python a2pr_sweep.py envs --envs hopper-random-v2+hopper-expert-v2:0.01 --seeds 3 --total-steps 200000

Every flag of a2pr.py (--total-steps, --eval-freq, --alpha, --cuda, ...) is given to every run, and wins over the
per-dataset presets as in a single run; --num-seeds N splits each dataset's seeds into Ray tasks of N (default: all
of --seeds in one task, trained as one batched computation, which is faster per seed than one seed at a time).
On a cluster every node needs a2pr.py and this file at the same path, and --sweep-dir on a shared filesystem.
While it runs, the driver holds --sweep-dir/.sweep.lock: a second sweep into the same folder stops with one line.

Reading map: constants and SweepArgs · statistics (iqm ... stratified_bootstrap_ci) · the plan (plan_sweep) · one
Ray task (run_sweep_task) · the driver (sweep) · results (collect_sweep, sweep_tables, plot_sweep) · command line.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import numpy as np
    import torch

    import a2pr
except KeyboardInterrupt:  # Ctrl-C while torch loads (seconds): one line, as a2pr.py prints, not a traceback
    if __name__ != "__main__":
        raise
    print("a2pr_sweep.py: interrupted while starting", file=sys.stderr)
    sys.exit(130)

# The ablations as a2pr's flags (spec 4): which action the actor is pulled to, and in which states.
SWEEP_VARIANTS = {
    "a2pr": dict(bc_target="select", gate="adaptive"),   # A2PR: advantage selection, adaptive gate
    "td3bc": dict(bc_target="data", gate="always"),      # TD3+BC's actor loss: dataset action, every state
    "no-gate": dict(bc_target="select", gate="always"),  # selection kept, constraint in every state
    "vae-only": dict(bc_target="vae", gate="adaptive"),  # VAE action always (no comparison), adaptive gate
    "td3": dict(bc_target="data", gate="always", bc_weight=0.0),  # offline TD3: no behaviour constraint anywhere
}
_MIX_FAMILIES = ("hopper", "halfcheetah", "walker2d")
SWEEP_SUITES = {
    "paper": [f"{f}-{k}-v2" for k in ("medium", "medium-replay", "medium-expert") for f in _MIX_FAMILIES],
    "mixes": [f"{f}-random-v2+{f}-{good}-v2:{frac}" for f in _MIX_FAMILIES for good in ("expert", "medium")
              for frac in ("0.01", "0.05")],
    "builtin": [f"pendulum-{k}-v0" for k in ("random", "medium", "expert", "mostly-random")],  # by data quality
    # Built-in data from narrow and good to wide and bad: where no constraint, a uniform one and A2PR's choice fail.
    "situations": ["pendulum-expert-v0", "pendulum-mostly-random-v0", "pendulum-damped-v0+pendulum-expert-v0:0.05",
                   "pendulum-damped-v0+pendulum-expert-v0:0.2", "pendulum-medium-damped-v0"],
}
# A2PR's normalised scores in the paper's table (spec), 1M steps.
PAPER_SCORES = {"halfcheetah-medium-v2": 68.6, "hopper-medium-v2": 100.8, "walker2d-medium-v2": 89.7,
                "halfcheetah-medium-replay-v2": 56.6, "hopper-medium-replay-v2": 101.5,
                "walker2d-medium-replay-v2": 94.4, "halfcheetah-medium-expert-v2": 98.3,
                "hopper-medium-expert-v2": 112.1, "walker2d-medium-expert-v2": 114.6}
BOOTSTRAP_REPS = 10_000
RAY_CONNECT_TIMEOUT_S = 10  # how long --ray-address may take to accept a connection and answer as Ray does
RAY_INSTALL = "pip install -r requirements-sweep.txt (or: pip install 'ray>=2.40,<3')"
# a2pr.py flags that the sweep sets for every run itself, each with what to give the sweep instead.
SET_PER_RUN = {"env": "the suite, or envs --envs A,B", "mix": "ENV+NAME:FRAC in --envs", "bc_target": "--variants",
               "gate": "--variants", "resume": "the same a2pr_sweep.py command again", "run_name": "--sweep-dir",
               "save_dir": "--sweep-dir"}
# a2pr.py flags that do something other than train: they have no meaning in a sweep.
NOT_TRAINING = {"export": "python a2pr.py --export RUN_DIR", "best": "python a2pr.py --export RUN_DIR --best",
                "benchmark": "python a2pr.py --benchmark update"}
# What a resumed run takes from the sweep rather than from its checkpoint (a2pr's --resume lets exactly these change).
RESUME_FOLLOWS = tuple(k for k in a2pr.RESUME_MAY_CHANGE if k not in ("resume", "quiet"))


@dataclass
class SweepArgs:
    """The sweep's own settings (its flags), the training settings every run starts from (a2pr's Args) and which of
    those the user gave (None: the fields of `train` that differ from a2pr.Args())."""
    suite: str = a2pr.arg(dataclasses.MISSING, "paper (the paper's 9 D4RL sets), mixes (random data + 1 or 5 percent "
                          "expert/medium), builtin (Pendulum: random, medium, expert, mostly-random), situations "
                          "(Pendulum data from narrow and good to wide and bad) or envs (--envs)",
                          choices=("paper", "mixes", "builtin", "situations", "envs"), metavar="SUITE", positional=True)
    envs: str | None = a2pr.arg(None, "with the suite envs: these datasets, comma-separated; ENV+NAME:FRAC for a --mix",
                                metavar="A,B")
    seeds: int = a2pr.arg(5, "seeds per dataset and variant, --seed onwards (default 5); all in one Ray task unless "
                          "--num-seeds N splits them into tasks of N")
    variants: str = a2pr.arg("a2pr", "side by side, among a2pr, td3bc (--bc-target data --gate always), no-gate "
                             "(--gate always), vae-only (--bc-target vae), td3 (--bc-weight 0: offline TD3, no "
                             "constraint) (default a2pr)", metavar="V,...")
    sweep_dir: str | None = a2pr.arg(None, "folder of its run folders and results (default sweeps/SUITE)",
                                     metavar="DIR")
    task_cpus: float = a2pr.arg(1.0, "CPU cores per Ray task; each task runs torch on that many threads")
    task_gpus: float | None = a2pr.arg(None, "GPUs per Ray task, e.g. 0.25 packs four tasks on one GPU (default: 1 "
                                       "with --cuda, else 0)")
    task_retries: int = a2pr.arg(3, "times Ray reruns a task whose worker died; the rerun resumes the checkpoint "
                                 "(default 3)")
    ray_address: str | None = a2pr.arg(None, "Ray cluster to run on, e.g. auto or HOST:6379 (default $RAY_ADDRESS, "
                                       "else a local Ray on this machine)", metavar="ADDR")
    noise_levels: str | None = a2pr.arg(None, "also evaluate every final policy under Gaussian observation noise of "
                                        "these stds, e.g. 0,0.01,0.05,0.1", metavar="S,...")
    train: a2pr.Args = field(default_factory=a2pr.Args)
    given: frozenset[str] | None = None

    def __post_init__(self):
        if self.given is None:
            defaults = a2pr.Args()
            self.given = frozenset(f.name for f in dataclasses.fields(a2pr.Args)
                                   if getattr(self.train, f.name) != getattr(defaults, f.name))


# --- statistics (rliable's definitions, numpy only) ---------------------------------------------------------------
def iqm(scores, axis=None):
    """Interquartile mean: the mean of the middle 50 % of the scores (= scipy.stats.trim_mean(x, 0.25), as rliable;
    int(n/4) scores are cut at each end). axis=-1 computes one IQM per row."""
    x = np.sort(np.asarray(scores, dtype=np.float64), axis=axis)
    if axis is None:
        x = x.ravel()
    n = x.shape[-1]
    cut = int(0.25 * n)
    return x[..., cut:n - cut].mean(-1)


def aggregate_mean(per_task):
    """Mean over tasks of each task's mean score (each task counts once, whatever its number of runs)."""
    return np.mean([np.asarray(t, dtype=np.float64).mean(-1) for t in per_task], axis=0)


def aggregate_iqm(per_task):
    """IQM of all runs of all tasks together (rliable's IQM of the runs x tasks score matrix)."""
    return iqm(np.concatenate([np.asarray(t, dtype=np.float64) for t in per_task], axis=-1), axis=-1)


def probability_of_improvement(x, y):
    """P(X > Y) as rliable defines it: for each task, the probability that a random run of X scores higher than a
    random run of Y (ties count 1/2, the Mann-Whitney U statistic / (n m)), averaged over tasks. x and y are lists
    of per-task score arrays (the same tasks in the same order); arrays of shape (R, n) give R values at once."""
    if len(x) != len(y) or not len(x):
        raise ValueError("probability_of_improvement needs the same, non-empty list of tasks for x and y")
    per_task = []
    for xt, yt in zip(x, y):
        xt, yt = np.asarray(xt, dtype=np.float64)[..., :, None], np.asarray(yt, dtype=np.float64)[..., None, :]
        per_task.append(((xt > yt) + 0.5 * (xt == yt)).mean((-2, -1)))
    return np.mean(per_task, axis=0)


def stratified_bootstrap_ci(groups, stat, reps: int = BOOTSTRAP_REPS, seed: int = 0, level: float = 0.95):
    """(point, low, high): stat on the data, and the percentile confidence interval of stat over `reps` stratified
    bootstrap resamples: the runs of each group (a task; for a comparison, a task of one algorithm) are drawn with
    replacement within that group, independently of the others (rliable's StratifiedBootstrap). stat takes a list
    of per-group arrays, of shape (n,) for the point and (reps, n) for the resamples. Deterministic given seed."""
    groups = [np.asarray(g, dtype=np.float64).ravel() for g in groups]
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("stratified_bootstrap_ci needs at least one score in every group")
    rng = np.random.default_rng(seed)
    point = float(stat(groups))
    boot = np.asarray(stat([g[rng.integers(0, len(g), size=(reps, len(g)))] for g in groups]), dtype=np.float64)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(boot, [tail, 100.0 - tail])
    return point, float(low), float(high)


# --- the plan: which runs, in which folders ----------------------------------------------------------------------
def _sweep_list(text, what: str) -> list[str]:
    items = [x.strip() for x in str(text or "").split(",") if x.strip()]
    if not items:
        raise a2pr.A2PRError(f"{what} must be a comma-separated list, got {text!r}")
    return items


def sweep_datasets(sw: SweepArgs) -> list[str]:
    if sw.suite not in (*SWEEP_SUITES, "envs"):
        raise a2pr.A2PRError(f"unknown suite {sw.suite!r}; known: {', '.join(SWEEP_SUITES)}, envs")
    if sw.suite != "envs":
        if sw.envs:
            raise a2pr.A2PRError(f"--envs goes with the suite envs, not {sw.suite}: give envs --envs A,B,...")
        return SWEEP_SUITES[sw.suite]
    if not sw.envs:
        raise a2pr.A2PRError("the suite envs needs --envs A,B,... (datasets; ENV+NAME:FRAC for a mix)")
    return _sweep_list(sw.envs, "--envs")


def sweep_variants(sw: SweepArgs) -> list[str]:
    variants = _sweep_list(sw.variants, "--variants")
    if any(v not in SWEEP_VARIANTS for v in variants) or len(set(variants)) < len(variants):
        raise a2pr.A2PRError(f"--variants must list distinct names among {', '.join(SWEEP_VARIANTS)}, "
                             f"got {sw.variants!r}")
    return variants


def noise_levels(sw: SweepArgs) -> list[float]:
    if sw.noise_levels is None:
        return []
    try:
        levels = [float(x) for x in _sweep_list(sw.noise_levels, "--noise-levels")]
    except ValueError:
        levels = [float("nan")]
    if not all(math.isfinite(x) and x >= 0 for x in levels):
        raise a2pr.A2PRError(f"--noise-levels must be stds >= 0, comma-separated, e.g. 0,0.01,0.05,0.1, got "
                             f"{sw.noise_levels!r}")
    return sorted(set(levels))


def seeds_per_task(sw: SweepArgs) -> int:
    """--num-seeds if given, else all of --seeds: one batched computation trains K seeds faster than K runs of one."""
    return sw.train.num_seeds if "num_seeds" in sw.given else sw.seeds


def task_gpus(sw: SweepArgs) -> float:
    return (1.0 if sw.train.cuda else 0.0) if sw.task_gpus is None else sw.task_gpus


def check_sweep_flags(sw: SweepArgs) -> None:
    """One clear line per mistake in the sweep's own flags, or an a2pr.py flag that a sweep cannot take."""
    per_run, other = sorted(sw.given & SET_PER_RUN.keys()), sorted(sw.given & NOT_TRAINING.keys())
    if per_run:
        raise a2pr.A2PRError(f"--{per_run[0].replace('_', '-')} is set per run by the sweep; use "
                             f"{SET_PER_RUN[per_run[0]]}")
    if other:
        raise a2pr.A2PRError(f"--{other[0].replace('_', '-')} is not a sweep flag; use {NOT_TRAINING[other[0]]}")
    a2pr.check_fields(sw, {"a positive integer": ["seeds"], "an integer >= 0": ["task_retries"],
                           "a positive number": ["task_cpus"]})
    a2pr.check_fields(sw.train, {"a positive integer": ["num_seeds"]})  # before plan_sweep splits seeds by it
    if sw.task_cpus > a2pr.LARGEST["count"]:  # torch's thread count in each worker is an int32
        raise a2pr.A2PRError(f"--task-cpus must be at most {a2pr.LARGEST['count']:,}, got {sw.task_cpus:g}")
    gpus = task_gpus(sw)
    if not (math.isfinite(gpus) and gpus >= 0):
        raise a2pr.A2PRError(f"--task-gpus must be a number >= 0, got {sw.task_gpus!r}")
    if sw.train.cuda and gpus == 0:
        raise a2pr.A2PRError("--cuda with --task-gpus 0: Ray would hide the GPUs from the tasks; give --task-gpus > 0")


def plan_sweep(sw: SweepArgs) -> list[dict]:
    """Every run of the sweep: one per (dataset, variant, block of seeds), in a deterministic folder
    `{dataset}__{variant}__seeds{first}-{last}` under --sweep-dir. A run's Args is the sweep's training Args with the
    dataset, seeds and ablation fields replaced, so a2pr.py flags given to the sweep apply to every run and win over
    presets, and preset fields left unset are resolved per dataset by a2pr.resolve_args, as for a single run."""
    datasets, variants = sweep_datasets(sw), sweep_variants(sw)
    check_sweep_flags(sw)
    noise_levels(sw)
    sweep_dir = Path(sw.sweep_dir or Path("sweeps") / sw.suite)
    base = dataclasses.replace(sw.train, resume=None, quiet=True, save_dir=str(sweep_dir),
                               data_dir=str(a2pr.data_dir(sw.train)))
    seeds, per_task = list(range(sw.train.seed, sw.train.seed + sw.seeds)), seeds_per_task(sw)
    runs = []
    for dataset in datasets:
        env, _, mix = dataset.partition("+")
        for variant in variants:
            for i in range(0, len(seeds), per_task):
                block = seeds[i:i + per_task]
                folder = re.sub(r"[^\w.+-]", "_", f"{dataset}__{variant}__seeds{block[0]}-{block[-1]}")
                run_args = dataclasses.replace(base, env=env, mix=mix or None, seed=block[0], num_seeds=len(block),
                                               run_name=folder, **SWEEP_VARIANTS[variant])
                runs.append(dict(dataset=dataset, env=env, mix=mix or None, variant=variant, seeds=block,
                                 run_dir=str(sweep_dir / folder), args=run_args))
    return runs


def sweep_run_state(run: dict, total_steps: int, levels: list[float]) -> str:
    """done (finished, every noise level evaluated) | noise (finished, noise levels missing) | resume (a checkpoint,
    no finished summary) | new."""
    run_dir = Path(run["run_dir"])
    summary = _read_json(run_dir / a2pr.RUN_FILES["summary"])
    if not summary.get("interrupted", True) and summary.get("steps", 0) >= total_steps:
        have = _read_json(run_dir / "noise.json").get("scores", {})
        return "done" if all(repr(x) in have for x in levels) else "noise"
    return "resume" if (run_dir / a2pr.RUN_FILES["checkpoint"]).exists() else "new"


# What to do about a run folder's file that is not what a2pr and the sweep wrote there (truncated, garbage, foreign).
_FILE_FIX = {a2pr.RUN_FILES["summary"]: "remove the folder {run_dir}; the same command then trains that run again",
             a2pr.RUN_FILES["csv"]: "remove the folder {run_dir}; the same command then trains that run again",
             "sweep.json": "remove that file (it holds only the run's wall time and host), then run the same command "
                           "again",
             "noise.json": "remove that file; the same command then evaluates the noise levels again"}


def _bad_file(path: Path, why: str) -> a2pr.A2PRError:
    return a2pr.A2PRError(f"{path} cannot be read ({why}); {_FILE_FIX[path.name].format(run_dir=path.parent)}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _list_of(check):
    return lambda x: isinstance(x, list) and all(check(v) for v in x)


# The fields of a run folder's JSON files that the sweep reads, each with the check its value must pass.
_JSON_FIELDS = {
    a2pr.RUN_FILES["summary"]: dict(interrupted=lambda x: isinstance(x, bool), steps=_is_int, seeds=_list_of(_is_int),
                         final_scores=_list_of(_is_number), best_scores=_list_of(lambda x: x is None or _is_number(x))),
    "sweep.json": dict(wall_s=_is_number, host=lambda x: isinstance(x, str), attempts=_is_int,
                       resumed_at=_list_of(_is_int)),
    "noise.json": dict(episodes=_is_int, scores=lambda x: isinstance(x, dict) and all(
        _list_of(_is_number)(v) for v in x.values())),
}


def _read_json(path: Path) -> dict:
    """A run folder's summary.json, sweep.json or noise.json ({} where there is none), checked: a JSON object whose
    fields the sweep reads have the right types (a finished summary has them all, one score per seed). Anything
    else is one line naming the file and what to do, never a traceback in the driver."""
    if not path.exists():
        return {}
    try:
        out = json.loads(path.read_text())
    except OSError as e:
        raise _bad_file(path, e.strerror or type(e).__name__) from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise _bad_file(path, "not JSON") from None
    if not isinstance(out, dict):
        raise _bad_file(path, f"a JSON {type(out).__name__}, not an object")
    fields = _JSON_FIELDS[path.name]
    for k, ok in fields.items():
        if k in out and not ok(out[k]):
            raise _bad_file(path, f"its {k} is {str(out[k])[:40]!r}")
    if path.name == a2pr.RUN_FILES["summary"] and out.get("interrupted") is False:
        missing = [k for k in fields if k not in out]
        if missing:
            raise _bad_file(path, f"a finished run's summary without {', '.join(missing)}")
        if not len(out["seeds"]) == len(out["final_scores"]) == len(out["best_scores"]):
            raise _bad_file(path, "not one score per seed")
    return out


def check_run_folder(run: dict, resolved: a2pr.Args) -> None:
    """A folder left by an earlier sweep must hold the run this command asks for, else its scores would be mixed
    into the table silently."""
    run_dir = Path(run["run_dir"])
    if not (run_dir / a2pr.RUN_FILES["checkpoint"]).exists():
        return
    saved = a2pr.load_checkpoint(run_dir)["args"]
    diff = [k for k, v in dataclasses.asdict(resolved).items()
            if k not in a2pr.SAME_RESULTS and k in saved and saved[k] != v]
    if diff:
        what = ", ".join(f"{k}={saved[k]!r} there, {getattr(resolved, k)!r} now" for k in diff[:3])
        raise a2pr.A2PRError(f"{run_dir} was trained with other settings ({what}); give another --sweep-dir or "
                             "remove that folder")


# --- one Ray task ------------------------------------------------------------------------------------------------
def run_sweep_task(task: dict) -> dict:
    """What a Ray worker runs for one run folder: train it (fresh, or resumed from its checkpoint), then evaluate
    the final policy under observation noise, and record wall time, host and node in sweep.json. Plain dicts in and
    out. Ray reruns the task if its worker dies; the rerun resumes from the last checkpoint."""
    torch.set_num_threads(task["threads"])
    run_dir, t0 = Path(task["run_dir"]), time.time()
    state = sweep_run_state(task, task["total_steps"], task["noise_levels"])
    resumed_at = None
    if state in ("new", "resume"):
        args, given = a2pr.Args(**task["args"]), None
        if state == "resume":
            resumed_at = int(a2pr.load_checkpoint(run_dir)["step"])
            follows = {k: task["args"][k] for k in RESUME_FOLLOWS}
            args, given = a2pr.Args(resume=str(run_dir), quiet=True, **follows), {"resume", "quiet", *follows}
        if a2pr.train(args, given)["interrupted"]:
            return dict(run_dir=str(run_dir), interrupted=True)
    noise = evaluate_noise(run_dir, task["noise_levels"], task["eval_episodes"])
    info = _read_json(run_dir / "sweep.json")
    ray = sys.modules.get("ray")  # never start a Ray here: get_runtime_context() would start a local one
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    info.update(wall_s=info.get("wall_s", 0.0) + time.time() - t0, host=platform.node(), node=node,
                threads=torch.get_num_threads(), attempts=info.get("attempts", 0) + 1,
                resumed_at=info.get("resumed_at", []) + ([resumed_at] if resumed_at is not None else []))
    a2pr.atomic_write(run_dir / "sweep.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
    return dict(run_dir=str(run_dir), interrupted=False, noise=noise)


def evaluate_noise(run_dir: Path, levels: list[float], episodes: int) -> dict:
    """Normalised score of each seed's final policy with Gaussian observation noise of each std (evaluate's
    obs_noise), on episodes seeded apart from the training evaluations; kept in noise.json, computed once."""
    path = run_dir / "noise.json"
    out = _read_json(path)
    if out.get("episodes") != episodes:
        out = dict(episodes=episodes, scores={})
    missing = [x for x in levels if repr(x) not in out["scores"]]
    if missing:
        run = a2pr.load_run(run_dir)
        for x in missing:
            rets = a2pr.evaluate(run["policy"], run["env_id"], episodes, seed=run["args"].seed + 20_000, obs_noise=x)
            out["scores"][repr(x)] = a2pr.normalized_score(rets, *run["ref_scores"]).mean(1).tolist()
        a2pr.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=2)))
    return out


# --- the driver --------------------------------------------------------------------------------------------------
def _import_ray():
    try:
        import ray
    except ImportError:
        raise a2pr.A2PRError(f"a sweep needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def _code_dirs() -> list[str]:
    """The folders of this file and of a2pr.py, where the workers import them from (the same paths on every node)."""
    return list(dict.fromkeys(str(Path(f).resolve().parent) for f in (__file__, a2pr.__file__)))


def ray_address(sw: SweepArgs) -> str | None:
    return sw.ray_address or os.environ.get("RAY_ADDRESS")


def check_ray_address(address: str | None) -> None:
    """A HOST:PORT (or ray://HOST:PORT) where nothing listens, or where something other than Ray listens, is one
    line within RAY_CONNECT_TIMEOUT_S: ray.init would retry it for ever, printing a GCS error every few seconds. Ray's
    GCS (and its client server) is a gRPC server, so grpcio's channel_ready_future (requirements-sweep.txt) says whether
    one answers there; a TCP connection first names a refused port at once. `auto` is ray.init's to judge."""
    if not address or address == "auto":
        return
    host, colon, port = address.split("://", 1)[-1].rpartition(":")
    if not colon:  # a bare host (ray://HOST: Ray's default port): ray.init's to judge
        return
    if not host or not port.isdigit() or not 0 < int(port) < 65536:  # a port past 65535 would wrap round
        raise a2pr.A2PRError(f"--ray-address must be auto or HOST:PORT with a port from 1 to 65535 (what ray start "
                             f"--head printed, e.g. 127.0.0.1:6379), got {address!r}")
    import grpc

    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
        channel = grpc.insecure_channel(f"{host}:{port}")
        try:
            grpc.channel_ready_future(channel).result(timeout=RAY_CONNECT_TIMEOUT_S)
            why = None
        except grpc.FutureTimeoutError:
            why = f"nothing there answers as Ray does within {RAY_CONNECT_TIMEOUT_S} s"
        finally:
            channel.close()
    except OSError as e:
        why = (f"no answer within {RAY_CONNECT_TIMEOUT_S} s" if isinstance(e, TimeoutError)
               else e.strerror or str(e) or type(e).__name__)
    if why:
        raise a2pr.A2PRError(f"no Ray cluster at {address} ({why}); start one there (ray start --head --port {port}) "
                             "or give --ray-address the address that ray start printed")


def _start_ray(ray, sw: SweepArgs) -> bool:
    """Connect to --ray-address / $RAY_ADDRESS, else start a quiet local Ray with this machine's cores. Returns
    whether we started it (and must stop it)."""
    if ray.is_initialized():  # e.g. a notebook that started Ray itself: use it as it is
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging
    from ray.job_config import JobConfig

    quiet = dict(job_config=JobConfig(code_search_path=_code_dirs()), log_to_driver=False,
                 logging_level=logging.ERROR)
    address = ray_address(sw)
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            # "local": a Ray of its own, even where `ray start` left one running (which rejects num_cpus)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=128 * 2**20,
                     **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise a2pr.A2PRError(f"could not start {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    finally:
        # ray.init puts its own SIGTERM handlers in place (Python's exits with status 15, the core worker's prints a
        # stack dump and aborts): SIGTERM stays what it was before, in main() an interruption like Ctrl-C.
        if on_term is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)
    return True


def lock_sweep_dir(sweep_dir: Path):
    """Lock sweep_dir/.sweep.lock for this driver and return the open file (the lock lasts while it is open; the OS
    drops it when the process ends, even on kill -9); the file holds the driver's pid. A second sweep into the same
    folder stops with one line instead of starting runs that the first one's workers are training."""
    path = sweep_dir / ".sweep.lock"
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        return a2pr.lock_with_pid(path, f"another sweep{{pid}} is running in {sweep_dir} and is training those runs; "
                                  "wait for it to end, then run this command again (it keeps what the other "
                                  "finished), or give another --sweep-dir")
    except OSError as e:
        raise a2pr.A2PRError(f"cannot write into {sweep_dir} ({e.strerror or e}); give another --sweep-dir") from None


def sweep(sw: SweepArgs) -> dict:
    """Plan the sweep, run what is not finished on Ray (one task per run folder), then write the results. Returns
    dict(sweep_dir, results_csv, results_md, results_png, summary, ran, skipped, failed)."""
    runs, levels = plan_sweep(sw), noise_levels(sw)
    sweep_dir = Path(runs[0]["run_dir"]).parent
    resolved = {}
    for run in runs:  # every file the sweep reads, before it writes anything: a bad one is one line
        check_run_files(run)
        resolved[run["run_dir"]] = r = a2pr.resolve_args(run["args"])[0]
        check_run_folder(run, r)

    def unfinished():
        for run in runs:
            run["state"] = sweep_run_state(run, resolved[run["run_dir"]].total_steps, levels)
        return [run for run in runs if run["state"] != "done"]

    todo = unfinished()
    ray = _import_ray() if todo else None  # after the checks above, so that a mistake in the flags comes first
    if todo and not ray.is_initialized():
        check_ray_address(ray_address(sw))
    lock = lock_sweep_dir(sweep_dir)
    try:
        todo = unfinished()  # again, now that no other sweep writes here: one may have finished runs meanwhile
        print(f"sweep {sw.suite}: {len(runs)} runs in {sweep_dir} ({len(runs) - len(todo)} finished, "
              f"{sum(r['state'] == 'resume' for r in todo)} to resume, {sum(r['state'] == 'new' for r in todo)} new, "
              f"{sum(r['state'] == 'noise' for r in todo)} to evaluate under noise)", file=sys.stderr)
        failed = []
        if todo:
            seen = set()
            for run in todo:  # load (download, generate) each dataset once here, not in every task at once
                key = (run["env"], run["mix"])
                if key not in seen and run["state"] != "noise":
                    seen.add(key)
                    a2pr.load_dataset(run["args"], log=lambda *m, **k: print(*m, file=sys.stderr, **k))
            failed = _run_on_ray(ray, sw, todo, resolved, levels)
        out = write_sweep_results(sw, runs, sweep_dir, levels)
    finally:
        lock.close()
    out.update(ran=[r["run_dir"] for r in todo], skipped=[r["run_dir"] for r in runs if r["state"] == "done"],
               failed=failed)
    for line in out["summary"]:
        print(f"sweep {sw.suite}: {line}", file=sys.stderr)
    print(f"sweep {sw.suite}: results in {out['results_md']}", file=sys.stderr)
    if failed:
        raise a2pr.A2PRError(f"{len(failed)} of {len(runs)} runs failed (first: {failed[0][0]}: {failed[0][1]}); "
                             f"{out['results_md']} has the others; run the same command again to retry")
    return out


def _run_on_ray(ray, sw: SweepArgs, todo: list[dict], resolved: dict, levels: list[float]) -> list[tuple[str, str]]:
    """Submit one task per unfinished run folder and wait, printing a progress line; returns the failed runs."""
    started = _start_ray(ray, sw)
    try:
        gpus = task_gpus(sw)
        remote = ray.remote(run_sweep_task)
        # PYTHONPATH too: a Ray that was already running (a notebook's, a test's) has no code_search_path for us.
        path = os.pathsep.join(_code_dirs() + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
        options = dict(num_cpus=sw.task_cpus, num_gpus=gpus, max_retries=sw.task_retries, retry_exceptions=False,
                       scheduling_strategy="SPREAD",  # runs over all nodes rather than packed onto the first
                       runtime_env=dict(env_vars=dict(PYTHONPATH=path)))
        pending = {}
        for run in todo:
            r = resolved[run["run_dir"]]  # absolute paths: a worker on another node has another working folder
            absolute = dataclasses.replace(run["args"], save_dir=str(Path(run["args"].save_dir).resolve()),
                                           data_dir=str(Path(run["args"].data_dir).resolve()))
            task = dict(run_dir=str(Path(run["run_dir"]).resolve()), args=dataclasses.asdict(absolute),
                        total_steps=r.total_steps, noise_levels=levels, eval_episodes=r.eval_episodes,
                        threads=max(1, int(sw.task_cpus)))
            pending[remote.options(name=Path(run["run_dir"]).name, **options).remote(task)] = run
        res = ray.cluster_resources()
        slots = int(res.get("CPU", 0) // sw.task_cpus)
        if gpus:
            slots = min(slots, int(res.get("GPU", 0) // gpus))
        print(f"sweep {sw.suite}: {len(todo)} Ray tasks on {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPUs, "
              f"{res.get('GPU', 0):g} GPUs: {max(slots, 0)} at a time ({sw.task_cpus:g} CPU, {gpus:g} GPU each)",
              file=sys.stderr)
        failed, done, t0, tty = [], 0, time.time(), sys.stderr.isatty()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                run = pending.pop(ref)
                done += 1
                try:
                    if ray.get(ref)["interrupted"]:
                        failed.append((run["run_dir"], "interrupted"))
                except Exception as e:  # the task's own error (e.g. A2PRError), or retries used up
                    cause = getattr(e, "cause", None) or e
                    failed.append((run["run_dir"], (str(cause).strip().splitlines() or [type(cause).__name__])[-1]))
            elapsed = time.time() - t0
            running = min(len(pending), max(slots, 1))
            left = f"about {a2pr.fmt_time(elapsed / done * len(pending))} left" if done else "time left: unknown yet"
            line = (f"sweep {sw.suite}: {done}/{len(todo)} done, {running} running, {len(pending) - running} queued"
                    f"{f', {len(failed)} failed' if failed else ''} | {a2pr.fmt_time(elapsed)} elapsed, {left}")
            if tty:
                print("\r" + line.ljust(100), end="" if pending else "\n", file=sys.stderr, flush=True)
            elif ready or not pending:
                print(line, file=sys.stderr, flush=True)
        return failed
    except KeyboardInterrupt:
        print(f"\nsweep interrupted{' by SIGTERM' if _terminated else ''}: finished runs are kept; the same command "
              "resumes the others from their checkpoints", file=sys.stderr)
        raise
    finally:
        if started:
            ray.shutdown()


# --- results -----------------------------------------------------------------------------------------------------
def _metrics(run_dir: Path) -> list[dict]:
    """metrics.csv's rows ([] where there is none); a file that is not a2pr's CSV is one line saying so."""
    path = run_dir / a2pr.RUN_FILES["csv"]
    if not path.exists():
        return []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
    except OSError as e:
        raise _bad_file(path, e.strerror or type(e).__name__) from None
    except (ValueError, csv.Error):  # UnicodeDecodeError, a NUL byte
        raise _bad_file(path, "not a CSV file") from None
    if not {"step", "time_s"} <= set(header):
        raise _bad_file(path, "no step and time_s columns: not a2pr's metrics")
    for i, r in enumerate(rows, 2):
        try:
            if None in r or None in r.values():
                raise ValueError
            int(r["step"]), float(r["time_s"])
        except (KeyError, ValueError):
            raise _bad_file(path, f"line {i} is not a row of a2pr's metrics: a step and its time_s") from None
    return rows


def _eval_curves(run_dir: Path, seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, scores (seeds, steps)) of a run's evaluations, from its metrics.csv."""
    rows = [r for r in _metrics(run_dir) if r.get("eval/normalized_score_mean", "") != ""]
    cols = ([f"eval/normalized_score_seed{s}" for s in seeds] if len(seeds) > 1 else ["eval/normalized_score_mean"])
    try:
        scores = np.array([[float(r[c]) for r in rows] for c in cols]).reshape(len(seeds), len(rows))
    except (KeyError, ValueError):
        raise _bad_file(run_dir / a2pr.RUN_FILES["csv"], f"no evaluation score for each of the seeds {seeds}") from None
    return np.array([int(r["step"]) for r in rows]), scores


def _train_seconds(run_dir: Path) -> float:
    """Training time of the steps that count: time_s restarts at 0 when a run resumes, so sum each segment's end."""
    times = [float(r["time_s"]) for r in _metrics(run_dir)]
    return float(sum(a for a, b in zip(times, times[1:] + [-1.0]) if b < a))


def check_run_files(run: dict) -> None:
    """Read every file of a run folder that the sweep reads, so that one that is truncated, garbage or from
    elsewhere stops the sweep with one line before it writes anything. metrics.csv only once the run has finished:
    until then its last line may be a2pr's to complete, and a2pr reads it itself when the run resumes."""
    run_dir = Path(run["run_dir"])
    summary = _read_json(run_dir / a2pr.RUN_FILES["summary"])
    _read_json(run_dir / "sweep.json")
    _read_json(run_dir / "noise.json")
    if summary.get("interrupted") is False:
        _eval_curves(run_dir, run["seeds"])


def collect_sweep(runs: list[dict], levels: list[float]) -> list[dict]:
    """One row per seed of every finished run folder, read from the folder's files."""
    rows = []
    for run in runs:
        d = Path(run["run_dir"])
        s = _read_json(d / a2pr.RUN_FILES["summary"])
        if not s or s.get("interrupted", True):
            continue
        info, noise = _read_json(d / "sweep.json"), _read_json(d / "noise.json").get("scores", {})
        secs, curves = _train_seconds(d), _eval_curves(d, s["seeds"])[1]
        for i, seed in enumerate(s["seeds"]):
            row = dict(dataset=run["dataset"], variant=run["variant"], seed=seed, final_score=s["final_scores"][i],
                       best_score=s["best_scores"][i], run_mean_score=float(curves[i].mean()), steps=s["steps"],
                       steps_per_s=round(s["steps"] / secs, 2) if secs else "", wall_s=round(info.get("wall_s", 0), 1),
                       seeds_in_run=len(s["seeds"]), host=info.get("host", ""), run_dir=str(d))
            row.update({f"noise_{x:g}": noise[repr(x)][i] for x in levels if repr(x) in noise})
            rows.append(row)
    return rows


def _versions() -> str:
    return ", ".join(f"{k} {v}" for k, v in a2pr.library_versions(("ray",)).items() if v)


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = (", GPU " + torch.cuda.get_device_name()) if torch.cuda.is_available() else ", no GPU"
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores{gpu}"


def _option(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):  # store_true flags are given as True; negatable ones may be given as False
        return [flag] if value else ["--no-" + name.replace("_", "-")]
    return [flag, str(value)]


def variants_line(variants: list[str]) -> str:
    """results.md's line naming each variant with the a2pr.py flags it sets."""
    flags = {v: " ".join(p for k, x in SWEEP_VARIANTS[v].items() for p in _option(k, x)) for v in variants}
    return "- variants: " + ", ".join(f"{v} ({flags[v]})" for v in variants)


def command_line(sw: SweepArgs) -> str:
    """The command that runs this sweep: its own flags that differ from their defaults, and the a2pr.py flags given."""
    parts = ["python", "a2pr_sweep.py", sw.suite]
    for f in dataclasses.fields(SweepArgs):
        if "help" in f.metadata and not f.metadata.get("positional") and getattr(sw, f.name) != f.default:
            parts += _option(f.name, getattr(sw, f.name))
    for name in sorted(sw.given):
        parts += _option(name, getattr(sw.train, name))
    return shlex.join(parts)


def no_interval(tasks) -> str | None:
    """Why these per-dataset runs give no interval, or None: the stratified bootstrap draws a dataset's runs from that
    dataset's runs only, so a dataset with a single run is the same in every resample and the interval would be a
    bracket of width 0 (or, beside other datasets, too narrow)."""
    single = sum(len(t) < 2 for t in tasks)
    if not single:
        return None
    return "1 run: no interval" if single == len(tasks) else f"1 run on {single} of {len(tasks)} datasets: no interval"


def interval_cell(tasks, stat, digits: int = 1) -> str:
    """`point [low, high]` (stratified bootstrap, 95 %), or `point (1 run: no interval)` where a dataset has one run."""
    tasks = [np.asarray(t, dtype=np.float64) for t in tasks]
    if why := no_interval(tasks):
        return f"{float(stat(tasks)):.{digits}f} ({why})"
    p, lo, hi = stratified_bootstrap_ci(tasks, stat)
    return f"{p:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


POI_NEEDS = "needs >= 2 runs per variant on every dataset; give --seeds 2 or more"


def aggregate_cells(rows: list[dict], variants: list[str]) -> tuple[dict, dict]:
    """The aggregates of results.md and of the driver's last lines: {variant: (datasets, runs, mean cell, IQM cell)}
    and {other variant: (datasets, P(a2pr > other) cell)}, the cell None where a dataset has a single run of
    either: no probability of improvement then."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    scores = {}
    for r in rows:
        scores.setdefault((r["dataset"], r["variant"]), []).append(r["final_score"])
    agg, poi = {}, {}
    for v in variants:
        tasks = [np.array(scores[(d, v)]) for d in datasets if (d, v) in scores]
        if tasks:
            agg[v] = (len(tasks), sum(len(t) for t in tasks), interval_cell(tasks, aggregate_mean),
                      interval_cell(tasks, aggregate_iqm))
    for v in variants if "a2pr" in variants else []:
        common = [d for d in datasets if (d, "a2pr") in scores and (d, v) in scores]
        if v == "a2pr" or not common:
            continue
        x, y = [np.array(scores[(d, "a2pr")]) for d in common], [np.array(scores[(d, v)]) for d in common]
        if no_interval(x + y):
            poi[v] = (len(common), None)
        else:
            t = stratified_bootstrap_ci(x + y, lambda g, n=len(x): probability_of_improvement(g[:n], g[n:]))
            poi[v] = (len(common), f"{t[0]:.2f} [{t[1]:.2f}, {t[2]:.2f}]")
    return agg, poi


def _difference(g):
    return np.mean(g[0], -1) - np.mean(g[1], -1)


def comparison_cells(rows: list[dict], variants: list[str]) -> list[tuple]:
    """A2PR against each other variant on each dataset: (dataset, other, cells), the cells (point, low, high) for
    the difference of mean final scores, of mean best scores, of the means over the run (learning speed), and
    P(a2pr > other) on final scores, each from a bootstrap of each variant's runs; None where either variant has a
    single run there."""
    scores = {}
    for r in rows:
        scores.setdefault((r["dataset"], r["variant"]), []).append(
            (r["final_score"], r["best_score"], r.get("run_mean_score", np.nan)))
    out = []
    for d in dict.fromkeys(r["dataset"] for r in rows):
        for v in variants:
            if v == "a2pr" or (d, "a2pr") not in scores or (d, v) not in scores:
                continue
            a, b = np.array(scores[(d, "a2pr")]), np.array(scores[(d, v)])
            if no_interval([a, b]):
                out.append((d, v, None))
                continue
            cis = [stratified_bootstrap_ci([a[:, k], b[:, k]], _difference) if np.isfinite(a[:, k]).all() and
                   np.isfinite(b[:, k]).all() else (np.nan,) * 3 for k in (0, 1, 2)]
            cis.append(stratified_bootstrap_ci([a[:, 0], b[:, 0]], lambda g: probability_of_improvement(g[:1], g[1:])))
            out.append((d, v, cis))
    return out


def comparison_lines(rows: list[dict], variants: list[str]) -> list[str]:
    """results.md's section on A2PR against each variant per dataset, and where its intervals lie above 0."""
    cells = comparison_cells(rows, variants)
    if not cells:
        return []
    out = ["", f"## A2PR against each variant, per dataset (bootstrap, 95 % CI, {BOOTSTRAP_REPS:,} resamples)", "",
           "| dataset | vs | A2PR − X, final | A2PR − X, best | A2PR − X, over the run | P(A2PR > X), final |",
           "|---|---|---|---|---|---|"]
    for d, v, cis in cells:
        text = [f"– ({POI_NEEDS})"] * 4 if cis is None else \
            ["–" if np.isnan(p) else f"{p:+.1f} [{lo:+.1f}, {hi:+.1f}]" for p, lo, hi in cis[:3]] + \
            ["{:.2f} [{:.2f}, {:.2f}]".format(*cis[3])]
        out.append(f"| {d} | {v} | " + " | ".join(text) + " |")
    out += ["", "Differences of the two variants' mean scores on that dataset (over the run: the mean of a run's "
            "evaluations, a measure of learning speed); the runs of each are resampled with replacement "
            "independently. P: the probability that a random run of A2PR has the higher final score (ties 1/2). "
            "**Where A2PR is above X** (the whole interval of the difference above 0):"]
    for v in dict.fromkeys(c[1] for c in cells):
        above = [", ".join(d for d, w, cis in cells if w == v and cis and cis[k][1] > 0) or "no dataset"
                 for k in (0, 1, 2)]
        out.append(f"- {v}: final on {above[0]}; best on {above[1]}; over the run on {above[2]}")
    return out


def summary_lines(rows: list[dict], variants: list[str]) -> list[str]:
    """The aggregates as the driver prints them at the end, the same cells as results.md."""
    agg, poi = aggregate_cells(rows, variants)
    return ([f"{v}, final score over {n} datasets ({runs} runs): mean {mean}, IQM {q}"
             for v, (n, runs, mean, q) in agg.items()] +
            [f"P(a2pr > {v}) = {cell}" if cell else f"P(a2pr > {v}): {POI_NEEDS}" for v, (_, cell) in poi.items()])


def sweep_tables(rows: list[dict], levels: list[float], variants: list[str]) -> str:
    """results.md's tables: per dataset and variant, then the aggregates with their bootstrap CIs."""
    def pm(x):
        return f"{np.mean(x):.1f} ± {np.std(x):.1f}" if len(x) > 1 else f"{np.mean(x):.1f} (1 run: no std)"

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    by = {}
    for r in rows:
        by.setdefault((r["dataset"], r["variant"]), []).append(r)
    out = ["## Per dataset", "", "| dataset | variant | seeds | final score | best score | paper (A2PR) | steps | "
           "steps/s | wall time |", "|---|---|---|---|---|---|---|---|---|"]
    for d in datasets:
        for v in variants:
            rs = by.get((d, v))
            if not rs:
                continue
            folders = {r["run_dir"]: r for r in rs}.values()
            sps = [f["steps_per_s"] for f in folders if f["steps_per_s"] != ""]
            paper = PAPER_SCORES.get(d) if v == "a2pr" else None
            speed = f"{np.mean(sps):.0f}" if sps else "–"
            out.append(f"| {d} | {v} | {len(rs)} | {pm([r['final_score'] for r in rs])} | "
                       f"{pm([r['best_score'] for r in rs])} | {'–' if paper is None else paper} | "
                       f"{rs[0]['steps']:,} | {speed} | {a2pr.fmt_time(sum(f['wall_s'] for f in folders))} |")
    out += ["", "Scores are D4RL-normalised (0 = random, 100 = expert), mean ± std over seeds (final = last "
            "evaluation, best = best evaluation). steps/s: gradient steps per second of a run folder (each step "
            "updates all the seeds that share it); wall time: sum over the run folders of their tasks' wall time "
            "(data loading and evaluation included)."]
    agg, poi = aggregate_cells(rows, variants)
    out += ["", f"## Aggregate over datasets (final score; stratified bootstrap, 95 % CI, {BOOTSTRAP_REPS:,} "
            "resamples)", "", "| variant | datasets | runs | mean | IQM |", "|---|---|---|---|---|"]
    out += [f"| {v} | {n} | {runs} | {mean} | {q} |" for v, (n, runs, mean, q) in agg.items()]
    out += ["", "Mean: the mean over datasets of each dataset's mean score. IQM: the interquartile mean of all runs "
            "(the middle 50 %). CIs: runs resampled with replacement within each dataset independently (rliable's "
            "stratified bootstrap), percentile interval; a dataset with a single run would be the same in every "
            "resample, so a cell with one gives its value and no interval (--seeds 2 or more gives one)."]
    if poi:
        out += ["", "## Probability of improvement", "", "| comparison | datasets | P(X > Y) [95 % CI] |",
                "|---|---|---|"]
        out += [f"| P(a2pr > {v}) | {n} | {cell or '– (' + POI_NEEDS + ')'} |" for v, (n, cell) in poi.items()]
        out += ["", "rliable's definition: for each dataset, the probability that a random run of X has a higher "
                "final score than a random run of Y (ties count 1/2), averaged over datasets; the runs of each "
                "variant on each dataset are resampled independently for the CI."]
    out += comparison_lines(rows, variants)
    if levels:
        out += ["", "## Final policy under Gaussian observation noise (std per observation dimension)", "",
                "| dataset | variant | " + " | ".join(f"σ = {x:g}" for x in levels) + " |",
                "|---|---|" + "---|" * len(levels)]
        for d in datasets:
            for v in variants:
                rs = by.get((d, v))
                if rs:
                    out.append(f"| {d} | {v} | " + " | ".join(
                        pm([r[f"noise_{x:g}"] for r in rs]) if all(f"noise_{x:g}" in r for r in rs) else "–"
                        for x in levels) + " |")
        for v in variants:
            if any((d, v) in by for d in datasets):
                cells = []
                for x in levels:
                    g = [np.array([r.get(f"noise_{x:g}", np.nan) for r in by[(d, v)]]) for d in datasets
                         if (d, v) in by]
                    cells.append(interval_cell(g, aggregate_mean) if all(np.isfinite(t).all() for t in g) else "–")
                out.append(f"| **mean over datasets** [95 % CI] | {v} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_sweep_results(sw: SweepArgs, runs: list[dict], sweep_dir: Path, levels: list[float]) -> dict:
    rows = collect_sweep(runs, levels)
    variants = sweep_variants(sw)
    paths = dict(sweep_dir=str(sweep_dir), results_csv=str(sweep_dir / "results.csv"),
                 results_md=str(sweep_dir / "results.md"), results_png=str(sweep_dir / "results.png"))
    a2pr.write_csv(Path(paths["results_csv"]), rows,
                   ["dataset", "variant", "seed", "final_score", "best_score", "run_mean_score",
                    *[f"noise_{x:g}" for x in levels],
                    "steps", "steps_per_s", "wall_s", "seeds_in_run", "host", "run_dir"])
    finished = len({r["run_dir"] for r in rows})
    head = [f"# Sweep `{sw.suite}`: {finished} of {len(runs)} run folders finished", "",
            f"- command: `{command_line(sw)}`",
            f"- datasets: {', '.join(dict.fromkeys(r['dataset'] for r in runs))}",
            variants_line(variants),
            f"- seeds: {sw.train.seed}..{sw.train.seed + sw.seeds - 1}, {seeds_per_task(sw)} per Ray task"
            f"{' (one batched computation)' if seeds_per_task(sw) > 1 else ''}, {sw.task_cpus:g} CPU and "
            f"{task_gpus(sw):g} GPU each",
            f"- hardware (the machine that wrote this file): {_hardware()}; hosts that trained: "
            f"{', '.join(sorted({r['host'] for r in rows if r['host']})) or '–'}",
            f"- versions: {_versions()}",
            f"- written {time.strftime('%Y-%m-%d %H:%M:%S')}", ""]
    text = "\n".join(head) + "\n" + (sweep_tables(rows, levels, variants) if rows else "No finished runs yet.\n")
    a2pr.atomic_write(Path(paths["results_md"]), lambda tmp: Path(tmp).write_text(text))
    if rows:
        plot_sweep(Path(paths["results_png"]), runs, rows, levels, variants, sw.suite)
    paths["summary"] = summary_lines(rows, variants)
    return paths


def plot_sweep(path: Path, runs: list[dict], rows: list[dict], levels: list[float], variants: list[str],
               suite: str) -> None:
    fig = sweep_figure(runs, rows, levels, variants, suite)
    a2pr.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def sweep_figure(runs: list[dict], rows: list[dict], levels: list[float], variants: list[str], suite: str):
    """Per-dataset learning curves (mean over seeds, 95 % bootstrap band), the aggregate intervals, and the score
    under observation noise; matplotlib's Figure API, as a2pr's learning curve."""
    from matplotlib.figure import Figure  # no pyplot: a sweep never changes a notebook's plotting backend

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    ncols = max(3, min(4, len(datasets)))
    nrows = -(-len(datasets) // ncols) + 1
    fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows))
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    colors = {v: f"C{i}" for i, v in enumerate(SWEEP_VARIANTS)}
    done = {r["run_dir"] for r in rows}
    for ax, d in zip(axes[:-1].ravel(), datasets):
        for v in variants:
            curves = [_eval_curves(Path(r["run_dir"]), r["seeds"]) for r in runs
                      if r["dataset"] == d and r["variant"] == v and r["run_dir"] in done]
            curves = [c for c in curves if len(c[0])]
            if not curves:
                continue
            steps = min((c[0] for c in curves), key=len)
            scores = np.concatenate([c[1][:, :len(steps)] for c in curves])
            band = np.array([stratified_bootstrap_ci([col], aggregate_mean, reps=1000)[1:] for col in scores.T])
            ax.plot(steps, scores.mean(0), color=colors[v], label=v)
            ax.fill_between(steps, band[:, 0], band[:, 1], color=colors[v], alpha=0.2)
        if d in PAPER_SCORES:
            ax.axhline(PAPER_SCORES[d], ls="--", c="gray", lw=1, label="paper (A2PR)")
        ax.set(title=d, xlabel="gradient step", ylabel="normalised score")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[:-1].ravel()[len(datasets):]:
        ax.set_visible(False)
    bottom = axes[-1]
    for k, (name, stat) in enumerate((("mean", aggregate_mean), ("IQM", aggregate_iqm))):
        ax, ends, single, drawn = bottom[k], [], 0, 0
        for i, v in enumerate(variants):
            tasks = [np.array([r["final_score"] for r in rows if r["dataset"] == d and r["variant"] == v])
                     for d in datasets]
            tasks = [t for t in tasks if len(t)]
            if not tasks:
                continue
            drawn += 1
            if no_interval(tasks):  # the value alone, as in results.md: a dataset with one run gives no interval
                p, single = float(stat(tasks)), single + 1
                ax.plot([p], [i], marker="D", ms=8, ls="none", color=colors[v])
                ends.append(p)
            else:
                p, lo, hi = stratified_bootstrap_ci(tasks, stat)
                ax.plot([lo, hi], [i, i], lw=12, solid_capstyle="butt", color=colors[v], alpha=0.6)  # no barh:
                ax.plot([p, p], [i - 0.25, i + 0.25], color="k")  # its sticky edges hide an interval at the border
                ends += [lo, p, hi]
        if ends:  # every mark inside the axes, with a margin (an interval of width 0 once sat on the edge)
            lo, hi = min(ends), max(ends)
            pad = 0.1 * (hi - lo) if hi > lo else max(1.0, 0.05 * abs(hi))
            ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(-0.6, len(variants) - 0.4)
        ax.set(yticks=range(len(variants)), yticklabels=variants, xlabel="normalised score",
               title=f"{name} over datasets, " + ("1 run: no interval" if single == drawn else "95 % CI" +
                                                  (" (diamond: 1 run, no interval)" if single else "")))
    ax = bottom[2]
    if levels:
        for v in variants:
            pts = []
            for x in levels:
                g = [np.array([r.get(f"noise_{x:g}", np.nan) for r in rows if r["dataset"] == d and r["variant"] == v])
                     for d in datasets]
                g = [t for t in g if len(t)]
                pts.append(stratified_bootstrap_ci(g, aggregate_mean) if g and all(np.isfinite(t).all() for t in g)
                           else (np.nan,) * 3)
            pts = np.array(pts)
            ax.plot(levels, pts[:, 0], marker="o", color=colors[v], label=v)
            ax.fill_between(levels, pts[:, 1], pts[:, 2], color=colors[v], alpha=0.2)
        ax.set(xlabel="observation noise std", ylabel="normalised score", title="final policy under noise")
        ax.legend(fontsize=7)
    else:
        ax.set_visible(False)
    for ax in bottom[3:]:
        ax.set_visible(False)
    fig.suptitle(f"sweep {suite}")
    fig.tight_layout()
    return fig


# --- the command line: a2pr.py's parser (every training flag) plus the sweep's own arguments ----------------------
def build_parser():
    p = a2pr.build_parser(prog="a2pr_sweep.py", description=__doc__.split("\n\n")[0])
    group = p.add_argument_group("sweep", "a2pr_sweep.py's own arguments; every other flag is a2pr.py's and is given "
                                          "to every run of the sweep")
    a2pr.add_fields(group, SweepArgs, choices=True)  # absent from a parse unless given: SweepArgs holds the defaults
    return p


def parse_args(argv=None) -> SweepArgs:
    """The sweep's settings from the command line, parsed once: its own arguments, and a2pr.py's flags as the
    training Args of every run (with --config FILE, the training fields not given come from FILE)."""
    given = vars(build_parser().parse_args(argv))
    own = {f.name: given.pop(f.name) for f in dataclasses.fields(SweepArgs) if f.name in given}
    values = {**a2pr.load_config(given["config"]), **given} if "config" in given else given
    return SweepArgs(**own, train=a2pr.Args(**values), given=frozenset(given))


_terminated = False  # whether SIGTERM stopped the driver: Ray's waits turn what a handler raises into KeyboardInterrupt


def _terminate(_signum, _frame):
    """SIGTERM to the driver (what `kill`, SLURM and Kubernetes send) stops the sweep as Ctrl-C does."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """The command line: 0 when every run finished, 2 after an error (one line), 130 after Ctrl-C and 143 after
    SIGTERM (as the shell reports a process they ended)."""
    global _terminated
    here, _terminated = threading.current_thread() is threading.main_thread(), False
    on_term = signal.signal(signal.SIGTERM, _terminate) if here else None
    try:
        sweep(parse_args(argv))
    except a2pr.A2PRError as e:
        print(f"a2pr_sweep.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"a2pr_sweep.py: interrupted{' by SIGTERM' if _terminated else ''}", file=sys.stderr)
        return 128 + (signal.SIGTERM if _terminated else signal.SIGINT)
    finally:
        if here:
            signal.signal(signal.SIGTERM, on_term)
    return 0


if __name__ == "__main__":
    # Run as the module a2pr_sweep, not as __main__: Ray sends run_sweep_task to the workers by its module's name.
    import a2pr_sweep

    sys.exit(a2pr_sweep.main())
