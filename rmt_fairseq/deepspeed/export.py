"""Export a DeepSpeed checkpoint of rmt-deepspeed-train to a normal fairseq checkpoint.

    python -m rmt_fairseq.deepspeed.export --checkpoint-dir checkpoints/rmt [--tag update1000] --out model.pt

ZeRO-1/2/3 shards are consolidated with DeepSpeed's get_fp32_state_dict_from_zero_checkpoint (a ZeRO-0
checkpoint's model file already holds the whole model); the training config saved with the checkpoint becomes
the fairseq checkpoint's cfg, so `fairseq-eval-lm DATA --user-dir user_dir --task rmt_lm --path model.pt`
evaluates it. The output is written atomically (a temporary file renamed into place).
"""

import argparse
import glob
import logging
import os
import sys

logger = logging.getLogger(__name__)


def main(argv=None):
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    ap = argparse.ArgumentParser(prog="rmt-deepspeed-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint-dir", required=True, help="the --save-dir of rmt-deepspeed-train")
    ap.add_argument("--tag", help="checkpoint tag (default: the one in checkpoint-dir/latest)")
    ap.add_argument("--out", required=True, help="fairseq checkpoint to write")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.checkpoint_dir):
        ap.error(f"--checkpoint-dir {a.checkpoint_dir}: no such directory")
    latest = os.path.join(a.checkpoint_dir, "latest")
    if a.tag is None:
        if not os.path.isfile(latest):
            ap.error(f"--checkpoint-dir {a.checkpoint_dir}: no 'latest' file (not the --save-dir of "
                     f"rmt-deepspeed-train, or it never saved); pass --tag")
        a.tag = open(latest).read().strip()
    tag_dir = os.path.join(a.checkpoint_dir, a.tag)
    if not os.path.isdir(tag_dir):
        ap.error(f"--tag {a.tag}: no directory {tag_dir}")

    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # ZeRO-1/2 write mp_rank_00_model_states.pt; ZeRO-3 one zero_pp_rank_N_mp_rank_00_model_states.pt per rank
    states = sorted(glob.glob(os.path.join(tag_dir, "*mp_rank_00_model_states.pt")))
    if not states:
        ap.error(f"{tag_dir}: no mp_rank_00_model_states.pt or zero_pp_rank_*_mp_rank_00_model_states.pt (not a "
                 f"DeepSpeed checkpoint)")
    client = torch.load(states[0], map_location="cpu", weights_only=False)
    if client.get("param_shapes") is None:
        # ZeRO-0 (ds_configs/zero0.json): nothing partitioned, the model file holds the whole model; DeepSpeed's
        # zero_to_fp32 reads ZeRO-1/2/3 checkpoints only (it fails on this one)
        model = client["module"]
        if any(v.is_floating_point() and v.dtype != torch.float32 for v in model.values()):
            logger.warning("a ZeRO-0 checkpoint trained in fp16/bf16: exporting the model's 16-bit weights (the "
                           "fp32 master weights in its optimizer state are not read)")
    else:
        model = get_fp32_state_dict_from_zero_checkpoint(a.checkpoint_dir, tag=a.tag)
    # every rank's streams (rmt_state_rank{r}.pt), in rank order: the state of all streams, as fairseq-train saves it
    from rmt_fairseq.modules.recurrence import concat_states

    ranks = len(glob.glob(os.path.join(tag_dir, "rmt_state_rank*.pt")))
    parts = [torch.load(os.path.join(tag_dir, f"rmt_state_rank{r}.pt"), map_location="cpu", weights_only=True)
             for r in range(ranks)]
    train_state = concat_states(parts) if parts else None
    ckpt = {
        "cfg": _plain(client["cfg"]),  # torch.load(weights_only=True) in fairseq-eval-lm: plain values only
        "model": {k: v.float() for k, v in model.items()},
        "optimizer_history": [{"criterion_name": "RMTCrossEntropyCriterion", "optimizer_name": "exported",
                               "lr_scheduler_state": client.get("fairseq_lr_scheduler", {}),
                               "num_updates": client["num_updates"]}],
        "extra_state": {"train_iterator": {"epoch": client["epoch"], "iterations_in_epoch": client["batch_index"]},
                        "RMTLMTask": {"train_state": train_state},
                        "exported_from": os.path.abspath(tag_dir)},
        "last_optimizer_state": None,
    }
    tmp = a.out + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, a.out)
    logger.info(f"wrote {a.out} ({len(model)} tensors, update {client['num_updates']}) from {tag_dir}")
    return 0


def _plain(x):
    """Namespaces (fairseq keeps a legacy copy of the args in its config) -> dicts, recursively."""
    if isinstance(x, argparse.Namespace):
        x = vars(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


if __name__ == "__main__":
    sys.exit(main())
