"""What the benchmark scripts share: a synthetic vocabulary, an RMT model of a given size, and running a CLI with
its log kept."""

import contextlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vocab_task(size: int):
    """A stand-in for a fairseq task: only the dictionary is needed to build a model."""
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(size):
        d.add_symbol(str(i))

    class Task:
        source_dictionary = target_dictionary = d
        stream_level = True  # as --task rmt_lm: the model's forward carries the caller's state from call to call

    return Task()


def rmt_model(task, layers: int, dim: int, heads: int = 4, **overrides):
    """An rmt_lm model (FFN 4 x dim, no dropout); overrides are RMTLanguageModelConfig fields."""
    import torch

    from rmt_fairseq.models.rmt_lm import RMTLanguageModel
    from rmt_fairseq.models.rmt_lm_config import RMTLanguageModelConfig

    torch.manual_seed(0)
    cfg = dict(decoder_layers=layers, decoder_embed_dim=dim, decoder_attention_heads=heads,
               decoder_ffn_embed_dim=4 * dim, dropout=0.0)
    cfg.update(overrides)
    return RMTLanguageModel.build_model(RMTLanguageModelConfig(**cfg), task)


# another user's torch job: matrix products with torch's default threads (one per core), until killed
BUSY = "import torch\na = torch.randn(512, 512)\nwhile True:\n    a = torch.tanh(a @ a)\n"


@contextlib.contextmanager
def busy_job(on: bool = True):
    """The block runs beside BUSY in a second process (started 2 s before, so that it computes from the block's
    start, without the caller's thread settings); on False: alone."""
    if not on:
        yield
        return
    from rmt_fairseq.threads import OVERRIDES

    env = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    other = subprocess.Popen([sys.executable, "-c", BUSY], env=env)
    try:
        time.sleep(2.0)  # its torch import
        yield
    finally:
        other.kill()
        other.wait()


def save_json(result: dict, path: str) -> None:
    """A benchmark's results (with their provenance) to `path`, its folder made; says where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


def run(cmd, log_path):
    """Run a CLI, keep its output in log_path; -> (output, seconds). On failure: its tail, and exit naming the log."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    with open(log_path, "w") as f:
        f.write(p.stdout + p.stderr)
    if p.returncode != 0:
        sys.stderr.write((p.stdout + p.stderr)[-4000:])
        raise SystemExit(f"error: {' '.join(cmd[:2])} failed with exit status {p.returncode}; log: {log_path}")
    return p.stdout + p.stderr, time.perf_counter() - t0
