"""The memory-dropout and read-from-cache switches change exactly the positions they should (mask and gradient
checks as for the paper mask, tests/modules/test_memory.py), and a checkpoint config from before the switches keeps
what it was trained with.

Legend: B batch, T segment tokens, M memory tokens, L XL-cache length, C model dim."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from helpers import _Task, dictionary, tiny_model
from rmt_fairseq.models.rmt_lm import RMTLanguageModel
from rmt_fairseq.models.rmt_lm_config import RMTLanguageModelConfig
from rmt_fairseq.models.trained_with import LEGACY_VALUES, with_legacy_values
from rmt_fairseq.modules.adaptive import DenseAdaptiveInput
from rmt_fairseq.modules.memory import visibility
from rmt_fairseq.modules.transformer_xl import XLAdaptiveLogSoftmax

B, T, M, L, C, LAYERS = 2, 6, 2, 4, 32, 2


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 44, (B, T), generator=g)
    memory = torch.randn(B, M, C, generator=g)
    cache = [torch.randn(B, L, C, generator=g).requires_grad_() for _ in range(LAYERS)]
    return tokens, memory, cache


def _run(decoder, tokens, memory, cache):
    """forward_segment, plus the first layer's input and the last layer's output, every row [read | seg | write]."""
    seen = {}

    def first_input(module, args):  # a pre-hook returning something would replace the layer's arguments
        seen["input"] = args[0]

    def last_output(module, args, out):
        seen["output"] = out

    hooks = [decoder.layers[0].register_forward_pre_hook(first_input),
             decoder.layers[-1].register_forward_hook(last_output)]
    try:
        out = decoder.forward_segment(tokens, memory, cache)
    finally:
        for h in hooks:
            h.remove()
    return seen["input"], seen["output"], out


def _cache_grads(rows, cache):
    """Gradient of a random projection of `rows` w.r.t. each layer's cache B x L x C (a plain sum would be ~0
    through LayerNorm with unit weights). A cache the rows do not depend on: zeros."""
    w = torch.randn(rows.shape, generator=torch.Generator().manual_seed(99))
    grads = torch.autograd.grad((rows * w).sum(), cache, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(c) if g is None else g for g, c in zip(grads, cache)]


def _nonzero_everywhere(grad):
    return bool((grad.abs().sum(-1) > 0).all())  # every batch row and cache position


# ---- read_mem_from_cache -------------------------------------------------------------------------------------


@pytest.mark.parametrize("on", [False, True])
def test_read_mem_from_cache_gradients(on):
    """Off (LM-RMT's default): neither read nor write memory sees the cache; on: both do; segment rows always do.
    Read memory only ever sees read memory (and the cache), so its output does not depend on any layer's cache when
    off. Write memory sees the segment rows, which see the cache: with the switch off it depends on the cache of
    the layers below the last one through them, but not on the last layer's cache, which only its own attention
    could read."""
    model = tiny_model(mem_tokens=M, mem_len=L, read_mem_from_cache=on).eval()
    dec = model.decoder
    assert dec.mem_cache_rule == ("both" if on else "none")
    tokens, memory, cache = _inputs()
    _, last, out = _run(dec, tokens, memory, cache)
    read, seg, write = last[:, :M], last[:, M : M + T], last[:, M + T :]  # each B x n x C
    assert torch.equal(seg, out.hidden) and torch.equal(write, out.memory)

    g_read, g_seg, g_write = _cache_grads(read, cache), _cache_grads(seg, cache), _cache_grads(write, cache)
    for layer in range(LAYERS):
        assert _nonzero_everywhere(g_seg[layer]), layer
        if on:
            assert _nonzero_everywhere(g_read[layer]) and _nonzero_everywhere(g_write[layer]), layer
        else:
            assert (g_read[layer] == 0).all(), layer
    if not on:
        assert (g_write[-1] == 0).all()
        assert _nonzero_everywhere(g_write[0])  # through the segment rows of the first layer


def test_read_mem_from_cache_changes_only_the_memory_rows_cache_columns():
    """The mask: the two settings differ exactly in the (read and write memory rows) x (cache columns) blocks."""
    off = tiny_model(mem_tokens=M, mem_len=L, read_mem_from_cache=False).decoder
    on = tiny_model(mem_tokens=M, mem_len=L, read_mem_from_cache=True).decoder
    v_off, v_on = visibility(off.layout(L, M, T, M)), visibility(on.layout(L, M, T, M))  # (M+T+M) x (L+M+T+M)
    differs = torch.zeros_like(v_off)
    differs[:M, :L] = True  # read memory x cache
    differs[M + T :, :L] = True  # write memory x cache
    assert torch.equal(v_off ^ v_on, differs)
    assert v_on[differs].all() and not v_off[differs].any()


def test_read_mem_from_cache_changes_nothing_without_a_cache():
    """Same weights either way; on a first segment (no cache) the two settings compute the same thing, and with a
    cache the same cache is written (the segment rows' layer inputs, which do not see memory-row changes in layer
    0)."""
    off = tiny_model(mem_tokens=M, mem_len=L, read_mem_from_cache=False).eval()
    on = tiny_model(mem_tokens=M, mem_len=L, read_mem_from_cache=True).eval()
    for (n1, p1), (n2, p2) in zip(off.named_parameters(), on.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    tokens, memory, cache = _inputs(1)
    with torch.no_grad():
        for mem in (memory, None):
            a, b = off.decoder.forward_segment(tokens, mem, None), on.decoder.forward_segment(tokens, mem, None)
            assert torch.equal(a.hidden, b.hidden) and torch.equal(a.memory, b.memory)
            assert all(torch.equal(x, y) for x, y in zip(a.cache, b.cache))
        a, b = off.decoder.forward_segment(tokens, memory, cache), on.decoder.forward_segment(tokens, memory, cache)
        assert torch.equal(a.cache[0], b.cache[0])  # layer 0's input: the embeddings
        assert not torch.allclose(a.memory, b.memory, atol=1e-4)  # the switch does act once there is a cache


# ---- memory dropout ------------------------------------------------------------------------------------------

P = 0.5


def _is_dropout_of(y, ref, p=P):
    """Every entry of y is 0 or ref / (1 - p) (one dropout, not two), and a fraction near p is zeroed."""
    kept = y != 0
    scaled = torch.allclose(y[kept], ref[kept] / (1 - p), rtol=1e-5, atol=1e-6)
    frac = 1 - kept.float().mean().item()
    return scaled and abs(frac - p) < 0.2


@pytest.mark.parametrize("no_memory_dropout", [False, True])
def test_memory_dropout_in_training(no_memory_dropout):
    """LM-RMT: memory is concatenated before the embedding dropout (read and write copies dropped) and the written
    memory is taken after the output dropout. --no-memory-dropout: the layers get the given memory as it is and the
    written memory is the last layer's write rows; token rows are dropped either way."""
    model = tiny_model(mem_tokens=M, mem_len=0, dropout=P, no_memory_dropout=no_memory_dropout).train()
    dec = model.decoder
    assert dec.memory_dropout == (not no_memory_dropout)
    tokens, memory, _ = _inputs(2)
    torch.manual_seed(3)
    first, last, out = _run(dec, tokens, memory, None)
    with torch.no_grad():
        emb = dec.embed_scale * dec.embed_tokens(tokens)  # B x T x C, no dropout
    assert first.shape == (B, M + T + M, C)

    assert _is_dropout_of(first[:, M : M + T], emb)  # token rows: dropped once in both settings
    assert _is_dropout_of(out.hidden, last[:, M : M + T])  # output dropout on the token rows in both settings
    if no_memory_dropout:
        assert torch.equal(first[:, :M], memory) and torch.equal(first[:, M + T :], memory)
        assert torch.equal(out.memory, last[:, M + T :])
    else:
        assert _is_dropout_of(first[:, :M], memory) and _is_dropout_of(first[:, M + T :], memory)
        assert _is_dropout_of(out.memory, last[:, M + T :])
        assert not torch.equal(first[:, :M], memory) and not torch.equal(out.memory, last[:, M + T :])


def test_memory_dropout_switch_changes_nothing_in_evaluation():
    a = tiny_model(mem_tokens=M, mem_len=L, dropout=P, no_memory_dropout=False).eval()
    b = tiny_model(mem_tokens=M, mem_len=L, dropout=P, no_memory_dropout=True).eval()
    tokens, memory, cache = _inputs(4)
    with torch.no_grad():
        fa, la, oa = _run(a.decoder, tokens, memory, cache)
        fb, lb, ob = _run(b.decoder, tokens, memory, cache)
    assert torch.equal(fa[:, :M], memory) and torch.equal(fa, fb) and torch.equal(la, lb)
    assert torch.equal(oa.hidden, ob.hidden) and torch.equal(oa.memory, ob.memory)
    assert torch.equal(oa.memory, la[:, M + T :])


# ---- checkpoints written before the switches -----------------------------------------------------------------

ADDED_WITH_THE_SWITCHES = ["no_memory_dropout", "read_mem_from_cache", "same_length", "clamp_len", "init", "init_std",
                           "init_range", "proj_init_std", "embedding_impl", "div_val"]


def _pre_switch_config(name="rmt_lm", **fields):
    """A model config as a checkpoint written before the switches saved it: today's fields less the new ones."""
    tiny = dict(decoder_layers=LAYERS, decoder_embed_dim=C, decoder_attention_heads=2, decoder_ffn_embed_dim=64,
                mem_tokens=M, mem_len=L, tokens_per_sample=8, dropout=0.0)
    cfg = OmegaConf.to_container(OmegaConf.structured(RMTLanguageModelConfig(**dict(tiny, **fields))))
    for k in ADDED_WITH_THE_SWITCHES:
        del cfg[k]
    return OmegaConf.create(dict(cfg, _name=name))


def _check_pre_switch_model(model, embedding=nn.Embedding):
    dec = model.decoder
    assert dec.mem_cache_rule == "write" and dec.memory_dropout is False
    assert type(dec.embed_tokens) is embedding  # fairseq's modules, not XLAdaptiveEmbedding
    assert not isinstance(dec.adaptive_softmax, XLAdaptiveLogSoftmax)
    assert (dec.pos_bias.u == 0).all() and (dec.pos_bias.v == 0).all()  # --init fairseq: u / v start at zero
    vis = visibility(dec.layout(L, M, T, M))
    assert not vis[:M, :L].any()  # read memory does not see the cache
    assert vis[M + T :, :L].all()  # write memory does
    dec.eval()
    tokens, memory, cache = _inputs(5)
    _, last, _ = _run(dec, tokens, memory, cache)
    assert all((g == 0).all() for g in _cache_grads(last[:, :M], cache))
    assert _nonzero_everywhere(_cache_grads(last[:, M + T :], cache)[-1])


def test_with_legacy_values_gives_what_pre_switch_checkpoints_were_trained_with():
    cfg = with_legacy_values(_pre_switch_config())
    assert cfg.read_mem_from_cache is None and cfg.no_memory_dropout is True
    assert cfg.embedding_impl == "fairseq" and cfg.init == "fairseq"
    assert set(LEGACY_VALUES) == {"read_mem_from_cache", "no_memory_dropout", "embedding_impl", "init"}
    _check_pre_switch_model(RMTLanguageModel.build_model(cfg, _Task(dictionary(40))))


def test_with_legacy_values_keeps_fields_a_config_has():
    cfg = _pre_switch_config()
    OmegaConf.set_struct(cfg, False)
    cfg.read_mem_from_cache, cfg.no_memory_dropout = True, False
    cfg.embedding_impl, cfg.init = "transformer_xl", "normal"
    cfg = with_legacy_values(cfg)
    assert (cfg.read_mem_from_cache, cfg.no_memory_dropout, cfg.embedding_impl, cfg.init) == (
        True, False, "transformer_xl", "normal")
    # a config written today (every field present) builds with today's defaults: no legacy value leaks in
    new = with_legacy_values(OmegaConf.structured(RMTLanguageModelConfig(tokens_per_sample=8)))
    assert (new.read_mem_from_cache, new.no_memory_dropout, new.embedding_impl, new.init) == (
        False, False, "fairseq", "fairseq")


@pytest.mark.parametrize("name,fields,embedding", [
    ("rmt_lm", {}, nn.Embedding),
    # a checkpoint of the WT103 preset from before (its adaptive input and softmax saved, small here): the preset
    # now sets --init normal and --embedding-impl transformer_xl, which must not replace what the checkpoint was
    # trained with (fairseq runs the --arch function on the loaded config)
    ("rmt_wt103", dict(adaptive_softmax_cutoff="10,20", adaptive_input=True, tie_adaptive_weights=True,
                       tie_adaptive_proj=True, adaptive_softmax_factor=1.0, adaptive_input_factor=1.0,
                       decoder_head_dim=16), DenseAdaptiveInput),
], ids=["rmt_lm", "rmt_wt103"])
def test_loading_a_pre_switch_checkpoint_config_through_fairseq(name, fields, embedding):
    """The path fairseq's checkpoint loading takes: models.build_model(cfg, task, from_checkpoint=True)
    (rmt_fairseq.compat applies with_legacy_values before the --arch function)."""
    from fairseq import models

    cfg = _pre_switch_config(name, **fields)
    model = models.build_model(cfg, _Task(dictionary(40)), from_checkpoint=True)
    assert isinstance(model, RMTLanguageModel)
    _check_pre_switch_model(model, embedding)
