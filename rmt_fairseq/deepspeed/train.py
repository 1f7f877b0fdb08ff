"""`rmt-deepspeed-train`: fairseq-train, with DeepSpeed's engine doing backward, step and the sharded state.

    deepspeed --num_gpus G $(which rmt-deepspeed-train) DATA --user-dir user_dir --task rmt_lm --arch rmt_wt103 \\
        --criterion rmt_cross_entropy --batch-size 8 --optimizer adam --lr 2.5e-4 --max-update 200000 \\
        --save-dir checkpoints/rmt --deepspeed-config ds_configs/zero2.json

This is fairseq-train's own `main` (fairseq_cli.train: its loop, validation schedule, stop rules, checkpoint names,
keep rules, resets, logging) with one difference: its Trainer is `DeepSpeedTrainer`, which hands the model and
fairseq's optimizer to `deepspeed.initialize` and lets the engine do what it must do itself: the backward (with
the gradient accumulation boundary of fairseq's --update-freq group), the reduction over ranks, the step (ZeRO
1/2/3, offload, bf16/fp16 master weights, clipping at --clip-norm) and the state of the sharded optimizer. Every
other flag of fairseq-train means what it means there.

Checkpoints: fairseq's names and rules, one file per rank as fairseq's own sharded state
(--use-sharded-state) writes them: rank 0 writes `checkpoint_last.pt` (a complete fairseq checkpoint: the model's
weights, gathered under ZeRO-3, read by fairseq-eval-lm, fairseq-validate, the hub, ...), rank r > 0
`checkpoint_last-shard{r}.pt`; each holds that rank's DeepSpeed state (the files `engine.save_checkpoint` writes
for the rank: its ZeRO optimizer partition, fp32 master weights, loss scale) as its optimizer state, and a resume
gives them back to `engine.load_checkpoint`.
"""

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from datetime import timedelta
from itertools import chain

import torch
from fairseq import checkpoint_utils, optim, utils
from fairseq.optim import lr_scheduler
from fairseq.trainer import Trainer

from rmt_fairseq.errors import check

logger = logging.getLogger(__name__)
DEFAULT_COLLECTIVE_TIMEOUT_S = 600  # without --heartbeat-timeout: how long a rank waits for a dead peer
ENGINE_TAG = "engine"  # the tag of the engine's files inside one checkpoint file


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _engine_files(engine) -> dict:
    """This rank's files of DeepSpeed's own checkpoint (`engine.save_checkpoint`, a collective), as
    {file name: bytes}: ZeRO's optimizer partition of this rank; on rank 0 (ZeRO-0/1/2) or every rank (ZeRO-3)
    the model states file."""
    scratch = tempfile.mkdtemp(prefix="rmt-deepspeed-")
    try:
        os.makedirs(os.path.join(scratch, ENGINE_TAG))
        engine.save_checkpoint(scratch, tag=ENGINE_TAG, save_latest=False)
        folder = os.path.join(scratch, ENGINE_TAG)
        files = {}
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                files[name] = f.read()
        return files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class DeepSpeedOptimizer(optim.FairseqOptimizer):
    """fairseq's optimizer interface, as fairseq's Trainer calls it, over a DeepSpeed engine.

    - backward(loss): `engine.backward` of the loss scaled by ranks / the update's scored tokens (known before
      the forward: DeepSpeed averages over ranks, fairseq divides the summed gradients by the sample size), with
      the accumulation boundary at the update's last micro-batch;
    - multiply_grads(c): the Trainer's ranks / sample size, already applied: checked equal, not applied again;
    - clip_grad_norm(max_norm): DeepSpeed computes the gradient norm (and clips at --clip-norm) inside its step,
      so the engine steps here and the norm before clipping is returned; an fp16 step DeepSpeed skips (overflow)
      raises OverflowError, as fairseq's FP16Optimizer does; step(): the step has been taken;
    - state_dict(): this rank's DeepSpeed checkpoint files; load_state_dict() gives them back to the engine.
    """

    def __init__(self, cfg, fairseq_optimizer, engine):
        super().__init__(cfg)
        self._optimizer = fairseq_optimizer.optimizer  # the torch optimizer (param groups, lr) DeepSpeed steps
        self.engine = engine
        self.scale, self.micro, self.micro_batches = 1.0, 0, 1
        self.stepped = False
        self.rank0_checkpoint = None  # set by the trainer while loading: where rank 0's files are

    def begin_update(self, micro_batches: int, scale: float) -> None:
        self.scale, self.micro, self.micro_batches, self.stepped = scale, 0, micro_batches, False

    def backward(self, loss):
        self.engine.set_gradient_accumulation_boundary(self.micro == self.micro_batches - 1)
        self.engine.backward(loss * self.scale, scale_wrt_gas=False)
        self.micro += 1

    def all_reduce_grads(self, module):
        pass  # the boundary's backward has reduced them

    def multiply_grads(self, c):
        c = float(c)
        check(abs(c - self.scale) <= 1e-6 * max(abs(c), 1e-12),
              f"DeepSpeed: the criterion's sample size gives gradient factor {c:g}, the scored targets {self.scale:g}: "
              f"rmt-deepspeed-train needs a criterion whose sample size is the number of non-pad targets")

    def clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
        engine = self.engine
        own = not hasattr(engine.optimizer, "_global_grad_norm")  # fp32 without ZeRO: fairseq's torch optimizer
        norm = self._norm() if own else None
        engine.step()
        self.stepped = True
        if norm is None:
            norm = engine.get_global_grad_norm()
            norm = self._norm() if norm is None else float(norm)
        if engine.fp16_enabled():
            scale = getattr(engine.optimizer, "cur_scale", None)
            scale = getattr(getattr(engine.optimizer, "loss_scale_config", None), "cur_scale", scale)
            if scale is not None:
                from fairseq import metrics

                metrics.log_scalar("loss_scale", float(scale), priority=700, round=4, weight=0)
        if not engine.was_step_applied():
            raise OverflowError("DeepSpeed skipped the step (fp16 overflow, loss scale lowered)")
        return torch.tensor(norm, dtype=torch.float32)

    def _norm(self) -> float:
        grads = [p.grad.detach() for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                           for g in grads])))

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
        return {"deepspeed": _engine_files(self.engine)}

    def load_state_dict(self, state_dict, optimizer_overrides=None):
        files = dict(state_dict["deepspeed"])
        if self.rank0_checkpoint is not None and not any("model_states" in name for name in files):
            # ZeRO-0/1/2: rank 0 alone writes the model states every rank reads (a shared file system, as
            # DeepSpeed's own load assumes)
            rank0 = checkpoint_utils.load_checkpoint_to_cpu(self.rank0_checkpoint, load_on_all_ranks=True)
            files.update({k: v for k, v in rank0["last_optimizer_state"]["deepspeed"].items() if "model_states" in k})
        scratch = tempfile.mkdtemp(prefix="rmt-deepspeed-")
        try:
            os.makedirs(os.path.join(scratch, ENGINE_TAG))
            for name, data in files.items():
                with open(os.path.join(scratch, ENGINE_TAG, name), "wb") as f:
                    f.write(data)
            path, _ = self.engine.load_checkpoint(scratch, tag=ENGINE_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            check(path is not None, f"DeepSpeed could not load its state from {self.rank0_checkpoint}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if optimizer_overrides:  # fairseq's --optimizer-overrides, as FairseqOptimizer.load_state_dict
            for group in self.param_groups:
                group.update(optimizer_overrides)


class _ModelWhileLoading:
    """What fairseq's Trainer.load_checkpoint calls `self.model` while a DeepSpeed trainer loads (before the engine
    exists): the bare model; a rank whose file holds no weights (r > 0) takes rank 0's, which
    deepspeed.initialize broadcasts."""

    def __init__(self, model):
        self._model = model

    def load_state_dict(self, state_dict, strict=True, model_cfg=None):
        if state_dict is not None:
            return self._model.load_state_dict(state_dict, strict=strict, model_cfg=model_cfg)

    def __getattr__(self, name):
        return getattr(self._model, name)


class DeepSpeedTrainer(Trainer):
    """fairseq's Trainer with the model and optimizer handed to `deepspeed.initialize` (see the module docstring).
    The engine is built when the model or optimizer is first needed, after fairseq-train has loaded a checkpoint's
    weights into the bare model."""

    def __init__(self, cfg, task, model, criterion, quantizer=None, *, ds_config: dict):
        check(quantizer is None, "rmt-deepspeed-train: --quantization-config-path is not supported under DeepSpeed")
        check(not utils.has_parameters(criterion), "rmt-deepspeed-train: a criterion with parameters is not "
                                                   "supported (DeepSpeed steps the model's)")
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True  # every rank reads its own file
        self.ds_config = ds_config
        self._engine = None
        self._loading = False  # while fairseq loads a checkpoint: the path of rank 0's file
        super().__init__(cfg, task, model, criterion, quantizer)

    @property
    def use_distributed_wrapper(self) -> bool:
        return False  # the engine is the wrapper

    @property
    def should_save_checkpoint_on_current_rank(self) -> bool:
        return True  # every rank writes its own DeepSpeed state

    @property
    def checkpoint_suffix(self) -> str:
        suffix = self.cfg.checkpoint.checkpoint_suffix or ""
        return suffix + (f"-shard{self.data_parallel_rank}" if self.data_parallel_rank > 0 else "")

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

            params = [p for p in chain(self._model.parameters(), self._criterion.parameters()) if p.requires_grad]
            fairseq_optimizer = optim.build_optimizer(self.cfg.optimizer, params)
            self._engine, _, _, _ = deepspeed.initialize(model=self._model, optimizer=fairseq_optimizer.optimizer,
                                                         config=self.ds_config)
            # fairseq's Trainer enters model.no_sync() for the micro-batches before an update's last; DeepSpeed
            # reduces at the accumulation boundary set in backward anyway, and its own no_sync refuses ZeRO-2/3
            self._engine.no_sync = contextlib.nullcontext
            self._optimizer = DeepSpeedOptimizer(self.cfg.optimizer, fairseq_optimizer, self._engine)
            self._optimizer.rank0_checkpoint = self._loading or None  # built while loading: rank 0's file
            e = self._engine
            precision = "bf16" if e.bfloat16_enabled() else "fp16" if e.fp16_enabled() else "fp32"
            offload = [k for k in ("offload_optimizer", "offload_param")
                       if (self.ds_config.get("zero_optimization", {}).get(k) or {}).get("device", "none") != "none"]
            logger.info("DeepSpeed: ZeRO stage %d, %d ranks, micro batch %d x accumulation %d, %s%s, %s",
                        e.zero_optimization_stage(), self.data_parallel_world_size,
                        self.ds_config["train_micro_batch_size_per_gpu"], self.ds_config["gradient_accumulation_steps"],
                        precision, "".join(f", {k} to cpu" for k in offload), e.device)
        self._lr_scheduler = lr_scheduler.build_lr_scheduler(self.cfg.lr_scheduler, self._optimizer)
        self._lr_scheduler.step_update(0)

    def train_step(self, samples, raise_oom=False):
        pad = self.task.target_dictionary.pad()
        tokens = torch.tensor([float(sum(int(s["target"].ne(pad).sum()) for s in samples if s))], dtype=torch.float64)
        if self.data_parallel_world_size > 1:
            tokens = tokens.to(self._engine.device if self._engine is not None else self.device)
            torch.distributed.all_reduce(tokens)
        self.optimizer.begin_update(len(samples), self.data_parallel_world_size / max(float(tokens.item()), 1.0))
        return super().train_step(samples, raise_oom)

    def state_dict(self):
        full = self._full_model_state()  # collectives first, on every rank
        state = super().state_dict()
        state["model"] = full
        return state

    def _full_model_state(self):
        """The model's weights, whole, on rank 0 (None on the others): under ZeRO-3 gathered from the shards."""
        engine, module = self.model, self._model
        gather = contextlib.nullcontext()
        if engine.zero_optimization_partition_weights():
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        with gather:
            if self.data_parallel_rank != 0:
                return None
            return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def save_checkpoint(self, filename, extra_state):
        suffix = self.checkpoint_suffix
        if suffix and not filename.endswith(suffix + ".pt"):  # fairseq's crash.pt: one per rank
            filename = filename[: -len(".pt")] + suffix + ".pt"
        return super().save_checkpoint(filename, extra_state)

    def load_checkpoint(self, filename, reset_optimizer=False, reset_lr_scheduler=False, optimizer_overrides=None,
                        reset_meters=False):
        assert self._engine is None, "a DeepSpeed trainer loads before its engine is built"
        suffix = f"-shard{self.data_parallel_rank}"
        rank0 = filename[: -len(suffix + ".pt")] + ".pt" if filename.endswith(suffix + ".pt") else filename
        found = [os.path.isfile(filename)]
        if self.data_parallel_world_size > 1:
            found = [None] * self.data_parallel_world_size
            torch.distributed.all_gather_object(found, os.path.isfile(filename))
        check(all(found) or not any(found),
              f"{rank0}: the checkpoint lacks the file of rank(s) {[r for r, f in enumerate(found) if not f]} "
              f"(rank r > 0 reads {rank0[:-3]}-shard<r>.pt): resume with the number of ranks that wrote it, or "
              f"start from its weights with --finetune-from-model {rank0}")
        self._loading = rank0
        try:
            extra_state = super().load_checkpoint(filename, reset_optimizer, reset_lr_scheduler, optimizer_overrides,
                                                  reset_meters)
        finally:
            self._loading = False
            if self._optimizer is not None:
                self._optimizer.rank0_checkpoint = None
        return extra_state


def parse_args(argv):
    from fairseq import options

    parser = options.get_training_parser()
    group = parser.add_argument_group("DeepSpeed")
    group.add_argument("--deepspeed-config", metavar="FILE",
                       help="DeepSpeed JSON (ZeRO stage, offload, bf16/fp16; several merged in order: "
                            "zero2.json,bf16.json); batch sizes and clipping come from the fairseq flags")
    return options.parse_args_and_arch(parser, argv)


# fairseq-train flags the engine cannot honour: (attribute, the value that is fine, the flag as written)
REFUSED = [("ddp_backend", lambda v: v != "fully_sharded", "--ddp-backend fully_sharded (ZeRO-3 is DeepSpeed's)"),
           ("zero_sharding", lambda v: v == "none", "--zero-sharding (set zero_optimization in the JSON)"),
           ("use_bmuf", lambda v: not v, "--use-bmuf"),
           ("store_ema", lambda v: not v, "--store-ema"),
           ("amp", lambda v: not v, "--amp (set bf16 or fp16 in the JSON)"),
           ("memory_efficient_fp16", lambda v: not v, "--memory-efficient-fp16 (set fp16 in the JSON)"),
           ("memory_efficient_bf16", lambda v: not v, "--memory-efficient-bf16 (set bf16 in the JSON)"),
           ("model_parallel_size", lambda v: v == 1, "--model-parallel-size"),
           ("pipeline_model_parallel", lambda v: not v, "--pipeline-model-parallel"),
           ("cpu_offload", lambda v: not v, "--cpu-offload (set offload_optimizer in the JSON)")]


def main(argv=None):
    """The `rmt-deepspeed-train` console script (argv None: sys.argv, then a clean exit) or an in-process call."""
    if argv is not None:
        return _main(argv)
    rc = _main(sys.argv[1:])
    # as fairseq-train's CPU ranks (rmt_fairseq/distributed.py): tear the process group down and leave without C++
    # static teardown, where a finished gloo rank was seen to abort ("terminate called without an active
    # exception"; the launcher then reports the whole job as failed)
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
    update_freq = sorted(set(args.update_freq)) if isinstance(args.update_freq, list) else [args.update_freq]
    try:  # every rank reads the same flags and JSON: rank 0 says it once, before any process group
        check(args.task == "rmt_lm", f"rmt-deepspeed-train runs --task rmt_lm (memory carried along the streams), "
                                     f"got --task {args.task}: for per-sample recurrence under fairseq's own tasks "
                                     f"use fairseq-train")
        check(args.batch_size is not None, "rmt-deepspeed-train needs --batch-size (streams per rank)")
        check(launched or args.distributed_world_size <= 1 or world > 1,
              f"--distributed-world-size {args.distributed_world_size}: rmt-deepspeed-train's ranks are started by "
              f"a launcher (deepspeed --num_gpus N, torchrun); fairseq's own spawn is fairseq-train's")
        check(len(update_freq) == 1, f"--update-freq {','.join(map(str, args.update_freq))}: one value under "
                                     f"DeepSpeed (gradient_accumulation_steps is fixed at initialize)")
        for attr, fine, flag in REFUSED:
            check(fine(getattr(args, attr, None) if hasattr(args, attr) else (1 if attr == "model_parallel_size"
                                                                             else None)),
                  f"{flag}: not supported by rmt-deepspeed-train")
        ds_config = load_ds_config(args.deepspeed_config, args.batch_size, update_freq[0], world,
                                   clip_norm=args.clip_norm, fp16=args.fp16, bf16=args.bf16)
        check(not ds_config.get("fp16", {}).get("enabled") or (torch.cuda.is_available() and not args.cpu),
              f"--deepspeed-config {args.deepspeed_config}: fp16 trains on CUDA GPUs only (DeepSpeed on CPU: "
              f"bf16, ds_configs/bf16.json)")
    except RMTConfigError:
        if int(os.environ.get("RANK", "0")) != 0:
            os._exit(2)
        raise
    args.fp16 = args.bf16 = False  # the engine's precision (ds_config); fairseq's FP16Optimizer is not used
    cfg = convert_namespace_to_omegaconf(args)
    if not launched:
        # started without a launcher: one rank on this machine (DeepSpeed would look for MPI)
        from rmt_fairseq.distributed import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    import deepspeed

    # a rank that dies on another node leaves the others blocked in a collective: they give up after this
    # (torch's default is 30 minutes); fairseq's --heartbeat-timeout sets it, 600 s when not given. fairseq's
    # distributed_init then finds the process group up and uses it.
    deepspeed.init_distributed(timeout=timedelta(seconds=args.heartbeat_timeout if args.heartbeat_timeout > 0
                                                 else DEFAULT_COLLECTIVE_TIMEOUT_S))
    original = fairseq_cli.train.Trainer
    fairseq_cli.train.Trainer = functools.partial(DeepSpeedTrainer, ds_config=ds_config)
    try:
        distributed_utils.call_main(cfg, fairseq_cli.train.main)
    finally:
        fairseq_cli.train.Trainer = original
    return 0


if __name__ == "__main__":
    sys.exit(main())
