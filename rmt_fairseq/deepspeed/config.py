"""DeepSpeed JSON handling: the JSON owns ZeRO, precision, offload and activation checkpointing; batch sizes
come from the fairseq flags and are derived here, and a JSON that contradicts them is an error naming both."""

import json
import os

from rmt_fairseq.errors import check

BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
              "gradient_clipping")


def load_ds_config(path: str, batch_size: int, update_freq: int, world_size: int, clip_norm: float = 0.0,
                   fp16: bool = False, bf16: bool = False) -> dict:
    """Read and check --deepspeed-config; fill in the batch sizes derived from --batch-size and --update-freq:
    train_batch_size = micro batch x gradient accumulation x data-parallel size (as gpt-neox does); fairseq's
    --fp16 / --bf16 enable the JSON's fp16 / bf16 section (DeepSpeed keeps the master weights)."""
    check(path is not None, "--deepspeed-config FILE is required (see ds_configs/README.md)")
    cfg = {}
    for part in [p.strip() for p in path.split(",") if p.strip()]:  # merged in order: zero2.json,bf16.json
        check(os.path.isfile(part), f"--deepspeed-config {part}: no such file")
        try:
            with open(part) as f:
                loaded = json.load(f)
        except json.JSONDecodeError as e:
            check(False, f"--deepspeed-config {part}: invalid JSON ({e.msg} at line {e.lineno})")
        check(isinstance(loaded, dict), f"--deepspeed-config {part}: the top level must be a JSON object")
        _merge(cfg, loaded)
    check(isinstance(cfg, dict), f"--deepspeed-config {path}: the top level must be a JSON object")
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    check(stage in (0, 1, 2, 3), f"--deepspeed-config {path}: zero_optimization.stage must be 0, 1, 2 or 3, "
                                 f"got {stage}")
    for key, need in [("offload_optimizer", 1), ("offload_param", 3)]:
        device = (zero.get(key) or {}).get("device", "none")
        check(device in ("none", None) or stage >= need,
              f"--deepspeed-config {path}: zero_optimization.{key} needs ZeRO stage >= {need}, got stage {stage}")
    for flag, on, other in [("fp16", fp16, "bf16"), ("bf16", bf16, "fp16")]:
        if on:
            check(not cfg.get(other, {}).get("enabled"), f"--{flag}: --deepspeed-config {path} enables {other}")
            cfg.setdefault(flag, {})["enabled"] = True
    check(not (cfg.get("fp16", {}).get("enabled") and cfg.get("bf16", {}).get("enabled")),
          f"--deepspeed-config {path}: fp16 and bf16 are both enabled")
    check("optimizer" not in cfg and "scheduler" not in cfg,
          f"--deepspeed-config {path}: remove 'optimizer'/'scheduler': they come from the fairseq flags "
          f"(--optimizer, --lr, --lr-scheduler)")
    derived = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": update_freq,
               "train_batch_size": batch_size * update_freq * world_size,
               # DeepSpeed 0.19 clips at 1.0 unless told otherwise; fairseq's --clip-norm (default 0: off) rules
               "gradient_clipping": clip_norm}
    flags = {"train_micro_batch_size_per_gpu": f"--batch-size {batch_size}",
             "gradient_accumulation_steps": f"--update-freq {update_freq}",
             "train_batch_size": f"--batch-size {batch_size} x --update-freq {update_freq} x {world_size} ranks",
             "gradient_clipping": f"--clip-norm {clip_norm}"}
    for key in BATCH_KEYS:
        if key in cfg:
            check(cfg[key] == derived[key], f"--deepspeed-config {path}: {key} is {cfg[key]} but the flags give "
                                            f"{derived[key]} ({flags[key]}); drop it from the JSON")
    cfg.update(derived)
    # the optimizer is fairseq's (built from --optimizer), a plain torch.optim.Optimizer that ZeRO shards as any
    cfg.setdefault("zero_allow_untested_optimizer", True)
    if any((zero.get(k) or {}).get("device", "none") not in ("none", None) for k in ("offload_optimizer",
                                                                                     "offload_param")):
        # ZeRO-Offload steps fairseq's optimizer on the CPU copy; DeepSpeed would insist on its own CPU Adam
        # (ZeRORuntimeException at initialize) unless told that the client optimizer is meant
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    return cfg


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
