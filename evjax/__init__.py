"""evjax: safe model-based RL for EV charging prices on a distribution feeder."""

import importlib.util
import os

__version__ = "0.1.0"

# XLA's CUDA graphs leave custom calls out by default, so each of a plan's 60 Mosaic kernel launches
# (planner.kernel auto/mosaic) runs on its own; with them in, one plan on an H200 took 1.44-1.62 ms against
# 1.52-1.70 ms (README, "Benchmarks").
GPU_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


def _has_cuda_plugin() -> bool:
    for name in CUDA_PLUGINS:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:  # the parent package of a dotted name is absent
            pass
    return False


def _set_gpu_xla_flags() -> None:
    """Add ``GPU_COMMAND_BUFFERS`` to ``XLA_FLAGS`` where a JAX CUDA plugin is installed, unless the user set
    ``--xla_gpu_enable_command_buffer`` or ``EVJAX_XLA_FLAGS=keep``. Takes effect only when evjax is imported
    before JAX starts its backend (the CLIs do)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("EVJAX_XLA_FLAGS") == "keep" or "--xla_gpu_enable_command_buffer" in flags:
        return
    if _has_cuda_plugin():
        os.environ["XLA_FLAGS"] = f"{flags} {GPU_COMMAND_BUFFERS}".strip()


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


_set_gpu_xla_flags()
_register_envs()
