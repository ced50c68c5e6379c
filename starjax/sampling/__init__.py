"""Fast sharded sampling: jitted prefill + on-device while_loop decode, K samples per prompt."""

from starjax.sampling.core import DecodeConfig, filter_logits
from starjax.sampling.sampler import Completion, SampleOutput, generate_text, generate_tokens

__all__ = ["Completion", "DecodeConfig", "SampleOutput", "filter_logits", "generate_text",
           "generate_tokens"]
