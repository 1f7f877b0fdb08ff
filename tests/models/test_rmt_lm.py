"""Mask behaviour, recurrence and the no-memory baseline, on the real model (tests 1 and 2 of issue 2). The mask
and recurrence tests also run on rmt_transformer_lm (fairseq's own TransformerDecoder with memory, issue 8)."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_model, tiny_wrapper
from rmt_fairseq.modules.memory import Layout, relative_distances
from rmt_fairseq.modules.recurrence import RecurrentState, run_segments
from rmt_fairseq.modules.relative_attention import sinusoid_table


def _last_layer_rows(model, tokens, memory=None, cache=None):
    """Final-layer output of every position [read | segment | write] for one segment."""
    rows = {}
    h = model.decoder.layers[-1].register_forward_hook(lambda m, i, o: rows.setdefault("h", o))
    out = model.decoder.forward_segment(tokens, memory, cache)
    h.remove()
    if isinstance(rows["h"], tuple):  # a fairseq layer: (x T x B x C, attn, state)
        rows["h"] = rows["h"][0].transpose(0, 1)
    return rows["h"], out


@pytest.mark.parametrize("family,mem_len", [("rmt_lm", 0), ("rmt_lm", 5), ("rmt_transformer_lm", 0)])
def test_mask_behaviour_in_the_model(family, mem_len):
    model = (tiny_model(mem_len=mem_len) if family == "rmt_lm" else tiny_wrapper()).eval()
    M, T = 3, 8
    torch.manual_seed(1)
    x = torch.randint(4, 40, (2, T))
    memory = torch.randn(2, M, 32)
    cache = [torch.randn(2, 5, 32) for _ in range(2)] if mem_len else None
    h1, o1 = _last_layer_rows(model, x, memory, cache)
    for t in range(T - 1):
        x2 = x.clone()
        x2[:, t + 1 :] = (x2[:, t + 1 :] + 7) % 36 + 4  # change every token after t
        h2, o2 = _last_layer_rows(model, x2, memory, cache)
        # segment position t (and all before) unchanged when tokens after t change
        assert torch.allclose(o1.hidden[:, : t + 1], o2.hidden[:, : t + 1], atol=1e-6)
        assert not torch.allclose(o1.hidden[:, t + 1 :], o2.hidden[:, t + 1 :], atol=1e-4)
        # read memory output unchanged by segment tokens
        assert torch.allclose(h1[:, :M], h2[:, :M], atol=1e-6)
    for t in range(T):  # write memory changes when any one segment token changes
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 36 + 4
        _, o2 = _last_layer_rows(model, x2, memory, cache)
        assert (o1.memory - o2.memory).abs().amax(dim=(1, 2)).min() > 1e-5


def _hidden(model, x, seg_len=8):
    return run_segments(model.decoder, x, None, RecurrentState(), seg_len=seg_len, return_hidden=True).hidden


@pytest.mark.parametrize("mem_tokens,mem_len,layout,depends", [
    (3, 0, "rmt", True),   # RMT: segment 2 sees segment 1 through memory
    (0, 0, "rmt", False),  # no memory at all: segments are independent
    (3, 0, "mt", False),   # MT ablation: memory tokens but no recurrence
    (0, 8, "rmt", True),   # Transformer-XL cache
    (3, 0, "wrapper", True),   # rmt_transformer_lm with memory
    (0, 0, "wrapper", False),  # rmt_transformer_lm without: segments independent
])
def test_recurrence(mem_tokens, mem_len, layout, depends):
    if layout == "wrapper":
        model = tiny_wrapper(mem_tokens=mem_tokens).eval()
    else:
        model = tiny_model(mem_tokens=mem_tokens, mem_len=mem_len, memory_layout=layout).eval()
    torch.manual_seed(2)
    x = torch.randint(4, 40, (2, 16))
    x2 = x.clone()
    x2[:, :8] = torch.randint(4, 40, (2, 8))  # change only segment 1
    h1, h2 = _hidden(model, x), _hidden(model, x2)
    changed = (h1[1] - h2[1]).abs().max().item()
    assert (changed > 1e-4) if depends else (changed == 0.0)


def _reference_causal_xl(model, x):
    """Plain Transformer-XL computation of one segment with no memory and no cache, written out directly:
    score(i, j) = (q_i + u).k_j + (q_i + v).W_r R_{i-j} for j <= i (Dai et al. eq. 4), post-norm layers."""
    dec = model.decoder
    B, T = x.shape
    h = dec.embed_scale * dec.embed_tokens(x)
    R = sinusoid_table(torch.arange(T - 1, -1, -1, dtype=torch.float), dec.embed_dim)  # distances T-1..0
    for layer in dec.layers:
        a = layer.attn
        H, D = a.num_heads, a.head_dim
        q, k, v = a.qkv(h).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, H, D) for t in (q, k, v))
        r = a.r_proj(R).view(T, H, D)
        out = torch.zeros(B, T, H, D)
        for i in range(T):
            scores = torch.zeros(B, H, i + 1)
            for j in range(i + 1):
                rel = r[T - 1 - (i - j)]  # embedding of distance i - j
                scores[:, :, j] = ((q[:, i] + dec.pos_bias.u) * k[:, j]).sum(-1) + \
                    ((q[:, i] + dec.pos_bias.v) * rel).sum(-1)
            p = F.softmax(scores / math.sqrt(D), dim=-1)
            out[:, i] = torch.einsum("bhj,bjhd->bhd", p, v[:, : i + 1])
        h = layer.attn_norm(h + a.out_proj(out.reshape(B, T, H * D)))
        h = layer.ffn_norm(h + layer.ffn(h))
    return h


def test_zero_memory_zero_cache_equals_plain_causal_baseline():
    model = tiny_model(mem_tokens=0, mem_len=0).eval()
    torch.manual_seed(3)
    for p in model.parameters():  # non-zero u, v so the position terms are exercised
        if p.dim() == 2 and p.shape[0] == 2:
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randint(4, 40, (2, 8))
    ours = model.decoder.forward_segment(x, None, None).hidden
    ref = _reference_causal_xl(model, x)
    assert torch.allclose(ours, ref, atol=1e-5)
    # and segments are scored independently: the second segment alone gives the same output
    both = _hidden(model, torch.cat([x.flip(1), x], dim=1))
    assert torch.allclose(both[1], ours, atol=1e-6)


def test_memory_init_is_distinct_per_slot():
    model = tiny_model(mem_tokens=4)
    w = model.decoder.memory.weight
    assert torch.cdist(w, w)[~torch.eye(4, dtype=torch.bool)].min() > 1e-3


def test_relative_positions_cover_negative_write_distances():
    distances, _ = relative_distances(Layout(0, 3, 8, 3))
    assert distances.min() == -2 and distances.max() == 13


def test_adaptive_softmax_training_loss_is_the_exact_nll_for_every_word():
    """The training loss equals -log p from AdaptiveSoftmax.get_log_prob (what eval-lm scores), including the
    tail words at cutoff + pad index that fairseq's adaptive_loss criterion ignores."""
    model = tiny_model(vocab=20, adaptive_softmax_cutoff="8,16", adaptive_input=True, tie_adaptive_weights=True,
                       tie_adaptive_proj=True, adaptive_softmax_factor=2, adaptive_input_factor=2).eval()
    pad = model.decoder.padding_idx
    torch.manual_seed(4)
    x = torch.randint(4, 24, (2, 8))
    y = torch.randint(4, 24, (2, 8))
    y[0, :3] = torch.tensor([8 + pad, 16 + pad, 8])  # words whose in-cluster index equals pad
    out = model.decoder.forward_segment(x, None, None)
    lp = model.decoder.adaptive_softmax.get_log_prob(out.hidden, None).view(2, 8, -1)
    exact = -lp.gather(-1, y.unsqueeze(-1)).sum()
    assert torch.allclose(model.decoder.segment_loss(out.hidden, y), exact, atol=1e-4)


def test_recorded_attention_path_equals_the_fused_path():
    model = tiny_model(mem_len=4).eval()
    x = torch.randint(4, 40, (2, 8))
    cache = [torch.randn(2, 4, 32) for _ in range(2)]
    fused = model.decoder.forward_segment(x, None, cache)
    for layer in model.decoder.layers:
        layer.attn.keep_attention = True
    explicit = model.decoder.forward_segment(x, None, cache)
    assert torch.allclose(fused.hidden, explicit.hidden, atol=1e-5)
    w = model.decoder.layers[0].attn.last_attention  # B x H x N x K
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5)
    assert (w[:, :, :3, :4] == 0).all()  # read memory never attends to the XL cache


def test_a_config_written_before_a_field_existed_still_builds():
    from omegaconf import OmegaConf

    from helpers import _Task, dictionary
    from rmt_fairseq.models.rmt_lm import RMTLanguageModel

    old = OmegaConf.create({"_name": "rmt_tiny", "decoder_layers": 1, "decoder_embed_dim": 16,
                            "decoder_ffn_embed_dim": 16, "decoder_attention_heads": 2, "mem_tokens": 2,
                            "tokens_per_sample": 8})  # e.g. no decoder_head_dim, no memory_layout
    model = RMTLanguageModel.build_model(old, _Task(dictionary(10)))
    assert model.decoder.num_mem_tokens == 2 and model.decoder.layers[0].attn.head_dim == 8
