"""Text generation with Llama-family decoders: a KV-cache decoder and token sampling.

    from jaxtrain.generate import Generator, SamplingConfig

    gen = Generator(cfg, params, pad_id=tokenizer.pad_token_id, max_context=2048)
    [c] = gen.generate([prompt_ids], SamplingConfig(max_new_tokens=64, eos_ids=(eos,)))
    c.tokens, c.finish_reason                  # new token ids (stop token kept), 'stop'|'length'

:mod:`jaxtrain.generate.decode` runs the batched, bucketed, jitted decoding on a mesh;
:mod:`jaxtrain.generate.sampling` holds the pure sampling functions (temperature, top-k, top-p).
"""

from jaxtrain.generate.decode import Completion, Generator, SamplingConfig, decode_config
from jaxtrain.generate.sampling import (
    apply_temperature,
    filter_logits,
    sample,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "Completion", "Generator", "SamplingConfig", "apply_temperature", "decode_config",
    "filter_logits", "sample", "top_k_filter", "top_p_filter",
]
