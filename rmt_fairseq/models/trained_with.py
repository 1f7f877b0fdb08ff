"""What a trained model records and how a loaded one is checked against the data: the dictionary's fingerprint,
the vocabulary size of a saved state dict, and the values a checkpoint written before a field existed was trained
with (`LEGACY_VALUES`). Used by every family and every tool that loads a checkpoint.
"""

import os
import re
from typing import Optional

from omegaconf import open_dict

from rmt_fairseq.errors import check


def vocabulary_size(state_dict) -> Optional[int]:
    """The dictionary size a saved model state dict was trained with: rows of its input embedding (the sum
    over the bands of an adaptive input). None if it has neither."""
    if "decoder.embed_tokens.weight" in state_dict:
        w = state_dict["decoder.embed_tokens.weight"]
        return int(w.shape[0]) if w.dim() == 2 else None  # ZeRO-3 module states hold empty placeholders
    # fairseq's AdaptiveInput (embeddings.N.0) or Transformer-XL's AdaptiveEmbedding (emb_layers.N)
    bands = [v for k, v in state_dict.items()
             if re.fullmatch(r"decoder\.embed_tokens\.(embeddings\.\d+\.0|emb_layers\.\d+)\.weight", k)]
    if not bands or any(b.dim() != 2 for b in bands):
        return None
    return sum(int(b.shape[0]) for b in bands)


def check_vocabulary(state_dict, built: int, source: str, dict_file: str) -> None:
    """One line naming both files when a checkpoint was trained on another vocabulary than the data's."""
    saved = vocabulary_size(state_dict)
    check(saved is None or saved == built,
          f"{source} was trained with a vocabulary of {saved} types, but {dict_file} has {built}: the data was "
          f"binarized with another dictionary; binarize it with the checkpoint's (fairseq-preprocess --srcdict "
          f"<its data>/dict.txt)")


def data_dictionary_file(data) -> Optional[str]:
    """The dict.txt of a task's --data (its first path); None when --data is not a path."""
    return os.path.join(data.split(os.pathsep)[0], "dict.txt") if isinstance(data, str) and data not in ("", "???") \
        else None


def check_or_record_dictionary(cfg, dictionary, dict_file: Optional[str]) -> dict:
    """Every family's dictionary provenance: a model built from a checkpoint (its config's dictionary_fingerprint)
    is checked against the data's dictionary (one line naming the checkpoint file, cfg.checkpoint_file, and
    dict_file); a model built for training has none yet -> {"dictionary_fingerprint": ...} to record (compat.py
    writes it into the config fairseq saves), else {}."""
    saved, loaded = getattr(cfg, "dictionary_fingerprint", None), getattr(cfg, "checkpoint_file", None)
    check_fingerprint(saved, dictionary, f"the checkpoint {loaded}" if loaded else "the checkpoint",
                      dict_file or "the data's dict.txt")
    return {} if saved is not None else {"dictionary_fingerprint": dictionary_fingerprint(dictionary)}


def dictionary_fingerprint(dictionary) -> str:
    """sha256 (first 16 hex digits) of a fairseq Dictionary's symbols in index order: equal iff every token id
    means the same token (counts do not matter)."""
    import hashlib

    return hashlib.sha256("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()[:16]


def check_fingerprint(saved: Optional[str], dictionary, source: str, dict_file: str) -> None:
    """One line naming both files when a model was trained on a dictionary with other token ids (a reordered,
    added or removed entry) than the data's dict.txt. `saved` None (older checkpoints): nothing to compare."""
    mine = dictionary_fingerprint(dictionary)
    check(saved is None or saved == mine,
          f"{source} was trained with another dictionary than {dict_file} (fingerprint {saved} vs {mine}: the same "
          f"token ids would mean other tokens); binarize the data with the checkpoint's dictionary "
          f"(fairseq-preprocess --srcdict <its data>/dict.txt)")


# Fields whose value for a checkpoint written before they existed is not their default (nor a preset's): what such
# a checkpoint was trained with (write memory saw the XL cache, memory tokens had no dropout, fairseq's embedding
# and softmax modules).
LEGACY_VALUES = {"read_mem_from_cache": None, "no_memory_dropout": True, "embedding_impl": "fairseq",
                 "init": "fairseq"}


def with_legacy_values(cfg):
    """A checkpoint's model config (OmegaConf): fields it lacks get LEGACY_VALUES (rmt_fairseq.compat calls this
    for every rmt_lm checkpoint, before fairseq applies the --arch preset)."""
    missing = {k: v for k, v in LEGACY_VALUES.items() if k not in cfg}
    if missing:
        with open_dict(cfg):
            for k, v in missing.items():
                cfg[k] = v
    return cfg
