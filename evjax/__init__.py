"""evjax: safe model-based RL for EV charging prices on a distribution feeder."""

__version__ = "0.1.0"


def _register_envs() -> None:
    """Register ``evjax/EVPricing-v0`` with gymnasium (episode length from the default config)."""
    import gymnasium

    from evjax.config import Config

    if "evjax/EVPricing-v0" not in gymnasium.registry:
        gymnasium.register(
            id="evjax/EVPricing-v0",
            entry_point="evjax.env:EVPricingEnv",
            max_episode_steps=Config().env.episode_steps,
        )


_register_envs()
