"""evjax: safe model-based RL for EV charging prices on a distribution feeder."""

__version__ = "0.1.0"
