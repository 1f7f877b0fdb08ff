"""Greedy decoding across segment boundaries, through the model's forward.

Legend: B batch, T segment length, P prompt length (source + <gen>), L total length, V vocabulary.

Decoding follows training exactly: a segment's memory is written once the segment is complete, and carried
into the next one. Inside the current segment the (partial) segment is re-run for every new token; the causal
mask makes the prediction at position q independent of the not-yet-generated positions after q.

`unknown_prompt_message` names prompt tokens that a language model's dictionary does not have (fairseq maps them
to <unk> without a word), with the encoding flag the dictionary's symbols call for.
"""

from typing import Callable, Optional, Sequence, Tuple

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


SPACE = "\u2581"  # "▁": sentencepiece's word-start mark, char-level data's space (examples/custom-corpus)


def dictionary_level(dictionary) -> str:
    """The level a fairseq Dictionary's symbols are at: "char" (every symbol one character), "sentencepiece" (pieces
    marked with a leading "▁") or "word"."""
    symbols = [dictionary[i] for i in range(dictionary.nspecial, len(dictionary))]
    symbols = [s for s in symbols if not s.startswith("madeupword")]  # fairseq-preprocess's padding entries
    if symbols and all(len(s) == 1 for s in symbols):
        return "char"
    if any(len(s) > 1 and s.startswith(SPACE) for s in symbols):
        return "sentencepiece"
    return "word"


def unknown_prompt_message(prompts: Sequence[torch.Tensor], dictionary) -> Optional[str]:
    """One line saying how many tokens of `prompts` (token id tensors, as fairseq-interactive and the hub's
    sample()/score() encode them) are <unk>, and how to encode prompts as the training data was; None if none are.

    `dictionary` is a fairseq Dictionary (symbols[i], nspecial, unk(), eos()). Its symbols tell the data's level: all
    single characters -> character level (`--bpe characters`); pieces marked with a leading "▁" -> sentencepiece
    (`--bpe sentencepiece --sentencepiece-model`); otherwise words (the tokenizer the data was made with)."""
    unk, eos = dictionary.unk(), dictionary.eos()
    prompts = [p[:-1] if len(p) and p[-1] == eos else p for p in prompts]  # the </s> encode_line appends
    n_unk = sum(int((p == unk).sum()) for p in prompts)
    if n_unk == 0:
        return None
    total = sum(int(p.numel()) for p in prompts)
    level = dictionary_level(dictionary)
    if level == "char":
        hint = ("this dictionary is character level: pass --bpe characters (the hub: bpe='characters'); with it, "
                "the <unk>s are characters the training data never has")
    elif level == "sentencepiece":
        hint = ("this dictionary holds sentencepiece pieces: pass --bpe sentencepiece --sentencepiece-model "
                "<the model that made the data> (examples/custom-corpus/prepare.sh writes OUT/spm.model; the hub: "
                "bpe='sentencepiece', sentencepiece_model=...)")
    else:
        hint = ("words must be split as in the training data: text split on spaces as given matches only the "
                "same tokens (`Citizen:` is not `Citizen :`); data made with a tokenizer needs the same one "
                "(examples/custom-corpus/prepare.sh LEVEL=word: --tokenizer moses --moses-no-escape "
                "--moses-no-dash-splits; the hub: tokenizer='moses', moses_no_escape=True, "
                "moses_no_dash_splits=True); words the training data never has stay <unk>")
    return (f"{n_unk} of {total} prompt tokens are not in the dictionary and map to <unk>: prompts must be encoded "
            f"as the training data was; {hint}")
