import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

import helpers  # noqa: E402

torch.set_num_threads(int(helpers.THREADS))


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
