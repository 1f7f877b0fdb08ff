"""`rmt-deepspeed-train`: the fairseq-train flags under the `deepspeed` launcher (ZeRO 1/2/3, offload, bf16).

    deepspeed --num_gpus G $(which rmt-deepspeed-train) DATA --user-dir user_dir --task rmt_lm --arch rmt_wt103 \\
        --criterion rmt_cross_entropy --batch-size 8 --optimizer adam --lr 2.5e-4 --max-update 200000 \\
        --save-dir checkpoints/rmt --deepspeed-config ds_configs/zero2.json

Task, model and criterion are built through fairseq's registries from the same flags; the criterion runs the
same segment loop (modules/recurrence.py); fairseq's optimizer and lr scheduler are handed to
deepspeed.initialize. Each rank reads its own shard of the parallel streams. Gradients are normalised as
fairseq normalises them (summed loss / all tokens of the global batch), so both paths train the same model.
Checkpoints go through DeepSpeed's API (every rank also writes its streams' memory state); export one to a
fairseq checkpoint with `python -m rmt_fairseq.deepspeed.export`.
"""

import logging
import math
import os
import sys
from datetime import timedelta

import torch

DEFAULT_COLLECTIVE_TIMEOUT_S = 600  # without --heartbeat-timeout: how long a rank waits for a dead peer


def _number(value):
    """A logging-output value as a Python number; a tensor is detached first (float() of a tensor that requires
    grad warns, and the number needs no graph)."""
    return value.detach().item() if torch.is_tensor(value) else value


def _grad_norm(parameters) -> float:
    """The 2-norm of all gradients in fp32, as fairseq's trainer logs it (before clipping)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                 for g in grads])).item()


def parse_args(argv):
    from fairseq import options

    parser = options.get_training_parser()
    group = parser.add_argument_group("DeepSpeed")
    group.add_argument("--deepspeed-config", metavar="FILE", help="DeepSpeed JSON (ZeRO, precision, offload)")
    return options.parse_args_and_arch(parser, argv)


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
    from rmt_fairseq.errors import check, install_excepthook

    install_excepthook()
    args = parse_args(argv)
    check(args.task == "rmt_lm", f"rmt-deepspeed-train runs --task rmt_lm (memory carried along the streams), got "
                                 f"--task {args.task}: for per-sample recurrence under fairseq's own tasks use "
                                 f"fairseq-train")
    check(args.batch_size is not None, "rmt-deepspeed-train needs --batch-size (streams per rank)")
    update_freq = args.update_freq[0] if isinstance(args.update_freq, list) else args.update_freq
    world = int(os.environ.get("WORLD_SIZE", "1"))
    from rmt_fairseq.deepspeed.config import load_ds_config
    from rmt_fairseq.errors import RMTConfigError

    try:
        ds_config = load_ds_config(args.deepspeed_config, args.batch_size, update_freq, world,  # before any comm
                                   clip_norm=args.clip_norm)
    except RMTConfigError:
        if int(os.environ.get("RANK", "0")) != 0:
            os._exit(2)  # every rank reads the same flags and JSON: rank 0 says it once
        raise
    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        # started without the deepspeed launcher: one rank on this machine (DeepSpeed would look for MPI)
        from rmt_fairseq.distributed import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))

    import deepspeed
    from fairseq import metrics, optim, tasks, utils
    from fairseq.data import iterators
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.logging import progress_bar
    from fairseq.optim.lr_scheduler import build_lr_scheduler
    from omegaconf import OmegaConf

    from rmt_fairseq.modules.recurrence import RecurrentState

    # a rank that dies on another node leaves the others blocked in a collective: they give up after this
    # (torch's default is 30 minutes); fairseq's --heartbeat-timeout sets it, 600 s when not given
    deepspeed.init_distributed(timeout=timedelta(seconds=args.heartbeat_timeout if args.heartbeat_timeout > 0
                                                 else DEFAULT_COLLECTIVE_TIMEOUT_S))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout, force=True)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    log = logging.getLogger("rmt_fairseq.deepspeed.train")
    cfg = convert_namespace_to_omegaconf(args)
    utils.import_user_module(cfg.common)
    utils.set_torch_seed(cfg.common.seed)
    cfg.task.data_parallel_rank, cfg.task.data_parallel_size = rank, world
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    task.load_dataset(cfg.dataset.train_subset)
    fs_optimizer = optim.build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    lr_scheduler = build_lr_scheduler(cfg.lr_scheduler, fs_optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=fs_optimizer.optimizer, config=ds_config)
    device = engine.device
    log.info("DeepSpeed: ZeRO stage %d, %d ranks, micro batch %d x accumulation %d, %s",
             engine.zero_optimization_stage(), world, args.batch_size, update_freq, device)
    pad = task.source_dictionary.pad()
    # fp32 without ZeRO: DeepSpeed steps fairseq's own torch optimizer and reports no gradient norm; every other
    # DeepSpeed optimizer (ZeRO-1/2/3, fp16, bf16) does (engine.get_global_grad_norm)
    own_grad_norm = not hasattr(engine.optimizer, "_global_grad_norm")
    clip_norm = cfg.optimization.clip_norm
    # the progress bars' output on rank 0 only: one line per job. --log-file copies it, through one handler
    # (fairseq's progress_bar adds a handler per call: a bar per epoch would write each line again)
    log_format = cfg.common.log_format if rank == 0 else "none"
    default_log_format = "none" if cfg.common.no_progress_bar else "simple"
    tensorboard_logdir = cfg.common.tensorboard_logdir if rank == 0 else None
    log_file = logging.FileHandler(cfg.common.log_file) if rank == 0 and cfg.common.log_file else None
    if log_file:
        logging.getLogger(progress_bar.__name__).addHandler(log_file)
    # fairseq-train's metrics (fairseq.metrics, as its trainer logs them): the criterion's reduce_metrics gives
    # loss, ppl (and bpc); the task's wps, wpb, bsz; here ups, lr, gnorm, clip, train_wall; wall since the start
    metrics.reset()
    metrics.log_start_time("wall", priority=790, round=0)
    best = None  # the best validation metric so far (fairseq-train's best_loss)

    def set_lr(lr):
        for opt in {id(o): o for o in (engine.optimizer, fs_optimizer.optimizer)}.values():
            for group in opt.param_groups:
                group["lr"] = lr
        return lr

    def all_sum(values):
        # on the engine's device: NCCL refuses CPU tensors
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def all_sum_logs(logs):
        """Logging outputs summed over the micro-batches given and over every rank, as fairseq's trainer sums them
        (one all-reduce; the criterion logs the same keys on every rank), or gathered when the criterion's
        outputs cannot be summed. Returned as the list task.reduce_metrics takes."""
        if not criterion.logging_outputs_can_be_summed():
            parts = [None] * world
            torch.distributed.all_gather_object(parts, [{k: _number(v) for k, v in log.items()} for log in logs])
            return [log for part in parts for log in part]
        keys = sorted({k for log in logs for k, v in log.items() if isinstance(v, (int, float)) or torch.is_tensor(v)})
        return [dict(zip(keys, all_sum([sum(_number(log.get(k, 0)) for log in logs) for k in keys])))]

    def training_stats(name):
        stats = metrics.get_smoothed_values(name)
        stats["wall"] = round(metrics.get_meter("default", "wall").elapsed_time, 0)  # fairseq's get_training_stats
        return stats

    def to_device(sample):
        return utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample

    # ---- resume -------------------------------------------------------------------------------------------
    save_dir = cfg.checkpoint.save_dir
    num_updates, epoch, start_batch = 0, 1, 0
    if os.path.isfile(os.path.join(save_dir, "latest")) and not cfg.checkpoint.reset_dataloader:
        _, client = engine.load_checkpoint(save_dir)
        num_updates, epoch, start_batch = client["num_updates"], client["epoch"], client["batch_index"]
        lr_scheduler.load_state_dict(client["fairseq_lr_scheduler"])
        state_file = os.path.join(save_dir, client["tag"], f"rmt_state_rank{rank}.pt")
        st = RecurrentState()
        st.load_state_dict(torch.load(state_file, weights_only=True))
        task.states[("train", cfg.dataset.train_subset)] = st.to(device)
        log.info("resumed from %s at update %d (epoch %d, batch %d)", client["tag"], num_updates, epoch, start_batch)

    def save(tag, epoch, next_batch):
        """A DeepSpeed checkpoint (all ranks, as DeepSpeed requires) plus every rank's streams' memory."""
        state = task.train_state() or RecurrentState()
        client = {"num_updates": num_updates, "epoch": epoch, "batch_index": next_batch, "tag": tag,
                  "fairseq_lr_scheduler": lr_scheduler.state_dict(), "cfg": OmegaConf.to_container(cfg, resolve=True)}
        engine.save_checkpoint(save_dir, tag=tag, client_state=client)
        tmp = os.path.join(save_dir, tag, f"rmt_state_rank{rank}.pt.tmp")
        torch.save(utils.move_to_cpu(state.state_dict()), tmp)
        os.replace(tmp, tmp[: -len(".tmp")])  # atomic: complete or absent
        torch.distributed.barrier()
        log.info("saved checkpoint %s/%s", save_dir, tag)

    def save_epoch_end(finished_epoch):
        """fairseq-train always writes checkpoint_last.pt at the end of an epoch; --no-epoch-checkpoints only
        drops the per-epoch copies. Here: a tag per epoch end; with --no-epoch-checkpoints the previous epoch's
        tag is deleted once the new one is complete (the newest stays, as checkpoint_last.pt does)."""
        save(f"epoch{finished_epoch}", finished_epoch + 1, 0)
        if cfg.checkpoint.no_epoch_checkpoints and rank == 0:
            import shutil

            for old in range(1, finished_epoch):
                shutil.rmtree(os.path.join(save_dir, f"epoch{old}"), ignore_errors=True)
        torch.distributed.barrier()

    def validate(epoch):
        """The task's own validation (fresh 'valid' state per pass: training streams untouched), reduced as
        fairseq-train's validate: each batch's logging outputs summed over ranks into an aggregator of its own
        (the training meters untouched), one line on rank 0. Returns the --best-checkpoint-metric value."""
        nonlocal best
        subset = cfg.dataset.valid_subset
        if subset not in task.datasets:
            task.load_dataset(subset)
        itr = task.get_batch_iterator(task.dataset(subset)).next_epoch_itr(shuffle=False)
        vbar = progress_bar.progress_bar(itr, log_format=log_format, log_interval=cfg.common.log_interval,
                                         epoch=epoch, prefix=f"valid on '{subset}' subset",
                                         tensorboard_logdir=tensorboard_logdir, default_log_format=default_log_format)
        with metrics.aggregate(new_root=True) as agg:
            for sample in vbar:
                _, _, logging_output = task.valid_step(to_device(sample), engine, criterion)
                task.reduce_metrics(all_sum_logs([logging_output]), criterion)
        engine.train()
        stats = agg.get_smoothed_values()
        stats["num_updates"] = num_updates
        metric = cfg.checkpoint.best_checkpoint_metric
        value = stats.get(metric)
        if value is not None:
            pick = max if cfg.checkpoint.maximize_best_checkpoint_metric else min
            if best is not None:  # as fairseq-train: from the second validation on
                stats[f"best_{metric}"] = pick(best, value)
            best = value if best is None else pick(best, value)
        vbar.print(stats, tag=subset, step=num_updates)
        return value

    def train_update(group):
        """One update from the group's micro-batches (fairseq's GroupedIterator: --update-freq batches of this
        epoch, fewer for the epoch's last group). Gradients as fairseq-train's: the summed loss of every token
        of the update, on every rank, divided by their number. The token count is known before any forward
        (the non-pad targets), so each backward is scaled by world / (all tokens of the update): DeepSpeed
        averages over ranks. The accumulation boundary is set by hand, so a short last group of an epoch is
        one update, as in fairseq, instead of running into the next epoch. Returns the logging outputs summed
        over micro-batches and ranks, the gradient norm (None if there is none) and whether the step was applied."""
        utils.set_torch_seed(cfg.common.seed + num_updates)  # fairseq's rule: dropout seeded by the update
        global_tok = all_sum([sum(s["target"].ne(pad).sum().item() for s in group)])[0]
        logs = []
        engine.train()
        for i, sample in enumerate(group):
            sample = to_device(sample)
            engine.set_gradient_accumulation_boundary(i == len(group) - 1)
            sample["rmt_update"] = num_updates + 1
            loss, _, logging_output = task.run_step("train", sample, lambda: criterion(engine, sample))
            # 0 tokens: every rank skipped (--on-nonfinite skip)
            engine.backward(loss * world / max(global_tok, 1.0), scale_wrt_gas=False)
            logs.append(logging_output)
        # the boundary's backward has all-reduced the gradients: the norm before DeepSpeed clips them
        grad_norm = _grad_norm(engine.module.parameters()) if own_grad_norm else None
        engine.step()
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()  # None where DeepSpeed computes none (compute_grad_norm false)
        return all_sum_logs(logs), None if grad_norm is None else float(_number(grad_norm)), engine.was_step_applied()

    def log_update(logs, grad_norm, lr):
        """An applied update's metrics into the active aggregators, as fairseq's trainer logs them."""
        metrics.log_scalar("num_updates", num_updates, weight=0, priority=200)
        metrics.log_scalar("lr", lr, weight=0, priority=300)
        metrics.log_speed("ups", 1.0, priority=100, round=2)
        if grad_norm is not None and math.isfinite(grad_norm):
            metrics.log_scalar("gnorm", grad_norm, priority=400, round=3)
            if clip_norm > 0:  # the share of updates clipped, in percent
                metrics.log_scalar("clip", 100.0 if grad_norm > clip_norm else 0.0, priority=500, round=1)
        if engine.fp16_enabled():
            scale = getattr(engine.optimizer, "cur_scale", None)
            scale = getattr(getattr(engine.optimizer, "loss_scale_config", None), "cur_scale", scale)
            if scale is not None:
                metrics.log_scalar("loss_scale", _number(scale), priority=700, round=4, weight=0)
        if device.type == "cuda":  # the least free memory over the update
            total = torch.cuda.get_device_properties(device).total_memory
            metrics.log_scalar("gb_free", (total - torch.cuda.max_memory_allocated(device)) / 1024**3,
                               priority=1500, round=1, weight=0)
            torch.cuda.reset_peak_memory_stats(device)
        task.reduce_metrics(logs, criterion)  # wps, wpb, bsz; the criterion's loss, ppl, bpc

    # ---- train --------------------------------------------------------------------------------------------
    max_update = cfg.optimization.max_update or math.inf
    max_epoch = cfg.optimization.max_epoch or math.inf
    valid_every = cfg.dataset.validate_interval_updates
    save_every = cfg.checkpoint.save_interval_updates
    train_ds = task.dataset(cfg.dataset.train_subset)
    done = num_updates >= max_update
    set_lr(lr_scheduler.step_update(num_updates))
    while not done and epoch <= max_epoch:
        lr_scheduler.step_begin_epoch(epoch)  # as fairseq's trainer.begin_epoch
        set_lr(lr_scheduler.step_update(num_updates))
        itr = task.get_batch_iterator(train_ds, epoch=epoch).next_epoch_itr(shuffle=False)
        groups = iterators.GroupedIterator(itr, update_freq)  # fairseq-train's grouping (an update per group)
        # fairseq's own progress bar on rank 0: --log-format simple/json/tqdm, --tensorboard-logdir, --log-file
        bar = progress_bar.progress_bar(groups, log_format=log_format, log_interval=cfg.common.log_interval,
                                        epoch=epoch, tensorboard_logdir=tensorboard_logdir,
                                        default_log_format=default_log_format)
        next_batch = start_batch
        with metrics.aggregate("train"):  # the epoch's meters; "train_inner" holds those since the last line
            for group in bar:
                if group[-1]["batch_index"] < start_batch:
                    continue  # resumed: this update was done before the checkpoint
                with metrics.aggregate("train_inner"):
                    metrics.log_start_time("train_wall", priority=800, round=0)
                    logs, grad_norm, applied = train_update(group)
                    if applied:  # fp16 overflow: DeepSpeed skipped the step; fairseq does not count it either
                        num_updates += 1
                        log_update(logs, grad_norm, set_lr(lr_scheduler.step_update(num_updates)))
                    metrics.log_stop_time("train_wall")
                next_batch = group[-1]["batch_index"] + 1
                if not applied:
                    log.info("gradient overflow: DeepSpeed skipped the optimizer step (loss scale lowered); "
                             "not counted as an update")
                    continue
                if num_updates % cfg.common.log_interval == 0:
                    bar.log(training_stats("train_inner"), tag="train_inner", step=num_updates)
                    metrics.reset_meters("train_inner")
                done = num_updates >= max_update
                if done or next_batch >= len(train_ds):
                    break  # validated and saved below, once for this update (fairseq's validate_and_save)
                if valid_every and num_updates % valid_every == 0 and not cfg.dataset.disable_validation:
                    validate(epoch)
                if save_every and num_updates % save_every == 0 and not cfg.checkpoint.no_save:
                    save(f"update{num_updates}", epoch, next_batch)
        start_batch = 0
        end_of_epoch = not done or next_batch >= len(train_ds)
        val_loss = None if cfg.dataset.disable_validation else validate(epoch)
        if end_of_epoch:
            lr_scheduler.step(epoch, val_loss)  # as fairseq's trainer.lr_step (reduce_lr_on_plateau decays here)
            set_lr(lr_scheduler.step_update(num_updates))
            if not cfg.checkpoint.no_save:
                save_epoch_end(epoch)
        elif not cfg.checkpoint.no_save:
            save(f"update{num_updates}", epoch, next_batch)  # stopped mid-epoch by --max-update
        if metrics.get_meters("train"):  # as fairseq-train, after the epoch's (or the run's) last validation
            log.info("end of epoch %d (average epoch stats below)", epoch)
            bar.print(training_stats("train"), tag="train", step=num_updates)
            metrics.reset_meters("train")
        if end_of_epoch:
            epoch += 1
    metrics.reset()
    if log_file:
        logging.getLogger(progress_bar.__name__).removeHandler(log_file)
        log_file.close()
    log.info("done training in %d updates", num_updates)
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
