"""Shared helpers for the tests: tiny models built without the CLI, and generated fairseq data dirs."""

import contextlib
import os
import subprocess
import sys

import torch
from fairseq.data import Dictionary

import user_dir  # noqa: F401  (registrations)
from rmt_fairseq.distributed import free_port  # noqa: F401  (for --master_port: tests run side by side)
from rmt_fairseq.models.rmt_lm import RMTLanguageModel
from rmt_fairseq.models.rmt_lm_config import RMTLanguageModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
# torch threads per process of the tests (OMP_NUM_THREADS of every command they start, and the pytest process's
# own): 2 on this 2-core machine, 1 under pytest-xdist (`make test` runs 2 workers: OpenMP threads that
# outnumber the cores spin against each other), RMT_TEST_THREADS to choose
THREADS = os.environ.get("RMT_TEST_THREADS") or ("1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")


class _Task:
    stream_level = True  # as --task rmt_lm: the caller passes the recurrent state (per_sample=False builds)

    def __init__(self, dictionary, stream_level=True):
        self.source_dictionary = self.target_dictionary = dictionary
        self.stream_level = stream_level


def dictionary(n_symbols: int) -> Dictionary:
    d = Dictionary()
    for i in range(n_symbols):
        d.add_symbol(f"w{i}")
    return d


def tiny_model(vocab: int = 40, seed: int = 0, **overrides) -> RMTLanguageModel:
    torch.manual_seed(seed)
    cfg = dict(decoder_layers=2, decoder_embed_dim=32, decoder_attention_heads=2, decoder_ffn_embed_dim=64,
               mem_tokens=3, mem_len=0, tokens_per_sample=8, dropout=0.0)
    cfg.update(overrides)
    return RMTLanguageModel.build_model(RMTLanguageModelConfig(**cfg), _Task(dictionary(vocab)))


def armt_with_values(model, std: float = 0.3, seed: int = 7):
    """An ARMT model (any family: decoder or encoder `assoc_layers`) whose write projections W_V are drawn
    N(0, std): at their initial zero nothing is stored, so nothing would cross segments."""
    module = model.encoder if hasattr(model, "encoder") else model.decoder
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in module.assoc_layers:
            block.v_proj.weight.copy_(torch.randn(block.v_proj.weight.shape, generator=gen) * std)
    return model


def tiny_wrapper(vocab: int = 40, seed: int = 0, **overrides):
    """An rmt_transformer_lm (fairseq's own TransformerDecoder with memory) of the same size as tiny_model."""
    from omegaconf import OmegaConf

    from rmt_fairseq.models.rmt_transformer_lm import RMTTransformerLanguageModel, RMTTransformerLMConfig

    torch.manual_seed(seed)
    cfg = dict(decoder_layers=2, decoder_embed_dim=32, decoder_input_dim=32, decoder_output_dim=32,
               decoder_ffn_embed_dim=64, decoder_attention_heads=2, mem_tokens=3, segment_len=8, dropout=0.0,
               # the fields fairseq links to the task's
               max_target_positions=1024, tokens_per_sample=1024, add_bos_token=False, tpu=False)
    cfg.update(overrides)
    return RMTTransformerLanguageModel.build_model(OmegaConf.structured(RMTTransformerLMConfig(**cfg)),
                                                   _Task(dictionary(vocab)))


# the modules behind the console scripts, for an environment where packages were installed without them
# (pip install --target on a bare GPU image: scripts/gpu_suite.sh)
MODULES = {"fairseq-train": "fairseq_cli.train", "fairseq-eval-lm": "fairseq_cli.eval_lm",
           "fairseq-interactive": "fairseq_cli.interactive", "fairseq-preprocess": "fairseq_cli.preprocess",
           "fairseq-validate": "fairseq_cli.validate", "rmt-data": "rmt_fairseq.cli.data",
           "fairseq-hydra-train": "fairseq_cli.hydra_train", "rmt-deepspeed-train": "rmt_fairseq.deepspeed.train",
           "deepspeed": "deepspeed.launcher.runner", "torchrun": "torch.distributed.run"}


def fresh_command(name: str) -> list:
    """The command line that starts console script `name` as a user does, in a fresh process: the installed
    script, else `python -m` its module."""
    path = os.path.join(BIN, name)
    return [path] if os.path.exists(path) or name not in MODULES else [sys.executable, "-m", MODULES[name]]


def command(name: str) -> list:
    """The command line that runs console script `name`: the same script file run as `__main__` with the same
    argv, cwd, environment, stdin/stdout/stderr and exit status, in a child forked from the tests' pre-imported
    fork server (tests/forkserver.py) so that it skips torch's and fairseq's imports; a fresh process
    (`fresh_command`) where the server cannot serve it or RMT_TEST_FORKSERVER=0."""
    real = fresh_command(name)
    if os.environ.get("RMT_TEST_FORKSERVER", "") in ("0", "") or not _is_python_script(real):
        return real
    target = f"script:{real[0]}" if len(real) == 1 else f"module:{real[-1]}"
    return [sys.executable, "-S", os.path.join(REPO, "tests", "forkclient.py"), target]


# the console scripts the tests and the documented commands start (bin_path() holds one wrapper of each)
CONSOLE_SCRIPTS = [*MODULES, "rmt-demo", "rmt-plot-attention",
                   "rmt-extrapolate", "rmt-extrapolate-classify"]


def bin_path() -> str:
    """For PATH: the folder of the console scripts that shell scripts (examples/*/run.sh, the docs' blocks) find
    by name: wrappers that run them through the fork server (as command() does), else the environment's bin."""
    folder = os.environ.get("RMT_TEST_FORKSERVER", "")
    wrappers = os.path.join(folder, "bin")
    return wrappers + os.pathsep + BIN if folder not in ("", "0") and os.path.isdir(wrappers) else BIN


def remove_deepspeed_buffers(since: float = 0.0, port: int = None) -> None:
    """Remove the shared-memory all-reduce buffers DeepSpeed's CPU ranks leave in /dev/shm (two of 69 MB per job,
    named by master address and port, never removed by DeepSpeed): those of `port`, or all made since `since`
    (time.time()). With a free port per job they filled /dev/shm (RAM) until the OOM killer stopped a test."""
    import glob

    pattern = f"_{port}_*" if port is not None else "*"
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*" + pattern):
        try:
            if port is not None or os.path.getmtime(path) >= since:
                os.unlink(path)
        except OSError:
            pass


def _is_python_script(argv: list) -> bool:
    if len(argv) > 1:
        return True
    try:
        with open(argv[0], "rb") as f:
            return b"python" in f.readline()
    except OSError:
        return False


def start_fork_server() -> None:
    """Start this process's fork server (once) and point RMT_TEST_FORKSERVER at it; every command() from then on,
    and every subprocess that inherits the variable, goes through it. RMT_TEST_FORKSERVER=0 turns it off."""
    import atexit
    import json
    import shutil
    import tempfile

    from forkserver import sensitive

    if os.environ.get("RMT_TEST_FORKSERVER") is not None:  # off (0), or this process's already runs
        return
    folder = tempfile.mkdtemp(prefix="rmt-forkserver-")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS=THREADS)
    log = open(os.path.join(folder, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "forkserver.py"), folder, str(os.getpid())],
                            env=env, cwd=folder,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    with open(os.path.join(folder, "server.json"), "w") as f:
        json.dump({"pid": proc.pid, "env": sensitive(env)}, f)
    os.makedirs(os.path.join(folder, "bin"))
    for name in CONSOLE_SCRIPTS:
        real = fresh_command(name)
        if len(real) == 1 and os.path.exists(real[0]) and _is_python_script(real):
            wrapper = os.path.join(folder, "bin", name)
            with open(wrapper, "w") as f:
                f.write(f'#!/bin/sh\nexec "{sys.executable}" -S "{REPO}/tests/forkclient.py" "script:{real[0]}" "$@"\n')
            os.chmod(wrapper, 0o755)
    os.environ["RMT_TEST_FORKSERVER"] = folder
    os.environ["RMT_FAIRSEQ_BIN"] = os.path.join(folder, "bin")  # the commands rmt-demo and the benchmarks start

    def stop():
        proc.kill()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)

    atexit.register(stop)


def cli(name: str, *args, check=True, timeout=600, cwd=REPO, env=None) -> subprocess.CompletedProcess:
    """Run one of the installed console scripts (fairseq-train, fairseq-eval-lm, rmt-data ...)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS=THREADS,
               **(env or {}))
    p = subprocess.run([*command(name), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def make_recall_data(root: str, gap: int = 7, train_docs: int = 600, valid_docs: int = 120, seed: int = 1) -> str:
    """Generate the recall corpus and fairseq-preprocess it; returns the data-bin directory."""
    raw, out = os.path.join(root, "raw"), os.path.join(root, "bin")
    cli("rmt-data", "recall", "--out", raw, "--gap", gap, "--train-docs", train_docs, "--valid-docs", valid_docs,
        "--test-docs", valid_docs, "--seed", seed)
    cli("fairseq-preprocess", "--only-source", "--trainpref", f"{raw}/train.txt", "--validpref", f"{raw}/valid.txt",
        "--testpref", f"{raw}/test.txt", "--destdir", out, "--workers", 1)
    return out


def build_from_cli_args(args):
    """Task, model and criterion built from fairseq-train style arguments, through fairseq's own parsers and
    registries (the path fairseq-train takes)."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, [str(a) for a in args]))
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, task, model, criterion


def validation_loss(task, model, criterion, split="valid"):
    """The task's own validation over a split (base-2 loss per token), as fairseq-train's validate does."""
    import math

    task.load_dataset(split)
    itr = task.get_batch_iterator(task.dataset(split)).next_epoch_itr(shuffle=False)
    total, ntok = 0.0, 0
    for sample in itr:
        loss, n, _ = task.valid_step(sample, model, criterion)
        total, ntok = total + loss.item(), ntok + n
    return total / ntok / math.log(2)


def make_band_data(root: str, seed: int = 3) -> str:
    """A corpus whose rare words appear only in the second half of the training text, fairseq-preprocess'ed.

    fairseq's dictionary puts them last (by frequency): 4 specials and 28 common words are ids 0..31, the rare
    words 32..41, so with --adaptive-softmax-cutoff 20,32 they form the last adaptive band. Streams are cut from
    the text in order and rank r reads streams r*B..(r+1)*B-1 (data/streams.py); the first 400 of 600 lines have
    no rare word, so with 2 ranks only rank 1 ever sees that band: the data-parallel case in which a parameter is
    used on one rank and not on the other."""
    import random

    rng = random.Random(seed)
    common = [f"w{i}" for i in range(28)]
    rare = [f"r{i}" for i in range(10)]

    def line(with_rare):
        words = [rng.choice(common) for _ in range(rng.randint(4, 12))]
        if with_rare:
            words[rng.randrange(len(words))] = rng.choice(rare)
        return " ".join(words)

    raw, out = os.path.join(root, "raw"), os.path.join(root, "bin")
    os.makedirs(raw, exist_ok=True)
    train = [line(False) for _ in range(400)] + [line(rng.random() < 0.8) for _ in range(200)]
    for name, lines in [("train", train), ("valid", [line(rng.random() < 0.3) for _ in range(80)]),
                        ("test", [line(rng.random() < 0.3) for _ in range(80)])]:
        with open(os.path.join(raw, f"{name}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    cli("fairseq-preprocess", "--only-source", "--trainpref", f"{raw}/train.txt", "--validpref", f"{raw}/valid.txt",
        "--testpref", f"{raw}/test.txt", "--destdir", out, "--workers", 1)
    return out


def train_losses(text: str) -> dict:
    """{update: loss} from fairseq-train's (or rmt-deepspeed-train's) train_inner log lines."""
    import re

    pattern = r"train_inner .*?loss[=\s]([0-9.]+),.*?num_updates[=\s](\d+)"
    return {int(u): float(v) for v, u in re.findall(pattern, text)}


def load_script(relpath: str):
    """A script of the checkout that is not a package module (examples/*.py, benchmarks/*.py), imported by path."""
    import importlib.util

    name = os.path.splitext(os.path.basename(relpath))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def diagonal_calls(module):
    """Counts the diagonal schedule's runs on `module` (each builds its stacked weights once, through
    module.diagonal_weights): yields a list whose length is the number of runs so far."""
    runs, build = [], module.diagonal_weights

    def counted():
        runs.append(1)
        return build()

    module.diagonal_weights = counted
    try:
        yield runs
    finally:
        del module.diagonal_weights
