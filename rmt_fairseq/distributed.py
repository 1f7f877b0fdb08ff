"""fairseq-train with several ranks: what the plugin changes in fairseq's launch and checkpoint paths.

fairseq 0.12's multi-process launcher assumes CUDA. `install()` (run when the plugin is imported) makes the
same commands work on CPU ranks over gloo, and keeps the memory state of every rank's streams in the
checkpoint. Each change applies only where fairseq as shipped would fail or lose state; on GPUs fairseq's own
paths run unchanged.

- `fairseq-train --distributed-world-size N` without CUDA (or with --cpu): fairseq would spawn
  min(GPUs, N) = 0 processes (or assert N <= GPUs); here it spawns N CPU processes on one host, rendezvous
  over tcp://localhost (--distributed-port, else a free port).
- `torchrun --nproc_per_node N $(which fairseq-train) ...` (env:// rendezvous) without CUDA: fairseq computes
  the device as `rank % torch.cuda.device_count()` (ZeroDivisionError); here device 0, i.e. the CPU.
- Without CUDA the default `--distributed-backend nccl` cannot work: gloo is used (logged once).
- `--ddp-backend pytorch_ddp` / `c10d` on CPU: fairseq builds DistributedDataParallel with
  `device_ids=[device_id]`, which DDP refuses for CPU modules; here the same wrapper without device ids.
- Resuming a run of several ranks: rank 0 reads the checkpoint (fairseq's loader, weights_only=False) and
  broadcasts it, and the other ranks unpickle it with torch.load's weights_only=True default of torch >= 2.6,
  which refuses the checkpoint's own omegaconf config and fairseq's `_TensorPlaceholder`. The bytes come from
  rank 0 of the same job, so they are read as rank 0 read the file.
- Checkpoints: fairseq writes them from rank 0 only, so each rank's training-stream memory is gathered (a
  collective on every rank) just before fairseq saves; each rank takes its own streams back on resume
  (tasks/rmt_lm.py: gather_train_states, get/set_checkpoint_dict).
- `--bf16` without TPU: fairseq 0.12 reads --bf16 as "train on TPU" (options.py sets --tpu) and then needs
  torch_xla. Where torch_xla is not installed, --tpu is switched off again, so --bf16 trains and evaluates in
  bfloat16 on CPUs and GPUs (fairseq's trainer, FP16Optimizer and sample casting support it as they are).
"""

import logging
import os
import socket

logger = logging.getLogger(__name__)

_state = {"installed": False}


def no_cuda(cfg) -> bool:
    import torch

    return bool(getattr(cfg.common, "cpu", False)) or not torch.cuda.is_available()


def free_port() -> int:
    """A TCP port free on loopback now (the rendezvous port of CPU ranks; the tests' launchers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_torch_xla() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch_xla") is not None


def _destroy_process_group() -> None:
    """Tear the process group down while the interpreter is still whole: left to static destruction at exit,
    a gloo rank was seen to abort ("terminate called without an active exception", SIGABRT) after training
    had finished."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # exit anyway: the run's work is done
            pass


def _spawned_main(i, main, cfg, kwargs):
    """A CPU rank started by call_main: fairseq's distributed_main, then a clean exit (process group destroyed,
    output flushed, no C++ static teardown left to abort a finished run)."""
    import sys

    from fairseq.distributed import utils as dist_utils

    dist_utils.distributed_main(i, main, cfg, kwargs)
    _destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _reraise_one_line(e) -> None:
    """A rank spawned here failed: torch hands its traceback over as text. The plugin's own errors (a bad flag,
    file or value; a non-finite loss) become the one `error:` line they are in one process."""
    from rmt_fairseq.errors import RMTConfigError, RMTRunError

    for cls in (RMTConfigError, RMTRunError):
        marker = f"{cls.__module__}.{cls.__name__}: "
        if marker in str(e):
            raise cls(str(e).rsplit(marker, 1)[1].strip().splitlines()[0]) from None
    raise e


def install() -> None:
    if _state["installed"]:
        return
    _state["installed"] = True
    import atexit

    import torch

    atexit.register(_destroy_process_group)  # every launch path (torchrun, --distributed-no-spawn ranks)
    from fairseq import checkpoint_utils, models
    from fairseq.distributed import utils as dist_utils
    from fairseq.models import distributed_fairseq_model

    def _broadcast_object_slow(obj, src_rank, group, dist_device):
        """fairseq's, with weights_only=False on the receiving ranks (see the module docstring)."""
        import io

        if dist_utils.get_rank(group) == src_rank:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            buffer = torch.ByteTensor(buffer.getbuffer()).to(dist_device)
            length = torch.LongTensor([len(buffer)]).to(dist_device)
            dist_utils.broadcast(length, src=src_rank, group=group)
            dist_utils.broadcast(buffer, src=src_rank, group=group)
            return obj
        length = torch.LongTensor([0]).to(dist_device)
        dist_utils.broadcast(length, src=src_rank, group=group)
        buffer = torch.ByteTensor(int(length.item())).to(dist_device)
        dist_utils.broadcast(buffer, src=src_rank, group=group)
        return torch.load(io.BytesIO(buffer.cpu().numpy()), map_location="cpu", weights_only=False)

    dist_utils._broadcast_object_slow = _broadcast_object_slow

    original_call_main = dist_utils.call_main
    original_launch_init = dist_utils._infer_torch_distributed_launch_init
    original_wrap = distributed_fairseq_model.DistributedFairseqModel
    original_save = checkpoint_utils.save_checkpoint

    def _infer_torch_distributed_launch_init(cfg):
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return original_launch_init(cfg)
        cfg.distributed_init_method = "env://"
        cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
        cfg.distributed_rank = int(os.environ["RANK"])
        cfg.device_id = 0  # CPU ranks: there is no device to pick
        cfg.distributed_no_spawn = True  # the launcher (torchrun) started the processes

    def call_main(cfg, main, **kwargs):
        from rmt_fairseq.errors import check

        dt = cfg.distributed_training
        if getattr(cfg.common, "bf16", False) and getattr(cfg.common, "tpu", False) and not _has_torch_xla():
            logger.info("--bf16 without torch_xla: bfloat16 on %s (fairseq 0.12 would read it as --tpu)",
                        "CPU" if no_cuda(cfg) else "GPU")
            cfg.common.tpu = False
        training = getattr(main, "__module__", "") == "fairseq_cli.train"
        if getattr(main, "__module__", "") in ("fairseq_cli.train", "fairseq_cli.validate"):
            # fairseq asserts this in main() with a traceback; the same rule as one line
            check(cfg.dataset.batch_size is not None or cfg.dataset.max_tokens is not None,
                  "--batch-size is required (for --task rmt_lm: parallel streams per process; for other tasks: "
                  "samples per batch, or --max-tokens)")
        check(not (training and no_cuda(cfg) and (cfg.common.fp16 or cfg.common.memory_efficient_fp16)),
              "--fp16 trains on CUDA GPUs only (fairseq's FP16Optimizer and loss scaler); on CPU train with --bf16, "
              "or in fp32")
        launched = all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"))
        if launched and dt.distributed_init_method is None and int(os.environ["WORLD_SIZE"]) != \
                dt.distributed_world_size:
            # torchrun: fairseq reads WORLD_SIZE only when --distributed-world-size (default: the GPU count) > 1,
            # so on CPU, or with one GPU per node, every rank would train alone; the launcher's count rules
            logger.info("--distributed-world-size %d from the launcher (WORLD_SIZE)", int(os.environ["WORLD_SIZE"]))
            dt.distributed_world_size = int(os.environ["WORLD_SIZE"])
        if no_cuda(cfg) and dt.distributed_world_size > 1 and not getattr(cfg.common, "tpu", False):
            if dt.distributed_backend == "nccl":
                logger.info("no CUDA: --distributed-backend gloo (nccl needs GPUs)")
                dt.distributed_backend = "gloo"
            slurm = "SLURM_STEP_NODELIST" in os.environ or "SLURM_JOB_NODELIST" in os.environ
            if dt.distributed_init_method is None and not launched and not slurm:
                # one host, N CPU processes (fairseq would spawn one per GPU: none)
                port = dt.distributed_port if dt.distributed_port > 0 else free_port()
                dt.distributed_init_method = f"tcp://localhost:{port}"
                if dt.distributed_rank is None:
                    dt.distributed_rank = 0
                logger.info("no CUDA: starting %d CPU ranks over %s (%s)", dt.distributed_world_size,
                            dt.distributed_init_method, dt.distributed_backend)
                kwargs["start_rank"] = dt.distributed_rank
                os.environ.setdefault("LOCAL_WORLD_SIZE", str(dt.distributed_world_size))  # rmt_fairseq/threads.py
                dt.distributed_rank = None  # assigned per process by distributed_main
                try:
                    torch.multiprocessing.spawn(fn=_spawned_main, args=(main, cfg, kwargs),
                                                nprocs=dt.distributed_world_size, join=True)
                except torch.multiprocessing.ProcessRaisedException as e:
                    _reraise_one_line(e)
                return
        return original_call_main(cfg, main, **kwargs)

    def DistributedFairseqModel(args, model, process_group, device):
        if device.type != "cpu" or getattr(args, "tpu", False) or args.ddp_backend not in {"c10d", "pytorch_ddp"}:
            return original_wrap(args, model, process_group, device)
        # fairseq's pytorch_ddp wrapper, without the device ids DDP refuses for CPU modules (torch >= 2.13 calls
        # broadcast_buffers forward_sync_buffers)
        import inspect

        from fairseq.distributed import DistributedTimeoutWrapper, ModuleProxyWrapper
        from torch.nn.parallel import DistributedDataParallel

        params = inspect.signature(DistributedDataParallel).parameters
        sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        wrapped = ModuleProxyWrapper(DistributedDataParallel(
            module=model.to(device), bucket_cap_mb=args.bucket_cap_mb, process_group=process_group,
            find_unused_parameters=args.find_unused_parameters, gradient_as_bucket_view=args.gradient_as_bucket_view,
            **{sync: args.broadcast_buffers}))
        if getattr(args, "heartbeat_timeout", -1) > 0:
            wrapped = DistributedTimeoutWrapper(wrapped, timeout=args.heartbeat_timeout)
        return wrapped

    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        # every rank, before fairseq decides that rank 0 alone writes: gather the streams' memory
        if not cfg.no_save and hasattr(trainer.task, "gather_train_states"):
            trainer.task.gather_train_states()
        return original_save(cfg, trainer, epoch_itr, val_loss)

    # keep fairseq's function attributes (save_checkpoint.best is read and written through the module)
    save_checkpoint.__dict__.update(original_save.__dict__)
    dist_utils._infer_torch_distributed_launch_init = _infer_torch_distributed_launch_init
    dist_utils.call_main = call_main
    distributed_fairseq_model.DistributedFairseqModel = DistributedFairseqModel
    models.DistributedFairseqModel = DistributedFairseqModel
    checkpoint_utils.save_checkpoint = save_checkpoint
