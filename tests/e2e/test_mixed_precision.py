"""Mixed precision where this CPU allows it (bfloat16 and, for inference, float16), through the real CLIs:
fairseq-train --bf16 (the plugin turns fairseq 0.12's "--bf16 means TPU" off where torch_xla is missing,
rmt_fairseq/distributed.py), DeepSpeed's bf16 config with 2 ranks, fairseq-eval-lm --bf16 / --fp16 and
fairseq-interactive --bf16 / --fp16 of a trained checkpoint. Each runs and stays within a stated tolerance of
fp32:

- training, 8 SGD updates: the first update's loss (the same weights, only the arithmetic differs) within
  BF16_FIRST bits, every later one within BF16_LATER (rounding of the weights compounds);
- evaluation of one checkpoint: the same tokens scored, the loss within EVAL_BF16 / EVAL_FP16 bits;
- generation: the prompt's per-token scores (P- line) within GEN_BF16 / GEN_FP16 bits each.
bfloat16 keeps 8 significant bits (float16: 11), so a log-probability near 3 bits is off by up to ~0.01."""

import math
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO, THREADS, cli, command, train_losses

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deepspeed"))

BF16_FIRST, BF16_LATER = 0.02, 0.1
EVAL_BF16, EVAL_FP16 = 0.02, 0.005
GEN_BF16, GEN_FP16 = 0.1, 0.02
TRAIN = ["--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy",
         "--tokens-per-sample", 8, "--optimizer", "sgd", "--lr", 0.5, "--log-interval", 1, "--seed", 1, "--cpu",
         "--bptt-unroll", 1, "--log-format", "simple", "--num-workers", 0, "--max-update", 8]
MODELS = {"rmt": [], "xl": ["--mem-tokens", 0, "--mem-len", 8, "--bptt-unroll", 0], "rmt+xl": ["--mem-len", 8],
          # the paper presets' Transformer-XL conventions: XL's adaptive softmax and init, same-length, clamp
          "xl-conventions": ["--embedding-impl", "transformer_xl", "--adaptive-softmax-cutoff", 12, "--init", "normal",
                             "--mem-len", 8, "--read-mem-from-cache", "--same-length", "--clamp-len", 6]}


def _close(got, ref, first, later):
    assert sorted(got) == sorted(ref) == list(range(1, 9)), (got, ref)
    assert all(math.isfinite(v) for v in got.values())
    assert abs(got[1] - ref[1]) <= first and all(abs(got[u] - ref[u]) <= later for u in got), (got, ref)


@pytest.mark.parametrize("name", list(MODELS))
def test_fairseq_train_bf16_on_cpu_stays_near_fp32(recall_data, name):
    args = [recall_data, *TRAIN, *MODELS[name], "--batch-size", 8, "--no-save", "--disable-validation"]
    ref = train_losses(cli("fairseq-train", *args).stdout)
    p = cli("fairseq-train", *args, "--bf16")
    assert "bfloat16 on CPU" in p.stdout + p.stderr
    _close(train_losses(p.stdout), ref, BF16_FIRST, BF16_LATER)


@pytest.mark.deepspeed
def test_deepspeed_bf16_config_on_two_cpu_ranks_stays_near_fp32(recall_data):
    from test_deepspeed_train import deepspeed

    ref = train_losses(cli("fairseq-train", recall_data, *TRAIN, "--batch-size", 8, "--no-save",
                           "--disable-validation").stdout)
    out = deepspeed(recall_data, *TRAIN, "--batch-size", 4, "--no-save", "--disable-validation",
                    "--deepspeed-config", "ds_configs/zero2.json,ds_configs/bf16.json")
    _close(train_losses(out), ref, BF16_FIRST, BF16_LATER)
    # the summary line names what trains: stage, ranks, batch, accumulation and precision (issue 27)
    assert "DeepSpeed: ZeRO stage 2, 2 ranks, micro batch 4 x accumulation 1, bf16, cpu" in out, out[-3000:]


@pytest.fixture(scope="module")
def checkpoint(recall_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("mp")
    cli("fairseq-train", recall_data, *TRAIN, "--mem-len", 4, "--batch-size", 8,
        "--max-update", 40, "--disable-validation", "--save-dir", save, "--no-epoch-checkpoints")
    return save / "checkpoint_last.pt"


def _eval_lm(data, path, *extra):
    p = cli("fairseq-eval-lm", data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path", path, "--batch-size", 8,
            "--tokens-per-sample", 8, "--gen-subset", "valid", "--cpu", "--num-workers", 0, *extra)
    out = p.stdout + p.stderr
    loss = float(re.search(r"Loss \(base 2\): ([0-9.]+)", out).group(1))
    tokens = int(re.search(r"Evaluated ([0-9,]+) tokens", out).group(1).replace(",", ""))
    return loss, tokens, re.search(r"inference in (\w+)", out).group(1)


@pytest.mark.parametrize("flag,tol", [("--bf16", EVAL_BF16), ("--fp16", EVAL_FP16)])
def test_eval_lm_in_half_precision_scores_the_same_tokens_near_fp32(recall_data, checkpoint, flag, tol):
    ref, n, dtype = _eval_lm(recall_data, checkpoint)
    got, m, half = _eval_lm(recall_data, checkpoint, flag)
    assert (dtype, half) == ("float32", {"--bf16": "bfloat16", "--fp16": "float16"}[flag])
    assert m == n and abs(got - ref) <= tol, (got, ref)


def _interactive(data, path, *extra):
    prompt = "K3 f1 f2 f3 f4 f5 f6 f7 K3 K5 f1 f2 f3"  # crosses a segment boundary
    p = subprocess.run([*command("fairseq-interactive"), data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path",
                        str(path), "--beam", "1", "--max-len-b", "24", "--cpu", *extra], input=prompt + "\n",
                       capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=THREADS))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    hyp = re.search(r"^H-0\t\S+\t(.*)$", out, re.M).group(1).split()
    scores = [float(x) for x in re.search(r"^P-0\t(.*)$", out, re.M).group(1).split()]
    assert hyp[:13] == prompt.split() and len(hyp) > 16, out[-2000:]
    return scores[:13], re.search(r"inference in (\w+)", out).group(1)  # the prompt: the same tokens in any precision


@pytest.mark.parametrize("flag,tol", [("--bf16", GEN_BF16), ("--fp16", GEN_FP16)])
def test_interactive_in_half_precision_generates_and_scores_near_fp32(recall_data, checkpoint, flag, tol):
    ref, dtype = _interactive(recall_data, checkpoint)
    got, half = _interactive(recall_data, checkpoint, flag)
    assert (dtype, half) == ("float32", {"--bf16": "bfloat16", "--fp16": "float16"}[flag])
    assert max(abs(a - b) for a, b in zip(got, ref)) <= tol, (got, ref)
