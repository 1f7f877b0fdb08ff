"""Reported metrics: base-2 loss per token and ppl as fairseq's cross_entropy, bpc for char-level data."""

import math

from fairseq.logging import metrics

from rmt_fairseq.criterions.rmt_cross_entropy import RMTCrossEntropyCriterion


def _reduce(logs):
    with metrics.aggregate() as agg:
        RMTCrossEntropyCriterion.reduce_metrics(logs)
        return agg.get_smoothed_values()


def test_loss_is_base2_per_token_and_bpc_only_for_char_level():
    logs = [{"loss": 10 * math.log(2) * 3, "ntokens": 10}, {"loss": 20 * math.log(2) * 3, "ntokens": 20}]
    word = _reduce([dict(x, char_level=0) for x in logs])
    assert abs(word["loss"] - 3.0) < 1e-4 and abs(word["ppl"] - 8.0) < 1e-2 and "bpc" not in word
    char = _reduce([dict(x, char_level=1) for x in logs])
    assert abs(char["bpc"] - 3.0) < 1e-4


def test_char_level_dictionary_is_detected(tmp_path):
    from fairseq.data import Dictionary

    from rmt_fairseq.tasks.rmt_lm import RMTLMConfig, RMTLMTask

    chars, words = Dictionary(), Dictionary()
    for c in "abc":
        chars.add_symbol(c)
    for w in ["ab", "c"]:
        words.add_symbol(w)
    assert RMTLMTask(RMTLMConfig(data=str(tmp_path), batch_size=2), chars).char_level
    assert not RMTLMTask(RMTLMConfig(data=str(tmp_path), batch_size=2), words).char_level
    chars.finalize(padding_factor=8)  # fairseq-preprocess's default pads with madeupword0000 ...: still chars
    assert chars[len(chars) - 1].startswith("madeupword")
    assert RMTLMTask(RMTLMConfig(data=str(tmp_path), batch_size=2), chars).char_level
