import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

import helpers  # noqa: E402

torch.set_num_threads(int(helpers.THREADS))
os.environ["OMP_NUM_THREADS"] = helpers.THREADS  # models built in this process keep it (rmt_fairseq/threads.py)


def pytest_sessionstart(session):
    session.config._rmt_start = __import__("time").time()


def pytest_sessionfinish(session):
    """DeepSpeed's CPU ranks leave their shared-memory buffers in /dev/shm: the ones this run made go (by the
    process that ran no test under xdist, once every worker is done)."""
    if not hasattr(session.config, "workerinput"):
        helpers.remove_deepspeed_buffers(since=getattr(session.config, "_rmt_start", 0.0))


def pytest_configure(config):
    """The fork server that runs the tests' commands (tests/forkserver.py), one per process that runs tests (each
    pytest-xdist worker; not the controller, which runs none)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    if getattr(config.option, "collectonly", False):
        return
    helpers.start_fork_server()


@pytest.fixture(scope="session")
def recall_data(tmp_path_factory):
    from helpers import make_recall_data

    return make_recall_data(str(tmp_path_factory.mktemp("recall")))
