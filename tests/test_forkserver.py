"""The tests' fork server (tests/forkserver.py) runs a command as a fresh process would: every console script's
--help, a training and its evaluation, an error exit, stdin, and signals give the same stdout, stderr and exit
status forked (helpers.command) as started fresh from the installed entry point (helpers.fresh_command). These
are also the tests that start each console script as a user does."""

import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from forkserver import zygote_path
from helpers import CONSOLE_SCRIPTS, REPO, THREADS, command, fresh_command

TIMES = [
    (r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "DATE"),
    (r"\b(wps|ups|wall|train_wall|took|in) [0-9.]+", r"\1 N"),
    (r"[0-9.]+ (seconds|tokens/s|s\b)", r"N \1"),
    (r"\(writing took [0-9.]+ seconds\)", "(writing took N seconds)"),
]


def normalise(text: str, *paths) -> str:
    for pattern, repl in TIMES:
        text = re.sub(pattern, repl, text)
    for i, path in enumerate(paths):
        text = text.replace(str(path), f"PATH{i}")
    return text


def both(name, args, tmp_path, input=None, paths=lambda i: ()):
    """(fresh, forked) CompletedProcess of the same command; args may be a function of the run's index (0 fresh,
    1 forked), for runs that write files."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=THREADS)
    out = []
    for i, cmd in enumerate([fresh_command(name), command(name)]):
        a = args(i) if callable(args) else args
        out.append(subprocess.run([*cmd, *map(str, a)], cwd=REPO, env=env, input=input, capture_output=True,
                                  text=True, timeout=300))
    # the second run was forked: its zygote exists (a client that fell back to a fresh process starts none)
    assert os.path.exists(zygote_path(os.environ["RMT_TEST_FORKSERVER"], command(name)[-1], env)), \
        "the command ran as a fresh process: the environment differs from the server's in an import-time variable"
    return out


def test_commands_go_through_the_server():
    assert os.environ.get("RMT_TEST_FORKSERVER") not in (None, "", "0"), "conftest starts one per test process"
    assert command("fairseq-train")[-1].startswith("script:") and fresh_command("fairseq-train") != \
        command("fairseq-train")


@pytest.mark.parametrize("name", CONSOLE_SCRIPTS)
def test_help_is_the_same_fresh_and_forked(name, tmp_path):
    if len(fresh_command(name)) > 1 or not os.path.exists(fresh_command(name)[0]):
        pytest.skip(f"{name} is not installed as a script here")
    fresh, forked = both(name, ["--help"], tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert (forked.returncode, normalise(forked.stdout), normalise(forked.stderr)) == \
        (fresh.returncode, normalise(fresh.stdout), normalise(fresh.stderr))


def test_training_evaluation_and_an_error_are_the_same_fresh_and_forked(recall_data, tmp_path):
    saves = [tmp_path / "fresh", tmp_path / "forked"]
    train = lambda i: [recall_data, "--user-dir", "user_dir", "--arch", "rmt_tiny", "--decoder-embed-dim", 32,  # noqa
                       "--task", "rmt_lm", "--tokens-per-sample", 8, "--criterion", "rmt_cross_entropy",
                       "--batch-size", 4, "--optimizer", "adam", "--lr", "3e-3", "--cpu", "--num-workers", 0,
                       "--max-update", 6, "--validate-interval-updates", 3, "--seed", 1, "--save-dir", saves[i]]
    runs = both("fairseq-train", train, tmp_path)
    assert runs[0].returncode == 0, runs[0].stdout[-3000:] + runs[0].stderr[-3000:]
    assert "num_updates 6" in runs[0].stdout  # fairseq-train logs to stdout: so must the forked one
    fresh, forked = [(r.returncode, normalise(r.stdout, saves[i]), normalise(r.stderr, saves[i]))
                     for i, r in enumerate(runs)]
    assert forked == fresh
    runs = both("fairseq-eval-lm", lambda i: [recall_data, "--user-dir", "user_dir", "--path",
                                              saves[i] / "checkpoint_last.pt", "--task", "rmt_lm", "--batch-size", 2,
                                              "--cpu", "--num-workers", 0], tmp_path)
    assert runs[0].returncode == 0 and "Loss (base 2)" in runs[0].stdout + runs[0].stderr
    assert [normalise(r.stdout + r.stderr, saves[i]) for i, r in enumerate(runs)][0] == \
        [normalise(r.stdout + r.stderr, saves[i]) for i, r in enumerate(runs)][1]
    # an error of the plugin: one `error:` line and the same exit status
    bad = both("fairseq-train", [recall_data, "--user-dir", "user_dir", "--arch", "rmt_tiny", "--task", "rmt_lm",
                                 "--mem-tokens", -1, "--cpu", "--max-update", 1, "--save-dir", tmp_path / "bad"],
               tmp_path)
    assert bad[0].returncode != 0 and any(line.startswith("error: ") for line in bad[0].stderr.splitlines())
    assert (bad[1].returncode, normalise(bad[1].stdout), normalise(bad[1].stderr)) == \
        (bad[0].returncode, normalise(bad[0].stdout), normalise(bad[0].stderr))


def _forked_commands() -> list:
    """The processes the fork server runs commands in now (root -> zygote -> supervisor -> tool)."""
    import json

    with open(os.path.join(os.environ["RMT_TEST_FORKSERVER"], "server.json")) as f:
        root = psutil.Process(json.load(f)["pid"])
    return [p for zygote in root.children() for p in zygote.children(recursive=True)]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_signal_ends_the_forked_command_as_it_ends_a_process(recall_data, tmp_path, how):
    """SIGTERM to the client is forwarded: the tool dies of it and the caller sees -SIGTERM, as from a process.
    SIGKILL of the client (a test's timeout) leaves no tool process behind."""
    save = tmp_path / "save"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=THREADS)
    args = [recall_data, "--user-dir", "user_dir", "--arch", "rmt_tiny", "--task", "rmt_lm", "--tokens-per-sample", 8,
            "--criterion", "rmt_cross_entropy", "--batch-size", 4, "--optimizer", "adam", "--lr", "1e-3", "--cpu",
            "--num-workers", 0, "--max-update", 3000, "--log-interval", 1, "--log-format", "simple",
            "--disable-validation", "--save-dir", save]
    p = subprocess.Popen([*command("fairseq-train"), *map(str, args)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    try:
        for line in p.stdout:
            log.append(line)
            if "num_updates=2" in line:
                break
        assert "num_updates=2" in log[-1], "".join(log)[-3000:]
        assert not psutil.Process(p.pid).children(), "the client starts no process of its own: the server forks it"
        assert _forked_commands()
        p.send_signal(getattr(signal, how))
        assert p.wait(timeout=60) == -getattr(signal, how)
        deadline = time.time() + 30
        while _forked_commands() and time.time() < deadline:
            time.sleep(0.2)
        assert not _forked_commands()
    finally:  # nothing left running whatever failed (the command trains for 3000 updates)
        p.kill()
        p.stdout.close()
        for left in _forked_commands():
            left.kill()
