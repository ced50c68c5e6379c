"""Quiet-STaR (Zelikman et al., 2024): thoughts at every position, trained with REINFORCE.

Modules: `config` (QuietStarConfig), `attention` (diagonal thought attention), `forward` (base pass
and parallel thought/talk steps), `sampling` (keys, thought sampling, shard_map/vmap layout),
`objective` (parameters, mixing head, losses), `inference` (thought-augmented generation with a KV
cache; command line `python -m starjax.quiet_star.generate`).
"""

from starjax.quiet_star.attention import dense_thought_attention, thought_attention
from starjax.quiet_star.config import QuietStarConfig
from starjax.quiet_star.forward import BaseOutputs, ThoughtOutputs, base_pass, thought_pass
from starjax.quiet_star.inference import (
    ThoughtSamples,
    generate_text_with_thoughts,
    generate_with_thoughts,
)
from starjax.quiet_star.objective import (
    advantages,
    init_params,
    mix_logits,
    mixing_weight,
    quiet_star_cells,
    quiet_star_loss,
    reduce_cells,
)
from starjax.quiet_star.sampling import sample_thoughts

__all__ = [
    "BaseOutputs", "QuietStarConfig", "ThoughtOutputs", "ThoughtSamples", "advantages",
    "base_pass", "dense_thought_attention", "generate_text_with_thoughts",
    "generate_with_thoughts", "init_params", "mix_logits", "mixing_weight", "quiet_star_cells",
    "quiet_star_loss", "reduce_cells", "sample_thoughts", "thought_attention", "thought_pass",
]
