"""The pricing agent around the CEM planner: warm start, adaptive CAP multiplier, exploration (SPEC 10).

Host side, not jittable: the agent keeps mutable state between environment
steps (the warm start, kappa and its Adam state, whether the model is fitted)
and calls the jitted ``planner.plan`` once per step.

Planner variants differ only by config (``planner.mode``, ``planner.learn_kappa``,
``planner.kappa_init``); ``planner_variant`` maps an evaluation method of
``evjax.methods.METHODS`` (its planner mode and kappa rule) onto them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evjax.config import EvaluationConfig, PlannerConfig
from evjax.methods import Method, method_kappa
from evjax.planner import Planner


class AgentState(NamedTuple):
    """Everything the agent carries between steps and episodes; a pytree for checkpoints."""

    kappa: jax.Array  # [] CAP multiplier, or [2] (line, carbon) with planner.kappa_per_constraint (float32, >= 0)
    kappa_opt_state: Any  # optax Adam state of kappa
    warm_start: jax.Array  # [H, A] next plan's initial mean
    fitted: jax.Array  # [] bool: the model has been fitted, so act by planning


def initial_kappa(planner_cfg: PlannerConfig) -> float:
    """kappa0: ``kappa_init`` for the CAP mode, 0 for ``ccem`` and ``unconstrained`` (no penalty)."""
    return planner_cfg.kappa_init if planner_cfg.mode == "cap" else 0.0


def kappa_shape(planner_cfg: PlannerConfig) -> tuple[int, ...]:
    """() for one kappa, (2,) for one per constraint (line, carbon)."""
    return (2,) if planner_cfg.kappa_per_constraint else ()


def planner_variant(planner_cfg: PlannerConfig, method: Method, fixed_kappa: float, trained_kappa: float,
                    evaluation: Optional[EvaluationConfig] = None) -> PlannerConfig:
    """The planner config of evaluation ``method``: its planner mode, kappa held fixed by its kappa rule, and the
    deployment settings of ``evaluation`` (``EvaluationConfig.DEPLOYED``: cost limit, prior, back-off, pessimism,
    particle noise, variance cap) in place of the trained ones where they are set (not None).

    With one kappa per constraint ``kappa_init`` holds their mean; pass the
    method's kappa (``method_kappa``) to ``Agent`` to plan with both.
    """
    if method.planner_mode is None:
        raise ValueError(f"method {method.name!r} does not plan on the model")
    kappa = float(np.mean(method_kappa(method, fixed_kappa, trained_kappa)))
    return deployed_planner(dataclasses.replace(planner_cfg, mode=method.planner_mode, kappa_init=kappa), evaluation)


def deployed_planner(planner_cfg: PlannerConfig, evaluation: Optional[EvaluationConfig] = None) -> PlannerConfig:
    """``planner_cfg`` as deployed: kappa held fixed and the settings of ``evaluation.DEPLOYED`` that are set."""
    deployed = {} if evaluation is None else {
        name: getattr(evaluation, name) for name in EvaluationConfig.DEPLOYED if getattr(evaluation, name) is not None}
    return dataclasses.replace(planner_cfg, learn_kappa=False, **deployed)


class Agent:
    """Posts prices: uniform random before the first model fit, then constrained CEM plans.

    Host side, not jittable. ``act`` plans with the current kappa and stores the
    shifted warm start; ``end_episode`` adapts kappa; ``reset_episode`` restarts
    the warm start at mid-range; ``state``/``restore`` export and load the
    ``AgentState`` pytree for checkpoints.
    """

    def __init__(self, planner_cfg: PlannerConfig, planner: Planner, kappa=None):
        if planner.mode != planner_cfg.mode:
            raise ValueError(f"planner.mode {planner_cfg.mode!r} does not match the planner's mode {planner.mode!r}")
        self.planner = planner
        self.learns_kappa = planner_cfg.learn_kappa and planner_cfg.mode == "cap"
        self.per_constraint = planner_cfg.kappa_per_constraint
        self.permissible_episode_cost = planner_cfg.permissible_episode_cost
        self.permissible_constraint_costs = np.asarray(planner_cfg.permissible_constraint_costs, np.float32)
        self._optimizer = optax.adam(planner_cfg.kappa_lr)
        if kappa is None:
            kappa = initial_kappa(planner_cfg)
        kappa = jnp.broadcast_to(jnp.asarray(kappa, jnp.float32), kappa_shape(planner_cfg))
        self._state = AgentState(kappa=kappa, kappa_opt_state=self._optimizer.init(kappa),
                                 warm_start=planner.initial_warm_start(), fitted=jnp.asarray(False))
        self.last_diagnostics: Optional[dict] = None  # the last plan's diagnostics (None after a random action)

    @property
    def kappa(self) -> np.ndarray:
        """The current kappa: a 0-d array (``float(agent.kappa)`` works), or [2] (line, carbon) per constraint."""
        return np.asarray(self._state.kappa, dtype=np.float64)

    def kappa_log(self) -> dict:
        """The kappa values by name, for metrics: ``kappa``, and with one per constraint ``kappa_line``, ``kappa_carbon``."""
        kappa = self.kappa
        if kappa.ndim == 0:
            return {"kappa": float(kappa)}
        return {"kappa": float(kappa.mean()), "kappa_line": float(kappa[0]), "kappa_carbon": float(kappa[1])}

    @property
    def fitted(self) -> bool:
        return bool(self._state.fitted)

    def mark_fitted(self) -> None:
        """From now on ``act`` plans with the model (call after the first model fit)."""
        self._state = self._state._replace(fitted=jnp.asarray(True))

    def random_action(self, key: jax.Array) -> np.ndarray:
        """Uniform random prices in the bounds, [A]; the same key gives the same prices."""
        lower, upper = self.planner.price_lower, self.planner.price_upper
        return np.asarray(jax.random.uniform(key, lower.shape, jnp.float32, lower, upper), dtype=np.float64)

    def act(self, key: jax.Array, model: Any, obs, explore: bool = False) -> np.ndarray:
        """Prices to post now, [A] (float64): random before the model is fitted or with ``explore``, else the plan's
        first action.

        Planning replaces the warm start with the plan's shifted mean and stores
        the plan's diagnostics (python floats, with kappa) in ``last_diagnostics``.
        """
        if explore or not self.fitted:
            self.last_diagnostics = None
            return self.random_action(key)
        action, warm_start, diagnostics = self.planner.plan(key, model, obs, self._state.warm_start,
                                                            self._state.kappa)
        self._state = self._state._replace(warm_start=warm_start)
        self.last_diagnostics = {name: float(value) for name, value in diagnostics._asdict().items()}
        self.last_diagnostics.update(self.kappa_log())
        return np.asarray(action, dtype=np.float64)

    def end_episode(self, episode_cost: float, constraint_costs=None) -> np.ndarray:
        """Adapt kappa to the episode's true cost C and return the new kappa.

        One Adam step (lr ``kappa_lr``) on the loss -kappa * (C - C_perm), whose
        gradient -(C - C_perm) raises kappa after an episode costlier than the
        permissible C_perm and lowers it otherwise; kappa is then clipped at 0.
        With one kappa per constraint, ``constraint_costs`` = (line, carbon)
        episode costs, each kappa against its own permissible cost
        (``planner.permissible_constraint_costs``).
        Without ``learn_kappa`` (or outside the CAP mode) kappa stays fixed.
        """
        episode_cost = float(episode_cost)
        if not math.isfinite(episode_cost):
            raise ValueError(f"episode cost must be finite, got {episode_cost}")
        if not self.learns_kappa:
            return self.kappa
        if self.per_constraint:
            if constraint_costs is None:
                raise ValueError("one kappa per constraint needs the episode's (line, carbon) costs")
            costs = np.asarray(constraint_costs, np.float32)
            if costs.shape != (2,) or not np.all(np.isfinite(costs)):
                raise ValueError(f"constraint costs must be two finite numbers, got {constraint_costs}")
            gradient = jnp.asarray(-(costs - self.permissible_constraint_costs), jnp.float32)
        else:
            gradient = jnp.asarray(-(episode_cost - self.permissible_episode_cost), jnp.float32)
        updates, opt_state = self._optimizer.update(gradient, self._state.kappa_opt_state, self._state.kappa)
        kappa = jnp.maximum(optax.apply_updates(self._state.kappa, updates), 0.0)
        self._state = self._state._replace(kappa=kappa, kappa_opt_state=opt_state)
        return self.kappa

    def reset_episode(self) -> None:
        """Start the next episode's first plan from mid-range prices."""
        self._state = self._state._replace(warm_start=self.planner.initial_warm_start())

    def state(self) -> AgentState:
        """The agent's state as a pytree of arrays (for checkpoints)."""
        return self._state

    def restore(self, state: Any) -> None:
        """Load a state exported by ``state`` (arrays may be numpy, as restored by orbax).

        The leaves must match this agent's in number and shape; a mismatch
        (another horizon or action size) raises ``ValueError``.
        """
        template_leaves, structure = jax.tree.flatten(self._state)
        leaves = jax.tree.leaves(state)
        if len(leaves) != len(template_leaves):
            raise ValueError(f"agent state has {len(leaves)} arrays, expected {len(template_leaves)}")
        restored = []
        for index, (leaf, template) in enumerate(zip(leaves, template_leaves)):
            leaf = jnp.asarray(leaf, dtype=template.dtype)
            if leaf.shape != template.shape:
                raise ValueError(f"agent state array {index} has shape {leaf.shape}, expected {template.shape}")
            restored.append(leaf)
        self._state = jax.tree.unflatten(structure, restored)
