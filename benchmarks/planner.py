"""Seconds per constrained CEM plan at the paper's settings, and this machine's matmul ceilings.

Plans with a freshly initialised ensemble (``dyn.init``: identity normalisers,
unit target stats) at the default config: 500 candidates, 30 particles, horizon
12, 5 iterations, 5 members of 4 x 256, obs 9, action 3. Reports the median,
min and max seconds per plan after compilation, the compile time, the analytic
FLOP count of the ensemble forward passes, the achieved GFLOP/s, and the
ceiling of one batched matmul of the hidden-layer shape [E, N*P/E, 256] x
[E, 256, 256] measured in the same run in float32 and with bfloat16 inputs and
float32 accumulation, interleaved with the timed plans so that load from other
processes hits plans and ceilings alike. ``--breakdown`` also times the pieces
of one plan; ``--sampled-steps`` plans through ``dyn.step`` with its own noise
instead of the planner's mean-step path. ``--batch B`` times ``planner.plan_batch``
over B different observations and keys instead (one compiled call plans for B
environments) and also reports plans per second. The observation's time feature is
``--steps-done`` / 12 (default 0, the episode's first step, which plans the full horizon:
with ``planner.stop_at_episode_end`` a plan at step t computes only the 12 - t horizon
steps left in the episode, on CPU). The 125 constant-price candidates are rolled out once per
plan (``make_planner``'s ``hoist_constants``); ``--no-hoist`` rolls them out in every CEM
iteration, the reference it is compared with; ``--against-no-hoist`` times that reference in the same
run, each of its plans right after the timed plan on the same key, and reports the paired time ratio.
The FLOP count follows what is rolled out.

    python benchmarks/planner.py [--json] [--matmul-dtype bfloat16|float32] [--repeats 10] [--batch B] [--tile-rows R]
                                [--steps-done T] [--particle-noise true|false] [--hidden-dtype auto|float32|bfloat16]
                                [--profile DIR] [--no-hoist | --against-no-hoist]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import make_matmul_chain, timed
from evjax import cli
from evjax.config import Config
from evjax.dynamics import make_dynamics
from evjax.planner import (CPU_TILE_ROWS, batch_plans, episode_step_weights, make_model_planner, make_planner,
                           resolve_hidden_dtype, resolve_kernel, rollout_particles_per_member)


def forward_flops(layer_sizes: list[int]) -> int:
    """Multiply-adds x 2 of one forward pass of one sample through the dense layers."""
    return 2 * sum(a * b for a, b in zip(layer_sizes[:-1], layer_sizes[1:]))


def seconds_of(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


@cli.entry_point("planner.py")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--matmul-dtype", choices=("bfloat16", "float32"), default=None,
                        help="ensemble matmul input dtype (default: planner.matmul_dtype of the config)")
    parser.add_argument("--repeats", type=int, default=10, help="timed plans after compilation")
    parser.add_argument("--breakdown", action="store_true", help="also time the pieces of one plan")
    parser.add_argument("--sampled-steps", action="store_true",
                        help="plan through dyn.step with its own noise (no mean_step_fn: no shared first step, "
                             "noise drawn at every step)")
    parser.add_argument("--tile-rows", type=int, default=None,
                        help="planner.tile_rows (default: the config's; 3000 or more runs the CPU forward untiled)")
    parser.add_argument("--batch", type=int, default=0,
                        help="time planner.plan_batch over B environments (0: single plans)")
    parser.add_argument("--vmap", action="store_true",
                        help="with --batch on CPU: vmap the plans instead of running them one after another")
    parser.add_argument("--particle-noise", choices=("true", "false"), default=None,
                        help="planner.particle_noise (default: the config's); false rolls out one particle per "
                             "(member, candidate)")
    parser.add_argument("--hidden-dtype", choices=("auto", "float32", "bfloat16"), default=None,
                        help="planner.hidden_dtype (default: the config's; auto is bfloat16 on a GPU)")
    parser.add_argument("--kernel", choices=("auto", "xla", "pallas", "pallas_layers", "mosaic"), default=None,
                        help="planner.kernel (default: the config's, auto: mosaic on a Hopper GPU, else xla; the "
                             "Pallas kernels need a GPU, mosaic a Hopper one)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also write a jax.profiler trace of three plans to DIR (Perfetto/TensorBoard)")
    parser.add_argument("--steps-done", type=int, default=0,
                        help="steps of the episode already done, in the observation's time feature (default 0)")
    parser.add_argument("--no-hoist", action="store_true",
                        help="roll the constant-price candidates out in every CEM iteration (the reference)")
    parser.add_argument("--against-no-hoist", action="store_true",
                        help="also time the --no-hoist reference, plan for plan, and report the paired ratio")
    args = parser.parse_args(argv)
    if args.against_no_hoist and (args.no_hoist or args.sampled_steps):
        parser.error("--against-no-hoist compares the default (hoisted) mean-step planner with --no-hoist: "
                     "drop --no-hoist and --sampled-steps")

    cfg = Config()
    overrides = {"matmul_dtype": args.matmul_dtype, "tile_rows": args.tile_rows, "hidden_dtype": args.hidden_dtype,
                 "kernel": args.kernel,
                 "particle_noise": None if args.particle_noise is None else args.particle_noise == "true"}
    cfg = dataclasses.replace(cfg, planner=dataclasses.replace(
        cfg.planner, **{name: value for name, value in overrides.items() if value is not None}))
    matmul_dtype = cfg.planner.matmul_dtype
    pcfg = cfg.planner
    hidden_dtype = resolve_hidden_dtype(pcfg.hidden_dtype, matmul_dtype, jax.default_backend())
    obs_dim, action_dim = cfg.obs_dim, cfg.action_dim
    dyn = make_dynamics(cfg.model, obs_dim, action_dim)
    model = dyn.init(jax.random.key(0))
    tile_rows = (pcfg.tile_rows or CPU_TILE_ROWS) if jax.default_backend() == "cpu" else 0  # as make_model_planner
    step_fn = functools.partial(dyn.step, matmul_dtype=matmul_dtype, tile_rows=tile_rows, hidden_dtype=hidden_dtype)
    kernel = "xla" if args.sampled_steps else resolve_kernel(  # the forward the timed plan runs
        pcfg.kernel, jax.default_backend(), matmul_dtype, getattr(jax.devices()[0], "compute_capability", None),
        dyn.layout)
    if args.sampled_steps:
        planner = make_planner(pcfg, cfg.env.price_lower, cfg.env.price_upper, dyn.ensemble_size, step_fn)
    else:
        planner = make_model_planner(cfg, dyn, hoist_constants=not args.no_hoist)

    batch = args.batch
    obs = np.random.default_rng(0).normal(size=(batch or 1, obs_dim))
    if cfg.env.time_features:
        obs[:, -1] = args.steps_done / cfg.env.episode_steps
    obs = jnp.asarray(obs, jnp.float32)  # [B, S]
    horizon = pcfg.horizon  # horizon steps computed per candidate (the first always is)
    if pcfg.stop_at_episode_end and cfg.env.time_features and jax.default_backend() == "cpu":  # skipped on CPU
        weights = episode_step_weights(obs[0], horizon=pcfg.horizon, episode_steps=cfg.env.episode_steps)
        horizon = max(1, int(jnp.sum(weights)))
    warm = jnp.broadcast_to(planner.initial_warm_start(), (batch or 1,) + planner.initial_warm_start().shape)
    kappa = jnp.full((batch or 1,), pcfg.kappa_init, jnp.float32)  # [B]
    if batch:
        plan_fn, make_key = planner.plan_batch_fn, functools.partial(jax.random.split, num=batch)
        if args.vmap:
            plan_fn = functools.partial(batch_plans, plan_fn=planner.plan_fn, sequential=False)
    else:
        plan_fn, make_key, obs, warm, kappa = planner.plan_fn, lambda key: key, obs[0], warm[0], kappa[0]
    start = time.perf_counter()
    compiled = jax.jit(plan_fn).lower(make_key(jax.random.key(0)), model, obs, warm, kappa).compile()
    compile_seconds = time.perf_counter() - start
    reference = None
    if args.against_no_hoist:
        unhoisted = make_model_planner(cfg, dyn, hoist_constants=False)
        reference_fn = unhoisted.plan_batch_fn if batch else unhoisted.plan_fn
        if batch and args.vmap:
            reference_fn = functools.partial(batch_plans, plan_fn=unhoisted.plan_fn, sequential=False)
        reference = jax.jit(reference_fn).lower(make_key(jax.random.key(0)), model, obs, warm, kappa).compile()

    # samples per member in a model step after the first, as the planner steps them
    per_member = rollout_particles_per_member(pcfg, dyn.ensemble_size, mean_step=not args.sampled_steps)
    rows = pcfg.popsize * per_member
    width = cfg.model.hidden_sizes[0]
    vmapped = bool(batch) and (args.vmap or jax.default_backend() != "cpu")
    ceiling_rows = rows * batch if vmapped else rows  # one model step's rows in one call
    chains = {name: make_matmul_chain(dyn.ensemble_size, ceiling_rows, width, dtype)
              for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16))}
    # plans and ceiling measurements interleaved, so that load from other processes hits both alike
    keys = [make_key(key) for key in jax.random.split(jax.random.key(1), args.repeats + 1)]
    jax.block_until_ready(compiled(keys[0], model, obs, warm, kappa))
    if reference is not None:
        jax.block_until_ready(reference(keys[0], model, obs, warm, kappa))
    for run, _ in chains.values():
        jax.block_until_ready(run())
    seconds, reference_seconds, ceiling_seconds = [], [], {name: [] for name in chains}
    for key in keys[1:]:
        seconds.append(seconds_of(lambda: compiled(key, model, obs, warm, kappa)))
        if reference is not None:
            reference_seconds.append(seconds_of(lambda: reference(key, model, obs, warm, kappa)))
        for name, (run, _) in chains.items():
            ceiling_seconds[name].append(min(seconds_of(run) for _ in range(3)))
    _, _, diag = compiled(make_key(jax.random.key(2)), model, obs, warm, kappa)
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for _ in range(3):
                jax.block_until_ready(compiled(make_key(jax.random.key(3)), model, obs, warm, kappa))

    layer_sizes = [obs_dim + action_dim, *cfg.model.hidden_sizes, 2 * (obs_dim + 2)]
    # forward rows actually evaluated per candidate rolled out: with mean_step_fn the first step runs once per
    # (member, candidate)
    rows_per_candidate = ((pcfg.particles if args.sampled_steps else dyn.ensemble_size)
                          + dyn.ensemble_size * per_member * (horizon - 1))
    constant = pcfg.constant_candidates ** action_dim if pcfg.constant_candidates else 0
    iterations = int(jnp.sum(diag.iterations))  # over the call's plans
    if args.sampled_steps or args.no_hoist or not constant:
        rollouts = pcfg.popsize * iterations
    else:  # the constant candidates once per plan, the samples every iteration
        rollouts = constant * (batch or 1) + (pcfg.popsize - constant) * iterations
    gflop = forward_flops(layer_sizes) * rows_per_candidate * rollouts / 1e9  # per call
    median = statistics.median(seconds)
    achieved = gflop / median
    ceiling_f32, ceiling_bf16 = (chains[name][1] / statistics.median(ceiling_seconds[name]) / 1e9
                                 for name in ("f32", "bf16"))
    ceiling = ceiling_bf16 if matmul_dtype == "bfloat16" else ceiling_f32
    plans = batch or 1
    result = {
        "plan_seconds_median": median / plans,
        "plan_seconds_min": min(seconds) / plans,
        "plan_seconds_max": max(seconds) / plans,
        "compile_seconds": compile_seconds,
        "gflop_per_plan": gflop / plans,
        "achieved_gflops": achieved,
        "ceiling_gflops_f32": ceiling_f32,
        "ceiling_gflops_bf16": ceiling_bf16,
        "ratio_to_ceiling": achieved / ceiling,
        "matmul_dtype": matmul_dtype,
        "hidden_dtype": hidden_dtype, "kernel": kernel,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "ceiling_shape": [dyn.ensemble_size, ceiling_rows, width],
        "device": f"{jax.devices()[0].device_kind} x{len(jax.devices())} ({os.cpu_count()} cpus)",
        "step_path": "sampled" if args.sampled_steps else "mean + planner noise",
        "tile_rows": tile_rows,
        "particle_noise": pcfg.particle_noise,
        "steps_done": args.steps_done,
        "horizon_steps_computed": horizon,
        "constant_candidates_hoisted": bool(constant) and not (args.sampled_steps or args.no_hoist),
        "load_average_1min": os.getloadavg()[0],
    }
    if reference_seconds:
        ratios = [a / b for a, b in zip(seconds, reference_seconds)]
        result.update({"no_hoist_plan_seconds_median": statistics.median(reference_seconds) / plans,
                       "hoist_time_ratio_median": statistics.median(ratios),
                       "hoist_time_ratio_min": min(ratios), "hoist_time_ratio_max": max(ratios),
                       "hoist_flop_ratio": rollouts / (pcfg.popsize * iterations)})
    if batch:
        result.update({"batch": batch, "batch_mode": "vmap" if vmapped else "sequential", "call_seconds_median": median,
                       "plans_per_second_median": batch / median, "plans_per_second_min": batch / max(seconds),
                       "plans_per_second_max": batch / min(seconds)})
    if args.breakdown:
        result.update(breakdown(dyn, model, planner, step_fn, obs.reshape(-1, obs_dim)[0], matmul_dtype, pcfg,
                                args.repeats))
    if args.json:
        print(json.dumps(result))
    else:
        if batch:
            print(f"plan_batch B={batch}: median {median:.3f} s per call = {batch / median:.2f} plans/s "
                  f"({batch / max(seconds):.2f}-{batch / min(seconds):.2f}) over {args.repeats} calls")
        print(f"plan: median {median / plans:.3f} s (min {min(seconds) / plans:.3f}, max {max(seconds) / plans:.3f}) "
              f"over {args.repeats}, compile {compile_seconds:.1f} s, matmul {matmul_dtype}")
        print(f"forward passes: {gflop / plans:.1f} GFLOP/plan -> {achieved:.0f} GFLOP/s achieved")
        print(f"ceiling (batched matmul [{dyn.ensemble_size},{ceiling_rows},{width}]x[{width},{width}]): "
              f"f32 {ceiling_f32:.0f} GFLOP/s, bf16-in/f32-acc {ceiling_bf16:.0f} GFLOP/s; "
              f"ratio to {matmul_dtype} ceiling {achieved / ceiling:.2f}")
        for name, value in result.items():
            if name.startswith("breakdown_"):
                print(f"  {name[10:]}: {value:.4f} s")
        if reference_seconds:
            print(f"without hoisting the constant candidates: median {result['no_hoist_plan_seconds_median']:.3f} s "
                  f"per plan; paired time ratio {result['hoist_time_ratio_median']:.2f} "
                  f"({result['hoist_time_ratio_min']:.2f}-{result['hoist_time_ratio_max']:.2f}), "
                  f"FLOP ratio {result['hoist_flop_ratio']:.2f}")
        print(f"device: {result['device']}; load average {os.getloadavg()}")
    return 0


def breakdown(dyn, model, planner, step_fn, obs, matmul_dtype, pcfg, repeats) -> dict:
    """Median seconds of the pieces of one plan: one model step, one rollout, sampling and the MLP alone."""
    members = dyn.ensemble_size
    rows = pcfg.popsize * pcfg.particles // members
    state = jnp.broadcast_to(obs, (members, rows, obs.shape[0]))
    action = jnp.ones((members, rows, dyn.action_dim), jnp.float32)
    step = jax.jit(step_fn)
    mean_step = jax.jit(functools.partial(step_fn, mean_only=True))
    actions = jnp.broadcast_to(planner.initial_warm_start(), (pcfg.popsize, pcfg.horizon, dyn.action_dim))
    rollout = jax.jit(planner.evaluate)
    noise = jax.jit(lambda key: jax.random.normal(key, (members, rows, dyn.obs_dim + 2)))
    key = jax.random.key(0)
    kappa = jnp.float32(1.0)
    med = lambda fn: statistics.median(timed(fn, repeats))  # noqa: E731
    return {
        "breakdown_model_step": med(lambda: step(model, state, action, key)),
        "breakdown_model_step_mean_only": med(lambda: mean_step(model, state, action, None)),
        "breakdown_step_noise": med(lambda: noise(key)),
        "breakdown_rollout_one_iteration": med(lambda: rollout(key, model, obs, actions, kappa)),
    }


if __name__ == "__main__":
    raise SystemExit(main())
