"""The planner on a GPU, XLA path and fused Pallas kernels side by side: one plan and batched plans.

At the paper's settings with a freshly initialised ensemble (as ``planner.py``):

1. the kernel alone on one model step's shape [E, N*P/E] ([E, N] without particle noise) for each (tile, warps,
   chunk) of a small sweep, against the XLA step (max abs difference) and its
   time; the fastest setting that compiles and agrees is used below;
2. seconds per plan (``plan_fn``) and plans per second of ``plan_batch`` at
   B = 64 and 256, for each ``planner.kernel`` of ``--kernels`` (``pallas_layers`` once per block
   setting of ``--layer-settings``, ``mosaic`` once per setting of ``--mosaic-settings``), interleaved with the
   ceiling of a chain of batched bf16 matmuls of the hidden layers' shape
   [E, N*P/E*B, 256] x [E, 256, 256] measured in the same run.

Prints one JSON line per measurement as it goes (so a timeout keeps what was
done) and a summary line last. About 2-3 minutes on an H100/H200.

    python benchmarks/gpu_planner.py [--repeats 20] [--batches 64,256] [--quick] [--kernels xla,mosaic,pallas]
        [--layer-settings "64,128,64,4,3;32,128,64,4,3"] [--mosaic-settings "3,0,0,2,1;4,1,0,0,1"]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from common import apply_mosaic_setting, make_matmul_chain, timed
from evjax import dynamics, fused_mlp
from evjax.config import Config
from evjax.dynamics import make_dynamics
from evjax.planner import make_model_planner, rollout_particles_per_member

SWEEP = ((64, 4, 64), (64, 8, 64), (128, 4, 64), (128, 8, 64), (32, 4, 64), (64, 4, 32), (128, 8, 32),
         (64, 4, 0), (128, 8, 0))  # (tile, num_warps, chunk); chunk 0 = whole layers (the first version)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def spread(seconds: list[float]) -> dict:
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def sweep_kernel(dyn, model, rows: int, repeats: int) -> tuple[int, int, int] | None:
    """Time the kernel alone on [E, rows] per (tile, warps, chunk); return the fastest that matches the XLA step."""
    members = dyn.num_planning_members
    obs = jax.random.normal(jax.random.key(1), (members, rows, dyn.obs_dim))
    act = jax.random.uniform(jax.random.key(2), (members, rows, dyn.action_dim))
    xla_step = jax.jit(functools.partial(dyn.step, key=None, matmul_dtype="bfloat16", mean_only=True))
    want = xla_step(model, obs, act)
    xla_seconds = spread(timed(lambda: xla_step(model, obs, act), repeats))
    emit({"what": "model_step", "kernel": "xla", "rows_per_member": rows, "seconds": xla_seconds})
    best = None
    for tile, warps, chunk in SWEEP:
        fused_mlp.DEFAULT_TILE, fused_mlp.DEFAULT_NUM_WARPS, fused_mlp.DEFAULT_CHUNK = tile, warps, chunk
        # the un-jitted step: inside dyn.step's own jit the first setting's trace would be reused for all
        step = jax.jit(functools.partial(dynamics.step, key=None, layout=dyn.layout, matmul_dtype="bfloat16",
                                         mean_only=True, kernel="pallas"))
        try:
            got = step(model, obs, act)
            error = max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(got, want))
            seconds = spread(timed(lambda: step(model, obs, act), repeats))
        except Exception as exc:  # a tile Triton cannot compile: report it and go on
            emit({"what": "model_step", "kernel": "pallas", "tile": tile, "num_warps": warps, "chunk": chunk,
                  "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        emit({"what": "model_step", "kernel": "pallas", "tile": tile, "num_warps": warps, "chunk": chunk,
              "rows_per_member": rows, "seconds": seconds, "max_abs_diff_vs_xla": error})
        if error < 5e-2 and (best is None or seconds["median"] < best[0]):
            best = (seconds["median"], tile, warps, chunk)
    return None if best is None else best[1:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", default="64,256", help="comma-separated batch sizes for plan_batch")
    parser.add_argument("--quick", action="store_true", help="skip the tile sweep (use the module defaults)")
    parser.add_argument("--kernels", default="xla,mosaic",
                        help="comma-separated planner.kernel values (mosaic needs a Hopper GPU)")
    parser.add_argument("--layer-settings", default="64,128,64,4,3",
                        help="pallas_layers blocks: 'BM,BN,BK,warps,stages' separated by ';' (fused_mlp.LAYER_*)")
    parser.add_argument("--mosaic-settings", default="",
                        help="mosaic kernel: 'slots,pending,registers,split,approx' separated by ';' "
                             "(fused_mlp.MOSAIC_SLOTS, MOSAIC_PENDING, MOSAIC_A_FROM_REGISTERS, MOSAIC_SPLIT, "
                             "MOSAIC_APPROX_MATH; 0/1 for the flags); default: the module's settings")
    parser.add_argument("--particle-noise", choices=("true", "false"), default=None,
                        help="planner.particle_noise (default: the config's; true steps P/E particles per member)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    started = time.perf_counter()

    cfg = Config()
    if args.particle_noise is not None:
        cfg = dataclasses.replace(cfg, planner=dataclasses.replace(
            cfg.planner, particle_noise=args.particle_noise == "true"))
    pcfg = cfg.planner
    dyn = make_dynamics(cfg.model, cfg.obs_dim, cfg.action_dim)
    model = dyn.init(jax.random.key(0))
    rows = pcfg.popsize * rollout_particles_per_member(pcfg, dyn.num_planning_members)  # samples per member stepped
    device = jax.devices()[0].device_kind
    emit({"what": "device", "device": device, "backend": jax.default_backend(), "jax": jax.__version__,
          "particle_noise": pcfg.particle_noise, "rows_per_member": rows})

    kernels = [k for k in args.kernels.split(",") if k]
    settings = {name: [tuple(int(v) for v in setting.split(",")) for setting in text.split(";") if setting]
                for name, text in (("pallas_layers", args.layer_settings), ("mosaic", args.mosaic_settings))}
    best = None if args.quick or "pallas" not in kernels else sweep_kernel(dyn, model, rows, args.repeats)
    if best is not None:
        fused_mlp.DEFAULT_TILE, fused_mlp.DEFAULT_NUM_WARPS, fused_mlp.DEFAULT_CHUNK = best
    choice = {"tile": fused_mlp.DEFAULT_TILE, "num_warps": fused_mlp.DEFAULT_NUM_WARPS,
              "chunk": fused_mlp.DEFAULT_CHUNK}
    emit({"what": "kernel_choice", **choice, "swept": best is not None})

    summary = {"device": device, "jax": jax.__version__, **choice}
    ceilings = {}
    for batch in [1] + batches:
        run, flops = make_matmul_chain(dyn.num_planning_members, rows * batch, cfg.model.hidden_sizes[0],
                                       jnp.bfloat16)
        ceilings[batch] = (run, flops)
    variants = [(kernel, setting) for kernel in kernels
                for setting in settings.get(kernel) or [None]]
    for kernel, setting in variants:
        if kernel == "pallas_layers" and setting is not None:
            (fused_mlp.LAYER_BLOCK_M, fused_mlp.LAYER_BLOCK_N, fused_mlp.LAYER_BLOCK_K, fused_mlp.LAYER_NUM_WARPS,
             fused_mlp.LAYER_NUM_STAGES) = setting
        elif kernel == "mosaic" and setting is not None:
            apply_mosaic_setting(setting)
        name = kernel if setting is None else f"{kernel}_" + "_".join(map(str, setting))
        kernel_cfg = dataclasses.replace(cfg, planner=dataclasses.replace(pcfg, kernel=kernel))
        try:  # a fresh dyn: its jitted step is traced anew with this variant's settings (not reused from the last)
            planner = make_model_planner(kernel_cfg, make_dynamics(cfg.model, cfg.obs_dim, cfg.action_dim))
        except ValueError as exc:
            emit({"what": "plan", "kernel": name, "error": str(exc)})
            continue
        for batch in [1] + batches:
            obs = np.random.default_rng(batch).normal(size=(batch, cfg.obs_dim))
            if cfg.env.time_features:
                obs[:, -1] = 0.0  # the episode's first step: the full horizon is planned
            obs = jnp.asarray(obs, jnp.float32)
            warm = jnp.broadcast_to(planner.initial_warm_start(), (batch, pcfg.horizon, cfg.action_dim))
            kappa = jnp.full((batch,), pcfg.kappa_init, jnp.float32)
            if batch == 1:
                fn, make_key, args_ = planner.plan_fn, (lambda key: key), (obs[0], warm[0], kappa[0])
            else:
                fn = planner.plan_batch_fn  # vmapped on a GPU
                make_key, args_ = functools.partial(jax.random.split, num=batch), (obs, warm, kappa)
            try:
                start = time.perf_counter()
                compiled = jax.jit(fn).lower(make_key(jax.random.key(0)), model, *args_).compile()
                compile_seconds = time.perf_counter() - start
                keys = [make_key(k) for k in jax.random.split(jax.random.key(1), args.repeats + 1)]
                key_iter = iter(keys)
                run, flops = ceilings[batch]
                jax.block_until_ready(compiled(next(key_iter), model, *args_))
                jax.block_until_ready(run())
                seconds, ceiling_seconds = [], []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    jax.block_until_ready(compiled(next(key_iter), model, *args_))
                    seconds.append(time.perf_counter() - start)
                    ceiling_seconds.append(min(timed(run, 2)))
            except Exception as exc:
                emit({"what": "plan", "kernel": name, "batch": batch,
                      "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                traceback.print_exc(file=sys.stderr)
                continue
            median = statistics.median(seconds)
            record = {"what": "plan", "kernel": name, "batch": batch, "compile_seconds": compile_seconds,
                      "call_seconds": spread(seconds), "plan_ms_median": 1e3 * median / batch,
                      "plans_per_second_median": batch / median,
                      "plans_per_second_range": [batch / max(seconds), batch / min(seconds)],
                      "ceiling_bf16_gflops": flops / statistics.median(ceiling_seconds) / 1e9,
                      "ceiling_shape": [dyn.num_planning_members, rows * batch, cfg.model.hidden_sizes[0]]}
            emit(record)
            summary[f"{name}_b{batch}"] = {"plan_ms": record["plan_ms_median"],
                                             "plans_per_second": record["plans_per_second_median"]}
    summary["wall_seconds"] = time.perf_counter() - started
    emit({"what": "summary", **summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
