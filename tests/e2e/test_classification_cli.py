"""End to end for the encoder RMT (issue 7) through the real CLIs: rmt-data memorization -> fairseq-train with the
segment curriculum -> fairseq-validate -> rmt-extrapolate-classify over many segments; raw-text documents
(tsv) with rmt-data classification-dict; a RoBERTa checkpoint made by fairseq-train --task masked_lm,
fine-tuned with --roberta-path."""

import json
import random
import re

import torch

from helpers import cli

CLS = ["--user-dir", "user_dir", "--task", "rmt_long_classification", "--arch", "rmt_encoder_tiny", "--criterion",
       "rmt_classification", "--batch-size", 16, "--optimizer", "adam", "--lr", "1e-3", "--cpu", "--seed", 1,
       "--log-format", "simple", "--log-interval", 5, "--no-epoch-checkpoints", "--num-workers", 0,
       "--max-epoch", 100]


def _accuracies(log: str, subset="valid"):
    return [float(x) for x in re.findall(rf"valid on '{subset}' subset \|.*? accuracy ([0-9.]+)", log)]


def test_memorization_curriculum_validate_and_extrapolate(tmp_path):
    data, save = tmp_path / "data", tmp_path / "ckpt"
    cli("rmt-data", "memorization", "fact_detection", "--out", data, "--train-size", 800, "--valid-size", 64,
        "--test-size", 32)
    # threshold 0: every validation adds a segment, so the CLI run goes through three stages
    p = cli("fairseq-train", data, *CLS, "--tokens-per-sample", 16, "--num-segments", 1, "--segment-curriculum",
            "--max-num-segments", 3, "--curriculum-threshold", 0, "--max-update", 30,
            "--validate-interval-updates", 10, "--save-dir", save)
    log = p.stdout + p.stderr
    assert re.findall(r"now (\d) segments per sample", log) == ["2", "3"], log[-3000:]
    assert "segment length 16 (16-token documents in 1 segment); --segment-curriculum grows them to 3" in log
    # the run's one summary line (issue 27): rmt_encoder_tiny's 4 memory tokens, the layout, --batch-size 16
    assert re.findall(r"\| training with (.*)$", log, re.M) == [
        "memory: RMT, 4 memory tokens (--mem-tokens) whose outputs are the next segment's memory, fresh per document; "
        "segment length 16 (16-token documents in 1 segment); --segment-curriculum grows them to 3 segments; 16 "
        "documents (--batch-size); BPTT through every segment boundary of a document (--bptt-unroll not set)"]
    assert "now 3 segments per sample: 48-token documents in 3 segments" in log
    assert len(_accuracies(log)) >= 3
    state = torch.load(save / "checkpoint_last.pt", weights_only=False)
    assert state["extra_state"]["RMTLongClassificationTask"] == {"num_segments": 3}
    # what the encoder was trained with travels in its checkpoint, as for the LM families (issue 28)
    assert state["cfg"]["model"]["trained_segment_len"] == 16
    assert len(state["cfg"]["model"]["dictionary_fingerprint"]) == 16

    v = cli("fairseq-validate", data, *CLS[:4], *CLS[6:8], "--path", save / "checkpoint_last.pt",
            "--valid-subset", "test", "--batch-size", 16, "--cpu", "--tokens-per-sample", 16, "--num-workers", 0)
    acc = _accuracies(v.stdout + v.stderr, "test")
    assert len(acc) == 1 and 0 <= acc[0] <= 100

    out = tmp_path / "ex"
    e = cli("rmt-extrapolate-classify", "--path", save / "checkpoint_last.pt", "--data", data, "--out", out,
            "--segments", "3,12,200", "--num-docs", 8, "--batch-size", 8, "--chunk-segments", 32)
    res = json.loads((out / "extrapolation.json").read_text())
    assert res["trained_segments"] == 3 and res["segment_len"] == res["trained_segment_len"] == 16
    assert res["mem_tokens"] == 4 and res["num_classes"] == 6 and res["chance"] == 100 / 6
    assert [r["tokens"] for r in res["rows"]] == [48, 192, 3200]
    assert [r["x_trained"] for r in res["rows"]] == [1, 4, 200 / 3]
    assert all(0 <= r["accuracy"] <= 100 and r["us_per_token"] > 0 and r["rss_mb"] > 0 for r in res["rows"])
    assert (out / "extrapolation.png").stat().st_size > 0
    assert "200       3200" in e.stdout and " | INFO | " not in e.stdout  # the table; progress on stderr


def test_raw_text_documents_train_and_validate(tmp_path):
    """Hyperpartisan-style input: one `label<TAB>text` per line; the class is decided by a word somewhere in a
    multi-segment document."""
    rng = random.Random(0)
    filler = [f"w{i}" for i in range(50)]
    for split, n in [("train", 200), ("valid", 40)]:
        lines = []
        for _ in range(n):
            label = rng.choice(["left", "right"])
            words = [rng.choice(filler) for _ in range(rng.randint(20, 60))]
            words.insert(rng.randrange(len(words)), "LEFTY" if label == "left" else "RIGHTY")
            lines.append(f"{label}\t{' '.join(words)}")
        (tmp_path / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    c = cli("rmt-data", "classification-dict", tmp_path)
    assert "2 classes: left right" in c.stdout
    p = cli("fairseq-train", tmp_path, *CLS, "--tokens-per-sample", 16, "--max-update", 40,
            "--validate-interval-updates", 20, "--save-dir", tmp_path / "ckpt")
    log = p.stdout + p.stderr
    assert "2 classes: left right" in log
    assert len(_accuracies(log)) >= 2
    # documents of 21..61 tokens in segments of 16: up to 4 segments per document
    assert re.search(r"num_segments 4\b", log), log[-2000:]


def test_roberta_checkpoint_is_fine_tuned_with_memory(tmp_path):
    """A RoBERTa trained by fairseq itself (masked_lm), then --roberta-path: the encoder starts from it."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(300)) + "\n")
    mlm = tmp_path / "mlm-bin"
    cli("fairseq-preprocess", "--only-source", "--trainpref", text, "--validpref", text, "--destdir", mlm,
        "--workers", 1)
    sizes = ["--encoder-layers", 2, "--encoder-embed-dim", 64, "--encoder-ffn-embed-dim", 128,
             "--encoder-attention-heads", 2, "--max-positions", 128]
    cli("fairseq-train", mlm, "--task", "masked_lm", "--arch", "roberta", *sizes, "--tokens-per-sample", 64,
        "--criterion", "masked_lm", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", 8, "--max-update", 5,
        "--cpu", "--save-dir", tmp_path / "roberta", "--no-epoch-checkpoints", "--num-workers", 0)
    roberta = tmp_path / "roberta" / "checkpoint_last.pt"

    cls = tmp_path / "cls"
    cls.mkdir()
    (cls / "dict.txt").write_text((mlm / "dict.txt").read_text())  # the checkpoint's own dictionary
    for split, n in [("train", 64), ("valid", 16)]:
        (cls / f"{split}.tsv").write_text("\n".join(
            f"{lab}\t{' '.join(rng.choice(words) for _ in range(40))} {'w1' if lab == 'a' else 'w2'}"
            for lab in (rng.choice("ab") for _ in range(n))) + "\n")
    p = cli("fairseq-train", cls, *CLS, *sizes, "--roberta-path", roberta, "--tokens-per-sample", 24,
            "--max-update", 4, "--save-dir", tmp_path / "ckpt")
    log = p.stdout + p.stderr
    assert f"initialised the encoder from {roberta}" in log
    assert _accuracies(log)
    # the fine-tuned checkpoint's encoder started from RoBERTa's: four small Adam steps leave it close
    rob = torch.load(roberta, weights_only=False)["model"]
    ft = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=False)["model"]
    key = "encoder.sentence_encoder.layers.1.fc2.weight"
    fresh = torch.nn.init.normal_(torch.empty_like(rob[key]), std=0.02)
    assert (ft[key] - rob[key]).abs().max() < 0.01 < (fresh - rob[key]).abs().max()

    # its dict.txt beside it (fairseq's roberta.base/ layout) and data binarized with two entries swapped: refused
    (tmp_path / "roberta" / "dict.txt").write_text((mlm / "dict.txt").read_text())
    # (and with a word added, and a word removed with fairseq-preprocess's padding in its place: same size)
    lines = (mlm / "dict.txt").read_text().splitlines()
    real = [line for line in lines if not line.startswith("madeupword")]
    pads = [line for line in lines if line.startswith("madeupword")]
    for variant in ([lines[1], lines[0], *lines[2:]], [*lines, "zzz 1"],
                    [*real[:-1], *pads, f"madeupword{len(pads):04d} 0"]):
        (cls / "dict.txt").write_text("\n".join(variant) + "\n")
        p = cli("fairseq-train", cls, *CLS, *sizes, "--roberta-path", roberta, "--tokens-per-sample", 24,
                "--max-update", 4, "--save-dir", tmp_path / "ckpt2", check=False)
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert p.returncode == 2 and len(errors) == 1, p.stderr[-2000:]
        assert errors[0].startswith("error: --roberta-path") and str(cls / "dict.txt") in errors[0], errors
        assert not (tmp_path / "ckpt2").exists() or not any((tmp_path / "ckpt2").iterdir())
