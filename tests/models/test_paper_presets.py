"""Paper fidelity of the WikiText-103 and enwik8 presets (issue: "the presets and evaluation reproduce the authors'
Transformer-XL/RMT configuration exactly").

The authors' values are written here as data, each with the file of booydar/LM-RMT (pytorch/, Transformer-XL's code
with memory tokens) it comes from. Each preset is built through fairseq's own parser and every field compared; the
commands of examples/*/run.sh (train, eval, eval-xl) are compared through examples/paper_hparams.py, whose table in
the examples' READMEs must equal what the code gives."""

import os

import pytest
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import user_dir  # noqa: F401
from helpers import REPO, load_script

# run_wt103_base.sh / run_enwik8_base.sh (train), train.py (defaults, weights_init, cutoffs), mem_transformer.py
# (PositionwiseFF: Linear, ReLU, Dropout(dropout), Linear, Dropout(dropout); memory dropout; read_mem_from_cache)
AUTHORS_WT103 = dict(n_layer=16, d_model=410, n_head=10, d_head=41, d_inner=2100, dropout=0.1, ffn_dropout=0.1,
                     dropatt=0.0, init="normal", init_std=0.02, init_range=0.1, proj_init_std=0.01, adaptive=True,
                     cutoffs="20000,40000,200000", div_val=1, tied=True, tie_projs="F,T,T,T", output_bias=True,
                     tgt_len=150, same_length=False, clamp_len=-1, read_mem_from_cache=False, memory_dropout=True)
AUTHORS_ENWIK8 = dict(n_layer=12, d_model=512, n_head=8, d_head=64, d_inner=2048, dropout=0.1, ffn_dropout=0.1,
                      dropatt=0.0, init="normal", init_std=0.02, init_range=0.1, proj_init_std=0.01, adaptive=False,
                      cutoffs="-", div_val=1, tied=True, tie_projs="F", output_bias=True, tgt_len=512,
                      same_length=False, clamp_len=-1, read_mem_from_cache=False, memory_dropout=True)
# the memory of each preset: XL base scripts run mem_len = tgt_len; the RMT presets' default is 10 memory tokens
PRESETS = {"transformer_xl_wt103": (AUTHORS_WT103, dict(mem_len=150, num_mem_tokens=0)),
           "rmt_wt103": (AUTHORS_WT103, dict(mem_len=0, num_mem_tokens=10)),
           "transformer_xl_enwik8": (AUTHORS_ENWIK8, dict(mem_len=512, num_mem_tokens=0)),
           "rmt_enwik8": (AUTHORS_ENWIK8, dict(mem_len=0, num_mem_tokens=10))}


def _preset(arch):
    a = options.parse_args_and_arch(options.get_training_parser(), [
        "DATA", "--user-dir", os.path.join(REPO, "user_dir"), "--task", "rmt_lm", "--criterion", "rmt_cross_entropy",
        "--arch", arch])
    return convert_namespace_to_omegaconf(a)


def _in_xl_terms(cfg) -> dict:
    m = cfg.model
    cut = m.adaptive_softmax_cutoff
    xl = str(m.embedding_impl) == "transformer_xl"
    return dict(n_layer=m.decoder_layers, d_model=m.decoder_embed_dim, n_head=m.decoder_attention_heads,
                d_head=m.decoder_head_dim or m.decoder_embed_dim // m.decoder_attention_heads,
                d_inner=m.decoder_ffn_embed_dim, dropout=m.dropout, ffn_dropout=m.activation_dropout,
                dropatt=m.attention_dropout, init=str(m.init), init_std=m.init_std, init_range=m.init_range,
                proj_init_std=m.proj_init_std, adaptive=bool(xl and cut), cutoffs=cut or "-", div_val=m.div_val,
                tied=bool(m.tie_adaptive_weights or m.share_decoder_input_output_embed),
                tie_projs=",".join(["F"] + ["T" if m.tie_adaptive_proj else "F"] * (len(cut.split(",")) if cut else 0)),
                output_bias=xl, tgt_len=cfg.task.tokens_per_sample, same_length=m.same_length,
                clamp_len=m.clamp_len, read_mem_from_cache=bool(m.read_mem_from_cache),
                memory_dropout=not m.no_memory_dropout, mem_len=m.mem_len, num_mem_tokens=m.mem_tokens)


@pytest.mark.parametrize("arch", sorted(PRESETS))
def test_preset_equals_the_authors_script(arch):
    authors, memory = PRESETS[arch]
    ours = _in_xl_terms(_preset(arch))
    expected = {**authors, **memory}
    assert {k: ours[k] for k in expected} == expected


def test_the_presets_build_what_they_say():
    """The fields above are what the built model has: FFN dropout, XL's softmax with biases, XL's initialisation."""
    from helpers import dictionary
    from rmt_fairseq.models.rmt_lm import RMTLanguageModel
    from rmt_fairseq.modules.transformer_xl import XLAdaptiveLogSoftmax

    cfg = _preset("rmt_enwik8")
    cfg.model.decoder_layers = 2  # the enwik8 preset at full width, two layers (fast)

    class Task:
        stream_level = True
        source_dictionary = target_dictionary = dictionary(200)

    model = RMTLanguageModel.build_model(cfg.model, Task())
    dec = model.decoder
    assert isinstance(dec.adaptive_softmax, XLAdaptiveLogSoftmax)
    assert dec.adaptive_softmax.out_layers[0].bias is not None
    assert dec.adaptive_softmax.out_layers[0].weight is dec.embed_tokens.emb_layers[0].weight  # tied
    assert dec.layers[0].ffn[2].p == 0.1 and dec.dropout.p == 0.1  # dropout inside and after the FFN
    assert dec.memory_dropout and dec.mem_cache_rule == "none"
    assert abs(float(dec.pos_bias.u.detach().std()) - 0.02) < 0.004  # XL's N(0, init_std), not zeros


def _hparams():
    return load_script("examples/paper_hparams.py")


def test_the_readme_tables_hold_the_authors_values_above():
    hp = _hparams()
    names = dict(ffn_dropout="FFN inner dropout", output_bias="output bias", same_length="same_length (training)",
                 clamp_len="clamp_len (training)", memory_dropout="memory dropout")
    for exp, authors in (("wt103", AUTHORS_WT103), ("enwik8", AUTHORS_ENWIK8)):
        for key, value in authors.items():
            col = "rmt" if key in ("read_mem_from_cache", "memory_dropout") else "xl"
            assert hp.AUTHORS[exp][col][names.get(key, key)][0] == value, (exp, key)


@pytest.mark.parametrize("exp", ["wt103", "enwik8"])
def test_run_sh_and_presets_match_the_authors_and_the_readme_table(exp):
    """Every hyperparameter of the authors' script beside ours from run.sh's train / eval / eval-xl commands: equal,
    or a stated difference; and the README's table is the one the code gives today."""
    hp = _hparams()
    for which in ("xl", "rmt"):
        ours = hp.ours(exp, which)
        differs = {k: (a, ours[k]) for k, (a, _) in hp.AUTHORS[exp][which].items()
                   if hp._fmt(a) != hp._fmt(ours[k]) and k not in hp.INTENTIONAL}
        assert not differs, (exp, which, differs)
    assert hp.readme_table(exp) == hp.table(exp), (
        f"the table in {hp.READMES[exp]} is stale: python examples/paper_hparams.py --write")
