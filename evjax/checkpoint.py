"""Orbax checkpoints of a whole training run: "latest" for resuming, "best" for evaluation.

Host side, not jittable. A checkpoint is one orbax step directory holding two
items: ``state`` (a pytree of arrays: model, agent, replay buffer, RNG key,
epoch) and ``meta`` (JSON: the resolved config and small host-side facts).
Orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-write leaves the previous step intact and readable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from evjax.config import Config, from_dict, to_dict
from evjax.errors import ConfigError, UserError

logging.getLogger("absl").setLevel(logging.CRITICAL)  # orbax logs what our one-line errors already say


def _manager(run_dir: Path, kind: str, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(run_dir).resolve() / "checkpoints" / kind, options=options,
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})


def save(run_dir: Path, kind: str, epoch: int, state: Any, cfg: Config, meta: dict | None = None) -> None:
    """Write ``state`` (pytree) and the resolved config as checkpoint ``kind`` at ``epoch``."""
    meta = {"config": to_dict(cfg), "epoch": int(epoch), **(meta or {})}
    state = jax.tree.map(np.asarray, state)
    with _manager(run_dir, kind, create=True) as manager:
        manager.save(int(epoch), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()


def exists(run_dir: Path, kind: str) -> bool:
    path = Path(run_dir) / "checkpoints" / kind
    if not path.is_dir():
        return False
    with _manager(run_dir, kind, create=False) as manager:
        return manager.latest_step() is not None


def restore_meta(run_dir: Path, kind: str) -> tuple[dict, Config]:
    """The JSON metadata and the resolved config of the newest ``kind`` checkpoint."""
    path = Path(run_dir) / "checkpoints" / kind
    if not exists(run_dir, kind):
        raise UserError(f"{path}: no checkpoint found")
    try:
        with _manager(run_dir, kind, create=False) as manager:
            step = manager.latest_step()
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as exc:  # orbax raises assorted types for damaged files
        raise UserError(f"{path}: corrupt checkpoint ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})") from None
    try:
        cfg = from_dict(meta["config"])
    except (ConfigError, KeyError) as exc:
        raise UserError(f"{path}: checkpoint config unusable ({exc})") from None
    return meta, cfg


def restore(run_dir: Path, kind: str, template: Any) -> Any:
    """Restore the newest ``kind`` state into the structure and shapes of ``template``.

    A shape that differs from the template (a config that does not match the run)
    is reported naming the pytree key.
    """
    path = Path(run_dir) / "checkpoints" / kind
    if not exists(run_dir, kind):
        raise UserError(f"{path}: no checkpoint found")
    template = jax.tree.map(np.asarray, template)
    with _manager(run_dir, kind, create=False) as manager:
        step = manager.latest_step()
        try:
            stored = manager.item_metadata(step)["state"]
        except Exception as exc:
            raise UserError(f"{path}: corrupt checkpoint ({exc.__class__.__name__})") from None
        _check_shapes(stored, template, path)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template)))
        except Exception as exc:
            raise UserError(f"{path}: corrupt checkpoint ({exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0][:200]})") from None
    return jax.tree.map(np.asarray, restored["state"])


def _check_shapes(stored: Any, template: Any, path: Path) -> None:
    if stored is None:
        raise UserError(f"{path}: corrupt checkpoint (no state metadata)")
    stored_leaves = {_path_name(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored)}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(template):
        key = _path_name(key_path)
        if key not in stored_leaves:
            raise UserError(f"{path}: checkpoint has no entry {key}; the config does not match this run")
        shape = tuple(getattr(stored_leaves[key], "shape", ()))
        if shape != tuple(np.shape(leaf)):
            raise UserError(f"{path}: entry {key} has shape {shape} in the checkpoint but {tuple(np.shape(leaf))} "
                            f"under the current config")


def _path_name(path) -> str:
    """'agent/kappa' for a pytree path, whether its nodes are dicts, attributes or sequences."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
