"""`rmt-deepspeed-train`: fairseq-train, with DeepSpeed's engine doing the backward, the step and the sharded state.

    deepspeed --num_gpus G $(which rmt-deepspeed-train) DATA --user-dir user_dir --task rmt_lm --arch rmt_wt103 \
        --criterion rmt_cross_entropy --batch-size 8 --optimizer adam --max-update 200000 \
        --deepspeed-config ds_configs/zero2.json

fairseq_cli.train's own `main` (loop, validation, stop and keep rules, resets, logging) with its Trainer replaced by
`DeepSpeedTrainer`, which hands the model and fairseq's optimizer to `deepspeed.initialize`: the engine does the
backward (boundary: each --update-freq group's last micro-batch), the reduction, the step (ZeRO 1/2/3, offload,
bf16/fp16 masters, --clip-norm) and the sharded state. Checkpoints keep fairseq's names, one file per rank: rank 0's
`checkpoint_last.pt` is a complete fairseq checkpoint (weights gathered under ZeRO-3), rank r's
`checkpoint_last-shard{r}.pt`; each holds its rank's files of `engine.save_checkpoint` as its optimizer state.
"""

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from datetime import timedelta

import torch
from fairseq import checkpoint_utils, metrics, optim, utils
from fairseq.optim import lr_scheduler
from fairseq.trainer import Trainer

from rmt_fairseq.errors import check

logger = logging.getLogger(__name__)
RANK_EXIT_GRACE_S = 30  # a rank > 0 refusing the flags waits this long for rank 0's error line and exit
DEFAULT_COLLECTIVE_TIMEOUT_S = 600  # without --heartbeat-timeout: how long a rank waits for a dead peer
TAG = "engine"  # the tag of DeepSpeed's files inside one checkpoint file


@contextlib.contextmanager
def _scratch():
    """A folder for DeepSpeed's own checkpoint layout (scratch/TAG/...), removed afterwards."""
    folder = tempfile.mkdtemp(prefix="rmt-deepspeed-")
    try:
        os.makedirs(os.path.join(folder, TAG))
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class DeepSpeedOptimizer(optim.FairseqOptimizer):
    """fairseq's optimizer interface, as fairseq's Trainer calls it, over a DeepSpeed engine. backward: the engine's,
    of the loss scaled by ranks / the update's scored tokens (counted before the forward: DeepSpeed averages over
    ranks, fairseq divides summed gradients by the sample size), with the boundary at the update's last
    micro-batch; multiply_grads: that factor, already applied, checked; clip_grad_norm: DeepSpeed computes the norm
    and clips in its step, so the engine steps there and returns the norm before clipping (an fp16 step it skips
    raises OverflowError, as fairseq's FP16Optimizer); state_dict: this rank's DeepSpeed checkpoint files."""

    def __init__(self, cfg, fairseq_optimizer, engine):
        super().__init__(cfg)
        self._optimizer = fairseq_optimizer.optimizer  # the torch optimizer (param groups, lr) DeepSpeed steps
        self.engine, self.scale, self.micro, self.micro_batches, self.stepped = engine, 1.0, 0, 1, False
        self.rank0_checkpoint = None  # while loading: rank 0's file (its model states, ZeRO-0/1/2)

    def begin_update(self, micro_batches: int, scale: float) -> None:
        self.scale, self.micro, self.micro_batches, self.stepped = scale, 0, micro_batches, False

    def backward(self, loss):
        self.engine.set_gradient_accumulation_boundary(self.micro == self.micro_batches - 1)
        self.engine.backward(loss * self.scale, scale_wrt_gas=False)
        self.micro += 1

    def all_reduce_grads(self, module):
        pass  # the boundary's backward has reduced them

    def multiply_grads(self, c):
        check(abs(float(c) - self.scale) <= 1e-6 * abs(self.scale),
              f"DeepSpeed: the criterion's sample size gives gradient factor {float(c):g}, the scored targets "
              f"{self.scale:g}: rmt-deepspeed-train needs a criterion whose sample size is the non-pad targets")

    def clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
        engine = self.engine
        # fp32 without ZeRO DeepSpeed steps fairseq's torch optimizer and computes no norm: fairseq's, before the step
        norm = None if hasattr(engine.optimizer, "_global_grad_norm") else \
            float(utils.clip_grad_norm_([p for p in engine.module.parameters() if p.grad is not None], 0))
        engine.step()
        self.stepped = True
        norm = norm if norm is not None else float(engine.get_global_grad_norm() or 0.0)
        if engine.fp16_enabled():
            scale = getattr(getattr(engine.optimizer, "loss_scale_config", None), "cur_scale",
                            getattr(engine.optimizer, "cur_scale", None))
            if scale is not None:
                metrics.log_scalar("loss_scale", float(scale), priority=700, round=4, weight=0)
        if not engine.was_step_applied():
            raise OverflowError("DeepSpeed skipped the step (fp16 overflow, loss scale lowered)")
        return torch.tensor(norm, dtype=torch.float32)

    def step(self, closure=None, scale=1.0, groups=None):
        assert self.stepped, "DeepSpeed steps in clip_grad_norm (fairseq's Trainer calls it before step)"
        self.stepped = False

    def zero_grad(self):
        self.engine.zero_grad()

    def set_lr(self, lr):
        for opt in {id(o): o for o in (self.engine.optimizer, self._optimizer)}.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def state_dict(self):
        with _scratch() as folder:
            self.engine.save_checkpoint(folder, tag=TAG, save_latest=False)  # a collective
            files = {}
            for name in sorted(os.listdir(os.path.join(folder, TAG))):
                with open(os.path.join(folder, TAG, name), "rb") as f:
                    files[name] = f.read()
        return {"deepspeed": files, "ranks": torch.distributed.get_world_size()}

    def load_state_dict(self, state_dict, optimizer_overrides=None):
        ranks, files = torch.distributed.get_world_size(), dict(state_dict["deepspeed"])
        check(state_dict.get("ranks") == ranks,
              f"{self.rank0_checkpoint}: written by {state_dict.get('ranks')} DeepSpeed ranks, resumed by {ranks}: "
              f"resume with {state_dict.get('ranks')}, or start from its weights with --finetune-from-model")
        if not any("model_states" in name for name in files):  # ZeRO-0/1/2: rank 0's, read by every rank
            rank0 = checkpoint_utils.load_checkpoint_to_cpu(self.rank0_checkpoint, load_on_all_ranks=True)
            files.update({k: v for k, v in rank0["last_optimizer_state"]["deepspeed"].items() if "model_states" in k})
        with _scratch() as folder:
            for name, data in files.items():
                with open(os.path.join(folder, TAG, name), "wb") as f:
                    f.write(data)
            path, _ = self.engine.load_checkpoint(folder, tag=TAG, load_lr_scheduler_states=False)
        check(path is not None, f"{self.rank0_checkpoint}: DeepSpeed could not load its state")
        for group in self.param_groups if optimizer_overrides else []:  # --optimizer-overrides, as fairseq's
            group.update(optimizer_overrides)


class _ModelWhileLoading:
    """`self.model` while fairseq's Trainer.load_checkpoint runs (before the engine exists): the bare model; a rank
    whose file holds no weights (r > 0) gets rank 0's from deepspeed.initialize, which broadcasts them."""

    def __init__(self, model):
        self._model = model

    def load_state_dict(self, state_dict, strict=True, model_cfg=None):
        if state_dict is not None:
            return self._model.load_state_dict(state_dict, strict=strict, model_cfg=model_cfg)

    def __getattr__(self, name):
        return getattr(self._model, name)


class DeepSpeedTrainer(Trainer):
    """fairseq's Trainer with the model and optimizer handed to `deepspeed.initialize` (the module docstring says
    what changes). The engine is built when first needed, after fairseq-train has loaded a checkpoint's weights."""

    def __init__(self, cfg, task, model, criterion, quantizer=None, *, ds_config: dict):
        from omegaconf import open_dict

        check(quantizer is None, "--quantization-config-path: not supported by rmt-deepspeed-train")
        check(not utils.has_parameters(criterion), "rmt-deepspeed-train: a criterion with parameters is not "
                                                   "supported (DeepSpeed steps the model's)")
        with open_dict(cfg):
            cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True  # every rank reads its own file
        self.ds_config, self._engine, self._loading = ds_config, None, None  # _loading: rank 0's file, if loading
        super().__init__(cfg, task, model, criterion, quantizer)

    use_distributed_wrapper = property(lambda self: False)  # the engine is the wrapper
    should_save_checkpoint_on_current_rank = property(lambda self: True)  # every rank writes its DeepSpeed state

    @property
    def checkpoint_suffix(self) -> str:
        rank = self.data_parallel_rank
        return (self.cfg.checkpoint.checkpoint_suffix or "") + (f"-shard{rank}" if rank > 0 else "")

    @property
    def model(self):
        if self._loading:
            return _ModelWhileLoading(self._model)
        if self._engine is None:
            self._build_optimizer()
        return self._engine

    def _build_optimizer(self):
        if self._engine is None:
            import deepspeed

            params = [p for p in self._model.parameters() if p.requires_grad]
            fairseq_optimizer = optim.build_optimizer(self.cfg.optimizer, params)
            e, _, _, _ = deepspeed.initialize(model=self._model, optimizer=fairseq_optimizer.optimizer,
                                              config=self.ds_config)
            # fairseq's Trainer enters model.no_sync() for an update's micro-batches before the last; DeepSpeed
            # reduces at the boundary set in backward anyway, and its own no_sync refuses ZeRO-2/3
            e.no_sync = contextlib.nullcontext
            self._engine, self._optimizer = e, DeepSpeedOptimizer(self.cfg.optimizer, fairseq_optimizer, e)
            self._optimizer.rank0_checkpoint = self._loading
            zero = self.ds_config.get("zero_optimization", {})
            logger.info("DeepSpeed: ZeRO stage %d, %d ranks, micro batch %d x accumulation %d, %s%s, %s",
                        e.zero_optimization_stage(), self.data_parallel_world_size,
                        self.ds_config["train_micro_batch_size_per_gpu"], self.ds_config["gradient_accumulation_steps"],
                        "bf16" if e.bfloat16_enabled() else "fp16" if e.fp16_enabled() else "fp32",
                        "".join(f", {k} to {(zero.get(k) or {}).get('device')}" for k in ("offload_optimizer",
                                "offload_param") if (zero.get(k) or {}).get("device", "none") != "none"), e.device)
        self._lr_scheduler = lr_scheduler.build_lr_scheduler(self.cfg.lr_scheduler, self._optimizer)
        self._lr_scheduler.step_update(0)

    def train_step(self, samples, raise_oom=False):
        pad = self.task.target_dictionary.pad()
        tokens = torch.tensor([float(sum(int(s["target"].ne(pad).sum()) for s in samples if s))], dtype=torch.float64,
                              device=self.model.device)
        if self.data_parallel_world_size > 1:
            torch.distributed.all_reduce(tokens)
        self.optimizer.begin_update(len(samples), self.data_parallel_world_size / max(float(tokens.item()), 1.0))
        return super().train_step(samples, raise_oom)

    def state_dict(self):
        """fairseq's, with the model's weights whole on rank 0 (gathered under ZeRO-3; None on the other ranks)."""
        module, gather = self._model, contextlib.nullcontext()
        if self.model.zero_optimization_partition_weights():
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        with gather:  # a collective: every rank
            full = {k: v.detach().clone() for k, v in module.state_dict().items()} if self.data_parallel_rank == 0 \
                else None
        state = super().state_dict()
        state["model"] = full
        return state

    def save_checkpoint(self, filename, extra_state):
        suffix = self.checkpoint_suffix
        if suffix and not filename.endswith(suffix + ".pt"):  # fairseq's crash.pt: one per rank
            filename = filename[: -len(".pt")] + suffix + ".pt"
        return super().save_checkpoint(filename, extra_state)

    def load_checkpoint(self, filename, reset_optimizer=False, reset_lr_scheduler=False, optimizer_overrides=None,
                        reset_meters=False):
        assert self._engine is None, "a DeepSpeed trainer loads before its engine is built"
        suffix = f"-shard{self.data_parallel_rank}.pt"
        rank0 = filename[: -len(suffix)] + ".pt" if filename.endswith(suffix) else filename
        found = [os.path.isfile(filename)] * self.data_parallel_world_size
        if self.data_parallel_world_size > 1:
            torch.distributed.all_gather_object(found, os.path.isfile(filename))
        legacy = os.path.join(self.cfg.checkpoint.save_dir, "latest")
        check(any(found) or not os.path.isfile(legacy),
              f"--save-dir {self.cfg.checkpoint.save_dir} holds the DeepSpeed tag folders of an earlier "
              f"rmt-deepspeed-train ('latest'), which this version neither resumes nor overwrites: continue it with "
              f"the version that wrote it, or train in another --save-dir")
        check(all(found) or not any(found),
              f"{rank0}: no file for rank(s) {[r for r, f in enumerate(found) if not f]} ({rank0[:-3]}-shard<r>.pt): "
              f"resume with the number of ranks that wrote it, or start from its weights with --finetune-from-model")
        self._loading = rank0
        try:
            return super().load_checkpoint(filename, reset_optimizer, reset_lr_scheduler, optimizer_overrides,
                                           reset_meters)
        finally:
            self._loading = None
            if self._optimizer is not None:
                self._optimizer.rank0_checkpoint = None


# fairseq-train flags the engine cannot honour: (attribute, its value that is fine, a hint for the error line)
REFUSED = [("ddp_backend", "pytorch_ddp legacy_ddp c10d no_c10d", " (ZeRO-3 is DeepSpeed's sharding)"),
           ("zero_sharding", "none", ": set zero_optimization in the JSON"),
           ("cpu_offload", False, ": set offload_optimizer in the JSON"),
           ("amp", False, ": set bf16 or fp16 in the JSON"),
           ("memory_efficient_fp16", False, ": set fp16 in the JSON"),
           ("memory_efficient_bf16", False, ": set bf16 in the JSON"),
           ("use_bmuf", False, ""), ("store_ema", False, ""), ("model_parallel_size", 1, ""),
           ("pipeline_model_parallel", False, "")]

def parse_args(argv):
    """fairseq-train's parser plus --deepspeed-config."""
    from fairseq import options

    parser = options.get_training_parser()
    parser.add_argument_group("DeepSpeed").add_argument(
        "--deepspeed-config", metavar="FILE", help="DeepSpeed JSON (ZeRO stage, offload, bf16/fp16; several merged "
                                                   "in order: zero2.json,bf16.json); batch sizes and clipping come "
                                                   "from the fairseq flags")
    return options.parse_args_and_arch(parser, argv)


def main(argv=None):
    """The `rmt-deepspeed-train` console script (argv None: sys.argv, then a clean exit) or an in-process call."""
    if argv is not None:
        return _main(argv)
    rc = _main(sys.argv[1:])
    # as fairseq-train's CPU ranks (rmt_fairseq/distributed.py): tear the process group down and leave without C++
    # static teardown, where a finished gloo rank was seen to abort (the launcher then reports the job as failed)
    from rmt_fairseq.distributed import _destroy_process_group

    _destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(rc or 0)


def _main(argv):
    import functools

    import fairseq_cli.train
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils

    from rmt_fairseq.deepspeed.config import load_ds_config
    from rmt_fairseq.errors import RMTConfigError, install_excepthook

    install_excepthook()
    args = parse_args(argv)
    launched = all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:  # every rank reads the same flags and JSON: rank 0 says it once, before any process group
        check(args.task == "rmt_lm", f"rmt-deepspeed-train runs --task rmt_lm (memory carried along the streams), "
                                     f"got --task {args.task}: for per-sample recurrence under fairseq's own tasks "
                                     f"use fairseq-train")
        check(args.batch_size is not None, "rmt-deepspeed-train needs --batch-size (streams per rank)")
        check(launched or args.distributed_world_size <= 1,
              f"--distributed-world-size {args.distributed_world_size}: rmt-deepspeed-train's ranks are started by "
              f"a launcher (deepspeed --num_gpus N, torchrun); fairseq's own spawn is fairseq-train's")
        check(len(set(args.update_freq)) == 1, f"--update-freq {','.join(map(str, args.update_freq))}: one value "
                                               f"under DeepSpeed (gradient_accumulation_steps is fixed)")
        for attr, fine, hint in REFUSED:
            value = getattr(args, attr, fine)
            flag = "--" + attr.replace("_", "-") + ("" if isinstance(value, bool) else f" {value}")
            check(value in fine.split() if isinstance(fine, str) else value == fine,
                  f"{flag}: not supported by rmt-deepspeed-train{hint}")
        ds_config = load_ds_config(args.deepspeed_config, args.batch_size, args.update_freq[0], world,
                                   clip_norm=args.clip_norm, fp16=args.fp16, bf16=args.bf16)
        check(not ds_config.get("fp16", {}).get("enabled") or (torch.cuda.is_available() and not args.cpu),
              f"--deepspeed-config {args.deepspeed_config}: fp16 trains on CUDA GPUs only (DeepSpeed on CPU: "
              f"bf16, ds_configs/bf16.json)")
    except RMTConfigError:
        if int(os.environ.get("RANK", "0")) != 0:  # rank 0 says it; the launcher stops every rank when it exits.
            time.sleep(RANK_EXIT_GRACE_S)  # leaving first, this rank would have the launcher kill rank 0 unheard
            os._exit(2)
        raise
    args.fp16 = args.bf16 = False  # the engine's precision (ds_config); fairseq's FP16Optimizer is not used
    cfg = convert_namespace_to_omegaconf(args)
    if not launched:  # one rank on this machine (DeepSpeed alone would look for MPI)
        from rmt_fairseq.distributed import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    import deepspeed

    # a rank that dies on another node leaves the others blocked in a collective: they give up after this (torch's
    # default is 30 minutes); --heartbeat-timeout sets it. fairseq's distributed_init finds the group up and uses it.
    deepspeed.init_distributed(timeout=timedelta(seconds=args.heartbeat_timeout if args.heartbeat_timeout > 0
                                                 else DEFAULT_COLLECTIVE_TIMEOUT_S))
    original, fairseq_cli.train.Trainer = fairseq_cli.train.Trainer, functools.partial(DeepSpeedTrainer,
                                                                                        ds_config=ds_config)
    try:
        with warnings.catch_warnings():  # fairseq's distributed_init, finding the group up (brought up above)
            warnings.filterwarnings("ignore", message="Distributed is already initialized", category=UserWarning)
            distributed_utils.call_main(cfg, fairseq_cli.train.main)
    finally:
        fairseq_cli.train.Trainer = original
    return 0


if __name__ == "__main__":
    sys.exit(main())
