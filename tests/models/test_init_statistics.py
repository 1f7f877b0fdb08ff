"""Init statistics: the std of each parameter group of a freshly built preset is within 10% of Transformer-XL's.

The presets (rmt_wt103, transformer_xl_wt103, rmt_enwik8) are resolved through fairseq's own parser and built on a
fake task, so what is checked is what `fairseq-train --arch <preset>` would start from."""

import re

import pytest
import torch
from models.test_architectures import resolve

from helpers import _Task, dictionary
from rmt_fairseq.models.rmt_lm import RMTLanguageModel

# Transformer-XL's initialisation as data: LM-RMT pytorch/train.py (the same as kimiyoung/transformer-xl), defaults
# --init normal --init_std 0.02 --proj_init_std 0.01 --init_range 0.1; `weights_init` is applied to every module:
#   Linear: weight init_weight = N(0, init_std), bias 0          (attention qkv / r_net / o_net, FFN CoreNet)
#   Embedding (AdaptiveEmbedding's emb_layers): N(0, init_std)
#   AdaptiveEmbedding.emb_projs_i, ProjectedAdaptiveLogSoftmax.out_projs_i: N(0, proj_init_std)
#   ProjectedAdaptiveLogSoftmax: cluster_weight N(0, init_std), cluster_bias 0; out_layers are Linear (above)
#   LayerNorm: weight N(1, init_std), bias 0
#   TransformerLM: r_w_bias, r_r_bias (u, v) N(0, init_std)
# and memory tokens are LM-RMT's `torch.randn` (mem_transformer.py init_mem_tokens): N(0, 1).
INIT_STD, PROJ_INIT_STD, INIT_RANGE = 0.02, 0.01, 0.1
XL_EXPECTED = {  # group -> (mean, std)
    "attention qkv": (0.0, INIT_STD),
    "attention r_proj": (0.0, INIT_STD),
    "attention out_proj": (0.0, INIT_STD),
    "ffn in": (0.0, INIT_STD),
    "ffn out": (0.0, INIT_STD),
    "embedding": (0.0, INIT_STD),
    "output layer": (0.0, INIT_STD),
    "cluster": (0.0, INIT_STD),
    "u/v": (0.0, INIT_STD),
    "layernorm weight": (1.0, INIT_STD),
    "projection": (0.0, PROJ_INIT_STD),
    "memory tokens": (0.0, 1.0),
    "bias": (0.0, 0.0),
}

# parameter name -> group (every parameter must match exactly one)
PATTERNS = [
    (r"\.bias$", "bias"),
    (r"layers\.\d+\.attn\.qkv\.weight$", "attention qkv"),
    (r"layers\.\d+\.attn\.r_proj\.weight$", "attention r_proj"),
    (r"layers\.\d+\.attn\.out_proj\.weight$", "attention out_proj"),
    (r"layers\.\d+\.ffn\.0\.weight$", "ffn in"),
    (r"layers\.\d+\.ffn\.3\.weight$", "ffn out"),
    (r"layers\.\d+\.(attn|ffn)_norm\.weight$", "layernorm weight"),
    (r"embed_tokens\.emb_layers\.\d+\.weight$", "embedding"),
    (r"adaptive_softmax\.out_layers\.\d+\.weight$", "output layer"),
    (r"adaptive_softmax\.cluster\.weight$", "cluster"),
    (r"pos_bias\.[uv]$", "u/v"),
    (r"(emb_projs\.\d+|out_projs\.\d+)\.weight$", "projection"),
    (r"memory\.weight$", "memory tokens"),
]

WT103_SMALL_VOCAB = ("--adaptive-softmax-cutoff", "200,400,2000")  # cutoffs that fit a 3004-symbol dictionary


def _build(arch, *overrides, vocab=3000, seed=0):
    cfg = resolve("--arch", arch, *overrides)
    torch.manual_seed(seed)
    return RMTLanguageModel.build_model(cfg.model, _Task(dictionary(vocab))), cfg


def _groups(model):
    """group -> flat tensor of every value in it (tied parameters appear under each of their names; an
    embedding's padding row, zero by fairseq's convention, is left out)."""
    pad = model.decoder.padding_idx
    found = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups = [g for pattern, g in PATTERNS if re.search(pattern, name)]
        assert len(groups) == 1, (name, groups)  # every parameter is covered, by exactly one group
        w = p.detach()
        if groups[0] in ("embedding", "output layer") and name.endswith(".0.weight"):
            assert torch.equal(w[pad], torch.zeros_like(w[pad])), name  # band 0 holds the padding row
            w = torch.cat([w[:pad], w[pad + 1 :]])
        found.setdefault(groups[0], []).append(w.reshape(-1))
    return {g: torch.cat(ws) for g, ws in found.items()}


def _mismatches(groups, expected=XL_EXPECTED):
    """The groups whose statistics are not XL's: std within 10% (biases exactly 0), LayerNorm mean within 0.01."""
    bad = []
    for g, w in groups.items():
        mean, std = expected[g]
        if std == 0.0:
            ok = bool((w == 0).all())
        else:
            ok = abs(w.std().item() - std) <= 0.1 * std and abs(w.mean().item() - mean) <= max(0.01, 0.1 * std)
        if not ok:
            bad.append((g, round(w.mean().item(), 4), round(w.std().item(), 4)))
    return bad


@pytest.mark.parametrize("arch,overrides,vocab,expected_groups", [
    ("rmt_wt103", WT103_SMALL_VOCAB, 3000, {"cluster", "memory tokens"}),
    ("transformer_xl_wt103", WT103_SMALL_VOCAB, 3000, {"cluster"}),
    ("rmt_enwik8", (), 200, {"memory tokens"}),
    # div_val 2: every band has a projection (XL's rule), drawn from N(0, proj_init_std); 2 layers to stay small
    ("rmt_wt103", (*WT103_SMALL_VOCAB, "--div-val", 2, "--decoder-layers", 2), 3000,
     {"cluster", "memory tokens", "projection"}),
], ids=["rmt_wt103", "transformer_xl_wt103", "rmt_enwik8", "rmt_wt103-div_val_2"])
def test_preset_init_matches_transformer_xl(arch, overrides, vocab, expected_groups):
    model, cfg = _build(arch, *overrides, vocab=vocab)
    assert cfg.model.init == "normal" and cfg.model.init_std == INIT_STD and cfg.model.proj_init_std == PROJ_INIT_STD
    groups = _groups(model)
    always = {"attention qkv", "attention r_proj", "attention out_proj", "ffn in", "ffn out", "embedding",
              "output layer", "u/v", "layernorm weight", "bias"}
    assert set(groups) == always | expected_groups
    assert _mismatches(groups) == []
    # the output layers are the embedding's (tied), so both groups hold the same values
    sm, emb = model.decoder.adaptive_softmax, model.decoder.embed_tokens
    assert all(o.weight is e.weight for o, e in zip(sm.out_layers, emb.emb_layers))


def test_layernorm_weights_are_drawn_not_ones():
    """XL draws LayerNorm weights from N(1, init_std): not all ones (PyTorch's default) and mean 1 within 0.01."""
    model, _ = _build("rmt_wt103", *WT103_SMALL_VOCAB, "--decoder-layers", 2)
    w = _groups(model)["layernorm weight"]
    assert abs(w.mean().item() - 1.0) <= 0.01
    assert (w != 1.0).float().mean() > 0.99


def test_fairseq_init_is_not_transformer_xl():
    """--init fairseq (the bare rmt_lm default) fails the check above, so the check discriminates: u/v are zero,
    LayerNorm weights are ones, Linear weights are PyTorch's kaiming-uniform (std 1/sqrt(3 fan_in))."""
    model, cfg = _build("rmt_wt103", *WT103_SMALL_VOCAB, "--init", "fairseq", "--decoder-layers", 2)
    assert resolve("--arch", "rmt_lm").model.init == "fairseq"
    groups = _groups(model)
    bad = {g for g, _, _ in _mismatches(groups)}
    assert {"u/v", "layernorm weight", "attention qkv", "ffn in", "ffn out", "embedding"} <= bad
    assert (groups["u/v"] == 0).all() and (groups["layernorm weight"] == 1).all()
    C = cfg.model.decoder_embed_dim
    assert abs(groups["attention qkv"].std().item() - (3 * C) ** -0.5) < 0.05 * (3 * C) ** -0.5
    assert abs(groups["embedding"].std().item() - C**-0.5) < 0.05 * C**-0.5  # fairseq's N(0, C^-0.5)


@pytest.mark.parametrize("init_range", [INIT_RANGE, 0.05])
def test_uniform_init(init_range):
    """--init uniform: XL's U(-init_range, init_range) for Linear and embedding weights, u/v and the cluster
    (|w| <= init_range, std init_range / sqrt(3)); LayerNorm weights stay N(1, init_std), projections
    N(0, proj_init_std), biases 0, memory tokens N(0, 1)."""
    model, _ = _build("rmt_wt103", *WT103_SMALL_VOCAB, "--init", "uniform", "--init-range", init_range,
                      "--div-val", 2, "--decoder-layers", 2)
    groups = _groups(model)
    uniform = ["attention qkv", "attention r_proj", "attention out_proj", "ffn in", "ffn out", "embedding",
               "output layer", "cluster", "u/v"]
    expected = dict(XL_EXPECTED, **{g: (0.0, init_range / 3**0.5) for g in uniform})
    assert _mismatches(groups, expected) == []
    for g in uniform:
        w = groups[g]
        assert w.abs().max().item() <= init_range, g
        assert w.abs().max().item() > 0.9 * init_range, g  # it fills the range (not a narrower normal)
