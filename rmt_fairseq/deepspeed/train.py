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
import time
from datetime import timedelta

import torch

DEFAULT_COLLECTIVE_TIMEOUT_S = 600  # without --heartbeat-timeout: how long a rank waits for a dead peer


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))

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

    def validate():
        """The task's own validation (fresh 'valid' state per pass: training streams untouched), summed over
        ranks as fairseq-train does."""
        subset = cfg.dataset.valid_subset
        if subset not in task.datasets:
            task.load_dataset(subset)
        total = [0.0, 0.0]
        itr = task.get_batch_iterator(task.dataset(subset)).next_epoch_itr(shuffle=False)
        for sample in itr:
            loss, n, _ = task.valid_step(to_device(sample), engine, criterion)
            total[0] += float(loss)
            total[1] += n
        engine.train()
        loss_sum, ntok = all_sum(total)
        valid_loss = loss_sum / max(ntok, 1) / math.log(2)
        log.info("valid on '%s' subset | loss %.4f | ppl %.2f | num_updates %d", subset, valid_loss,
                 2**valid_loss, num_updates)
        return valid_loss

    def train_update(group):
        """One update from the group's micro-batches (fairseq's GroupedIterator: --update-freq batches of this
        epoch, fewer for the epoch's last group). Gradients as fairseq-train's: the summed loss of every token
        of the update, on every rank, divided by their number. The token count is known before any forward
        (the non-pad targets), so each backward is scaled by world / (all tokens of the update): DeepSpeed
        averages over ranks. The accumulation boundary is set by hand, so a short last group of an epoch is
        one update, as in fairseq, instead of running into the next epoch."""
        utils.set_torch_seed(cfg.common.seed + num_updates)  # fairseq's rule: dropout seeded by the update
        global_tok = all_sum([sum(float(s["target"].ne(pad).sum()) for s in group)])[0]
        sums = [0.0, 0.0, 0.0]
        engine.train()
        for i, sample in enumerate(group):
            sample = to_device(sample)
            engine.set_gradient_accumulation_boundary(i == len(group) - 1)
            sample["rmt_update"] = num_updates + 1
            loss, ntok, logging_output = task.run_step("train", sample, lambda: criterion(engine, sample))
            # 0 tokens: every rank skipped (--on-nonfinite skip)
            engine.backward(loss * world / max(global_tok, 1.0), scale_wrt_gas=False)
            sums = [a + b for a, b in zip(sums, [float(loss.detach()), ntok, logging_output["nsentences"]])]
        engine.step()
        return all_sum(sums), engine.was_step_applied()

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
        bar = progress_bar.progress_bar(
            groups, log_format=cfg.common.log_format if rank == 0 else "none", log_interval=cfg.common.log_interval,
            log_file=cfg.common.log_file, epoch=epoch,
            tensorboard_logdir=cfg.common.tensorboard_logdir if rank == 0 else None,
            default_log_format="none" if cfg.common.no_progress_bar else "simple")
        agg = [0.0, 0.0, 0.0]  # loss, ntokens, nsentences since the last log line
        t0, next_batch = time.time(), start_batch
        for group in bar:
            if group[-1]["batch_index"] < start_batch:
                continue  # resumed: this update was done before the checkpoint
            sums, applied = train_update(group)
            next_batch = group[-1]["batch_index"] + 1
            if not applied:  # fp16 overflow: DeepSpeed skipped the step; fairseq does not count it either
                log.info("gradient overflow: DeepSpeed skipped the optimizer step (loss scale lowered); "
                         "not counted as an update")
                continue
            num_updates += 1
            lr = set_lr(lr_scheduler.step_update(num_updates))
            agg = [a + b for a, b in zip(agg, sums)]
            if num_updates % cfg.common.log_interval == 0:
                loss_bits = agg[0] / max(agg[1], 1) / math.log(2)
                bar.log({"loss": round(loss_bits, 4), "ppl": round(2**loss_bits, 2),
                         "wps": round(agg[1] / max(time.time() - t0, 1e-9), 1),
                         "wpb": round(agg[1] / cfg.common.log_interval, 1),
                         "bsz": round(agg[2] / cfg.common.log_interval, 1), "num_updates": num_updates,
                         "lr": lr}, tag="train_inner", step=num_updates)
                agg, t0 = [0.0, 0.0, 0.0], time.time()
            done = num_updates >= max_update
            end_of_epoch = next_batch >= len(train_ds)
            if valid_every and num_updates % valid_every == 0 and not end_of_epoch \
                    and not cfg.dataset.disable_validation:
                validate()
            if save_every and num_updates % save_every == 0 and not cfg.checkpoint.no_save and not end_of_epoch:
                save(f"update{num_updates}", epoch, next_batch)
            if done:
                break
        start_batch = 0
        end_of_epoch = not done or next_batch >= len(train_ds)
        val_loss = None if cfg.dataset.disable_validation else validate()
        if end_of_epoch:
            lr_scheduler.step(epoch, val_loss)  # as fairseq's trainer.lr_step (reduce_lr_on_plateau decays here)
            set_lr(lr_scheduler.step_update(num_updates))
            if not cfg.checkpoint.no_save:
                save_epoch_end(epoch)
            epoch += 1
        elif not cfg.checkpoint.no_save:
            save(f"update{num_updates}", epoch, next_batch)  # stopped mid-epoch by --max-update
    metrics.reset()
    log.info("done training in %d updates", num_updates)
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
