"""Bad input stops with a one-line error naming the flag or file and the offending value (issue 2 test 7,
issue 6 item 5), through the real CLIs run as subprocesses, and leaves what is already on disk untouched.

Every case asserts: exit status 2; the last line of stderr starts with `error:` and contains the flag or file
and the value; no Python traceback; every file of the case's --save-dir, data directories, checkpoints and
--out directory has the same sha256 before and after. Categories:

- CLI flags (fairseq-train, fairseq-eval-lm): out-of-range model, task and criterion flags, flags that do not
  go together.
- Data directories: missing, a file, not preprocessed, corrupt dict.txt, an empty split, a missing split, a
  split too short for the streams, data without <gen> for rmt_algorithmic, a dictionary that differs from
  the checkpoint's (fairseq-train --restore-file and fairseq-eval-lm).
- Checkpoints: another architecture, another task (rmt_algorithmic; fairseq's language_modeling with
  transformer_lm), truncated, not a fairseq checkpoint, missing --restore-file / --finetune-from-model /
  --path, a mid-epoch checkpoint without the memory state of the streams, a mid-epoch resume with the streams
  cut otherwise (--batch-size, --tokens-per-sample). test_checkpoints_that_fit_resume: the checks refuse no
  good checkpoint, and one without memory state saved at an epoch boundary (where memory starts fresh anyway)
  resumes with a warning.
- Generators: `rmt-data copy|reverse|associative_retrieval|equations|recall` with negative, zero and
  out-of-range values (associative_retrieval's capacity layout too: --pairs-per-segment, --key-len).
- fairseq's own language_modeling task and the transformer_lm wrapper (issue 8): --segment-len not dividing
  --tokens-per-sample (given, or the preset's), a negative --segment-bptt-unroll, --lm-path missing, of
  another model family, of other sizes.
- Long-input classification (issue 7): a segment beyond --max-positions, generated documents shorter than
  their facts, raw text without dict.txt or with a line missing its TAB, --roberta-path missing or not a
  RoBERTa checkpoint, the LM criterion, a too-short --noise-file, rmt-extrapolate-classify on non-generated data.
- DeepSpeed JSON: tests/deepspeed/test_deepspeed_train.py (missing file, invalid JSON, batch size mismatch,
  ZeRO stage, offload without ZeRO, param offload below stage 3, optimizer in the JSON).

The cases are a table (CASES). They run in parallel (their processes mostly import torch and fairseq) in one
module fixture, which runs only the cases pytest selected; each test then checks its own result.
"""

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import pytest
import torch
from fairseq.data import Dictionary, indexed_dataset

from helpers import cli

BASE = ["--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy",
        "--tokens-per-sample", 8, "--batch-size", 4, "--optimizer", "adam", "--lr", "1e-3", "--cpu",
        "--max-update", 2, "--num-workers", 0]
EVAL = ["--user-dir", "user_dir", "--task", "rmt_lm", "--batch-size", 4, "--tokens-per-sample", 8, "--cpu",
        "--num-workers", 0]
ALGO = ["--user-dir", "user_dir", "--task", "rmt_algorithmic", "--arch", "rmt_tiny", "--criterion",
        "rmt_cross_entropy", "--num-segments", 2, "--batch-size", 8, "--optimizer", "adam", "--lr", "1e-3", "--cpu",
        "--max-update", 1, "--num-workers", 0, "--no-eval-greedy"]
CLS = ["--user-dir", "user_dir", "--task", "rmt_long_classification", "--arch", "rmt_encoder_tiny", "--criterion",
       "rmt_classification", "--tokens-per-sample", 16, "--batch-size", 4, "--optimizer", "adam", "--lr", "1e-3",
       "--cpu", "--max-update", 1, "--num-workers", 0]
WORKERS = min(4, (os.cpu_count() or 2) + 1)  # the processes spend most of their time importing: overlap them


@dataclass(frozen=True)
class Case:
    """A command and what its error line must name. Arguments and names may use the fixture's paths:
    {recall} {copy} {data} (bad data dirs) {ckpts} {save} (the case's --save-dir, holding `last` as
    checkpoint_last.pt) {out} (an rmt-data --out dir holding an earlier run's files) {raw_copy} (text, not
    binarized), and {v_recall} {v_copy} (dictionary sizes)."""

    cli: str
    args: Tuple
    names: Tuple
    last: Optional[str] = "rmt.pt"


def train(*flags, data="{recall}", names=(), last="rmt.pt"):
    return Case("fairseq-train", (data, *BASE, "--save-dir", "{save}", *flags), tuple(names), last)


def algorithmic(*flags, data="{copy}", names=()):
    return Case("fairseq-train", (data, *ALGO, "--save-dir", "{save}", *flags), tuple(names), "algo.pt")


STOCK = ["--user-dir", "user_dir", "--task", "language_modeling", "--batch-size", 4, "--optimizer", "adam", "--lr",
         "1e-3", "--cpu", "--max-update", 1, "--num-workers", 0]
WRAP = ["--arch", "rmt_transformer_lm", "--decoder-layers", 1, "--decoder-embed-dim", 16, "--decoder-ffn-embed-dim", 32,
        "--decoder-attention-heads", 2, "--tokens-per-sample", 16, "--segment-len", 8]


def stock_task(*flags, names=()):
    return Case("fairseq-train", ("{recall}", *STOCK, "--save-dir", "{save}", *flags), tuple(names), None)


def classify(*flags, data="{data}/mem", names=()):
    return Case("fairseq-train", (data, *CLS, "--save-dir", "{save}", *flags), tuple(names), None)


def eval_lm(*flags, data="{recall}", path="{ckpts}/rmt.pt", names=()):
    return Case("fairseq-eval-lm", (data, *EVAL, "--path", path, *flags), tuple(names))


def generate(task, *flags, out="{out}", names=()):
    return Case("rmt-data", (task, "--out", out, *flags), tuple(names))


CASES = {
    # ---- CLI flags ---------------------------------------------------------------------------------------
    "negative mem tokens": train("--mem-tokens", -1, names=["--mem-tokens", "-1"]),
    "negative mem len": train("--mem-len", -5, names=["--mem-len", "-5"]),
    "negative bptt unroll": train("--bptt-unroll", -1, names=["--bptt-unroll", "-1"]),
    "sliding without memory": train("--bptt-mode", "sliding", "--mem-tokens", 0,
                                    names=["--bptt-mode sliding", "--mem-tokens 0"]),
    # the line says which cutoffs fit (the same bands, the last at 3/4 of the recall data's 24 types: issue 27)
    "cutoff beyond vocab": train("--adaptive-softmax-cutoff", "20000,40000",
                                 names=["--adaptive-softmax-cutoff", "20000,40000", "vocabulary size ({v_recall})",
                                        "pass e.g. --adaptive-softmax-cutoff 9,18 "]),
    # a preset's cutoffs (WikiText-103's), which the user did not type: the preset is named
    "preset cutoffs beyond vocab": train("--arch", "rmt_wt103", last=None, names=[
        "--adaptive-softmax-cutoff 20000,40000,200000 (set by --arch rmt_wt103)", "vocabulary size ({v_recall})",
        "pass e.g. --adaptive-softmax-cutoff 2,4,18 "]),
    "wrapper preset cutoffs beyond vocab": train("--arch", "rmt_transformer_lm_wiki103", last=None, names=[
        "--adaptive-softmax-cutoff 20000,60000 (set by --arch rmt_transformer_lm_wiki103)",
        "pass e.g. --adaptive-softmax-cutoff 6,18 --adaptive-input-cutoff 6,18 "]),
    # fairseq's --max-tokens would be ignored under a task whose batch is streams (or documents): refused
    "max tokens under rmt_lm": train("--max-tokens", 512, names=["--max-tokens 512", "--batch-size"]),
    "max tokens under rmt_long_classification": classify("--max-tokens", 512, names=["--max-tokens 512",
                                                                                    "--batch-size documents"]),
    "non-integer cutoff": train("--adaptive-softmax-cutoff", "a,b", names=["--adaptive-softmax-cutoff", "'a,b'"]),
    "heads do not divide dim": train("--decoder-embed-dim", 30, "--decoder-attention-heads", 4,
                                     names=["--decoder-embed-dim 30", "--decoder-attention-heads 4"]),
    "dropout out of range": train("--dropout", 1.5, names=["--dropout", "1.5"]),
    # ARMT's W_V starts at zero and gets no gradient at K = 0: a memory that could never move is refused (issue 29)
    "armt at bptt unroll 0": train("--associative-memory", "--bptt-unroll", 0,
                                   names=["--bptt-unroll 0", "--associative-memory", "--bptt-unroll >= 1"]),
    "mt layout without memory": train("--memory-layout", "mt", "--mem-tokens", 0,
                                      names=["--memory-layout mt", "--mem-tokens 0"]),
    # fairseq-train starts 2 CPU ranks (rmt_fairseq/distributed.py): a rank's error is still one line
    "two ranks, negative mem tokens": train("--mem-tokens", -1, "--distributed-world-size", 2,
                                            names=["--mem-tokens", "-1"]),
    "fp16 training on cpu": train("--fp16", names=["--fp16", "--bf16"]),
    # (no checkpoint in --save-dir: one saved mid-epoch with other streams would be refused first)
    "split too short": train("--batch-size", 400, "--tokens-per-sample", 64, last=None,
                             names=["--batch-size 400", "--tokens-per-sample 64"]),
    # fairseq asserts this in main(); the plugin says it in one line (issue 16)
    "missing batch size": Case("fairseq-train", ("{recall}", *[a for i, a in enumerate(BASE) if
                                                               "--batch-size" not in BASE[max(i - 1, 0):i + 1]],
                                                 "--save-dir", "{save}"), ("--batch-size",)),
    "missing batch size in fairseq-validate": Case("fairseq-validate", ("{recall}", "--user-dir", "user_dir", "--task",
                                                                       "rmt_lm", "--path", "{ckpts}/rmt.pt", "--cpu"),
                                                   ("--batch-size",)),
    "stock criterion": train("--criterion", "cross_entropy", names=["--criterion rmt_cross_entropy", "cross_entropy"]),
    "zero tokens per sample": train("--tokens-per-sample", 0, names=["--tokens-per-sample", "0"]),
    "bos token in streams": train("--add-bos-token", names=["--add-bos-token", "--task rmt_lm"]),
    "zero segments": algorithmic("--num-segments", 0, names=["--num-segments", "0"]),
    "context window": eval_lm("--context-window", 4, names=["--context-window 4"]),
    "eval-lm on rmt_algorithmic": Case("fairseq-eval-lm", ("{copy}", *EVAL, "--task", "rmt_algorithmic", "--path",
                                                           "{ckpts}/algo.pt"),
                                       ("fairseq-eval-lm", "--task rmt_algorithmic", "fairseq-validate")),
    # ---- data directories --------------------------------------------------------------------------------
    "missing data dir": train(data="{data}/nope", names=["{data}/nope", "does not exist"]),
    "data dir is a file": train(data="{recall}/dict.txt", names=["{recall}/dict.txt", "is a file"]),
    "not preprocessed": train(data="{raw_copy}", names=["{raw_copy}/dict.txt", "not found"]),
    "corrupt dict.txt": train(data="{data}/bad_dict", names=["{data}/bad_dict/dict.txt", "line 2 'no count here'"]),
    "empty split": train(data="{data}/empty_valid", names=["'valid'", "{data}/empty_valid/valid.bin", "0 bytes"]),
    "missing valid split": train("--valid-subset", "dev", names=["'dev'", "{recall}/dev.bin"]),
    "test split too short": eval_lm("--gen-subset", "test", data="{data}/short_test",
                                    names=["'test'", "5 tokens", "--batch-size 4", "--tokens-per-sample 8"]),
    "no <gen> for rmt_algorithmic": algorithmic(data="{recall}", names=["{recall}", "<gen>"]),
    "dictionary mismatch on resume": train("--restore-file", "{ckpts}/rmt.pt", data="{copy}",
                                           names=["--restore-file {ckpts}/rmt.pt", "vocabulary of {v_recall} types",
                                                  "{copy}/dict.txt has {v_copy}"]),
    "dictionary mismatch in eval-lm": eval_lm(data="{copy}", names=["--path {ckpts}/rmt.pt",
                                                                    "vocabulary of {v_recall} types",
                                                                    "{copy}/dict.txt has {v_copy}"]),
    # a dictionary of the same size whose ids mean other tokens (two entries swapped): the fingerprint the
    # checkpoint keeps of its training dictionary differs (issue 14, item 4)
    "swapped dictionary on resume": train("--restore-file", "{ckpts}/rmt.pt", data="{data}/swapped",
                                          names=["--restore-file {ckpts}/rmt.pt", "{data}/swapped/dict.txt",
                                                 "another dictionary"]),
    "swapped dictionary in eval-lm": eval_lm(data="{data}/swapped", names=["--path {ckpts}/rmt.pt",
                                                                          "{data}/swapped/dict.txt",
                                                                          "another dictionary"]),
    "swapped dictionary in interactive": Case("fairseq-interactive", ("{data}/swapped", "--user-dir", "user_dir",
                                                                      "--task", "rmt_lm", "--path", "{ckpts}/rmt.pt",
                                                                      "--cpu"),
                                              ("--path {ckpts}/rmt.pt", "{data}/swapped/dict.txt",
                                               "another dictionary")),
    "swapped dictionary with --lm-path": Case("fairseq-train", ("{data}/swapped", *STOCK, "--save-dir", "{save}", *WRAP,
                                                                "--lm-path", "{ckpts}/stock.pt"),
                                              ("--lm-path {ckpts}/stock.pt", "another dictionary"), None),
    "swapped dictionary in fairseq-validate": Case("fairseq-validate", ("{data}/swapped", "--user-dir", "user_dir",
                                                                        "--task", "rmt_lm", "--path",
                                                                        "{ckpts}/rmt.pt", "--batch-size", 4, "--cpu"),
                                                   ("the checkpoint {ckpts}/rmt.pt", "{data}/swapped/dict.txt",
                                                    "another dictionary")),
    "a word added to the dictionary in eval-lm": eval_lm(data="{data}/added", names=["--path {ckpts}/rmt.pt",
                                                                                    "{data}/added/dict.txt"]),
    "a word added to the dictionary on resume": train("--restore-file", "{ckpts}/rmt.pt", data="{data}/added",
                                                      names=["--restore-file {ckpts}/rmt.pt", "{data}/added/dict.txt"]),
    "a word added to the dictionary in interactive": Case("fairseq-interactive", ("{data}/added", "--user-dir",
                                                                                  "user_dir", "--task", "rmt_lm",
                                                                                  "--path", "{ckpts}/rmt.pt", "--cpu"),
                                                          ("--path {ckpts}/rmt.pt", "{data}/added/dict.txt")),
    "a word added to the dictionary with --lm-path": Case("fairseq-train", ("{data}/added", *STOCK, "--save-dir",
                                                                            "{save}", *WRAP, "--lm-path",
                                                                            "{ckpts}/stock.pt"),
                                                          ("--lm-path {ckpts}/stock.pt", "{data}/added/dict.txt"),
                                                          None),
    # a word removed and fairseq-preprocess's padding filling its place: the same size, other token ids
    "a word removed from the dictionary in eval-lm": eval_lm(data="{data}/removed",
                                                             names=["--path {ckpts}/rmt.pt", "{data}/removed/dict.txt",
                                                                    "another dictionary"]),
    "a word removed from the dictionary on resume": train("--restore-file", "{ckpts}/rmt.pt", data="{data}/removed",
                                                          names=["--restore-file {ckpts}/rmt.pt",
                                                                 "{data}/removed/dict.txt", "another dictionary"]),
    "a word removed from the dictionary in interactive": Case("fairseq-interactive", ("{data}/removed", "--user-dir",
                                                                                      "user_dir", "--task", "rmt_lm",
                                                                                      "--path", "{ckpts}/rmt.pt",
                                                                                      "--cpu"),
                                                              ("--path {ckpts}/rmt.pt", "{data}/removed/dict.txt",
                                                               "another dictionary")),
    "a word removed from the dictionary with --lm-path": Case("fairseq-train", ("{data}/removed", *STOCK,
                                                                                "--save-dir", "{save}", *WRAP,
                                                                                "--lm-path", "{ckpts}/stock.pt"),
                                                              ("--lm-path {ckpts}/stock.pt", "another dictionary"),
                                                              None),
    # ---- checkpoints -------------------------------------------------------------------------------------
    # ARMT's fields shape parameters too: named, not a parameter's shape (issue 28)
    "rmt checkpoint, armt flags": train("--restore-file", "{ckpts}/rmt.pt", "--associative-memory",
                                        names=["--restore-file {ckpts}/rmt.pt", "--associative-memory False vs True"]),
    "rmt checkpoint, gated flags": train("--restore-file", "{ckpts}/rmt.pt", "--memory-layout", "gated",
                                         names=["--restore-file {ckpts}/rmt.pt", "--memory-layout rmt vs gated"]),
    "other architecture": train("--restore-file", "{ckpts}/rmt.pt", "--decoder-layers", 3,
                                names=["--restore-file {ckpts}/rmt.pt", "--decoder-layers 2 vs 3"]),
    "rmt_algorithmic checkpoint": train("--restore-file", "{ckpts}/algo.pt",
                                        names=["--restore-file {ckpts}/algo.pt", "--task rmt_algorithmic"]),
    "transformer_lm checkpoint": train("--restore-file", "{ckpts}/stock.pt",
                                       names=["--restore-file {ckpts}/stock.pt", "transformer_lm",
                                              "--task language_modeling"]),
    "transformer_lm checkpoint in eval-lm": eval_lm(path="{ckpts}/stock.pt",
                                                    names=["--path {ckpts}/stock.pt", "transformer_lm"]),
    "truncated checkpoint": train(last="truncated.pt", names=["{save}/checkpoint_last.pt", "truncated or corrupt",
                                                              "--restore-fallback"]),
    "bare state dict": eval_lm(path="{ckpts}/bare.pt", names=["--path {ckpts}/bare.pt", "not a fairseq checkpoint"]),
    "missing restore file": train("--restore-file", "{ckpts}/nope.pt", names=["--restore-file {ckpts}/nope.pt",
                                                                                "no such file"]),
    "missing finetune model": train("--finetune-from-model", "{ckpts}/nope.pt", last=None,
                                    names=["--finetune-from-model {ckpts}/nope.pt", "no such file"]),
    # fairseq-eval-lm subtracts --context-window from --tokens-per-sample before anything else: without the flag
    # (the trained segment length comes from the checkpoint) that was a TypeError inside fairseq
    "context window under rmt_lm without a segment length": Case(
        "fairseq-eval-lm", ("{recall}", "--user-dir", "user_dir", "--task", "rmt_lm", "--batch-size", 4, "--cpu",
                            "--path", "{ckpts}/rmt.pt", "--context-window", 8),
        ("--context-window 8", "--task rmt_lm")),
    "missing eval-lm path": eval_lm(path="{ckpts}/nope.pt", names=["--path {ckpts}/nope.pt", "no such file"]),
    "no memory state mid-epoch": train("--max-update", 3, last="no_memory.pt",
                                       names=["{save}/checkpoint_last.pt", "after 2 batches", "no memory state",
                                              "--reset-dataloader"]),
    "resume with other batch size": train("--max-update", 3, "--batch-size", 8,
                                          names=["{save}/checkpoint_last.pt", "--batch-size 4", "--batch-size 8"]),
    "resume with other segment length": train("--max-update", 3, "--tokens-per-sample", 16,
                                              names=["{save}/checkpoint_last.pt", "--tokens-per-sample 8 vs 16"]),
    # ---- generators ----------------------------------------------------------------------------------------
    "copy zero length": generate("copy", "--src-len", 0, names=["--src-len", "got 0"]),
    "copy negative size": generate("copy", "--train-size", -5, names=["--train-size", "got -5"]),
    "copy non-integer": generate("copy", "--src-len", "abc", names=["--src-len", "'abc'"]),
    "reverse one symbol": generate("reverse", "--vocab-size", 1, names=["--vocab-size", "got 1"]),
    "reverse too many symbols": generate("reverse", "--vocab-size", 40, names=["--vocab-size", "[2, 36]", "got 40"]),
    "retrieval zero pairs": generate("associative_retrieval", "--num-pairs", 0, names=["--num-pairs", "got 0"]),
    "retrieval more pairs than keys": generate("associative_retrieval", "--num-pairs", 12, "--vocab-size", 10,
                                               names=["--num-pairs 12", "--vocab-size (10)"]),
    "capacity zero pairs": generate("associative_retrieval", "--num-pairs", 0, "--pairs-per-segment", 1,
                                    names=["--num-pairs", "got 0"]),
    "capacity zero pairs per segment": generate("associative_retrieval", "--pairs-per-segment", 0,
                                                names=["--pairs-per-segment", "got 0"]),
    "capacity more pairs than keys": generate("associative_retrieval", "--num-pairs", 17, "--vocab-size", 4,
                                              "--key-len", 2, "--pairs-per-segment", 1,
                                              names=["--num-pairs 17", "--vocab-size (4)", "--key-len (2)", "= 16"]),
    "capacity zero key length": generate("associative_retrieval", "--key-len", 0, "--pairs-per-segment", 1,
                                         names=["--key-len", "got 0"]),
    "equations rate out of range": generate("equations", "--no-roots-rate", 1.5, names=["--no-roots-rate",
                                                                                       "got 1.5"]),
    "equations zero test size": generate("equations", "--test-size", 0, names=["--test-size", "got 0"]),
    "recall negative gap": generate("recall", "--gap", -1, names=["--gap", "got -1"]),
    "recall one key": generate("recall", "--num-keys", 1, names=["--num-keys", "got 1"]),
    "recall zero docs": generate("recall", "--valid-docs", 0, names=["--valid-docs", "got 0"]),
    "out is a file": generate("copy", out="{out}/train.txt", names=["--out {out}/train.txt", "not a directory"]),
    # ---- RMT under fairseq's own language_modeling task, and around transformer_lm (issue 8) ---------------
    "segment length not dividing the sample": stock_task("--arch", "rmt_tiny", "--tokens-per-sample", 64,
                                                         "--segment-len", 24,
                                                         names=["--tokens-per-sample 64", "--segment-len 24",
                                                                "--task rmt_lm"]),
    "preset segment not dividing the default sample": stock_task("--arch", "rmt_tiny", "--tokens-per-sample", 100,
                                                                 names=["--tokens-per-sample 100", "--segment-len 32",
                                                                        "--tokens-per-sample 96 or 128"]),
    "negative segment bptt unroll": stock_task("--arch", "rmt_tiny", "--tokens-per-sample", 64,
                                               "--segment-bptt-unroll", -1, names=["--segment-bptt-unroll", "-1"]),
    "missing lm path": stock_task(*WRAP, "--lm-path", "{ckpts}/nope.pt", names=["--lm-path {ckpts}/nope.pt",
                                                                                 "no such file"]),
    "lm path of an rmt_lm checkpoint": stock_task(*WRAP, "--lm-path", "{ckpts}/rmt.pt",
                                                  names=["--lm-path {ckpts}/rmt.pt", "rmt_tiny",
                                                         "not a transformer_lm"]),
    "lm path of other sizes": stock_task(*WRAP[:5], 32, *WRAP[6:], "--lm-path", "{ckpts}/stock.pt",
                                         names=["--lm-path {ckpts}/stock.pt", "in the checkpoint",
                                                "--arch rmt_transformer_lm"]),
    # ---- long-input classification (encoder RMT) ---------------------------------------------------------
    "segment beyond positions": classify("--tokens-per-sample", 200,
                                         names=["--tokens-per-sample 200", "--max-positions is 128"]),
    "documents shorter than their facts": classify(names=["reasoning", "--num-segments 1 x --tokens-per-sample 16"]),
    "armt encoder at bptt unroll 0": classify("--tokens-per-sample", 32, "--associative-memory", "--bptt-unroll", 0,
                                              names=["--bptt-unroll 0", "--associative-memory"]),
    "curriculum mix shorter than facts": classify("--num-segments", 4, "--curriculum-mix",
                                                  names=["--curriculum-mix", "reasoning", "--tokens-per-sample is 16"]),
    "classification without dict.txt": classify(data="{data}/tsv_no_dict",
                                                names=["{data}/tsv_no_dict/dict.txt", "rmt-data classification-dict"]),
    "tsv line without a tab": classify(data="{data}/bad_tsv", names=["{data}/bad_tsv/train.tsv, line 2",
                                                                     "label<TAB>text"]),
    "missing roberta checkpoint": classify("--tokens-per-sample", 32, "--roberta-path", "{ckpts}/nope.pt",
                                           names=["--roberta-path {ckpts}/nope.pt", "no such file"]),
    "roberta path not a roberta": classify("--tokens-per-sample", 32, "--roberta-path", "{ckpts}/rmt.pt",
                                           names=["--roberta-path {ckpts}/rmt.pt", "no encoder.sentence_encoder"]),
    "classification with lm criterion": classify("--tokens-per-sample", 32, "--criterion", "rmt_cross_entropy",
                                                 names=["--criterion rmt_classification", "rmt_cross_entropy"]),
    "noise file too short": generate("memorization", "fact_memorization", "--noise-file", "{data}/bad_dict/dict.txt",
                                     names=["--noise-file", "{data}/bad_dict/dict.txt", "need at least 100"]),
    "extrapolate without generator": Case("rmt-extrapolate-classify", ("--path", "{ckpts}/rmt.pt", "--data",
                                                                       "{recall}", "--out", "{out}"),
                                          ("--data {recall}", "generator.json")),
}


def _digests(path: Path) -> dict:
    """sha256 of the file, or of every file under the directory (relative name -> digest)."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def _write_split(prefix: Path, dictionary: Dictionary, lines) -> None:
    """A binarized split as fairseq-preprocess writes it (mmap .bin/.idx); no lines gives a 0-byte .bin."""
    builder = indexed_dataset.make_builder(str(prefix) + ".bin", impl="mmap", vocab_size=len(dictionary))
    for line in lines:
        builder.add_item(dictionary.encode_line(line, add_if_not_exist=False))
    builder.finalize(str(prefix) + ".idx")


def _make_checkpoints(root: Path, recall: str) -> dict:
    """Real checkpoints of an rmt_lm run (2 updates: mid-epoch), an rmt_algorithmic run and fairseq's own
    language_modeling/transformer_lm run, built concurrently; then variants of the rmt_lm one."""
    ckpts, raw, copy = root / "ckpts", root / "raw_copy", root / "copy"
    ckpts.mkdir()

    def rmt():
        cli("fairseq-train", recall, *BASE, "--save-dir", root / "run_rmt", "--disable-validation")

    def algo():
        cli("rmt-data", "copy", "--src-len", 4, "--train-size", 64, "--valid-size", 16, "--test-size", 16, "--out", raw)
        cli("fairseq-preprocess", "--only-source", "--trainpref", raw / "train.txt", "--validpref", raw / "valid.txt",
            "--testpref", raw / "test.txt", "--destdir", copy, "--workers", 1)
        cli("fairseq-train", copy, *ALGO, "--save-dir", root / "run_algo", "--disable-validation")

    def stock():
        cli("fairseq-train", recall, "--task", "language_modeling", "--arch", "transformer_lm", "--decoder-layers", 1,
            "--decoder-embed-dim", 16, "--decoder-ffn-embed-dim", 32, "--decoder-attention-heads", 2,
            "--tokens-per-sample", 16, "--batch-size", 4, "--optimizer", "adam", "--lr", "1e-3", "--cpu",
            "--max-update", 1, "--num-workers", 0, "--save-dir", root / "run_stock", "--disable-validation")

    with ThreadPoolExecutor(3) as ex:
        for f in [ex.submit(rmt), ex.submit(algo), ex.submit(stock)]:
            f.result()
    for run, name in [("run_rmt", "rmt.pt"), ("run_algo", "algo.pt"), ("run_stock", "stock.pt")]:
        shutil.copy(root / run / "checkpoint_last.pt", ckpts / name)

    state = torch.load(ckpts / "rmt.pt", map_location="cpu", weights_only=False)
    assert state["extra_state"]["train_iterator"]["iterations_in_epoch"] == 2  # saved mid-epoch
    # what rmt-deepspeed-export or an older version writes: no RMTLMTask train_state in extra_state
    no_memory = dict(state, extra_state={k: v for k, v in state["extra_state"].items() if k != "RMTLMTask"})
    torch.save(no_memory, ckpts / "no_memory.pt")
    boundary = dict(no_memory, extra_state=dict(no_memory["extra_state"], train_iterator={
        "version": 2, "epoch": 2, "iterations_in_epoch": 0, "shuffle": False}))
    torch.save(boundary, ckpts / "boundary.pt")
    torch.save(state["model"], ckpts / "bare.pt")
    whole = (ckpts / "rmt.pt").read_bytes()
    (ckpts / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    return {"ckpts": str(ckpts), "copy": str(copy), "raw_copy": str(raw)}


def _make_bad_data(data: Path, recall: str) -> None:
    words = Dictionary.load(os.path.join(recall, "dict.txt"))
    for name in ["bad_dict", "empty_valid", "short_test"]:
        shutil.copytree(recall, data / name)
    (data / "bad_dict" / "dict.txt").write_text("f1 600\nno count here\n")
    lines = (Path(recall) / "dict.txt").read_text().splitlines()
    real = [line for line in lines if not line.startswith("madeupword")]
    pads = [line for line in lines if line.startswith("madeupword")]
    removed = [*real[:-1], *pads, f"madeupword{len(pads):04d} 0"]  # as fairseq-preprocess pads to a multiple of 8
    for name, new in [("swapped", [lines[1], lines[0], *lines[2:]]), ("added", [*lines, "zzz 1"]),
                      ("removed", removed)]:
        shutil.copytree(recall, data / name)
        (data / name / "dict.txt").write_text("\n".join(new) + "\n")
    _write_split(data / "empty_valid" / "valid", words, [])  # fairseq-preprocess of an empty --validpref
    _write_split(data / "short_test" / "test", words, ["K1 f1 f2 K1"])  # 5 tokens with </s>
    cli("rmt-data", "memorization", "reasoning", "--out", data / "mem", "--train-size", 20, "--valid-size", 4,
        "--test-size", 4)
    (data / "tsv_no_dict").mkdir()
    (data / "tsv_no_dict" / "train.tsv").write_text("a\tx y\nb\ty z\n")
    (data / "bad_tsv").mkdir()
    (data / "bad_tsv" / "train.tsv").write_text("a\tx y\nb y z\n")
    (data / "bad_tsv" / "dict.txt").write_text("x 1\ny 1\nz 1\n")


@pytest.fixture(scope="module")
def world(recall_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    paths = {"recall": recall_data, "data": str(root / "data"), **_make_checkpoints(root, recall_data)}
    _make_bad_data(root / "data", recall_data)
    paths["v_recall"] = len(Dictionary.load(os.path.join(recall_data, "dict.txt")))
    paths["v_copy"] = len(Dictionary.load(os.path.join(paths["copy"], "dict.txt")))
    assert paths["v_recall"] != paths["v_copy"]
    return root, paths


def _run(name: str, root: Path, paths: dict):
    case, where = CASES[name], root / "cases" / name.replace(" ", "_")
    fill = dict(paths, save=str(where / "save"), out=str(where / "out"))
    if case.cli == "fairseq-train":
        (where / "save").mkdir(parents=True)
        if case.last:  # an earlier run's checkpoint, to be left as it is
            shutil.copy(Path(paths["ckpts"]) / case.last, where / "save" / "checkpoint_last.pt")
    if case.cli == "rmt-data":  # an earlier run's output, to be left as it is
        shutil.copytree(paths["raw_copy"], where / "out")
    args = [str(a).format(**fill) for a in case.args]
    keep = [where] + [Path(a) for a in args if a.startswith(str(root)) or a.startswith(paths["recall"])]
    keep = [k for k in keep if k.exists()]
    before = {str(k): _digests(k) for k in keep}
    p = cli(case.cli, *args, check=False)
    after = {str(k): _digests(k) for k in keep}
    return p, [n.format(**fill) for n in case.names], before, after


@pytest.fixture(scope="module")
def results(request, world):
    """Every selected case, run concurrently once; name -> (process, names, digests before, after)."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and item.originalname == "test_bad_input"]
    root, paths = world
    with ThreadPoolExecutor(WORKERS) as ex:
        return dict(zip(selected, ex.map(lambda name: _run(name, root, paths), selected)))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(results, name):
    p, names, before, after = results[name]
    lines = p.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    assert p.returncode == 2 and last.startswith("error: ") and "Traceback" not in p.stderr, p.stderr[-3000:]
    for word in names:
        assert word in last, (word, last)
    assert after == before  # every file of the save dir, data dirs, checkpoints and --out: same sha256


@pytest.mark.parametrize("last", ["rmt.pt", "boundary.pt"], ids=["mid-epoch", "epoch boundary without memory"])
def test_checkpoints_that_fit_resume(world, tmp_path, last):
    """The checks refuse no good checkpoint: the fixture's own (mid-epoch, with memory) resumes with the flags
    it was saved with, and one without the streams' memory state saved at an epoch boundary resumes too,
    since memory starts fresh at the first batch of an epoch anyway (a warning names the file)."""
    root, paths = world
    save = tmp_path / "save"
    save.mkdir()
    shutil.copy(Path(paths["ckpts"]) / last, save / "checkpoint_last.pt")
    p = cli("fairseq-train", paths["recall"], *BASE, "--save-dir", save, "--max-update", 3, "--disable-validation")
    log = p.stdout + p.stderr
    warning = (f"{save}/checkpoint_last.pt (the last checkpoint in --save-dir, resumed automatically) holds no "
               f"memory state of the training streams; it was saved at an epoch boundary")
    assert (warning in log) == (last == "boundary.pt"), log[-3000:]
    epoch = 2 if last == "boundary.pt" else 1
    assert f"(epoch {epoch} @ 2 updates)" in log and "num_updates 3" in log, log[-3000:]
