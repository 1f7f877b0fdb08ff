"""Issue 26: the shipped fairseq-hydra-train recipes (examples/*/config/*.yaml) run, and build and train what
`fairseq-train` builds and trains from the same settings written as flags: the same parameter count and the same
first losses. The flags are derived from the yaml itself (every key is the fairseq-train flag of the same name),
so the two paths read one recipe."""

import os
import re

import pytest
from omegaconf import OmegaConf

from helpers import REPO, cli, train_losses

GROUPS = ("common", "task", "model", "criterion", "optimizer", "lr_scheduler", "optimization", "dataset",
          "checkpoint")
NAME_FLAG = {"task": "--task", "model": "--arch", "criterion": "--criterion", "optimizer": "--optimizer",
             "lr_scheduler": "--lr-scheduler"}
# recipe: (data fixture, overrides that shrink it for this CPU, written once and given to both paths)
SHRINK_LM = {"model.decoder_layers": 2, "model.decoder_embed_dim": 32, "model.decoder_ffn_embed_dim": 64,
             "model.decoder_attention_heads": 2}
RECIPES = {
    "examples/algorithmic/config/demo.yaml": ("copy_data", {}),
    "examples/wikitext-103/config/rmt_wt103.yaml": ("recall_data", {**SHRINK_LM, "model.decoder_head_dim": 16,
                                                                    "model.adaptive_softmax_cutoff": "12",
                                                                    "task.tokens_per_sample": 8,
                                                                    "dataset.batch_size": 8}),
    "examples/custom-corpus/config/armt_tiny.yaml": ("recall_data", {"task.tokens_per_sample": 8,
                                                                     "dataset.batch_size": 8}),
}
RUN = {"optimization.max_update": 3, "common.log_interval": 1, "common.cpu": True, "dataset.num_workers": 0,
       "dataset.disable_validation": True, "checkpoint.no_save": True}


def _flags(recipe: str, overrides: dict) -> list:
    """The fairseq-train command line of a recipe (data first), with the overrides applied."""
    cfg = OmegaConf.load(os.path.join(REPO, recipe))
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    flags = [cfg.task.data]
    for group in GROUPS:
        for key, value in (cfg.get(group) or {}).items():
            if key == "data":
                continue
            if key == "_name":
                flags += [NAME_FLAG[group], value]
            elif value is True:
                flags.append("--" + key.replace("_", "-"))
            elif value not in (False, None):
                value = ",".join(map(str, value)) if OmegaConf.is_list(value) else value
                flags += ["--" + key.replace("_", "-"), value]
    return flags


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy")
    cli("rmt-data", "copy", "--out", root / "raw", "--src-len", 10, "--train-size", 200, "--valid-size", 20,
        "--test-size", 20, "--seed", 1)
    cli("fairseq-preprocess", "--only-source", "--trainpref", root / "raw/train.txt", "--validpref",
        root / "raw/valid.txt", "--testpref", root / "raw/test.txt", "--destdir", root / "bin", "--workers", 1)
    return str(root / "bin")


def _params(log: str) -> int:
    return int(re.search(r"num\. shared model params: ([0-9,]+)", log).group(1).replace(",", ""))


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_shipped_hydra_recipe_trains_what_fairseq_train_trains(recipe, request, tmp_path):
    fixture, shrink = RECIPES[recipe]
    data = request.getfixturevalue(fixture)
    overrides = {**shrink, **RUN, "task.data": data, "checkpoint.save_dir": str(tmp_path / "save")}
    folder, name = os.path.split(recipe)
    h = cli("fairseq-hydra-train", "--config-dir", os.path.join(REPO, folder), "--config-name", name[: -len(".yaml")],
            *[f"++{k}={v}" for k, v in overrides.items()])  # ++: set, or add a key the yaml leaves to the preset
    f = cli("fairseq-train", *_flags(recipe, overrides))
    hydra_log, train_log = h.stdout + h.stderr, f.stdout + f.stderr
    assert _params(hydra_log) == _params(train_log) > 0
    got, want = train_losses(hydra_log), train_losses(train_log)
    assert sorted(got) == sorted(want) == [1, 2, 3], hydra_log[-3000:]
    assert got == want, (got, want)
    assert not any(os.path.exists(os.path.join(REPO, n)) for n in ("hydra_train.log", ".hydra", "outputs/.hydra"))
