"""What the benchmark scripts share: a synthetic vocabulary and an RMT model of a given size."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vocab_task(size: int):
    """A stand-in for a fairseq task: only the dictionary is needed to build a model."""
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(size):
        d.add_symbol(str(i))

    class Task:
        source_dictionary = target_dictionary = d

    return Task()


def rmt_model(task, layers: int, dim: int, heads: int = 4, **overrides):
    """An rmt_lm model (FFN 4 x dim, no dropout); overrides are RMTLanguageModelConfig fields."""
    import torch

    from rmt_fairseq.models.rmt_lm import RMTLanguageModel, RMTLanguageModelConfig

    torch.manual_seed(0)
    cfg = dict(decoder_layers=layers, decoder_embed_dim=dim, decoder_attention_heads=heads,
               decoder_ffn_embed_dim=4 * dim, dropout=0.0)
    cfg.update(overrides)
    return RMTLanguageModel.build_model(RMTLanguageModelConfig(**cfg), task)
