"""Greedy decoding across segment boundaries, through the model's forward.

Legend: B batch, T segment length, P prompt length (source + <gen>), L total length, V vocabulary.

Decoding follows training exactly: a segment's memory is written once the segment is complete, and carried
into the next one. Inside the current segment the (partial) segment is re-run for every new token; the causal
mask makes the prediction at position q independent of the not-yet-generated positions after q.
"""

from typing import Callable, Tuple

import torch

from rmt_fairseq.modules.recurrence import RecurrentState

# tokens B x t (one segment or a prefix of one), the state entering it -> (log-probs B x t x V, state after it)
Step = Callable[[torch.Tensor, RecurrentState], Tuple[torch.Tensor, RecurrentState]]


def model_step(model, seg_len: int) -> Step:
    """A Step through a (possibly wrapped) fairseq model's forward: model(tokens, segment_len, rmt_state)."""

    def step(tokens, state):
        out = model(tokens, segment_len=seg_len, rmt_state=state)
        return model.get_normalized_probs(out, log_probs=True), out[1]["rmt_state"]

    return step


@torch.no_grad()
def greedy_decode(step: Step, tokens: torch.Tensor, prompt_len: int, end: int, seg_len: int, pad: int):
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
            _, state = step(seq[:, done * seg_len : (done + 1) * seg_len], state)
            done += 1
        # the segment is not complete yet: run it from a copy of the state, which is then dropped
        lp, _ = step(seq[:, s * seg_len : (s + 1) * seg_len], state.snapshot())  # B x T x V
        best, idx = lp[:, q - s * seg_len].max(dim=-1)  # B
        seq[:, q + 1] = idx
        scores.append(best.float())
    return seq, torch.stack(scores, dim=1) if scores else seq.new_zeros(seq.size(0), 0, dtype=torch.float)
