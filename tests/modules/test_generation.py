"""Greedy decoding across segment boundaries matches the teacher-forced forward on the same sequence."""

import pytest
import torch

from helpers import tiny_model
from rmt_fairseq.modules.generation import greedy_decode
from rmt_fairseq.modules.recurrence import RecurrentState, run_segments


@pytest.mark.parametrize("mem_tokens,mem_len", [(3, 0), (3, 6), (0, 6)])
def test_greedy_tokens_and_scores_equal_teacher_forced(mem_tokens, mem_len):
    model = tiny_model(mem_tokens=mem_tokens, mem_len=mem_len, seed=5).eval()
    T, P, L = 8, 5, 32  # prompt of 5 tokens, 27 generated: crosses three segment boundaries
    torch.manual_seed(0)
    prompt = torch.randint(4, 40, (3, L))
    seq, scores = greedy_decode(model.decoder, prompt, prompt_len=P, end=L, seg_len=T, pad=1)
    assert torch.equal(seq[:, :P], prompt[:, :P])
    hidden = run_segments(model.decoder, seq, None, RecurrentState(), seg_len=T, return_hidden=True).hidden
    lp = model.decoder.token_log_probs(torch.cat(hidden, 1))  # B x L x V
    # the teacher-forced prediction at q is the token greedy decoding put at q + 1, with the same score
    assert torch.equal(lp[:, P - 1 : L - 1].argmax(-1), seq[:, P:L])
    assert torch.allclose(lp[:, P - 1 : L - 1].max(-1).values, scores, atol=1e-5)
