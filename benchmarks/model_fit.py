"""Seconds per ensemble fit round at the paper's settings, and this machine's matmul ceiling.

One round is ``dyn.fit`` on 600 transitions (the whole replay buffer at the end
of training; obs 9, action 3) at the default model config: 5 members of
4 x 256 swish layers, batch 128, 30 epochs, no holdout. The data is padded to
the 1024-row bucket, so each epoch runs 5 real minibatches and skips 3 empty
ones. Reports the compile time of the jitted fit, the median, min and max
seconds of a round after compilation (host padding and metric transfer
included), the analytic matmul FLOPs of the round (forward + backward ~ 3 x
forward), the achieved GFLOP/s, and the ceiling of a float32 batched matmul of
the hidden-layer shape [E, 128, 256] x [E, 256, 256] measured in the same run.

    python benchmarks/model_fit.py [--json] [--rounds 7] [--transitions 600]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import make_matmul_chain, timed
from evjax.config import Config
from evjax.dynamics import fit_padded, fit_settings, make_dynamics, pad_transitions


def matmul_ceiling(members: int, rows: int, width: int, repeats: int) -> float:
    """GFLOP/s of dependent float32 batched matmuls [E, rows, width] x [E, width, width] (the hidden layers' shape)."""
    run, flops = make_matmul_chain(members, rows, width, jnp.float32, chain=16)
    return flops / statistics.median(timed(run, repeats)) / 1e9


def synthetic_transitions(num_rows: int, obs_dim: int, action_dim: int, seed: int = 0):
    """Smooth nonlinear transitions with noise at roughly the environment's scales."""
    rng = np.random.default_rng(seed)
    obs = rng.uniform(0.0, 2.0, (num_rows, obs_dim))
    act = rng.uniform(1.1, 1.5, (num_rows, action_dim))
    mixing = rng.normal(size=(obs_dim + action_dim, obs_dim)) / np.sqrt(obs_dim + action_dim)
    next_obs = obs + 0.3 * np.tanh(np.concatenate([obs, act], 1) @ mixing) + 0.02 * rng.normal(size=obs.shape)
    reward = obs.sum(1) / obs_dim - act.mean(1) + 0.05 * rng.normal(size=num_rows)
    cost = np.maximum(0.0, obs[:, 0] - 1.6)
    return obs, act, reward, cost, next_obs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--rounds", type=int, default=7, help="timed fit rounds after compilation")
    parser.add_argument("--transitions", type=int, default=600, help="transitions in the dataset")
    args = parser.parse_args(argv)

    cfg = Config()
    mcfg = cfg.model
    obs_dim, action_dim = cfg.obs_dim, cfg.action_dim
    dyn = make_dynamics(mcfg, obs_dim, action_dim)
    state = dyn.init(jax.random.key(0))
    data = synthetic_transitions(args.transitions, obs_dim, action_dim)

    inputs, targets, num_rows = pad_transitions(*data, layout=dyn.layout, batch_size=mcfg.batch_size)
    fit_fn = jax.jit(functools.partial(fit_padded, **fit_settings(mcfg, dyn.layout)))
    start = time.perf_counter()
    fit_fn.lower(jax.random.key(1), state, inputs, targets, num_rows).compile()
    compile_seconds = time.perf_counter() - start

    def fit_round():
        new_state, metrics = dyn.fit(jax.random.key(1), state, *data)
        return new_state.params

    seconds = timed(fit_round, args.rounds)
    median = statistics.median(seconds)

    layer_sizes = [obs_dim + action_dim, *mcfg.hidden_sizes, 2 * (obs_dim + 2) - int(mcfg.binary_cost)]
    forward = 2 * sum(a * b for a, b in zip(layer_sizes[:-1], layer_sizes[1:]))
    steps = mcfg.epochs * math.ceil(args.transitions / mcfg.batch_size)
    fit_flops = 3 * forward * mcfg.ensemble_size * mcfg.batch_size * steps
    achieved = fit_flops / median / 1e9
    ceiling = matmul_ceiling(mcfg.ensemble_size, mcfg.batch_size, mcfg.hidden_sizes[0], repeats=20)

    result = {
        "benchmark": "model_fit",
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "transitions": args.transitions,
        "bucket_rows": int(inputs.shape[0]),
        "members": mcfg.ensemble_size,
        "hidden_sizes": list(mcfg.hidden_sizes),
        "batch_size": mcfg.batch_size,
        "epochs": mcfg.epochs,
        "adam_steps": steps,
        "compile_s": round(compile_seconds, 3),
        "fit_median_s": round(median, 4),
        "fit_min_s": round(min(seconds), 4),
        "fit_max_s": round(max(seconds), 4),
        "rounds": args.rounds,
        "fit_gflop": round(fit_flops / 1e9, 3),
        "achieved_gflops": round(achieved, 2),
        "ceiling_f32_matmul_gflops": round(ceiling, 2),
        "ratio_of_ceiling": round(achieved / ceiling, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"ensemble fit, {args.transitions} transitions (bucket {result['bucket_rows']}), "
              f"{mcfg.ensemble_size} x {list(mcfg.hidden_sizes)}, batch {mcfg.batch_size}, {mcfg.epochs} epochs "
              f"({steps} Adam steps) on {result['device']} ({result['cpu_count']} CPUs)")
        print(f"  compile: {compile_seconds:.2f} s")
        print(f"  fit round: median {median:.3f} s (min {min(seconds):.3f}, max {max(seconds):.3f}) over {args.rounds}")
        print(f"  matmul work {result['fit_gflop']} GFLOP -> {achieved:.1f} GFLOP/s; "
              f"float32 batched-matmul ceiling {ceiling:.1f} GFLOP/s; ratio {achieved / ceiling:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
