"""Deploy a run with another model, fitted on the run's own data: learn with one model, plan with another.

Restores a run's checkpoint (``--checkpoint``: "best", else "latest"; or "latest"), fits a fresh ensemble
of the run's model section with the ``--set model.*`` overrides (``model.linear_ridge=0``, say: the network
alone) on the checkpoint's replay buffer, on the training schedule (a fit after every
``training.model_train_freq`` transitions, each warm-started from the last, on the buffer as it was then), and
writes a run directory ``--out`` whose "best"
checkpoint holds that model with the run's kappa and buffer, and whose config carries the overrides.
``python -m evjax.evaluate --run-dir OUT`` then deploys it like any trained run.

    python benchmarks/shadow_model.py --run-dir RUN --out OUT --set model.linear_ridge=0
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import jax

from evjax import checkpoint, replay
from evjax import evaluate as ev
from evjax.cli import entry_point
from evjax.config import load
from evjax.errors import ConfigError, UserError


def shadow_fit(run_dir: Path, out: Path, overrides: list[str], seed: int = 0, which: str = "best") -> dict:
    """Fit the shadow model on the run's buffer prefixes and save it as ``out``'s "best" checkpoint."""
    from evjax.train import Trainer

    others = [o.split("=")[0] for o in overrides if not o.strip().startswith("model.")]
    if others:
        raise ConfigError(f"config key '{others[0]}': the shadow model takes model.* settings only")
    cfg, trained, kind, epoch, _ = ev._load_trained(run_dir, which)
    shadow_cfg = load(None, overrides, base=cfg)
    shadow = Trainer(shadow_cfg, out, metrics=False)
    shadow.state.update({k: v for k, v in trained.state.items() if k != "model"})  # kappa and buffer as trained
    buffer = replay.contents(shadow.state["buffer"])
    size, freq = len(buffer[0]), cfg.training.model_train_freq
    if size < freq:
        raise UserError(f"{run_dir}: the checkpoint's replay buffer holds {size} transitions, fewer than one fit")
    model, key, tic = shadow.state["model"], jax.random.key(seed), time.perf_counter()
    for rows in range(freq, size + 1, freq):
        key, sub = jax.random.split(key)
        model, _ = shadow.parts.dynamics.fit(sub, model, *[x[:rows] for x in buffer])
    shadow.state["model"] = model
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("metrics.csv", "calibration.csv"):  # the training curves of the run that gathered the data
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, out / name)
    checkpoint.save(out, "best", epoch, shadow.state, shadow_cfg, {"shadow_of": str(run_dir), "kind": kind})
    return {"epoch": epoch, "transitions": size, "fits": size // freq, "seconds": time.perf_counter() - tic}


@entry_point("benchmarks.shadow_model")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="trained run whose data the model is fitted on")
    parser.add_argument("--out", type=Path, required=True, help="run directory to write (replaced)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model.* override of the shadow model (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shadow fits")
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                        help="the run's checkpoint whose buffer and kappa are taken (default best)")
    args = parser.parse_args(argv)
    if args.out.resolve() == args.run_dir.resolve():
        raise UserError("--out must differ from --run-dir")
    info = shadow_fit(args.run_dir, args.out, args.overrides, args.seed, args.checkpoint)
    print(f"{args.out}: shadow model of epoch {info['epoch']}, {info['fits']} fits on {info['transitions']} "
          f"transitions in {info['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
