"""Doors into a trained model besides training (issue 14, items 2 and 3): the hub interface's score() (fresh
memory, identical on repeat, equal to the teacher-forced forward), model(tokens) without hidden state, and
generation with the transformer_lm wrapper under --task rmt_lm past one segment."""

import os
import re
import subprocess

import pytest
import torch

from helpers import REPO, cli, command, tiny_model

TRAIN = ["--user-dir", "user_dir", "--task", "rmt_lm", "--criterion", "rmt_cross_entropy", "--tokens-per-sample", 8,
         "--batch-size", 4, "--optimizer", "adam", "--lr", "2e-3", "--cpu", "--num-workers", 0, "--max-update", 20,
         "--disable-validation", "--no-epoch-checkpoints", "--seed", 1]
TEXT = "K3 f1 f2 f3 f4 f5 f6 f7 K3 K5 f1 f2 f3"  # + </s>: crosses a segment boundary


@pytest.fixture(scope="module")
def rmt_xl(recall_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("rmtxl")
    cli("fairseq-train", recall_data, *TRAIN, "--arch", "rmt_tiny", "--mem-len", 4, "--save-dir", save)
    return save


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


def test_wrapper_under_the_stream_task_generates_past_one_segment(recall_data, tmp_path):
    """fairseq's generator limits hypotheses to the decoder's max positions, which for the transformer_lm wrapper
    were its position table: one segment (here 8); a 26-token prompt came back as its first 7 tokens."""
    cli("fairseq-train", recall_data, *TRAIN, "--arch", "rmt_transformer_lm", "--decoder-layers", 2,
        "--decoder-embed-dim", 32, "--decoder-ffn-embed-dim", 64, "--decoder-attention-heads", 2, "--mem-tokens", 2,
        "--save-dir", tmp_path)
    prompt = "K3 f1 f2 f3 f4 f5 f6 f7 K3 K5 f1 f2 f3 f4 f5 f6 f7 K5 K1 f1 f2 f3 f4 f5 f6 f7"  # 3 x 8 + 2 tokens
    p = subprocess.run([*command("fairseq-interactive"), recall_data, "--user-dir", "user_dir", "--task", "rmt_lm",
                        "--path", str(tmp_path / "checkpoint_last.pt"), "--beam", "3", "--nbest", "3",
                        "--min-len", "30", "--max-len-b", "40", "--cpu"], input=prompt + "\n", capture_output=True,
                       text=True, cwd=REPO, timeout=300, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="2"))
    out = p.stdout + p.stderr
    hyps = [h.split() for h in re.findall(r"^H-0\t\S+\t(.*)$", out, re.M)]
    assert p.returncode == 0 and len(hyps) == 3, out[-3000:]
    assert all(h[:26] == prompt.split() and 30 <= len(h) <= 40 for h in hyps), hyps
