"""The registered size presets, resolved through fairseq's own argument parsing, and their overrides."""

import pytest
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import user_dir  # noqa: F401


def resolve(*args):
    parser = options.get_training_parser()
    a = options.parse_args_and_arch(parser, ["DATA", "--user-dir", "user_dir", "--task", "rmt_lm",
                                             "--criterion", "rmt_cross_entropy", *map(str, args)])
    return convert_namespace_to_omegaconf(a)


WT103 = dict(decoder_layers=16, decoder_embed_dim=410, decoder_attention_heads=10, decoder_ffn_embed_dim=2100,
             dropout=0.1, adaptive_softmax_cutoff="20000,40000,200000")
ENWIK8 = dict(decoder_layers=12, decoder_embed_dim=512, decoder_attention_heads=8, decoder_ffn_embed_dim=2048)


@pytest.mark.parametrize("arch,model,segment", [
    ("rmt_wt103", dict(WT103, mem_tokens=10, mem_len=0), 150),
    ("transformer_xl_wt103", dict(WT103, mem_tokens=0, mem_len=150), 150),
    ("rmt_enwik8", dict(ENWIK8, mem_tokens=10, mem_len=0), 512),
    ("transformer_xl_enwik8", dict(ENWIK8, mem_tokens=0, mem_len=512), 512),
    ("rmt_tiny", dict(decoder_layers=2, decoder_embed_dim=64, mem_tokens=4), 32),
])
def test_presets(arch, model, segment):
    cfg = resolve("--arch", arch)
    for k, v in model.items():
        assert cfg.model[k] == v, (arch, k)
    assert cfg.task.tokens_per_sample == segment
    assert cfg.model.tokens_per_sample == segment  # linked to the task's value, not copied


def test_every_field_overridable_with_transformer_lm_flag_names():
    cfg = resolve("--arch", "rmt_wt103", "--decoder-layers", 3, "--decoder-embed-dim", 64,
                  "--decoder-ffn-embed-dim", 96, "--decoder-attention-heads", 4, "--dropout", 0.3,
                  "--attention-dropout", 0.2, "--mem-tokens", 0, "--mem-len", 7, "--tokens-per-sample", 20)
    m = cfg.model
    assert (m.decoder_layers, m.decoder_embed_dim, m.decoder_ffn_embed_dim, m.decoder_attention_heads) == (3, 64, 96, 4)
    assert (m.dropout, m.attention_dropout, m.mem_tokens, m.mem_len) == (0.3, 0.2, 0, 7)
    assert cfg.task.tokens_per_sample == 20 == m.tokens_per_sample


def test_memory_is_on_by_default():
    assert resolve("--arch", "rmt_lm").model.mem_tokens == 10
    assert resolve("--arch", "rmt_lm").task.bptt_unroll == 1
