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


def parse_args(argv):
    from fairseq import options

    parser = options.get_training_parser()
    group = parser.add_argument_group("DeepSpeed")
    group.add_argument("--deepspeed-config", metavar="FILE", help="DeepSpeed JSON (ZeRO, precision, offload)")
    return options.parse_args_and_arch(parser, argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
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

    ds_config = load_ds_config(args.deepspeed_config, args.batch_size, update_freq, world,  # before any comm
                               clip_norm=args.clip_norm)

    import deepspeed
    from fairseq import metrics, optim, tasks, utils
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
    log.info("DeepSpeed: ZeRO stage %d, %d ranks, micro batch %d x accumulation %d", engine.zero_optimization_stage(),
             world, args.batch_size, update_freq)

    def set_lr(num_updates):
        lr = lr_scheduler.step_update(num_updates)
        for opt in {id(o): o for o in (engine.optimizer, fs_optimizer.optimizer)}.values():
            for group in opt.param_groups:
                group["lr"] = lr
        return lr

    def all_sum(values):
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

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
        task.states[cfg.dataset.train_subset] = st.to(device)
        log.info("resumed from %s at update %d (epoch %d, batch %d)", client["tag"], num_updates, epoch, start_batch)

    def save(epoch, next_batch):
        tag = f"update{num_updates}"
        state = task.states.get(cfg.dataset.train_subset, RecurrentState())
        client = {"num_updates": num_updates, "epoch": epoch, "batch_index": next_batch, "tag": tag,
                  "fairseq_lr_scheduler": lr_scheduler.state_dict(), "cfg": OmegaConf.to_container(cfg, resolve=True)}
        engine.save_checkpoint(save_dir, tag=tag, client_state=client)  # all ranks, as DeepSpeed requires
        tmp = os.path.join(save_dir, tag, f"rmt_state_rank{rank}.pt.tmp")
        torch.save(state.state_dict(), tmp)
        os.replace(tmp, tmp[: -len(".tmp")])  # atomic: complete or absent
        torch.distributed.barrier()
        log.info("saved checkpoint %s/%s", save_dir, tag)

    def validate():
        task.load_dataset(cfg.dataset.valid_subset)
        engine.eval()
        total = [0.0, 0.0]
        itr = task.get_batch_iterator(task.dataset(cfg.dataset.valid_subset)).next_epoch_itr(shuffle=False)
        with torch.no_grad():
            for sample in itr:
                sample = utils.move_to_cuda(sample, device) if device.type == "cuda" else sample
                sample["rmt_state"] = task.state_for(sample)
                loss, n, _ = criterion(engine.module, sample)
                total[0] += float(loss)
                total[1] += n
        loss_sum, ntok = all_sum(total)
        valid_loss = loss_sum / ntok / math.log(2)
        log.info("valid on '%s' subset | loss %.4f | ppl %.2f | num_updates %d", cfg.dataset.valid_subset,
                 valid_loss, 2**valid_loss, num_updates)
        return valid_loss

    # ---- train --------------------------------------------------------------------------------------------
    max_update = cfg.optimization.max_update or math.inf
    max_epoch = cfg.optimization.max_epoch or math.inf
    set_lr(num_updates)
    micro = 0
    train_ds = task.dataset(cfg.dataset.train_subset)
    done = num_updates >= max_update
    while not done and epoch <= max_epoch:
        itr = task.get_batch_iterator(train_ds, epoch=epoch).next_epoch_itr(shuffle=False)
        # fairseq's own progress bar on rank 0: --log-format simple/json/tqdm, --tensorboard-logdir, --log-file
        itr = progress_bar.progress_bar(
            itr, log_format=cfg.common.log_format if rank == 0 else "none", log_interval=cfg.common.log_interval,
            log_file=cfg.common.log_file, epoch=epoch,
            tensorboard_logdir=cfg.common.tensorboard_logdir if rank == 0 else None,
            default_log_format="none" if cfg.common.no_progress_bar else "simple")
        agg = [0.0, 0.0, 0.0]  # loss, ntokens, nsentences since the last log line
        t0 = time.time()
        for sample in itr:
            if sample["batch_index"] < start_batch:
                continue
            engine.train()
            sample["rmt_state"] = task.state_for(sample)
            sample["rmt_update"] = num_updates + 1
            loss, ntok, logging_output = criterion(engine.module, sample)
            # fairseq: sum of token losses / tokens of the whole global batch. DeepSpeed averages over ranks
            # (and divides by the accumulation steps in backward), so scale by world / global tokens.
            global_tok = all_sum([ntok])[0]
            engine.backward(loss * world / max(global_tok, 1))  # 0: every rank skipped (--on-nonfinite skip)
            engine.step()
            micro += 1
            s = all_sum([float(loss), ntok, logging_output["nsentences"]])
            agg = [a + b for a, b in zip(agg, s)]
            if micro % update_freq:
                continue
            num_updates += 1
            lr = set_lr(num_updates)
            if num_updates % cfg.common.log_interval == 0:
                loss_bits = agg[0] / max(agg[1], 1) / math.log(2)
                itr.log({"loss": round(loss_bits, 4), "ppl": round(2**loss_bits, 2),
                         "wps": round(agg[1] / max(time.time() - t0, 1e-9), 1),
                         "wpb": round(agg[1] / cfg.common.log_interval, 1),
                         "bsz": round(agg[2] / cfg.common.log_interval, 1), "num_updates": num_updates,
                         "lr": lr}, tag="train_inner", step=num_updates)
                agg, t0 = [0.0, 0.0, 0.0], time.time()
            interval = cfg.checkpoint.save_interval_updates
            if interval and num_updates % interval == 0 and not cfg.checkpoint.no_save:
                save(epoch, sample["batch_index"] + 1)
            if num_updates >= max_update:
                done = True
                break
        start_batch = 0
        if not cfg.dataset.disable_validation:
            validate()
        if done:
            if not cfg.checkpoint.no_save:
                save(epoch, sample["batch_index"] + 1)
            break
        epoch += 1
        if not cfg.checkpoint.no_save and not cfg.checkpoint.no_epoch_checkpoints:
            save(epoch, 0)
    metrics.reset()
    log.info("done training in %d updates", num_updates)
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
