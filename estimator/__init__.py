"""estimator: memory and FLOPs of one training step, estimated instantly and checked for real.

The analytic API never imports torch::

    from estimator import load_config, estimate
    result = estimate(load_config())          # the seed's example: B=2, D=4, 2 layers, AdaGrad
    result.memory.total, result.flops.per_step   # 496 bytes, 432 FLOPs
"""

from estimator.nogc import gc_paused
from estimator.startup import pydantic_plugins_off

with gc_paused(), pydantic_plugins_off():  # no plugin scan, no collections of what the imports make (startup.py)
    from estimator.api import Estimate, compare, estimate
    from estimator.config import Config
    from estimator.errors import EstimatorError
    from estimator.families import mlp as _mlp  # noqa: F401  (registers the built-in families)
    from estimator.loader import load_config

__all__ = ["Config", "Estimate", "EstimatorError", "compare", "estimate", "load_config"]
__version__ = "0.1.0"
