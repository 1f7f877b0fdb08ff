"""The GPU suite (`pytest -m gpu`; skipped without CUDA; scripts/gpu_suite.sh runs it on one GPU in under five
minutes): what CPU ranks cannot show. fairseq-train in fp32 / fp16 / bf16 (RMT, XL-only, wt103-shaped);
rmt-deepspeed-train over NCCL with ZeRO-2/3 in bf16; a mid-epoch resume on the GPU (the XL cache and memory
come back onto the device); fairseq-eval-lm fp16 vs fp32 (the same tokens, |delta| < 0.01 bits);
fairseq-interactive --fp16.

Tolerances: the first update's loss (same weights, only the arithmetic differs) within FIRST bits, later ones
within LATER; half-precision evaluation within 0.01 bits (the issue's bound)."""

import os
import re
import subprocess

import pytest
import torch

from helpers import BIN, REPO, cli, command, make_band_data, make_recall_data, train_losses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FIRST, LATER, EVAL = 0.02, 0.1, 0.01
TRAIN = ["--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy",
         "--tokens-per-sample", 8, "--optimizer", "sgd", "--lr", 0.5, "--log-interval", 1, "--seed", 1,
         "--bptt-unroll", 1, "--log-format", "simple", "--num-workers", 0, "--batch-size", 8]
WT103_SHAPED = ["--adaptive-input", "--adaptive-softmax-cutoff", "20,32", "--tie-adaptive-weights",
                "--tie-adaptive-proj", "--adaptive-softmax-factor", 2, "--adaptive-input-factor", 2]
MODELS = {"rmt": [], "xl": ["--mem-tokens", 0, "--mem-len", 8, "--bptt-unroll", 0], "wt103-shaped": WT103_SHAPED}
PRECISIONS = {"fp16": ["--fp16"], "bf16": ["--bf16"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    return {"recall": make_recall_data(str(root / "recall")), "band": make_band_data(str(root / "band"))}


def _data(data, name):
    return data["band"] if name == "wt103-shaped" else data["recall"]


def _close(got, ref):
    assert sorted(got) == sorted(ref) and len(got) == 8, (got, ref)
    assert abs(got[1] - ref[1]) <= FIRST and all(abs(got[u] - ref[u]) <= LATER for u in got), (got, ref)


@pytest.fixture(scope="module")
def fp32(data):
    return {name: train_losses(cli("fairseq-train", _data(data, name), *TRAIN, *extra, "--max-update", 8,
                                   "--no-save", "--disable-validation").stdout)
            for name, extra in MODELS.items()}


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("name", list(MODELS))
def test_fairseq_train_half_precision_on_gpu(data, fp32, name, precision):
    p = cli("fairseq-train", _data(data, name), *TRAIN, *MODELS[name], *PRECISIONS[precision], "--max-update", 8,
            "--no-save", "--disable-validation")
    _close(train_losses(p.stdout), fp32[name])


def _deepspeed(*args, port):
    script = os.path.join(BIN, "rmt-deepspeed-train")
    target = [script] if os.path.exists(script) else ["--module", "rmt_fairseq.deepspeed.train"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([*command("deepspeed"), "--num_gpus", "1", "--master_port", str(port), *target,
                        *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    return p.stdout + p.stderr


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_nccl_zero_bf16(data, fp32, stage):
    out = _deepspeed(data["band"], *TRAIN, *WT103_SHAPED, "--max-update", 8, "--no-save", "--disable-validation",
                     "--deepspeed-config", f"ds_configs/zero{stage}.json,ds_configs/bf16.json", port=29750 + stage)
    assert "nccl" in out.lower(), out[-3000:]
    _close(train_losses(out), fp32["wt103-shaped"])


@pytest.mark.parametrize("name,extra", [("xl", ["--mem-tokens", 0, "--mem-len", 8, "--bptt-unroll", 0]),
                                        ("rmt+xl", ["--mem-len", 8])])
def test_mid_epoch_resume_on_gpu(data, tmp_path, name, extra):
    args = [data["recall"], *TRAIN, *extra, "--save-interval-updates", 4, "--disable-validation",
            "--no-epoch-checkpoints"]
    full = train_losses(cli("fairseq-train", *args, "--max-update", 12, "--save-dir", tmp_path / "a").stdout)
    cli("fairseq-train", *args, "--max-update", 8, "--save-dir", tmp_path / "b")
    resumed = train_losses(cli("fairseq-train", *args, "--max-update", 12, "--save-dir", tmp_path / "b").stdout)
    assert sorted(resumed) == [9, 10, 11, 12], resumed
    assert all(abs(resumed[u] - full[u]) <= 2e-4 for u in resumed), (full, resumed)


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt")
    cli("fairseq-train", data["recall"], *TRAIN, "--mem-len", 4, "--max-update", 40, "--disable-validation",
        "--save-dir", save)
    return save / "checkpoint_last.pt"


def _eval_lm(data, path, *extra):
    out = cli("fairseq-eval-lm", data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path", path,
              "--batch-size", 8, "--tokens-per-sample", 8, "--gen-subset", "valid", "--num-workers", 0, *extra)
    text = out.stdout + out.stderr
    return (float(re.search(r"Loss \(base 2\): ([0-9.]+)", text).group(1)),
            int(re.search(r"Evaluated ([0-9,]+) tokens", text).group(1).replace(",", "")))


def test_eval_lm_fp16_vs_fp32_on_gpu(data, checkpoint):
    ref, n = _eval_lm(data["recall"], checkpoint)
    got, m = _eval_lm(data["recall"], checkpoint, "--fp16")
    assert m == n and abs(got - ref) < EVAL, (got, ref)


def test_interactive_fp16_on_gpu(data, checkpoint):
    prompt = "K3 f1 f2 f3 f4 f5 f6 f7 K3 K5 f1 f2 f3"
    p = subprocess.run([*command("fairseq-interactive"), data["recall"], "--user-dir", "user_dir", "--task", "rmt_lm",
                        "--path", str(checkpoint), "--beam", "1", "--max-len-b", "24", "--fp16"], input=prompt + "\n",
                       capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    hyp = re.search(r"^H-0\t\S+\t(.*)$", out, re.M).group(1).split()
    assert hyp[:13] == prompt.split() and len(hyp) > 16, out[-2000:]
