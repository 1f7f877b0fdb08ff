"""What fairseq 0.12's own command-line tools need in order to serve stream-level models, installed when the
plugin is imported (like checkpoints.install and distributed.install):

- numpy >= 2 removed `np.compat`; fairseq 0.12's TokenBlockDataset uses `np.compat.long` in break mode "eos",
  the inference dataset of --task language_modeling (fairseq-interactive, the hub's score()/sample()), which
  therefore failed for every LM, stock ones included. `np.compat.long` is restored as numpy's int64 (what it
  aliased).
- fairseq-validate batches by --batch-size, which the stream task (validation streams: --batch-size-valid, saved in
  the checkpoint) did not see; a --batch-size given to fairseq-validate is used as --batch-size-valid.
- fairseq-eval-lm takes --context-window off --tokens-per-sample before the task and model are built, so a
  per-sample model's checks saw a sample length the user never gave: they read --context-window from the run's
  config the task's config belongs to (models/recurrent_lm.py `eval_context_window`) to name the user's flags.
- fairseq-eval-lm's word-level scoring (--post-process "@@ " / subword_nmt) merges a word's pieces within one
  scored row only. Under --task rmt_lm a row is one segment of a stream, so a word split across two segments
  became two "words" (its first pieces scored as a word of their own). For stream batches the pieces are
  merged across the segments of the same stream (`stream_eval_lm`), as fairseq merges them within a row.
- fairseq saves `--user-dir` as given (`user_dir`, relative to the checkout) in every checkpoint's config, and its
  import_user_module raises FileNotFoundError for a user dir that is not there: a saved config used from another
  working directory (`fairseq_cli.*.main(cfg)`, the hub's `from_pretrained(..., user_dir=...)`,
  rmt-deepspeed-train run elsewhere) stopped although the plugin was imported. A missing folder named like this
  plugin's shim (`user_dir`) is this plugin, registered when `rmt_fairseq` was imported (`_patch_user_dir`).
- fairseq 0.12 registers the `characters` and `bytes` BPEs without a config dataclass, so hydra has no
  `bpe/characters` node and every tool given `--bpe characters` (fairseq-interactive for a character-level model)
  stopped with "MissingConfigException: Could not find 'bpe/characters'". They get an empty config node.
"""

import itertools
import logging
import math
import sys
import types

import numpy as np

logger = logging.getLogger(__name__)

_state = {"installed": False}


def install() -> None:
    if _state["installed"]:
        return
    _state["installed"] = True
    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=np.int64)
    _patch_build_model()
    _patch_hydra_presets()
    _patch_user_dir()
    _register_config_less_encoders()
    main = sys.modules.get("__main__")
    running = getattr(getattr(main, "__spec__", None), "name", None)  # python -m fairseq_cli.<tool>
    for name, patch in [("fairseq_cli.eval_lm", _patch_eval_lm), ("fairseq_cli.validate", _patch_validate)]:
        for module in [sys.modules.get(name), main if running == name else None]:
            if module is not None and hasattr(module, "main"):
                patch(module)


def _patch_build_model() -> None:
    """What a model records while it is built for training (`trained_with`: the dictionary's fingerprint, the
    segment length; models/rmt_lm.py) goes into the config fairseq saves in its checkpoints. fairseq builds a
    model whose --arch is its model name (rmt_lm, rmt_transformer_lm) from a merged copy of that config, so a
    value set on the model's own config would not be saved."""
    from fairseq import models
    from omegaconf import OmegaConf, open_dict

    original = models.build_model

    def build_model(cfg, task, from_checkpoint=False):
        if from_checkpoint and OmegaConf.is_config(cfg):
            # a checkpoint's rmt_lm config written before a field existed: the value it was trained with, set
            # before fairseq runs the --arch function (a preset would otherwise fill in today's preset value)
            from rmt_fairseq.models.rmt_lm import RMTLanguageModel
            from rmt_fairseq.models.trained_with import with_legacy_values

            arch = getattr(cfg, "_name", None) or getattr(cfg, "arch", None)
            if isinstance(models.ARCH_MODEL_REGISTRY.get(arch), type) and \
                    issubclass(models.ARCH_MODEL_REGISTRY[arch], RMTLanguageModel):
                with_legacy_values(cfg)
        model = original(cfg, task, from_checkpoint)
        record = getattr(model, "trained_with", None)
        for target in (cfg, getattr(model, "cfg", None)):
            if record and OmegaConf.is_config(target):
                with open_dict(target):
                    for key, value in record.items():
                        if target.get(key) is None:
                            target[key] = value
        return model

    models.build_model = build_model


def _patch_hydra_presets() -> None:
    """fairseq-hydra-train with a preset of this plugin as the model's name (`model: {_name: rmt_tiny}`): fairseq's
    add_defaults fills the model node with the model dataclass's defaults (rmt_lm's) before fairseq runs the preset
    function, which then finds every field set and changes nothing, so the bare model was built, silently. Here
    the preset runs first on the node as written (its values fill only what the yaml leaves out, as --arch does
    under fairseq-train), then fairseq fills in the rest. fairseq-train's main calls add_defaults after importing
    the plugin; a config whose model node is already complete (fairseq-train's own) is left as it is."""
    import argparse
    import dataclasses

    import fairseq_cli.train
    from fairseq.dataclass.utils import interpret_dc_type
    from fairseq.models import (
        ARCH_CONFIG_REGISTRY,
        ARCH_MODEL_NAME_REGISTRY,
        ARCH_MODEL_REGISTRY,
        MODEL_DATACLASS_REGISTRY,
    )
    from fairseq.tasks import TASK_DATACLASS_REGISTRY
    from omegaconf import DictConfig, OmegaConf, open_dict

    original = fairseq_cli.train.add_defaults

    def add_defaults(cfg):
        model = cfg.get("model") if isinstance(cfg, DictConfig) else None
        name = model.get("_name") if isinstance(model, DictConfig) else None
        if name in ARCH_CONFIG_REGISTRY and ARCH_MODEL_NAME_REGISTRY.get(name) != name \
                and ARCH_MODEL_REGISTRY[name].__module__.startswith("rmt_fairseq."):
            # the preset on one flat namespace of the task's and the model's keys, as argparse hands it to
            # --arch; what it adds goes to the task node where the task has that field (a preset's segment
            # length is --tokens-per-sample), else to the model node
            task = cfg.get("task")
            task_name = task.get("_name") if isinstance(task, DictConfig) else None
            given = {**(OmegaConf.to_container(task) if isinstance(task, DictConfig) else {}),
                     **OmegaConf.to_container(model), "task": task_name}
            ns = argparse.Namespace(**given)
            ARCH_CONFIG_REGISTRY[name](ns)
            task_dc = TASK_DATACLASS_REGISTRY.get(task_name)
            task_fields = {f.name: f for f in dataclasses.fields(task_dc)} if task_dc is not None else {}
            model_dc = MODEL_DATACLASS_REGISTRY.get(ARCH_MODEL_NAME_REGISTRY[name])
            model_fields = {f.name: f for f in dataclasses.fields(model_dc)} if model_dc is not None else {}
            for key, value in vars(ns).items():
                if given.get(key) is None and value is not None:
                    in_task = key in task_fields and isinstance(task, DictConfig)
                    f = (task_fields if in_task else model_fields).get(key)
                    kind = interpret_dc_type(f.type) if f is not None else None
                    if kind in (int, bool, float):  # as fairseq's _override_attr converts an argparse value
                        value = kind(value)
                    target = task if in_task else model
                    with open_dict(target):
                        target[key] = value
        return original(cfg)

    fairseq_cli.train.add_defaults = add_defaults


# the folder name of this plugin's --user-dir shim (the checkout's user_dir/, not part of the installed package)
SHIM_NAME = "user_dir"


def _patch_user_dir() -> None:
    """fairseq's import_user_module, except that a user dir that does not exist (fairseq's own lookups, relative to
    the working directory and to fairseq's folder, all fail) and is named like this plugin's shim is taken to be
    this plugin, already registered: the import of rmt_fairseq that installed this patch registered it."""
    import os

    from fairseq import utils

    original = utils.import_user_module

    def import_user_module(args):
        path = getattr(args, "user_dir", None)
        if path is not None and os.path.basename(os.path.normpath(path)) == SHIM_NAME:
            fairseq_dir = os.path.dirname(utils.__file__)
            if not any(os.path.exists(p) for p in (os.path.abspath(path), os.path.join(fairseq_dir, path),
                                                   os.path.join(fairseq_dir, "..", path))):
                logger.debug("--user-dir %s: not found; this plugin (rmt_fairseq) is registered", path)
                return
        return original(args)

    utils.import_user_module = import_user_module


def _register_config_less_encoders() -> None:
    """An empty FairseqDataclass for every registered BPE / tokenizer that has none (`--bpe characters`,
    `--bpe bytes`), as fairseq's register_x does for those given one: the dataclass registry entry makes
    convert_namespace_to_omegaconf pass `bpe=characters`, the ConfigStore node lets hydra compose it."""
    import fairseq.data.encoders  # noqa: F401  (imports every encoder, filling the registries)
    from fairseq.dataclass import FairseqDataclass
    from fairseq.registry import REGISTRIES
    from hydra.core.config_store import ConfigStore

    for group in ("bpe", "tokenizer"):
        registry = REGISTRIES.get(group)
        if registry is None:
            continue
        for name in registry["registry"]:
            if name not in registry["dataclass_registry"]:
                registry["dataclass_registry"][name] = FairseqDataclass
                node = FairseqDataclass()
                node._name = name
                ConfigStore.instance().store(name=name, group=group, node=node, provider="fairseq")


def _patch_validate(module) -> None:
    """fairseq-validate batches the split it validates by --batch-size; the stream task reads validation splits
    as --batch-size-valid streams, which the checkpoint saved from training: a --batch-size given to
    fairseq-validate (and no --batch-size-valid) is the number of streams."""
    original_main = module.main

    def main(cfg, override_args=None, **kwargs):
        if override_args is not None and getattr(override_args, "batch_size", None) is not None \
                and getattr(override_args, "batch_size_valid", None) is None:
            override_args.batch_size_valid = override_args.batch_size
        return original_main(cfg, override_args=override_args, **kwargs)

    main.__module__ = original_main.__module__  # still fairseq_cli.validate's main (distributed.call_main checks)
    module.main = main


def _patch_eval_lm(module) -> None:
    original_main, original_eval_lm = module.main, module.eval_lm

    def main(cfg, **kwargs):
        eval_cfg = getattr(cfg, "eval_lm", None)
        context = getattr(eval_cfg, "context_window", None) or getattr(cfg, "context_window", 0) or 0
        task = getattr(getattr(cfg, "task", None), "_name", None)
        if context and task in ("rmt_lm", "rmt_algorithmic"):  # before fairseq subtracts it from a None length
            from rmt_fairseq.errors import RMTConfigError

            raise RMTConfigError(f"--context-window {context} does not apply to --task {task}: memory (and --mem-len "
                                 f"cache) already carry context across segments")
        return original_main(cfg, **kwargs)

    def eval_lm(models, source_dictionary, batch_iterator, post_process=None, **kwargs):
        if post_process not in {"subword_nmt", "@@ "}:
            return original_eval_lm(models, source_dictionary, batch_iterator, post_process, **kwargs)
        batches = iter(batch_iterator)
        first = next(batches, None)
        batches = itertools.chain([first] if first is not None else [], batches)
        if first is None or not _is_stream_batch(first):
            return original_eval_lm(models, source_dictionary, batches, post_process, **kwargs)
        return stream_eval_lm(models, source_dictionary, batches, post_process, **kwargs)

    module.main, module.eval_lm = main, eval_lm


def _is_stream_batch(sample) -> bool:
    from rmt_fairseq.models.recurrent_lm import StreamStates

    return isinstance((sample.get("net_input") or {}).get("rmt_state"), StreamStates)


def stream_eval_lm(models, source_dictionary, batch_iterator, post_process, output_word_probs=False,
                   output_word_stats=False, target_dictionary=None, softmax_batch=0, remove_bos_token=False,
                   device=None):
    """fairseq_cli.eval_lm.eval_lm for --task rmt_lm batches (row i of every batch is stream i, one segment per
    batch) with BPE post-processing: a word's pieces are merged across the segments of its stream, its score is
    the sum of its pieces' log-probabilities (fairseq's rule within a row), and the loss is the total
    log-probability over the number of words (base 2). Streams are contiguous slices of the split: the pieces
    that end one stream are the start of the next stream's first word. Same arguments and result as fairseq's
    function."""
    from fairseq import utils
    from fairseq.logging.meters import StopwatchMeter
    from fairseq.sequence_scorer import SequenceScorer
    from fairseq_cli.eval_lm import WordStat

    target_dictionary = target_dictionary or source_dictionary
    device = device or next(models[0].parameters()).device
    scorer = SequenceScorer(target_dictionary, softmax_batch)
    timer = StopwatchMeter()
    bpe_cont = post_process.rstrip()
    bpe_toks = {i for i in range(len(source_dictionary)) if source_dictionary[i].endswith(bpe_cont)}
    pending = {}  # stream row -> (pieces of the word in progress, their summed log-probability)
    words = {}  # stream row -> [(word, log-prob, made of pieces)] (for --output-word-stats' next-word figures)
    score_sum, count, rows = 0.0, 0, 0

    def finish(row, word, score, is_bpe, line):
        nonlocal score_sum, count
        if math.isinf(score):
            logger.info("skipping a word with an inf score: %s", word)
            return
        score_sum, count = score_sum + score, count + 1
        line.append((word, score))
        if output_word_stats:
            words.setdefault(row, []).append((word, score, is_bpe))

    for sample in batch_iterator:
        if "net_input" not in sample:
            continue
        sample = utils.move_to_cuda(sample, device=device)
        timer.start()
        hypos = scorer.generate(models, sample)
        timer.stop(sample["ntokens"])
        rows = len(hypos)
        for row, hypos_i in enumerate(hypos):
            tokens, scores = hypos_i[0]["tokens"].tolist(), hypos_i[0]["positional_scores"].float().tolist()
            pieces, acc = pending.pop(row, ("", 0.0))
            line = []
            for tok, sc in zip(tokens, scores):
                piece = source_dictionary[tok]
                if tok in bpe_toks:
                    pieces, acc = pieces + piece[: -len(bpe_cont)], acc + sc
                    continue
                finish(row, pieces + piece, acc + sc, bool(pieces), line)
                pieces, acc = "", 0.0
            if pieces:
                pending[row] = (pieces, acc)
            if output_word_probs:
                logger.info(str(int(sample["id"][row])) + " " + "\t".join("{} [{:2f}]".format(w, s) for w, s in line))
    # stream r's last target is followed by stream r+1's first one (data/streams.py cuts the split into contiguous
    # streams): pieces left at the end of stream r belong to the first word of stream r+1, already counted there
    for row, (pieces, acc) in sorted(pending.items()):
        if row + 1 < rows:
            score_sum += acc
            if words.get(row + 1):
                w, sc, _ = words[row + 1][0]
                words[row + 1][0] = (pieces + w, sc + acc, True)
        else:  # the split (or this shard of it) ends inside a word: its pieces count as one word, as in fairseq
            finish(row, pieces, acc, True, [])
    loss = -score_sum / count / math.log(2) if count > 0 else 0
    logger.info("Evaluated {:,} tokens in {:.1f}s ({:.2f} tokens/s); {:,} words (--post-process {!r}: pieces "
                "merged across segments of each stream)".format(timer.n, timer.sum,
                                                                1.0 / timer.avg if timer.avg > 0 else 0, count,
                                                                post_process))
    if output_word_stats:
        stats = {}
        for row_words in words.values():
            for i, (w, sc, is_bpe) in enumerate(row_words):
                nxt = row_words[i + 1][1] if i + 1 < len(row_words) else None
                stats.setdefault(w, WordStat(w, is_bpe)).add(sc, nxt)
        for ws in sorted(stats.values(), key=lambda x: x.count, reverse=True):
            logger.info(ws)
    return {"loss": loss, "perplexity": 2**loss}
