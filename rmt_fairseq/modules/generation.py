"""Greedy decoding across segment boundaries, through the segment loop.

Legend: B batch, T segment length, P prompt length (source + <gen>), L total length.

Decoding follows training exactly: a segment's memory is written once the segment is complete, and carried
into the next one. Inside the current segment the (partial) segment is re-run for every new token; the causal
mask makes the prediction at position q independent of the not-yet-generated positions after q.
"""

import torch

from rmt_fairseq.modules.recurrence import RecurrentState, run_segments


@torch.no_grad()
def greedy_decode(model, tokens: torch.Tensor, prompt_len: int, end: int, seg_len: int, pad: int):
    """tokens: B x L with the prompt in [:, :prompt_len]. Fills positions prompt_len .. end-1 greedily.

    Returns (tokens B x L, log-probs B x (end - prompt_len) of the chosen tokens)."""
    seq = tokens.clone()
    seq[:, prompt_len:] = pad
    state = RecurrentState()
    done = 0  # segments whose memory has been written into `state`
    scores = []
    for q in range(prompt_len - 1, end - 1):  # the output at q predicts token q + 1
        s = q // seg_len
        while done < s:
            run_segments(model, seq[:, done * seg_len : (done + 1) * seg_len], None, state, seg_len=seg_len)
            done += 1
        scratch = RecurrentState(memory=state.memory, cache=state.cache)  # the segment is not complete yet
        h = run_segments(model, seq[:, s * seg_len : (s + 1) * seg_len], None, scratch, seg_len=seg_len,
                         return_hidden=True).hidden[0]  # B x T x C
        lp = model.token_log_probs(h[:, q - s * seg_len : q - s * seg_len + 1])[:, 0]  # B x V
        best, idx = lp.max(dim=-1)
        seq[:, q + 1] = idx
        scores.append(best)
    return seq, torch.stack(scores, dim=1) if scores else seq.new_zeros(seq.size(0), 0, dtype=torch.float)
