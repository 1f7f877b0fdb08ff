"""`rmt-plot-attention`: attention heatmaps of a trained checkpoint (paper Fig 6 and Fig 8).

    rmt-plot-attention --path CKPT --data DATA-BIN --input "a b c <gen> a b c a b c" --out DIR

runs the segment loop on the input (space-separated tokens of the dictionary in DATA-BIN) and writes
DIR/segment{s}_layer{l}.png for every segment and layer: one heatmap per head, rows = queries, columns = keys,
colour = attention weight (0..1, one colour bar for all heads), with the XL cache (c*), read-memory (r*),
segment and write-memory (w*) blocks separated, named above the columns and beside the rows, and keyed in a
legend, so the write-to-memory and read-from-memory patterns can be seen.

The input is cut into segments of the length the model was trained with (from the checkpoint: the segment
length --task rmt_algorithmic or rmt_lm recorded). --segment-len T or --num-segments S (segments of
ceil(length / S)) that make other segments are refused unless --allow-other-segment-len is given.
"""

import math
import os
import sys

from rmt_fairseq.cli.data import HelpFormatter, _Parser

# block name, tick-label prefix, colour (tick labels, names, legend)
BLOCKS = {"cache": ("XL cache", "c", "tab:gray"), "read": ("read memory", "r", "tab:orange"),
          "segment": ("segment tokens", "", "black"), "write": ("write memory", "w", "tab:red")}


def attention_figure(weights, key_labels, blocks, title, max_ticks=80):
    """One segment and layer: `weights` H x N x K (numpy; queries are the keys after the cache), `key_labels` K
    tick labels, `blocks` [(kind, start, end)] over the keys with kind in BLOCKS. Returns the matplotlib Figure:
    one heatmap per head on a shared 0..1 colour scale with its colour bar, block separators and names, and a
    legend of the blocks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    H, N, K = weights.shape
    cache = K - N
    colour = [BLOCKS[kind][2] for kind, s, e in blocks for _ in range(s, e)]  # one per key
    cell = 0.17 if K <= max_ticks else 0.17 * max_ticks / K  # inches per row/column
    side = max(3.0, cell * K + 1.2)
    fig, axes = plt.subplots(1, H, figsize=(side * H + 1.2, side * N / K + 1.6), squeeze=False, layout="constrained")
    step = math.ceil(K / max_ticks)  # long segments: every step-th token labelled
    font = 7 if step == 1 and K <= 48 else 5
    for h in range(H):
        ax = axes[0, h]
        im = ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks(range(0, K, step), key_labels[::step], fontsize=font, rotation=90)
        ax.set_yticks(range(0, N, step), key_labels[cache::step], fontsize=font)
        for tick, i in zip(ax.get_xticklabels(), range(0, K, step)):
            tick.set_color(colour[i])
        for tick, i in zip(ax.get_yticklabels(), range(cache, K, step)):
            tick.set_color(colour[i])
        for kind, s, e in blocks:
            name, c = BLOCKS[kind][0], BLOCKS[kind][2]
            if s > 0:  # separators: white lines between blocks, columns and (below the cache) rows
                ax.axvline(s - 0.5, color="w", lw=1.0)
                if s > cache:
                    ax.axhline(s - cache - 0.5, color="w", lw=1.0)
            short = name.split()[0] if e - s < 6 else name
            ax.text((s + e - 1) / 2, 1.01, short, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=7, color=c)
            if kind != "cache":
                ax.text(1.01, (s + e - 1) / 2 - cache, short, transform=ax.get_yaxis_transform(), ha="left",
                        va="center", fontsize=7, color=c, rotation=270)
        ax.set_title(f"head {h}", fontsize=9, pad=14)
        ax.set_xlabel("keys", fontsize=8)
        if h == 0:
            ax.set_ylabel("queries", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), label="attention weight", shrink=0.8)
    kinds = [kind for kind, s, e in blocks if e > s]
    fig.legend(handles=[Patch(color=BLOCKS[k][2], label=f"{BLOCKS[k][0]}" + (f" ({BLOCKS[k][1]}*)" if BLOCKS[k][1]
                                                                             else "")) for k in kinds],
               loc="outside lower center", ncol=len(kinds), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig


def main(argv=None):
    ap = _Parser(prog="rmt-plot-attention", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--path", required=True, help="checkpoint (.pt) trained with --user-dir user_dir")
    ap.add_argument("--data", required=True, help="data-bin directory with the checkpoint's dict.txt")
    ap.add_argument("--input", required=True, help="space-separated tokens")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--segment-len", type=int, help="segment length T; default: the one the model was trained with")
    g.add_argument("--num-segments", type=int, help="split the input into S equal segments (ceil(length / S))")
    ap.add_argument("--allow-other-segment-len", action="store_true",
                    help="accept segments of another length than the trained one (a warning, not an error)")
    ap.add_argument("--out", required=True, help="output directory for the PNGs")
    a = ap.parse_args(argv)
    for flag, path in [("--path", a.path), ("--data", a.data)]:
        if not os.path.exists(path):
            ap.error(f"{flag} {path} does not exist")
    for flag, v in [("--segment-len", a.segment_len), ("--num-segments", a.num_segments)]:
        if v is not None and v < 1:
            ap.error(f"{flag} must be >= 1, got {v}")

    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq sets the root logger to DEBUG
    import matplotlib.pyplot as plt
    import torch
    from fairseq import checkpoint_utils

    from rmt_fairseq.errors import RMTConfigError
    from rmt_fairseq.modules.recurrence import RecurrentState
    from rmt_fairseq.tasks.rmt_algorithmic import trained_layout

    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(a.path, {"data": a.data})
        task_name = state["cfg"]["task"].get("_name")
    except Exception as e:  # a truncated file, a bare state dict, not a checkpoint
        ap.error(f"--path {a.path} is not a fairseq checkpoint with its config ({type(e).__name__}: {e})")
    try:
        models, _, task = checkpoint_utils.load_model_ensemble_and_task([a.path], state=state)
    except RMTConfigError as e:  # e.g. --data with another dictionary than the model's
        ap.error(str(e))
    model = models[0].eval()
    dec, d = model.decoder, task.source_dictionary
    unknown = [t for t in a.input.split() if d.index(t) == d.unk()]
    if unknown:
        from rmt_fairseq.modules.generation import SPACE, dictionary_level

        hint = (f"; this dictionary is character level: give --input as space-separated characters with {SPACE} for "
                f"a space, e.g. \"F i r s t {SPACE} C i t i z e n\"" if dictionary_level(d) == "char" else "")
        ap.error(f"--input has tokens not in {a.data}/dict.txt: {' '.join(unknown[:10])}{hint}")
    tokens = torch.tensor([[d.index(t) for t in a.input.split()]])
    # rmt_algorithmic records the segment length its samples gave; other tasks' models resolve it on loading
    trained = trained_layout(state, a.data)["segment_len"] if task_name == "rmt_algorithmic" else \
        getattr(dec, "segment_len", None)
    L = tokens.size(1)
    if a.segment_len is not None:
        T, how = a.segment_len, f"--segment-len {a.segment_len}"
    elif a.num_segments is not None:
        T = math.ceil(L / a.num_segments)
        how = f"--num-segments {a.num_segments} (segments of {T} for the {L}-token input)"
    elif trained is not None:
        T, how = trained, None
    else:
        ap.error(f"--path {a.path} records no segment length: pass --segment-len or --num-segments")
    if how is not None and trained is not None and T != trained:
        msg = f"{how} differs from the segment length the model was trained with ({trained})"
        if not a.allow_other_segment_len:
            ap.error(f"{msg}; drop it to use {trained}, or add --allow-other-segment-len to plot at {T} anyway")
        print(f"warning: {msg}: plotting segments of {T} (--allow-other-segment-len)", file=sys.stderr)
    os.makedirs(a.out, exist_ok=True)
    layers = [layer.attn for layer in dec.layers]
    for attn in layers:
        attn.keep_attention = True
    written = []

    def plot(s, out):
        M, W = dec.scheme.before, dec.scheme.after  # the memory scheme's rows (modules/schemes.py)
        seg = tokens[0, s * T : (s + 1) * T]
        for li, attn in enumerate(layers):
            w = attn.last_attention[0]  # H x N x K
            H, N, K = w.shape
            C, t = K - N, seg.numel()  # cache columns, segment tokens
            labels = ([f"c{i}" for i in range(C)] + [f"r{i}" for i in range(M)] + [d[x] for x in seg.tolist()]
                      + [f"w{i}" for i in range(W)])
            blocks = [("cache", 0, C), ("read", C, C + M), ("segment", C + M, C + M + t),
                      ("write", C + M + t, C + M + t + W)]
            first = s * T
            fig = attention_figure(w.float().numpy(), labels, [b for b in blocks if b[2] > b[1]],
                                   f"segment {s} (input tokens {first}..{first + t - 1}, segment length {T}), "
                                   f"layer {li}: rows = queries, columns = keys")
            path = os.path.join(a.out, f"segment{s}_layer{li}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)

    with torch.no_grad():
        model(tokens, segment_len=T, rmt_state=RecurrentState(), on_segment=plot)  # the model's forward
    print(f"wrote {len(written)} plots to {os.path.normpath(a.out)} (segments of {T})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
