"""What a user reads (issue 16, items 5 and 7): fairseq's --help lists the plugin's flags with the --arch preset's
values, and a shrunk fairseq-train, fairseq-eval-lm and a 2-rank DeepSpeed run print no Python warning lines and
none of the third-party notices rmt_fairseq/quiet.py hides (RMT_FAIRSEQ_VERBOSE=1 brings them back). fairseq-train
says in one line what trains: memory, segment, streams, BPTT (issue 27 item 3)."""

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import BIN, REPO, cli, command, free_port

TRAIN = ["--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy",
         "--tokens-per-sample", 8, "--batch-size", 4, "--optimizer", "adam", "--lr", "1e-3", "--cpu", "--max-update",
         4, "--num-workers", 0, "--log-format", "simple", "--log-interval", 1]
# a Python warning as warnings.showwarning prints it ("path:line: SomeWarning: text"), and the hidden notices
WARNING_LINE = re.compile(r"\b[A-Z]\w*Warning: ")
NOTICES = ("Setting accelerator to CPU", "Please install tensorboardX", "untested optimizer")


def _noise(text: str) -> list:
    return [line for line in text.splitlines() if WARNING_LINE.search(line) or any(n in line for n in NOTICES)
            or line.startswith("DEBUG:")]  # fairseq's wav2vec import set the root logger to DEBUG (quiet.py)


@pytest.mark.parametrize("cmd,args,flags", [
    ("fairseq-train", ["--task", "rmt_lm", "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy"],
     ["--mem-tokens", "--bptt-unroll", "--tokens-per-sample", "--checkpoint-segments", "--bptt-mode"]),
    ("fairseq-eval-lm", ["--task", "rmt_lm"], ["--tokens-per-sample", "--bptt-unroll"]),
    ("fairseq-train", ["--task", "rmt_algorithmic", "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy"],
     ["--num-segments", "--segment-curriculum", "--mem-tokens"]),
    ("rmt-deepspeed-train", ["--task", "rmt_lm", "--arch", "rmt_tiny"], ["--mem-tokens", "--deepspeed-config"]),
])
def test_help_lists_the_plugin_flags(cmd, args, flags):
    p = cli(cmd, "--user-dir", "user_dir", *args, "--help")
    for flag in flags:
        assert re.search(rf"^\s+{flag}\b", p.stdout, re.M), f"{cmd} --help does not list {flag}"
    if "--arch" in args:
        # the model flags show what the chosen preset sets (fairseq gives them no parser default)
        assert re.search(r"--mem-tokens MEM_TOKENS\s+memory tokens M per segment.{0,200}?\(--arch rmt_tiny: 4\)",
                         p.stdout, re.S)
        assert re.search(r"--decoder-layers DECODER_LAYERS\s+[^-]{0,100}?\(--arch rmt_tiny: 2\)", p.stdout, re.S)


def test_help_without_the_plugin_is_fairseqs():
    """Without --user-dir nothing is added (the parser is fairseq's own)."""
    p = cli("fairseq-train", "--help")
    assert "--mem-tokens" not in p.stdout and "usage: fairseq-train" in p.stdout


def test_fairseq_commands_print_no_warning_lines(recall_data, tmp_path):
    train = cli("fairseq-train", recall_data, *TRAIN, "--save-dir", tmp_path / "ckpt", "--no-epoch-checkpoints")
    evaluate = cli("fairseq-eval-lm", recall_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path",
                   tmp_path / "ckpt" / "checkpoint_last.pt", "--batch-size", 4, "--cpu", "--num-workers", 0)
    validate = cli("fairseq-validate", recall_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path",
                   tmp_path / "ckpt" / "checkpoint_last.pt", "--batch-size", 4, "--cpu", "--num-workers", 0)
    for p in (train, evaluate, validate):
        assert _noise(p.stdout + p.stderr) == [], p.args[0]
    assert "num_updates 4" in train.stdout  # it did train
    # once, near the start: rmt_tiny's 4 memory tokens, --tokens-per-sample 8, --batch-size 4, --bptt-unroll 1
    assert re.findall(r"\| training with (.*)$", train.stdout + train.stderr, re.M) == [
        "memory: RMT, 4 memory tokens (--mem-tokens) whose outputs are the next segment's memory; segment 8 tokens "
        "(--tokens-per-sample); 4 streams (--batch-size); BPTT through 1 segment boundary (--bptt-unroll 1: 2 "
        "segments per update)"]
    # the filters are what hides them: with RMT_FAIRSEQ_VERBOSE=1 fairseq-train shows Hydra's warnings again
    loud = cli("fairseq-train", recall_data, *TRAIN, "--max-update", 1, "--no-save",
               env={"RMT_FAIRSEQ_VERBOSE": "1"})
    assert any("Warning" in line for line in _noise(loud.stdout + loud.stderr))


def test_python_start_up_imports_no_plugin():
    """The startup hook scripts/setup.sh writes (quiet.STARTUP_HOOK) runs rmt_fairseq/quiet.py alone: importing the
    package registers the plugin, which imports fairseq, and every Python process of the environment would pay it."""
    import sysconfig

    from rmt_fairseq.quiet import STARTUP_HOOK

    hook = os.path.join(sysconfig.get_paths()["purelib"], "rmt_fairseq_quiet.pth")
    if os.path.exists(hook):
        assert open(hook).read().strip() == STARTUP_HOOK  # setup.sh replaced an earlier one
    code = ("import json, logging, sys; print(json.dumps([sorted(m for m in sys.modules if m.split('.')[0] == "
            "'rmt_fairseq'), [type(f).__name__ for f in logging.getLogger('DeepSpeed').filters]]))")
    p = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
    plugin, filters = json.loads(p.stdout)
    assert plugin == [], plugin  # nothing of the package, so nothing of fairseq
    assert filters == (["_DropMessage"] * 2 if os.path.exists(hook) else []), filters  # the hook did run quiet.py


@pytest.mark.deepspeed
def test_two_rank_deepspeed_run_prints_no_warning_lines(recall_data, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    p = subprocess.run([*command("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                        os.path.join(BIN, "rmt-deepspeed-train"), *map(str, [recall_data, *TRAIN]), "--save-dir",
                        str(tmp_path / "ds"), "--deepspeed-config", "ds_configs/zero2.json"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert _noise(out) == []
    assert re.search(r"num_updates[ =]4", out)
