"""Issue 8 end to end through the real CLIs: a stock transformer_lm trained by fairseq-train, wrapped with memory
(rmt_transformer_lm --lm-path / --restore-file), trained on with memory, scored by fairseq-eval-lm (with and
without --context-window); the zero-memory wrapper reproduces the stock checkpoint's eval-lm loss exactly; and
the literal `--task language_modeling --arch rmt_*` usage; and the wrapper under the stream task (--task rmt_lm)."""

import re
import subprocess

import pytest
import torch

from helpers import REPO, cli, command

SIZES = ["--decoder-layers", 2, "--decoder-embed-dim", 32, "--decoder-ffn-embed-dim", 64, "--decoder-attention-heads",
         2, "--dropout", 0.0]
COMMON = ["--task", "language_modeling", "--tokens-per-sample", 32, "--batch-size", 4, "--optimizer", "adam", "--cpu",
          "--num-workers", 0, "--seed", 1, "--log-format", "simple", "--log-interval", 1, "--no-epoch-checkpoints"]


def _eval_lm(data, path, *extra):
    p = cli("fairseq-eval-lm", data, "--user-dir", "user_dir", "--task", "language_modeling", "--path", path,
            "--tokens-per-sample", 32, "--batch-size", 4, "--cpu", "--num-workers", 0, "--gen-subset", "valid", *extra)
    m = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", p.stdout + p.stderr)
    assert m, (p.stdout + p.stderr)[-2000:]
    return m.group(0), float(m.group(1))


@pytest.fixture(scope="module")
def stock(recall_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("stock")
    cli("fairseq-train", recall_data, "--arch", "transformer_lm", *SIZES, *COMMON, "--lr", "2e-3", "--max-update", 30,
        "--save-dir", save)
    return save / "checkpoint_last.pt"


def test_zero_memory_wrapper_reproduces_the_stock_eval_lm_loss(recall_data, stock, tmp_path):
    line, _ = _eval_lm(recall_data, stock)
    # --lr 0: the one update leaves the weights as loaded (the run only writes the wrapper's checkpoint)
    cli("fairseq-train", recall_data, "--user-dir", "user_dir", "--arch", "rmt_transformer_lm", *SIZES, *COMMON,
        "--mem-tokens", 0, "--segment-len", 32, "--lm-path", stock, "--lr", 0, "--max-update", 1,
        "--save-dir", tmp_path / "w0")
    wrapped = tmp_path / "w0" / "checkpoint_last.pt"
    assert torch.load(wrapped, weights_only=False)["cfg"]["model"]["_name"] == "rmt_transformer_lm"
    assert _eval_lm(recall_data, wrapped)[0] == line  # "Loss (base 2): x.xxxx, Perplexity: y.yy", identical


def test_wrap_with_memory_train_on_and_eval_lm(recall_data, stock, tmp_path):
    _, stock_loss = _eval_lm(recall_data, stock)
    p = cli("fairseq-train", recall_data, "--user-dir", "user_dir", "--arch", "rmt_transformer_lm", *SIZES, *COMMON,
            "--mem-tokens", 4, "--segment-len", 8, "--lm-path", stock, "--lr", "1e-3", "--max-update", 40,
            "--criterion", "rmt_cross_entropy", "--checkpoint-segments", "--segment-bptt-unroll", 2,
            "--save-dir", tmp_path / "w4")
    log = p.stdout + p.stderr
    assert "segments of 8 tokens, memory fresh per sample" in log
    assert f"loaded the decoder of {stock}" in log and "4 memory tokens are new" in log
    wrapped = tmp_path / "w4" / "checkpoint_last.pt"
    _, loss = _eval_lm(recall_data, wrapped)
    _, loss_ctx = _eval_lm(recall_data, wrapped, "--context-window", 16)
    # both evaluations score every token of the split once; context only adds earlier (unscored) segments
    assert 0 < loss < stock_loss + 1.0 and 0 < loss_ctx < stock_loss + 1.0
    state = torch.load(wrapped, weights_only=False)["model"]
    assert state["decoder.memory.weight"].shape == (4, 32)
    # generation: fairseq-interactive (through --task rmt_lm: fairseq's language_modeling inference path needs
    # numpy < 2) on a prompt longer than a segment
    g = subprocess.run([*command("fairseq-interactive"), recall_data, "--user-dir", "user_dir", "--task", "rmt_lm",
                        "--tokens-per-sample", "8", "--path", str(wrapped), "--cpu", "--beam", "1", "--max-len-b", "4",
                        "--batch-size", "1"], input="K6 f1 f2 f3 f4 f5 f6 f7 K6 K2 f1\n", capture_output=True,
                       text=True, cwd=REPO, timeout=300)
    assert re.search(r"^H-0\t-?[0-9.]+\t\S", g.stdout, re.M), (g.stdout + g.stderr)[-2000:]
    assert set(state) - {"decoder.memory.weight"} == set(torch.load(stock, weights_only=False)["model"])


def test_restore_file_of_a_transformer_lm_gets_new_memory(recall_data, stock, tmp_path):
    p = cli("fairseq-train", recall_data, "--user-dir", "user_dir", "--arch", "rmt_transformer_lm", *SIZES, *COMMON,
            "--mem-tokens", 2, "--segment-len", 16, "--restore-file", stock, "--reset-optimizer", "--reset-dataloader",
            "--reset-meters", "--lr", "1e-3", "--max-update", 3, "--save-dir", tmp_path / "r")
    log = p.stdout + p.stderr
    assert "decoder.memory.weight is not in the checkpoint" in log
    assert (tmp_path / "r" / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("arch", [["--arch", "rmt_tiny", "--decoder-embed-dim", 32],
                                  ["--arch", "rmt_wt103", "--decoder-layers", 1, "--decoder-embed-dim", 32,
                                   "--decoder-attention-heads", 2, "--decoder-ffn-embed-dim", 32,
                                   "--adaptive-softmax-cutoff", "8,16", "--mem-tokens", 2,
                                   "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp"]],  # as for
                                  # fairseq's transformer_lm_wiki103
                         ids=["rmt_tiny", "rmt_wt103-shaped"])
def test_stock_language_modeling_task_with_rmt_architectures(recall_data, tmp_path, arch):
    """The literal usage: fairseq-train DATA --user-dir user_dir --arch rmt_wt103 --task language_modeling."""
    seg = 32 if arch[1] == "rmt_tiny" else 150  # the presets' segment lengths
    sample = 2 * seg
    p = cli("fairseq-train", recall_data, "--user-dir", "user_dir", *arch, "--task", "language_modeling",
            "--tokens-per-sample", sample, "--batch-size", 2, "--optimizer", "adam", "--lr", "2e-3", "--cpu",
            "--num-workers", 0, "--max-update", 12, "--log-format", "simple", "--log-interval", 1,
            "--save-dir", tmp_path / "ck", "--no-epoch-checkpoints")
    log = p.stdout + p.stderr
    assert f"segments of {seg} tokens, memory fresh per sample" in log
    losses = [float(x) for x in re.findall(r"train_inner .* loss=([0-9.]+)", log)]
    assert losses[-1] < losses[0]
    e = cli("fairseq-eval-lm", recall_data, "--user-dir", "user_dir", "--task", "language_modeling", "--path",
            tmp_path / "ck" / "checkpoint_last.pt", "--tokens-per-sample", sample, "--batch-size", 2, "--cpu",
            "--num-workers", 0, "--context-window", seg)
    assert re.search(r"Loss \(base 2\): [0-9.]+", e.stdout + e.stderr)


def test_wrapper_under_the_stream_task(recall_data, stock, tmp_path):
    """rmt_transformer_lm also runs stream-level (--task rmt_lm), starting from the stock checkpoint; eval-lm
    carries memory across the split and gives the run's last validation loss."""
    p = cli("fairseq-train", recall_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_transformer_lm",
            *SIZES, "--mem-tokens", 2, "--lm-path", stock, "--criterion", "rmt_cross_entropy", "--tokens-per-sample", 8,
            "--batch-size", 4, "--optimizer", "adam", "--lr", "1e-3", "--cpu", "--num-workers", 0, "--max-update", 20,
            "--log-format", "simple", "--save-dir", tmp_path / "s", "--no-epoch-checkpoints")
    valid = [float(x) for x in re.findall(r"valid on 'valid' subset \| loss ([0-9.]+)", p.stdout + p.stderr)]
    assert valid, (p.stdout + p.stderr)[-2000:]
    e = cli("fairseq-eval-lm", recall_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path",
            tmp_path / "s" / "checkpoint_last.pt", "--tokens-per-sample", 8, "--batch-size", 4, "--cpu",
            "--num-workers", 0, "--gen-subset", "valid")
    m = re.search(r"Loss \(base 2\): ([0-9.]+)", e.stdout + e.stderr)
    assert m and float(m.group(1)) == pytest.approx(valid[-1], abs=1.5e-4)


def test_context_window_combinations_name_context_window(recall_data, tmp_path):
    """fairseq-eval-lm takes --context-window off --tokens-per-sample before the model is built; the checks of a
    per-sample model name the flags and values the user gave, and the value they suggest works (issue 14)."""
    cli("fairseq-train", recall_data, "--user-dir", "user_dir", "--arch", "rmt_transformer_lm", *SIZES, *COMMON,
        "--mem-tokens", 2, "--segment-len", 8, "--criterion", "rmt_cross_entropy", "--lr", "1e-3", "--max-update", 2,
        "--save-dir", tmp_path)
    path = tmp_path / "checkpoint_last.pt"

    def eval_lm(sample, context):
        return cli("fairseq-eval-lm", recall_data, "--user-dir", "user_dir", "--task", "language_modeling", "--path",
                   path, "--tokens-per-sample", sample, "--context-window", context, "--batch-size", 4, "--cpu",
                   "--num-workers", 0, "--gen-subset", "valid", check=False)

    for sample, context, names in [(32, 12, ["--context-window 12", "--segment-len 8", "--context-window 8 or 16"]),
                                   (32, 32, ["--context-window 32", "smaller than --tokens-per-sample 32"]),
                                   (36, 8, ["--tokens-per-sample 36", "--segment-len 8"])]:
        p = eval_lm(sample, context)
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert p.returncode == 2 and len(errors) == 1, (p.stdout + p.stderr)[-2000:]
        assert all(n in errors[0] for n in names), errors[0]
        assert "--tokens-per-sample 20" not in errors[0] and "--tokens-per-sample 28" not in errors[0]
    p = eval_lm(32, 8)  # the value the first error suggests
    assert p.returncode == 0 and re.search(r"Loss \(base 2\): [0-9.]+", p.stdout + p.stderr)
    assert "the model was trained on samples of" not in p.stdout + p.stderr
    p = eval_lm(64, 8)  # another sample length than the trained one: said once
    assert p.returncode == 0 and (p.stdout + p.stderr).count("the model was trained on samples of 32") == 1
