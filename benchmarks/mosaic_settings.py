"""Settings of the Mosaic GPU kernel (``planner.kernel: mosaic``) on the planner's model step, against the XLA step.

For each setting (slots, pending, registers, split, approx: ``fused_mlp.MOSAIC_*``)
on a freshly initialised paper-size ensemble with perturbed weights (5 x 4 x 256,
500 samples per member):

* the largest absolute difference of the step's outputs (next_obs, reward, cost,
  std) to the XLA step with bfloat16 hidden products (``planner.hidden_dtype``
  auto on a GPU);
* microseconds per model step, 60 steps chained in one ``lax.scan`` so that the
  call's dispatch is paid once (median and min of ``--repeats`` calls), and the
  ratio to the XLA step timed the same way in the same run. The scan's own
  per-iteration cost is in both, so the kernel's share is better read from a
  profile (``planner.py --profile`` + ``kernel_summary.py``).

Prints one JSON line per setting and writes the fastest agreeing setting (as
``--settings`` spells it) to ``--best FILE``. Needs a Hopper GPU (H100/H200);
on CPU the kernel runs in interpret mode, far too slow for more than a smoke test:

    python benchmarks/mosaic_settings.py [--repeats 30] [--best FILE] [--settings "4,1,0,0,1;3,0,0,2,1"]
        [--rows 500] [--steps 60]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import jax
import jax.numpy as jnp

from common import apply_mosaic_setting, timed
from evjax import dynamics
from evjax.config import Config
from evjax.dynamics import make_dynamics

SETTINGS = "4,1,0,0,1;4,1,1,0,1;4,1,0,0,0;4,0,0,0,1;4,1,0,1,1;3,1,0,2,1;3,0,0,2,1;2,1,0,2,1"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=SETTINGS, help="'slots,pending,registers,split,approx' separated by ';'")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rows", type=int, default=500, help="samples per member of one model step")
    parser.add_argument("--steps", type=int, default=60, help="model steps chained in one timed call")
    parser.add_argument("--best", default=None, metavar="FILE", help="write the fastest agreeing setting here")
    args = parser.parse_args(argv)

    cfg = Config()
    dyn = make_dynamics(cfg.model, cfg.obs_dim, cfg.action_dim)
    model = dyn.init(jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 32))
    model = model.replace(params=jax.tree.map(lambda leaf: leaf + 0.05 * jax.random.normal(next(keys), leaf.shape),
                                              model.params))
    members = dyn.num_planning_members
    obs = jax.random.normal(jax.random.key(2), (members, args.rows, cfg.obs_dim))
    act = jax.random.uniform(jax.random.key(3), (members, args.rows, cfg.action_dim))

    def chain(kernel: str, **settings):
        """(chained steps, one step), both jitted; the chain feeds each step's next_obs to the next."""
        # the un-jitted step: inside dyn.step's own jit the first setting's trace would be reused for all
        step = functools.partial(dynamics.step, key=None, layout=dyn.layout, matmul_dtype="bfloat16",
                                 mean_only=True, kernel=kernel, **settings)

        def run(model, obs, act):
            def body(carry, _):
                prediction = step(model, carry, act)
                return jnp.clip(prediction.next_obs, -5.0, 5.0), prediction.reward.sum()
            return jax.lax.scan(body, obs, None, length=args.steps)

        return jax.jit(run), jax.jit(step)

    def per_step(run) -> dict:
        seconds = timed(lambda: run(model, obs, act), args.repeats)
        return {"median_us": 1e6 * statistics.median(seconds) / args.steps, "min_us": 1e6 * min(seconds) / args.steps}

    run, step = chain("xla", hidden_dtype="bfloat16")
    want = step(model, obs, act)
    xla = per_step(run)
    print(json.dumps({"kernel": "xla", "device": jax.devices()[0].device_kind, "per_step": xla}), flush=True)
    best = None
    for text in [s for s in args.settings.split(";") if s]:
        setting = tuple(int(value) for value in text.split(","))
        apply_mosaic_setting(setting)
        record = {"kernel": "mosaic", "setting": text}
        try:
            run, step = chain("mosaic")
            got = step(model, obs, act)
            record["max_abs_diff"] = [float(jnp.max(jnp.abs(g - w))) for g, w in zip(got, want)]
            record["max_abs"] = [float(jnp.max(jnp.abs(w))) for w in want]
            record["per_step"] = per_step(run)
            record["ratio_to_xla"] = record["per_step"]["median_us"] / xla["median_us"]
        except Exception as exc:  # a setting that does not compile or fit: report it and go on
            record["error"] = f"{type(exc).__name__}: {str(exc)[:1200]}"
        print(json.dumps(record), flush=True)
        agrees = "max_abs_diff" in record and max(record["max_abs_diff"]) < 0.02
        if agrees and (best is None or record["per_step"]["median_us"] < best[0]):
            best = (record["per_step"]["median_us"], text)
    if args.best and best is not None:
        with open(args.best, "w") as handle:
            handle.write(best[1])
    return 0 if best is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
