"""Generation: KV cache, sampling, beam search and the engine (token ids in, token ids out)."""

from haina.generate.cache import KVCache
from haina.generate.engine import Engine, GenerationResult, StepEvent, TokenLogprob
from haina.generate.sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "KVCache", "SamplingParams", "StepEvent", "TokenLogprob"]
