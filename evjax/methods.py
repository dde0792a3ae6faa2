"""The evaluation methods of SPEC 12, named once: what each is called, how it plans, which kappa it uses.

``config.py`` checks ``evaluation.methods`` against ``METHODS``, ``evaluate.py``
labels its table and builds its policies from it, and ``agent.py`` builds the
planner variants from the planner mode and kappa given here.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional


class Method(NamedTuple):
    """One row of the evaluation table."""

    name: str  # value in evaluation.methods and in the result files
    label: str  # row label of eval/metrics.md
    planner_mode: Optional[str]  # planner.mode of a method planning on the trained ensemble; None otherwise
    kappa: Optional[Literal["zero", "fixed", "trained"]]  # its fixed kappa: 0, evaluation.fixed_kappa, the agent's


METHODS = (  # the baselines and the trained agent, in table order
    Method("fixed_mid", "fixed mid-range prices", None, None),
    Method("fixed_upper", "fixed upper-bound prices", None, None),
    Method("fixed_tuned", "fixed prices tuned on training days", None, None),
    Method("random", "uniform random prices", None, None),
    Method("cem_unconstrained", "CEM, rewards only", "unconstrained", "zero"),
    Method("ccem", "constrained CEM, no penalty (CCEM)", "ccem", "zero"),
    Method("cap_fixed_kappa", "CAP, fixed kappa", "cap", "fixed"),
    Method("cap_adaptive", "CAP, adaptive kappa (trained agent)", "cap", "trained"),
    Method("forecast_oracle", "forecast oracle: CEM on the true simulator, future arrivals unknown", None, None),
    Method("oracle", "oracle: CEM on the true simulator", None, None),
)
BY_NAME = {method.name: method for method in METHODS}
EVALUATION_METHODS = tuple(BY_NAME)
# evaluated by default: all but the forecast oracle (S times the oracle's work; benchmarks/twin_evaluation.py runs it)
DEFAULT_METHODS = tuple(name for name in EVALUATION_METHODS if name != "forecast_oracle")


def method_kappa(method: Method, fixed_kappa: float, trained_kappa):
    """The kappa a planner method keeps fixed during evaluation (the trained one may be [2], one per constraint)."""
    return {"zero": 0.0, "fixed": fixed_kappa, "trained": trained_kappa}[method.kappa]
