"""rmt_lm's Transformer-XL block against a port of the authors' own code (tests/reference/transformer_xl.py).

Legend: B batch, T segment tokens, M memory tokens, L XL-cache length, C model dim, H heads, D head dim.

1. Eval mode, no memory tokens, an XL cache: the T x B port with XL's masks and rel-shift gives the same hidden
   states and cache as RMTDecoder.forward_segment for three consecutive segments, under same_length, clamp_len,
   an evaluation segment length and cache length unlike training, and a cache still filling.
2. Train mode: the same dropout masks (seeded) and placement as XL. XL's T x B port draws its masks in another
   memory layout than ours, so the comparison is against a B-first reference of XL's equations with XL's
   dropout order; that reference is itself checked against the T x B port with one stream and one head, where
   both layouts coincide. Moving one dropout on our side makes the outputs differ.
3. Train mode with memory tokens: LM-RMT's memory dropout placement ([read | tokens | read] dropped together
   after embedding; written memory taken after the final dropout), and none on memory rows under
   --no-memory-dropout.
"""

import pytest
import torch
from reference.transformer_xl import XLBlock, xl_block_train_reference

from helpers import tiny_model
from rmt_fairseq.modules.memory import Layout, relative_distances, visibility

B, C, H, D, FFN, LAYERS, VOCAB = 2, 32, 2, 10, 64, 2, 40
ATOL = 1e-5


def _model(seed=0, heads=H, **overrides):
    """A tiny rmt_lm with every parameter moved off its initial value (u, v start at zero and LayerNorms at
    1 / 0, where a swapped or missing one would go unnoticed)."""
    cfg = dict(decoder_layers=LAYERS, decoder_embed_dim=C, decoder_attention_heads=heads, decoder_head_dim=D,
               decoder_ffn_embed_dim=FFN, mem_tokens=0, dropout=0.1, attention_dropout=0.1,
               activation_dropout=0.1)
    cfg.update(overrides)
    model = tiny_model(VOCAB, seed, **cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name.endswith(("pos_bias.u", "pos_bias.v")) else 0.1
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _reference(decoder, mem_len=0, same_length=False, clamp_len=-1) -> XLBlock:
    """An XLBlock holding the decoder's weights (the names map one to one, see relative_attention.py)."""
    attn0 = decoder.layers[0].attn
    block = XLBlock(len(decoder.layers), attn0.num_heads, decoder.embed_dim, attn0.head_dim,
                    decoder.layers[0].ffn[0].out_features, decoder.dropout.p, attn0.attention_dropout, mem_len,
                    same_length=same_length, clamp_len=clamp_len)
    with torch.no_grad():
        block.r_w_bias.copy_(decoder.pos_bias.u)
        block.r_r_bias.copy_(decoder.pos_bias.v)
        for ours, theirs in zip(decoder.layers, block.layers):
            att, ff = theirs.dec_attn, theirs.pos_ff
            att.qkv_net.weight.copy_(ours.attn.qkv.weight)
            att.r_net.weight.copy_(ours.attn.r_proj.weight)
            att.o_net.weight.copy_(ours.attn.out_proj.weight)
            att.layer_norm.load_state_dict(ours.attn_norm.state_dict())
            ff.CoreNet[0].load_state_dict(ours.ffn[0].state_dict())
            ff.CoreNet[3].load_state_dict(ours.ffn[3].state_dict())
            ff.layer_norm.load_state_dict(ours.ffn_norm.state_dict())
    return block


def _embed(decoder, tokens):
    """B x T -> B x T x C, our scaled token embedding (XL's word_emb), before any dropout."""
    return decoder.embed_scale * decoder.embed_tokens(tokens)


def _segments(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (B, t), generator=g) for t in lengths]


# ---- 1. eval mode against XL's own T x B code --------------------------------------------------------------

# (segment lengths, mem_len, same_length, clamp_len); the model is built for training segments of 5
EVAL_CASES = {
    "plain": ([5, 5, 5], 5, False, -1),
    "same_length": ([5, 5, 5], 5, True, -1),
    "clamp_len": ([5, 5, 5], 5, False, 3),
    "same_length_and_clamp_len": ([5, 5, 5], 5, True, 3),
    # XL's evaluation: a shorter segment and a longer cache than in training, same_length and clamp_len on
    # (klen 3, 6, 9 against mem_len 7: XL's same_length mask takes both of its branches)
    "eval_lengths": ([3, 3, 3], 7, True, 4),
    # the cache holds 0, 4 then 6 positions: XL's same_length with mlen < mem_len, then a full cache
    "cache_filling": ([4, 4, 4], 6, True, -1),
    # a cache shorter than the segment: same_length windows of 3 inside the segment
    "short_cache": ([5, 5, 5], 3, True, -1),
    # segment lengths changing from call to call, a cache longer than any segment
    "mixed_lengths": ([5, 2, 7], 8, False, 3),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_matches_transformer_xl(case):
    lengths, mem_len, same_length, clamp_len = EVAL_CASES[case]
    model = _model(mem_len=mem_len, same_length=same_length, clamp_len=clamp_len, tokens_per_sample=5).eval()
    dec = model.decoder
    ref = _reference(dec, mem_len, same_length, clamp_len).eval()
    cache, mems = None, ref.init_mems(B)
    with torch.no_grad():
        for s, tokens in enumerate(_segments(3, lengths)):
            out = dec.forward_segment(tokens, None, cache)
            xl_out, mems = ref._forward(_embed(dec, tokens).transpose(0, 1), mems)  # T x B x C
            torch.testing.assert_close(out.hidden, xl_out.transpose(0, 1), atol=ATOL, rtol=0,
                                       msg=lambda m: f"{case}, segment {s}: {m}")
            # the cache: XL's hids of the last mem_len positions (XL keeps one more, the last layer's output)
            assert len(out.cache) == len(mems) - 1
            for layer, (ours, theirs) in enumerate(zip(out.cache, mems)):
                assert ours.size(1) == min(mem_len, sum(lengths[: s + 1]))
                torch.testing.assert_close(ours, theirs.transpose(0, 1), atol=ATOL, rtol=0,
                                           msg=lambda m: f"{case}, segment {s}, cache of layer {layer}: {m}")
            cache = out.cache


def test_eval_parity_is_sensitive_to_the_shared_position_biases():
    """u and v enter the two terms of XL's score differently: swapping them in the reference breaks parity
    (so the parity above checks which bias is which)."""
    model = _model(mem_len=5).eval()
    dec = model.decoder
    ref = _reference(dec, 5)
    with torch.no_grad():
        ref.r_w_bias.copy_(dec.pos_bias.v)
        ref.r_r_bias.copy_(dec.pos_bias.u)
        tokens = _segments(3, [5])[0]
        out = dec.forward_segment(tokens, None, None)
        xl_out, _ = ref.eval()._forward(_embed(dec, tokens).transpose(0, 1), ref.init_mems(B))
    assert (out.hidden - xl_out.transpose(0, 1)).abs().max() > 1e-2


# ---- 2. train mode: dropout placement -----------------------------------------------------------------------

TRAIN = dict(dropout=0.2, attention_dropout=0.1, activation_dropout=0.2)  # XL: its dropout inside the FFN too


def _run_ours(dec, segments, seed, memory=None):
    """forward_segment over the segments, torch.manual_seed(seed + s) before segment s -> outputs."""
    outs, cache = [], None
    for s, tokens in enumerate(segments):
        torch.manual_seed(seed + s)
        out = dec.forward_segment(tokens, memory, cache)
        outs.append(out)
        cache, memory = out.cache, out.memory
    return outs


def _run_train_reference(dec, block, segments, seed, mem_len):
    """xl_block_train_reference over the segments with XL's cache update -> (outputs B x T x C, caches)."""
    outs, caches, mems = [], [], None
    for s, tokens in enumerate(segments):
        x = _embed(dec, tokens)
        torch.manual_seed(seed + s)
        out, _, hids = xl_block_train_reference(block, x, mems, TRAIN["dropout"], TRAIN["attention_dropout"],
                                                TRAIN["activation_dropout"])
        mems = [torch.cat([m, h], 1)[:, -mem_len:] if mems else h[:, -mem_len:]
                for m, h in zip(mems or [None] * len(hids), hids)]
        outs.append(out)
        caches.append(mems)
    return outs, caches


def test_train_reference_draws_the_dropout_masks_of_transformer_xl():
    """With one stream and one head XL's T x B tensors and the B-first ones hold their elements in the same
    order, so both draw the same masks: the B-first reference equals XL's own code in training mode, i.e. it
    has XL's dropout calls, in XL's order."""
    model = _model(heads=1, mem_len=4, **TRAIN).train()
    dec = model.decoder
    block = _reference(dec, mem_len=4).train()
    g = torch.Generator().manual_seed(5)
    mems = block.init_mems(1)
    ref_mems = None
    with torch.no_grad():
        for s in range(3):
            tokens = torch.randint(4, VOCAB, (1, 4), generator=g)
            x = _embed(dec, tokens)  # 1 x T x C
            torch.manual_seed(99)  # dropout is on: another seed gives another output
            xl_other, _ = block._forward(x.transpose(0, 1), mems)
            torch.manual_seed(20 + s)
            xl_out, mems = block._forward(x.transpose(0, 1), mems)  # T x 1 x C
            torch.manual_seed(20 + s)
            out, _, hids = xl_block_train_reference(block, x, ref_mems, TRAIN["dropout"],
                                                    TRAIN["attention_dropout"], TRAIN["dropout"])
            torch.testing.assert_close(out, xl_out.transpose(0, 1), atol=ATOL, rtol=0,
                                       msg=lambda m: f"segment {s}: {m}")
            assert (xl_other - xl_out).abs().max() > 1e-2
            # XL's cache update: each layer's input, the last mem_len positions (its mems hold the same values)
            ref_mems = [torch.cat([m, h], 1)[:, -4:] if ref_mems else h[:, -4:]
                        for m, h in zip(ref_mems or [None] * len(hids), hids)]
            for ours_m, xl_m in zip(ref_mems, mems):
                torch.testing.assert_close(ours_m, xl_m.transpose(0, 1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("heads", [1, H])
def test_train_mode_matches_transformer_xl_dropout(heads):
    model = _model(heads=heads, mem_len=5, **TRAIN).train()
    dec = model.decoder
    block = _reference(dec, mem_len=5)
    segments = _segments(7, [5, 5, 5])
    with torch.no_grad():
        ours = _run_ours(dec, segments, seed=40)
        ref, ref_caches = _run_train_reference(dec, block, segments, seed=40, mem_len=5)
    for s, (o, r, rc) in enumerate(zip(ours, ref, ref_caches)):
        torch.testing.assert_close(o.hidden, r, atol=ATOL, rtol=0, msg=lambda m: f"segment {s}: {m}")
        for ours_c, ref_c in zip(o.cache, rc):  # the cache holds the dropped embedding and layer outputs
            torch.testing.assert_close(ours_c, ref_c, atol=ATOL, rtol=0, msg=lambda m: f"segment {s} cache: {m}")
    assert (ours[0].hidden == 0).float().mean() > 0.05  # the final dropout acted


@pytest.mark.parametrize("moved", [
    dict(activation_dropout=0.0),  # no dropout inside the FFN (fairseq's default)
    dict(activation_dropout=0.1),  # another rate inside the FFN than XL's single --dropout
    dict(attention_dropout=0.0),  # no dropout on the attention probabilities
])
def test_train_mode_parity_catches_a_moved_dropout(moved):
    model = _model(mem_len=5, **{**TRAIN, **moved}).train()
    dec = model.decoder
    segments = _segments(7, [5, 5])
    with torch.no_grad():
        ours = _run_ours(dec, segments, seed=40)
        ref, _ = _run_train_reference(dec, _reference(dec, mem_len=5), segments, seed=40, mem_len=5)
    assert max((o.hidden - r).abs().max().item() for o, r in zip(ours, ref)) > 1e-2


# ---- 3. train mode with memory tokens: LM-RMT's memory dropout ----------------------------------------------

M, T = 2, 5


def _memory_reference(dec, block, segments, seed, memory_dropout):
    """LM-RMT's forward over the segments, with our RMT mask and relative distances (LM-RMT's rel-shift is
    undefined for the negative distances of write memory): [read | tokens*scale | read] -> (hidden B x T x C,
    written memory B x M x C) per segment."""
    layout = Layout(0, M, T, M)
    masked = ~visibility(layout)  # N x K
    pos_seq, rel_index = relative_distances(layout)  # P, N x K
    read = dec.memory.weight.unsqueeze(0).expand(B, -1, -1)  # B x M x C (LM-RMT: the learned tokens at start)
    outs = []
    for s, tokens in enumerate(segments):
        x = torch.cat([read, _embed(dec, tokens), read], dim=1)  # B x (M+T+M) x C
        rows = None if memory_dropout else slice(M, M + T)  # LM-RMT: dropout on all rows; else tokens only
        torch.manual_seed(seed + s)
        out, h, _ = xl_block_train_reference(block, x, None, TRAIN["dropout"], TRAIN["attention_dropout"],
                                             TRAIN["activation_dropout"], masked=masked, pos_seq=pos_seq,
                                             rel_index=rel_index, embed_dropout_rows=rows, output_dropout_rows=rows)
        if memory_dropout:  # LM-RMT: hidden and written memory from the output after the final dropout
            hidden, written = out[:, M : M + T], out[:, M + T :]
        else:
            hidden, written = out, h[:, M + T :]
        outs.append((hidden, written))
        read = written
    return outs


@pytest.mark.parametrize("no_memory_dropout", [False, True])
def test_memory_token_dropout_placement(no_memory_dropout):
    model = _model(mem_tokens=M, mem_len=0, tokens_per_sample=T, no_memory_dropout=no_memory_dropout,
                   **TRAIN).train()
    dec = model.decoder
    block = _reference(dec)
    segments = _segments(11, [T, T])
    with torch.no_grad():
        ours = _run_ours(dec, segments, seed=60)
        ref = _memory_reference(dec, block, segments, seed=60, memory_dropout=not no_memory_dropout)
        other = _memory_reference(dec, block, segments, seed=60, memory_dropout=no_memory_dropout)
    for s, (o, (hidden, written), (other_hidden, _)) in enumerate(zip(ours, ref, other)):
        torch.testing.assert_close(o.hidden, hidden, atol=ATOL, rtol=0, msg=lambda m: f"segment {s}: {m}")
        torch.testing.assert_close(o.memory, written, atol=ATOL, rtol=0,
                                   msg=lambda m: f"segment {s} written memory: {m}")
        assert (o.hidden - other_hidden).abs().max() > 1e-2  # the other placement is told apart
        # written memory is a LayerNorm output: exactly zero entries only where the final dropout dropped them
        zeros = (o.memory == 0).float().mean().item()
        assert zeros > 0.05 if not no_memory_dropout else zeros == 0.0
