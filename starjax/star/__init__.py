"""STaR: the bootstrapping loop (generate, filter, rationalize, fine-tune from base, evaluate)."""

from starjax.star.config import STaRConfig, finetune_steps
from starjax.star.loop import STaR, params_hash

__all__ = ["STaR", "STaRConfig", "finetune_steps", "params_hash"]
