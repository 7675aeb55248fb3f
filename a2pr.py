"""A2PR: Adaptive Advantage-guided Policy Regularization for offline RL, in one file.

A2PR (Liu et al., ICML 2024, arXiv 2405.19909) is TD3+BC with a smarter behaviour-cloning term. An
advantage-weighted VAE learns to generate the dataset's *better* actions; for every state the actor is pulled
towards whichever of {dataset action, VAE action} has the larger advantage Q(s,a) - V(s), and only in states where
that advantage is positive (the adaptive gate). On low-quality data this keeps TD3+BC's safety where the data is
good and frees the policy where it is not. Algorithm contract: A2PR_SPEC.md (its numbered steps are cited as
"spec 1..4" below). Default behaviour follows the released implementation, which produced the paper's numbers.

    python a2pr.py                                   # built-in Pendulum dataset, CPU, a few minutes
    python a2pr.py --env hopper-medium-v2 --cuda     # D4RL data and the published per-task preset

Reading map (line: what). Everything above main() is A2PR; below it, appendices a reader may skip:
     84  Args:             Args and the published per-task presets (spec: defaults and presets)
    223  EnsembleLinear:   networks: Actor, TwinCritic, ValueNet, VAE, in the (K, B, .) ensemble layout
    339  td_target:        losses, one pure function per spec step
    384  select_bc_target: advantage selection and the adaptive gate (spec 4)
    433  critic_step:      spec 1: critics, TD3 target with policy smoothing
    446  q1_data_and_y2:   spec 2: y2 from the just-updated online critics
    455  value_step:       spec 2: V towards min(y, y2)
    463  vae_step:         spec 3: advantage-weighted VAE
    489  actor_step:       spec 4: actor, then the soft target updates
    517  update_core:      one gradient step: spec 1-4 in order
    561  Dataset:          the data as the networks see it: normalisation, action scaling, device batches
    675  evaluate:         deterministic evaluation, D4RL normalised score
    879  train:            train(args) -> summary: setup, then the loop
    956  main:             the command line's entry point
    977  Appendix A:       data sources: built-in, D4RL, HDF5, downloads, Minari, mixes
   1796  Appendix B:       sweeps on Ray: suites, variants, results tables with bootstrap CIs
   2458  Appendix C:       speed paths: Updater, torch.compile, CUDA graphs, benchmarks
   2627  Appendix D:       run files: checkpoints, CSV, plot, trackers, load_run, load_policy
   3136  Appendix E:       the theory on finite MDPs
   3199  Appendix F:       the command line: parser, presets, validation
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import difflib
import errno
import functools
import glob
import hashlib
import http.client
import io
import itertools
import json
import math
import os
import pickle
import platform
import re
import shlex
import signal
import sys
import tempfile
import time
import typing
import warnings
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------------------------------
# Arguments and presets. Every field is a flag (--total-steps for total_steps); None means "the preset's value,
# else the spec default" (resolve_args, in the command-line appendix, fills them in).
# ----------------------------------------------------------------------------------------------------------------
def _arg(default, help: str, **meta):
    """A dataclass field whose metadata is its --help line (CleanRL keeps help in docstrings; we need no tyro)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class Args:
    # --- experiment ---
    env: str = _arg("pendulum-mostly-random-v0", "dataset: built-in pendulum-*, D4RL name, Minari id or .hdf5 file")
    seed: int = _arg(0, "seed of the agent (weights, batches, noise); the dataset has its own --dataset-seed")
    num_seeds: int = _arg(1, "train K independent agents (seeds seed..seed+K-1) as one batched computation")
    cuda: bool = _arg(False, "train on the GPU; stops at once if none is visible")
    compile: bool = _arg(False, "run the update through torch.compile (opt-in; compiling takes a minute or more)")
    cuda_graphs: bool = _arg(False, "with --cuda: replay the whole update as CUDA graphs (fastest on a GPU)")
    preset: str = _arg("auto", "hyperparameter preset: auto (by --env), spec, pendulum-cpu or a D4RL dataset name")
    total_steps: int | None = _arg(None, "gradient steps (spec: 1,000,000)")
    # --- data ---
    mix: str | None = _arg(None, "NAME:FRACTION: mix whole trajectories of NAME into --env, e.g. hopper-expert-v2:0.01",
                           metavar="NAME:FRAC")
    dataset_seed: int = _arg(0, "seed of built-in datasets and of --mix sampling (same data for every agent seed)")
    eval_env: str | None = _arg(None, "gymnasium id to evaluate in, for a local .hdf5 file (default: from the file)",
                                metavar="ID")
    ref_scores: str | None = _arg(None, "MIN,MAX reference returns for the normalised score, if the data has none")
    download_timeout: float = _arg(10.0, "seconds to wait for a connection or for the next block of a download")
    data_dir: str | None = _arg(None, "where built-in datasets are cached (default $A2PR_DATA_DIR or ~/.cache/a2pr)",
                                metavar="DIR")
    normalize_states: bool = _arg(True, "normalise states with the dataset's mean and std + 1e-3 (spec)",
                                  negatable=True)
    reward_scale: float = _arg(1.0, "r' = reward_scale * r + reward_shift (off by default; for sparse tasks)")
    reward_shift: float = _arg(0.0, "see --reward-scale")
    # --- algorithm ---
    batch_size: int | None = _arg(None, "transitions per gradient step (spec: 256)")
    discount: float | None = _arg(None, "gamma, the discount (spec 1,2; default 0.99, some presets 0.995)")
    tau: float = _arg(0.005, "tau, soft target-update rate (spec 4)")
    alpha: float | None = _arg(None, "alpha: actor loss weighs Q by lambda = alpha / mean|Q| (spec 4; default 2.5)")
    bc_weight: float | None = _arg(None, "weight of the behaviour constraint when the gate is on (spec 4; default 1.0)",
                                   aliases=("--mask",))
    vae_weight: float | None = _arg(None, "weight of VAE reconstruction where Q(s,a) > V(s) (spec 3; default 1.0)")
    eps_a: float = _arg(0.0, "epsilon_A, advantage threshold of the adaptive gate (spec 4)")
    policy_freq: int = _arg(2, "actor and target update every this many steps (spec 4)")
    policy_noise: float = _arg(0.2, "sigma of the target-policy smoothing noise, times max action (spec 1)")
    noise_clip: float = _arg(0.5, "clip of the smoothing noise, times max action (spec 1)")
    actor_lr: float = _arg(3e-4, "Adam learning rate of the actor")
    critic_lr: float = _arg(3e-4, "Adam learning rate of the twin critics")
    value_lr: float = _arg(3e-4, "Adam learning rate of V")
    vae_lr: float = _arg(1e-3, "Adam learning rate of the VAE (the released code uses Adam's default 1e-3)")
    actor_hidden: int | None = _arg(None, "actor hidden width (spec: 256)")
    actor_layers: int = _arg(3, "actor hidden layers")
    critic_hidden: int | None = _arg(None, "hidden width of each critic (spec: 256)")
    critic_layers: int = _arg(4, "hidden layers of each critic")
    value_hidden: int | None = _arg(None, "V hidden width (spec: 256)")
    value_layers: int = _arg(4, "V hidden layers")
    vae_hidden: int | None = _arg(None, "VAE encoder and decoder hidden width (spec: 750)")
    vae_layers: int = _arg(2, "hidden layers of the VAE encoder and of its decoder")
    bc_target: str = _arg("select", "ablation: select (A2PR), data (dataset action, TD3+BC-like), vae (VAE always)",
                          choices=("select", "data", "vae"))
    gate: str = _arg("adaptive", "ablation: adaptive (A2PR) or always (constraint in every state)",
                     choices=("adaptive", "always"))
    # --- evaluation ---
    eval_freq: int | None = _arg(None, "evaluate every this many steps (spec: 5,000)")
    eval_episodes: int = _arg(10, "deterministic episodes per evaluation")
    eval_obs_noise: float = _arg(0.0, "std of Gaussian noise added to evaluation observations (robustness test)")
    # --- logging and checkpoints ---
    save_dir: str = _arg("runs", "parent folder of run folders")
    run_name: str | None = _arg(None, "run folder name (default: ENV__seedS__TIME)")
    log_freq: int | None = _arg(None, "fetch metrics, print progress and write the CSV every this many steps")
    save_freq: int | None = _arg(None, "write a checkpoint every this many steps (default: --eval-freq)")
    resume: str | None = _arg(None, "continue the run in this folder from its checkpoint", metavar="DIR")
    tensorboard: bool = _arg(False, "also log to TensorBoard (needs the tensorboard package)")
    wandb: bool = _arg(False, "also log to Weights & Biases (needs the wandb package)")
    wandb_project: str = _arg("a2pr", "wandb project name")
    quiet: bool = _arg(False, "print only the final summary")
    config: str | None = _arg(None, "run with the settings of a run's config.json; flags given here win", metavar="FILE")
    export: str | None = _arg(None, "write the run's policy as one TorchScript file (RUN_DIR/policy.pt): raw observation "
                              "-> env action, loadable with torch.jit.load alone", metavar="RUN_DIR")
    best: bool = _arg(False, "with --export: the policy of the best evaluation (each seed's own) -> policy_best.pt")
    # --- benchmarks (no dataset, no env) ---
    benchmark: str | None = _arg(None, "time the real update on synthetic data (update) or loading a 1M-row D4RL "
                                 "file (data); prints one JSON line", choices=("update", "data"), metavar="WHAT")
    bench_steps: int = _arg(200, "timed updates of --benchmark update, after 20 warm-up updates")
    bench_modes: str | None = _arg(None, "--benchmark update: time these update paths side by side, e.g. "
                                   "eager,compile,graphs (default: the path the flags select)", metavar="MODES")
    bench_repeats: int = _arg(1, "--benchmark update: timed rounds per path, interleaved; the median is reported")
    bench_dims: str = _arg("11,3", "OBS,ACT dims of the synthetic data of --benchmark update (hopper: 11,3)",
                           metavar="OBS,ACT")
    # --- sweeps (many runs on Ray: Appendix B; Ray is needed only for these) ---
    sweep: str | None = _arg(None, "run a suite on Ray: paper (the paper's 9 D4RL sets), mixes (random data + 1 or 5 "
                             "percent expert/medium), builtin (Pendulum) or envs (--sweep-envs)",
                             choices=("paper", "mixes", "builtin", "envs"), metavar="SUITE")
    sweep_envs: str | None = _arg(None, "--sweep envs: these datasets, comma-separated; ENV+NAME:FRAC for a --mix",
                                  metavar="A,B")
    seeds: int = _arg(5, "--sweep: seeds per dataset and variant (--seed onwards), --num-seeds of them per Ray task")
    variants: str = _arg("a2pr", "--sweep: side by side, among a2pr, td3bc (--bc-target data --gate always), no-gate "
                         "(--gate always), vae-only (--bc-target vae)", metavar="V,...")
    sweep_dir: str | None = _arg(None, "--sweep: folder of its run folders and results (default sweeps/SUITE)",
                                 metavar="DIR")
    task_cpus: float = _arg(1.0, "--sweep: CPU cores per Ray task; each task runs torch on that many threads (>= 1)")
    task_gpus: float | None = _arg(None, "--sweep: GPUs per Ray task, e.g. 0.25 packs four runs on one GPU "
                                   "(default: 1 with --cuda, else 0)")
    task_retries: int = _arg(3, "--sweep: times Ray reruns a task whose worker died; the rerun resumes the checkpoint")
    ray_address: str | None = _arg(None, "--sweep: Ray cluster to run on, e.g. auto or HOST:6379 (default "
                                   "$RAY_ADDRESS, else a local Ray on this machine)", metavar="ADDR")
    noise_levels: str | None = _arg(None, "--sweep: also evaluate every final policy under Gaussian observation noise "
                                    "of these stds, e.g. 0,0.01,0.05,0.1", metavar="S,...")


# Spec defaults for the fields that presets may change (None above means "preset, else this").
SPEC_DEFAULTS = dict(total_steps=1_000_000, batch_size=256, discount=0.99, alpha=2.5, bc_weight=1.0,
                     vae_weight=1.0, actor_hidden=256, critic_hidden=256, value_hidden=256, vae_hidden=750,
                     eval_freq=5000, log_freq=1000)


# Published per-task settings of the released code: (alpha, vae_weight, bc_weight, discount). Spec table.
D4RL_PRESETS = {
    "hopper-random-v2": (2.5, 1.5, 1.5, 0.995),
    "hopper-medium-v2": (2.5, 1.0, 0.4, 0.995),
    "hopper-medium-replay-v2": (2.5, 1.5, 0.5, 0.99),
    "hopper-medium-expert-v2": (2.5, 1.0, 4.0, 0.99),
    "halfcheetah-medium-v2": (40.0, 1.0, 1.0, 0.99),
    "halfcheetah-medium-replay-v2": (40.0, 1.5, 0.8, 0.995),
    "halfcheetah-medium-expert-v2": (40.0, 1.0, 10.0, 0.99),
    "walker2d-medium-v2": (2.5, 1.5, 1.0, 0.99),
    "walker2d-medium-replay-v2": (2.5, 1.5, 1.2, 0.995),
    "walker2d-medium-expert-v2": (2.5, 1.0, 0.8, 0.99),
}


PRESETS: dict[str, dict] = {
    "spec": {},
    # Pendulum is a 3-dim toy: narrow networks learn it in seconds, so a 2-core CPU run takes ~2-3 minutes.
    "pendulum-cpu": dict(total_steps=15_000, batch_size=256, actor_hidden=64, critic_hidden=64, value_hidden=64,
                         vae_hidden=128, eval_freq=1000, log_freq=500),
    **{name: dict(alpha=p[0], vae_weight=p[1], bc_weight=p[2], discount=p[3]) for name, p in D4RL_PRESETS.items()},
}


class A2PRError(Exception):
    """A problem the user can fix; the command line prints it as one line, without a traceback."""


# ----------------------------------------------------------------------------------------------------------------
# Networks. Every tensor has shape (K, B, ...): K independent agents (seeds) train as one batched computation,
# each layer holding K stacked weight matrices (CORL's VectorizedLinear). K = 1 is an ordinary single agent.
# The twin critics are one ensemble of 2K members: members 2k and 2k+1 are Q1 and Q2 of agent k.
# ----------------------------------------------------------------------------------------------------------------
class EnsembleLinear(nn.Module):
    """n independent linear layers applied to inputs of shape (n, B, in): y[i] = x[i] @ W[i] + b[i]."""

    def __init__(self, n: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d_in, d_out))
        self.bias = nn.Parameter(torch.empty(n, 1, d_out))

    def forward(self, x: torch.Tensor, members: slice = slice(None)) -> torch.Tensor:
        if members == slice(None):  # no slicing view: its backward would allocate and fill a zero gradient
            return torch.baddbmm(self.bias, x, self.weight)
        return torch.baddbmm(self.bias[members], x, self.weight[members])


def mlp(n: int, d_in: int, hidden: int, layers: int, d_out: int) -> nn.Sequential:
    dims = [d_in] + [hidden] * layers
    mods: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        mods += [EnsembleLinear(n, a, b), nn.ReLU()]
    return nn.Sequential(*mods, EnsembleLinear(n, dims[-1], d_out))


def run_mlp(net: nn.Sequential, x: torch.Tensor, members: slice = slice(None)) -> torch.Tensor:
    for m in net:
        x = m(x, members) if isinstance(m, EnsembleLinear) else m(x)
    return x


class Actor(nn.Module):
    """pi(s) in [-1, 1]^act_dim (the env's bounds are applied outside the networks)."""

    def __init__(self, k, obs_dim, act_dim, hidden, layers):
        super().__init__()
        self.net = mlp(k, obs_dim, hidden, layers, act_dim)

    def forward(self, s):
        return torch.tanh(self.net(s))


class TwinCritic(nn.Module):
    """Q1 and Q2 as one ensemble of 2K members (seed k owns members 2k and 2k+1): one batched forward."""

    def __init__(self, k, obs_dim, act_dim, hidden, layers):
        super().__init__()
        self.net = mlp(2 * k, obs_dim + act_dim, hidden, layers, 1)

    def forward(self, s, a):
        x = torch.cat([s, a], -1).repeat_interleave(2, dim=0)  # (2K, B, d): each seed's input to both critics
        q = self.net(x).squeeze(-1)
        return q[0::2], q[1::2]

    def q1(self, s, a):
        return run_mlp(self.net, torch.cat([s, a], -1), slice(0, None, 2)).squeeze(-1)


class ValueNet(nn.Module):
    def __init__(self, k, obs_dim, hidden, layers):
        super().__init__()
        self.net = mlp(k, obs_dim, hidden, layers, 1)

    def forward(self, s):
        return self.net(s).squeeze(-1)


class VAE(nn.Module):
    """Conditional VAE over actions (BCQ's): encoder (s,a) -> (mu, log sigma), decoder (s,z) -> action."""

    def __init__(self, k, obs_dim, act_dim, hidden, layers):
        super().__init__()
        self.latent_dim = 2 * act_dim  # spec: latent = 2 x action dim
        self.encoder = mlp(k, obs_dim + act_dim, hidden, layers, 2 * self.latent_dim)  # mu and log sigma heads
        self.decoder = mlp(k, obs_dim + self.latent_dim, hidden, layers, act_dim)

    def forward(self, s, a, noise):
        mean, log_std = self.encoder(torch.cat([s, a], -1)).chunk(2, -1)
        log_std = log_std.clamp(-4, 15)
        z = mean + log_std.exp() * noise  # reparameterised sample: gradients reach s, a and the encoder
        return self.decode(s, z), mean, log_std

    def decode(self, s, z):
        return torch.tanh(self.decoder(torch.cat([s, z], -1)))


class Agent(nn.Module):
    """All networks of K agents; target copies for the actor and critics only (spec)."""

    def __init__(self, seeds: list[int], obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        k = len(seeds)
        self.actor = Actor(k, obs_dim, act_dim, args.actor_hidden, args.actor_layers)
        self.critic = TwinCritic(k, obs_dim, act_dim, args.critic_hidden, args.critic_layers)
        self.value = ValueNet(k, obs_dim, args.value_hidden, args.value_layers)
        self.vae = VAE(k, obs_dim, act_dim, args.vae_hidden, args.vae_layers)
        init_ensemble(self, seeds)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)


@torch.no_grad()
def init_ensemble(module: nn.Module, seeds: list[int]) -> None:
    """PyTorch's nn.Linear default init, U(+-1/sqrt(fan_in)), drawn per seed from that seed's own generator, so
    agent k of a K-seed run starts exactly like a single run with seed k."""
    layers = [m for m in module.modules() if isinstance(m, EnsembleLinear)]
    for k, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        for lin in layers:
            per = lin.weight.shape[0] // len(seeds)
            bound = 1.0 / math.sqrt(lin.weight.shape[1])
            for p in (lin.weight, lin.bias):
                p[k * per:(k + 1) * per].uniform_(-bound, bound, generator=g)


# ----------------------------------------------------------------------------------------------------------------
# Losses: pure functions, one per spec step. Tensors carry a leading seed dimension K; each returns per-seed (K,)
# values so that summing over K gives every seed exactly its own gradient.
# ----------------------------------------------------------------------------------------------------------------
def td_target(critic_target: TwinCritic, r, s2, a2, d, discount: float) -> torch.Tensor:
    """Spec 1: y = r + gamma (1 - d) min(Q1', Q2')(s', a')."""
    q1, q2 = critic_target(s2, a2)
    return r + discount * (1.0 - d) * torch.min(q1, q2)


def critic_loss(critic: TwinCritic, s, a, y) -> torch.Tensor:
    """Spec 1: MSE(Q1(s,a), y) + MSE(Q2(s,a), y)."""
    q1, q2 = critic(s, a)
    return ((q1 - y) ** 2).mean(-1) + ((q2 - y) ** 2).mean(-1)


def value_loss(v, y, y2) -> torch.Tensor:
    """Spec 2: MSE(V(s), min(y, y2)) where y2 uses the just-updated online critics."""
    return ((v - torch.min(y, y2)) ** 2).mean(-1)


def vae_loss(recon, a, mean, log_std, weight) -> torch.Tensor:
    """Spec 3: mean(w (a_hat - a)^2) + 0.5 KL, KL = -0.5 mean(1 + log sigma^2 - mu^2 - sigma^2)."""
    rec = (weight.unsqueeze(-1) * (recon - a) ** 2).mean((-2, -1))
    kl = -0.5 * (1.0 + 2.0 * log_std - mean ** 2 - (2.0 * log_std).exp()).mean((-2, -1))
    return rec + 0.5 * kl


def vae_sample_weight(q1_data, v, vae_weight: float) -> torch.Tensor:
    """Spec 3: w = vae_weight where Q1(s,a) > V(s), else 0 (the VAE learns only the better actions)."""
    return vae_weight * (q1_data > v).to(q1_data.dtype)


def actor_loss(q_pi, pi, target, gate, alpha: float):
    """Spec 4: -lambda mean Q1(s, pi) + mean(gate (pi - target)^2), lambda = alpha / mean|Q1(s, pi)| detached.
    Returns (loss, bc term)."""
    lmbda = alpha / q_pi.abs().mean(-1).detach()
    bc = (gate.unsqueeze(-1) * (pi - target) ** 2).mean((-2, -1))
    return -lmbda * q_pi.mean(-1) + bc, bc


def prefer_generated(adv_gen, adv_data):
    """THE selection rule: prefer the generated action where A(s, a_G) >= A(s, a_D); ties go to a_G.

    Plain `>=` so the same function serves numpy arrays here and torch tensors in `select_bc_target`.
    """
    return adv_gen >= adv_data


def select_bc_target(adv_vae, adv_data, vae_action, data_action, bc_weight: float, eps_a: float,
                     bc_target: str = "select", gate: str = "adaptive"):
    """Spec 4: advantage selection and the adaptive gate, for each state of the batch.

    target = VAE action where A_vae >= A_data (ties go to the VAE), else the dataset action;
    gate   = bc_weight where A_vae >= eps_A or A_data > eps_A, else 0: a state where neither candidate has an
             advantage above eps_A gets no behaviour constraint at all (the released code's logical OR).
    The ablations replace one of the two rules. Returns (target, gate, use_vae).
    """
    if bc_target == "select":
        use_vae = prefer_generated(adv_vae, adv_data)  # the same rule as the tabular theory below
    else:
        use_vae = torch.full_like(adv_vae, bc_target == "vae", dtype=torch.bool)
    target = torch.where(use_vae.unsqueeze(-1), vae_action, data_action)
    on = (adv_vae >= eps_a) | (adv_data > eps_a) if gate == "adaptive" else torch.ones_like(use_vae)
    return target, bc_weight * on.to(adv_vae.dtype), use_vae


# ----------------------------------------------------------------------------------------------------------------
# One gradient step: spec 1-4 in order, one function per step, then update().
# ----------------------------------------------------------------------------------------------------------------
class Optimizers:
    def __init__(self, agent: Agent, args: Args):
        def adam(module, lr):
            # fused Adam is one kernel per step on CPU and CUDA; capturable keeps its step counter on the GPU so
            # that a CUDA graph can replay it
            return torch.optim.Adam(module.parameters(), lr=lr, fused=True, capturable=args.cuda_graphs)

        self.critic = adam(agent.critic, args.critic_lr)
        self.value = adam(agent.value, args.value_lr)
        self.vae = adam(agent.vae, args.vae_lr)
        self.actor = adam(agent.actor, args.actor_lr)

    def all(self) -> dict[str, torch.optim.Optimizer]:
        return dict(critic=self.critic, value=self.value, vae=self.vae, actor=self.actor)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, params=None) -> None:
    """Backward and Adam step. With params, gradients are computed for those parameters only (the actor step must
    not touch the critics or the VAE, whose parameters the actor loss also reaches)."""
    if params is None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
    else:
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
    opt.step()


def critic_step(agent: Agent, opt: Optimizers, s, a, r, s2, d, smoothing_noise, args: Args):
    """Spec 1: TD3 target with clipped policy-smoothing noise (max action = 1 in the networks' units), one Adam
    step on both critics. Returns (y, a', per-seed loss)."""
    with torch.no_grad():
        eps = (smoothing_noise * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
        a2 = (agent.actor_target(s2) + eps).clamp(-1.0, 1.0)
        y = td_target(agent.critic_target, r, s2, a2, d, args.discount)
    loss = critic_loss(agent.critic, s, a, y)
    _step(opt.critic, loss.sum())
    return y, a2, loss.detach()


@torch.no_grad()
def q1_data_and_y2(critic: TwinCritic, s, a, r, s2, a2, d, discount: float):
    """Q1(s, a) (spec 3 and 4) and y2 = td_target(critic, r, s', a', d) (spec 2), both from the just-updated online
    critics. Literally these are critic.q1(s, a) and td_target(critic, ...); one forward over the stacked batch
    [s; s'] gives both for the price of one (a test checks it equals the literal form)."""
    n = s.shape[1]
    q1, q2 = critic(torch.cat([s, s2], 1), torch.cat([a, a2], 1))
    return q1[:, :n], r + discount * (1.0 - d) * torch.min(q1[:, n:], q2[:, n:])


def value_step(agent: Agent, opt: Optimizers, s, y, y2):
    """Spec 2: V(s) is evaluated once, before its own step; that value v is reused by spec 3 and 4."""
    v = agent.value(s)
    loss = value_loss(v, y, y2)
    _step(opt.value, loss.sum())
    return v.detach(), loss.detach()


def vae_step(agent: Agent, opt: Optimizers, s, a, q1_data, v, latent_noise, args: Args):
    """Spec 3: the VAE reconstructs dataset actions only where Q1(s,a) > V(s)."""
    w = vae_sample_weight(q1_data, v, args.vae_weight)
    recon, mean, log_std = agent.vae(s, a, latent_noise)
    loss = vae_loss(recon, a, mean, log_std, w)
    _step(opt.vae, loss.sum())
    return w, loss.detach()


def actor_objective(agent: Agent, s, a, q1_data, v, latent_noise, args: Args):
    """Spec 4: the actor loss with advantage selection and the adaptive gate. Returns (per-seed loss, parts)."""
    pi = agent.actor(s)
    q_pi = agent.critic.q1(s, pi)
    # p_hat = the VAE's reconstruction of the policy action. Not detached, as in the released code: the behaviour
    # term (pi - p_hat)^2 then also moves pi through the VAE (the paper's prose treats the target as fixed).
    p_hat, _, _ = agent.vae(s, pi, latent_noise)
    with torch.no_grad():  # the advantages only choose; no gradient flows through the choice
        adv_vae = agent.critic.q1(s, p_hat) - v
        adv_data = q1_data - v
    target, gate, use_vae = select_bc_target(adv_vae, adv_data, p_hat, a, args.bc_weight, args.eps_a,
                                             args.bc_target, args.gate)
    loss, bc = actor_loss(q_pi, pi, target, gate, args.alpha)
    return loss, dict(pi=pi, p_hat=p_hat, adv_vae=adv_vae, adv_data=adv_data, target=target, gate=gate,
                      use_vae=use_vae, bc=bc)


def actor_step(agent: Agent, opt: Optimizers, s, a, q1_data, v, latent_noise, args: Args) -> dict:
    """Spec 4: one Adam step on the actor only, then the soft target updates."""
    loss, parts = actor_objective(agent, s, a, q1_data, v, latent_noise, args)
    _step(opt.actor, loss.sum(), list(agent.actor.parameters()))
    soft_update(agent, args.tau)
    return dict(actor=loss.detach(), bc=parts["bc"].detach(), gate_fraction=(parts["gate"] > 0).float().mean(-1),
                vae_target_fraction=parts["use_vae"].float().mean(-1))


@torch.no_grad()
def soft_update(agent: Agent, tau: float) -> None:
    """theta' <- tau theta + (1 - tau) theta', for the actor and the critics (only on actor steps)."""
    for net, targ in ((agent.actor, agent.actor_target), (agent.critic, agent.critic_target)):
        torch._foreach_lerp_(list(targ.parameters()), list(net.parameters()), tau)


def draw_noise(gens: list[torch.Generator], batch, latent_dim: int, actor_turn: bool) -> dict:
    """All the randomness of one update, drawn outside it (so update_core can be compiled or graph-captured): the
    policy-smoothing noise (spec 1), the VAE's latent noise (spec 3), and on actor steps the latent noise of the
    VAE's reconstruction of the policy action (spec 4). Seed k draws from its own stream."""
    a = batch[1]
    n, dev = a.shape[1], a.device
    noise = dict(smoothing=randn(gens, a.shape[1:], dev), vae=randn(gens, (n, latent_dim), dev))
    if actor_turn:
        noise["actor"] = randn(gens, (n, latent_dim), dev)
    return noise


def update_core(agent: Agent, opt: Optimizers, batch, noise: dict, actor_turn: bool, args: Args) -> dict:
    """Spec 1-4 on a batch (s, a, r, s', d) of shape (K, B, ...) with pre-drawn noise; per-seed metric tensors of
    shape (K,), named as in METRICS. No randomness and no host synchronisation inside: the same code runs eagerly,
    compiled, or as a CUDA graph."""
    s, a, r, s2, d = batch
    y, a2, l_critic = critic_step(agent, opt, s, a, r, s2, d, noise["smoothing"], args)          # spec 1
    q1_data, y2 = q1_data_and_y2(agent.critic, s, a, r, s2, a2, d, args.discount)                # after spec 1
    v, l_value = value_step(agent, opt, s, y, y2)                                                # spec 2
    w, l_vae = vae_step(agent, opt, s, a, q1_data, v, noise["vae"], args)                        # spec 3
    out = dict(critic=l_critic, value=l_value, vae=l_vae, q=q1_data.mean(-1),
               vae_weight_fraction=(w > 0).float().mean(-1))
    if actor_turn:
        out.update(actor_step(agent, opt, s, a, q1_data, v, noise["actor"], args))               # spec 4
    return out


def update(agent: Agent, opt: Optimizers, batch, step: int, args: Args, gens: list[torch.Generator]) -> dict:
    """One A2PR gradient step (spec 1-4) on a batch of shape (K, B, ...); returns per-seed metric tensors.
    `step` counts from 1; the actor and the targets move when step % policy_freq == 0 (as in TD3)."""
    actor_turn = step % args.policy_freq == 0
    noise = draw_noise(gens, batch, agent.vae.latent_dim, actor_turn)
    return update_core(agent, opt, batch, noise, actor_turn, args)


# One place for the metric names: what update() returns -> its column in the CSV, TensorBoard and wandb, and
# whether it is measured on actor steps only (then its window mean is over actor steps).
METRICS = {
    "critic": ("losses/critic", False),
    "value": ("losses/value", False),
    "vae": ("losses/vae", False),
    "actor": ("losses/actor", True),
    "bc": ("losses/bc", True),
    "q": ("charts/q_mean", False),
    "vae_weight_fraction": ("charts/vae_weight_fraction", False),
    "gate_fraction": ("charts/gate_fraction", True),
    "vae_target_fraction": ("charts/vae_target_fraction", True),
}


# ----------------------------------------------------------------------------------------------------------------
# The data as the networks see it: transitions in D4RL's convention, states normalised with the dataset's
# statistics, actions in [-1, 1], all resident on the training device; batches are gathered there.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """Transitions in D4RL's Q-learning convention plus what evaluation needs to read a score."""
    name: str
    env_id: typing.Any               # gymnasium id (or EnvSpec, for Minari) used for evaluation
    observations: np.ndarray         # (N, obs_dim) float32
    actions: np.ndarray              # (N, act_dim) float32, in the env's own units
    rewards: np.ndarray              # (N,) float32
    next_observations: np.ndarray    # (N, obs_dim) float32
    terminals: np.ndarray            # (N,) float32, 1 only on a true terminal (never on a time-out)
    ref_min_score: float             # return of a random policy
    ref_max_score: float             # return of an expert policy
    episode_returns: np.ndarray      # returns of the dataset's episodes (for the dataset's own average score)
    action_low: np.ndarray
    action_high: np.ndarray
    source: str = ""                 # where the data came from, printed at start
    notice: str = ""                 # a warning to print with every result (e.g. not the D4RL data)


def to_unit_actions(a: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Env bounds -> [-1, 1]. The released code scales by max_action, which is only right for symmetric bounds."""
    return np.clip(2.0 * (a - low) / (high - low) - 1.0, -1.0, 1.0).astype(np.float32)


def to_env_actions(a: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """[-1, 1] -> env bounds; clipped because float32 rounding can put a saturated action one ulp outside."""
    return np.clip(low + 0.5 * (a + 1.0) * (high - low), low, high).astype(np.float32)


@dataclass
class DeviceData:
    """Normalised transitions resident on the training device; batches are gathered there (no host copies)."""
    obs: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    next_obs: torch.Tensor
    done: torch.Tensor
    obs_mean: np.ndarray
    obs_std: np.ndarray

    def __len__(self):
        return self.obs.shape[0]


def prepare_data(ds: Dataset, args: Args, device: torch.device, stats=None) -> DeviceData:
    if stats is not None:
        mean, std = stats
    elif args.normalize_states:
        mean, std = ds.observations.mean(0), ds.observations.std(0) + 1e-3  # spec: std + 1e-3
    else:
        mean, std = np.zeros(ds.observations.shape[1]), np.ones(ds.observations.shape[1])
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def put(x):
        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)

    return DeviceData(obs=put((ds.observations - mean) / std),
                      act=put(to_unit_actions(ds.actions, ds.action_low, ds.action_high)),
                      rew=put(args.reward_scale * ds.rewards + args.reward_shift),
                      next_obs=put((ds.next_observations - mean) / std), done=put(ds.terminals),
                      obs_mean=mean, obs_std=std)


def warn_about_data(ds: Dataset, args: Args) -> None:
    """Data that is legal but suspicious: one `warning:` line each (shown even with --quiet), saying what is odd
    and what the run does about it."""
    n, warn = len(ds.rewards), functools.partial(print, file=sys.stderr)
    outside = int(((ds.actions < ds.action_low) | (ds.actions > ds.action_high)).any(1).sum())
    if outside:
        warn(f"warning: {outside:,} of {n:,} dataset actions ({100 * outside / n:.1f}%) lie outside the eval env's "
             f"action bounds [{ds.action_low.tolist()}, {ds.action_high.tolist()}]; they are clipped to the bounds "
             "for training")
    if ds.terminals.all():
        warn(f"warning: every one of the {n:,} transitions is terminal, so the critics never bootstrap (they learn "
             "the immediate reward only); training goes on")
    if args.batch_size > n:
        warn(f"warning: --batch-size {args.batch_size} is larger than the dataset ({n:,} transitions); batches are "
             "drawn with replacement, so every batch repeats transitions")


def sample_batch(data: DeviceData, batch_size: int, gens: list[torch.Generator]):
    """One batch per agent seed, each from that seed's own generator: tensors of shape (K, B, ...)."""
    idx = torch.stack([torch.randint(len(data), (batch_size,), generator=g, device=data.obs.device)
                       for g in gens])
    return data.obs[idx], data.act[idx], data.rew[idx], data.next_obs[idx], data.done[idx]


def randn(gens: list[torch.Generator], shape, device) -> torch.Tensor:
    """Standard normal noise of shape (K, *shape), seed k drawing from its own stream."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: deterministic episodes in the evaluation env, reported as D4RL's normalised score.
# ----------------------------------------------------------------------------------------------------------------
def normalized_score(ret, ref_min: float, ref_max: float):
    """D4RL's normalised score: 0 = random policy, 100 = expert."""
    return 100.0 * (np.asarray(ret, dtype=np.float64) - ref_min) / (ref_max - ref_min)


def make_eval_envs(env_id: str, agents: int, episodes: int) -> list[list]:
    """One env per (agent, episode), made once per run and reused by every evaluation (each episode reseeds)."""
    import gymnasium as gym

    register_a2pr_envs()
    return [[gym.make(env_id) for _ in range(episodes)] for _ in range(agents)]


def close_envs(envs: list[list]) -> None:
    for row in envs:
        for env in row:
            env.close()


@torch.no_grad()
def evaluate(actor: Actor, env_id: str, obs_mean, obs_std, action_low, action_high, episodes: int, seed: int,
             obs_noise: float = 0.0, device="cpu", envs: list[list] | None = None) -> np.ndarray:
    """Deterministic returns, shape (K, episodes). Every agent's episodes run side by side, one env each, so each
    env step is one batched actor forward over (K, episodes) (on a GPU: one transfer per step, not per episode).
    Episode e uses env seed `seed + e` for every agent, so evaluations are comparable across steps and agents and
    reproducible on resume. `envs` (from make_eval_envs) are reused if given, else made and closed here."""
    k = actor.net[0].weight.shape[0]
    own = envs is None
    envs = make_eval_envs(env_id, k, episodes) if own else envs
    if (len(envs), len(envs[0])) != (k, episodes):
        raise ValueError(f"evaluate: envs must be {k} agents x {episodes} episodes, got {len(envs)} x {len(envs[0])}")
    try:
        obs = np.stack([[env.reset(seed=seed + e)[0] for e, env in enumerate(row)] for row in envs])
        obs = obs.astype(np.float32)
        noise_rng = np.random.default_rng([seed, 12345])
        returns = np.zeros((k, episodes))
        alive = np.ones((k, episodes), dtype=bool)
        while alive.any():
            o = obs + obs_noise * noise_rng.standard_normal(obs.shape) if obs_noise > 0 else obs
            x = torch.as_tensor((o - obs_mean) / obs_std, dtype=torch.float32, device=device)  # (K, episodes, obs)
            act = to_env_actions(actor(x).cpu().numpy(), action_low, action_high)
            for i, e in zip(*np.nonzero(alive)):
                nxt, r, term, trunc, _ = envs[i][e].step(act[i, e])
                obs[i, e] = nxt
                returns[i, e] += r
                alive[i, e] = not (term or trunc)
        return returns
    finally:
        if own:
            close_envs(envs)


# ----------------------------------------------------------------------------------------------------------------
# Training: train(args) -> summary dict (the notebook and the tests call it directly), then main().
# ----------------------------------------------------------------------------------------------------------------
def run_settings(args: Args) -> tuple[Args, dict[str, str], dict | None]:
    """The run's resolved settings, where each came from, and the checkpoint when resuming. On --resume the
    checkpoint's settings win so that the run continues unchanged; the length may change, and how the update
    executes (device, --compile, --cuda-graphs) follows this command line, so a GPU run can go on here."""
    ckpt = None
    if args.resume:
        ckpt = _load_checkpoint(Path(args.resume))
        saved, given = args_from_checkpoint(ckpt), given_fields(args)
        check_resume_flags(args, saved, given)  # a flag that contradicts the checkpoint is an error, never ignored
        if ckpt.get("device", "cpu") != ("cuda" if args.cuda else "cpu"):
            print(f"note: the checkpoint was written on {ckpt.get('device', 'cpu')}; continuing on the other device "
                  "with fresh random streams, so the run will not be bit-identical to an uninterrupted one",
                  file=sys.stderr)
        mode = ("cuda", "cuda_graphs", "compile", "quiet")  # how this process runs: always this command line's
        args = dataclasses.replace(saved, **{k: getattr(args, k) for k in RESUME_MAY_CHANGE if k in given or k in mode})
        args, source = resolve_args(args)
        return args, {k: "flag" if k in given else "checkpoint" for k in source}, ckpt
    args, source = resolve_args(args)
    return args, source, ckpt


def make_device(args: Args) -> torch.device:
    if args.cuda_graphs and not args.cuda:
        raise A2PRError("--cuda-graphs needs --cuda (CUDA graphs exist only on a GPU)")
    if args.cuda:
        if not torch.cuda.is_available():
            raise A2PRError("--cuda was given but PyTorch sees no CUDA GPU (torch.cuda.is_available() is False); "
                            "install a CUDA build of torch or drop --cuda to train on the CPU")
        return torch.device("cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def out_of_memory_as_error(args: Args):
    """Data, networks or a batch too big for the device: one line naming what to lower, not a traceback."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError is one; the CPU allocator raises a plain RuntimeError
        if not (isinstance(e, torch.OutOfMemoryError) or re.search(r"not enough memory|can't allocate memory|"
                                                                    r"out of memory", str(e), re.IGNORECASE)):
            raise
        raise A2PRError(f"out of memory on the {'GPU' if args.cuda else 'CPU'} ({str(e).splitlines()[0][:160]}); "
                        + _lower_memory(args)) from None


def _lower_memory(args: Args) -> str:
    return (f"lower --batch-size (now {args.batch_size}) or --num-seeds (now {args.num_seeds}), or the network "
            "sizes (--actor-hidden, --critic-hidden, --value-hidden, --vae-hidden)")


def check_batch_fits(args: Args, obs_dim: int, act_dim: int, device: torch.device) -> None:
    """Before any allocation: a batch whose tensors alone exceed the device's memory stops with one line (on a CPU
    the kernel would otherwise kill the process, with no message, once the pages are touched)."""
    if device.type == "cuda":
        total = torch.cuda.mem_get_info(device)[1]
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        return
    need = args.num_seeds * args.batch_size * (8 + 4 * (2 * obs_dim + act_dim + 2))  # indices, then (s, a, r, s', d)
    if need > total:
        raise A2PRError(f"a batch needs at least {need / 2**30:,.1f} GiB but the {device.type.upper()} has "
                        f"{total / 2**30:,.1f} GiB; {_lower_memory(args)}")


def agent_seeds(args: Args) -> list[int]:
    """The K agents of a run are seeds seed, seed+1, ..., seed+K-1."""
    return [args.seed + i for i in range(args.num_seeds)]


def build_learner(args: Args, obs_dim: int, act_dim: int, device, ckpt: dict | None = None):
    """Networks, optimisers and one random stream per seed; restored from a checkpoint when one is given."""
    seeds = agent_seeds(args)
    agent = Agent(seeds, obs_dim, act_dim, args).to(device)
    opt = Optimizers(agent, args)
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    if ckpt:
        agent.load_state_dict(ckpt["agent"])
        for name, o in opt.all().items():
            o.load_state_dict(ckpt["optimizers"][name])
            for group in o.param_groups:  # a loaded state carries the saving run's flag; this run's mode wins
                group["capturable"] = args.cuda_graphs
        if ckpt.get("device", "cpu") == torch.device(device).type:
            for g, st in zip(gens, ckpt["rng"]):
                g.set_state(st)
        else:  # CPU and CUDA generators have different states: continue with fresh streams, seeded by the step
            for g, s in zip(gens, seeds):
                g.manual_seed(s * 1_000_003 + ckpt["step"])
    return agent, opt, gens


@dataclass
class Progress:
    """How far a run has got; saved in every checkpoint, so that a resumed run continues exactly."""
    best: np.ndarray             # best normalised score so far, per seed
    history: list[dict]          # the CSV's rows
    step: int = 0
    last_score: float = float("nan")


class MetricWindow:
    """Sums of update()'s metrics since the last CSV row, kept on the device: the loop never waits for the GPU
    between rows. It also remembers the first step at which a loss was not finite."""

    def __init__(self, k: int, device, step: int, ckpt: dict | None = None):
        self.sums = torch.zeros(len(METRICS), k, device=device)
        self.counts = dict(ckpt["metric_counts"]) if ckpt else {"critic": 0, "actor": 0}
        if ckpt:
            self.sums.copy_(ckpt["metric_sums"])
        self.first_bad = torch.full((len(METRICS),), -1, dtype=torch.long, device=device)
        self.step_t = torch.tensor(step, device=device)
        self.steps, self.t0 = 0, time.time()

    def add(self, m: dict) -> None:
        vals = torch.stack([m[k] if k in m else torch.zeros_like(m["critic"]) for k in METRICS])
        self.sums += vals
        self.step_t += 1
        self.first_bad = torch.where(~torch.isfinite(vals.sum(-1)) & (self.first_bad < 0), self.step_t,
                                     self.first_bad)
        self.counts["critic"] += 1
        self.counts["actor"] += "actor" in m
        self.steps += 1

    def check_finite(self, checkpoint: Path) -> None:
        """Stop on the first non-finite loss, before anything is written, keeping the last good checkpoint."""
        bad = self.first_bad.cpu()
        if (bad >= 0).any():
            i = int(torch.argmin(torch.where(bad >= 0, bad, bad.max() + 1)))
            last = (f"the last good checkpoint ({checkpoint}) was kept" if checkpoint.exists()
                    else "no checkpoint had been written yet")
            raise A2PRError(f"non-finite {list(METRICS)[i]} loss at step {int(bad[i])}; the run stopped and {last}. "
                            "Lower the learning rates or check the data's scale.")

    def row(self, step: int, elapsed: float) -> dict:
        """One CSV row: the window's mean of each metric (actor metrics over actor steps), steps/s; then reset."""
        row: dict = {"step": step, "time_s": round(elapsed, 2)}
        means = dict(zip(METRICS, self.sums.mean(-1).tolist()))
        for k, (column, actor_only) in METRICS.items():
            n = self.counts["actor"] if actor_only else self.counts["critic"]
            if n:
                row[column] = means[k] / n
        row["charts/SPS"] = round(self.steps / max(time.time() - self.t0, 1e-9), 1)
        self.sums.zero_()
        self.counts = {"critic": 0, "actor": 0}
        self.steps, self.t0 = 0, time.time()
        return row


def evaluation(agent: Agent, ds: Dataset, data: DeviceData, args: Args, device, envs) -> tuple[dict, np.ndarray]:
    """Evaluate every seed's actor; returns the CSV columns and the per-seed normalised scores."""
    rets = evaluate(agent.actor, ds.env_id, data.obs_mean, data.obs_std, ds.action_low, ds.action_high,
                    args.eval_episodes, seed=args.seed + 10_000, obs_noise=args.eval_obs_noise, device=device,
                    envs=envs)
    scores = normalized_score(rets, ds.ref_min_score, ds.ref_max_score).mean(1)  # per seed
    row = {"eval/return_mean": float(rets.mean()), "eval/normalized_score_mean": float(scores.mean()),
           "eval/normalized_score_std": float(scores.std())}
    if args.num_seeds > 1:
        row.update({f"eval/normalized_score_seed{s}": float(v) for s, v in zip(agent_seeds(args), scores)})
    return row, scores


def progress_line(step: int, args: Args, row: dict, progress: Progress) -> str:
    left = (args.total_steps - step) / max(row["charts/SPS"], 1e-9)
    return (f"step {step:>9,}/{args.total_steps:,} | {row['charts/SPS']:7.1f} steps/s | score "
            f"{progress.last_score:6.1f} (best {float(progress.best.mean()):6.1f}) | critic "
            f"{row.get('losses/critic', float('nan')):.3g} gate {row.get('charts/gate_fraction', float('nan')):.2f} "
            f"vae-target {row.get('charts/vae_target_fraction', float('nan')):.2f} | left {_fmt_time(left)}")


def train(args: Args) -> dict:
    """Train A2PR and return a summary: final and best normalised scores (mean over seeds and per seed), the
    dataset's own average score, and the paths of the run folder, CSV, plot and checkpoint."""
    args, source, ckpt = run_settings(args)
    log = (lambda *m, **k: None) if args.quiet else print
    device = make_device(args)
    if args.tensorboard or args.wandb:
        _check_trackers(args)
    check_writable(Path(args.resume or args.save_dir), "--resume needs to write there" if args.resume
                   else "choose another --save-dir")
    seeds = agent_seeds(args)

    # The data as the networks see it; a resumed run keeps the state normalisation it started with.
    ds = load_dataset(args, log)
    warn_about_data(ds, args)
    stats = (np.asarray(ckpt["obs_mean"]), np.asarray(ckpt["obs_std"])) if ckpt else None
    obs_dim, act_dim = ds.observations.shape[1], ds.actions.shape[1]
    dataset_score = float(normalized_score(ds.episode_returns, ds.ref_min_score, ds.ref_max_score).mean())

    # The learner, and the update that moves it: eager by default; --compile / --cuda-graphs run the same update.
    check_batch_fits(args, obs_dim, act_dim, device)
    with out_of_memory_as_error(args):
        data = prepare_data(ds, args, device, stats)
        agent, opt, gens = build_learner(args, obs_dim, act_dim, device, ckpt)
    updater = Updater(agent, opt, data, gens, args)
    progress = (Progress(np.asarray(ckpt["best"], dtype=float), ckpt["history"], ckpt["step"]) if ckpt
                else Progress(np.full(len(seeds), -np.inf), []))
    progress.last_score = history_last_score(progress.history)
    window = MetricWindow(len(seeds), device, progress.step, ckpt)

    log(f"A2PR on {ds.name} ({len(data):,} transitions, obs {obs_dim}, act {act_dim}; {ds.source}); "
        f"eval env {env_label(ds.env_id)}; device {device}; seeds {seeds}")
    log(f"dataset average normalised score: {dataset_score:.1f}")
    log("settings: " + ", ".join(f"{k}={getattr(args, k)} ({source[k]})" for k in SPEC_DEFAULTS)
        + f", eps_a={args.eps_a}, policy_freq={args.policy_freq}, bc_target={args.bc_target}, gate={args.gate}")
    eval_envs = make_eval_envs(ds.env_id, len(seeds), args.eval_episodes)  # made once; each evaluation reseeds
    run = claim_run_dir(args)  # a fresh folder (or the resumed one), locked while this process writes it
    paths, writers, t_start = run.paths, [], time.time()
    log(f"resuming {paths['run_dir']} at step {progress.step:,}" if ckpt else f"run folder {paths['run_dir']}")
    try:
        write_config(paths["config"], args, source)  # every setting, where it came from, and the versions
        writers = _open_trackers(args, paths["run_dir"], progress.step)
        with _StopFlag() as stop, out_of_memory_as_error(args):
            while progress.step < args.total_steps:
                progress.step += 1
                step = progress.step
                window.add(updater(step))  # sample a batch per seed and update (spec 1-4)
                is_eval = step % args.eval_freq == 0 or step == args.total_steps
                is_log = is_eval or step % args.log_freq == 0
                is_save = step % args.save_freq == 0 or step == args.total_steps
                if not (is_log or is_save or stop.set):
                    continue
                window.check_finite(paths["checkpoint"])
                if is_log:  # one row of the CSV: the window's mean losses, and the evaluation when due
                    row = window.row(step, time.time() - t_start)
                    if is_eval:
                        eval_row, scores = evaluation(agent, ds, data, args, device, eval_envs)
                        row.update(eval_row)
                        keep_best_policy(paths["best_policy"], progress, scores, step, agent, data, ds, args)
                        progress.last_score = eval_row["eval/normalized_score_mean"]
                    progress.history.append(row)
                    for log_row, _ in writers:
                        log_row(row)
                    write_csv(paths["csv"], progress.history)
                    log(progress_line(step, args, row, progress))
                if is_save or stop.set:  # on Ctrl-C the window's partial sums are saved too: resume is exact
                    save_checkpoint(paths["checkpoint"], args, agent, opt, gens, device, progress, window, data, ds)
                if stop.set:
                    break
        return finish_run(args, ds, progress, paths, dataset_score, time.time() - t_start, log, stop.signal)
    finally:
        close_envs(eval_envs)
        for _, close in writers:
            close()
        run.release()  # unlocks; a folder this run made and never wrote to is removed


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.benchmark:
            print(json.dumps((benchmark_update if args.benchmark == "update" else benchmark_data)(args)))
        elif args.sweep or args.sweep_envs:
            sweep(args)
        elif args.export:
            print(export_policy(args.export, best=args.best))
        elif (stopped_by := train(args)["signal"]) is not None:  # `a2pr.py && next` must not go on after a kill
            return 128 + signal.Signals[stopped_by]  # 130 after Ctrl-C, 143 after SIGTERM, as the shell reports
    except A2PRError as e:
        print(f"a2pr.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("a2pr.py: interrupted", file=sys.stderr)
        return 130
    return 0


# ================================================================================================================
# Appendix A. Data sources: built-in Pendulum datasets, D4RL names (registry, cache, download), local HDF5 files,
# Minari ids, and trajectory-wise mixes. Every source ends in the same rows -> transitions path (load_dataset).
# Not needed to understand A2PR: the algorithm only sees the Dataset that load_dataset returns.
# ================================================================================================================
def data_dir(args: Args) -> Path:
    return Path(args.data_dir or os.environ.get("A2PR_DATA_DIR") or Path.home() / ".cache" / "a2pr")


BUILTIN_DATASETS = {
    # name: (fraction of expert episodes, fraction of random actions inside the other episodes)
    "pendulum-random-v0": "uniform random torques",
    "pendulum-medium-v0": "scripted swing-up controller that takes a random torque 70% of the time",
    "pendulum-expert-v0": "scripted energy-pumping swing-up with a PD balancer",
    "pendulum-mostly-random-v0": "95% random episodes + 5% expert episodes, mixed trajectory-wise",
}


BUILTIN_EPISODES = 200          # 200 episodes x 200 steps = 40,000 rows per built-in dataset


BUILTIN_VERSION = 1             # bump when generation changes, so stale caches are never read


def pendulum_expert_action(obs: np.ndarray) -> float:
    """Energy-pumping swing-up, PD balance near the top. Pendulum-v1: theta'' = 15 sin(theta) + 3 u."""
    cos_th, sin_th, th_dot = float(obs[0]), float(obs[1]), float(obs[2])
    if cos_th > 0.8:  # near upright: PD on the angle; closed loop theta'' = -15 theta - 6 theta'
        u = -(10.0 * math.atan2(sin_th, cos_th) + 2.0 * th_dot)
    else:  # pump energy E = th_dot^2/2 + 15 cos(theta) towards the upright value 15
        energy = 0.5 * th_dot * th_dot + 15.0 * cos_th
        u = 2.0 * math.copysign(1.0, (15.0 - energy) * th_dot + 1e-6)
    return float(np.clip(u, -2.0, 2.0))


def _rollout_pendulum(policy: str, n_episodes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Run a scripted policy on gymnasium's Pendulum-v1 and return rows in D4RL's HDF5 layout."""
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    rows: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    for _ in range(n_episodes):
        obs, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
        done = False
        while not done:
            if policy == "random" or (policy == "medium" and rng.random() < 0.7):
                u = float(rng.uniform(-2.0, 2.0))
            else:
                u = pendulum_expert_action(obs)
            nxt, r, term, trunc, _ = env.step(np.array([u], dtype=np.float32))
            for k, v in zip(rows, (obs, [u], r, term, trunc)):
                rows[k].append(v)
            obs, done = nxt, term or trunc
    env.close()
    return {k: np.asarray(v, dtype=np.float32 if k in ("observations", "actions", "rewards") else bool)
            for k, v in rows.items()}


def make_builtin_dataset(name: str, seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """Generate a built-in Pendulum dataset (rows + attributes) from a seed; no network, no training."""
    rng = np.random.default_rng([seed, BUILTIN_VERSION])
    kind = name.split("-")[1] if name != "pendulum-mostly-random-v0" else "mix"
    if kind == "mix":  # trajectory-wise mix: whole episodes, 95 % random then 5 % expert
        n_expert = BUILTIN_EPISODES // 20
        parts = [_rollout_pendulum("random", BUILTIN_EPISODES - n_expert, rng),
                 _rollout_pendulum("expert", n_expert, rng)]
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    else:
        rows = _rollout_pendulum(kind, BUILTIN_EPISODES, rng)
    # Reference returns as D4RL defines them: a random policy and the expert, averaged over 100 episodes each.
    ref_rng = np.random.default_rng([seed, BUILTIN_VERSION, 1])
    ref = {}
    for policy in ("random", "expert"):
        r = _rollout_pendulum(policy, 100, ref_rng)
        ref[policy] = float(episode_returns(r).mean())
    attrs = dict(env_id="Pendulum-v1", ref_min_score=ref["random"], ref_max_score=ref["expert"],
                 generator=f"a2pr built-in v{BUILTIN_VERSION}, seed {seed}", description=BUILTIN_DATASETS[name])
    return rows, attrs


def write_d4rl_hdf5(path: Path, rows: dict[str, np.ndarray], attrs: dict) -> None:
    """Write rows in D4RL's HDF5 layout, atomically (see atomic_write)."""
    import h5py

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            for k, v in rows.items():
                f.create_dataset(k, data=v)
            for k, v in attrs.items():
                f.attrs[k] = v

    atomic_write(Path(path), write)


D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


CACHE_REMEDY = "it is a2pr's cached copy: delete it and let it be made again"


def read_d4rl_hdf5(path: Path, cached: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """Read a D4RL-layout HDF5 file, checking that it is complete and sane (one-line errors naming the file).
    `cached`: a2pr's own cached copy, which may be deleted and made again (never said of a user's own file)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in D4RL_KEYS if k not in f]
            if missing:
                raise A2PRError(f"{path}: not a D4RL dataset file, missing keys {missing}")
            rows = {k: f[k][()] for k in D4RL_KEYS}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except OSError as e:
        raise A2PRError(f"{path}: cannot read the HDF5 file ({e}); " + (CACHE_REMEDY if cached else
                        "check that it is a complete HDF5 file in D4RL's layout")) from None
    if rows["observations"].ndim != 2 or rows["actions"].ndim != 2:
        raise A2PRError(f"{path}: observations and actions must be 2-D arrays")
    n = len(rows["observations"])
    for k in ("rewards", "terminals", "timeouts"):
        rows[k] = rows[k].reshape(-1)
    for k in D4RL_KEYS:
        if len(rows[k]) != n:
            raise A2PRError(f"{path}: '{k}' has {len(rows[k])} rows but observations has {n}")
    for k in ("observations", "actions", "rewards"):
        rows[k] = rows[k].astype(np.float32)
    rows["terminals"] = rows["terminals"].astype(bool)
    rows["timeouts"] = rows["timeouts"].astype(bool)
    return validate_rows(rows, str(path)), attrs  # empty, NaN/inf: the same checks as for rows made in memory


def qlearning_transitions(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """D4RL's qlearning_dataset convention: next state = next row; rows cut by a time-out are dropped, not
    marked terminal (their next state is unknown), and so is the file's last row."""
    keep = ~rows["timeouts"][:-1]
    idx = np.flatnonzero(keep)
    return dict(observations=rows["observations"][idx], actions=rows["actions"][idx],
                rewards=rows["rewards"][idx], next_observations=rows["observations"][idx + 1],
                terminals=rows["terminals"][idx].astype(np.float32))


# --- D4RL registry (MuJoCo locomotion v2). URLs and reference returns as in D4RL's d4rl/infos.py and
# d4rl/gym_mujoco/__init__.py: gym_mujoco_v2/<env>_<kind with '_' for '-'>-v2.hdf5, cached under the URL's basename.
D4RL_BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2"


D4RL_KINDS = ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay")


ANT_D4RL_ENV_ID = "a2pr/AntD4RL-v4"  # Ant-v4 whose 84 contact-force dims are zero, as in D4RL's ant-v2 files


D4RL_FAMILIES = {
    # family: (evaluation env id, obs dim, act dim, ref_min_score (random policy), ref_max_score (expert))
    "hopper": ("Hopper-v4", 11, 3, -20.272305, 3234.3),
    "halfcheetah": ("HalfCheetah-v4", 17, 6, -280.178953, 12135.0),
    "walker2d": ("Walker2d-v4", 17, 6, 1.629008, 4592.3),
    "ant": (ANT_D4RL_ENV_ID, 111, 8, -325.6, 3879.7),
}


@dataclasses.dataclass(frozen=True)
class D4RLEntry:
    name: str            # hopper-medium-replay-v2
    family: str          # hopper
    url: str             # .../gym_mujoco_v2/hopper_medium_replay-v2.hdf5
    env_id: str          # gymnasium id used for evaluation
    obs_dim: int
    act_dim: int
    ref_min_score: float
    ref_max_score: float

    @property
    def filename(self) -> str:  # D4RL caches a file under its URL's basename
        return self.url.rsplit("/", 1)[1]


D4RL_DATASETS: dict[str, D4RLEntry] = {
    f"{fam}-{kind}-v2": D4RLEntry(f"{fam}-{kind}-v2", fam, f"{D4RL_BASE_URL}/{fam}_{kind.replace('-', '_')}-v2.hdf5",
                                  *info)
    for fam, info in D4RL_FAMILIES.items() for kind in D4RL_KINDS
}


MINARI_MUJOCO_NOTICE = ("Minari's mujoco/* datasets are not the D4RL data; do not compare these scores with "
                        "D4RL tables")


# --- Evaluation env for D4RL's ant: D4RL's ant-v2 files were collected with mujoco-py on MuJoCo 2.x, where the
# 84 contact-force observations (cfrc_ext) are never computed and stay 0 (and so does the contact cost in the
# reward). Ant-v4 with use_contact_forces=True has 111 dims too, but real, non-zero forces and a contact cost: a
# different input distribution from the data. This env gives the data's distribution: Ant-v4 defaults + 84 zeros.
@functools.cache
def _d4rl_ant_class():
    from gymnasium.envs.mujoco.ant_v4 import AntEnv
    from gymnasium.spaces import Box

    class D4RLAntEnv(AntEnv):
        def __init__(self, **kwargs):
            kwargs["use_contact_forces"] = False
            super().__init__(**kwargs)
            self.observation_space = Box(-np.inf, np.inf, (111,), np.float64)

        def _get_obs(self):
            return np.concatenate([super()._get_obs(), np.zeros(84)])

    return D4RLAntEnv


def make_d4rl_ant_env(**kwargs):
    return _d4rl_ant_class()(**kwargs)


def register_a2pr_envs() -> None:
    """Register a2pr's own evaluation envs with gymnasium (idempotent); call before gym.make on a saved env id."""
    import gymnasium as gym

    if ANT_D4RL_ENV_ID not in gym.registry:
        gym.register(ANT_D4RL_ENV_ID, entry_point=make_d4rl_ant_env, max_episode_steps=1000)


def env_label(env_id) -> str:
    return env_id if isinstance(env_id, str) else getattr(env_id, "id", str(env_id))


def env_spaces(env_id, where: str):
    """(observation space, action space) of an evaluation env; one-line error if it cannot be made or is not
    continuous."""
    import gymnasium as gym

    register_a2pr_envs()
    try:
        env = gym.make(env_id)
    except Exception as e:
        raise A2PRError(f"{where}: cannot make the evaluation env '{env_label(env_id)}' ({type(e).__name__}: {e})") \
            from None
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(act_space, gym.spaces.Box) or not isinstance(obs_space, gym.spaces.Box):
        raise A2PRError(f"{where}: the evaluation env '{env_label(env_id)}' must have Box observations and actions "
                        f"(has {type(obs_space).__name__} / {type(act_space).__name__})")
    return obs_space, act_space


def env_dims(env_id, where: str) -> tuple[int, int]:
    """(obs dim, act dim) of an evaluation env."""
    obs_space, act_space = env_spaces(env_id, where)
    return int(np.prod(obs_space.shape)), int(np.prod(act_space.shape))


def check_dims(rows: dict, obs_dim: int, act_dim: int, where: str, against: str) -> None:
    got_obs, got_act = rows["observations"].shape[1], rows["actions"].shape[1]
    if (got_obs, got_act) != (obs_dim, act_dim):
        raise A2PRError(f"{where}: the data has observation dim {got_obs} and action dim {got_act}, but {against} "
                        f"has {obs_dim} and {act_dim}")


# --- Rows -> transitions, rows validation, episodes
def rows_to_transitions(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Transitions from rows. Rows that carry next_observations (Minari: N+1 observations per N steps) keep every
    step, including the last step of a time-limited episode (its next state is known, terminal = 0). Rows without
    it follow D4RL's qlearning_dataset convention (next state = next row, time-out rows dropped)."""
    if "next_observations" not in rows:
        return qlearning_transitions(rows)
    return dict(observations=rows["observations"], actions=rows["actions"], rewards=rows["rewards"],
                next_observations=rows["next_observations"], terminals=rows["terminals"].astype(np.float32))


def validate_rows(rows: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Sanity checks shared by every source (files, Minari, mixes): non-empty, consistent shapes, finite values."""
    n = len(rows["rewards"])
    if n == 0:
        raise A2PRError(f"{where}: the dataset is empty")
    for k in ("observations", "actions", "next_observations"):
        if k in rows and (rows[k].ndim != 2 or len(rows[k]) != n):
            raise A2PRError(f"{where}: '{k}' has shape {rows[k].shape}, expected ({n}, dim)")
    for k in ("terminals", "timeouts"):
        if rows[k].shape != (n,):
            raise A2PRError(f"{where}: '{k}' has shape {rows[k].shape}, expected ({n},)")
    for k in ("observations", "actions", "rewards", "next_observations"):
        if k in rows and not np.isfinite(rows[k]).all():
            raise A2PRError(f"{where}: '{k}' contains NaN or inf values")
    return rows


def episode_bounds(rows: dict[str, np.ndarray]) -> np.ndarray:
    """(n_episodes, 2) [start, stop) row ranges: an episode ends at a terminal or time-out, or at the end of the
    rows (a trailing partial episode, which `_close_episodes` marks as timed out)."""
    n = len(rows["rewards"])
    stops = np.flatnonzero(rows["terminals"] | rows["timeouts"]) + 1
    if len(stops) == 0 or stops[-1] != n:
        stops = np.append(stops, n)
    starts = np.concatenate([[0], stops[:-1]])
    return np.stack([starts, stops], axis=1)


def episode_returns(rows: dict[str, np.ndarray]) -> np.ndarray:
    """The return of every episode in the rows (for a dataset's own average score)."""
    return np.add.reduceat(rows["rewards"].astype(np.float64), episode_bounds(rows)[:, 0])


def _close_episodes(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mark the last row as a time-out if it ends nothing, so that episodes can be moved around safely."""
    if not (rows["terminals"][-1] or rows["timeouts"][-1]):
        rows = dict(rows, timeouts=rows["timeouts"].copy())
        rows["timeouts"][-1] = True
    return rows


# --- Download: streamed to DEST.<pid>.part with a timeout and a progress bar, validated, then renamed.
def _progress(label: str, done: int, total: int | None, t0: float, state: dict, final: bool = False) -> None:
    """Plain-text progress on stderr: redrawn in place on a terminal, one line per 10% otherwise."""
    tty = sys.stderr.isatty()
    now = time.time()
    pct = 100.0 * done / total if total else None
    if not final:
        if tty and now - state.get("t", 0.0) < 0.2:
            return
        if not tty and (pct is None or int(pct // 10) <= state.get("decile", -1)):
            return
    state["t"], state["decile"] = now, int(pct // 10) if pct is not None else -1
    speed = done / max(now - t0, 1e-9) / 1e6
    size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
    line = f"  downloading {label}: " + (f"{pct:5.1f}% " if pct is not None else "") + f"{size} {speed:.1f} MB/s"
    sys.stderr.write(("\r" + line + ("\n" if final else "")) if tty else line + "\n")
    sys.stderr.flush()


def download_file(url: str, dest: Path, validate, timeout: float = 10.0, offline_hint: str = ""):
    """Download url to dest and return validate(part_path)'s result. The bytes go to DEST.<pid>.part, which is
    renamed to dest only once complete (Content-Length matched) and valid, and removed on any failure (also
    Ctrl-C): dest is never half-written or corrupt. Connection and stalled reads give up after `timeout` s."""
    check_writable(dest.parent, "downloads are cached there (D4RL: $D4RL_DATASET_DIR)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_parts(dest)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    where = f"put the file there by hand (e.g. wget -O {dest} {url}) and run again"

    def fail(reason: str) -> A2PRError:
        return A2PRError(f"cannot download {url} ({reason}); {where}" + (f", {offline_hint}" if offline_hint else ""))

    try:
        try:
            resp = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise fail(f"HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            r = e.reason
            raise fail(f"timed out after {timeout:g}s" if isinstance(r, TimeoutError) else
                       f"{type(r).__name__}: {r}" if isinstance(r, BaseException) else str(r)) from None
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise fail(f"timed out after {timeout:g}s" if isinstance(e, TimeoutError) else
                       f"{type(e).__name__}: {e}") from None
        total = int(resp.headers.get("Content-Length") or 0) or None
        done, t0, state = 0, time.time(), {}
        try:
            with resp, open(part, "wb") as f:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    _progress(dest.name, done, total, t0, state)
        except TimeoutError:
            raise fail(f"no data for {timeout:g}s after {done:,} bytes; the partial file was removed") from None
        except (OSError, http.client.HTTPException) as e:
            raise fail(f"interrupted after {done:,} bytes ({type(e).__name__}); the partial file was removed") \
                from None
        _progress(dest.name, done, total, t0, state, final=True)
        if total is not None and done != total:
            raise fail(f"incomplete: {done:,} of {total:,} bytes; the partial file was removed")
        try:
            result = validate(part)
        except A2PRError as e:
            reason = str(e).replace(str(part) + ": ", "").replace("; " + CACHE_REMEDY, "")
            raise A2PRError(f"the file downloaded from {url} is not a valid dataset ({reason}); nothing was saved "
                            f"at {dest}") from None
        os.replace(part, dest)
        return result
    finally:
        if part.exists():
            part.unlink()


def remove_dead_parts(dest: Path) -> None:
    """Remove DEST.<pid>.part files left by downloads whose process is gone (killed with -9: no cleanup ran)."""
    for part in dest.parent.glob(f"{glob.escape(dest.name)}.*.part"):
        pid = part.name[len(dest.name) + 1:-len(".part")]
        if pid.isdigit() and not _process_alive(int(pid)):
            part.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # Windows' os.kill terminates the process instead of probing it: assume it is alive
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else (PermissionError), or cannot tell: leave its file alone
        return True
    return True


# --- Sources: D4RL names, local files, built-in datasets
def d4rl_cache_dir() -> Path:
    """D4RL's own cache: $D4RL_DATASET_DIR, else ~/.d4rl/datasets (d4rl/offline_env.py)."""
    return Path(os.environ.get("D4RL_DATASET_DIR") or Path.home() / ".d4rl" / "datasets").expanduser()


def d4rl_url(entry: D4RLEntry) -> str:
    """The published URL, or the same file name under $A2PR_D4RL_MIRROR (a mirror; the tests' local server)."""
    mirror = os.environ.get("A2PR_D4RL_MIRROR")
    return f"{mirror.rstrip('/')}/{entry.filename}" if mirror else entry.url


def _offline_hint() -> str:
    return f"or use a built-in dataset that works offline: {', '.join(BUILTIN_DATASETS)}"


def load_d4rl(name: str, args: Args, log=print) -> tuple[dict, dict]:
    entry = D4RL_DATASETS[name]
    path = d4rl_cache_dir() / entry.filename
    against = f"{name} ({entry.env_id})"

    def read_checked(p: Path) -> dict:
        rows, _ = read_d4rl_hdf5(p, cached=True)
        check_dims(rows, entry.obs_dim, entry.act_dim, str(p), against)
        return rows

    if path.exists():
        rows = read_checked(path)
        how = "cached"
    else:
        url = d4rl_url(entry)
        log(f"downloading {name} from {url} -> {path}")
        rows = download_file(url, path, read_checked, timeout=args.download_timeout,
                             offline_hint=_offline_hint())
        how = "downloaded"
    attrs = dict(env_id=entry.env_id, ref_min_score=entry.ref_min_score, ref_max_score=entry.ref_max_score,
                 source=f"D4RL {name}, {how}, {path}")
    return rows, attrs


def _d4rl_family_of(text: str) -> str | None:
    """'hopper_medium-v2.hdf5' -> hopper; 'antmaze_...' -> None (ant must be followed by _ or -)."""
    m = re.match(r"(halfcheetah|hopper|walker2d|ant)[_-]", text.lower())
    return m.group(1) if m else None


def _parse_ref_scores(text, where: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in str(text).split(","))
    except ValueError:
        raise A2PRError(f"{where}: --ref-scores must be MIN,MAX (two numbers), got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi != lo):
        raise A2PRError(f"{where}: --ref-scores must be two different finite numbers, got {text!r}")
    return lo, hi


def load_local_file(path_text: str, args: Args, log=print) -> tuple[dict, dict]:
    """A D4RL-layout HDF5 file. Eval env: --eval-env, else the file's env_id attribute, else its name
    (hopper_medium-v2.hdf5 -> Hopper-v4). Reference returns: --ref-scores, else the file's attributes, else the
    D4RL family of the eval env."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise A2PRError(f"{path}: file not found")
    rows, fattrs = read_d4rl_hdf5(path)
    family = _d4rl_family_of(path.name)
    if args.eval_env:
        env_id, how = args.eval_env, "--eval-env"
    elif fattrs.get("env_id"):
        env_id, how = str(fattrs["env_id"]), "the file's env_id attribute"
    elif family:
        env_id, how = D4RL_FAMILIES[family][0], f"the file name ({family})"
    else:
        raise A2PRError(f"{path}: cannot tell which env to evaluate in (no env_id attribute, and the name does not "
                        f"start with {', '.join(D4RL_FAMILIES)}); pass --eval-env ID, e.g. --eval-env Hopper-v4")
    obs_dim, act_dim = env_dims(env_id, str(path))
    check_dims(rows, obs_dim, act_dim, str(path), f"the evaluation env {env_id} (from {how})")
    by_env = {v[0]: v for v in D4RL_FAMILIES.values()}
    if args.ref_scores:
        ref = _parse_ref_scores(args.ref_scores, str(path))
    elif "ref_min_score" in fattrs and "ref_max_score" in fattrs:
        ref = (float(fattrs["ref_min_score"]), float(fattrs["ref_max_score"]))
    elif env_id in by_env:
        ref = by_env[env_id][3:5]
    else:
        raise A2PRError(f"{path}: no reference returns for the normalised score (the file has no ref_min_score/"
                        f"ref_max_score attributes and {env_id} is not a D4RL env); pass --ref-scores MIN,MAX")
    return rows, dict(env_id=env_id, ref_min_score=ref[0], ref_max_score=ref[1],
                      source=f"file {path}, evaluated in {env_id} (from {how})")


def load_builtin(name: str, args: Args, log=print) -> tuple[dict, dict]:
    """a2pr's existing built-in path (generate once, then read the cached file)."""
    seed = args.dataset_seed
    path = data_dir(args) / f"{name}-seed{seed}-v{BUILTIN_VERSION}.hdf5"
    if not path.exists():
        check_writable(path.parent, "built-in datasets are cached there: point --data-dir or $A2PR_DATA_DIR to a "
                                    "writable folder")
        t0 = time.time()
        rows, attrs = make_builtin_dataset(name, seed)
        write_d4rl_hdf5(path, rows, attrs)
        log(f"generated {name} ({len(rows['rewards']):,} rows) in {time.time() - t0:.1f}s -> {path}")
    rows, attrs = read_d4rl_hdf5(path, cached=True)
    return rows, dict(env_id=attrs["env_id"], ref_min_score=float(attrs["ref_min_score"]),
                      ref_max_score=float(attrs["ref_max_score"]), source=f"built-in, {path}")


# --- Minari
MINARI_ID = re.compile(r"^[\w.-]+(/[\w.-]+)*-v\d+$")


def minari_local_path(dataset_id: str) -> Path:
    """Where minari.load_dataset looks (minari/storage/datasets_root_dir.py), without importing minari."""
    root = os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets"
    return Path(root) / dataset_id


def flatten_observations(obs, space, where: str) -> np.ndarray:
    """(T, ...) arrays -> (T, d) float32, in the order gymnasium.spaces.flatten uses (Dict: its key order)."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Box):
        a = np.asarray(obs, dtype=np.float32)
        return a.reshape(len(a), -1)
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_observations(obs[k], s, where) for k, s in space.spaces.items()], axis=1)
    if isinstance(space, gym.spaces.Tuple):
        return np.concatenate([flatten_observations(o, s, where) for o, s in zip(obs, space.spaces)], axis=1)
    raise A2PRError(f"{where}: unsupported observation space {type(space).__name__} (a2pr needs Box, or a Dict/"
                    f"Tuple of Boxes, which it flattens)")


def minari_episodes_to_rows(episodes, observation_space, where: str) -> dict[str, np.ndarray]:
    """Minari episodes (N+1 observations for N steps) -> rows with explicit next_observations. The last step of an
    episode that is neither terminated nor truncated (data collection stopped) is marked as a time-out, so that
    every episode's end is visible in terminals | timeouts."""
    parts: dict[str, list] = {k: [] for k in ("observations", "next_observations", "actions", "rewards",
                                              "terminals", "timeouts")}
    for ep in episodes:
        n = len(ep.rewards)
        if n == 0:
            continue
        obs = flatten_observations(ep.observations, observation_space, where)
        if len(obs) != n + 1:
            raise A2PRError(f"{where}: episode {ep.id} has {len(obs)} observations for {n} steps (expected {n + 1})")
        term = np.asarray(ep.terminations, dtype=bool).reshape(n)
        trunc = np.asarray(ep.truncations, dtype=bool).reshape(n).copy()
        trunc[-1] |= not term[-1]
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions, dtype=np.float32).reshape(n, -1))
        parts["rewards"].append(np.asarray(ep.rewards, dtype=np.float32).reshape(n))
        parts["terminals"].append(term)
        parts["timeouts"].append(trunc & ~term)
    if not parts["rewards"]:
        raise A2PRError(f"{where}: the dataset is empty (no episode with at least one step)")
    return validate_rows({k: np.concatenate(v) for k, v in parts.items()}, where)


def _missing_requirement(requirements) -> str | None:
    """The first pip requirement (from Minari metadata) whose package is not installed at all."""
    import importlib.metadata

    from packaging.requirements import InvalidRequirement, Requirement

    for text in requirements or []:
        try:
            name = Requirement(text).name
        except InvalidRequirement:
            continue
        for candidate in (name, name.replace("-", "_"), name.replace("_", "-")):
            try:
                importlib.metadata.version(candidate)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            return name
    return None


def _needs_package_error(dataset_id: str, package: str) -> A2PRError:
    package = "gymnasium-robotics" if package.replace("_", "-") == "gymnasium-robotics" else package
    return A2PRError(f"Minari dataset {dataset_id} needs the {package} package for its environment: "
                     f"pip install {package}")


def minari_eval_spec(ds, dataset_id: str):
    """The dataset's evaluation env as an EnvSpec that gymnasium.make accepts again (evaluation makes one env per
    agent): recover_environment(eval_env=True), plus FlattenObservation for Dict/Tuple observations, then .spec
    (gymnasium records wrappers in spec.additional_wrappers and re-applies them in make)."""
    import gymnasium as gym

    missing = _missing_requirement(ds.storage.metadata.get("requirements"))
    if missing:
        raise _needs_package_error(dataset_id, missing)
    try:
        env = ds.recover_environment(eval_env=True)
    except ModuleNotFoundError as e:
        raise _needs_package_error(dataset_id, (e.name or str(e)).split(".")[0]) from None
    except Exception as e:
        if "gymnasium_robotics" in str(e):
            raise _needs_package_error(dataset_id, "gymnasium-robotics") from None
        raise A2PRError(f"cannot make the evaluation env of Minari dataset {dataset_id} ({type(e).__name__}: {e})") \
            from None
    if not isinstance(env.observation_space, gym.spaces.Box):
        env = gym.wrappers.FlattenObservation(env)
    spec = env.spec
    env.close()
    return spec


@contextlib.contextmanager
def hf_download_timeout(seconds: float):
    """--download-timeout for Minari's downloads, which go through huggingface_hub. socket.setdefaulttimeout never
    reaches it: it passes its own timeouts (none at all when it lists datasets), retries a timed-out request five
    times with back-off, and fetches large files through hf_xet's own (Rust) client. So, for the download only,
    its shared HTTP client gets a transport that puts `seconds` on every connect and every read and turns a timeout
    or a network error into an OSError (which it does not retry), and hf_xet is switched off (files then come over
    plain HTTPS). HF_ENDPOINT, read by huggingface_hub, still chooses the server."""
    try:
        import httpx2
        from huggingface_hub import constants, set_client_factory
        from huggingface_hub.utils import _http as hf_http
    except ImportError as e:
        raise A2PRError(f"Minari downloads need huggingface_hub ({e}): pip install \"minari[hf]\"") from None

    class Transport(httpx2.HTTPTransport):
        def handle_request(self, request):
            request.extensions["timeout"] = httpx2.Timeout(seconds).as_dict()
            try:
                return super().handle_request(request)
            except httpx2.TimeoutException:
                raise TimeoutError(f"no answer from {request.url.host}:{request.url.port} for {seconds:g}s "
                                   f"(--download-timeout)") from None
            except httpx2.NetworkError as e:
                raise ConnectionError(f"{request.url.host}:{request.url.port}: {e}") from None

    old_factory, old_xet = hf_http._GLOBAL_CLIENT_FACTORY, constants.HF_HUB_DISABLE_XET
    hooks = old_factory().event_hooks  # keep huggingface_hub's own request hook (offline mode, request ids)
    set_client_factory(lambda: httpx2.Client(transport=Transport(), follow_redirects=True, event_hooks=hooks))
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        set_client_factory(old_factory)
        constants.HF_HUB_DISABLE_XET = old_xet


def load_minari(dataset_id: str, args: Args, log=print) -> tuple[dict, dict]:
    try:
        import minari
    except ImportError:
        raise A2PRError(f"'{dataset_id}' looks like a Minari dataset id, which needs the minari package: "
                        f"pip install minari") from None
    where = f"Minari dataset {dataset_id}"
    try:
        ds = minari.load_dataset(dataset_id, download=False)
    except FileNotFoundError:
        log(f"downloading Minari dataset {dataset_id} -> {minari_local_path(dataset_id)}")
        try:
            with hf_download_timeout(args.download_timeout):
                ds = minari.load_dataset(dataset_id, download=True)
        except Exception as e:
            raise A2PRError(f"cannot download {where} ({type(e).__name__}: {e}); check the id (minari list remote) "
                            f"and your connection, or put it under {minari_local_path(dataset_id)} "
                            f"(MINARI_DATASETS_PATH), {_offline_hint()}") from None
    except Exception as e:  # unsupported version, corrupt metadata
        raise A2PRError(f"cannot load {where} ({type(e).__name__}: {e})") from None
    meta = ds.storage.metadata
    import gymnasium as gym

    if not isinstance(ds.action_space, gym.spaces.Box):
        raise A2PRError(f"{where}: a2pr needs continuous (Box) actions, the dataset has {ds.action_space}")
    try:
        rows = minari_episodes_to_rows(ds.iterate_episodes(), ds.observation_space, where)
    except A2PRError:
        raise
    except Exception as e:  # a truncated or corrupt data file
        raise A2PRError(f"{where}: cannot read its data at {ds.storage.data_path} ({type(e).__name__}: {e}); "
                        f"delete that folder and download it again") from None
    spec = minari_eval_spec(ds, dataset_id)
    if args.ref_scores:
        ref = _parse_ref_scores(args.ref_scores, where)
    elif meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
        ref = (float(meta["ref_min_score"]), float(meta["ref_max_score"]))
    else:
        raise A2PRError(f"{where} has no ref_min_score/ref_max_score in its metadata, so its normalised score is "
                        f"undefined; pass --ref-scores MIN,MAX")
    obs_dim, act_dim = env_dims(spec, where)
    check_dims(rows, obs_dim, act_dim, where, f"its evaluation env {spec.id}")
    attrs = dict(env_id=spec, ref_min_score=ref[0], ref_max_score=ref[1],
                 source=f"Minari {dataset_id} ({len(rows['rewards']):,} steps), {ds.storage.data_path}")
    if dataset_id.startswith("mujoco/"):
        attrs["notice"] = MINARI_MUJOCO_NOTICE
    return rows, attrs


# --- Mixes
def parse_mix(text: str) -> tuple[str, float]:
    """'hopper-expert-v2:0.01' -> ('hopper-expert-v2', 0.01). The name is anything --env accepts; the fraction is
    the share of the mixed data's transitions that come from it, 0 < f < 1 ('1%' also accepted)."""
    name, sep, frac = str(text).rpartition(":")
    try:
        f = float(frac[:-1]) / 100 if frac.endswith("%") else float(frac)
    except ValueError:
        f = float("nan")
    if not sep or not name or not (0.0 < f < 1.0):
        raise A2PRError(f"--mix must be NAME:FRACTION with 0 < FRACTION < 1, e.g. hopper-expert-v2:0.01, got {text!r}")
    return name, f


def sample_episodes(rows: dict, target: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Row indices of whole episodes drawn uniformly with replacement until they hold >= target rows (the last
    one is kept whole, so the overshoot is under one episode); returns (indices, number of episodes)."""
    bounds = episode_bounds(rows)
    chosen, count = [], 0
    while count < target:
        s, e = bounds[rng.integers(len(bounds))]
        chosen.append(np.arange(s, e))
        count += e - s
    return (np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)), len(chosen)


def mix_rows(base: dict, good: dict, fraction: float, seed: int) -> tuple[dict, dict]:
    """Trajectory-wise mix as in the paper's low-quality-data experiments: T = len(good) rows in total (the good
    dataset's size); round(fraction * T) rows (half up, at least one episode) drawn as whole episodes of `good`,
    the rest as whole episodes of `base`, both with replacement, reproducible from `seed`. Base episodes first."""
    if set(base) != set(good):
        raise A2PRError("--mix: the two sources have different layouts (one has explicit next observations, e.g. "
                        "Minari, the other not); mix sources of the same kind")
    base, good = _close_episodes(base), _close_episodes(good)
    total = len(good["rewards"])
    n_good = max(1, math.floor(fraction * total + 0.5))
    rng = np.random.default_rng([seed, 2024])
    idx_base, k_base = sample_episodes(base, total - n_good, rng)
    idx_good, k_good = sample_episodes(good, n_good, rng)
    rows = {k: np.concatenate([base[k][idx_base], good[k][idx_good]]) for k in base}
    info = dict(total_target=total, good_target=n_good, good_rows=len(idx_good), base_rows=len(idx_base),
                good_episodes=k_good, base_episodes=k_base)
    return rows, info


# --- One entry point for every source
def source_kind(name: str) -> str:
    """builtin | d4rl | file | minari, or raise the unknown-name error."""
    if name in BUILTIN_DATASETS:
        return "builtin"
    if name in D4RL_DATASETS:
        return "d4rl"
    if name.lower().endswith((".hdf5", ".h5")) or os.path.isfile(name):
        return "file"
    if ("/" in name and MINARI_ID.match(name)) or (minari_local_path(name) / "data").is_dir():
        return "minari"
    raise unknown_name_error(name)


def unknown_name_error(name: str) -> A2PRError:
    known = list(BUILTIN_DATASETS) + list(D4RL_DATASETS)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    return A2PRError(f"unknown dataset '{name}'" + (f"; closest: {', '.join(close)}" if close else "")
                     + "; --env takes a D4RL name (hopper-medium-v2), a Minari id (mujoco/hopper/medium-v0), "
                     f"a .hdf5 file, or a built-in dataset (offline): {', '.join(BUILTIN_DATASETS)}")


LOADERS = dict(builtin=load_builtin, d4rl=load_d4rl, file=load_local_file, minari=load_minari)


def load_one(name: str, args: Args, log=print) -> tuple[dict, dict]:
    kind = source_kind(name)
    rows, attrs = LOADERS[kind](name, args, log)
    attrs["kind"] = kind
    if "notice" in attrs:
        log(f"NOTICE: {attrs['notice']}")
    return rows, attrs


def load_rows(env_name: str, args: Args, log=print) -> tuple[dict[str, np.ndarray], dict]:
    """--env (and --mix) -> (rows, attrs). rows: D4RL row layout (+ next_observations for Minari); attrs: env_id
    (gymnasium id or EnvSpec), ref_min_score, ref_max_score, source, kind, optionally notice and mix."""
    register_a2pr_envs()
    rows, attrs = load_one(env_name, args, log)
    mix = args.mix
    if mix:
        good_name, fraction = parse_mix(mix)
        try:
            good, gattrs = load_one(good_name, args, log)
        except A2PRError as e:
            raise A2PRError(f"--mix {mix}: {e}") from None
        if env_label(gattrs["env_id"]) != env_label(attrs["env_id"]) or \
                good["observations"].shape[1] != rows["observations"].shape[1] or \
                good["actions"].shape[1] != rows["actions"].shape[1]:
            raise A2PRError(f"--mix: {good_name} is for {env_label(gattrs['env_id'])} "
                            f"(obs {good['observations'].shape[1]}, act {good['actions'].shape[1]}) but {env_name} "
                            f"is for {env_label(attrs['env_id'])} (obs {rows['observations'].shape[1]}, act "
                            f"{rows['actions'].shape[1]}); mix two datasets of the same env")
        seed = args.dataset_seed
        rows, info = mix_rows(rows, good, fraction, seed)
        attrs = dict(attrs, mix=info, source=(
            f"mix of {env_name} ({info['base_rows']:,} rows, {info['base_episodes']} episodes) and {good_name} "
            f"({info['good_rows']:,} rows, {info['good_episodes']} episodes; target {fraction:g} of "
            f"{info['total_target']:,}), dataset seed {seed}"))
    return validate_rows(rows, env_name), attrs


def load_dataset(args: Args, log=print) -> Dataset:
    """--env (and --mix) -> transitions and what evaluation needs: the single path for every source."""
    rows, attrs = load_rows(args.env, args, log)
    env_id = attrs["env_id"]
    _, space = env_spaces(env_id, args.env)
    tr = rows_to_transitions(rows)
    if len(tr["rewards"]) == 0:
        raise A2PRError(f"{args.env}: no usable transitions (every row is a time-out)")
    return Dataset(name=args.env + (f" + {args.mix}" if args.mix else ""), env_id=env_id, **tr,
                   ref_min_score=float(attrs["ref_min_score"]), ref_max_score=float(attrs["ref_max_score"]),
                   episode_returns=episode_returns(rows), action_low=space.low.astype(np.float32),
                   action_high=space.high.astype(np.float32), source=attrs["source"], notice=attrs.get("notice", ""))


# ================================================================================================================
# Appendix B. Sweeps (Ray). Many runs at once: `--sweep SUITE` trains every (dataset, variant, block of seeds) of a
# suite as one Ray task, on this machine or on a Ray cluster, skips finished runs and resumes unfinished ones from
# their checkpoints, then writes results.csv, results.md (mean ± std per dataset, the paper's score beside it, IQM
# and mean over datasets with stratified-bootstrap 95 % CIs, probability of improvement) and results.png. Each task
# is an ordinary `train(args)` call, so nothing here is needed to understand A2PR; Ray is imported only inside these
# functions. A cluster needs the same a2pr.py path and a shared filesystem for --sweep-dir on every node (as with
# SLURM).
# ================================================================================================================
SWEEP_FIELDS = ("sweep", "sweep_envs", "seeds", "variants", "sweep_dir", "task_cpus", "task_gpus", "task_retries",
                "ray_address", "noise_levels")
# The ablations as the existing flags (spec 4): which action the actor is pulled to, and in which states.
SWEEP_VARIANTS = {
    "a2pr": dict(bc_target="select", gate="adaptive"),   # A2PR: advantage selection, adaptive gate
    "td3bc": dict(bc_target="data", gate="always"),      # TD3+BC's actor loss: dataset action, every state
    "no-gate": dict(bc_target="select", gate="always"),  # selection kept, constraint in every state
    "vae-only": dict(bc_target="vae", gate="adaptive"),  # VAE action always (no comparison), adaptive gate
}
_MIX_FAMILIES = ("hopper", "halfcheetah", "walker2d")
SWEEP_SUITES = {
    "paper": [f"{f}-{k}-v2" for k in ("medium", "medium-replay", "medium-expert") for f in _MIX_FAMILIES],
    "mixes": [f"{f}-random-v2+{f}-{good}-v2:{frac}" for f in _MIX_FAMILIES for good in ("expert", "medium")
              for frac in ("0.01", "0.05")],
    "builtin": list(BUILTIN_DATASETS),
}
# A2PR's normalised scores in the paper's table (spec), 1M steps.
PAPER_SCORES = {"halfcheetah-medium-v2": 68.6, "hopper-medium-v2": 100.8, "walker2d-medium-v2": 89.7,
                "halfcheetah-medium-replay-v2": 56.6, "hopper-medium-replay-v2": 101.5,
                "walker2d-medium-replay-v2": 94.4, "halfcheetah-medium-expert-v2": 98.3,
                "hopper-medium-expert-v2": 112.1, "walker2d-medium-expert-v2": 114.6}
BOOTSTRAP_REPS = 10_000
# Test hook, read by the sweep's driver only: every run's first attempt kills its own Ray worker with SIGKILL as soon
# as the run has written a checkpoint (a marker file in the run folder keeps it to once), to test retry + resume.
SWEEP_KILL_HOOK = "A2PR_TEST_KILL_AFTER_CHECKPOINT"
RAY_INSTALL = "pip install 'ray>=2.40,<3' (or: pip install -r requirements-sweep.txt)"


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
        raise A2PRError(f"{what} must be a comma-separated list, got {text!r}")
    return items


def sweep_suite(args: Args) -> str:
    if args.sweep_envs and args.sweep not in (None, "envs"):
        raise A2PRError(f"give --sweep {args.sweep} or --sweep-envs, not both")
    suite = args.sweep or "envs"
    if suite == "envs" and not args.sweep_envs:
        raise A2PRError("--sweep envs needs --sweep-envs A,B,... (datasets; ENV+NAME:FRAC for a mix)")
    if suite not in ("envs", *SWEEP_SUITES):
        raise A2PRError(f"unknown --sweep suite {suite!r}; known: {', '.join(SWEEP_SUITES)}, envs")
    return suite


def noise_levels(args: Args) -> list[float]:
    if args.noise_levels is None:
        return []
    try:
        levels = [float(x) for x in _sweep_list(args.noise_levels, "--noise-levels")]
    except ValueError:
        levels = [float("nan")]
    if not all(math.isfinite(x) and x >= 0 for x in levels):
        raise A2PRError(f"--noise-levels must be stds >= 0, comma-separated, e.g. 0,0.01,0.05,0.1, got "
                        f"{args.noise_levels!r}")
    return sorted(set(levels))


def sweep_task_gpus(args: Args) -> float:
    return (1.0 if args.cuda else 0.0) if args.task_gpus is None else args.task_gpus


def plan_sweep(args: Args) -> list[dict]:
    """Every run of the sweep: one per (dataset, variant, block of --num-seeds seeds), in a deterministic folder
    `{dataset}__{variant}__seeds{first}-{last}` under --sweep-dir. A run's Args is the sweep's Args with the dataset,
    seeds and ablation fields replaced, so training flags given with --sweep apply to every run and win over presets,
    and preset fields left unset are resolved per dataset by resolve_args, as for a single run."""
    suite = sweep_suite(args)
    variants = _sweep_list(args.variants, "--variants")
    bad = [v for v in variants if v not in SWEEP_VARIANTS]
    if bad or len(set(variants)) < len(variants):
        raise A2PRError(f"--variants must list distinct names among {', '.join(SWEEP_VARIANTS)}, got {args.variants!r}")
    for name in ("seeds", "num_seeds", "task_retries"):
        v, least = getattr(args, name), 0 if name == "task_retries" else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise A2PRError(f"--{name.replace('_', '-')} must be an integer >= {least}, got {v!r}")
    if not (math.isfinite(args.task_cpus) and args.task_cpus > 0):
        raise A2PRError(f"--task-cpus must be a positive number, got {args.task_cpus!r}")
    gpus = sweep_task_gpus(args)
    if not (math.isfinite(gpus) and gpus >= 0):
        raise A2PRError(f"--task-gpus must be a number >= 0, got {args.task_gpus!r}")
    if args.cuda and gpus == 0:
        raise A2PRError("--cuda with --task-gpus 0: Ray would hide the GPUs from the tasks; give --task-gpus > 0")
    noise_levels(args)
    defaults = Args()
    for name in ("bc_target", "gate", "mix", "resume", "run_name"):
        if getattr(args, name) != getattr(defaults, name):
            instead = {"bc_target": "--variants", "gate": "--variants", "mix": "ENV+NAME:FRAC in --sweep-envs",
                       "resume": "the same --sweep command again", "run_name": "--sweep-dir"}[name]
            raise A2PRError(f"--{name.replace('_', '-')} is set per run by --sweep; use {instead}")
    sweep_dir = Path(args.sweep_dir or Path("sweeps") / suite)
    base = dataclasses.replace(args, **{f: getattr(defaults, f) for f in SWEEP_FIELDS}, resume=None, quiet=True,
                               save_dir=str(sweep_dir), data_dir=str(data_dir(args)))
    entries = SWEEP_SUITES[suite] if suite in SWEEP_SUITES else _sweep_list(args.sweep_envs, "--sweep-envs")
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = []
    for dataset in entries:
        env, _, mix = dataset.partition("+")
        for variant in variants:
            for i in range(0, len(seeds), args.num_seeds):
                block = seeds[i:i + args.num_seeds]
                folder = re.sub(r"[^\w.+-]", "_", f"{dataset}__{variant}__seeds{block[0]}-{block[-1]}")
                run_args = dataclasses.replace(base, env=env, mix=mix or None, seed=block[0], num_seeds=len(block),
                                               run_name=folder, **SWEEP_VARIANTS[variant])
                runs.append(dict(dataset=dataset, env=env, mix=mix or None, variant=variant, seeds=block,
                                 run_dir=str(sweep_dir / folder), args=run_args))
    return runs


# Settings that may differ between a run folder and a later sweep command without changing the run's results.
_SWEEP_FREE = {"resume", "quiet", "total_steps", "cuda", "compile", "cuda_graphs", "save_dir", "run_name",
               "data_dir", "download_timeout", "log_freq", "save_freq", "tensorboard", "wandb", "wandb_project"}


def sweep_run_state(run: dict, total_steps: int, levels: list[float]) -> str:
    """done (finished, every noise level evaluated) | noise (finished, noise levels missing) | resume (a checkpoint,
    no finished summary) | new."""
    run_dir = Path(run["run_dir"])
    summary = run_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        if not s.get("interrupted", True) and s.get("steps", 0) >= total_steps:
            have = _read_json(run_dir / "noise.json").get("scores", {})
            return "done" if all(repr(x) in have for x in levels) else "noise"
    return "resume" if (run_dir / "checkpoint.pt").exists() else "new"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def check_run_folder(run: dict, resolved: Args) -> None:
    """A folder left by an earlier sweep must hold the run this command asks for, else its scores would be mixed
    into the table silently."""
    path = Path(run["run_dir"]) / "checkpoint.pt"
    if not path.exists():
        return
    saved = _load_checkpoint(path.parent)["args"]
    diff = [k for k, v in dataclasses.asdict(resolved).items()
            if k not in _SWEEP_FREE and k in saved and saved[k] != v]
    if diff:
        what = ", ".join(f"{k}={saved[k]!r} there, {getattr(resolved, k)!r} now" for k in diff[:3])
        raise A2PRError(f"{path.parent} was trained with other settings ({what}); give another --sweep-dir or "
                        "remove that folder")


# --- one Ray task ------------------------------------------------------------------------------------------------
def run_sweep_task(task: dict) -> dict:
    """What a Ray worker runs for one run folder: train it (fresh, or resumed from its checkpoint), then evaluate
    the final policy under observation noise, and record wall time, host and node in sweep.json. Plain dicts in and
    out. Ray reruns the task if its worker dies; the rerun resumes from the last checkpoint."""
    torch.set_num_threads(task["threads"])
    run_dir, t0 = Path(task["run_dir"]), time.time()
    stop_hook = _kill_after_first_checkpoint(run_dir) if task.get("kill_after_checkpoint") else None
    try:
        state = sweep_run_state(task, task["total_steps"], task["noise_levels"])
        resumed_at = None
        if state in ("new", "resume"):
            a = Args(**task["args"])
            if state == "resume":
                resumed_at = int(_load_checkpoint(run_dir)["step"])
                a = Args(resume=str(run_dir), total_steps=a.total_steps, quiet=True, cuda=a.cuda, compile=a.compile,
                         cuda_graphs=a.cuda_graphs)
            if train(a)["interrupted"]:
                return dict(run_dir=str(run_dir), interrupted=True)
        noise = evaluate_noise(run_dir, task["noise_levels"], task["eval_episodes"])
    finally:
        if stop_hook:
            stop_hook.set()
    info = _read_json(run_dir / "sweep.json")
    ray = sys.modules.get("ray")  # never start a Ray here: get_runtime_context() would start a local one
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    info.update(wall_s=info.get("wall_s", 0.0) + time.time() - t0, host=platform.node(), node=node,
                threads=torch.get_num_threads(), attempts=info.get("attempts", 0) + 1,
                resumed_at=info.get("resumed_at", []) + ([resumed_at] if resumed_at is not None else []))
    atomic_write(run_dir / "sweep.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
    return dict(run_dir=str(run_dir), interrupted=False, noise=noise)


def _kill_after_first_checkpoint(run_dir: Path):
    """The SWEEP_KILL_HOOK test hook: SIGKILL this worker once the run has a checkpoint, once per run folder."""
    import threading

    marker, stop = run_dir / ".test-killed", threading.Event()
    if marker.exists():
        return None

    def watch():
        while not stop.wait(0.005):
            if (run_dir / "checkpoint.pt").exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()
    return stop


def evaluate_noise(run_dir: Path, levels: list[float], episodes: int) -> dict:
    """Normalised score of each seed's final policy with Gaussian observation noise of each std (evaluate's
    obs_noise), on episodes seeded apart from the training evaluations; kept in noise.json, computed once."""
    path = run_dir / "noise.json"
    out = _read_json(path)
    if out.get("episodes") != episodes:
        out = dict(episodes=episodes, scores={})
    missing = [x for x in levels if repr(x) not in out["scores"]]
    if missing:
        run = load_run(run_dir)
        ref_min, ref_max = run["ref_scores"]
        for x in missing:
            rets = evaluate(run["agent"].actor, run["env_id"], run["obs_mean"], run["obs_std"], run["action_low"],
                            run["action_high"], episodes, seed=run["args"].seed + 20_000, obs_noise=x)
            out["scores"][repr(x)] = normalized_score(rets, ref_min, ref_max).mean(1).tolist()
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=2)))
    return out


# --- the driver --------------------------------------------------------------------------------------------------
def _import_ray():
    try:
        import ray
    except ImportError:
        raise A2PRError(f"--sweep needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def _start_ray(ray, args: Args, code_dir: str) -> bool:
    """Connect to --ray-address / $RAY_ADDRESS, else start a quiet local Ray with this machine's cores. Workers
    import a2pr from code_dir (the same path on every node). Returns whether we started it (and must stop it)."""
    if ray.is_initialized():  # e.g. a notebook that started Ray itself: use it as it is
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging
    from ray.job_config import JobConfig

    quiet = dict(job_config=JobConfig(code_search_path=[code_dir]), log_to_driver=False,
                 logging_level=logging.ERROR)
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=128 * 2**20, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise A2PRError(f"--sweep could not start {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    return True


def sweep(args: Args) -> dict:
    """Plan the sweep, run what is not finished on Ray (one task per run folder), then write the results. Returns
    dict(sweep_dir, results_csv, results_md, results_png, ran, skipped, failed)."""
    ray = _import_ray()
    runs = plan_sweep(args)
    suite, levels = sweep_suite(args), noise_levels(args)
    sweep_dir = Path(runs[0]["run_dir"]).parent
    kill = os.environ.get(SWEEP_KILL_HOOK) == "1"
    resolved, todo = {}, []
    for run in runs:
        resolved[run["run_dir"]] = r = resolve_args(run["args"])[0]
        check_run_folder(run, r)
        state = sweep_run_state(run, r.total_steps, levels)
        run["state"] = state
        if state != "done":
            todo.append(run)
    print(f"sweep {suite}: {len(runs)} runs in {sweep_dir} ({len(runs) - len(todo)} finished, "
          f"{sum(r['state'] == 'resume' for r in todo)} to resume, {sum(r['state'] == 'new' for r in todo)} new, "
          f"{sum(r['state'] == 'noise' for r in todo)} to evaluate under noise)", file=sys.stderr)
    failed = []
    if todo:
        seen = set()
        for run in todo:  # load (download, generate) each dataset once here, not in every task at once
            key = (run["env"], run["mix"])
            if key not in seen and run["state"] != "noise":
                seen.add(key)
                load_dataset(run["args"], log=lambda *m, **k: print(*m, file=sys.stderr, **k))
        failed = _run_on_ray(ray, args, todo, resolved, levels, kill, suite)
    out = write_sweep_results(args, runs, sweep_dir, levels, suite)
    out.update(ran=[r["run_dir"] for r in todo], skipped=[r["run_dir"] for r in runs if r["state"] == "done"],
               failed=failed)
    print(f"sweep {suite}: results in {out['results_md']}", file=sys.stderr)
    if failed:
        raise A2PRError(f"{len(failed)} of {len(runs)} runs failed (first: {failed[0][0]}: {failed[0][1]}); "
                        f"{out['results_md']} has the others; run the same command again to retry")
    return out


def _run_on_ray(ray, args: Args, todo: list[dict], resolved: dict, levels: list[float], kill: bool,
                suite: str) -> list[tuple[str, str]]:
    """Submit one task per unfinished run folder and wait, printing a progress line; returns the failed runs."""
    code = Path(__file__).resolve()
    started = _start_ray(ray, args, str(code.parent))
    try:
        # The task must be importable by name on the workers (code_search_path), also when this file runs as a script.
        mod = sys.modules.get(code.stem) if __name__ == "__main__" else sys.modules[__name__]
        if mod is None:
            import importlib

            mod = importlib.import_module(code.stem)
        gpus = sweep_task_gpus(args)
        remote = ray.remote(mod.run_sweep_task)
        # PYTHONPATH too: a Ray that was already running (a notebook's, a test's) has no code_search_path for a2pr.
        options = dict(num_cpus=args.task_cpus, num_gpus=gpus, max_retries=args.task_retries, retry_exceptions=False,
                       scheduling_strategy="SPREAD",  # runs over all nodes rather than packed onto the first
                       runtime_env=dict(env_vars=dict(PYTHONPATH=os.pathsep.join(
                           p for p in (str(code.parent), os.environ.get("PYTHONPATH")) if p))))
        pending = {}
        for run in todo:
            r = resolved[run["run_dir"]]  # absolute paths: a worker on another node has another working folder
            absolute = dataclasses.replace(run["args"], save_dir=str(Path(run["args"].save_dir).resolve()),
                                           data_dir=str(Path(run["args"].data_dir).resolve()))
            task = dict(run_dir=str(Path(run["run_dir"]).resolve()), args=dataclasses.asdict(absolute),
                        total_steps=r.total_steps, noise_levels=levels, eval_episodes=r.eval_episodes,
                        kill_after_checkpoint=kill, threads=max(1, int(args.task_cpus)))
            pending[remote.options(name=Path(run["run_dir"]).name, **options).remote(task)] = run
        res = ray.cluster_resources()
        slots = int(res.get("CPU", 0) // args.task_cpus)
        if gpus:
            slots = min(slots, int(res.get("GPU", 0) // gpus))
        print(f"sweep {suite}: {len(todo)} Ray tasks on {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPUs, "
              f"{res.get('GPU', 0):g} GPUs: {max(slots, 0)} at a time ({args.task_cpus:g} CPU, {gpus:g} GPU each)",
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
            left = f"about {_fmt_time(elapsed / done * len(pending))} left" if done else "time left: unknown yet"
            line = (f"sweep {suite}: {done}/{len(todo)} done, {running} running, {len(pending) - running} queued"
                    f"{f', {len(failed)} failed' if failed else ''} | {_fmt_time(elapsed)} elapsed, {left}")
            if tty:
                print("\r" + line.ljust(100), end="" if pending else "\n", file=sys.stderr, flush=True)
            elif ready or not pending:
                print(line, file=sys.stderr, flush=True)
        return failed
    except KeyboardInterrupt:
        print("\nsweep interrupted: finished runs are kept; the same command resumes the others from their "
              "checkpoints", file=sys.stderr)
        raise
    finally:
        if started:
            ray.shutdown()


# --- results -----------------------------------------------------------------------------------------------------
def _eval_curves(run_dir: Path, seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, scores (seeds, steps)) of a run's evaluations, from its metrics.csv."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return np.zeros(0), np.zeros((len(seeds), 0))
    rows = [r for r in csv.DictReader(open(path)) if r.get("eval/normalized_score_mean", "") != ""]
    cols = ([f"eval/normalized_score_seed{s}" for s in seeds] if len(seeds) > 1 else ["eval/normalized_score_mean"])
    return (np.array([int(r["step"]) for r in rows]),
            np.array([[float(r[c]) for r in rows] for c in cols]).reshape(len(seeds), len(rows)))


def _train_seconds(run_dir: Path) -> float:
    """Training time of the steps that count: time_s restarts at 0 when a run resumes, so sum each segment's end."""
    path = run_dir / "metrics.csv"
    times = [float(r["time_s"]) for r in csv.DictReader(open(path))] if path.exists() else []
    return float(sum(a for a, b in zip(times, times[1:] + [-1.0]) if b < a))


def collect_sweep(runs: list[dict], levels: list[float]) -> list[dict]:
    """One row per seed of every finished run folder, read from the folder's files."""
    rows = []
    for run in runs:
        d = Path(run["run_dir"])
        s = _read_json(d / "summary.json")
        if not s or s.get("interrupted", True):
            continue
        info, noise = _read_json(d / "sweep.json"), _read_json(d / "noise.json").get("scores", {})
        secs = _train_seconds(d)
        for i, seed in enumerate(s["seeds"]):
            row = dict(dataset=run["dataset"], variant=run["variant"], seed=seed, final_score=s["final_scores"][i],
                       best_score=s["best_scores"][i], steps=s["steps"],
                       steps_per_s=round(s["steps"] / secs, 2) if secs else "", wall_s=round(info.get("wall_s", 0), 1),
                       seeds_in_run=len(s["seeds"]), host=info.get("host", ""), run_dir=str(d))
            row.update({f"noise_{x:g}": noise[repr(x)][i] for x in levels if repr(x) in noise})
            rows.append(row)
    return rows


def _versions() -> str:
    return ", ".join(f"{k} {v}" for k, v in library_versions(("ray",)).items() if v)


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = (", GPU " + torch.cuda.get_device_name()) if torch.cuda.is_available() else ", no GPU"
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores{gpu}"


def _command_line(args: Args) -> str:
    defaults, parts = Args(), ["python a2pr.py"]
    for f in dataclasses.fields(Args):
        v = getattr(args, f.name)
        if v != getattr(defaults, f.name):
            flag = "--" + f.name.replace("_", "-")
            parts.append(flag if v is True else f"{flag} {v}")
    return " ".join(parts)


def sweep_tables(rows: list[dict], levels: list[float], variants: list[str]) -> str:
    """results.md's tables: per dataset and variant, then the aggregates with their bootstrap CIs."""
    def pm(x):
        return f"{np.mean(x):.1f} ± {np.std(x):.1f}"

    def ci(t):
        return f"{t[0]:.1f} [{t[1]:.1f}, {t[2]:.1f}]"

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
                       f"{rs[0]['steps']:,} | {speed} | {_fmt_time(sum(f['wall_s'] for f in folders))} |")
    out += ["", "Scores are D4RL-normalised (0 = random, 100 = expert), mean ± std over seeds (final = last "
            "evaluation, best = best evaluation). steps/s: gradient steps per second of a run folder (each step "
            "updates all the seeds that share it); wall time: sum over the run folders of their tasks' wall time "
            "(data loading and evaluation included)."]
    per_variant = {v: [np.array([r["final_score"] for r in by[(d, v)]]) for d in datasets if (d, v) in by]
                   for v in variants}
    out += ["", f"## Aggregate over datasets (final score; stratified bootstrap, 95 % CI, {BOOTSTRAP_REPS:,} "
            "resamples)", "", "| variant | datasets | runs | mean | IQM |", "|---|---|---|---|---|"]
    for v, tasks in per_variant.items():
        if tasks:
            out.append(f"| {v} | {len(tasks)} | {sum(len(t) for t in tasks)} | "
                       f"{ci(stratified_bootstrap_ci(tasks, aggregate_mean))} | "
                       f"{ci(stratified_bootstrap_ci(tasks, aggregate_iqm))} |")
    out += ["", "Mean: the mean over datasets of each dataset's mean score. IQM: the interquartile mean of all runs "
            "(the middle 50 %). CIs: runs resampled with replacement within each dataset independently (rliable's "
            "stratified bootstrap), percentile interval."]
    if "a2pr" in variants and len(variants) > 1:
        out += ["", "## Probability of improvement", "", "| comparison | datasets | P(X > Y) [95 % CI] |",
                "|---|---|---|"]
        for v in variants:
            if v == "a2pr":
                continue
            common = [d for d in datasets if (d, "a2pr") in by and (d, v) in by]
            if not common:
                continue
            x = [np.array([r["final_score"] for r in by[(d, "a2pr")]]) for d in common]
            y = [np.array([r["final_score"] for r in by[(d, v)]]) for d in common]
            t = stratified_bootstrap_ci(x + y, lambda g, n=len(x): probability_of_improvement(g[:n], g[n:]))
            out.append(f"| P(a2pr > {v}) | {len(common)} | {t[0]:.2f} [{t[1]:.2f}, {t[2]:.2f}] |")
        out += ["", "rliable's definition: for each dataset, the probability that a random run of X has a higher "
                "final score than a random run of Y (ties count 1/2), averaged over datasets; the runs of each "
                "variant on each dataset are resampled independently for the CI."]
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
        for v, tasks in per_variant.items():
            if tasks:
                cells = []
                for x in levels:
                    g = [np.array([r.get(f"noise_{x:g}", np.nan) for r in by[(d, v)]]) for d in datasets
                         if (d, v) in by]
                    cells.append(ci(stratified_bootstrap_ci(g, aggregate_mean)) if all(np.isfinite(t).all()
                                                                                    for t in g) else "–")
                out.append(f"| **mean over datasets** [95 % CI] | {v} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_sweep_results(args: Args, runs: list[dict], sweep_dir: Path, levels: list[float], suite: str) -> dict:
    rows = collect_sweep(runs, levels)
    variants = [v for v in _sweep_list(args.variants, "--variants")]
    paths = dict(sweep_dir=str(sweep_dir), results_csv=str(sweep_dir / "results.csv"),
                 results_md=str(sweep_dir / "results.md"), results_png=str(sweep_dir / "results.png"))
    cols = ["dataset", "variant", "seed", "final_score", "best_score", *[f"noise_{x:g}" for x in levels], "steps",
            "steps_per_s", "wall_s", "seeds_in_run", "host", "run_dir"]

    def write_csv_rows(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, restval="")
            w.writeheader()
            w.writerows(rows)

    atomic_write(Path(paths["results_csv"]), write_csv_rows)
    finished = len({r["run_dir"] for r in rows})
    head = [f"# Sweep `{suite}`: {finished} of {len(runs)} run folders finished", "",
            f"- command: `{_command_line(args)}`",
            f"- datasets: {', '.join(dict.fromkeys(r['dataset'] for r in runs))}",
            "- variants: " + ", ".join(f"{v} (--bc-target {SWEEP_VARIANTS[v]['bc_target']} --gate "
                                        f"{SWEEP_VARIANTS[v]['gate']})" for v in variants),
            f"- seeds: {args.seed}..{args.seed + args.seeds - 1}, {args.num_seeds} per Ray task "
            f"({args.task_cpus:g} CPU, {sweep_task_gpus(args):g} GPU each)",
            f"- hardware (the machine that wrote this file): {_hardware()}; hosts that trained: "
            f"{', '.join(sorted({r['host'] for r in rows if r['host']})) or '–'}",
            f"- versions: {_versions()}",
            f"- written {time.strftime('%Y-%m-%d %H:%M:%S')}", ""]
    text = "\n".join(head) + "\n" + (sweep_tables(rows, levels, variants) if rows else "No finished runs yet.\n")
    atomic_write(Path(paths["results_md"]), lambda tmp: Path(tmp).write_text(text))
    if rows:
        plot_sweep(Path(paths["results_png"]), runs, rows, levels, variants, suite)
    return paths


def plot_sweep(path: Path, runs: list[dict], rows: list[dict], levels: list[float], variants: list[str],
               suite: str) -> None:
    """Per-dataset learning curves (mean over seeds, 95 % bootstrap band), the aggregate intervals, and the score
    under observation noise; matplotlib's Figure API, as plot_curves."""
    from matplotlib.figure import Figure

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
        ax.legend(fontsize=7)
    for ax in axes[:-1].ravel()[len(datasets):]:
        ax.set_visible(False)
    bottom = axes[-1]
    for k, (name, stat) in enumerate((("mean", aggregate_mean), ("IQM", aggregate_iqm))):
        ax = bottom[k]
        for i, v in enumerate(variants):
            tasks = [np.array([r["final_score"] for r in rows if r["dataset"] == d and r["variant"] == v])
                     for d in datasets]
            tasks = [t for t in tasks if len(t)]
            if tasks:
                p, lo, hi = stratified_bootstrap_ci(tasks, stat)
                ax.barh(i, hi - lo, left=lo, height=0.5, color=colors[v], alpha=0.6)
                ax.plot([p, p], [i - 0.25, i + 0.25], color="k")
        ax.set(yticks=range(len(variants)), yticklabels=variants, xlabel="normalised score",
               title=f"{name} over datasets, 95 % CI")
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


# ================================================================================================================
# Appendix C. Speed paths: the same update run eagerly, through torch.compile, or replayed as CUDA graphs
# (Updater), and the benchmarks that time them. Not needed to understand A2PR: every path computes update() above.
# ================================================================================================================
class Updater:
    """Sample a batch and run one update, in one of three equivalent ways: eagerly (default), through
    torch.compile (--compile), or by replaying CUDA graphs of the whole update (--cuda-graphs: one graph for critic
    steps and one for actor steps, captured after a few eager warm-up steps). Sampling and noise stay outside the
    graph, on the device, drawn from the per-seed generators exactly as the eager path draws them."""

    WARMUP = 4  # eager steps before capture: cuBLAS handles and Adam's state must exist before a graph is recorded

    def __init__(self, agent: Agent, opt: Optimizers, data: DeviceData, gens: list[torch.Generator], args: Args):
        self.agent, self.opt, self.data, self.gens, self.args = agent, opt, data, gens, args
        self.core = torch.compile(update_core) if args.compile else update_core
        self.graphs: dict[bool, tuple] = {}
        self.eager_steps = 0

    def __call__(self, step: int) -> dict:
        args = self.args
        actor_turn = step % args.policy_freq == 0
        batch = sample_batch(self.data, args.batch_size, self.gens)
        noise = draw_noise(self.gens, batch, self.agent.vae.latent_dim, actor_turn)
        if not args.cuda_graphs:
            return self.core(self.agent, self.opt, batch, noise, actor_turn, args)
        if actor_turn not in self.graphs and self.eager_steps < self.WARMUP:
            self.eager_steps += 1
            return self._on_side_stream(batch, noise, actor_turn)
        if actor_turn not in self.graphs:
            self.graphs[actor_turn] = self._capture(batch, noise, actor_turn)
        graph, static_batch, static_noise, out = self.graphs[actor_turn]
        for dst, src in zip(static_batch, batch):
            dst.copy_(src)
        for k in static_noise:
            static_noise[k].copy_(noise[k])
        graph.replay()
        return {k: v.clone() for k, v in out.items()}  # the graph's outputs are overwritten by the next replay

    def _on_side_stream(self, batch, noise, actor_turn):
        """Warm-up steps are real training steps, run on a side stream as CUDA graph capture requires."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.core(self.agent, self.opt, batch, noise, actor_turn, self.args)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, batch, noise, actor_turn):
        static_batch = tuple(x.clone() for x in batch)
        static_noise = {k: v.clone() for k, v in noise.items()}
        for o in self.opt.all().values():
            o.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records, does not run: the caller replays it for this very step
                out = self.core(self.agent, self.opt, static_batch, static_noise, actor_turn, self.args)
        except RuntimeError as e:  # nothing was applied (capture only records), so the last checkpoint is valid
            raise A2PRError(f"CUDA graph capture of the {'actor' if actor_turn else 'critic'} step failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); run without "
                            "--cuda-graphs (the eager --cuda path computes the same update)") from None
        return graph, static_batch, static_noise, out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_data(obs_dim: int, act_dim: int, n: int, device="cpu") -> DeviceData:
    """Random transitions already on the device (unit actions, 1 % terminals): for benchmarks and tests."""
    g = torch.Generator().manual_seed(0)
    return DeviceData(obs=torch.randn(n, obs_dim, generator=g).to(device),
                      act=torch.rand(n, act_dim, generator=g).mul(2).sub(1).to(device),
                      rew=torch.randn(n, generator=g).to(device),
                      next_obs=torch.randn(n, obs_dim, generator=g).to(device),
                      done=(torch.rand(n, generator=g) < 0.01).float().to(device),
                      obs_mean=np.zeros(obs_dim), obs_std=np.ones(obs_dim))


BENCH_MODES = {"eager": dict(compile=False, cuda_graphs=False), "compile": dict(compile=True, cuda_graphs=False),
               "graphs": dict(compile=False, cuda_graphs=True)}


def bench_modes(args: Args) -> list[str]:
    if args.bench_modes is None:
        return ["graphs" if args.cuda_graphs else "compile" if args.compile else "eager"]
    modes = [m.strip() for m in args.bench_modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in BENCH_MODES]
    if not modes or bad or len(set(modes)) < len(modes):
        raise A2PRError(f"--bench-modes must list distinct paths among {', '.join(BENCH_MODES)}, "
                        f"got {args.bench_modes!r}")
    return modes


def benchmark_update(args: Args) -> dict:
    """Steps/s of the real update (sampling included) on synthetic data of the given dims. Each path in
    --bench-modes gets its own learner and 20 warm-up updates (compiling or capturing happens there); then the paths
    are timed in turn for --bench-repeats rounds, so the machine's drift hits them alike, and each reports the
    median of its rounds. The top-level steps/s are the first path's."""
    args = resolve_args(dataclasses.replace(args, preset="spec" if args.preset == "auto" else args.preset))[0]
    modes = bench_modes(args)
    try:
        obs_dim, act_dim = (int(x) for x in args.bench_dims.split(","))
    except ValueError:
        raise A2PRError(f"--bench-dims must be OBS,ACT (two integers), got {args.bench_dims!r}") from None
    device = make_device(args)
    data = synthetic_data(obs_dim, act_dim, 100_000, device)
    updaters = {}
    for mode in modes:
        margs = dataclasses.replace(args, **BENCH_MODES[mode])
        make_device(margs)  # graphs needs --cuda
        agent, opt, gens = build_learner(margs, obs_dim, act_dim, device)
        updaters[mode] = Updater(agent, opt, data, gens, margs)
    steps = dict.fromkeys(modes, 0)

    def run(mode, k):
        for _ in range(k):
            steps[mode] += 1
            updaters[mode](steps[mode])
        _sync(device)

    for mode in modes:
        run(mode, 20)
    rates = {mode: [] for mode in modes}
    for _ in range(args.bench_repeats):
        for mode in modes:
            t0 = time.perf_counter()
            run(mode, args.bench_steps)
            rates[mode].append(args.bench_steps / (time.perf_counter() - t0))
    per_mode = {mode: dict(steps_per_s=round(float(np.median(r)), 2),
                           agent_steps_per_s=round(float(np.median(r)) * args.num_seeds, 2),
                           runs=[round(x, 2) for x in r]) for mode, r in rates.items()}
    first = per_mode[modes[0]]
    return dict(benchmark="update", device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
                steps_per_s=first["steps_per_s"], agent_steps_per_s=first["agent_steps_per_s"], modes=per_mode,
                repeats=args.bench_repeats, bench_steps=args.bench_steps,
                num_seeds=args.num_seeds, batch_size=args.batch_size, obs_dim=obs_dim, act_dim=act_dim,
                sizes=dict(actor=args.actor_hidden, critic=args.critic_hidden, value=args.value_hidden,
                           vae=args.vae_hidden), torch=torch.__version__, threads=torch.get_num_threads())


def benchmark_data(args: Args) -> dict:
    """Seconds to read a 1M-row hopper-shaped D4RL-layout file (written to a temporary folder first), make its
    transitions, and normalise them onto the device."""
    device = make_device(args)
    rng = np.random.default_rng(0)
    n, ep = 1_000_000, 1000
    rows = dict(observations=rng.standard_normal((n, 11), dtype=np.float32),
                actions=rng.uniform(-1, 1, (n, 3)).astype(np.float32), rewards=rng.standard_normal(n, np.float32),
                terminals=np.zeros(n, bool), timeouts=(np.arange(n) % ep) == ep - 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hopper_medium-v2.hdf5"
        write_d4rl_hdf5(path, rows, {})
        t0 = time.perf_counter()
        read, _ = read_d4rl_hdf5(path)
        t1 = time.perf_counter()
        tr = rows_to_transitions(read)
        t2 = time.perf_counter()
        ds = Dataset(name="bench", env_id="Hopper-v4", **tr, ref_min_score=0.0, ref_max_score=1.0,
                     episode_returns=episode_returns(read), action_low=-np.ones(3, np.float32),
                     action_high=np.ones(3, np.float32))
        prepare_data(ds, resolve_args(args)[0], device)
        _sync(device)
        t3 = time.perf_counter()
    return dict(benchmark="data", device=str(device), rows=n, transitions=len(tr["rewards"]),
                read_s=round(t1 - t0, 3), transitions_s=round(t2 - t1, 3), to_device_s=round(t3 - t2, 3),
                total_s=round(t3 - t0, 3))


# ================================================================================================================
# Appendix D. Run files: atomic writes, the run folder (claimed fresh and locked while written), config.json
# (settings, their sources, versions), checkpoints (plain data, loaded with weights_only=True), the best policy, the
# metrics CSV, the learning-curve plot, TensorBoard and wandb, loading a finished run or its policy, and exporting
# that policy as TorchScript. Not needed to understand A2PR: they record what train() does.
# ================================================================================================================
def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back). Read when a file is written, not at
    import time, so importing a2pr changes nothing in the importing process."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path` (rename is atomic on POSIX and Windows). A failed write (disk
    full, read-only folder) is one line saying so; the previous version of `path`, if any, is left intact."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results get the user's usual permissions
        os.replace(tmp, path)
    except OSError as e:
        kept = "its previous version is intact" if path.exists() else "nothing was written"
        full = "; the disk is full: free some space" if e.errno == errno.ENOSPC else ""
        raise A2PRError(f"cannot write {path} ({e.strerror or e}); {kept}{full}") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def check_writable(folder: Path, what: str) -> None:
    """A real test write into `folder` (or, if it does not exist yet, its nearest existing parent), before any
    work: a read-only or impossible folder is one line naming the flag to change, not a traceback later."""
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder")
        existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
        if not existing.is_dir():  # a file where a parent folder should be
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file")
        fd, tmp = tempfile.mkstemp(dir=existing, prefix=".a2pr-write-test-")  # made later: a failed run leaves none
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise A2PRError(f"{folder} is not a writable folder ({e.strerror or e}); {what}") from None


CSV_COLUMNS = (["step", "time_s"] + [column for column, _ in METRICS.values()]
               + ["charts/SPS", "eval/return_mean", "eval/normalized_score_mean", "eval/normalized_score_std"])


def write_csv(path: Path, rows: list[dict]) -> None:
    def w(tmp):
        with open(tmp, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=CSV_COLUMNS + sorted({k for r in rows for k in r} - set(CSV_COLUMNS)))
            wr.writeheader()
            wr.writerows(rows)
    atomic_write(path, w)


def plot_curves(path: Path, history: list[dict], dataset_score: float, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: a run never changes a notebook's plotting backend

    ev = [r for r in history if r.get("eval/normalized_score_mean") not in (None, "")]
    tr = [r for r in history if r.get("charts/gate_fraction") not in (None, "")]
    fig = Figure(figsize=(11, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    seed_cols = sorted(k for k in (ev[0] if ev else {}) if k.startswith("eval/normalized_score_seed"))
    for c in seed_cols:
        ax1.plot([r["step"] for r in ev], [r[c] for r in ev], lw=0.8, alpha=0.5)
    ax1.plot([r["step"] for r in ev], [r["eval/normalized_score_mean"] for r in ev], lw=2, label="A2PR")
    ax1.axhline(dataset_score, ls="--", c="gray", label="dataset average")
    ax1.set(xlabel="gradient step", ylabel="normalised score", title=title)
    ax1.legend()
    ax2.plot([r["step"] for r in tr], [r["charts/gate_fraction"] for r in tr], label="gate on (constrained)")
    ax2.plot([r["step"] for r in tr], [r["charts/vae_target_fraction"] for r in tr], label="target from VAE")
    ax2.set(xlabel="gradient step", ylabel="fraction of states", ylim=(-0.02, 1.02), title="advantage selection")
    ax2.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def history_last_score(history: list[dict]) -> float:
    scores = [r["eval/normalized_score_mean"] for r in history if "eval/normalized_score_mean" in r]
    return scores[-1] if scores else float("nan")


def _finite_or_none(x):
    return float(x) if np.isfinite(x) else None


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _StopFlag:
    """Ctrl-C, or SIGTERM (what SLURM, Ray and Kubernetes send before killing a job), sets a flag that the loop
    checks between updates, so the checkpoint is never taken mid-update; `signal` names the one that came. A second
    signal interrupts at once."""
    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.set, self.signal, self._old = False, None, {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = {name: signal.signal(getattr(signal, name), self._handle) for name in self.SIGNALS
                         if hasattr(signal, name)}
        return self

    def _handle(self, signum, _frame):
        if self.set:
            raise KeyboardInterrupt
        self.set, self.signal = True, signal.Signals(signum).name

    def __exit__(self, *exc):
        for name, old in self._old.items():
            signal.signal(getattr(signal, name), old)


def run_paths(run_dir: Path) -> dict[str, Path]:
    """The files of a run folder."""
    return dict(run_dir=run_dir, csv=run_dir / "metrics.csv", png=run_dir / "learning_curve.png",
                checkpoint=run_dir / "checkpoint.pt", summary=run_dir / "summary.json",
                config=run_dir / "config.json", best_policy=run_dir / "best_policy.pt")


def library_versions(extra: tuple[str, ...] = ()) -> dict:
    """python and the libraries that decide a run's numbers (None where one is not installed)."""
    import importlib.metadata

    out = dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__)
    for name in ("gymnasium", "mujoco", "minari", "h5py", *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_versions(args: Args) -> dict:
    """What a run ran on: python and the libraries that decide its numbers, the device, and a2pr.py's own hash."""
    out = library_versions()
    out["device"] = (f"cuda: {torch.cuda.get_device_name()}" if args.cuda and torch.cuda.is_available()
                     else f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    out["a2pr_sha256"] = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return out


def write_config(path: Path, args: Args, source: dict[str, str]) -> None:
    """config.json: every resolved setting with where it came from (a preset-controlled field as resolve_args says;
    any other "flag" where it differs from the Args default, else "default"), and the versions the run ran on.
    `--config path` runs with these settings again."""
    default = Args()
    settings = dataclasses.asdict(args)
    origin = {k: source.get(k) or ("flag" if v != getattr(default, k) else "default") for k, v in settings.items()}
    config = dict(settings=settings, source=origin, versions=run_versions(args))
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def resume_command(run_dir: Path) -> str:
    """The command that continues a run, quoted so that it pastes into a shell (a save dir may hold spaces), from
    the folder the run was started in."""
    script = Path(__file__).resolve()
    try:
        script = script.relative_to(Path.cwd().resolve())  # "python a2pr.py" when started next to it
    except ValueError:
        pass
    return f"python {shlex.quote(str(script))} --resume {shlex.quote(str(run_dir))}"


def lock_run_dir(run_dir: Path):
    """Lock run_dir/.lock for this process and return the open file (the lock lasts while it is open). flock is
    dropped by the OS when the process dies, so even kill -9 leaves no stale lock. Windows: msvcrt's byte lock."""
    f = open(run_dir / ".lock", "a+")
    try:
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt

            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise A2PRError(f"{run_dir} is in use by another a2pr.py process" + (f" (pid {holder})" if holder else "")
                        + f"; wait for it to end (or stop it), then continue with {resume_command(run_dir)}") \
            from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))  # for the message a second writer gets
    f.flush()
    return f


@dataclass
class RunFolder:
    """A run folder claimed by this process: locked while it writes there, and removed again by release() if this
    run made it and wrote nothing but its config.json into it (a run that failed before its first update leaves no
    folder behind)."""
    paths: dict[str, Path]
    lock: typing.Any
    made: bool

    def release(self) -> None:
        run_dir = self.paths["run_dir"]
        if self.made and all(p.name in (".lock", "config.json") for p in run_dir.iterdir()):
            for name in (".lock", "config.json"):
                (run_dir / name).unlink(missing_ok=True)
            run_dir.rmdir()
        self.lock.close()


def claim_run_dir(args: Args) -> RunFolder:
    """The run's folder, locked. A fresh run never writes into a folder that holds another run's files: a default
    name (ENV__seedS__TIME) that is taken gets a free suffix -2, -3, ... (os.mkdir without exist_ok, so two runs
    started in the same second cannot share one); an explicit --run-name that holds files stops with one line."""
    if args.resume:
        run_dir = Path(args.resume)
        return RunFolder(run_paths(run_dir), lock_run_dir(run_dir), made=False)
    base = args.run_name or f"{args.env.replace('/', '_')[-100:]}__seed{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    for i in itertools.count(1):
        run_dir = Path(args.save_dir) / (base if i == 1 else f"{base}-{i}")
        try:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(run_dir)
            made = True
        except FileExistsError:
            if not args.run_name:
                continue
            made = False
        except OSError as e:
            hint = "choose a shorter --run-name" if e.errno == errno.ENAMETOOLONG else "choose another --run-name"
            raise A2PRError(f"cannot make the run folder {run_dir} ({e.strerror or e}); {hint}") from None
        if not run_dir.is_dir():
            raise A2PRError(f"--run-name {args.run_name}: {run_dir} is a file, not a folder; choose another name")
        lock = lock_run_dir(run_dir)
        if not made and any(p.name != ".lock" for p in run_dir.iterdir()):
            lock.close()
            raise A2PRError(f"{run_dir} already holds a run's files; continue that run with {resume_command(run_dir)}"
                            f", or choose another --run-name")
        if i > 1:
            print(f"note: {Path(args.save_dir) / base} exists; this run writes to {run_dir}", file=sys.stderr)
        return RunFolder(run_paths(run_dir), lock, made)


def save_checkpoint(path: Path, args: Args, agent, opt, gens, device, progress, window, data, ds) -> None:
    """Everything a run needs to continue exactly: settings, networks, optimisers, random streams, progress, the
    metric window's partial sums, and what evaluation needs (state normalisation, action bounds, env). Only
    tensors, numbers, strings, lists and dicts (an EnvSpec as JSON text), so it loads with weights_only=True."""
    state = dict(args=dataclasses.asdict(args), agent=agent.state_dict(),
                 optimizers={k: o.state_dict() for k, o in opt.all().items()},
                 rng=[g.get_state() for g in gens], device=device.type, step=progress.step,
                 best=progress.best.tolist(), history=progress.history,
                 metric_sums=window.sums.cpu(), metric_counts=window.counts,
                 obs_mean=torch.as_tensor(data.obs_mean), obs_std=torch.as_tensor(data.obs_std),
                 env_id=env_label(ds.env_id), env_spec=None if isinstance(ds.env_id, str) else ds.env_id.to_json(),
                 dataset=ds.name, action_low=torch.as_tensor(ds.action_low),
                 action_high=torch.as_tensor(ds.action_high), ref_scores=(ds.ref_min_score, ds.ref_max_score))
    buf = io.BytesIO()  # serialised in memory, so that a full disk is an OSError from the write, not torch's own error
    torch.save(state, buf)
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getbuffer()))
    except A2PRError as e:
        raise A2PRError(f"{e}; continue with {resume_command(path.parent)}" if path.exists() else str(e)) from None


def keep_best_policy(path: Path, progress, scores: np.ndarray, step: int, agent, data, ds, args: Args) -> None:
    """Whenever an evaluation beats a seed's best so far, that seed's actor becomes its slice of best_policy.pt
    (with the state normalisation and action bounds), so that the best score comes with its weights. Only tensors,
    numbers and strings, so torch.load(weights_only=True) reads it."""
    better = scores > progress.best
    progress.best = np.maximum(progress.best, scores)
    if not better.any():
        return
    if path.exists():
        kept = torch.load(path, map_location="cpu", weights_only=True)
    else:  # the first evaluation beats -inf for every seed, so every slice is filled below
        kept = dict(actor={k: v.detach().cpu().clone() for k, v in agent.actor.state_dict().items()},
                    scores=torch.full((len(scores),), -math.inf, dtype=torch.float64),
                    steps=torch.zeros(len(scores), dtype=torch.long))
    idx = torch.as_tensor(np.nonzero(better)[0])
    for k, v in agent.actor.state_dict().items():  # every actor tensor is (K, ...): seed k is slice k
        kept["actor"][k][idx] = v.detach().cpu()[idx]
    kept["scores"][idx] = torch.as_tensor(scores[better], dtype=torch.float64)
    kept["steps"][idx] = step
    kept.update(obs_mean=torch.as_tensor(data.obs_mean), obs_std=torch.as_tensor(data.obs_std),
                action_low=torch.as_tensor(ds.action_low), action_high=torch.as_tensor(ds.action_high),
                args=dataclasses.asdict(args), env=env_label(ds.env_id))
    atomic_write(path, lambda tmp: torch.save(kept, tmp))


def finish_run(args: Args, ds, progress, paths: dict, dataset_score: float, elapsed: float, log,
               stopped_by: str | None = None) -> dict:
    """Write summary.json and the learning curve, tell the user how the run ended, and return the summary (with
    the signal that stopped it, if one did: main() exits 128 + its number)."""
    seeds, history, best = agent_seeds(args), progress.history, progress.best
    interrupted = progress.step < args.total_steps
    final = [r for r in history if "eval/normalized_score_mean" in r]
    final_scores = ([final[-1].get(f"eval/normalized_score_seed{s}", final[-1]["eval/normalized_score_mean"])
                     for s in seeds] if final else [float("nan")] * len(seeds))
    summary = dict(env=args.env, seeds=seeds, steps=progress.step, interrupted=interrupted,
                   signal=stopped_by if interrupted else None,
                   final_score=float(np.mean(final_scores)), final_score_std=float(np.std(final_scores)),
                   best_score=_finite_or_none(best.mean()), final_scores=[float(x) for x in final_scores],
                   best_scores=[_finite_or_none(b) for b in best], dataset_score=dataset_score,
                   versions=run_versions(args), **{k: str(v) for k, v in paths.items()})
    atomic_write(paths["summary"], lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    if history and final:
        plot_curves(paths["png"], history, dataset_score, f"A2PR on {ds.name}")
    if interrupted:
        print(f"interrupted{f' by {stopped_by}' if stopped_by else ''} at step {progress.step:,}; checkpoint saved. "
              f"Continue with: {resume_command(paths['run_dir'])}", file=sys.stderr)  # shown even with --quiet
    else:
        log(f"done: final score {summary['final_score']:.1f} +- {summary['final_score_std']:.1f}, best "
            f"{float(best.mean()):.1f}, dataset average {dataset_score:.1f} ({_fmt_time(elapsed)}); "
            f"results in {paths['run_dir']}")
    if ds.notice:
        log(f"NOTICE: {ds.notice}")
    return summary


def load_run(run_dir: str | Path, device="cpu") -> dict:
    """What a run left in its checkpoint, rebuilt: settings, networks, optimisers and random streams (ready to
    continue), the state normalisation, the evaluation env and the metrics history."""
    ckpt = _load_checkpoint(Path(run_dir))
    args = args_from_checkpoint(ckpt)
    agent, opt, gens = build_learner(args, len(ckpt["obs_mean"]), len(ckpt["action_low"]), device, ckpt)
    keys = ("step", "obs_mean", "obs_std", "action_low", "action_high", "env_id", "history", "ref_scores")
    return dict(args=args, agent=agent, opt=opt, gens=gens, **{k: ckpt.get(k) for k in keys})


def load_policy(run_dir: str | Path, device="cpu", seed_index: int = 0):
    """The trained policy of a run as a function: raw env observation -> env action (normalisation included)."""
    run = load_run(run_dir, device)
    actor, k = run["agent"].actor, run["args"].num_seeds
    mean, std, low, high = run["obs_mean"], run["obs_std"], run["action_low"], run["action_high"]

    @torch.no_grad()
    def policy(obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor((np.asarray(obs, np.float32) - mean) / std, device=device)
        x = x.reshape(1, -1, len(mean)).expand(k, -1, -1)
        return to_env_actions(actor(x)[seed_index].cpu().numpy(), low, high).reshape(*np.shape(obs)[:-1], len(low))

    return policy


class _Affine(nn.Module):
    """One actor layer of all K seeds, computed as in training (baddbmm over the leading seed dimension)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class DeployedPolicy(nn.Module):
    """Raw env observation(s) (..., obs_dim) -> env action(s) (..., act_dim): state normalisation, the actor and the
    action bounds in one module, the same operations as load_policy (all K seeds' actors run, as in training, and
    seed_index's action is kept: a K-member batched product can differ from a 1-member one in the last bit)."""

    def __init__(self, actor_state: dict, seed_index: int, obs_mean, obs_std, action_low, action_high):
        super().__init__()
        n = len([k for k in actor_state if k.endswith(".weight")])
        mods: list[nn.Module] = []
        for i in range(n):
            mods.append(_Affine(actor_state[f"net.{2 * i}.weight"].clone(), actor_state[f"net.{2 * i}.bias"].clone()))
            if i < n - 1:
                mods.append(nn.ReLU())
        self.net = nn.ModuleList(mods)
        self.k, self.seed_index = int(actor_state["net.0.weight"].shape[0]), int(seed_index)
        for name, v in dict(obs_mean=obs_mean, obs_std=obs_std, action_low=action_low, action_high=action_high).items():
            self.register_buffer(name, torch.as_tensor(np.asarray(v)))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.to(torch.float32)
        lead = x.shape[:-1]
        x = ((x - self.obs_mean) / self.obs_std).reshape(1, -1, x.shape[-1]).expand(self.k, -1, -1)
        for m in self.net:
            x = m(x)
        a = torch.tanh(x)[self.seed_index]
        low, high = self.action_low, self.action_high
        a = torch.clamp(low + 0.5 * (a + 1.0) * (high - low), low, high).to(torch.float32)
        return a.reshape(lead + [a.shape[-1]])


def export_policy(run_dir: str | Path, best: bool = False, seed_index: int = 0) -> Path:
    """Write RUN_DIR/policy.pt (the checkpoint's actor) or, with best, policy_best.pt (best_policy.pt's): one
    TorchScript file that torch.jit.load reads in a program that has never seen a2pr.py. Returns its path."""
    run_dir = Path(run_dir)
    if best:
        src = run_dir / "best_policy.pt"
        if not src.exists():
            raise A2PRError(f"--export {run_dir} --best: no best_policy.pt there (a run writes it at its first "
                            "evaluation)")
        try:
            state = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:
            raise A2PRError(f"{src}: cannot be read ({type(e).__name__}: {e})") from None
        actor = state["actor"]
    else:
        state = _load_checkpoint(run_dir)
        actor = {k[len("actor."):]: v for k, v in state["agent"].items() if k.startswith("actor.")}
    module = DeployedPolicy(actor, seed_index, *(np.asarray(state[k], dtype=np.float32)
                                                 for k in ("obs_mean", "obs_std", "action_low", "action_high")))
    with warnings.catch_warnings():  # torch.jit is in maintenance; scripting still works and loads everywhere
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module.eval())
        out = run_dir / ("policy_best.pt" if best else "policy.pt")
        atomic_write(out, lambda tmp: torch.jit.save(scripted, tmp))
    return out


def args_from_checkpoint(ckpt: dict) -> Args:
    """The run's settings; keys this version does not know (a newer a2pr) are reported, not a crash."""
    known = {f.name for f in dataclasses.fields(Args)}
    unknown = sorted(set(ckpt["args"]) - known)
    if unknown:
        print(f"note: ignoring checkpoint settings this a2pr.py does not know: {', '.join(unknown)}", file=sys.stderr)
    return Args(**{k: v for k, v in ckpt["args"].items() if k in known})


def _load_checkpoint(run_dir: Path) -> dict:
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        raise A2PRError(f"--resume {run_dir}: no checkpoint.pt there; give the folder of a run that saved one")
    try:  # weights_only: a shared checkpoint's pickle may carry code; only tensors and plain data are let through
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.findall(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else []
        if found and found[0].startswith("numpy"):
            raise A2PRError(f"{path}: written by an older a2pr.py (numpy arrays inside, which a safe load refuses); "
                            "continue it with the a2pr.py that wrote it, or start a new run") from None
        if found:
            raise A2PRError(f"{path}: refused, nothing in it was run: it holds Python objects ({found[0]}) that "
                            "could run code when loaded; a2pr checkpoints hold only tensors and plain data, so this "
                            "one was not written by a2pr.py or was altered") from None
        raise A2PRError(f"{path}: cannot be read as an a2pr checkpoint ({type(e).__name__}: {e})") from None
    needed = {"args", "agent", "optimizers", "rng", "step", "obs_mean", "obs_std", "history"}
    if not isinstance(ckpt, dict):
        raise A2PRError(f"{path}: not an a2pr checkpoint (it holds a {type(ckpt).__name__}, not a dict of settings "
                        "and states)")
    if not needed <= ckpt.keys():
        raise A2PRError(f"{path}: not an a2pr checkpoint (it lacks {sorted(needed - set(ckpt))})")
    for k in ("obs_mean", "obs_std", "action_low", "action_high"):  # tensors on disk, numpy arrays in memory
        if k in ckpt:
            ckpt[k] = np.asarray(ckpt[k])
    if ckpt.get("env_spec"):  # a Minari dataset's eval env: an EnvSpec, stored as JSON text
        from gymnasium.envs.registration import EnvSpec

        ckpt["env_id"] = EnvSpec.from_json(ckpt["env_spec"])
    return ckpt


def _check_trackers(args: Args) -> None:
    import importlib.util

    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise A2PRError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if args.wandb and importlib.util.find_spec("wandb") is None:
        raise A2PRError("--wandb needs the wandb package: pip install wandb")


def _wandb_run_id(run_dir: Path) -> str:
    """The run folder's W&B run id, kept in wandb.json so that every --resume continues the same W&B run."""
    path = run_dir / "wandb.json"
    if path.exists():
        return str(json.loads(path.read_text())["id"])
    run_id = f"{re.sub(r'[^A-Za-z0-9_-]', '-', run_dir.name)[:40]}-{os.urandom(4).hex()}"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({"id": run_id})))
    return run_id


def _open_trackers(args: Args, run_dir: Path, step: int = 0) -> list[tuple]:
    """Optional TensorBoard / wandb sinks, each a (log(row), close()) pair. A run resumed at `step` continues the
    same W&B run (its id is kept in the run folder; runs are grouped by dataset), and TensorBoard drops what was
    logged after the checkpoint (purge_step), so no step appears twice."""
    sinks = []
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if step else None)
        sinks.append((lambda row: [tb.add_scalar(k, v, row["step"]) for k, v in row.items() if k != "step"],
                      tb.close))
    if args.wandb:
        import wandb

        run = wandb.init(project=args.wandb_project, name=run_dir.name, id=_wandb_run_id(run_dir), resume="allow",
                         group=args.env, config=dataclasses.asdict(args))
        sinks.append((lambda row: run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"]),
                      run.finish))
    return sinks


# ================================================================================================================
# Appendix E. The theory on finite MDPs (spec, "What the theory promises"): augmented_behaviour_policy builds the
# paper's augmented behaviour policy with prefer_generated exactly as select_bc_target does above. Exact float64
# linear solves, no sampling, so the theorems (improvement, robustness, bounded gap) are tested exactly. Shapes: P
# (S, A, S) with P[s, a, s'] the transition probability, R (S, A), a policy (S, A) with rows on the simplex, rho
# (S,) the initial distribution. Not needed to run A2PR: it is what the tests check the selection rule against.
# ================================================================================================================
def augmented_behaviour_policy(beta, gen, adv, eps_a: float = 0.0,
                               prefer: typing.Callable = prefer_generated) -> np.ndarray:
    """The augmented behaviour policy pi~(a|s), exactly, from beta (S, A), generator gen (S, A) and advantages adv.

    Draw a_D ~ beta(.|s) and a_G ~ gen(.|s) independently; keep a_G if prefer(adv[s, a_G], adv[s, a_D]), else a_D;
    if the kept action's advantage is not > eps_a, fall back to a_D. pi~(a|s) sums the probability
    beta(a_D|s) gen(a_G|s) of every pair (a_D, a_G) whose outcome is a. `prefer` exists for negative controls only.
    Where the deep update differs: when neither candidate clears eps_A, the theory plays a_D while the deep gate
    drops the constraint (the policy is free there), and A_vae == eps_A counts as "on" in the deep gate.
    """
    beta, gen, adv = (np.asarray(x, dtype=np.float64) for x in (beta, gen, adv))
    pair = beta[:, :, None] * gen[:, None, :]                # (S, a_D, a_G): probability of drawing the pair
    adv_d, adv_g = adv[:, :, None], adv[:, None, :]
    # Keeping a_D and falling back both give a_D, so a_G is played exactly when it is kept and clears eps_a.
    play_gen = prefer(adv_g, adv_d) & (adv_g > eps_a)
    return (pair * play_gen).sum(1) + (pair * ~play_gen).sum(2)


def policy_transition_matrix(P, pi) -> np.ndarray:
    """P_pi[s, s'] = sum_a pi(a|s) P[s, a, s'], the state-to-state chain that pi induces."""
    return np.einsum("sa,sat->st", np.asarray(pi, dtype=np.float64), np.asarray(P, dtype=np.float64))


def policy_evaluation(P, R, pi, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """(V, Q) of pi: V solves (I - gamma P_pi) V = R_pi with R_pi(s) = sum_a pi(a|s) R(s, a); Q = R + gamma P V."""
    R = np.asarray(R, dtype=np.float64)
    R_pi = (np.asarray(pi, dtype=np.float64) * R).sum(1)
    V = np.linalg.solve(np.eye(len(R_pi)) - gamma * policy_transition_matrix(P, pi), R_pi)
    Q = R + gamma * np.asarray(P, dtype=np.float64) @ V
    return V, Q


def advantage(P, R, pi, gamma: float) -> np.ndarray:
    """A^pi(s, a) = Q^pi(s, a) - V^pi(s), defined for every action, including those pi never takes."""
    V, Q = policy_evaluation(P, R, pi, gamma)
    return Q - V[:, None]


def performance(P, R, pi, gamma: float, rho) -> float:
    """J(pi) = rho . V^pi, the expected discounted return from the initial distribution."""
    return float(np.asarray(rho, dtype=np.float64) @ policy_evaluation(P, R, pi, gamma)[0])


def discounted_state_distribution(P, pi, gamma: float, rho) -> np.ndarray:
    """d^pi = (1 - gamma) rho^T (I - gamma P_pi)^-1; it sums to 1 because P_pi's rows do."""
    P_pi = policy_transition_matrix(P, pi)
    # Solve the transposed system rather than inverting: d^T (I - gamma P_pi) = (1 - gamma) rho^T.
    x = np.linalg.solve((np.eye(len(P_pi)) - gamma * P_pi).T, np.asarray(rho, dtype=np.float64))
    return (1.0 - gamma) * x


def total_variation(p, q) -> np.ndarray:
    """TV(p(.|s), q(.|s)) = 0.5 sum_a |p(a|s) - q(a|s)|, one value per state (last axis = actions)."""
    return 0.5 * np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum(-1)


# ================================================================================================================
# Appendix F. The command line: the parser built from Args, --config (a run's config.json as the defaults), preset
# resolution and validation (one clear line per mistake, before any work). Not needed to understand A2PR:
# train(args) takes an Args however it was made.
# ================================================================================================================
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage dump; an unknown flag gets the closest known one
        if message.startswith("unrecognized arguments:"):
            known = [o for a in self._actions for o in a.option_strings]
            close = {w: difflib.get_close_matches(w.split("=")[0], known, n=1, cutoff=0.6)
                     for w in message.split(":", 1)[1].split() if w.startswith("-")}
            message += "".join(f" ({w}: did you mean {c[0]}?)" for w, c in close.items() if c)
        self.exit(2, f"a2pr.py: error: {message} (see python a2pr.py --help)\n")


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The command line, built from Args: one flag per field, its help line from the field's metadata. With
    defaults=False, a field not given on the command line is absent from the result (--config uses that)."""
    p = _Parser(prog="a2pr.py", description=__doc__.split("\n\n")[0],
                formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=30, width=120))
    hints = typing.get_type_hints(Args)
    for f in dataclasses.fields(Args):
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        typ = hints[f.name]
        hide = f.default is None or typ is bool or str(f.default) in f.metadata["help"]
        shown = "" if hide else f" (default {f.default})"
        kw = dict(dest=f.name, help=f.metadata["help"] + shown, default=f.default if defaults else argparse.SUPPRESS)
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction if f.metadata.get("negatable") else "store_true"
        else:
            base = next((t for t in typing.get_args(typ) if t is not type(None)), typ)
            kw.update(type=base, metavar=f.metadata.get("metavar", f.name.split("_")[-1].upper()))
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        p.add_argument(*flags, **kw)
    return p


def parse_args(argv=None) -> Args:
    """Args from the command line, remembering which flags were given (a flag given with its default value still
    counts: on --resume it must agree with the checkpoint); with --config FILE, the fields not given on the command
    line come from FILE."""
    values = vars(build_parser().parse_args(argv))
    given = vars(build_parser(defaults=False).parse_args(argv))  # no defaults: only the flags that were given
    if values["config"]:
        values.update({k: v for k, v in load_config(values["config"]).items() if k not in given})
    args = Args(**values)
    args.given = frozenset(given)
    return args


# On --resume the checkpoint's settings win; these follow the command line: the run's length, how the update
# executes (device, --compile, --cuda-graphs) and where the data is found, none of which changes what is learned.
RESUME_MAY_CHANGE = ("resume", "total_steps", "cuda", "compile", "cuda_graphs", "quiet", "data_dir",
                     "download_timeout")


def given_fields(args: Args) -> set[str]:
    """The settings the user gave: the command line's record, else (train(Args(...)) from Python) every field that
    differs from its default."""
    recorded = getattr(args, "given", None)
    if recorded is not None:
        return set(recorded)
    return {f.name for f in dataclasses.fields(Args) if getattr(args, f.name) != f.default}


def check_resume_flags(args: Args, saved: Args, given: set[str]) -> None:
    """--resume continues the checkpoint's run: a given setting that contradicts it is an error naming both."""
    clash = []
    for name in sorted(given - set(RESUME_MAY_CHANGE)):
        mine, theirs = getattr(args, name), getattr(saved, name)
        if name == "preset" and mine == "auto":
            mine = auto_preset(saved.env)
        if mine != theirs:
            clash.append(f"--{name.replace('_', '-')} {mine} contradicts the checkpoint's {theirs}")
    if clash:
        raise A2PRError(f"--resume {args.resume}: {'; '.join(clash)}. Drop the flag to continue the run as it was "
                        "(only --total-steps, --cuda, --compile, --cuda-graphs, --data-dir may change), or start a "
                        "new run with it")


NOT_FROM_CONFIG = ("config", "resume", "run_name", "export", "best")  # where and what to run, not the settings


def load_config(path: str) -> dict:
    """The settings of a run's config.json (write_config), minus where and what to run: a re-run gets its own
    folder. A file of another a2pr version may hold fields this one does not know: a one-line error names them."""
    try:
        settings = json.loads(Path(path).read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise A2PRError(f"--config {path}: not a run's config.json ({type(e).__name__}: {e})") from None
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(Args)})
    if unknown:
        raise A2PRError(f"--config {path}: settings this a2pr.py does not know: {', '.join(unknown)}")
    return {k: v for k, v in settings.items() if k not in NOT_FROM_CONFIG}


def auto_preset(env: str) -> str:
    if env in D4RL_PRESETS:
        return env
    if env.startswith("pendulum-"):
        return "pendulum-cpu"
    return "spec"


def resolve_args(args: Args) -> tuple[Args, dict[str, str]]:
    """Fill the preset-controlled fields left as None: explicit value > preset > spec default."""
    preset = auto_preset(args.env) if args.preset == "auto" else args.preset
    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, PRESETS, n=3)
        raise A2PRError(f"unknown preset '{preset}'; known: auto, {', '.join(PRESETS)}"
                        + (f" (did you mean {', '.join(close)}?)" if close else ""))
    out, source = dataclasses.replace(args, preset=preset), {}
    for name, default in SPEC_DEFAULTS.items():
        if getattr(args, name) is not None:
            source[name] = "flag"
        elif name in PRESETS[preset]:
            setattr(out, name, PRESETS[preset][name])
            source[name] = f"preset {preset}"
        else:
            setattr(out, name, default)
            source[name] = "spec default"
    if out.save_freq is None:
        out.save_freq = out.eval_freq
    validate_args(out)
    return out, source


def validate_args(args: Args) -> None:
    """One clear line per mistake, before any work is done."""
    positive = ["total_steps", "batch_size", "num_seeds", "policy_freq", "actor_hidden", "actor_layers",
                "critic_hidden", "critic_layers", "value_hidden", "value_layers", "vae_hidden", "vae_layers",
                "eval_freq", "eval_episodes", "log_freq", "save_freq", "bench_steps", "bench_repeats"]
    for name in positive:
        v = getattr(args, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise A2PRError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    for name in ["actor_lr", "critic_lr", "value_lr", "vae_lr", "alpha"]:
        v = getattr(args, name)
        if not (math.isfinite(v) and v > 0):
            raise A2PRError(f"--{name.replace('_', '-')} must be a positive number, got {v!r}")
    for name in ["bc_weight", "vae_weight", "policy_noise", "noise_clip", "eval_obs_noise"]:
        v = getattr(args, name)
        if not (math.isfinite(v) and v >= 0):
            raise A2PRError(f"--{name.replace('_', '-')} must be a number >= 0, got {v!r}")
    if not (0.0 <= args.discount < 1.0):
        raise A2PRError(f"--discount must be in [0, 1), got {args.discount!r}")
    if not (0.0 < args.tau <= 1.0):
        raise A2PRError(f"--tau must be in (0, 1], got {args.tau!r}")
    if not (math.isfinite(args.download_timeout) and args.download_timeout > 0):
        raise A2PRError(f"--download-timeout must be a positive number of seconds, got {args.download_timeout!r}")
    for name in ["eps_a", "reward_scale", "reward_shift"]:
        if not math.isfinite(getattr(args, name)):
            raise A2PRError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)!r}")
    # Evaluation seeds its envs with seed + 10000 + episode, and gymnasium takes seeds >= 0 only.
    top = 2**63 - 1 - 10_000 - args.num_seeds - args.eval_episodes
    if not (isinstance(args.seed, int) and 0 <= args.seed <= top):
        raise A2PRError(f"--seed must be an integer from 0 to {top}, got {args.seed!r}")
    if not (isinstance(args.dataset_seed, int) and 0 <= args.dataset_seed < 2**63):
        raise A2PRError(f"--dataset-seed must be an integer >= 0, got {args.dataset_seed!r}")
    if args.compile and args.cuda_graphs:  # each is checked against eager on its own; together they are not yet verified
        raise A2PRError("use --compile or --cuda-graphs, not both (the combination is not verified yet)")
    if args.bc_target not in ("select", "data", "vae"):
        raise A2PRError(f"--bc-target must be select, data or vae, got {args.bc_target!r}")
    if args.gate not in ("adaptive", "always"):
        raise A2PRError(f"--gate must be adaptive or always, got {args.gate!r}")


if __name__ == "__main__":
    sys.exit(main())
