"""`rmt-plot-attention`: attention heatmaps of a trained checkpoint (paper Fig 6 and Fig 8).

    rmt-plot-attention --path CKPT --data DATA-BIN --input "a b c <gen> a b c a b c" [--segment-len T |
        --num-segments S] --out DIR

runs the segment loop on the input (space-separated tokens of the dictionary in DATA-BIN) and writes
DIR/segment{s}_layer{l}.png for every segment and layer: one heatmap per head, rows = queries, columns = keys,
with the cache, read-memory, segment and write-memory blocks marked, so the write-to-memory and
read-from-memory patterns can be seen.
"""

import argparse
import math
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(prog="rmt-plot-attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", required=True, help="checkpoint (.pt) trained with --user-dir user_dir")
    ap.add_argument("--data", required=True, help="data-bin directory with the checkpoint's dict.txt")
    ap.add_argument("--input", required=True, help="space-separated tokens")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--segment-len", type=int, help="segment length T")
    g.add_argument("--num-segments", type=int, help="split the input into S equal segments")
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from fairseq import checkpoint_utils

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import user_dir  # noqa: F401
    from rmt_fairseq.modules.recurrence import RecurrentState, run_segments

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([a.path], arg_overrides={"data": a.data})
    model = models[0].eval()
    dec, d = model.decoder, task.source_dictionary
    unknown = [t for t in a.input.split() if d.index(t) == d.unk()]
    if unknown:
        ap.error(f"--input has tokens not in {a.data}/dict.txt: {' '.join(unknown[:10])}")
    tokens = torch.tensor([[d.index(t) for t in a.input.split()]])
    T = a.segment_len or math.ceil(tokens.size(1) / (a.num_segments or 1))
    os.makedirs(a.out, exist_ok=True)
    layers = [layer.attn for layer in dec.layers]
    for attn in layers:
        attn.keep_attention = True
    written = []

    def plot(s, out):
        M = dec.num_mem_tokens
        W = M if dec.recurrent else 0
        seg = tokens[0, s * T : (s + 1) * T]
        for li, attn in enumerate(layers):
            w = attn.last_attention[0]  # H x N x K
            H, N, K = w.shape
            layout = dec.layout(K - N, M, seg.numel(), W)
            labels_k = (["c"] * layout.cache + [f"r{i}" for i in range(M)] + [d[t] for t in seg.tolist()]
                        + [f"w{i}" for i in range(W)])
            labels_q = labels_k[layout.cache :]
            fig, axes = plt.subplots(1, H, figsize=(4.2 * H, 4.2), squeeze=False)
            for h in range(H):
                ax = axes[0, h]
                ax.imshow(w[h].numpy(), cmap="viridis", vmin=0, vmax=float(w[h].max()))
                for b in (layout.cache, layout.cache + M, layout.cache + M + seg.numel()):  # block borders
                    ax.axvline(b - 0.5, color="w", lw=0.8)
                for b in (M, M + seg.numel()):
                    ax.axhline(b - 0.5, color="w", lw=0.8)
                ax.set_xticks(range(K), labels_k, fontsize=5, rotation=90)
                ax.set_yticks(range(N), labels_q, fontsize=5)
                ax.set_title(f"head {h}", fontsize=8)
            fig.suptitle(f"segment {s}, layer {li}: rows = queries (read r*, tokens, write w*), cols = keys",
                         fontsize=9)
            fig.tight_layout()
            path = os.path.join(a.out, f"segment{s}_layer{li}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)

    with torch.no_grad():
        run_segments(dec, tokens, None, RecurrentState(), seg_len=T, on_segment=lambda s, out: plot(s, out))
    print(f"wrote {len(written)} plots to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
