#!/usr/bin/env python
"""The documented commands, shrunk to CPU size (tests/docs/test_docs_commands.py puts a link to this file under
each command's name first on PATH; the link's name says which command it stands for).

Mode `run` (DOCS_MODE=run): the real command runs with its documented flags, then the flags below appended
(argparse keeps the last value of a repeated flag, as fairseq's docs say), so what is tested is the command as
written, made small:
  fairseq-train, rmt-deepspeed-train   --max-update $DOCS_MAX_UPDATE (2), --num-workers 0, --cpu without CUDA,
                                       and for the paper-size presets a 2-layer C 64 model (--decoder-* flags) with
                                       adaptive cutoffs the small test vocabulary has; --fp16 is dropped without
                                       CUDA; --distributed-world-size N > 2 becomes 2
  fairseq-hydra-train                  ++optimization.max_update=$DOCS_MAX_UPDATE ++dataset.num_workers=0,
                                       ++common.cpu=true without CUDA (a documented override of these is dropped)
  fairseq-eval-lm, -validate,          --cpu without CUDA, --num-workers 0, no --fp16 without CUDA
  -interactive
  deepspeed                            --num_gpus N -> 2, --num_nodes/--hostfile dropped, a free --master_port
  torchrun                             one node, 2 processes (--standalone)
  rmt-data (algorithmic, memorization) --train-size 2000 --valid-size 200 --test-size 200
  curl, wget                           copy the file from the local corpus (the tests have no network)
Mode `parse` (blocks that need hardware, downloads or files the tests do not have): every fairseq command's
arguments go through the real fairseq parser with the plugin loaded (flags exist, values parse, --arch/--task/
--criterion registered); launchers are parsed down to the fairseq command they start. Nothing runs.

Every call is recorded (JSON lines in $DOCS_LOG) so the test can tell that the documented commands were reached.
"""

import json
import os
import re
import shutil
import socket
import sys

REAL_BIN = os.environ.get("DOCS_REAL_BIN", os.path.dirname(sys.executable))
MODE = os.environ.get("DOCS_MODE", "run")
MAX_UPDATE = os.environ.get("DOCS_MAX_UPDATE", "2")
CUDA = os.environ.get("DOCS_CUDA", "0") == "1"
BIG_ARCHS = re.compile(r"^(rmt_wt103|transformer_xl_wt103|rmt_enwik8|transformer_xl_enwik8|rmt_lm|"
                       r"rmt_transformer_lm\w*|rmt_encoder_base|rmt_encoder_large|armt_wt103|armt_enwik8|"
                       r"armt_transformer_lm\w*|armt_encoder_base)$")
SMALL = ["--decoder-layers", "2", "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128",
         "--decoder-attention-heads", "2"]
FAIRSEQ = {"fairseq-train": "get_training_parser", "rmt-deepspeed-train": "get_training_parser",
           "fairseq-eval-lm": "get_eval_lm_parser", "fairseq-validate": "get_validation_parser",
           "fairseq-interactive": "get_interactive_parser", "fairseq-preprocess": "get_preprocessing_parser"}


def record(**kw):
    kw["block"] = int(os.environ.get("DOCS_BLOCK", "-1"))
    if os.environ.get("DOCS_LOG"):
        with open(os.environ["DOCS_LOG"], "a") as f:
            f.write(json.dumps(kw) + "\n")


def value(args, flag):
    for i in range(len(args) - 1, -1, -1):
        if args[i] == flag and i + 1 < len(args):
            return args[i + 1]
        if args[i].startswith(flag + "="):
            return args[i].split("=", 1)[1]
    return None


def drop(args, flag, takes_value):
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = takes_value
            continue
        if takes_value and a.startswith(flag + "="):
            continue
        out.append(a)
    return out


def shrink_fairseq(name, args):
    if not CUDA:
        args = drop(drop(args, "--fp16", False), "--memory-efficient-fp16", False)
    world = value(args, "--distributed-world-size")
    if world is not None and int(world) > 2:
        args += ["--distributed-world-size", "2"]
    args += ["--num-workers", "0"] + ([] if CUDA else ["--cpu"])
    if name in ("fairseq-train", "rmt-deepspeed-train"):
        args += ["--max-update", MAX_UPDATE]
        arch = value(args, "--arch") or value(args, "-a") or ""
        if BIG_ARCHS.match(arch):
            if "encoder" in arch:
                args += ["--encoder-layers", "2", "--encoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128",
                         "--encoder-attention-heads", "2"]
            else:
                args += SMALL + ["--decoder-head-dim", "32"]
                if "wt103" in arch or value(args, "--adaptive-softmax-cutoff"):
                    # the presets' 20000,40000,200000 need a WikiText-103-size vocabulary
                    args += ["--adaptive-softmax-cutoff", "1000,3000", "--adaptive-input-cutoff", "1000,3000"]
    return args


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def parse(name, args):
    """parse_fairseq in a child of the tests' fork server (tests/docs/parse.py) when one runs, else here."""
    folder = os.environ.get("RMT_TEST_FORKSERVER", "")
    if folder not in ("", "0"):
        here = os.path.dirname(os.path.realpath(__file__))
        os.execv(sys.executable, [sys.executable, "-S", os.path.join(os.path.dirname(here), "forkclient.py"),
                                  "script:" + os.path.join(here, "parse.py"), name, *args])
    return parse_fairseq(name, args)


def parse_fairseq(name, args):
    """The real parser with the plugin: argparse errors exit 2 with fairseq's message."""
    from fairseq import options

    args = [a for a in args if a != "..."]
    parser = getattr(options, FAIRSEQ[name])(**({"default_task": "language_modeling"}
                                                if name != "fairseq-preprocess" else {}))
    try:
        if name == "fairseq-preprocess":
            parser.parse_args(args)
        elif name == "rmt-deepspeed-train":
            from rmt_fairseq.deepspeed.train import parse_args

            parse_args(args)  # fairseq's training parser plus --deepspeed-config
        else:
            options.parse_args_and_arch(parser, input_args=args)
    except BaseException as e:  # argparse exits 2 after printing its error; anything else is a failure too
        record(name=name, mode="parse", ok=False, args=args, error=repr(e))
        raise
    record(name=name, mode="parse", ok=True, args=args)


def split_launcher(args, script_names):
    """launcher args, script name, script args (the script given as a path, e.g. $(which fairseq-train))."""
    for i, a in enumerate(args):
        if os.path.basename(a) in script_names:
            return args[:i], os.path.basename(a), args[i + 1:]
    raise SystemExit(f"docs shim: no training script among {args}")


def exec_real(real, args):
    """Run the real command in this process's place: through the tests' fork server when one runs
    (tests/forkserver.py: the same script as `__main__`, without paying its imports again), else as a fresh
    `python -u`. A launcher's rank (LOCAL_RANK set) always starts fresh, as the launcher started it."""
    folder = os.environ.get("RMT_TEST_FORKSERVER", "")
    if folder not in ("", "0") and "LOCAL_RANK" not in os.environ:
        client = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "forkclient.py")
        os.execv(sys.executable, [sys.executable, "-S", client, "script:" + real, *args])
    os.execv(sys.executable, [sys.executable, "-u", real, *args])


def main():
    name = os.path.basename(sys.argv[0])
    args = sys.argv[1:]
    real = os.path.join(REAL_BIN, name)
    if name in ("curl", "wget"):
        out = value(args, "-o") or value(args, "-O") or os.path.basename(args[-1])
        url = [a for a in args if a.startswith("http")][-1]
        local = os.environ.get("DOCS_MIRROR_" + re.sub(r"\W", "_", os.path.basename(url)))
        record(name=name, mode=MODE, url=url, ok=bool(local) or MODE == "parse")
        if MODE == "parse":
            return
        if not local:
            sys.exit(f"docs shim: {name} {url}: no local copy (the tests have no network)")
        if MODE == "run":
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            shutil.copyfile(local, out)
        return
    if name in ("deepspeed", "torchrun"):
        launcher, script, rest = split_launcher(args, ("fairseq-train", "rmt-deepspeed-train"))
        if MODE == "parse":
            return parse(script, rest)
        if name == "deepspeed":
            launcher = drop(drop(drop(drop(launcher, "--num_gpus", True), "--num_nodes", True), "--hostfile", True),
                            "--master_port", True)
            launcher += ["--num_gpus", "2", "--master_port", free_port()]
        else:
            launcher = ["--standalone", "--nnodes", "1", "--nproc_per_node", "2"]
        script_path = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), script)
        record(name=name, mode="run", args=args)
        exec_real(real, [*launcher, script_path, *rest])
    if MODE == "parse":
        if name in FAIRSEQ:
            return parse(name, args)
        record(name=name, mode="parse", ok=True, args=args, note="not parsed: runs only in run mode")
        return
    if name in FAIRSEQ and name != "fairseq-preprocess":
        args = shrink_fairseq(name, args)
    if name == "fairseq-hydra-train":  # hydra overrides: the documented ones, these replacing any of the same key
        shrink = {"optimization.max_update": MAX_UPDATE, "dataset.num_workers": "0", **({} if CUDA else
                                                                                          {"common.cpu": "true"})}
        args = [a for a in args if a.lstrip("+").split("=", 1)[0] not in shrink]
        args += [f"++{k}={v}" for k, v in shrink.items()]
    if name == "rmt-data" and args and args[0] in ("copy", "reverse", "associative_retrieval", "equations",
                                                   "memorization"):
        args += ["--train-size", "2000", "--valid-size", "200", "--test-size", "200"]
    record(name=name, mode="run", args=args)
    exec_real(real, args)


if __name__ == "__main__":
    main()
