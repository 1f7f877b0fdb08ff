"""Greedy decoding across segment boundaries matches the teacher-forced forward on the same sequence."""

import pytest
import torch

from helpers import tiny_model
from rmt_fairseq.modules.generation import greedy_decode, model_step
from rmt_fairseq.modules.recurrence import RecurrentState, run_segments


@pytest.mark.parametrize("mem_tokens,mem_len", [(3, 0), (3, 6), (0, 6)])
def test_greedy_tokens_and_scores_equal_teacher_forced(mem_tokens, mem_len):
    model = tiny_model(mem_tokens=mem_tokens, mem_len=mem_len, seed=5).eval()
    T, P, L = 8, 5, 32  # prompt of 5 tokens, 27 generated: crosses three segment boundaries
    torch.manual_seed(0)
    prompt = torch.randint(4, 40, (3, L))
    seq, scores = greedy_decode(model_step(model, T), prompt, prompt_len=P, end=L, seg_len=T, pad=1)
    assert torch.equal(seq[:, :P], prompt[:, :P])
    hidden = run_segments(model.decoder, seq, None, RecurrentState(), seg_len=T, return_hidden=True).hidden
    lp = model.decoder.token_log_probs(torch.cat(hidden, 1))  # B x L x V
    # the teacher-forced prediction at q is the token greedy decoding put at q + 1, with the same score
    assert torch.equal(lp[:, P - 1 : L - 1].argmax(-1), seq[:, P:L])
    assert torch.allclose(lp[:, P - 1 : L - 1].max(-1).values, scores, atol=1e-5)


@pytest.mark.parametrize("mem_tokens,mem_len,layout", [(3, 0, "rmt"), (3, 6, "rmt"), (0, 6, "rmt"), (0, 0, "rmt"),
                                                       (3, 0, "mt")])
def test_incremental_decoding_equals_the_full_forward_across_segments(mem_tokens, mem_len, layout):
    """fairseq's incremental path (one query row per new token, cached keys/values inside the segment,
    completed segments through the segment loop) gives the teacher-forced logits, over 3 boundaries."""
    model = tiny_model(mem_tokens=mem_tokens, mem_len=mem_len, memory_layout=layout, seed=6).eval()
    torch.manual_seed(1)
    x = torch.randint(4, 40, (3, 29))  # segment length 8: boundaries after 8, 16, 24
    with torch.no_grad():
        full, _ = model.decoder(x)  # no incremental state: the segment loop over the whole prefix
        inc_state, steps = {}, []
        for t in range(1, 30):
            if t in (5, 17):  # a beam-search reorder mid-way (identity permutation must change nothing)
                model.decoder.reorder_incremental_state(inc_state, torch.arange(3))
            out, _ = model.decoder(x[:, :t], incremental_state=inc_state)
            steps.append(out[:, -1])
        inc = torch.stack(steps, 1)
    assert torch.allclose(inc, full, atol=1e-4), (inc - full).abs().max()


def test_reorder_moves_the_streams_state():
    model = tiny_model(seed=7).eval()
    x = torch.randint(4, 40, (2, 12))
    with torch.no_grad():
        st = {}
        model.decoder(x[:, :10], incremental_state=st)
        model.decoder.reorder_incremental_state(st, torch.tensor([1, 0]))
        swapped, _ = model.decoder(torch.cat([x[:, :10].flip(0), x[:, 10:11].flip(0)], 1), incremental_state=st)
        ref, _ = model.decoder(torch.cat([x[:, :10].flip(0), x[:, 10:11].flip(0)], 1))
    assert torch.allclose(swapped[:, -1], ref[:, -1], atol=1e-4)


@pytest.mark.parametrize("mem_tokens,mem_len", [(3, 0), (0, 8), (3, 4)])
def test_beam_reorders_of_the_generators_token_buffer_across_segments(mem_tokens, mem_len):
    """As fairseq's SequenceGenerator: the decoder gets views of one token buffer, which beam search reorders in
    place before it reorders the incremental state. Found by the agreement test (issue 14): the first token of a
    segment was kept as a view, so it was reordered twice, and segments after the second boundary were wrong."""
    model = tiny_model(mem_tokens=mem_tokens, mem_len=mem_len, seed=8).eval()
    torch.manual_seed(2)
    B, N = 3, 30  # segment length 8: boundaries after 8, 16, 24
    buf = torch.randint(4, 40, (B, N))
    inc, worst = {}, 0.0
    with torch.no_grad():
        for t in range(1, N + 1):
            out = model.decoder(buf[:, :t], incremental_state=inc)[0][:, -1]
            worst = max(worst, (out - model.decoder(buf[:, :t].clone())[0][:, -1]).abs().max().item())
            order = torch.randperm(B)
            buf[:, :t] = buf[:, :t].index_select(0, order)  # in place, as the generator does
            model.decoder.reorder_incremental_state(inc, order)
    assert worst < 1e-4
