"""Doors into a trained model besides training (issue 14, items 2 and 3): the hub interface's score() (fresh
memory, identical on repeat, equal to the teacher-forced forward), model(tokens) without hidden state, and
generation with the transformer_lm wrapper under --task rmt_lm past one segment. Issue 27 item 1: a script run
from another directory, with the installed package only, loads a checkpoint trained with `--user-dir user_dir`."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import cli, tiny_model

TRAIN = ["--user-dir", "user_dir", "--task", "rmt_lm", "--criterion", "rmt_cross_entropy", "--tokens-per-sample", 8,
         "--batch-size", 4, "--optimizer", "adam", "--lr", "2e-3", "--cpu", "--num-workers", 0, "--max-update", 20,
         "--disable-validation", "--no-epoch-checkpoints", "--seed", 1]
TEXT = "K3 f1 f2 f3 f4 f5 f6 f7 K3 K5 f1 f2 f3"  # + </s>: crosses a segment boundary


@pytest.fixture(scope="module")
def rmt_xl(recall_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("rmtxl")
    cli("fairseq-train", recall_data, *TRAIN, "--arch", "rmt_tiny", "--mem-len", 4, "--save-dir", save)
    return save


def test_a_prompt_longer_than_max_len_b_is_said(recall_data, rmt_xl, caplog):
    import user_dir  # noqa: F401
    from rmt_fairseq.models.rmt_lm import RMTLanguageModel

    lm = RMTLanguageModel.from_pretrained(str(rmt_xl), "checkpoint_last.pt", data_name_or_path=recall_data).eval()
    with caplog.at_level("WARNING", logger="rmt_fairseq.tasks.rmt_lm"):
        hypo = lm.generate([lm.encode(TEXT)], beam=1, max_len_b=5)[0][0]
    assert len(hypo["tokens"]) == 6  # fairseq's rule: the first 5 prompt tokens, then </s>
    assert "a prompt of 13 tokens is longer than --max-len-b 5" in caplog.text


# a script a user runs from their own folder: the package registers the plugin (`import rmt_fairseq`, or the import of
# one of its modules), and the user dir the checkpoint saved ("user_dir", relative to the checkout) is taken to be it
SCRIPTS = {
    "import rmt_fairseq, then fairseq's loader": """
import json, sys
import rmt_fairseq  # noqa: F401
from fairseq import checkpoint_utils, utils
from fairseq.hub_utils import GeneratorHubInterface
path, data, text = sys.argv[1:]
state = checkpoint_utils.load_checkpoint_to_cpu(path)
utils.import_user_module(state["cfg"].common)  # what fairseq's tools do with a config: its saved --user-dir
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], {"data": data}, state=state)
hub = GeneratorHubInterface(cfg, task, models).eval()
print(json.dumps({"user_dir": state["cfg"].common.user_dir, "scores": hub.score(text)["positional_scores"].tolist()}))
""",
    "the plugin's hub class alone": """
import json, os, sys
from fairseq import checkpoint_utils
from rmt_fairseq.models.rmt_lm import RMTLanguageModel
path, data, text = sys.argv[1:]
saved = checkpoint_utils.load_checkpoint_to_cpu(path)["cfg"].common.user_dir
lm = RMTLanguageModel.from_pretrained(os.path.dirname(path), os.path.basename(path), data_name_or_path=data,
                                      user_dir=saved).eval()
print(json.dumps({"user_dir": saved, "scores": lm.score(text)["positional_scores"].tolist()}))
""",
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_checkpoint_loads_from_another_directory(recall_data, rmt_xl, tmp_path, script):
    """In a folder outside the checkout, without PYTHONPATH (the editable install is what finds the package): the
    checkpoint trained with --user-dir user_dir scores the text as the hub does here."""
    from rmt_fairseq.models.rmt_lm import RMTLanguageModel

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", SCRIPTS[script], str(rmt_xl / "checkpoint_last.pt"), recall_data, TEXT],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["user_dir"] == "user_dir" and not (tmp_path / "user_dir").exists()  # relative, and not there
    lm = RMTLanguageModel.from_pretrained(str(rmt_xl), "checkpoint_last.pt", data_name_or_path=recall_data).eval()
    assert torch.allclose(torch.tensor(got["scores"]), lm.score(TEXT)["positional_scores"], atol=1e-6)


def test_model_called_twice_gives_the_same_output():
    model = tiny_model(mem_tokens=3, mem_len=4).eval()
    tokens = torch.randint(4, 40, (2, 24))
    with torch.no_grad():
        a, b = model(tokens)[0], model(tokens)[0]
    assert torch.equal(a, b)  # no memory carried from the first call into the second


def test_hub_score_is_fresh_identical_on_repeat_and_teacher_forced(recall_data, rmt_xl):
    import user_dir  # noqa: F401
    from rmt_fairseq.models.rmt_lm import RMTLanguageModel

    lm = RMTLanguageModel.from_pretrained(str(rmt_xl), "checkpoint_last.pt", data_name_or_path=recall_data).eval()
    first = lm.score(TEXT)["positional_scores"]
    lm.score("K5 f1 f2 f3 f4 f5 f6 f7 K5 K1 f1")  # an unrelated text in between
    again = lm.score(TEXT)["positional_scores"]
    assert torch.equal(first, again)
    d = lm.task.source_dictionary
    text = [d.index(t) for t in TEXT.split()]  # as fairseq's language_modeling score(): no final </s>
    src, tgt = torch.tensor([[d.eos()] + text[:-1]]), torch.tensor(text)
    with torch.no_grad():
        lp = torch.log_softmax(lm.models[0](src)[0].float(), -1)[0].gather(-1, tgt[:, None])[:, 0]
    assert first.shape == lp.shape and torch.allclose(first, lp, atol=1e-5)


# the transformer_lm wrapper generating past one segment under --task rmt_lm (a 26-token prompt, beam 3, nbest 3):
# tests/e2e/test_agreement.py (family wrapper_stream)


def test_bpe_word_scores_merge_pieces_across_segments_and_streams(recall_data, tmp_path):
    """fairseq-eval-lm --post-process "@@ " under --task rmt_lm: a word whose pieces straddle two segments (or two
    streams) is one word; the word count is the raw text's and the loss is the total log-probability over it."""
    raw = os.path.join(os.path.dirname(recall_data), "raw")

    def bpe(line):  # K3 f1 -> K@@ 3 f@@ 1: every word two pieces
        return " ".join(f"{w[0]}@@ {w[1:]}" for w in line.split())

    train = [bpe(line) for line in open(os.path.join(raw, "train.txt")).read().splitlines()[:300]]
    test = open(os.path.join(raw, "test.txt")).read().splitlines()[:10]  # 10 lines x (18 pieces + </s>)
    (tmp_path / "train.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "test.txt").write_text("\n" + "\n".join(bpe(line) for line in test) + "\n")  # first token </s>
    data = tmp_path / "bin"
    cli("fairseq-preprocess", "--only-source", "--trainpref", tmp_path / "train.txt", "--testpref",
        tmp_path / "test.txt", "--destdir", data, "--workers", 1)
    cli("fairseq-train", data, *TRAIN, "--arch", "rmt_tiny", "--max-update", 5, "--save-dir", tmp_path / "ck")

    def eval_lm(*extra):
        p = cli("fairseq-eval-lm", data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path",
                tmp_path / "ck" / "checkpoint_last.pt", "--batch-size", 2, "--gen-subset", "test", "--cpu",
                "--num-workers", 0, *extra)
        return p.stdout + p.stderr

    # per token (no post-processing): 190 targets in 2 streams of 95, segments of 8; token 95 ends stream 0
    # in the middle of a word (every word is two pieces, so odd positions are first pieces)
    out = eval_lm("--output-word-probs")
    lines = re.findall(r"fairseq_cli\.eval_lm[ |:]+\d+ (.*)$", out, re.M)
    tokens = [(w, float(x)) for line in lines for w, x in re.findall(r"(\S+) \[(-?[0-9.]+)\]", line)]
    assert len(tokens) == 190 and tokens[94][0].endswith("@@")
    total = sum(x for _, x in tokens)
    words = sum(len(line.split()) + 1 for line in test)  # each line's words and its </s>
    out = eval_lm("--post-process", "@@ ")
    assert re.search(rf"\b{words} words \(--post-process '@@ '", out), out[-2000:]
    loss = float(re.search(r"Loss \(base 2\): ([0-9.]+)", out).group(1))
    assert abs(loss - (-total / words / math.log(2))) < 1e-4 + 5e-5


@pytest.mark.parametrize("kw", [dict(mem_tokens=3), dict(mem_tokens=0, mem_len=8), dict(mem_tokens=3, mem_len=4)])
def test_a_long_text_scored_in_chunks_with_its_state_equals_one_call(kw):
    """The README's way to score a long text as one stream from Python: model(chunk, rmt_state=state), the
    state returned in extra["rmt_state"] passed to the next chunk (chunks of whole segments)."""
    from rmt_fairseq.modules.recurrence import RecurrentState

    model = tiny_model(**kw).eval()  # segment length 8
    tokens = torch.randint(4, 40, (1, 48))
    with torch.no_grad():
        whole = model(tokens)[0]
        state, parts = RecurrentState(), []
        for chunk in tokens.split(16, dim=1):
            logits, extra = model(chunk, rmt_state=state)
            state = extra["rmt_state"]
            parts.append(logits)
    assert torch.allclose(torch.cat(parts, 1), whole, atol=1e-5)
