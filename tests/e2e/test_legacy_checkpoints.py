"""A checkpoint written before the Transformer-XL switches existed (memory dropout, the memory rows' view of the XL
cache, the embedding modules; models/rmt_lm.py LEGACY_VALUES) keeps what it was trained with: resumed by
fairseq-train with today's preset flags it continues as trained (today's --arch rmt_wt103 would otherwise build XL's
embedding modules and fail to load it), and what the resumed run saves says so."""

import pytest
import torch

from helpers import cli

WT103_SHRUNK = ["--arch", "rmt_wt103", "--decoder-layers", 1, "--decoder-embed-dim", 32, "--decoder-head-dim", 16,
                "--decoder-attention-heads", 2, "--decoder-ffn-embed-dim", 32, "--adaptive-softmax-cutoff", "8,16",
                "--mem-tokens", 2, "--mem-len", 4]
TRAIN = ["--user-dir", "user_dir", "--task", "rmt_lm", "--criterion", "rmt_cross_entropy", "--tokens-per-sample", 8,
         "--batch-size", 4, "--optimizer", "adam", "--lr", "2e-3", "--cpu", "--seed", 1, "--log-format", "simple",
         "--log-interval", 1, "--no-epoch-checkpoints", "--num-workers", 0, "--disable-validation"]
NEW_FIELDS = ["read_mem_from_cache", "no_memory_dropout", "embedding_impl", "init", "same_length", "clamp_len",
              "init_std", "init_range", "proj_init_std", "div_val"]


@pytest.fixture(scope="module")
def old_checkpoint(recall_data, tmp_path_factory):
    """A shrunk rmt_wt103 checkpoint as the code before the switches wrote it: trained with fairseq's embedding
    modules and initialisation and no memory dropout, its saved config without the new fields."""
    save = tmp_path_factory.mktemp("old")
    cli("fairseq-train", recall_data, *TRAIN, *WT103_SHRUNK, "--embedding-impl", "fairseq", "--init", "fairseq",
        "--no-memory-dropout", "--max-update", 4, "--save-dir", save)
    path = save / "checkpoint_last.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in NEW_FIELDS:
        del state["cfg"]["model"][key]
    torch.save(state, path)
    return save


def test_resume_with_todays_preset_continues_as_trained(recall_data, old_checkpoint):
    p = cli("fairseq-train", recall_data, *TRAIN, *WT103_SHRUNK, "--max-update", 6, "--save-dir", old_checkpoint)
    log = p.stdout + p.stderr
    assert "written before --read-mem-from-cache, --no-memory-dropout, --embedding-impl, --init existed" in log, \
        log[-3000:]
    assert "num_updates 6" in log or "num_updates=6" in log, log[-2000:]
    state = torch.load(old_checkpoint / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    saved = state["cfg"]["model"]
    assert saved["read_mem_from_cache"] is None and saved["no_memory_dropout"] is True
    assert saved["embedding_impl"] == "fairseq"
    assert not any(k.startswith("decoder.adaptive_softmax.out_layers") for k in state["model"])  # fairseq's modules


def test_eval_lm_loads_it_as_trained(recall_data, old_checkpoint):
    p = cli("fairseq-eval-lm", recall_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path",
            old_checkpoint / "checkpoint_last.pt", "--batch-size", 2, "--cpu")
    assert "Loss (base 2)" in p.stdout + p.stderr
