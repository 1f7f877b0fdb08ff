import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def recall_data(tmp_path_factory):
    from helpers import make_recall_data

    return make_recall_data(str(tmp_path_factory.mktemp("recall")))
