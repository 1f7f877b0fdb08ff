"""Truncated BPTT, tested on gradients (test 3 of issue 2).

Segment j is built from its own range of token ids, so d loss / d embedding(segment j) is the gradient on
that range's rows of the (untied) embedding table: non-zero iff the loss reaches segment j. The truncation
tests run on both decoder families through the one loop: rmt_lm (Transformer-XL backbone) and
rmt_transformer_lm (fairseq's own TransformerDecoder with memory, issue 8)."""

import pytest
import torch

from helpers import armt_with_values, tiny_model, tiny_wrapper
from rmt_fairseq.modules.recurrence import RecurrentState, run_segments

T, R, B = 8, 6, 2  # segment length, token ids per segment, streams
FIRST = 4  # first non-special id


def segment_tokens(j: int, gen) -> torch.Tensor:
    return torch.randint(FIRST + j * R, FIRST + (j + 1) * R, (B, T), generator=gen)


def reached(model, loss, num_segments):
    """Which segments' embeddings the loss has a non-zero gradient on."""
    model.zero_grad()
    loss.backward(retain_graph=True)
    g = model.decoder.embed_tokens.weight.grad
    if g is None:
        return [False] * num_segments
    return [bool(g[FIRST + j * R : FIRST + (j + 1) * R].abs().sum() > 0) for j in range(num_segments)]


FAMILIES = ["rmt_lm", "rmt_transformer_lm", "armt"]


def _model(family="rmt_lm", **kw):
    S = 9
    if family == "rmt_transformer_lm":
        return tiny_wrapper(vocab=FIRST + S * R, **kw), S
    if family == "armt":  # the only path between segments is the associative memory (no token memory, no cache)
        return armt_with_values(tiny_model(vocab=FIRST + S * R, share_decoder_input_output_embed=False,
                                           associative_memory=True, d_mem=8, **kw)), S
    return tiny_model(vocab=FIRST + S * R, share_decoder_input_output_embed=False, **kw), S


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("K", [0, 1, 2])
def test_block_mode_reaches_back_to_the_block_start(K, family):
    model, S = _model(family)
    gen = torch.Generator().manual_seed(0)
    segs = [segment_tokens(j, gen) for j in range(S)]
    target = torch.full((B, T), 3)
    state = RecurrentState()
    s = 0
    while s + K + 1 <= S:
        x = torch.cat(segs[s : s + K + 1], dim=1)
        out = run_segments(model.decoder, x, target.repeat(1, K + 1), state, seg_len=T, bptt_unroll=K)
        for p, loss in enumerate(out.losses):  # p = position of segment s+p inside its block
            got = reached(model, loss, S)
            want = [s <= j <= s + p for j in range(S)]  # j' = s+p-j <= p, and never before the block
            assert got == want, (K, s + p)
        s += K + 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("K", [0, 1, None])
def test_truncation_inside_a_call_and_between_calls(K, family):
    """One call of 2K+3 segments (two blocks and part of a third; K None: every segment of the call, as the
    per-sample tasks), then a call of one segment: a loss reaches back to the start of its block inside the
    call, and never into the call before."""
    model, S = _model(family)
    gen = torch.Generator().manual_seed(1)
    segs = [segment_tokens(j, gen) for j in range(S)]
    target = torch.full((B, T), 3)
    n = 2 * (K or 0) + 3
    state = RecurrentState()
    out = run_segments(model.decoder, torch.cat(segs[:n], dim=1), target.repeat(1, n), state, seg_len=T,
                       bptt_unroll=K)
    for j, loss in enumerate(out.losses):
        start = 0 if K is None else j - j % (K + 1)
        assert reached(model, loss, S) == [start <= i <= j for i in range(S)], (K, j)
    out = run_segments(model.decoder, segs[n], target, state, seg_len=T, bptt_unroll=K)
    assert reached(model, out.losses[0], S) == [i == n for i in range(S)], K


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("K", [1, 2, 3])
def test_sliding_mode_reaches_back_exactly_K(K, family):
    model, S = _model(family)
    gen = torch.Generator().manual_seed(0)
    segs = [segment_tokens(j, gen) for j in range(S)]
    target = torch.full((B, T), 3)
    state = RecurrentState()
    for s in range(S):
        out = run_segments(model.decoder, segs[s], target, state, seg_len=T, bptt_unroll=K, bptt_mode="sliding")
        assert len(out.losses) == 1  # loss on the newest segment only
        got = reached(model, out.losses[0], S)
        assert got == [s - K <= j <= s for j in range(S)], (K, s)


@pytest.mark.parametrize("family", FAMILIES[:2])
def test_sliding_mode_keeps_training_the_initial_memory_inside_the_window(family):
    model, S = _model(family)
    gen = torch.Generator().manual_seed(0)
    state = RecurrentState()
    target = torch.full((B, T), 3)
    for s in range(4):
        out = run_segments(model.decoder, segment_tokens(s, gen), target, state, seg_len=T, bptt_unroll=2,
                           bptt_mode="sliding")
        model.zero_grad()
        out.losses[0].backward()
        g = model.decoder.memory.weight.grad
        got = g is not None and g.abs().sum() > 0
        assert bool(got) == (s <= 2), s  # the learned initial memory is inside the window for s <= K


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("armt", [False, True])
@pytest.mark.parametrize("mode,K,mem_len,dropout", [("block", 3, 0, 0.0), ("block", 2, 4, 0.1),
                                                    ("sliding", 2, 0, 0.1), ("sliding", 2, 4, 0.0)])
def test_checkpoint_segments_gives_the_same_gradients(mode, K, mem_len, dropout, armt):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(FIRST, 40, (B, 4 * T), generator=gen)
    y = torch.randint(FIRST, 40, (B, 4 * T), generator=gen)
    results = []
    for ckpt in (False, True):
        model = tiny_model(mem_len=mem_len, dropout=dropout, seed=0, associative_memory=armt, d_mem=8).train()
        if armt:
            armt_with_values(model)
        torch.manual_seed(123)  # same dropout masks in both runs
        state = RecurrentState()
        total = 0.0
        seg_per_call = K + 1 if mode == "block" else 1
        for s in range(0, 4, seg_per_call):
            cols = slice(s * T, (s + seg_per_call) * T)
            out = run_segments(model.decoder, x[:, cols], y[:, cols], state, seg_len=T, bptt_unroll=K,
                               bptt_mode=mode, checkpoint_segments=ckpt)
            loss = torch.stack(out.losses).sum()
            loss.backward()
            total += loss.item()
        results.append((total, _grads(model), state.assoc if armt else [state.memory]))
    (l0, g0, m0), (l1, g1, m1) = results
    assert abs(l0 - l1) < 1e-4
    assert g0.keys() == g1.keys()
    assert not armt or any(n.startswith("decoder.assoc_layers.") for n in g0)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-5, rtol=1e-4), n
    for a, b in zip(m0, m1):
        assert torch.allclose(a, b, atol=1e-6)


def test_eval_without_grad_ignores_mode_and_carries_memory():
    model = tiny_model().eval()
    x = torch.randint(FIRST, 40, (B, 4 * T))
    outs = []
    with torch.no_grad():
        for mode in ("block", "sliding"):
            st = RecurrentState()
            h = [run_segments(model.decoder, x[:, s * T:(s + 1) * T], None, st, seg_len=T, bptt_unroll=2,
                              bptt_mode=mode, return_hidden=True).hidden[0] for s in range(4)]
            outs.append(torch.cat(h, 1))
        whole = run_segments(model.decoder, x, None, RecurrentState(), seg_len=T, return_hidden=True).hidden
    assert torch.equal(outs[0], outs[1])
    assert torch.allclose(outs[0], torch.cat(whole, 1), atol=1e-6)


def test_checkpoint_activations_per_layer_gives_the_same_gradients():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(FIRST, 40, (B, 3 * T), generator=gen)
    y = torch.randint(FIRST, 40, (B, 3 * T), generator=gen)
    grads = []
    for ckpt in (False, True):
        model = tiny_model(mem_len=4, dropout=0.1, checkpoint_activations=ckpt).train()
        torch.manual_seed(5)
        out = run_segments(model.decoder, x, y, RecurrentState(), seg_len=T, bptt_unroll=2)
        torch.stack(out.losses).sum().backward()
        grads.append(_grads(model))
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode,K", [("sliding", 1), ("sliding", 3), ("block", 2)])
def test_training_forward_scores_what_one_pass_without_gradients_scores(family, mode, K):
    """The values truncation computes: every segment scored in training (sliding: after recomputing its window
    from the states saved when those segments were first seen; block: blocks of K+1) has the loss of the same
    segment in one pass over the stream without gradients. A window entry holding the state after its segment
    instead of before would write that segment twice (the associative memory) and fail here."""
    model, S = _model(family)
    model.eval()  # no dropout: the two passes must compute the same numbers
    gen = torch.Generator().manual_seed(2)
    segs = [segment_tokens(s % S, gen) for s in range(7)]
    target = torch.full((B, T), 3)
    with torch.no_grad():
        whole = run_segments(model.decoder, torch.cat(segs, 1), target.repeat(1, 7), RecurrentState(), seg_len=T)
    state, got = RecurrentState(), []
    per_call = 1 if mode == "sliding" else K + 1
    for s in range(0, 7, per_call):
        call = segs[s : s + per_call]
        out = run_segments(model.decoder, torch.cat(call, 1), target.repeat(1, len(call)), state, seg_len=T,
                           bptt_unroll=K, bptt_mode=mode)
        got += [float(x) for x in out.losses]
    assert len(got) == 7
    for a, b in zip(got, whole.losses):
        assert abs(a - float(b)) <= 1e-5 * max(1.0, abs(float(b))), (got, [float(x) for x in whole.losses])
