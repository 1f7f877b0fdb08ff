"""Issue 26: Hydra builds what it names. fairseq-hydra-train fills a model node with its model dataclass's defaults
before fairseq runs the preset function, so `model: {_name: rmt_tiny}` built the bare rmt_lm (41,088,540 parameters
instead of 76,544), silently. For every preset of this plugin, the configuration fairseq-hydra-train's path gives
(a yaml naming only the task and the preset; fairseq_cli.train's add_defaults, as its main calls it) must be the one
`fairseq-train --arch NAME` gives, model and task."""

import pytest
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_MODEL_NAME_REGISTRY, ARCH_MODEL_REGISTRY
from omegaconf import OmegaConf

import user_dir  # noqa: F401  (registrations)
from rmt_fairseq.models.rmt_encoder import RMTEncoderModel
from rmt_fairseq.models.rmt_transformer_lm import RMTTransformerLanguageModel

PRESETS = sorted(n for n, cls in ARCH_MODEL_REGISTRY.items()
                 if cls.__module__.startswith("rmt_fairseq.") and ARCH_MODEL_NAME_REGISTRY[n] != n)


def _task(name):
    """The task each family trains under: the encoder's documents, the wrapper's per-sample segments (fairseq's
    language_modeling, whose --tokens-per-sample is the sample), rmt_lm's streams."""
    family = ARCH_MODEL_REGISTRY[name]
    if issubclass(family, RMTEncoderModel):
        return "rmt_long_classification"
    return "language_modeling" if issubclass(family, RMTTransformerLanguageModel) else "rmt_lm"


def _task_flags(name):
    return {"language_modeling": {"tokens_per_sample": 64}}.get(_task(name), {})


def _argparse_cfg(name):
    parser = options.get_training_parser()
    flags = [a for k, v in _task_flags(name).items() for a in ("--" + k.replace("_", "-"), str(v))]
    args = options.parse_args_and_arch(parser, ["data", "--user-dir", "user_dir", "--task", _task(name), "--arch",
                                                name, "--criterion", "cross_entropy", "--batch-size", "8", *flags])
    return convert_namespace_to_omegaconf(args)


def _hydra_cfg(name, **model):
    """The config as fairseq-hydra-train hands it to fairseq_cli.train.main: the yaml's nodes, the rest fairseq's
    defaults (taken from an argparse config without the arch's group)."""
    import fairseq_cli.train

    base = OmegaConf.to_container(_argparse_cfg(name), resolve=True)
    base["task"] = {"_name": _task(name), "data": "data", **_task_flags(name)}
    base["model"] = {"_name": name, **model}
    cfg = OmegaConf.create(base)
    fairseq_cli.train.add_defaults(cfg)  # patched by the plugin (rmt_fairseq/compat.py), as main calls it
    return cfg


def test_every_preset_is_covered():
    assert {"rmt_tiny", "rmt_wt103", "armt_tiny", "armt_encoder_tiny"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_named_under_hydra_is_the_preset_of_fairseq_train(name):
    want, got = _argparse_cfg(name), _hydra_cfg(name)
    w, g = (OmegaConf.to_container(c.model, resolve=True) for c in (want, got))
    assert {k: (w.get(k), g.get(k)) for k in set(w) | set(g) if w.get(k) != g.get(k)} == {}
    assert got.task.tokens_per_sample == want.task.tokens_per_sample  # the preset's segment length


def test_the_yaml_s_own_values_win_over_the_preset():
    cfg = _hydra_cfg("rmt_tiny", mem_tokens=7, decoder_layers=3)
    assert (cfg.model.mem_tokens, cfg.model.decoder_layers, cfg.model.decoder_embed_dim) == (7, 3, 64)
