"""A2PR: Adaptive Advantage-guided Policy Regularization for offline RL, in one file.

A2PR (Liu et al., ICML 2024, arXiv 2405.19909) is TD3+BC with a smarter behaviour-cloning term. An
advantage-weighted VAE learns to generate the dataset's *better* actions; in every state the actor is pulled towards
whichever of {dataset action, VAE action} has the larger advantage Q(s,a) - V(s), and only where one of them has a
positive advantage (the adaptive gate). The defaults follow the released code, which produced the paper's numbers.

    python a2pr.py                                   # built-in Pendulum dataset, CPU: about 75 s on 2 cores
    python a2pr.py --env hopper-medium-v2 --cuda     # D4RL data and the published per-task preset

The contract: one gradient step on a batch (s, a, r, s', d), d = 1 only on a true terminal (never on a time-out).
The networks work in [-1, 1] action units (max action 1); each loss is one Adam step on its own network.
  spec 1  critics  e = clip(N(0, sigma^2), -c, c), sigma = 0.2, c = 0.5;  a' = clip(pi_targ(s') + e, -1, 1)
                   y = r + gamma (1 - d) min(Q1_targ, Q2_targ)(s', a');   L_Q = MSE(Q1(s,a), y) + MSE(Q2(s,a), y)
  spec 2  value    v = V(s), evaluated once before V's step and reused by spec 3 and 4;
                   y2 = r + gamma (1 - d) min(Q1, Q2)(s', a') from the just-updated online critics, same a'
                   L_V = MSE(v, min(y, y2))
  spec 3  VAE      (a_hat, mu, sigma) = VAE(s, a), z = mu + sigma N(0, I);  w = vae_weight 1[Q1(s,a) > v]
                   L_VAE = mean(w (a_hat - a)^2) + 0.5 KL,  KL = -0.5 mean(1 + log sigma^2 - mu^2 - sigma^2)
  spec 4  actor    every policy_freq = 2 steps: p = pi(s);  lambda = alpha / mean|Q1(s, p)|, detached;
                   p_hat = decoder(s, z), z from the encoder of (s, p); A_vae = Q1(s, p_hat) - v; A_data = Q1(s, a) - v
                   target = p_hat where A_vae >= A_data, else a                 (advantage selection, ties to p_hat)
                   gate   = bc_weight 1[A_vae >= eps_A or A_data > eps_A]      (the adaptive constraint)
                   L_pi = -lambda mean Q1(s, p) + mean(gate (p - target)^2);  then theta_targ <- tau theta +
                   (1 - tau) theta_targ for the actor and the critics (on actor steps only)
Defaults: 1M steps, batch 256, gamma 0.99, tau 0.005, alpha 2.5, bc_weight 1, vae_weight 1, eps_A 0; Adam, lr 3e-4
(VAE 1e-3); actor 3 x 256, critics and V 4 x 256, VAE 2 x 750 with latent 2 x act dim (log sigma in [-4, 15]);
states normalised with the data's mean and std + 1e-3; every 5,000 steps 10 deterministic episodes, scored as
D4RL's 100 (R - R_random) / (R_expert - R_random). The released code's per-task settings: D4RL_PRESETS.
Where the released code, followed here, differs from the paper's prose: the gate is a logical OR at eps_A = 0, so a
state where neither action has a positive advantage gets no constraint at all; p_hat is not detached, so the
behaviour term also moves p through the VAE; the VAE learns at Adam's default 1e-3; bc_weight is called `mask`
(accepted as --mask). The one deliberate difference: actions are rescaled from the env's bounds to [-1, 1] (the
released code divides by max_action, which is wrong for asymmetric bounds).

Reading map (line: what). Everything above main() is A2PR; below it, appendices a reader may skip:
     119  Args:             Args, the published per-task presets (D4RL_PRESETS) and resolve_args
     251  EnsembleLinear:   networks: Actor, TwinCritic, ValueNet, VAE, in the (K, B, .) ensemble layout
     367  td_target:        losses, one pure function per spec step
     408  select_bc_target: advantage selection and the adaptive gate (spec 4)
     432  Dataset:          the data as the networks see it: normalisation, action scaling, device batches
     538  critic_step:      spec 1: critics, TD3 target with policy smoothing
     552  q1_data_and_y2:   spec 2: y2 from the just-updated online critics
     561  value_step:       spec 2: V towards min(y, y2)
     569  vae_step:         spec 3: advantage-weighted VAE
     578  actor_objective:  spec 4: the actor loss; actor_step: its Adam step, then the soft target updates
     623  update_core:      spec 1-4 in order, on a batch with its noise
     640  update:           one gradient step: a batch per seed, its noise, update_core
     670  Policy:           the deployed policy: normalise -> actor -> env action bounds
     713  evaluate:         deterministic evaluation, D4RL normalised score
     841  Run:              one run as train() carries it: data, learner, progress, evaluation envs, its folder
     886  evaluate_due:     evaluation during training; each seed's best policy kept
     924  train:            train(args) -> summary: setup, the loop, the finish
     979  main:             the command line's entry point
     998  Appendix A:       data sources: built-in, D4RL, HDF5, downloads, Minari, mixes
    1654  Appendix B:       speed paths: memory check, torch.compile, CUDA graphs, --benchmark update
    1816  Appendix C:       run files: the folder and its file names, the checkpoint format, config.json, CSV, export
    2330  Appendix D:       the theory on finite MDPs
    2393  Appendix E:       the command line: parser, --config, --resume, validation
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
import hashlib
import http.client
import io
import itertools
import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
import typing
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

try:
    import numpy as np
    import torch
    import torch.nn as nn
except KeyboardInterrupt:  # Ctrl-C while torch loads (seconds): one line, not the import machinery's traceback
    if __name__ != "__main__":
        raise
    print("a2pr.py: interrupted while starting", file=sys.stderr)
    sys.exit(130)


# ----------------------------------------------------------------------------------------------------------------
# Arguments and presets. Every field is a flag (--total-steps for total_steps); None means "the preset's value,
# else the spec default", which resolve_args fills in (Agent and train call it, so Args() works as it is).
# ----------------------------------------------------------------------------------------------------------------
class A2PRError(Exception):
    """A problem the user can fix; the command line prints it as one line, without a traceback."""


def arg(default, help: str, **meta):
    """A dataclass field whose metadata is its --help line (add_fields makes the flag; a2pr_sweep.py uses it too)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class Args:
    # --- experiment ---
    env: str = arg("pendulum-mostly-random-v0", "dataset: built-in pendulum-*, D4RL name, Minari id or .hdf5 file")
    seed: int = arg(0, "seed of the agent (weights, batches, noise); the dataset has its own --dataset-seed")
    num_seeds: int = arg(1, "train K independent agents (seeds seed..seed+K-1) as one batched computation")
    cuda: bool = arg(False, "train on the GPU; stops at once if none is visible")
    compile: bool = arg(False, "run the update through torch.compile (opt-in; compiling takes a minute or more)")
    cuda_graphs: bool = arg(False, "with --cuda: replay the whole update as CUDA graphs (fastest on a GPU)")
    threads: int | None = arg(None, "torch's CPU threads (default: torch's); results depend on it in the last bits")
    preset: str = arg("auto", "hyperparameter preset: auto (by --env), spec, pendulum-cpu or a D4RL dataset name")
    total_steps: int | None = arg(None, "gradient steps (spec: 1,000,000)")
    # --- data ---
    mix: str | None = arg(None, "mix trajectories of NAME into --env, e.g. hopper-expert-v2:0.01", metavar="NAME:F")
    dataset_seed: int = arg(0, "seed of built-in datasets and of --mix sampling (same data for every agent seed)")
    eval_env: str | None = arg(None, "gymnasium id to evaluate a local .hdf5 file in (default: from the file)")
    ref_scores: str | None = arg(None, "MIN,MAX reference returns for the normalised score, if the data has none")
    download_timeout: float = arg(10.0, "seconds to wait for a connection or for the next block of a download")
    data_dir: str | None = arg(None, "cache of built-in datasets (default $A2PR_DATA_DIR or ~/.cache/a2pr)")
    normalize_states: bool = arg(True, "normalise states by the data's mean and std + 1e-3 (spec)", negatable=True)
    reward_scale: float = arg(1.0, "r' = reward_scale * r + reward_shift (off by default; for sparse tasks)")
    reward_shift: float = arg(0.0, "see --reward-scale")
    # --- algorithm ---
    batch_size: int | None = arg(None, "transitions per gradient step (spec: 256)")
    discount: float | None = arg(None, "gamma, the discount (spec 1,2; default 0.99, some presets 0.995)")
    tau: float = arg(0.005, "tau, soft target-update rate (spec 4)")
    alpha: float | None = arg(None, "alpha: actor loss weighs Q by lambda = alpha / mean|Q| (spec 4; default 2.5)")
    bc_weight: float | None = arg(None, "weight of the behaviour constraint (spec 4; default 1)", aliases=("--mask",))
    vae_weight: float | None = arg(None, "weight of VAE reconstruction where Q(s,a) > V(s) (spec 3; default 1.0)")
    eps_a: float = arg(0.0, "epsilon_A, advantage threshold of the adaptive gate (spec 4)")
    policy_freq: int = arg(2, "actor and target update every this many steps (spec 4)")
    policy_noise: float = arg(0.2, "sigma of the target-policy smoothing noise, times max action (spec 1)")
    noise_clip: float = arg(0.5, "clip of the smoothing noise, times max action (spec 1)")
    actor_lr: float = arg(3e-4, "Adam learning rate of the actor")
    critic_lr: float = arg(3e-4, "Adam learning rate of the twin critics")
    value_lr: float = arg(3e-4, "Adam learning rate of V")
    vae_lr: float = arg(1e-3, "Adam learning rate of the VAE (the released code uses Adam's default 1e-3)")
    actor_hidden: int | None = arg(None, "actor hidden width (spec: 256)")
    actor_layers: int = arg(3, "actor hidden layers")
    critic_hidden: int | None = arg(None, "hidden width of each critic (spec: 256)")
    critic_layers: int = arg(4, "hidden layers of each critic")
    value_hidden: int | None = arg(None, "V hidden width (spec: 256)")
    value_layers: int = arg(4, "V hidden layers")
    vae_hidden: int | None = arg(None, "VAE encoder and decoder hidden width (spec: 750)")
    vae_layers: int = arg(2, "hidden layers of the VAE encoder and of its decoder")
    bc_target: str = arg("select", "select (A2PR), data (TD3+BC-like), vae (always)", choices=("select", "data", "vae"))
    gate: str = arg("adaptive", "adaptive (A2PR) or always (constraint in every state)", choices=("adaptive", "always"))
    # --- evaluation ---
    eval_freq: int | None = arg(None, "evaluate every this many steps (spec: 5,000)")
    eval_episodes: int = arg(10, "deterministic episodes per evaluation")
    eval_obs_noise: float = arg(0.0, "std of Gaussian noise added to evaluation observations (robustness test)")
    # --- logging and checkpoints ---
    save_dir: str = arg("runs", "parent folder of run folders")
    run_name: str | None = arg(None, "run folder name (default: ENV__seedS__TIME)")
    log_freq: int | None = arg(None, "fetch metrics, print progress and write the CSV every this many steps")
    save_freq: int | None = arg(None, "write a checkpoint every this many steps (default: --eval-freq)")
    resume: str | None = arg(None, "continue the run in this folder from its checkpoint", metavar="DIR")
    tensorboard: bool = arg(False, "also log to TensorBoard (needs the tensorboard package)")
    wandb: bool = arg(False, "also log to Weights & Biases (needs the wandb package)")
    wandb_project: str = arg("a2pr", "wandb project name")
    quiet: bool = arg(False, "print only the final summary")
    config: str | None = arg(None, "run with the settings of a run's config.json; flags given here win", metavar="FILE")
    export: str | None = arg(None, "write RUN_DIR/policy.pt2, the policy as a torch.export program (torch alone runs "
                             "it): raw observations -> env actions", metavar="RUN_DIR")
    best: bool = arg(False, "with --export: the policy of the best evaluation (each seed's own) -> policy_best.pt2")
    # --- benchmarks (no dataset, no env) ---
    benchmark: str | None = arg(None, "update: time the update on synthetic data, one JSON line", choices=("update",))
    bench_steps: int = arg(200, "timed updates of --benchmark update, after 20 warm-up updates")
    bench_modes: str | None = arg(None, "paths to time side by side, e.g. eager,compile,graphs (default: the flags')")
    bench_repeats: int = arg(1, "timed rounds per path, interleaved; the median is reported")
    bench_dims: str = arg("11,3", "OBS,ACT dims of the synthetic data (hopper: 11,3)", metavar="OBS,ACT")


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
    # Pendulum is a 3-dim toy: narrow networks learn it in seconds, so a run takes about 75 s on 2 cores.
    "pendulum-cpu": dict(total_steps=15_000, batch_size=256, actor_hidden=64, critic_hidden=64, value_hidden=64,
                         vae_hidden=128, eval_freq=1000, log_freq=500),
    **{name: dict(alpha=p[0], vae_weight=p[1], bc_weight=p[2], discount=p[3]) for name, p in D4RL_PRESETS.items()},
}


def auto_preset(env: str) -> str:
    return env if env in D4RL_PRESETS else "pendulum-cpu" if env.startswith("pendulum-") else "spec"


def resolve_args(args: Args) -> tuple[Args, dict[str, str]]:
    """Fill the preset-controlled fields left as None: explicit value > preset > spec default."""
    preset = auto_preset(args.env) if args.preset == "auto" else args.preset
    if preset not in PRESETS:
        close = difflib.get_close_matches(str(preset), PRESETS, n=3)
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


class Agent(nn.Module):
    """All networks of K agents; target copies for the actor and critics only (spec)."""

    def __init__(self, seeds: list[int], obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        k, args = len(seeds), resolve_args(args)[0]  # Args() as it is: the preset's or the spec's sizes
        self.actor = Actor(k, obs_dim, act_dim, args.actor_hidden, args.actor_layers)
        self.critic = TwinCritic(k, obs_dim, act_dim, args.critic_hidden, args.critic_layers)
        self.value = ValueNet(k, obs_dim, args.value_hidden, args.value_layers)
        self.vae = VAE(k, obs_dim, act_dim, args.vae_hidden, args.vae_layers)
        init_ensemble(self, seeds)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Losses: pure functions, one per spec step. Tensors carry a leading seed dimension K; each returns per-seed (K,)
# values so that summing over K gives every seed exactly its own gradient.
# ----------------------------------------------------------------------------------------------------------------
def td_target(q1_next, q2_next, r, d, discount: float) -> torch.Tensor:
    """Spec 1 and 2: y = r + gamma (1 - d) min(Q1, Q2)(s', a'), from the target critics (y) or the online ones (y2)."""
    return r + discount * (1.0 - d) * torch.min(q1_next, q2_next)


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
    """THE selection rule: prefer the generated action where A(s, a_G) >= A(s, a_D), ties to a_G (numpy or torch)."""
    return adv_gen >= adv_data


def select_bc_target(adv_vae, adv_data, vae_action, data_action, bc_weight: float, eps_a: float, *,
                     bc_target: str = "select", gate: str = "adaptive"):
    """Spec 4, per state: target = VAE action where A_vae >= A_data (ties to the VAE), else the dataset action;
    gate = bc_weight where A_vae >= eps_A or A_data > eps_A (the released code's OR), else 0: no constraint there.
    The ablations replace one of the two rules. Returns (target, gate, use_vae)."""
    if bc_target == "select":
        use_vae = prefer_generated(adv_vae, adv_data)  # the same rule as the tabular theory below
    else:
        use_vae = torch.full_like(adv_vae, bc_target == "vae", dtype=torch.bool)
    target = torch.where(use_vae.unsqueeze(-1), vae_action, data_action)
    on = (adv_vae >= eps_a) | (adv_data > eps_a) if gate == "adaptive" else torch.ones_like(use_vae)
    return target, bc_weight * on.to(adv_vae.dtype), use_vae


# ----------------------------------------------------------------------------------------------------------------
# The data as the networks see it: transitions in D4RL's convention, states normalised with the dataset's
# statistics, actions in [-1, 1], all resident on the training device; batches are gathered there.
# ----------------------------------------------------------------------------------------------------------------
def normalized_score(ret, ref_min: float, ref_max: float):
    """D4RL's normalised score: 0 = random policy, 100 = expert."""
    return 100.0 * (np.asarray(ret, dtype=np.float64) - ref_min) / (ref_max - ref_min)


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
    fingerprint: str = ""            # sha256 of the arrays trained on: a resume checks that they did not change

    @property
    def average_score(self) -> float:  # the data's own normalised score, the bar a policy should clear
        return float(normalized_score(self.episode_returns, self.ref_min_score, self.ref_max_score).mean())


def to_unit_actions(a: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Env bounds -> [-1, 1]. The released code scales by max_action, which is only right for symmetric bounds."""
    return np.clip(2.0 * (a - low) / (high - low) - 1.0, -1.0, 1.0).astype(np.float32)


def to_env_actions(a, low, high):
    """[-1, 1] -> env bounds, numpy or torch; clipped, as float32 rounding can put a saturated action 1 ulp out."""
    return (low + 0.5 * (a + 1.0) * (high - low)).clip(low, high)


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


def sample_batch(data: DeviceData, batch_size: int, gens: list[torch.Generator]):
    """One batch per agent seed, each from that seed's own generator: tensors of shape (K, B, ...)."""
    idx = torch.stack([torch.randint(len(data.obs), (batch_size,), generator=g, device=data.obs.device) for g in gens])
    return data.obs[idx], data.act[idx], data.rew[idx], data.next_obs[idx], data.done[idx]


def randn(gens: list[torch.Generator], shape, device) -> torch.Tensor:
    """Standard normal noise of shape (K, *shape), seed k drawing from its own stream."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])


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


def critic_step(agent: Agent, opt: Optimizers, batch, smoothing_noise, args: Args):
    """Spec 1: TD3 target with clipped policy-smoothing noise (max action = 1 in the networks' units), one Adam
    step on both critics. Returns (y, a', per-seed loss)."""
    s, a, r, s2, d = batch
    with torch.no_grad():
        eps = (smoothing_noise * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
        a2 = (agent.actor_target(s2) + eps).clamp(-1.0, 1.0)
        y = td_target(*agent.critic_target(s2, a2), r, d, args.discount)
    loss = critic_loss(agent.critic, s, a, y)
    _step(opt.critic, loss.sum())
    return y, a2, loss.detach()


@torch.no_grad()
def q1_data_and_y2(critic: TwinCritic, batch, a2, discount: float):
    """Q1(s, a) (spec 3 and 4) and y2 (spec 2), both from the just-updated online critics: one forward over the
    stacked batch [s; s'] gives both (a test checks it equals critic.q1(s, a) and td_target(*critic(s', a'), ...))."""
    s, a, r, s2, d = batch
    n = s.shape[1]
    q1, q2 = critic(torch.cat([s, s2], 1), torch.cat([a, a2], 1))
    return q1[:, :n], td_target(q1[:, n:], q2[:, n:], r, d, discount)


def value_step(agent: Agent, opt: Optimizers, s, y, y2):
    """Spec 2: V(s) is evaluated once, before its own step; that value v is reused by spec 3 and 4."""
    v = agent.value(s)
    loss = value_loss(v, y, y2)
    _step(opt.value, loss.sum())
    return v.detach(), loss.detach()


def vae_step(agent: Agent, opt: Optimizers, batch, weight, latent_noise):
    """Spec 3: the VAE reconstructs the dataset actions of weight w > 0 (vae_sample_weight: where Q1(s,a) > V(s))."""
    s, a = batch[:2]
    recon, mean, log_std = agent.vae(s, a, latent_noise)
    loss = vae_loss(recon, a, mean, log_std, weight)
    _step(opt.vae, loss.sum())
    return loss.detach()


def actor_objective(agent: Agent, batch, q1_data, v, latent_noise, args: Args):
    """Spec 4: the actor loss with advantage selection and the adaptive gate. Returns (per-seed loss, parts)."""
    s, a = batch[:2]
    pi = agent.actor(s)
    q_pi = agent.critic.q1(s, pi)
    # p_hat = the VAE's reconstruction of the policy action. Not detached, as in the released code: the behaviour
    # term (pi - p_hat)^2 then also moves pi through the VAE (the paper's prose treats the target as fixed).
    p_hat, _, _ = agent.vae(s, pi, latent_noise)
    with torch.no_grad():  # the advantages only choose; no gradient flows through the choice
        adv_vae = agent.critic.q1(s, p_hat) - v
        adv_data = q1_data - v
    target, gate, use_vae = select_bc_target(adv_vae, adv_data, p_hat, a, args.bc_weight, args.eps_a,
                                             bc_target=args.bc_target, gate=args.gate)
    loss, bc = actor_loss(q_pi, pi, target, gate, args.alpha)
    return loss, dict(pi=pi, p_hat=p_hat, adv_vae=adv_vae, adv_data=adv_data, target=target, gate=gate,
                      use_vae=use_vae, bc=bc)


@torch.no_grad()
def soft_update(agent: Agent, tau: float) -> None:
    """theta' <- tau theta + (1 - tau) theta', for the actor and the critics (only on actor steps)."""
    for net, targ in ((agent.actor, agent.actor_target), (agent.critic, agent.critic_target)):
        torch._foreach_lerp_(list(targ.parameters()), list(net.parameters()), tau)


def actor_step(agent: Agent, opt: Optimizers, loss, parts: dict, tau: float) -> dict:
    """Spec 4: one Adam step on the actor only (loss and parts from actor_objective), then the soft target updates."""
    _step(opt.actor, loss.sum(), list(agent.actor.parameters()))
    soft_update(agent, tau)
    return dict(actor=loss.detach(), bc=parts["bc"].detach(), gate_fraction=(parts["gate"] > 0).float().mean(-1),
                vae_target_fraction=parts["use_vae"].float().mean(-1))


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
    y, a2, l_critic = critic_step(agent, opt, batch, noise["smoothing"], args)                   # spec 1
    q1_data, y2 = q1_data_and_y2(agent.critic, batch, a2, args.discount)                         # after spec 1
    v, l_value = value_step(agent, opt, batch[0], y, y2)                                         # spec 2
    w = vae_sample_weight(q1_data, v, args.vae_weight)                                           # spec 3
    l_vae = vae_step(agent, opt, batch, w, noise["vae"])
    out = dict(critic=l_critic, value=l_value, vae=l_vae, q=q1_data.mean(-1),
               vae_weight_fraction=(w > 0).float().mean(-1))
    if actor_turn:                                                                               # spec 4
        loss, parts = actor_objective(agent, batch, q1_data, v, noise["actor"], args)
        out.update(actor_step(agent, opt, loss, parts, args.tau))
    return out


def update(agent: Agent, opt: Optimizers, data: DeviceData, step: int, args: Args, gens: list[torch.Generator], *,
           core: typing.Callable = update_core) -> dict:
    """One A2PR gradient step: a batch per seed, the step's noise, then spec 1-4 (update_core). `step` counts from 1;
    the actor and the targets move when step % policy_freq == 0 (as in TD3). `core` is update_core itself, or the
    same function compiled or replayed as CUDA graphs (Appendix B: speed_path)."""
    actor_turn = step % args.policy_freq == 0
    batch = sample_batch(data, args.batch_size, gens)
    noise = draw_noise(gens, batch, agent.vae.latent_dim, actor_turn)
    return core(agent, opt, batch, noise, actor_turn, args)


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
# Evaluation: the policy a user deploys (normalise -> actor -> env bounds), run for deterministic episodes in the
# evaluation env and reported as D4RL's normalised score.
# ----------------------------------------------------------------------------------------------------------------
class Policy(nn.Module):
    """Raw observations (K, N, obs_dim), agent k's in row k -> env actions (K, N, act_dim): the dataset's state
    normalisation, the actor, the env's action bounds. Evaluation, load_policy and --export all run this module, so
    what is evaluated is what is shipped."""

    def __init__(self, actor: Actor, obs_mean, obs_std, action_low, action_high):
        super().__init__()
        self.actor = actor
        for name, v in dict(obs_mean=obs_mean, obs_std=obs_std, action_low=action_low, action_high=action_high).items():
            self.register_buffer(name, torch.as_tensor(np.asarray(v, dtype=np.float32)))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        obs = torch.nan_to_num(obs, nan=0.0, posinf=1e6, neginf=-1e6)  # a saturated sensor: still an action in bounds
        return to_env_actions(self.actor((obs - self.obs_mean) / self.obs_std), self.action_low, self.action_high)


def env_label(env_id) -> str:
    return env_id if isinstance(env_id, str) else getattr(env_id, "id", str(env_id))


ANT_D4RL_ENV_ID = "a2pr/AntD4RL-v4"  # Ant-v4 whose 84 contact-force dims are zero, as in D4RL's ant-v2 files


def make_env(env_id):
    """gymnasium.make, quietly: its -v4 deprecation notice would bury a2pr's own one-line messages."""
    import gymnasium as gym

    if ANT_D4RL_ENV_ID not in gym.registry:  # a2pr's own env, by name: make_d4rl_ant_env is in Appendix A
        gym.register(ANT_D4RL_ENV_ID, entry_point=f"{__name__}:make_d4rl_ant_env", max_episode_steps=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return gym.make(env_id)


def make_eval_envs(env_id, agents: int, episodes: int) -> list[list]:
    """One env per (agent, episode), made once per run and reused by every evaluation (each episode reseeds)."""
    if agents * episodes > 500:
        print(f"note: each evaluation runs {agents} x {episodes} episodes side by side; making the envs and every "
              "evaluation will take a while (--eval-episodes, --num-seeds)", file=sys.stderr)
    return [[make_env(env_id) for _ in range(episodes)] for _ in range(agents)]


@torch.no_grad()
def evaluate(policy: Policy, env_id, episodes: int, seed: int, obs_noise: float = 0.0, *,
             envs: list[list] | None = None, stop=None) -> np.ndarray | None:
    """Deterministic returns, shape (K, episodes). All episodes of all agents run side by side, so each env step is
    one batched forward (on a GPU: one transfer per step). Episode e uses env seed `seed + e` for every agent, so
    evaluations are comparable across steps and agents and reproducible on resume. `envs` (make_eval_envs) are
    reused if given, else made and closed here. A `stop` flag that is set (StopFlag) ends it early: None."""
    k, device = policy.actor.net[0].weight.shape[0], policy.obs_mean.device
    own, envs = envs is None, make_eval_envs(env_id, k, episodes) if envs is None else envs
    if (len(envs), len(envs[0])) != (k, episodes):
        raise ValueError(f"evaluate: envs must be {k} agents x {episodes} episodes, got {len(envs)} x {len(envs[0])}")
    try:
        obs = np.stack([[env.reset(seed=seed + e)[0] for e, env in enumerate(row)] for row in envs]).astype(np.float32)
        noise_rng = np.random.default_rng([seed, 12345])
        returns, alive = np.zeros((k, episodes)), np.ones((k, episodes), dtype=bool)
        while alive.any():
            if stop is not None and stop.set:
                return None
            o = obs + obs_noise * noise_rng.standard_normal(obs.shape) if obs_noise > 0 else obs
            act = policy(torch.as_tensor(o, dtype=torch.float32, device=device)).cpu().numpy()
            for i, e in zip(*np.nonzero(alive)):
                obs[i, e], r, term, trunc, _ = envs[i][e].step(act[i, e])
                returns[i, e] += r
                alive[i, e] = not (term or trunc)
        return returns
    finally:
        if own:
            for env in itertools.chain(*envs):
                env.close()


# ----------------------------------------------------------------------------------------------------------------
# Training: train(args) -> summary dict (the notebook and the tests call it directly), then main().
# ----------------------------------------------------------------------------------------------------------------
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
        restore(agent, opt, gens, ckpt, args, device)  # Appendix C
    return agent, opt, gens


@dataclass
class Progress:
    """How far a run has got; saved in every checkpoint, so that a resumed run continues exactly."""
    best: np.ndarray             # best normalised score so far, per seed
    history: list[dict]          # the CSV's rows
    step: int = 0
    last_score: float = float("nan")
    eval_due: bool = False       # the evaluation of `step` has yet to run (a signal stopped it)
    saved: int = 0               # the step of the last checkpoint written (0: none yet)

    @classmethod
    def start(cls, k: int, ckpt: dict | None) -> "Progress":
        if not ckpt:
            return cls(np.full(k, -np.inf), [])
        scores = [r["eval/normalized_score_mean"] for r in ckpt["history"] if "eval/normalized_score_mean" in r]
        return cls(np.asarray(ckpt["best"], dtype=float), ckpt["history"], ckpt["step"],
                   scores[-1] if scores else float("nan"), ckpt["eval_due"], ckpt["step"])


class MetricWindow:
    """Sums of update()'s metrics since the last CSV row, kept on the device so the loop never waits for the GPU
    between rows; it also remembers the first step at which a loss was not finite."""

    def __init__(self, k: int, device, step: int, ckpt: dict | None = None):
        self.sums = ckpt["metric_sums"].to(device, copy=True) if ckpt else torch.zeros(len(METRICS), k, device=device)
        self.counts = dict(ckpt["metric_counts"]) if ckpt else {"critic": 0, "actor": 0}
        self.first_bad = torch.full((len(METRICS),), -1, dtype=torch.long, device=device)
        self.step_t = torch.tensor(step, device=device)
        self.steps, self.t0 = 0, time.time()

    def add(self, m: dict) -> None:
        if not m.keys() <= METRICS.keys():  # a metric without a column would vanish without a word
            raise A2PRError(f"update() returned {sorted(m.keys() - METRICS.keys())}, which METRICS does not name; "
                            "add it there (its CSV column, and whether it is measured on actor steps only)")
        vals = torch.stack([m[k] if k in m else torch.zeros_like(m["critic"]) for k in METRICS])
        self.sums += vals
        self.step_t += 1
        self.first_bad = torch.where(~torch.isfinite(vals.sum(-1)) & (self.first_bad < 0), self.step_t, self.first_bad)
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
        for (k, (column, actor_only)), total in zip(METRICS.items(), self.sums.mean(-1).tolist()):
            if n := self.counts["actor" if actor_only else "critic"]:
                row[column] = total / n
        row["charts/SPS"] = round(self.steps / max(time.time() - self.t0, 1e-9), 1)
        self.sums.zero_()
        self.counts, self.steps, self.t0 = {"critic": 0, "actor": 0}, 0, time.time()
        return row


def make_device(args: Args) -> torch.device:
    if args.cuda_graphs and not args.cuda:
        raise A2PRError("--cuda-graphs needs --cuda (CUDA graphs exist only on a GPU)")
    if args.cuda and not torch.cuda.is_available():
        raise A2PRError("--cuda was given but PyTorch sees no CUDA GPU (torch.cuda.is_available() is False); "
                        "install a CUDA build of torch or drop --cuda to train on the CPU")
    return torch.device("cuda" if args.cuda else "cpu")


def speed_path(args: Args) -> typing.Callable:
    """The `core` that update() calls: update_core itself, torch.compile of it, or its CUDA graphs."""
    return CudaGraphs(update_core) if args.cuda_graphs else torch.compile(update_core) if args.compile else update_core


@dataclass
class Run:
    """One training run, as train() carries it from step to step and as evaluation and checkpoints read it."""
    args: Args
    ds: Dataset
    data: DeviceData
    agent: Agent
    opt: Optimizers
    gens: list[torch.Generator]
    policy: Policy               # normalise -> agent.actor -> env bounds: what is evaluated is what is shipped
    progress: Progress
    window: MetricWindow
    log: typing.Callable = print
    envs: list[list] = field(default_factory=list)  # the evaluation envs, made once; each evaluation reseeds them
    folder: RunFolder | None = None  # its files (Appendix C), claimed once every check has passed
    writers: list = field(default_factory=list)  # TensorBoard / wandb: (log(row), close()) pairs

    @classmethod
    def start(cls, args: Args, ds: Dataset, device, ckpt: dict | None, log=print) -> "Run":
        """The data on the device, the learner, its policy and its progress: new, or as the checkpoint left them (a
        resumed run keeps the state normalisation it started with)."""
        data = prepare_data(ds, args, device, (ckpt["obs_mean"], ckpt["obs_std"]) if ckpt else None)
        agent, opt, gens = build_learner(args, data.obs.shape[1], data.act.shape[1], device, ckpt)
        policy = Policy(agent.actor, data.obs_mean, data.obs_std, ds.action_low, ds.action_high).to(device)
        progress = Progress.start(len(gens), ckpt)
        return cls(args, ds, data, agent, opt, gens, policy, progress,
                   MetricWindow(len(gens), device, progress.step, ckpt), log)

    def header(self, source: dict[str, str], device) -> str:
        """The lines a run starts with: its data, evaluation env, device and seeds, each setting with its source."""
        args, ds = self.args, self.ds
        settings = ", ".join(f"{k}={getattr(args, k)} ({source[k]})" for k in SPEC_DEFAULTS)
        return (f"A2PR on {ds.name} ({len(self.data.obs):,} transitions, obs {ds.observations.shape[1]}, act "
                f"{ds.actions.shape[1]}; {ds.source}); eval env {env_label(ds.env_id)}; device {device}; seeds "
                f"{agent_seeds(args)}\ndataset average normalised score: {ds.average_score:.1f}\nsettings: {settings}, "
                f"eps_a={args.eps_a}, policy_freq={args.policy_freq}, bc_target={args.bc_target}, gate={args.gate}")

    def close(self) -> None:
        for env in itertools.chain(*self.envs):
            env.close()
        for _, close in self.writers:
            close()
        if self.folder:
            self.folder.release()  # unlocks; a folder this run made and never wrote to is removed


def evaluate_due(run: Run, stop=None) -> None:
    """The evaluation of progress.step when it is due, into that step's CSV row; a seed's new best keeps its actor
    in best_policy.pt. One that Ctrl-C / SIGTERM stops stays due: the checkpoint records it, and the resumed run
    evaluates the same weights first, so the CSV ends as if uncut."""
    args, p = run.args, run.progress
    if p.eval_due and (rets := evaluate(run.policy, run.ds.env_id, args.eval_episodes, args.seed + 10_000,
                                        args.eval_obs_noise, envs=run.envs, stop=stop)) is not None:
        scores = normalized_score(rets, run.ds.ref_min_score, run.ds.ref_max_score).mean(1)  # per seed
        row = {"eval/return_mean": float(rets.mean()), "eval/normalized_score_mean": float(scores.mean()),
               "eval/normalized_score_std": float(scores.std())}
        if args.num_seeds > 1:
            row.update({f"eval/normalized_score_seed{s}": float(v) for s, v in zip(agent_seeds(args), scores)})
        p.history[-1].update(row)
        for log_row, _ in run.writers:
            log_row({"step": p.step, **row})
        better, p.best = scores > p.best, np.maximum(p.best, scores)
        if better.any():
            run.folder.save_best_policy(run, scores, better)
        p.last_score, p.eval_due = row["eval/normalized_score_mean"], False
    if p.history:
        run.folder.write_csv(p.history)


def fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_line(step: int, args: Args, row: dict, progress: Progress) -> str:
    left = (args.total_steps - step) / max(row["charts/SPS"], 1e-9)
    score = "     –" if math.isnan(progress.last_score) else f"{progress.last_score:6.1f}"  # – until evaluated
    best = "     –" if not np.isfinite(progress.best).all() else f"{float(progress.best.mean()):6.1f}"
    nan = float("nan")
    return (f"step {step:>9,}/{args.total_steps:,} | {row['charts/SPS']:7.1f} steps/s | score {score} (best {best}) | "
            f"critic {row.get('losses/critic', nan):.3g} gate {row.get('charts/gate_fraction', nan):.2f} vae-target "
            f"{row.get('charts/vae_target_fraction', nan):.2f} | left {fmt_time(left)}")


def train(args: Args, given: set[str] | None = None) -> dict:
    """Train A2PR; returns the summary (scores, the run's files). `given`: the flags typed (see parse_args)."""
    # Setup: the settings, the device, the data and the memory are all checked before the run's folder is made.
    args, source, ckpt = run_settings(args, given)  # Appendix E: presets, --config; on --resume the checkpoint's
    log = (lambda *m, **k: None) if args.quiet else print
    device = make_device(args)
    check_outputs(args)  # Appendix C: the trackers asked for are installed, the folders are writable
    ds = load_dataset(args, log)  # Appendix A: a built-in, D4RL, HDF5 or Minari dataset, as transitions
    check_data(ds, args, ckpt)
    check_memory(args, ds.observations.shape[1], ds.actions.shape[1], device)  # Appendix B: before any allocation
    with out_of_memory_as_error(args):
        run = Run.start(args, ds, device, ckpt, log)  # the data on the device, the learner, its policy
    core = speed_path(args)  # update_core, or the same function compiled / replayed as CUDA graphs
    log(run.header(source, device))  # the data, the device, every setting and its source
    run.folder = claim_run_dir(args)  # Appendix C: a fresh folder (or the resumed one), locked while written
    p, t_start, threads = run.progress, time.time(), torch.get_num_threads()
    log(f"resuming {run.folder.dir} at step {p.step:,}" if ckpt else f"run folder {run.folder.dir}")
    try:
        torch.set_num_threads(args.threads or threads)  # threads change the last bits of sums: same threads, same run
        run.writers = run.folder.open_trackers(args, p.step)  # first: a bad wandb.json stops before any write
        run.folder.write_config(args, source, ds.fingerprint)  # every setting, its source, the versions
        run.envs = make_eval_envs(ds.env_id, len(run.gens), args.eval_episodes)  # made once; run.close() closes them
        # The loop: an update per step; a CSV row every log_freq steps, with the evaluation every eval_freq steps;
        # a checkpoint every save_freq steps, at the end, and after Ctrl-C or SIGTERM.
        with StopFlag() as stop, out_of_memory_as_error(args):
            evaluate_due(run, stop)  # one that a signal cut short
            while p.step < args.total_steps:
                p.step = step = p.step + 1
                run.window.add(update(run.agent, run.opt, run.data, step, args, run.gens, core=core))  # spec 1-4
                is_eval = step % args.eval_freq == 0 or step == args.total_steps
                is_log = is_eval or step % args.log_freq == 0
                is_save = stop.set or step % args.save_freq == 0 or step == args.total_steps
                if not (is_log or is_save):
                    continue
                run.window.check_finite(run.folder.paths["checkpoint"])
                if is_log:  # one row of the CSV: the window's mean losses, and the evaluation when due
                    p.history.append(row := run.window.row(step, time.time() - t_start))
                    for log_row, _ in run.writers:
                        log_row(row)
                    p.eval_due = is_eval
                    evaluate_due(run, stop)
                    log(progress_line(step, args, row, p))
                if is_save:  # on Ctrl-C / SIGTERM the window's partial sums are saved too: resume is exact
                    run.folder.save_checkpoint(run)
                if stop.set:
                    break
        return run.folder.finish(run, time.time() - t_start, stop.signal)  # summary.json, the curve, the last line
    except KeyboardInterrupt:  # a second signal, or one during an evaluation: the last checkpoint stands
        print(run.folder.interrupted_at_once(p), file=sys.stderr)
        raise
    finally:
        run.close()  # the evaluation envs, the trackers, the folder's lock
        torch.set_num_threads(threads)  # train(Args(threads=N)) from Python leaves torch's threads as it found them


def main(argv=None) -> int:
    try:
        args, given = parse_args(argv)
        if args.benchmark:
            print(json.dumps(benchmark_update(args)))
        elif args.export:
            print(export_policy(args.export, best=args.best))
        elif (stopped_by := train(args, given)["signal"]) is not None:  # `a2pr.py && next` must not go on after a kill
            return 128 + signal.Signals[stopped_by]  # 130 after Ctrl-C, 143 after SIGTERM, as the shell reports
    except A2PRError as e:
        print(f"a2pr.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or a second signal (StopFlag names it): 130, or 143 for SIGTERM
        print("a2pr.py: interrupted", file=sys.stderr)
        return 128 + (signal.SIGTERM if e.args == ("SIGTERM",) else signal.SIGINT)
    return 0


# ================================================================================================================
# Appendix A. Data sources: built-in Pendulum datasets, D4RL names (registry, cache, download), local HDF5 files,
# Minari ids, and trajectory-wise mixes. Every source ends in the same rows -> transitions path (load_dataset).
# Not needed to understand A2PR: the algorithm only sees the Dataset that load_dataset returns.
# ================================================================================================================
def data_dir(args: Args) -> Path:
    return Path(args.data_dir or os.environ.get("A2PR_DATA_DIR") or Path.home() / ".cache" / "a2pr")


BUILTIN_DATASETS = {
    # name: the policy that collected it (each 200 episodes of Pendulum-v1, generated offline from --dataset-seed)
    "pendulum-random-v0": "uniform random torques",
    "pendulum-medium-v0": "scripted swing-up controller that takes a random torque 70% of the time",
    "pendulum-expert-v0": "scripted energy-pumping swing-up with a PD balancer",
    "pendulum-mostly-random-v0": "95% random episodes + 5% expert episodes, mixed trajectory-wise",
    "pendulum-damped-v0": "a bad controller with narrow noise: damping u = -2 theta' + N(0, 0.3^2) keeps it hanging",
    "pendulum-medium-damped-v0": "the expert's torque half of the time, the damping controller's otherwise (per step)",
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
            elif policy == "damped" or (policy == "medium-damped" and rng.random() < 0.5):
                u = float(np.clip(-2.0 * obs[2] + 0.3 * rng.standard_normal(), -2.0, 2.0))  # brakes every swing
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
    kind = name.removeprefix("pendulum-").removesuffix("-v0")  # the policy: random, medium, expert, damped, ...
    if kind == "mostly-random":  # trajectory-wise mix: whole episodes, 95 % random then 5 % expert
        n_expert = BUILTIN_EPISODES // 20
        parts = [_rollout_pendulum("random", BUILTIN_EPISODES - n_expert, rng),
                 _rollout_pendulum("expert", n_expert, rng)]
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    else:
        rows = _rollout_pendulum(kind, BUILTIN_EPISODES, rng)
    # Reference returns as D4RL defines them: a random policy and the expert, averaged over 100 episodes each.
    ref_rng = np.random.default_rng([seed, BUILTIN_VERSION, 1])
    ref = {p: float(episode_returns(_rollout_pendulum(p, 100, ref_rng)).mean()) for p in ("random", "expert")}
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
            f.attrs.update(attrs)

    atomic_write(Path(path), write)


D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
OFFLINE_HINT = f"or use a built-in dataset that works offline: {', '.join(BUILTIN_DATASETS)}"
CACHE_REMEDY = "it is a2pr's cached copy: delete it and let it be made again"


def read_d4rl_hdf5(path: Path, cached: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """Read a D4RL-layout HDF5 file, checking that it is complete and sane (one-line errors naming the file).
    `cached`: a2pr's own cached copy, which may be deleted and made again (never said of a user's own file)."""
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:  # a2pr's own lock guards a download being validated
            if missing := [k for k in D4RL_KEYS if k not in f]:
                raise A2PRError(f"{path}: not a D4RL dataset file, missing keys {missing}")
            rows = {k: f[k][()] for k in D4RL_KEYS}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except OSError as e:
        raise A2PRError(f"{path}: cannot read the HDF5 file ({e}); " + (CACHE_REMEDY if cached else
                        "check that it is a complete HDF5 file in D4RL's layout")) from None
    for k, v in rows.items():  # strings, objects or complex numbers would fail or be cut in astype below
        if v.dtype.kind not in "biuf":
            raise A2PRError(f"{path}: '{k}' holds {v.dtype} values, not real numbers; a D4RL file's arrays are "
                            "numbers (float32 observations, actions and rewards; bool terminals and timeouts)")
    rows = {k: v.astype(np.float32) if k in ("observations", "actions", "rewards") else v.astype(bool)
            for k, v in rows.items()}
    rows.update({k: rows[k].reshape(len(rows[k]), -1)[:, 0] if rows[k].ndim == 2 and rows[k].shape[1] == 1 else
                 rows[k] for k in ("rewards", "terminals", "timeouts")})  # (N, 1) columns, as some writers store
    return validate_rows(rows, str(path)), attrs  # shapes, empty, NaN/inf: the checks every source gets


# --- D4RL registry (MuJoCo locomotion v2), as in D4RL's d4rl/infos.py: <env>_<kind with '_' for '-'>-v2.hdf5 files
D4RL_BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2"
D4RL_FAMILIES = {  # family: (evaluation env id, obs dim, act dim, ref_min_score (random policy), ref_max_score)
    "hopper": ("Hopper-v4", 11, 3, -20.272305, 3234.3),
    "halfcheetah": ("HalfCheetah-v4", 17, 6, -280.178953, 12135.0),
    "walker2d": ("Walker2d-v4", 17, 6, 1.629008, 4592.3),
    "ant": (ANT_D4RL_ENV_ID, 111, 8, -325.6, 3879.7),
}
D4RL_DATASETS = {f"{fam}-{kind}-v2": (fam, f"{fam}_{kind.replace('-', '_')}-v2.hdf5") for fam in D4RL_FAMILIES
                 for kind in ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay")}
MINARI_MUJOCO_NOTICE = "Minari's mujoco/* datasets are not the D4RL data; do not compare these scores with D4RL tables"


def make_d4rl_ant_env(**kwargs):
    """D4RL's ant-v2 files were collected on MuJoCo 2.x, where the 84 contact forces (cfrc_ext) stay 0 and so does
    the contact cost; Ant-v4 with use_contact_forces=True would feed real forces. So: Ant-v4's defaults + 84 zeros."""
    from gymnasium.envs.mujoco.ant_v4 import AntEnv
    from gymnasium.spaces import Box
    from gymnasium.wrappers import TransformObservation

    return TransformObservation(AntEnv(**kwargs, use_contact_forces=False), lambda o: np.concatenate([o, np.zeros(84)]),
                                Box(-np.inf, np.inf, (111,), np.float64))


def env_spaces(env_id, where: str):
    """(observation space, action space) of an evaluation env; one line if it cannot be made or is not continuous."""
    import gymnasium as gym

    try:
        env = make_env(env_id)
    except Exception as e:
        raise A2PRError(f"{where}: cannot make the evaluation env '{env_label(env_id)}' ({type(e).__name__}: {e})") \
            from None
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(act_space, gym.spaces.Box) or not isinstance(obs_space, gym.spaces.Box):
        raise A2PRError(f"{where}: the evaluation env '{env_label(env_id)}' must have Box observations and actions "
                        f"(has {type(obs_space).__name__} / {type(act_space).__name__})")
    return obs_space, act_space


def check_dims(rows: dict, want: tuple[int, int], where: str, against: str) -> None:
    got = (rows["observations"].shape[1], rows["actions"].shape[1])
    if got != tuple(want):
        raise A2PRError(f"{where}: the data has observation dim {got[0]} and action dim {got[1]}, but {against} "
                        f"has {want[0]} and {want[1]}")


# --- Rows -> transitions, rows validation, episodes
def rows_to_transitions(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Transitions from rows. Rows that carry next_observations (Minari: N+1 observations per N steps) keep every
    step, the last step of a time-limited episode included (its next state is known, terminal = 0). Rows without it
    follow D4RL's qlearning_dataset: next state = next row; a row cut by a time-out is dropped, not marked terminal
    (its next state is unknown), and so is the file's last row."""
    if "next_observations" in rows:
        idx, nxt = slice(None), rows["next_observations"]
    else:
        idx = np.flatnonzero(~rows["timeouts"][:-1])
        nxt = rows["observations"][idx + 1]
    return dict(observations=rows["observations"][idx], actions=rows["actions"][idx], rewards=rows["rewards"][idx],
                next_observations=nxt, terminals=rows["terminals"][idx].astype(np.float32))


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


# --- Download: streamed into DEST.part, which its writer locks, validated, then renamed to DEST.
def download_file(url: str, dest: Path, validate, timeout: float = 10.0):
    """Download url to dest and return validate(part)'s result. dest appears only once complete and valid, so it is
    never half-written; DEST.part is locked while written (a killed download's part is simply rewritten next time)
    and removed on any failure, Ctrl-C included. Connecting and every read give up after `timeout` s."""
    check_writable(dest.parent, "downloads are cached there (D4RL: $D4RL_DATASET_DIR)")
    part, done = dest.with_name(dest.name + ".part"), 0

    def fail(reason: str) -> A2PRError:
        return A2PRError(f"cannot download {url} ({reason}); put the file there by hand (e.g. wget -O {dest} {url}) "
                         f"and run again, {OFFLINE_HINT}")

    dest.parent.mkdir(parents=True, exist_ok=True)
    f = lock_file(part, f"another a2pr.py process is downloading {dest}; wait for it to finish")  # never a link
    try:
        f.truncate(0)  # a killed download's part is rewritten
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                total, shown = int(resp.headers.get("Content-Length") or 0), 0
                while chunk := resp.read1(1 << 20):  # what has arrived: a stall reports the bytes so far
                    try:
                        f.write(chunk)
                    except OSError as e:  # the cache's disk, not the connection
                        raise write_error(part, e, f"nothing was saved at {dest}") from None
                    done += len(chunk)
                    if total and (10 * done // total > shown or done == total):  # a line per 10 %, on stderr
                        shown = 10 * done // total
                        print(f"  downloading {dest.name}: {100 * done / total:5.1f}% of {total / 1e6:.1f} MB",
                              file=sys.stderr)
        except urllib.error.HTTPError as e:
            raise fail(f"HTTP {e.code} {e.reason}") from None
        except (OSError, ValueError, http.client.HTTPException) as e:  # refused, reset, cut short, or silent
            r = getattr(e, "reason", e)
            raise fail(f"no data for {timeout:g}s after {done:,} bytes" if isinstance(r, TimeoutError) else
                       f"interrupted after {done:,} bytes ({type(r).__name__}: {r})") from None
        f.flush()
        if total and done != total:
            raise fail(f"incomplete: {done:,} of {total:,} bytes")
        try:
            result = validate(part)
        except A2PRError as e:
            reason = str(e).replace(str(part) + ": ", "").replace("; " + CACHE_REMEDY, "")
            raise A2PRError(f"the file downloaded from {url} is not a valid dataset ({reason}); nothing was saved "
                            f"at {dest}") from None
        os.replace(part, dest)
        return result
    finally:
        with contextlib.suppress(OSError):  # cleanup never hides the real error
            part.unlink(missing_ok=True)
        f.close()


# --- Sources: D4RL names, local files, built-in datasets
def d4rl_cache_dir() -> Path:
    """D4RL's own cache: $D4RL_DATASET_DIR, else ~/.d4rl/datasets (d4rl/offline_env.py)."""
    return Path(os.environ.get("D4RL_DATASET_DIR") or Path.home() / ".d4rl" / "datasets").expanduser()


def d4rl_url(filename: str) -> str:
    """The published URL, or the same file name under $A2PR_D4RL_MIRROR (a mirror; the tests' local server)."""
    return f"{os.environ.get('A2PR_D4RL_MIRROR', D4RL_BASE_URL).rstrip('/')}/{filename}"


def load_d4rl(name: str, args: Args, log=print) -> tuple[dict, dict]:
    family, filename = D4RL_DATASETS[name]
    env_id, _, _, ref_min, ref_max = D4RL_FAMILIES[family]
    path = d4rl_cache_dir() / filename

    def read_checked(p: Path) -> dict:
        rows, _ = read_d4rl_hdf5(p, cached=True)
        check_dims(rows, D4RL_FAMILIES[family][1:3], str(p), f"{name} ({env_id})")
        return rows

    if path.exists():
        rows, how = read_checked(path), "cached"
    else:
        log(f"downloading {name} from {d4rl_url(filename)} -> {path}")
        rows, how = download_file(d4rl_url(filename), path, read_checked, args.download_timeout), "downloaded"
    return rows, dict(env_id=env_id, ref_min_score=ref_min, ref_max_score=ref_max, source=f"D4RL {name}, {how}, {path}")


def ref_scores(args: Args, attrs: dict, where: str, fallback=None) -> tuple[float, float]:
    """The random and expert returns of the normalised score: --ref-scores, else the data's own, else `fallback`."""
    if args.ref_scores:
        try:
            lo, hi = (float(x) for x in str(args.ref_scores).split(","))
        except ValueError:
            raise A2PRError(f"{where}: --ref-scores must be MIN,MAX (two numbers), got {args.ref_scores!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and hi != lo):
            raise A2PRError(f"{where}: --ref-scores must be two different finite numbers, got {args.ref_scores!r}")
        return lo, hi
    if attrs.get("ref_min_score") is not None and attrs.get("ref_max_score") is not None:
        return float(attrs["ref_min_score"]), float(attrs["ref_max_score"])
    if fallback is not None:
        return tuple(fallback)
    raise A2PRError(f"{where}: no reference returns for the normalised score (no ref_min_score/ref_max_score in the "
                    "data, and no D4RL env to take them from); pass --ref-scores MIN,MAX")


def load_local_file(path_text: str, args: Args, log=print) -> tuple[dict, dict]:
    """A D4RL-layout HDF5 file. Eval env: --eval-env, else the file's env_id attribute, else its name
    (hopper_medium-v2.hdf5 -> Hopper-v4). Reference returns: --ref-scores, else the file's attributes, else the
    D4RL family of the eval env."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise A2PRError(f"{path}: {'a folder, not an HDF5 file' if path.is_dir() else 'file not found'}")
    rows, fattrs = read_d4rl_hdf5(path)
    family = (m := re.match(r"(halfcheetah|hopper|walker2d|ant)[_-]", path.name.lower())) and m[1]  # not antmaze
    if args.eval_env:
        env_id, how = args.eval_env, "--eval-env"
    elif fattrs.get("env_id"):
        env_id, how = str(fattrs["env_id"]), "the file's env_id attribute"
    elif family:
        env_id, how = D4RL_FAMILIES[family][0], f"the file name ({family})"
    else:
        raise A2PRError(f"{path}: cannot tell which env to evaluate in (no env_id attribute, and the name does not "
                        f"start with {', '.join(D4RL_FAMILIES)}); pass --eval-env ID, e.g. --eval-env Hopper-v4")
    check_dims(rows, [sp.shape[0] for sp in env_spaces(env_id, str(path))], str(path),
               f"the evaluation env {env_id} (from {how})")
    ref = ref_scores(args, fattrs, str(path), {v[0]: v[3:5] for v in D4RL_FAMILIES.values()}.get(env_id))
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
    root = Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")
    if root.exists() and not root.is_dir():
        raise A2PRError(f"MINARI_DATASETS_PATH={root} is a file; it must be a folder (unset: ~/.minari/datasets)")
    return root / dataset_id


def flatten_observations(obs, space, where: str) -> np.ndarray:
    """(T, ...) arrays -> (T, d) float32, in the order gymnasium.spaces.flatten uses (Dict: its key order)."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Box):
        return np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)
    if isinstance(space, (gym.spaces.Dict, gym.spaces.Tuple)):  # a Dict's arrays by key, a Tuple's by position
        keys = space.spaces.keys() if isinstance(space, gym.spaces.Dict) else range(len(space.spaces))
        return np.concatenate([flatten_observations(obs[k], space[k], where) for k in keys], axis=1)
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
        for k, v in zip(parts, (obs[:-1], obs[1:], np.asarray(ep.actions, dtype=np.float32).reshape(n, -1),
                                np.asarray(ep.rewards, dtype=np.float32).reshape(n), term, trunc & ~term)):
            parts[k].append(v)
    if not parts["rewards"]:
        raise A2PRError(f"{where}: the dataset is empty (no episode with at least one step)")
    return validate_rows({k: np.concatenate(v) for k, v in parts.items()}, where)


def minari_eval_spec(ds, dataset_id: str):
    """The dataset's evaluation env as an EnvSpec that gymnasium.make accepts again (evaluation makes one env per
    agent): recover_environment(eval_env=True), plus FlattenObservation for Dict/Tuple observations (gymnasium keeps
    wrappers in spec.additional_wrappers and re-applies them in make)."""
    import gymnasium as gym

    try:
        env = ds.recover_environment(eval_env=True)
    except Exception as e:  # most often the package of its entry point (gymnasium_robotics, ...) is not installed
        if missing := re.search(r"No module named '?(\w+)", str(e)):
            package = missing[1].replace("_", "-")
            raise A2PRError(f"Minari dataset {dataset_id} needs the {package} package for its environment: "
                            f"pip install {package}") from None
        raise A2PRError(f"cannot make the evaluation env of Minari dataset {dataset_id} ({type(e).__name__}: {e})") \
            from None
    if not isinstance(env.observation_space, gym.spaces.Box):
        env = gym.wrappers.FlattenObservation(env)
    spec = env.spec
    env.close()
    return spec


def _bytes_written(folders) -> int:
    """Bytes in files under `folders`; a folder whose name holds a glob pattern stands for the folders it matches."""
    total = 0
    for folder in (f for p in map(Path, folders) for f in (p.parent.glob(p.name) if "*" in p.name else [p])):
        for root, _, files in os.walk(folder):
            for name in files:
                with contextlib.suppress(OSError):  # a file may be renamed or removed while we count
                    total += os.path.getsize(os.path.join(root, name))
    return total


def stall_deadline(fn, seconds: float, folders):
    """fn() in a worker thread, given up once no byte has arrived in `folders` for `seconds`. huggingface_hub (which
    Minari downloads through) takes no timeout from its callers and retries with back-off, so the bound is kept here."""
    out: dict = {}

    def work():
        try:
            out["value"] = fn()
        except Exception as e:
            out["error"] = e

    worker = threading.Thread(target=work, daemon=True)  # if given up, it is left to end with the process
    worker.start()
    seen, last = -1, time.time()
    while worker.is_alive():
        worker.join(0.25)
        if (now := _bytes_written(folders)) != seen:
            seen, last = now, time.time()
        elif time.time() - last > seconds:
            raise TimeoutError(f"no data for {seconds:g}s (--download-timeout)")
    if "error" in out:
        raise out["error"]
    return out["value"]


def load_minari(dataset_id: str, args: Args, log=print) -> tuple[dict, dict]:
    try:
        import minari
    except ImportError:
        raise A2PRError(f"'{dataset_id}' looks like a Minari dataset id, which needs the minari package: "
                        f"pip install 'minari[hf]'") from None
    where = f"Minari dataset {dataset_id}"
    minari_local_path(dataset_id)  # MINARI_DATASETS_PATH that is a file: a2pr's line, not minari's FileExistsError
    try:
        ds = minari.load_dataset(dataset_id, download=False)
    except FileNotFoundError:
        log(f"downloading Minari dataset {dataset_id} -> {minari_local_path(dataset_id)}")
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache" /
                                                          "huggingface") / "hub")
        try:
            ds = stall_deadline(lambda: minari.load_dataset(dataset_id, download=True), args.download_timeout,
                                [minari_local_path(""), hub / "datasets--*"])  # not the hub's models: they are large
        except Exception as e:
            raise A2PRError(f"cannot download {where} ({type(e).__name__}: {e}); check the id (minari list remote) "
                            f"and your connection, or put it under {minari_local_path(dataset_id)} "
                            f"(MINARI_DATASETS_PATH), {OFFLINE_HINT}") from None
    except Exception as e:  # unsupported version, corrupt metadata
        raise A2PRError(f"cannot load {where} from {minari_local_path(dataset_id)} ({type(e).__name__}: {e}); if "
                        "that folder is damaged, delete it, and it is downloaded again") from None
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
    spec, ref = minari_eval_spec(ds, dataset_id), ref_scores(args, ds.storage.metadata, where)
    check_dims(rows, [sp.shape[0] for sp in env_spaces(spec, where)], where, f"its evaluation env {spec.id}")
    return rows, dict(env_id=spec, ref_min_score=ref[0], ref_max_score=ref[1],
                      source=f"Minari {dataset_id} ({len(rows['rewards']):,} steps), {ds.storage.data_path}",
                      **({"notice": MINARI_MUJOCO_NOTICE} if dataset_id.startswith("mujoco/") else {}))


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
    return {k: np.concatenate([base[k][idx_base], good[k][idx_good]]) for k in base}, dict(
        total_target=total, good_target=n_good, good_rows=len(idx_good), base_rows=len(idx_base),
        good_episodes=k_good, base_episodes=k_base)


# --- One entry point for every source
def source_kind(name: str) -> str:
    """builtin | d4rl | file | minari, or raise the unknown-name error."""
    if name in BUILTIN_DATASETS:
        return "builtin"
    if name in D4RL_DATASETS:
        return "d4rl"
    if name.lower().endswith((".hdf5", ".h5")) or os.path.isfile(name):
        return "file"
    with contextlib.suppress(OSError):  # a name past the file system's limits (ENAMETOOLONG) is no local dataset
        if ("/" in name and MINARI_ID.match(name)) or (minari_local_path(name) / "data").is_dir():
            return "minari"
    close = difflib.get_close_matches(name, list(BUILTIN_DATASETS) + list(D4RL_DATASETS), n=3, cutoff=0.5)
    raise A2PRError(f"unknown dataset '{name}'" + (f"; closest: {', '.join(close)}" if close else "")
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
    mix = args.mix
    if mix:  # two named datasets of different envs are refused before either is downloaded
        good_name, fraction = parse_mix(mix)
        named = {n: "Pendulum-v1" if n in BUILTIN_DATASETS else D4RL_FAMILIES[D4RL_DATASETS[n][0]][0]
                 for n in (env_name, good_name) if n in BUILTIN_DATASETS or n in D4RL_DATASETS}
        if len(set(named.values())) > 1:
            raise A2PRError(f"--mix: {good_name} is for {named[good_name]} but {env_name} is for {named[env_name]}; "
                            "mix two datasets of the same env")
    rows, attrs = load_one(env_name, args, log)
    if mix:
        try:
            good, gattrs = load_one(good_name, args, log)
        except A2PRError as e:
            raise A2PRError(f"--mix {mix}: {e}") from None
        env = [f"{env_label(a['env_id'])} (obs {r['observations'].shape[1]}, act {r['actions'].shape[1]})"
               for r, a in ((good, gattrs), (rows, attrs))]
        if env[0] != env[1]:
            raise A2PRError(f"--mix: {good_name} is for {env[0]} but {env_name} is for {env[1]}; mix two datasets of "
                            "the same env")
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
    _, space = env_spaces(attrs["env_id"], args.env)
    tr = rows_to_transitions(rows)
    if len(tr["rewards"]) == 0:
        why = "it has a single row" if len(rows["rewards"]) == 1 else "every row but the last is a time-out"
        raise A2PRError(f"{args.env}: no usable transitions: {why}, and a row without a next row (the file's last "
                        "row, or a time-out) has no next state; give a dataset with whole episodes")
    fingerprint = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in tr.values())).hexdigest()
    return Dataset(name=args.env + (f" + {args.mix}" if args.mix else ""), env_id=attrs["env_id"], **tr,
                   fingerprint=fingerprint, episode_returns=episode_returns(rows), source=attrs["source"],
                   ref_min_score=float(attrs["ref_min_score"]), ref_max_score=float(attrs["ref_max_score"]),
                   action_low=space.low.astype(np.float32), action_high=space.high.astype(np.float32),
                   notice=attrs.get("notice", ""))


def check_data(ds: Dataset, args: Args, ckpt: dict | None) -> None:
    """A resume must train on the data it started with; legal but suspicious data gets one `warning:` line each."""
    if ckpt and ckpt["data_sha256"] != ds.fingerprint:
        cache = ds.source.removeprefix("built-in, ") if ds.source.startswith("built-in, ") else None
        raise A2PRError(f"--resume {args.resume}: {args.env} is not the data this run started on (its arrays "
                        "changed); " + (f"{cache} is a2pr's cached copy: delete it, and it is made again as it was"
                                        if cache else "put the original data back, or start a new run on this data"))
    n, warn = len(ds.rewards), functools.partial(print, file=sys.stderr)
    if outside := int(((ds.actions < ds.action_low) | (ds.actions > ds.action_high)).any(1).sum()):
        warn(f"warning: {outside:,} of {n:,} dataset actions ({100 * outside / n:.1f}%) lie outside the eval env's "
             f"action bounds [{ds.action_low.tolist()}, {ds.action_high.tolist()}]; they are clipped to the bounds "
             "for training")
    if ds.terminals.all():
        warn(f"warning: every one of the {n:,} transitions is terminal, so the critics never bootstrap (they learn "
             "the immediate reward only); training goes on")
    if args.batch_size > n:
        warn(f"warning: --batch-size {args.batch_size} is larger than the dataset ({n:,} transitions); batches are "
             "drawn with replacement, so every batch repeats transitions")


# ================================================================================================================
# Appendix B. Speed paths: what fits on the device; update() runs update_core eagerly, through torch.compile, or
# replayed as CUDA graphs (speed_path picks which); --benchmark update times them side by side.
# ================================================================================================================
def _lower_memory(args: Args) -> str:
    return (f"lower --batch-size (now {args.batch_size}) or --num-seeds (now {args.num_seeds}), or the network "
            "sizes (--actor-hidden, --critic-hidden, --value-hidden, --vae-hidden)")


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


def check_memory(args: Args, obs_dim: int, act_dim: int, device: torch.device) -> None:
    """Before any allocation: networks, Adam's state and one batch that exceed the device's memory stop with one
    line (on a CPU the kernel would otherwise kill the process without a message once the pages are touched)."""
    if device.type == "cuda":
        total = torch.cuda.mem_get_info(device)[1]
    elif "SC_PHYS_PAGES" in getattr(os, "sysconf_names", {}):
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        return
    with torch.device("meta"):  # the networks as Agent builds them, one seed's worth, without allocating memory
        nets = (Actor(1, obs_dim, act_dim, args.actor_hidden, args.actor_layers),
                TwinCritic(1, obs_dim, act_dim, args.critic_hidden, args.critic_layers),
                ValueNet(1, obs_dim, args.value_hidden, args.value_layers),
                VAE(1, obs_dim, act_dim, args.vae_hidden, args.vae_layers))
    trained = [sum(p.numel() for p in net.parameters()) for net in nets]
    params = 4 * sum(trained) + sum(trained[:2])  # weights, gradients, Adam's two moments; target actor and critics
    batch = args.batch_size * (8 + 4 * (2 * obs_dim + act_dim + 2))  # indices, then (s, a, r, s', d)
    need = args.num_seeds * (4 * params + batch)
    if need > total:
        raise A2PRError(f"the networks, their optimiser state and a batch need at least {need / 2**30:,.1f} GiB but "
                        f"the {device.type.upper()} has {total / 2**30:,.1f} GiB; {_lower_memory(args)}")


@contextlib.contextmanager
def no_global_randomness(device: torch.device):
    """The update takes its randomness from `noise` (draw_noise, outside): a CUDA graph would replay numbers drawn
    inside it unchanged at every step. Checked on the eager warm-up steps: torch's global generator must not move."""
    state = (lambda: torch.cuda.get_rng_state(device)) if device.type == "cuda" else torch.get_rng_state
    before = state()
    yield
    if not torch.equal(before, state()):
        raise A2PRError("update_core drew random numbers from torch's global generator; draw them in draw_noise and "
                        "pass them in `noise`, or --cuda-graphs would replay the same numbers at every step")


class CudaGraphs:
    """update_core replayed as CUDA graphs, one for critic steps and one for actor steps, each captured after a few
    eager warm-up steps. update() draws the batch and the noise outside the graph, from the per-seed generators as
    on the eager path; they are copied into the graph's static inputs before each replay."""

    WARMUP = 4  # eager steps before capture: cuBLAS handles and Adam's state must exist before a graph is recorded

    def __init__(self, core: typing.Callable):
        self.core, self.graphs, self.eager_steps = core, {}, 0

    def __call__(self, agent: Agent, opt: Optimizers, batch, noise: dict, actor_turn: bool, args: Args) -> dict:
        if actor_turn not in self.graphs and self.eager_steps < self.WARMUP:
            self.eager_steps += 1  # warm-up steps are real training steps, on a side stream as capture requires
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), no_global_randomness(batch[0].device):
                out = self.core(agent, opt, batch, noise, actor_turn, args)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if actor_turn not in self.graphs:
            self.graphs[actor_turn] = self._capture(agent, opt, batch, noise, actor_turn, args)
        graph, static_batch, static_noise, out = self.graphs[actor_turn]
        for dst, src in [*zip(static_batch, batch), *((static_noise[k], noise[k]) for k in static_noise)]:
            dst.copy_(src)
        graph.replay()
        return {k: v.clone() for k, v in out.items()}  # the graph's outputs are overwritten by the next replay

    def _capture(self, agent, opt, batch, noise, actor_turn, args):
        static_batch, static_noise = tuple(x.clone() for x in batch), {k: v.clone() for k, v in noise.items()}
        for o in opt.all().values():
            o.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records, does not run: the caller replays it for this very step
                out = self.core(agent, opt, static_batch, static_noise, actor_turn, args)
        except RuntimeError as e:  # nothing was applied (capture only records), so the last checkpoint is valid
            raise A2PRError(f"CUDA graph capture of the {'actor' if actor_turn else 'critic'} step failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); run without "
                            "--cuda-graphs (the eager --cuda path computes the same update)") from None
        return graph, static_batch, static_noise, out


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


def benchmark_update(args: Args) -> dict:
    """Steps/s of update() (sampling included) on synthetic data of --bench-dims. Each path of --bench-modes gets
    its own learner and 20 warm-up updates (compiling or capturing happens there); then the paths are timed in turn
    for --bench-repeats rounds, so the machine's drift hits them alike, and each reports its median round."""
    args = resolve_args(dataclasses.replace(args, preset="spec" if args.preset == "auto" else args.preset))[0]
    modes = (["graphs" if args.cuda_graphs else "compile" if args.compile else "eager"] if args.bench_modes is None
             else [m.strip() for m in args.bench_modes.split(",") if m.strip()])
    if not modes or set(modes) - set(BENCH_MODES) or len(set(modes)) < len(modes):
        raise A2PRError(f"--bench-modes must list distinct paths among {', '.join(BENCH_MODES)}, "
                        f"got {args.bench_modes!r}")
    try:
        obs_dim, act_dim = (int(x) for x in args.bench_dims.split(","))
    except ValueError:
        raise A2PRError(f"--bench-dims must be OBS,ACT (two integers), got {args.bench_dims!r}") from None
    device = make_device(args)
    data = synthetic_data(obs_dim, act_dim, 100_000, device)
    learners, steps, rates = {}, dict.fromkeys(modes, 0), {mode: [] for mode in modes}
    for mode in modes:
        margs = dataclasses.replace(args, **BENCH_MODES[mode])
        make_device(margs)  # graphs needs --cuda
        learners[mode] = (*build_learner(margs, obs_dim, act_dim, device), margs, speed_path(margs))

    def run(mode, k):
        agent, opt, gens, margs, core = learners[mode]
        for _ in range(k):
            steps[mode] += 1
            update(agent, opt, data, steps[mode], margs, gens, core=core)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for mode in modes:
        run(mode, 20)
    for _ in range(args.bench_repeats):
        for mode in modes:
            t0 = time.perf_counter()
            run(mode, args.bench_steps)
            rates[mode].append(args.bench_steps / (time.perf_counter() - t0))
    per_mode = {mode: dict(steps_per_s=round(float(np.median(r)), 2),
                           agent_steps_per_s=round(float(np.median(r)) * args.num_seeds, 2),
                           runs=[round(x, 2) for x in r]) for mode, r in rates.items()}
    return dict(benchmark="update", device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
                **{k: per_mode[modes[0]][k] for k in ("steps_per_s", "agent_steps_per_s")}, modes=per_mode,
                repeats=args.bench_repeats, bench_steps=args.bench_steps, num_seeds=args.num_seeds,
                batch_size=args.batch_size, obs_dim=obs_dim, act_dim=act_dim,
                sizes=dict(actor=args.actor_hidden, critic=args.critic_hidden, value=args.value_hidden,
                           vae=args.vae_hidden), torch=torch.__version__, threads=torch.get_num_threads())


# ================================================================================================================
# Appendix C. Run files: atomic writes, the run folder (claimed fresh, locked while written), config.json, the
# checkpoint and the best policy (plain data, loaded with weights_only=True), the CSV, the plot, the trackers,
# loading a run and exporting its policy as a torch.export program. They record what train() does.
# ================================================================================================================
def atomic_write(path: Path, write) -> None:
    """write(tmp), then rename it over `path`: a reader sees the old file or the new one, never half of one. tmp is
    created first, exclusively, under a random name, so a link planted where it goes is never followed."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp{path.suffix}")
    made = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666: the umask decides, as open()
        made = True
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's and torch.export's "open file failed"
        raise write_error(path, e, "its previous version is intact" if path.exists() else "nothing was written")
    finally:
        if made:
            with contextlib.suppress(OSError):  # a read-only or vanished folder: the real error is raised above
                tmp.unlink(missing_ok=True)


def write_error(path: Path, e: Exception, kept: str) -> A2PRError:
    """A write that failed, in one line: the file, the reason (h5py's spans lines), what is kept, a full disk named."""
    why = getattr(e, "strerror", None) or " ".join(str(e).split())
    full = "; the disk is full: free some space" if getattr(e, "errno", None) == errno.ENOSPC else ""
    return A2PRError(f"cannot write {path} ({why}); {kept}{full}")


def check_writable(folder: Path, what: str) -> None:
    """A test write into `folder` (or its nearest existing parent) before any work: one line naming what to change."""
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder" if existing == folder.absolute()
                                     else f"{existing} is a file")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise A2PRError(f"{folder} is not a writable folder ({e.strerror or e}); {what}") from None


CSV_COLUMNS = (["step", "time_s"] + [column for column, _ in METRICS.values()]
               + ["charts/SPS", "eval/return_mean", "eval/normalized_score_mean", "eval/normalized_score_std"])


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """rows as a CSV file, atomically: `columns` first, then any other keys (sorted); missing cells are empty."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            wr = csv.DictWriter(f, columns + sorted({k for r in rows for k in r} - set(columns)), restval="")
            wr.writeheader()
            wr.writerows(rows)
    atomic_write(path, write)


def plot_curves(path: Path, history: list[dict], dataset_score: float, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: a run never changes a notebook's plotting backend

    ev = [r for r in history if r.get("eval/normalized_score_mean") not in (None, "")]
    tr = [r for r in history if r.get("charts/gate_fraction") not in (None, "")]
    fig = Figure(figsize=(11, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    for c in sorted(k for k in (ev[0] if ev else {}) if k.startswith("eval/normalized_score_seed")):
        ax1.plot([r["step"] for r in ev], [r[c] for r in ev], lw=0.8, alpha=0.5)
    ax1.plot([r["step"] for r in ev], [r["eval/normalized_score_mean"] for r in ev], lw=2, label="A2PR")
    ax1.axhline(dataset_score, ls="--", c="gray", label="dataset average")
    ax1.set(xlabel="gradient step", ylabel="normalised score", title=title)
    ax2.plot([r["step"] for r in tr], [r["charts/gate_fraction"] for r in tr], label="gate on (constrained)")
    ax2.plot([r["step"] for r in tr], [r["charts/vae_target_fraction"] for r in tr], label="target from VAE")
    ax2.set(xlabel="gradient step", ylabel="fraction of states", ylim=(-0.02, 1.02), title="advantage selection")
    for ax in (ax1, ax2):
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


class StopFlag:
    """Ctrl-C or SIGTERM (what SLURM, Ray and Kubernetes send before a kill) sets a flag that the loop checks
    between updates, so a checkpoint is never taken mid-update; a second signal interrupts at once."""

    def __init__(self):
        self.set, self.signal, self.old = False, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python sets signal handlers there only
            self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, _frame):
        if self.set:  # main() exits 128 + the number of the signal named here
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.set, self.signal = True, signal.Signals(signum).name
        print(f"{self.signal}: stopping after the current update or evaluation step, then saving a checkpoint (a "
              "second signal stops at once)", file=sys.stderr, flush=True)  # a long evaluation: said at once

    def __exit__(self, *exc):
        for s, old in self.old.items():
            signal.signal(s, old)


def library_versions(extra: tuple[str, ...] = ()) -> dict:
    """python and the libraries that decide a run's numbers (None where one is not installed)."""
    import importlib.metadata

    out = dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__)
    for name in ("gymnasium", "mujoco", "minari", "h5py", *extra):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = None
            out[name] = importlib.metadata.version(name)
    return out


def run_versions(args: Args) -> dict:
    """What a run ran on: the libraries, the device, torch's threads and a2pr.py's own hash."""
    return dict(library_versions(), threads=torch.get_num_threads(), a2pr_sha256=hashlib.sha256(
        Path(__file__).read_bytes()).hexdigest(), device=f"cuda: {torch.cuda.get_device_name()}" if args.cuda else
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")


def resume_command(run_dir: Path) -> str:
    """The command that continues a run, quoted for a shell, from the folder the run was started in."""
    script = Path(__file__).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(Path.cwd().resolve())  # "python a2pr.py" when started next to it
    return f"python {shlex.quote(str(script))} --resume {shlex.quote(str(run_dir))}"


def lock_file(path: Path, busy: str):
    """Lock `path` for this process and return the open file (binary, read-write); the OS drops the lock when the
    process dies, so even kill -9 leaves no stale lock. A lock taken on a file that was meanwhile removed is taken
    again. A link planted at `path` is refused, never followed (O_NOFOLLOW), so its target is never written."""
    while True:
        try:
            f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666), "r+b")
        except OSError as e:
            what = ("is a symbolic link" if path.is_symlink() else "is a folder" if path.is_dir() else
                    f"cannot be opened ({e.strerror or e})")
            raise A2PRError(f"{path} {what}; a2pr keeps its lock and partial files there: remove it and run "
                            "again") from None
        try:
            try:
                import fcntl
            except ImportError:  # Windows
                import msvcrt

                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise A2PRError(busy) from None
        if path.exists() and os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
            return f
        f.close()  # its holder removed the file on release (see RunFolder): lock the new one


def lock_with_pid(path: Path, busy: str):
    """lock_file, then this process's pid into the file, for the message the next writer gets ({pid} in busy)."""
    holder = ""
    with contextlib.suppress(OSError):
        holder = "" if path.is_symlink() else path.read_text().strip()  # a planted link's target is never read
    f = lock_file(path, busy.replace("{pid}", f" (pid {holder})" if holder.isdigit() else ""))
    f.truncate(0)  # freshly opened: at offset 0
    f.write(str(os.getpid()).encode())
    f.flush()
    return f


def lock_run_dir(run_dir: Path, resuming: bool = False):
    then = ", then resume it again" if resuming else " or choose another --run-name"
    return lock_with_pid(run_dir / OTHER_RUN_FILES["lock"],
                         f"{run_dir} is in use by another a2pr.py process{{pid}}; wait for it to end{then}")


# The run folder's files, in one place: what a run writes (summary.json lists their paths), then the files kept
# beside them (the lock while a process writes the folder, the W&B run id, TensorBoard's folder, exported policies).
RUN_FILES = dict(csv="metrics.csv", png="learning_curve.png", checkpoint="checkpoint.pt", summary="summary.json",
                 config="config.json", best_policy="best_policy.pt")
OTHER_RUN_FILES = dict(lock=".lock", wandb="wandb.json", tensorboard="tensorboard", export="policy.pt2",
                       export_best="policy_best.pt2")


# What checkpoint.pt and best_policy.pt hold, in one place: each key with its type on disk, plain data only, so that
# they load with weights_only=True. save_state writes exactly these keys and the format number; load_checkpoint checks
# a file against them. Change a key and bump CHECKPOINT_FORMAT: a file of another format is refused in one line.
POLICY_KEYS = ("obs_mean", "obs_std", "action_low", "action_high")  # what Policy needs beside the actor
CHECKPOINT_FORMAT = 1  # files written before the number was stored hold format 1's keys, and are read as format 1
_T = torch.Tensor
CHECKPOINT_KEYS = {
    RUN_FILES["checkpoint"]: dict(  # everything a run needs to continue exactly
        args=dict, agent=dict, optimizers=dict, rng=list, device=str, step=int, best=list, history=list,
        eval_due=bool, metric_sums=_T, metric_counts=dict, data_sha256=str, obs_mean=_T, obs_std=_T, env_id=str,
        env_spec=(str, type(None)), dataset=str, action_low=_T, action_high=_T, ref_scores=tuple),
    RUN_FILES["best_policy"]: dict(  # each seed's actor at its best evaluation, with that score and step
        args=dict, actor=dict, scores=_T, steps=_T, obs_mean=_T, obs_std=_T, action_low=_T, action_high=_T, env=str)}


def save_state(path: Path, state: dict) -> None:
    """checkpoint.pt or best_policy.pt: the keys CHECKPOINT_KEYS names for it and the format number, serialised in
    memory first, so that a full disk is an OSError of the write, not torch's own error."""
    if (got := set(state) - {"format"}) != set(want := CHECKPOINT_KEYS[path.name]):  # a new key is declared there
        raise ValueError(f"{path.name}: keys {sorted(got ^ set(want))} differ from CHECKPOINT_KEYS")
    buf = io.BytesIO()
    torch.save(dict(state, format=CHECKPOINT_FORMAT), buf)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getbuffer()))


def wandb_run_id(run_dir: Path) -> str:
    """The run folder's W&B run id, kept in wandb.json, so that every --resume continues the same W&B run."""
    path = run_dir / OTHER_RUN_FILES["wandb"]
    if path.exists():
        try:
            return str(json.loads(path.read_text())["id"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise A2PRError(f"{path}: unreadable ({type(e).__name__}); delete it to log this run to a new W&B run")
    run_id = f"{re.sub(r'[^A-Za-z0-9_-]', '-', run_dir.name)[:40]}-{os.urandom(4).hex()}"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({"id": run_id})))
    return run_id


@dataclass
class RunFolder:
    """A run's folder, claimed by this process (claim_run_dir), and the files train() writes into it. release()
    unlocks it and removes the .lock; a folder this run made and wrote nothing but config.json into is removed too
    (a run that failed before its first update leaves nothing)."""
    dir: Path
    lock: typing.Any
    made: bool

    @property
    def paths(self) -> dict[str, Path]:
        return dict(run_dir=self.dir, **{k: self.dir / v for k, v in RUN_FILES.items()})

    def write_config(self, args: Args, source: dict[str, str], data_sha256: str) -> None:
        """config.json: every setting with where it came from, and the versions; `--config path` runs it again."""
        settings, default = dataclasses.asdict(args), Args()
        origin = {k: source.get(k) or ("flag" if v != getattr(default, k) else "default") for k, v in settings.items()}
        config = dict(settings=settings, source=origin, versions=run_versions(args), data_sha256=data_sha256)
        atomic_write(self.paths["config"], lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))

    def write_csv(self, history: list[dict]) -> None:
        write_csv(self.paths["csv"], history, CSV_COLUMNS)

    def save_checkpoint(self, run) -> None:
        """Everything the run needs to continue exactly (CHECKPOINT_KEYS); a Minari EnvSpec as JSON text."""
        p, ds, path = run.progress, run.ds, self.paths["checkpoint"]
        state = dict(args=dataclasses.asdict(run.args), agent=run.agent.state_dict(), step=p.step, dataset=ds.name,
                     optimizers={k: o.state_dict() for k, o in run.opt.all().items()}, history=p.history,
                     rng=[g.get_state() for g in run.gens], device=run.data.obs.device.type, eval_due=p.eval_due,
                     best=p.best.tolist(), metric_sums=run.window.sums.cpu(), metric_counts=run.window.counts,
                     data_sha256=ds.fingerprint, ref_scores=(ds.ref_min_score, ds.ref_max_score),
                     env_id=env_label(ds.env_id), env_spec=None if isinstance(ds.env_id, str) else ds.env_id.to_json(),
                     **{k: getattr(run.policy, k).cpu() for k in POLICY_KEYS})  # its normalisation and bounds
        try:
            save_state(path, state)
        except A2PRError as e:
            raise A2PRError(f"{e}; continue with {resume_command(self.dir)}" if path.exists() else str(e)) from None
        p.saved = p.step

    def save_best_policy(self, run, scores: np.ndarray, better: np.ndarray) -> None:
        """The seeds whose evaluation beat their best so far put their actor into their slice of best_policy.pt
        (with the state normalisation and action bounds), so that the best score comes with its weights."""
        path, actor = self.paths["best_policy"], run.agent.actor.state_dict()
        if path.exists():  # read as every a2pr file is: a planted file is refused in one line, nothing in it runs
            kept = load_checkpoint(self.dir, path.name, "--resume")
        else:  # the first evaluation beats -inf for every seed, so every slice is filled below
            kept = dict(actor={k: v.detach().cpu().clone() for k, v in actor.items()},
                        scores=torch.full((len(scores),), -math.inf, dtype=torch.float64),
                        steps=torch.zeros(len(scores), dtype=torch.long))
        idx = torch.as_tensor(np.nonzero(better)[0])
        for k, v in actor.items():  # every actor tensor is (K, ...): seed k is slice k
            kept["actor"][k][idx] = v.detach().cpu()[idx]
        kept["scores"][idx] = torch.as_tensor(scores[better], dtype=torch.float64)
        kept["steps"][idx] = run.progress.step
        save_state(path, dict(kept, args=dataclasses.asdict(run.args), env=env_label(run.ds.env_id),
                              **{k: getattr(run.policy, k).cpu() for k in POLICY_KEYS}))

    def finish(self, run, elapsed: float, stopped_by: str | None = None) -> dict:
        """The run's summary: written to summary.json beside the learning curve, said in a line, and returned (with the
        signal that stopped it, if one did: main() exits 128 + its number)."""
        args, p, ds, finite = run.args, run.progress, run.ds, lambda x: float(x) if np.isfinite(x) else None
        seeds, interrupted = agent_seeds(args), p.step < args.total_steps
        evals = [r for r in p.history if "eval/normalized_score_mean" in r]
        last = evals[-1] if evals else {}  # a seed's own column with K seeds, the mean with one, NaN before any
        final = [last.get(f"eval/normalized_score_seed{s}", last.get("eval/normalized_score_mean", math.nan))
                 for s in seeds]
        summary = dict(env=args.env, seeds=seeds, steps=p.step, interrupted=interrupted,
                       signal=stopped_by if interrupted else None, final_score=float(np.mean(final)),
                       final_score_std=float(np.std(final)), best_score=finite(p.best.mean()),
                       final_scores=[float(x) for x in final], best_scores=[finite(b) for b in p.best],
                       dataset_score=ds.average_score, versions=run_versions(args),
                       **{k: str(v) for k, v in self.paths.items()})
        atomic_write(self.paths["summary"], lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        if evals:
            plot_curves(self.paths["png"], p.history, ds.average_score, f"A2PR on {ds.name}")
        if interrupted:
            print(f"interrupted{f' by {stopped_by}' if stopped_by else ''} at step {p.step:,}; checkpoint saved. "
                  f"Continue with: {resume_command(self.dir)}", file=sys.stderr)  # shown even with --quiet
        else:
            run.log(f"done: final score {summary['final_score']:.1f} +- {summary['final_score_std']:.1f}, best "
                    f"{float(p.best.mean()):.1f}, dataset average {ds.average_score:.1f} ({fmt_time(elapsed)}); "
                    f"results in {self.dir}")
        if ds.notice:
            run.log(f"NOTICE: {ds.notice}")
        return summary

    def interrupted_at_once(self, progress) -> str:
        if progress.saved:
            return (f"interrupted at step {progress.step:,}; the checkpoint of step {progress.saved:,} in "
                    f"{self.paths['checkpoint']} stands. Continue with: {resume_command(self.dir)}")
        return (f"interrupted at step {progress.step:,}, before its first checkpoint; the same command starts the run "
                "again")

    def open_trackers(self, args: Args, step: int = 0) -> list[tuple]:
        """Optional TensorBoard / wandb sinks, each a (log(row), close()) pair. A resumed run continues the same W&B
        run, and TensorBoard drops what was logged after the checkpoint (purge_step), so no step appears twice."""
        sinks = []
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(self.dir / OTHER_RUN_FILES["tensorboard"]), purge_step=step + 1 if step else None)
            sinks.append((lambda row: [tb.add_scalar(k, v, row["step"]) for k, v in row.items() if k != "step"],
                          tb.close))
        if args.wandb:
            import wandb

            run = wandb.init(project=args.wandb_project, name=self.dir.name, id=wandb_run_id(self.dir), resume="allow",
                             group=args.env, config=dataclasses.asdict(args))
            sinks.append((lambda row: run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"]),
                          run.finish))
        return sinks

    def release(self) -> None:
        (self.dir / OTHER_RUN_FILES["lock"]).unlink(missing_ok=True)  # before unlocking: a waiter locks a new file
        if self.made and {p.name for p in self.dir.iterdir()} <= {RUN_FILES["config"]}:
            self.paths["config"].unlink(missing_ok=True)
            self.dir.rmdir()
        self.lock.close()


def claim_run_dir(args: Args) -> RunFolder:
    """The run's folder, locked. A fresh run never writes into another run's folder: a default name that is taken
    gets a free suffix -2, -3, ... (os.mkdir, so two runs started in the same second cannot share one), and a
    --run-name that holds another run's files stops with one line."""
    if args.resume:
        return RunFolder(Path(args.resume), lock_run_dir(Path(args.resume), resuming=True), made=False)
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
            hint = "choose a shorter --run-name" if e.errno == errno.ENAMETOOLONG else "choose another --save-dir"
            raise A2PRError(f"cannot make the run folder {run_dir} ({e.strerror or e}); {hint}") from None
        if not run_dir.is_dir():
            raise A2PRError(f"--run-name {args.run_name}: {run_dir} is a file, not a folder; choose another name")
        folder = RunFolder(run_dir, lock_run_dir(run_dir), made)
        if not made and not not_started(run_dir, args):
            folder.release()  # the lock was free: this process made the .lock, and removes it
            raise A2PRError(f"{run_dir} already holds a run's files; continue that run with {resume_command(run_dir)}"
                            f", or choose another --run-name")
        if i > 1:
            print(f"note: {Path(args.save_dir) / base} exists; this run writes to {run_dir}", file=sys.stderr)
        return folder


def not_started(run_dir: Path, args: Args) -> bool:
    """A folder with no checkpoint and no summary holds a run that never got to its first checkpoint (killed, or
    preempted): if it was this very run (same settings in its config.json), starting it again takes it over."""
    names = {p.name for p in run_dir.iterdir()} - {OTHER_RUN_FILES["lock"]}
    if not names:
        return True
    config = run_dir / RUN_FILES["config"]
    if names & {RUN_FILES["checkpoint"], RUN_FILES["summary"]} or not config.is_file():
        return False
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(config.read_text())["settings"]
        return {k: v for k, v in saved.items() if k not in SAME_RESULTS} == \
            {k: v for k, v in dataclasses.asdict(args).items() if k not in SAME_RESULTS}
    return False


def restore(agent, opt, gens, ckpt: dict, args: Args, device) -> None:
    """A checkpoint's networks, optimisers and random streams into a fresh learner; a mismatch is one line."""
    try:
        agent.load_state_dict(ckpt["agent"])
        for name, o in opt.all().items():
            o.load_state_dict(ckpt["optimizers"][name])
            for group in o.param_groups:  # a loaded state carries the saving run's flag; this run's mode wins
                group["capturable"] = args.cuda_graphs
        if ckpt["device"] == torch.device(device).type:
            for g, st in zip(gens, ckpt["rng"], strict=True):
                g.set_state(st)
        else:  # CPU and CUDA generators have different states: continue with fresh streams, seeded by the step
            for g, s in zip(gens, agent_seeds(args)):
                g.manual_seed(s * 1_000_003 + ckpt["step"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise A2PRError(f"the checkpoint's weights do not fit its own settings ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}); it was altered or is damaged") from None


class OneSeed(nn.Module):
    """Seed `index` of a Policy for one observation (obs_dim,) or a batch (N, obs_dim). All K actors run, as in
    training: a K-member batched product can differ from a 1-member one in the last bit."""

    def __init__(self, policy: Policy, index: int = 0):
        super().__init__()
        self.policy, self.index = policy, index
        self.k = policy.actor.net[0].weight.shape[0]
        self.obs_dim, self.act_dim = len(policy.obs_mean), len(policy.action_low)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:  # explicit sizes: an empty or 3-D batch fails here
        if observation.dim() not in (1, 2) or observation.shape[-1] != self.obs_dim:
            raise ValueError(f"the policy takes one observation ({self.obs_dim},) or a batch (N, {self.obs_dim}), "
                             f"got shape {tuple(observation.shape)}")
        n = observation.shape[0] if observation.dim() == 2 else 1
        x = observation.to(torch.float32).reshape(1, n, self.obs_dim).expand(self.k, -1, -1)
        return self.policy(x)[self.index].reshape(observation.shape[:-1] + (self.act_dim,))


def load_run(run_dir: str | Path, device="cpu") -> dict:
    """A run's checkpoint, rebuilt: settings, networks, optimisers and random streams (ready to continue), its
    Policy, the evaluation env and the metrics history."""
    ckpt = load_checkpoint(Path(run_dir), flag="load_run")
    args = args_from_checkpoint(ckpt)
    agent, opt, gens = build_learner(args, len(ckpt["obs_mean"]), len(ckpt["action_low"]), device, ckpt)
    policy = Policy(agent.actor, *(ckpt[k] for k in POLICY_KEYS)).to(device)
    keys = ("step", *POLICY_KEYS, "env_id", "history", "ref_scores")
    return dict(args=args, agent=agent, opt=opt, gens=gens, policy=policy, **{k: ckpt[k] for k in keys})


def load_policy(run_dir: str | Path, device="cpu", seed_index: int = 0):
    """The trained policy of a run as a function: raw env observation(s) -> env action(s), numpy in and out."""
    policy = OneSeed(load_run(run_dir, device)["policy"], seed_index)
    return torch.no_grad()(lambda obs: policy(torch.as_tensor(np.asarray(obs, np.float32), device=device)).cpu()
                           .numpy())


def export_policy(run_dir: str | Path, best: bool = False, seed_index: int = 0) -> Path:
    """RUN_DIR/policy.pt2 (the checkpoint's actor) or policy_best.pt2 (best_policy.pt's): a torch.export program
    of OneSeed(Policy), raw observations (batch, obs_dim) -> env actions, any batch size; torch alone runs it."""
    run_dir, name = Path(run_dir), RUN_FILES["best_policy" if best else "checkpoint"]
    state = load_checkpoint(run_dir, name, "--export")
    args, obs_dim = args_from_checkpoint(state), len(state["obs_mean"])
    actor = Actor(args.num_seeds, obs_dim, len(state["action_low"]), args.actor_hidden, args.actor_layers)
    try:
        actor.requires_grad_(False).load_state_dict(state["actor"] if best else {
            k.removeprefix("actor."): v for k, v in state["agent"].items() if k.startswith("actor.")})
    except (RuntimeError, TypeError) as e:
        raise A2PRError(f"{run_dir / name}: its actor weights do not fit its settings "
                        f"({' '.join(str(e).split())[:200]}); export another run") from None
    module = OneSeed(Policy(actor, *(state[k] for k in POLICY_KEYS)), seed_index).eval()
    program = torch.export.export(module, (torch.zeros(2, obs_dim),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    out, buf = run_dir / OTHER_RUN_FILES["export_best" if best else "export"], io.BytesIO()
    torch.export.save(program, buf)  # in memory first: torch's own file writer aborts the process on a full disk
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
    return out


def load_checkpoint(run_dir: Path, name: str = RUN_FILES["checkpoint"], flag: str = "--resume") -> dict:
    """A run folder's checkpoint.pt (or best_policy.pt), loaded with weights_only=True: a shared file's pickle may
    carry code, so only tensors and plain data are let through, and anything else is refused in one line."""
    path = run_dir / name
    if not path.is_file():
        raise A2PRError(f"{flag} {run_dir}: no {name} there; give the folder of a run that saved one")
    try:
        with warnings.catch_warnings():  # torch's "Detected pickle protocol" note would turn one line into three
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # never relay torch's advice to retry with weights_only=False: that runs the file's code
        if found := re.findall(r"GLOBAL (\S+)", str(e)):
            raise A2PRError(f"{path}: refused, nothing in it was run: it holds Python objects ({found[0]}) that could "
                            "run code when loaded; use only files from runs you trust") from None
        with open(path, "rb") as f:  # torch.save writes a zip archive: one that cannot be read is damaged
            zipped = f.read(4) == b"PK\x03\x04"
        why = ("it is damaged or cut short (its archive cannot be read): copy it again, or resume another run" if zipped
               else f"it is not a file that a2pr's torch.save wrote ({type(e).__name__}); give a run's own {name}")
        raise A2PRError(f"{path}: cannot be loaded: {why}") from None
    if isinstance(ckpt, dict) and ckpt.get("format", 1) != CHECKPOINT_FORMAT:
        raise A2PRError(f"{path}: written in a2pr checkpoint format {ckpt['format']!r}; this a2pr.py reads format "
                        f"{CHECKPOINT_FORMAT}: use the a2pr.py that wrote it (its config.json names its a2pr_sha256)")
    keys = CHECKPOINT_KEYS[name]  # what the format holds: each key, and its type
    if wrong := sorted(k for k, t in keys.items() if not isinstance(ckpt, dict) or not isinstance(ckpt.get(k), t)):
        raise A2PRError(f"{path}: not an a2pr {name} (missing or wrong: {', '.join(wrong)}); give a run's own file")
    for k in POLICY_KEYS:  # tensors on disk, numpy arrays in memory
        ckpt[k] = ckpt[k].numpy()
    if ckpt.get("env_spec"):  # a Minari dataset's eval env: an EnvSpec, stored as JSON text
        from gymnasium.envs.registration import EnvSpec

        ckpt["env_id"] = EnvSpec.from_json(ckpt["env_spec"])
    return ckpt


def check_outputs(args: Args) -> None:
    """Before any work: the trackers asked for are installed, and the run's folder can be written."""
    import importlib.util

    for flag in ("tensorboard", "wandb"):
        if getattr(args, flag) and importlib.util.find_spec(flag) is None:
            raise A2PRError(f"--{flag} needs the {flag} package: pip install {flag}")
    check_writable(Path(args.resume or args.save_dir), "--resume needs to write there" if args.resume
                   else "choose another --save-dir")


# ================================================================================================================
# Appendix D. The theory on finite MDPs (spec, "What the theory promises"): augmented_behaviour_policy builds the
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
# Appendix E. The command line: the parser built from Args, --config (a run's settings as the defaults), --resume
# (the checkpoint's settings win) and validation: one clear line per mistake, before any work.
# ================================================================================================================
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage dump; an unknown flag gets the closest known one
        if message.startswith("unrecognized arguments:"):
            words = [w for w in message.split(":", 1)[1].split() if w.startswith("-")]
            if any(w.split("=")[0] in ("--sweep", "--sweep-envs") for w in words):
                self.exit(2, "a2pr.py: error: sweeps moved to the companion a2pr_sweep.py: python a2pr_sweep.py "
                             "SUITE [--seeds N] [--variants ...] [training flags] (see python a2pr_sweep.py --help)\n")
            close = {w: difflib.get_close_matches(w.split("=")[0], self.flags, n=1, cutoff=0.6) for w in words}
            message += "".join(f" ({w}: did you mean {c[0]}?)" for w, c in close.items() if c)
        self.exit(2, f"{self.prog}: error: {message} (see python {self.prog} --help)\n")


def build_parser(prog: str = "a2pr.py", description: str | None = None) -> argparse.ArgumentParser:
    """One flag per Args field (add_fields); a parse holds the flags given, and nothing else."""
    p = _Parser(prog=prog, description=description or __doc__.split("\n\n")[0],
                formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=30, width=120))
    p.flags = add_fields(p, Args)  # choices are checked by validate_args, in one line for Python and the shell alike
    return p


def field_types(cls) -> dict[str, type]:
    """Each field's type (int, float, str or bool; None is allowed where the default is None)."""
    return {k: next(t for t in typing.get_args(h) or (h,) if t is not type(None))
            for k, h in typing.get_type_hints(cls).items()}


def add_fields(p, cls, choices: bool = False) -> list[str]:
    """One argument per field of the dataclass cls that has a help line (arg): --name, or NAME where its metadata
    says positional; type, metavar, aliases and (with `choices`) choices from the field, default SUPPRESS. The one
    dataclass-to-argparse builder: Args here, the sweep's own settings in a2pr_sweep.py. Returns the flags."""
    flags, types = [], field_types(cls)
    for f in (f for f in dataclasses.fields(cls) if "help" in f.metadata):
        typ = types[f.name]
        hide = f.default in (None, dataclasses.MISSING) or typ is bool or str(f.default) in f.metadata["help"]
        kw = dict(help=f.metadata["help"] + ("" if hide else f" (default {f.default})"))
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction if f.metadata.get("negatable") else "store_true"
        else:
            kw.update(type=typ, metavar=f.metadata.get("metavar", f.name.split("_")[-1].upper()),
                      choices=f.metadata.get("choices") if choices else None)
        if f.metadata.get("positional"):
            p.add_argument(f.name, **kw)
        else:
            names = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
            p.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, **kw)
            flags += names
    return flags


def parse_args(argv=None) -> tuple[Args, set[str]]:
    """(Args, the names of the flags given) from one parse of argv; --config FILE supplies the settings not given."""
    given = vars(build_parser().parse_args(argv))
    return Args(**{**(load_config(given["config"]) if "config" in given else {}), **given}), set(given)


# Args' fields, for the settings read from files (config.json, a checkpoint).
FIELD_TYPES, FIELD_DEFAULTS = field_types(Args), {f.name: f.default for f in dataclasses.fields(Args)}

# Settings that do not change what a run learns, in one place, by kind: "length" (the run's total steps), "machine"
# (the device, the speed path, where data is cached), "process" (how this process talks and waits), "folder" (where
# the run's files go), "records" (what is logged, how often) and "command" (what the program does). --resume lets
# length, machine and process follow the command line; a shared config.json never sets machine, folder or command;
# a sweep (a2pr_sweep.py) and a restarted run take a folder's run as the same whatever any of them is.
SAME_RESULTS = dict(total_steps="length", cuda="machine", compile="machine", cuda_graphs="machine", quiet="process",
                    data_dir="machine", download_timeout="process", save_dir="folder", run_name="folder",
                    log_freq="records", save_freq="records", tensorboard="records", wandb="records",
                    wandb_project="records", **dict.fromkeys(("resume", "config", "export", "best", "benchmark",
                                                              "bench_steps", "bench_modes", "bench_repeats",
                                                              "bench_dims"), "command"))
RESUME_MAY_CHANGE = ("resume", *(k for k, kind in SAME_RESULTS.items() if kind in ("length", "machine", "process")))
NOT_FROM_CONFIG = tuple(k for k, kind in SAME_RESULTS.items() if kind in ("machine", "folder", "command"))

TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def checked_settings(values, where: str) -> dict:
    """Settings read from a file (config.json, a checkpoint): known fields of the right types, or one line."""
    if not isinstance(values, dict):
        raise A2PRError(f"{where}: its settings are a {type(values).__name__}, not a dict; give a run's own file")
    for k, v in values.items():
        if k not in FIELD_TYPES:
            raise A2PRError(f"{where}: settings this a2pr.py does not know: {k!r}; remove it or use the a2pr.py that "
                            "wrote the file")  # quoted, so that an empty or blank key shows
        typ = FIELD_TYPES[k]
        if not (type(v) is typ or (typ is float and type(v) is int) or (v is None and FIELD_DEFAULTS[k] is None)):
            raise A2PRError(f"{where}: '{k}' must be {TYPE_WORDS[typ]}, got {v!r}; fix or remove it")
    return values


def load_config(path: str, where: str | None = None, fix: str = "") -> dict:
    """The experiment's settings from a run's config.json (write_config), minus NOT_FROM_CONFIG."""
    where = where or f"--config {path}"
    try:
        settings = json.loads(Path(path).read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # Recursion: nested past Python's limit
        raise A2PRError(f"{where}: not a run's config.json ({type(e).__name__}: {e}){fix}") from None
    return {k: v for k, v in checked_settings(settings, where).items() if k not in NOT_FROM_CONFIG}


def run_settings(args: Args, given: set[str] | None) -> tuple[Args, dict[str, str], dict | None]:
    """The run's resolved settings, where each came from, and the checkpoint when resuming (its settings win, but
    for RESUME_MAY_CHANGE, so that a GPU run can go on here)."""
    if given is None:  # train(Args(...)) from Python: what differs from the defaults was given; --config as parse_args
        given = {f.name for f in dataclasses.fields(Args) if getattr(args, f.name) != f.default}
        if args.config:
            args = dataclasses.replace(args, **{k: v for k, v in load_config(args.config).items() if k not in given})
    mode = ("cuda", "cuda_graphs", "compile", "quiet")  # how this process runs: always this command line's
    follow = {k: getattr(args, k) for k in RESUME_MAY_CHANGE if k != "resume" and (k in given or k in mode)}
    run_dir = Path(args.resume or ".")
    if args.resume and not (run_dir / RUN_FILES["checkpoint"]).exists() and (run_dir / RUN_FILES["config"]).is_file():
        # killed before its first checkpoint: start that run again, in its folder (claim_run_dir takes it over),
        # with its own settings and their sources; a flag that contradicts them is refused, as with a checkpoint
        config = str(run_dir / RUN_FILES["config"])
        saved = Args(**load_config(config, config, f"; the run never reached its first checkpoint: remove the folder "
                                   f"{run_dir} and start it again (the same sweep, or a2pr.py without --resume)"))
        check_resume_flags(args, saved, given, 0, "the run's")
        args, source = resolve_args(dataclasses.replace(saved, save_dir=str(run_dir.parent), run_name=run_dir.name,
                                                        **follow))
        origin = json.loads(Path(config).read_text()).get("source") or {}
        return args, {**source, **{k: str(v) for k, v in origin.items()}, **{k: "flag" for k in given}}, None
    if not args.resume:
        args, source = resolve_args(args)
        if args.config:  # what the file set is labelled (config), not (flag)
            source.update({k: "config" for k in load_config(args.config) if k not in given})
        return args, source, None
    ckpt = load_checkpoint(Path(args.resume))
    if (Path(args.resume) / RUN_FILES["best_policy"]).exists():  # read at its first better evaluation: refused now
        load_checkpoint(Path(args.resume), RUN_FILES["best_policy"])
    saved = args_from_checkpoint(ckpt)
    check_resume_flags(args, saved, given, ckpt["step"])  # a flag that contradicts the checkpoint is an error
    if ckpt["device"] != ("cuda" if args.cuda else "cpu"):
        print(f"note: the checkpoint was written on {ckpt['device']}; continuing on the other device with "
              "fresh random streams, so the run will not be bit-identical to an uninterrupted one", file=sys.stderr)
    args = dataclasses.replace(saved, resume=args.resume, **follow)
    args, source = resolve_args(args)
    return args, {k: "flag" if k in given else "checkpoint" for k in source}, ckpt


def args_from_checkpoint(ckpt: dict) -> Args:
    """The run's settings, checked as any file's are; those a newer a2pr.py wrote are reported and left out."""
    if unknown := sorted(set(ckpt["args"]) - set(FIELD_TYPES)):
        print(f"note: ignoring checkpoint settings this a2pr.py does not know: {', '.join(unknown)}", file=sys.stderr)
    return Args(**checked_settings({k: v for k, v in ckpt["args"].items() if k in FIELD_TYPES}, "the checkpoint"))


def check_resume_flags(args: Args, saved: Args, given: set[str], step: int, whose: str = "the checkpoint's") -> None:
    """--resume continues the checkpoint's run: a given setting that contradicts it is an error naming both."""
    if "total_steps" in given and args.total_steps is not None and args.total_steps < step:
        raise A2PRError(f"--resume {args.resume}: the run is at step {step:,}, past --total-steps {args.total_steps:,}"
                        "; give a larger --total-steps, or none to finish as planned")
    clash = []
    for name in sorted(given - set(RESUME_MAY_CHANGE)):
        mine, theirs = getattr(args, name), getattr(saved, name)
        if name == "preset" and mine == "auto":
            mine = auto_preset(saved.env)
        if mine != theirs:
            clash.append(f"--{name.replace('_', '-')} {mine} contradicts {whose} {theirs}")
    if clash:
        may = ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE[1:])
        raise A2PRError(f"--resume {args.resume}: {'; '.join(clash)}. Drop the flag to continue the run as it was "
                        f"(only {may} may change), or start a new run with it")


# What a setting must be: the rule's words (they end the one-line error) and its test; then which fields follow
# which rule. check_fields serves validate_args here and the companion a2pr_sweep.py for its own flags.
RULES = {
    "a positive integer": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "an integer >= 0": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63,
    "a positive number": lambda v: math.isfinite(v) and v > 0,
    "a number >= 0": lambda v: math.isfinite(v) and v >= 0,
    "a finite number": math.isfinite,
    "in [0, 1)": lambda v: 0.0 <= v < 1.0,
    "in (0, 1]": lambda v: 0.0 < v <= 1.0,
}
CHECKS = {
    "a positive integer": ["total_steps", "batch_size", "num_seeds", "policy_freq", "actor_hidden", "actor_layers",
                           "critic_hidden", "critic_layers", "value_hidden", "value_layers", "vae_hidden",
                           "vae_layers", "eval_freq", "eval_episodes", "log_freq", "save_freq", "bench_steps",
                           "bench_repeats", "threads"],
    "an integer >= 0": ["dataset_seed"],
    "a positive number": ["actor_lr", "critic_lr", "value_lr", "vae_lr", "alpha", "download_timeout"],
    "a number >= 0": ["bc_weight", "vae_weight", "policy_noise", "noise_clip", "eval_obs_noise"],
    "a finite number": ["eps_a", "reward_scale", "reward_shift"],
    "in [0, 1)": ["discount"],
    "in (0, 1]": ["tau"],
}

# Upper bounds of what torch, the OS and the sockets accept (counts are int32 in places; socket timeouts overflow
# past about 10^9 s): a larger value is refused here, naming its flag, not deep inside a library.
LARGEST = dict(count=2**31 - 1, seconds=10**9)


def check_fields(obj, checks: dict[str, list[str]]) -> None:
    """The first field of obj that breaks its rule is one line: --flag must be RULE, got VALUE (None: not given)."""
    for rule, names in checks.items():
        for name in names:
            if (v := getattr(obj, name)) is not None and not RULES[rule](v):
                raise A2PRError(f"--{name.replace('_', '-')} must be {rule}, got {v!r}")
            top = LARGEST["count"] if "integer" in rule else LARGEST["seconds"] if "timeout" in name else None
            if v is not None and top is not None and v > top:
                shown = f"{v:g}" if isinstance(v, float) else f"{v:,}" if v < 10**15 else f"a {len(str(v))}-digit " \
                    "number"
                raise A2PRError(f"--{name.replace('_', '-')} must be at most {top:,}, got {shown}")


def validate_args(args: Args) -> None:
    """One clear line per mistake, before any work is done."""
    cores = os.cpu_count() or 1
    if isinstance(args.threads, int) and args.threads > cores:  # more threads than cores only slow torch down
        raise A2PRError(f"--threads must be at most this machine's {cores} cores, got "
                        f"{args.threads if args.threads < 10**15 else 'a larger number'}")
    check_fields(args, CHECKS)
    top = 2**63 - 1 - 10_000 - args.num_seeds - args.eval_episodes  # evaluation seeds envs with seed + 10000 + e
    if not (isinstance(args.seed, int) and 0 <= args.seed <= top):
        raise A2PRError(f"--seed must be an integer from 0 to {top}, got {args.seed!r}")
    if args.compile and args.cuda_graphs:  # each is checked against eager on its own, not yet together
        raise A2PRError("use --compile or --cuda-graphs, not both (the combination is not verified yet)")
    for f in dataclasses.fields(Args):  # the one check of the fields with choices, for the command line and Python
        if "choices" in f.metadata and (v := getattr(args, f.name)) not in f.metadata["choices"] + (None,) * (
                f.default is None):
            raise A2PRError(f"--{f.name.replace('_', '-')} must be one of {', '.join(f.metadata['choices'])}, "
                            f"got {v!r}")


# The names of this file that its companion a2pr_sweep.py uses: a declared interface (test_a2pr_sweep.py checks that
# the companion uses no other), kept stable when the rest changes.
COMPANION_NAMES = ("A2PRError", "Args", "arg", "add_fields", "build_parser", "load_config", "resolve_args",
                   "check_fields", "LARGEST", "SAME_RESULTS", "RESUME_MAY_CHANGE", "train", "load_dataset", "data_dir",
                   "evaluate", "normalized_score", "RUN_FILES", "load_checkpoint", "load_run", "atomic_write",
                   "write_csv", "lock_with_pid", "library_versions", "fmt_time")


if __name__ == "__main__":
    sys.exit(main())
