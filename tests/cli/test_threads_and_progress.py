"""Torch threads on a shared CPU (rmt_fairseq/threads.py) and the demo's console and log files (issue 27)."""

import os
import subprocess
import sys

from rmt_fairseq import threads
from rmt_fairseq.cli import demo

PROBE = ("import logging, sys, torch\nlogging.basicConfig(level=logging.INFO, format='%(message)s')\n"
         "from rmt_fairseq import threads\nm = torch.nn.Linear(int(sys.argv[1]), 1000)\n"
         "threads.configure(m, cpu=True); threads.configure(torch.nn.Linear(4000, 1000), cpu=True)\n"
         "print('threads', torch.get_num_threads())\n")


def _probe(inputs, **env):
    """A fresh process (torch's thread pool is per process) building a model of inputs x 1000 parameters."""
    base = {k: v for k, v in os.environ.items() if k not in threads.OVERRIDES and k != "LOCAL_WORLD_SIZE"}
    p = subprocess.run([sys.executable, "-c", PROBE, str(inputs)], env={**base, **env}, capture_output=True,
                       text=True, timeout=120, check=True)
    return int(p.stdout.split()[-1]), [line for line in p.stderr.splitlines() if line.startswith("torch threads")]


def test_the_rule():
    small, large = threads.MIN_PARAMETERS_FOR_MORE_THREADS - 1, threads.MIN_PARAMETERS_FOR_MORE_THREADS
    assert [threads.choose(small, 2), threads.choose(large, 2), threads.choose(large, 8, ranks=2),
            threads.choose(large, 2, ranks=4)] == [1, 2, 4, 1]


def test_a_small_model_runs_one_thread_a_large_one_the_cpus_it_may_use_logged_once():
    assert _probe(10) == (1, ["torch threads: 1 per process (a model of 0.01M parameters, below 2M where a second "
                              "thread pays; OMP_NUM_THREADS=N chooses)"])
    n, logged = _probe(3000)  # 3M parameters: this process's CPUs (its affinity), shared by the host's ranks
    assert n == threads.cpus_available() and len(logged) == 1 and "CPUs available / 1 rank(s)" in logged[0]
    assert _probe(3000, LOCAL_WORLD_SIZE="64")[0] == 1


def test_omp_num_threads_is_the_users_choice():
    """A model the rule gives every CPU keeps the 1 thread the user asked for."""
    assert _probe(3000, OMP_NUM_THREADS="1") == (1, ["torch threads: 1 per process (OMP_NUM_THREADS=1)"])


def test_the_demos_logs_are_written_as_they_go_and_it_shows_progress(tmp_path, monkeypatch, capsys):
    """Every line the demo echoes is in its log file already (a buffered file held them until the run ended),
    and a quiet stretch of PROGRESS_S gets a progress line from fairseq-train's training statistics."""
    child = ("import time\nfor i in range(1, 13):\n    print(f'epoch 001 | loss={10 - i / 2:.3f}, x=1, "
             "num_updates={i}')\n    time.sleep(0.05)\n"
             "    if i % 4 == 0: print(f'valid on \\'valid\\' subset | {i}')\n")
    log = tmp_path / "train.log"
    seen = []

    def show(line):
        if "valid on" in line:
            seen.append(line in log.read_text())
            return True
        return False

    monkeypatch.setattr(demo, "PROGRESS_S", 0.1)
    demo._run([sys.executable, "-c", child], str(log), show=show,
              progress=lambda s: demo._progress(s, 12, 0.0))
    assert seen == [True, True, True]
    shown = capsys.readouterr().out.splitlines()
    progress = [line.split(":")[0].strip() for line in shown if "train loss" in line]
    assert len(progress) >= 2 and all(p.startswith("update ") and p.endswith("/12") for p in progress), shown
    assert len(log.read_text().splitlines()) == 15
