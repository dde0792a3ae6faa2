"""Fixed-capacity replay buffer of real transitions (host side, numpy).

The buffer is a pytree of arrays with a fill counter, so it goes into a
checkpoint as is and comes back bit for bit.
"""

from __future__ import annotations

import numpy as np

FIELDS = ("obs", "action", "reward", "cost", "next_obs")


def empty(capacity: int, obs_dim: int, action_dim: int) -> dict:
    """A buffer for ``capacity`` transitions; ``size`` counts those filled."""
    return {
        "obs": np.zeros((capacity, obs_dim), np.float32),
        "action": np.zeros((capacity, action_dim), np.float32),
        "reward": np.zeros((capacity,), np.float32),
        "cost": np.zeros((capacity,), np.float32),
        "next_obs": np.zeros((capacity, obs_dim), np.float32),
        "size": np.zeros((), np.int64),
    }


def add(buffer: dict, obs, action, reward, cost, next_obs) -> None:
    """Append one transition in place; a full buffer is an error (its capacity covers the whole run)."""
    i = int(buffer["size"])
    if i >= len(buffer["reward"]):
        raise ValueError(f"replay buffer full ({i} transitions)")
    for name, value in zip(FIELDS, (obs, action, reward, cost, next_obs)):
        buffer[name][i] = value
    buffer["size"] = np.asarray(i + 1, np.int64)


def contents(buffer: dict) -> tuple[np.ndarray, ...]:
    """The filled part: (obs, action, reward, cost, next_obs)."""
    n = int(buffer["size"])
    return tuple(buffer[name][:n] for name in FIELDS)
