"""Every hyperparameter of the RMT authors' WikiText-103 and enwik8 runs beside the value this repository's preset and
run.sh use, read from the code: the table in examples/wikitext-103/README.md and examples/enwik8/README.md.

    python examples/paper_hparams.py            print both tables (markdown)
    python examples/paper_hparams.py --write    rewrite the tables in the two READMEs (between the hparams markers)
    python examples/paper_hparams.py --check    exit 1 when a README's table differs from the code's

"Ours" is what fairseq's own parsers make of the commands `run.sh ROW`, `run.sh eval ROW` and `run.sh eval-xl ROW`
print with DRY_RUN=1 (the preset's fields, run.sh's flags), and of the model code. "Authors" is AUTHORS below:
literal values from the authors' repository (booydar/LM-RMT, whose pytorch/ directory is kimiyoung/transformer-xl's
with memory tokens added), each with the file it comes from. tests/models/test_paper_presets.py checks AUTHORS against
its own copy, every value of ours against it, and the READMEs against this script's output.
"""

import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sources (booydar/LM-RMT, pytorch/ unless named otherwise)
S_BASE = {"wt103": "run_wt103_base.sh", "enwik8": "run_enwik8_base.sh"}  # train / eval flags
S_TRAIN = "train.py defaults"
S_CODE = "mem_transformer.py"
S_CSV = "experiment_results/results_wt103_enwik8_all_parameters.csv"  # the per-run dump of the paper's runs

# Each experiment has two columns: a Transformer-XL row run by the base script, and an RMT row from the dump.
ROWS = {"wt103": ("xl-l150-t150", "rmt-m10-k3-t150"), "enwik8": ("xl-l512-t512", "rmt-m5-k1-t128")}


def _common(exp):
    wt = exp == "wt103"
    b = S_BASE[exp]
    return {
        "n_layer": (16 if wt else 12, b), "d_model": (410 if wt else 512, b), "n_head": (10 if wt else 8, b),
        "d_head": (41 if wt else 64, b), "d_inner": (2100 if wt else 2048, b), "d_embed": ("d_model", S_TRAIN),
        "dropout": (0.1, b), "FFN inner dropout": (0.1, f"{S_CODE} PositionwiseFF (= dropout)"),
        "dropatt": (0.0, b), "pre_lnorm": (False, S_TRAIN), "attn_type": (0, S_TRAIN),
        "init": ("normal", S_TRAIN), "init_std": (0.02, S_TRAIN), "init_range": (0.1, S_TRAIN),
        "proj_init_std": (0.01, S_TRAIN), "LayerNorm init": ("N(1, init_std)", "train.py weights_init"),
        "u, v (r_w_bias, r_r_bias) init": ("N(0, init_std)", "train.py weights_init"),
        "u, v shared across layers": (True, f"{S_CODE} MemTransformerLM (one r_w_bias, r_r_bias)"),
        "position embedding dropout": (0.1, f"{S_CODE} _forward: drop(pos_emb)"),
        "adaptive": (wt, b), "cutoffs": ("20000,40000,200000" if wt else "-", "train.py (--adaptive: wt103)"),
        "div_val": (1, S_TRAIN), "tied": (True, "train.py (not --not_tied)"),
        "tie_projs": ("F,T,T,T" if wt else "F", "train.py"), "output bias": (True, "proj_adaptive_softmax.py"),
        "optim": ("adam", b), "adam betas, eps": ("(0.9, 0.999), 1e-08", "torch.optim.Adam defaults"),
        "lr": (0.00025, b), "scheduler": ("cosine", S_TRAIN), "eta_min": (0.0, S_TRAIN),
        "warmup_step": (0, b), "max_step": (200000 if wt else 400000, b), "clip": (0.25, S_TRAIN),
        "same_length (training)": (False, S_CSV), "clamp_len (training)": (-1, S_CSV),
        "eval batch_size": (10, "train.py eval_batch_size"), "eval_interval": (4000, S_CSV),
        "seed": (1111, S_TRAIN),
    }


# train.py keeps the K previous segments and their memory, then `mem_tokens.values = prev_mem_tokens[0].clone()`:
# an attribute assignment that leaves the tensor as it is, so the replay runs from the newest memory
REPLAY_AUTHORS = "the newest memory"
REPLAY_OURS = "the memory the segment first saw"

def _rmt_row(exp, tgt_len, batch_size, num_mem_tokens, mem_backprop_depth):
    """The RMT column: a run of the authors' results dump (no cache, memory tokens at both ends, evaluated at the
    training length)."""
    return {**_common(exp), "tgt_len": (tgt_len, S_CSV), "batch_size": (batch_size, S_CSV), "mem_len": (0, S_CSV),
            "num_mem_tokens": (num_mem_tokens, S_CSV), "mem_at_end": (True, S_CSV),
            "mem_backprop_depth": (mem_backprop_depth, S_CSV), "read_mem_from_cache": (False, S_CSV),
            "memory dropout": (True, f"{S_CODE} _forward"), "eval_tgt_len": (tgt_len, S_CSV),
            "eval mem_len": (0, "train.py evaluate()"),
            "memory token init": ("N(0, 1), one vector for all M", f"{S_CODE} init_mem_tokens"),
            "BPTT replay starts from": (REPLAY_AUTHORS, "train.py train(), mem_backprop_depth")}


AUTHORS = {
    "wt103": {
        "xl": {**_common("wt103"), "tgt_len": (150, S_BASE["wt103"]), "batch_size": (60, S_BASE["wt103"]),
               "mem_len": (150, S_BASE["wt103"]), "num_mem_tokens": (0, S_TRAIN),
               "eval_tgt_len": (150, S_BASE["wt103"]), "eval mem_len": (150, "train.py evaluate()"),
               "eval-xl tgt_len": (64, S_BASE["wt103"] + " eval"), "eval-xl mem_len": (640, S_BASE["wt103"] + " eval"),
               "eval-xl clamp_len": (400, S_BASE["wt103"] + " eval"),
               "eval-xl same_length": (True, S_BASE["wt103"] + " eval")},
        "rmt": _rmt_row("wt103", tgt_len=150, batch_size=60, num_mem_tokens=10, mem_backprop_depth=3),
    },
    "enwik8": {
        "xl": {**_common("enwik8"), "tgt_len": (512, S_BASE["enwik8"]), "batch_size": (22, S_BASE["enwik8"]),
               "mem_len": (512, S_BASE["enwik8"]), "num_mem_tokens": (0, S_TRAIN),
               "eval_tgt_len": (128, S_BASE["enwik8"] + ", " + S_CSV),
               "eval mem_len": (896, "train.py evaluate(): mem_len + tgt_len - eval_tgt_len"),
               "eval-xl tgt_len": (80, S_BASE["enwik8"] + " eval"),
               "eval-xl mem_len": (2100, S_BASE["enwik8"] + " eval"),
               "eval-xl clamp_len": (820, S_BASE["enwik8"] + " eval"),
               "eval-xl same_length": (True, S_BASE["enwik8"] + " eval")},
        "rmt": _rmt_row("enwik8", tgt_len=128, batch_size=64, num_mem_tokens=5, mem_backprop_depth=1),
    },
}

# Where ours differs on purpose (the reason is printed under the table).
INTENTIONAL = {
    "seed": "fairseq's --seed (default 1); the authors' runs used 1111, 1337 and others (their results dump)",
    "BPTT replay starts from": "LM-RMT's train.py keeps the K previous segments' memory to replay them from it, but "
                               "the line meant to restore it (`mem_tokens.values = prev_mem_tokens[0].clone()`) sets "
                               "an attribute and leaves the tensor unchanged; --bptt-mode sliding replays from the "
                               "saved memory, as intended",
    "memory token init": "each of the M memory tokens gets its own N(0, 1) draw (modules/memory.py MemoryTokens): "
                         "identical slots are symmetric under attention and only diverge through position",
}

# our flag for each hyperparameter (shown in the table)
FLAGS = {
    "n_layer": "--decoder-layers", "d_model": "--decoder-embed-dim", "n_head": "--decoder-attention-heads",
    "d_head": "--decoder-head-dim", "d_inner": "--decoder-ffn-embed-dim", "d_embed": "(C)", "dropout": "--dropout",
    "FFN inner dropout": "--activation-dropout", "dropatt": "--attention-dropout", "pre_lnorm": "(post-norm)",
    "attn_type": "(XL relative)", "init": "--init", "init_std": "--init-std", "init_range": "--init-range",
    "proj_init_std": "--proj-init-std", "LayerNorm init": "--init", "u, v (r_w_bias, r_r_bias) init": "--init",
    "adaptive": "--embedding-impl transformer_xl", "cutoffs": "--adaptive-softmax-cutoff", "div_val": "--div-val",
    "tied": "--tie-adaptive-weights / --share-decoder-input-output-embed", "tie_projs": "--tie-adaptive-proj",
    "output bias": "--embedding-impl transformer_xl", "optim": "--optimizer", "adam betas, eps":
    "--adam-betas, --adam-eps", "lr": "--lr", "scheduler": "--lr-scheduler", "eta_min": "--min-lr",
    "warmup_step": "--warmup-updates", "max_step": "--max-update", "clip": "--clip-norm",
    "same_length (training)": "--same-length", "clamp_len (training)": "--clamp-len",
    "eval batch_size": "run.sh eval: --batch-size", "tgt_len": "--tokens-per-sample",
    "batch_size": "--batch-size x ranks", "mem_len": "--mem-len", "num_mem_tokens": "--mem-tokens",
    "mem_at_end": "--memory-layout rmt", "mem_backprop_depth": "--bptt-unroll (--bptt-mode sliding)",
    "read_mem_from_cache": "--read-mem-from-cache", "memory dropout": "--no-memory-dropout (off)",
    "eval_tgt_len": "run.sh eval: --tokens-per-sample", "eval mem_len": "run.sh eval: --model-overrides mem_len",
    "eval-xl tgt_len": "run.sh eval-xl: --tokens-per-sample", "eval-xl mem_len": "run.sh eval-xl: mem_len",
    "eval-xl clamp_len": "run.sh eval-xl: clamp_len", "eval-xl same_length": "run.sh eval-xl: same_length",
    "memory token init": "(MemoryTokens)", "u, v shared across layers": "(PositionBias)",
    "position embedding dropout": "--dropout", "eval_interval": "run.sh: --save-interval-updates (validates)",
    "seed": "--seed", "BPTT replay starts from": "--bptt-mode sliding",
}


def _dry_run(exp: str, *args) -> list:
    script = os.path.join(REPO, "examples", "wikitext-103" if exp == "wt103" else "enwik8", "run.sh")
    out = subprocess.run(["bash", script, *args], env=dict(os.environ, DRY_RUN="1"), capture_output=True, text=True,
                         check=True).stdout
    return shlex.split(out.strip().splitlines()[-1])


def ours(exp: str, which: str) -> dict:
    """Our value of every hyperparameter in AUTHORS[exp][which], from run.sh's commands parsed by fairseq."""
    sys.path.insert(0, REPO)
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import user_dir  # noqa: F401
    from rmt_fairseq.models.rmt_lm import RMTDecoder  # noqa: F401  (the model code the fixed rows describe)

    row = ROWS[exp][0 if which == "xl" else 1]
    train = _dry_run(exp, row)
    assert train[0] == "fairseq-train", train
    args = options.parse_args_and_arch(options.get_training_parser(), train[1:])
    cfg = convert_namespace_to_omegaconf(args)
    m = cfg.model
    ev = options.parse_args_and_arch(options.get_eval_lm_parser(), _dry_run(exp, "eval", row)[1:])
    ev_over = eval(ev.model_overrides) if ev.model_overrides else {}
    C = m.decoder_embed_dim
    xl = str(m.embedding_impl) == "transformer_xl"
    cut = m.adaptive_softmax_cutoff
    n_cut = len(cut.split(",")) if cut else 0
    init = str(m.init)
    betas = cfg.optimizer.adam_betas
    betas = tuple(eval(betas) if isinstance(betas, str) else betas)
    v = {
        "n_layer": m.decoder_layers, "d_model": C, "n_head": m.decoder_attention_heads,
        "d_head": m.decoder_head_dim or C // m.decoder_attention_heads, "d_inner": m.decoder_ffn_embed_dim,
        "d_embed": "d_model" if xl else "-",
        "dropout": m.dropout, "FFN inner dropout": m.activation_dropout, "dropatt": m.attention_dropout,
        "pre_lnorm": False, "attn_type": 0, "init": init, "init_std": m.init_std, "init_range": m.init_range,
        "proj_init_std": m.proj_init_std,
        "LayerNorm init": "N(1, init_std)" if init == "normal" else "LayerNorm default (1)",
        "u, v (r_w_bias, r_r_bias) init": "N(0, init_std)" if init == "normal" else "zeros",
        "adaptive": bool(xl and cut), "cutoffs": cut or "-", "div_val": m.div_val,
        "tied": bool(m.tie_adaptive_weights or m.share_decoder_input_output_embed),
        "tie_projs": ",".join(["F"] + ["T" if m.tie_adaptive_proj else "F"] * n_cut),
        "output bias": xl, "optim": cfg.optimizer._name,
        "adam betas, eps": f"{betas}, {cfg.optimizer.adam_eps}",
        "lr": cfg.optimization.lr[0], "scheduler": cfg.lr_scheduler._name, "eta_min": cfg.lr_scheduler.min_lr,
        "warmup_step": cfg.lr_scheduler.warmup_updates, "max_step": cfg.optimization.max_update,
        "clip": cfg.optimization.clip_norm, "same_length (training)": m.same_length,
        "clamp_len (training)": m.clamp_len, "eval batch_size": ev.batch_size,
        "tgt_len": cfg.task.tokens_per_sample, "batch_size": cfg.dataset.batch_size * cfg.distributed_training.
        distributed_world_size, "mem_len": m.mem_len, "num_mem_tokens": m.mem_tokens,
        "mem_at_end": m.mem_tokens > 0 and str(m.memory_layout) == "rmt",
        "mem_backprop_depth": cfg.task.bptt_unroll if cfg.task.bptt_mode == "sliding" else None,
        "read_mem_from_cache": bool(m.read_mem_from_cache), "memory dropout": not m.no_memory_dropout,
        "eval_tgt_len": ev.tokens_per_sample, "eval mem_len": ev_over.get("mem_len", m.mem_len),
        "memory token init": "N(0, 1), a vector per token", "u, v shared across layers": True,
        "position embedding dropout": m.dropout, "eval_interval": cfg.checkpoint.save_interval_updates,
        "seed": cfg.common.seed,
        "BPTT replay starts from": REPLAY_OURS if cfg.task.bptt_mode == "sliding" else None,
    }
    if which == "xl":
        x = options.parse_args_and_arch(options.get_eval_lm_parser(), _dry_run(exp, "eval-xl", row)[1:])
        over = eval(x.model_overrides)
        v.update({"eval-xl tgt_len": x.tokens_per_sample, "eval-xl mem_len": over["mem_len"],
                  "eval-xl clamp_len": over["clamp_len"], "eval-xl same_length": over["same_length"]})
    return {k: v[k] for k in AUTHORS[exp][which]}


def _fmt(x) -> str:
    return "-" if x is None else str(x)


def table(exp: str) -> str:
    got = {w: ours(exp, w) for w in ("xl", "rmt")}
    keys = list(AUTHORS[exp]["xl"]) + [k for k in AUTHORS[exp]["rmt"] if k not in AUTHORS[exp]["xl"]]
    xl_row, rmt_row = ROWS[exp]
    lines = [f"| hyperparameter (XL / LM-RMT name) | authors, Tr-XL | ours, `{xl_row}` | authors, RMT | ours, "
             f"`{rmt_row}` | our flag | authors' source |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for k in keys:
        cells, sources = [], []
        for w in ("xl", "rmt"):
            if k in AUTHORS[exp][w]:
                a, src = AUTHORS[exp][w][k]
                o = got[w][k]
                mark = "" if _fmt(a) == _fmt(o) else (" (stated)" if k in INTENTIONAL else " **differs**")
                cells += [_fmt(a), _fmt(o) + mark]
                sources.append(src)
            else:
                cells += ["n/a", "n/a"]
        src = " / ".join(dict.fromkeys(sources))
        lines.append(f"| {k} | " + " | ".join(cells) + f" | `{FLAGS[k]}` | {src} |")
    notes = [f"- {k}: {why}." for k, why in INTENTIONAL.items()]
    return "\n".join(lines + [""] + ["Stated differences:", ""] + notes) + "\n"


BEGIN, END = "<!-- hparams:begin (generated by examples/paper_hparams.py --write) -->", "<!-- hparams:end -->"
READMES = {"wt103": "examples/wikitext-103/README.md", "enwik8": "examples/enwik8/README.md"}


def readme_table(exp: str) -> str:
    text = open(os.path.join(REPO, READMES[exp])).read()
    return text[text.index(BEGIN) + len(BEGIN) + 1 : text.index(END)]


def main(argv=None) -> int:
    import argparse
    import logging
    import warnings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="rewrite the tables in the two READMEs")
    group.add_argument("--check", action="store_true", help="exit 1 when a README's table differs from the code's")
    a = ap.parse_args(argv)
    logging.disable(logging.WARNING)  # fairseq's and hydra's INFO lines: the table is the output
    warnings.simplefilter("ignore")
    stale = []
    for exp in ("wt103", "enwik8"):
        t = table(exp)
        if a.write:
            path = os.path.join(REPO, READMES[exp])
            text = open(path).read()
            text = text[: text.index(BEGIN) + len(BEGIN) + 1] + t + text[text.index(END) :]
            open(path, "w").write(text)
        elif a.check:
            if readme_table(exp) != t:
                stale.append(READMES[exp])
        else:
            print(f"## {exp}\n\n{t}")
    for path in stale:
        print(f"error: the hyperparameter table in {path} differs from the code; run python examples/paper_hparams.py "
              f"--write", file=sys.stderr)
    if a.write or (a.check and not stale):
        print(f"{' and '.join(READMES.values())}: tables {'written' if a.write else 'up to date'}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
