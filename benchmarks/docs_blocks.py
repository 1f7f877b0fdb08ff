"""Measured-number blocks of the docs, rendered from committed results JSON.

A doc holds measured numbers only between `<!-- measured:NAME begin -->` and `<!-- measured:NAME end -->`; the
text between is `render_NAME(json.load(REGISTRY[NAME][0]))`, so a number in the docs is one that a script wrote
(with the commit and command it came from). Each renderer is a small pure function `render_<name>(data) -> str`;
REGISTRY maps the marker name to (results JSON relative to the repository root, renderer).

    python benchmarks/docs_blocks.py FILE...           rewrite every registered block in FILEs
    python benchmarks/docs_blocks.py --check FILE...   exit 1 naming each block that differs from its JSON
"""

import argparse
import json
import os
import re
import sys
from typing import Callable, Dict, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fmt_bits(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def render_recall(results: dict) -> str:
    """examples/recall/run.sh's results.json: test bits/token per model against the two bounds."""
    b = results["bounds_bits"]
    dirty = " (with uncommitted changes)" if results.get("uncommitted_changes") else ""
    lines = [
        "| model | memory flags | best update | test bits/token | verdict | seconds (train + eval) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results["models"].items():
        lines.append(
            f"| {name} | `{r['flags']}` | {r['best_update']} | {_fmt_bits(r['test_loss_bits'])} | {r['verdict']} | "
            f"{r['wall_seconds']:.0f} |"
        )
    lines.append("")
    floors = results.get("test_stream_floors_bits")
    on_stream = (
        f" (on the test stream's segment alignment exactly: {floors['no_memory_bits']:.4f} and "
        f"{floors['memory_bits']:.4f})"
        if floors
        else ""
    )
    lines.append(
        f"Bounds (bits/token): {b['no_memory_bits']:.4f} without cross-segment memory, "
        f"{b['memory_bits']:.4f} with it{on_stream}. {results['updates']} updates, seed {results['seed']}; "
        f"commit `{(results.get('commit') or 'unknown')[:10]}`"
        f"{dirty}, {results['date'][:10]}."
    )
    name, first = next(iter(results["models"].items()))
    lines += [
        "",
        f"Commands run ({name}'s; the others differ only in the memory flags and directories):",
        "",
        "```text",
        *first["commands"],
        "```",
    ]
    return "\n".join(lines)


def _source(data: dict, path: str) -> str:
    """The line that says where a block's numbers come from."""
    p = data.get("provenance")
    if p:
        dirty = " with uncommitted changes" if p.get("uncommitted_changes") else ""
        return (
            f"Measured by `{p['command']}` at commit `{(p.get('commit') or 'unknown')[:10]}`{dirty}, "
            f"{p['date'][:10]}, {p['machine']}; results: [{path}]({_rel(path)})."
        )
    import subprocess

    committed = (
        subprocess.run(
            ["git", "-C", REPO, "log", "-1", "--format=%h", "--", path], capture_output=True, text=True
        ).stdout.strip()
        or "not yet committed"
    )
    return (
        f"Measured before results recorded their commit; the results file [{path}]({_rel(path)}) was "
        f"committed in `{committed}`."
    )


def _rel(path: str) -> str:
    return "/" + path  # GitHub resolves a leading slash from the repository root


def render_demo(data: dict) -> str:
    """rmt-demo's results.json: the README's table."""
    lines = ["```", f"{'model':<12}{'memory':<19}{'segments':>8}{'token acc %':>13}{'exact match %':>15}"]
    for name, r in data["models"].items():
        lines.append(f"{name:<12}{r['flags']:<19}{data['num_segments']:>8}{r['test_acc']:>13.2f}{r['test_em']:>15.2f}")
    wall = data.get("wall_seconds")
    lines += [
        "```",
        "",
        f"Copy of {data['src_len']} symbols in {data['num_segments']} segments, {data['updates']} "
        f"updates each, greedy decoding on the test split"
        + (f"; {int(wall // 60)} min {int(wall % 60)} s in all" if wall else "")
        + ". "
        + _source(data, "benchmarks/results/demo.json"),
    ]
    return "\n".join(lines)


def render_scaleout(data: dict) -> str:
    """benchmarks/scaleout.py: tokens/s, ratio, wall and peak RSS per launch combination."""
    lines = [
        "| combination | tokens/s | x 1 process | wall s (incl. start) | peak RSS, largest process |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['combination']} | {r['tokens_per_s']:.0f} | {r['ratio_to_one_process']:.2f} | "
            f"{r['wall_s']:.1f} | {r['peak_rss_mb_largest_process']:.0f} MB |"
        )
    st = data["setting"]
    lines += [
        "",
        f"{st['model']}, T {st['segment']}, {st['global_streams']} streams in all, {st['updates']} Adam "
        f"updates, {st['threads_per_process']} thread per process on {st['cpu_cores']} cores. "
        + _source(data, "benchmarks/results/scaleout.json"),
    ]
    return "\n".join(lines)


def render_test_suite(data: dict) -> str:
    """benchmarks/test_suite.py: tests and wall time of each make target."""
    lines = ["| command | tests | result | wall time | commit |", "| --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        wall = r["wall_seconds"]
        result = r["summary"] if r.get("returncode") else f"{r['passed']} passed"
        commit = (r.get("commit") or data["provenance"].get("commit") or "unknown")[:10]
        lines.append(f"| `{r['command']}` | {r['tests']} | {result} | {int(wall // 60)} min {int(wall % 60)} s "
                     f"| `{commit}` |")
    total = sum(r["wall_seconds"] for r in data["rows"])
    lines += ["", f"All three: {int(total // 60)} min {int(total % 60)} s (CI adds the set-up of a fresh clone)."]
    lines += ["", _source(data, "benchmarks/results/test_suite.json") + (f" Note: {data['note']}." if data.get(
        "note") else "")]
    mutations = data.get("mutations")
    if mutations:
        lines += ["", "Faults injected one at a time by `benchmarks/mutations.py` (each: `make test` with "
                  f"`PYTEST_ARGS=\"{mutations['pytest_args']}\"`, the file restored after):", "",
                  "| fault | `make test` | first test that failed | time to fail |", "| --- | --- | --- | --- |"]
        for r in mutations["rows"]:
            caught = "fails" if r["caught"] else "**passes (not caught)**"
            by = ", ".join(f"`{t}`" for t in r["caught_by"][:1]) or "-"
            lines.append(f"| {r['breaks']} (`{r['file']}`) | {caught} | {by} | {int(r['wall_seconds'])} s |")
        prov = mutations["provenance"]
        lines += ["", f"Measured at commit `{(prov.get('commit') or 'unknown')[:10]}`, {prov['date'][:10]}, "
                  f"{prov['machine']}."]
    return "\n".join(lines)


def render_custom_corpus_prepare(data: dict) -> str:
    """benchmarks/custom_corpus.py: prepare.sh at the three levels."""
    char = data["prepare"]["char"]["splits"]
    lines = [f"On {data['raw']}: every level splits it into "
             + " / ".join(f"{char[s]['lines']:,}" for s in ("train", "valid", "test")) + " lines and "
             + " / ".join(f"{char[s]['chars']:,}" for s in ("train", "valid", "test")) + " characters ("
             + " / ".join(f"{100 * char[s]['fraction']:.1f}" for s in ("train", "valid", "test")) + "%).", "",
             "| `LEVEL` | dictionary (4 special included) | train / valid / test tokens | `<unk>` in test | time |",
             "| --- | --- | --- | --- | --- |"]
    for level, r in data["prepare"].items():
        sp = r["splits"]
        lines.append(f"| `{level}` | {r['dictionary']:,} | " + " / ".join(f"{sp[s]['tokens']:,}" for s in
                                                                          ("train", "valid", "test"))
                     + f" | {sp['test']['unk_percent']:.2f}% | {r['seconds']:.0f} s |")
    lines += ["", _source(data, "benchmarks/results/custom_corpus.json")]
    return "\n".join(lines)


def render_custom_corpus(data: dict) -> str:
    """benchmarks/custom_corpus.py: run.sh's default run (results.json) on one level."""
    r = data["run"]
    bpc = f" = **{r['test_bpc_raw']:.4f} bits per character** of the raw test text" if r.get("test_bpc_raw") else ""
    lines = [f"- `{r['command']}` on the {r['level']}-level data: {r['updates']} updates; validation "
             f"{r['valid_loss']:.4f} bits per token at the last check; `fairseq-eval-lm` on test "
             f"{r['test_loss']:.4f} bits per token{bpc} ({r['test_tokens_scored']:,} of {r['test_tokens']:,} test "
             f"tokens scored: the first is context only, the last {r['test_tokens'] - 1 - r['test_tokens_scored']} "
             f"do not fill the 16 streams);",
             f"- {int(r['script_seconds'] // 60)} min {int(r['script_seconds'] % 60)} s for the whole script "
             f"(training {r['train_seconds']} s).", "", _source(data, "benchmarks/results/custom_corpus.json")]
    return "\n".join(lines)


MEMORIZATION_MODELS = [("rmt", "extrapolation", "RMT"), ("armt", "armt_extrapolation", "ARMT")]


def _memorization_row(data: dict, name: str, label: str, ex: list) -> list:
    tr = data["training"][name]
    return [label, f"{tr['curriculum_stage_reached']} of {data['setup']['max_segments']} "
            f"({tr['final_valid_accuracy']:.1f}% valid, {tr['train_seconds']:.0f} s)"] + \
        [f"{r['accuracy']:.1f}" for r in ex] + \
        [f"{r['us_per_token']:.1f} / {r['rss_mb']:.0f} -> {ex[-1]['us_per_token']:.1f} / {ex[-1]['rss_mb']:.0f}"
         for r in ex[:1]]


def render_memorization(data: dict) -> str:
    """benchmarks/memorization.py: accuracy per length (64 documents each) of RMT (and ARMT where the run has it:
    diagonal schedule, and the same checkpoint sequential on the shorter lengths), their streaming cost, runs that
    stopped, and the no-memory baseline."""
    ex = data["extrapolation"]
    st = data["setup"]
    head = ["model", "curriculum reached"] + [f"{r['segments']:,} seg ({r['tokens']:,} tok)" for r in ex] + \
        ["us/token / RSS MB (shortest -> longest)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, key, label in MEMORIZATION_MODELS:
        if key in data:
            flags = data["training"][name].get("flags")
            lines.append("| " + " | ".join(_memorization_row(
                data, name, f"{label}, {st['mem_tokens']} memory tokens" + (f" (`{' '.join(flags)}`)" if flags
                                                                              else ""), data[key])) + " |")
    seq = data.get("armt_sequential_extrapolation")
    if seq:
        acc = {r["segments"]: f"{r['accuracy']:.1f}" for r in seq}
        diag = {r["segments"]: r["us_per_token"] for r in data.get("armt_extrapolation", [])}
        ratios = [r["us_per_token"] / diag[r["segments"]] for r in seq if r["segments"] in diag]
        cost = (f" {seq[0]['us_per_token']:.1f} / {seq[0]['rss_mb']:.0f} -> {seq[-1]['us_per_token']:.1f} / "
                f"{seq[-1]['rss_mb']:.0f} (to {seq[-1]['tokens']:,} tok)"
                + ("; sequential / diagonal time per token at each length: " + " / ".join(f"{r:.2f}" for r in ratios)
                   if ratios else "")
                + " |")
        lines.append("| ARMT, the same checkpoint, `--inference-schedule sequential` | |"
                     + "".join(f" {acc.get(r['segments'], '')} |" for r in ex) + cost)
    for name, f in data.get("training_stopped", {}).items():
        lines.append(f"| {name} (`{' '.join(f['flags'])}`): training stopped | {f['curriculum_stage_reached']} of "
                     f"{st['max_segments']} (last validation: update {f['last_valid_update']}, "
                     f"{f['last_valid_accuracy']}%) | `{f['last_error_line']}` |" + " |" * (len(head) - 3))
    nm = data.get("no_memory_baseline")
    if nm:
        tr = data["training"]["no_memory"]
        lines.append(f"| no memory | {tr['curriculum_stage_reached']} of {st['max_segments']} "
                     f"({tr['final_valid_accuracy']:.1f}% valid, {tr['train_seconds']:.0f} s) | "
                     f"{nm[0]['accuracy']:.1f} at {nm[0]['segments']} segments |" + " |" * (len(head) - 3))
    lines += ["", f"{st['task']}, `{st['model']}`, T = {st['segment_len']}, {st['max_update']} updates, seed "
              f"{st['seed']}, {st['num_docs']} test documents per length; every model the same data and budget."
              + (f" Note: {st['note']}." if st.get("note") else ""), "", _source(data, data["_path"])]
    return "\n".join(lines)

def _load(path: str) -> dict:
    with open(os.path.join(REPO, path)) as f:
        return json.load(f)


def render_benchmark_figures(_: dict) -> str:
    """One row per benchmark script's full run: its headline figures, and where they come from."""
    rows = []
    d = _load("benchmarks/results/deep_unroll_memory.json")
    sm, rr = d["summary"], d["rows"]
    no_ck = [r for r in rr if not r["checkpoint_segments"]]
    rows.append(("deep_unroll_memory.py", f"with `--checkpoint-segments`, K={max(r['K'] for r in rr)} vs K=1: "
                 f"{sm['memory_ratio_kmax_vs_k1_with_ckpt']:.2f}x tensor memory, "
                 f"{sm['time_per_segment_ratio_kmax_vs_k1_with_ckpt']:.2f}x time per segment, "
                 f"{sm['memory_ratio_kmax_vs_k1_with_ckpt_default_malloc']:.2f}x RSS under glibc's default malloc; "
                 f"without: " + " / ".join(f"{r['peak_mb']:.0f}" for r in no_ck) + " MB for K = "
                 + " / ".join(str(r["K"]) for r in no_ck)
                 + f" ({sm['memory_ratio_kmax_vs_k1_without_ckpt']:.1f}x)", d, "deep_unroll_memory.json"))
    d = _load("benchmarks/results/throughput.json")
    rows.append(("throughput.py", ", ".join(f"{r['model']} x{r['ratio_to_no_memory']:.3f}" for r in d["rows"])
                 + f" of the no-memory backbone (ideal for RMT: T/(T+2M) = {d['ideal_rmt_ratio']:.3f}); backbone at "
                 f"{100 * d['rows'][0]['model_flops_fraction_of_gemm']:.0f}% of fp32 GEMM FLOP/s", d,
                 "throughput.json"))
    d = _load("benchmarks/results/long_stream.json")
    rows.append(("long_stream.py", " / ".join(f"{r['us_per_token']:.1f}" for r in d["rows"]) + " us per token, peak "
                 "RSS " + " / ".join(f"{r['peak_rss_mb']:.1f}" for r in d["rows"]) + " MB at "
                 + " / ".join(f"{r['tokens']:,}" for r in d["rows"]) + f" tokens: memory "
                 f"x{d['summary']['peak_rss_longest_vs_16k']:.3f} from the shortest to the longest", d,
                 "long_stream.json"))
    d = _load("benchmarks/results/memorization.json")
    ex = d["extrapolation"]
    armt = d.get("armt_extrapolation")
    rows.append(("memorization.py", f"{d['setup']['task']}: RMT {ex[0]['accuracy']:.1f}% at "
                 f"{ex[0]['segments']} segments, {ex[-1]['accuracy']:.1f}% at {ex[-1]['tokens']:,} tokens"
                 + (f"; ARMT {armt[0]['accuracy']:.1f}% and {armt[-1]['accuracy']:.1f}%" if armt else "")
                 + f"; RSS {ex[0]['rss_mb']:.0f} -> {ex[-1]['rss_mb']:.0f} MB ([examples/memorization]"
                 f"(../examples/memorization/README.md))", d, "memorization.json"))
    lines = ["| script | figures (full run) | measured at |", "| --- | --- | --- |"]
    for script, text, data, path in rows:
        p = data.get("provenance")
        where = (f"`{p['commit'][:10]}`" if p and p.get("commit") else "before commits were recorded") + \
            f" ([JSON](results/{path}))"
        lines.append(f"| `{script}` | {text} | {where} |")
    return "\n".join(lines)


def render_char_lm(data: dict) -> str:
    """benchmarks/char_lm.py: test and validation bpc per configuration."""
    lines = ["| configuration | flags | test bpc | valid bpc | train time (s) |", "| --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        lines.append(f"| {r['config']} | `{' '.join(r['flags'])}` | {r['test_bpc']:.4f} | {r['final_valid_bpc']:.4f} | "
                     f"{r['train_seconds']:.0f} |")
    lines += ["", _source(data, "benchmarks/results/char_lm.json")]
    merged = {}  # rows a later --merge run added, grouped by the run (command, commit) that measured them
    for r in data["rows"]:
        if r.get("provenance"):
            key = (r["provenance"]["command"], r["provenance"].get("commit"))
            merged.setdefault(key, (r["provenance"], []))[1].append(r["config"])
    for prov, names in merged.values():
        src = _source({"provenance": prov}, "benchmarks/results/char_lm.json").split("; results:")[0]
        lines += ["", f"Rows {', '.join(names)}: added later by `--merge` (same flags, data and seed), "
                  + src[0].lower() + src[1:] + "."]
    return "\n".join(lines)

# marker name -> (results JSON relative to the repository root, renderer)
REGISTRY: Dict[str, Tuple[str, Callable[[dict], str]]] = {
    "recall": ("benchmarks/results/recall.json", render_recall),
    "recall_seed2": ("benchmarks/results/recall_seed2.json", render_recall),
    "demo": ("benchmarks/results/demo.json", render_demo),
    "scaleout": ("benchmarks/results/scaleout.json", render_scaleout),
    "test_suite": ("benchmarks/results/test_suite.json", render_test_suite),
    "custom_corpus": ("benchmarks/results/custom_corpus.json", render_custom_corpus),
    "custom_corpus_prepare": ("benchmarks/results/custom_corpus.json", render_custom_corpus_prepare),
    "memorization": ("benchmarks/results/memorization.json", render_memorization),
    "benchmark_figures": ("benchmarks/results/throughput.json", render_benchmark_figures),
    "char_lm": ("benchmarks/results/char_lm.json", render_char_lm),
    "memorization_fact_detection": ("benchmarks/results/memorization_fact_detection.json", render_memorization),
    "memorization_reasoning": ("benchmarks/results/memorization_reasoning.json", render_memorization),
}


def render_diagonal_batching(data: dict) -> str:
    """benchmarks/diagonal_batching.py: eval tokens/s of both schedules, the speed-up and the NLL agreement."""
    lines = ["| tokens | sequential tokens/s | diagonal tokens/s | speed-up | NLL relative difference | "
             "peak RSS seq / diag |", "| --- | --- | --- | --- | --- | --- |"]
    for r in data["summary"]:
        rss = r["peak_rss_mb"]
        lines.append(f"| {r['tokens']:,} | {r['sequential_tokens_per_s']:.0f} | {r['diagonal_tokens_per_s']:.0f} | "
                     f"x{r['speedup']:.2f} | {r['nll_relative_difference']:.1e} | {rss['sequential']:.0f} / "
                     f"{rss['diagonal']:.0f} MB |")
    z = data["size"]
    lines += ["", f"ARMT, {z['layers']} layers, C {z['dim']}, {z['heads']} heads, {z['mem_tokens']} memory tokens, "
              f"d_mem {z['d_mem']}, segments of {z['T']}, one stream, {z['per_call']} segments per call, no gradients. "
              + _source(data, "benchmarks/results/diagonal_batching.json")]
    return "\n".join(lines)


REGISTRY["diagonal_batching"] = ("benchmarks/results/diagonal_batching.json", render_diagonal_batching)


def render_associative_capacity(data: dict) -> str:
    """benchmarks/associative_capacity.py: test exact match of RMT and ARMT against the number of pairs N."""
    st = data["setup"]
    models = list(st["archs"])
    lines = ["| N pairs | segments | " + " | ".join(f"{m} ({st['archs'][m]}) exact match %" for m in models) + " |",
             "| --- | --- | " + " | ".join("---" for _ in models) + " |"]
    by = {(r["num_pairs"], r["model"]): r for r in data["rows"]}
    for n in sorted({r["num_pairs"] for r in data["rows"]}):
        seg = next(r["segments"] for r in data["rows"] if r["num_pairs"] == n)
        lines.append(f"| {n} | {seg} | " + " | ".join(f"{by[(n, m)]['test_exact_match']:.1f}" if (n, m) in by else "-"
                                                      for m in models) + " |")
    lines += ["", f"{st['pairs_per_segment']} pair per segment, {st['mem_tokens']} memory tokens for both, "
              f"{st['max_update']} updates per N (batch {st['batch_size']}, lr {st['lr']}), each N started from the "
              f"same model at the previous N; {st['checkpoint']}. "
              + _source(data, "benchmarks/results/associative_capacity.json")]
    return "\n".join(lines)


REGISTRY["associative_capacity"] = ("benchmarks/results/associative_capacity.json", render_associative_capacity)


def render(name: str) -> str:
    """The block for marker `name`, from its committed JSON."""
    path, renderer = REGISTRY[name]
    with open(os.path.join(REPO, path)) as f:
        return renderer({**json.load(f), "_path": path})


def _marker(name: str, end: str) -> str:
    return f"<!-- measured:{name} {end} -->"


def update(text: str, skip_missing: bool = False) -> str:
    """text with every registered block between its markers re-rendered (skip_missing: leave a block whose
    results JSON does not exist yet as it is)."""
    for name in REGISTRY:
        if _marker(name, "begin") not in text:
            continue
        if skip_missing and not os.path.exists(os.path.join(REPO, REGISTRY[name][0])):
            print(f"{name}: {REGISTRY[name][0]} not written yet; block left as it is", file=sys.stderr)
            continue
        pattern = re.compile(re.escape(_marker(name, "begin")) + r"\n.*?" + re.escape(_marker(name, "end")), re.S)
        block = f"{_marker(name, 'begin')}\n{render(name)}\n{_marker(name, 'end')}"
        text = pattern.sub(lambda _: block, text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="markdown files holding measured:NAME blocks")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    ap.add_argument("--skip-missing", action="store_true", help="leave blocks whose results JSON is missing")
    a = ap.parse_args(argv)
    stale = []
    for path in a.files:
        with open(path) as f:
            old = f.read()
        new = update(old, skip_missing=a.skip_missing and not a.check)
        if new == old:
            continue
        if a.check:
            stale.append(path)
        else:
            with open(path, "w") as f:
                f.write(new)
    for path in stale:
        print(f"{path}: a measured block differs from its results JSON; run python benchmarks/docs_blocks.py {path}")
    return 1 if stale else 0




def render_memorization_ablation(data: dict) -> str:
    """benchmarks/memorization_ablation.py: accuracy at N, 2N, 8N, 32N segments and the longest length per recipe
    and seed (rows that stopped training say so), one table per task, each row with its own commit."""
    lines = []
    for task in sorted({r["task"] for r in data["rows"]}):
        rows = [r for r in data["rows"] if r["task"] == task]
        lines += [f"**{task}**", "", "| recipe | what changes | seed | scored on | updates | curriculum reached | "
                  "closed gate | N | 2N | 8N | 32N | longest (tokens) | commit |", "|" + " --- |" * 13]
        for r in rows:
            commit = (r.get("provenance", {}).get("commit") or "?")[:7]
            updates = r.get("updates") or r.get("last_valid_update") or "?"
            head = f"| {r['recipe']} | {r['change']} | {r['seed']} | {r['subset']} | {updates} |"
            if "rows" not in r:
                lines.append(f"{head} training stopped at stage {r.get('curriculum_stage_reached')}: "
                             f"{r.get('last_error_line') or r.get('training_stopped')} | | | | | | | {commit} |")
                continue
            accs = " | ".join(f"{e['accuracy']:.1f}" for e in r["rows"][:-1])
            accs += f" | {r['rows'][-1]['accuracy']:.1f} ({r['rows'][-1]['tokens']:,})"
            gate = r.get("gate_closed_share")
            lines.append(f"{head} {r['curriculum_stage_reached']} of {r.get('trained_to', '?')} "
                         f"({r['final_valid_accuracy']:.1f}% valid) | {'' if gate is None else f'{100 * gate:.1f}%'} "
                         f"| {accs} | {commit} |")
        lines.append("")
    p = data["rows"][-1].get("provenance") if data["rows"] else None
    lines.append("Accuracy (%) of 64 documents per length; N = the curriculum stage reached; chance 16.7. Closed gate "
                 "(gated_hard): the share of the update gate's channels exactly closed (they keep their memory bit "
                 "for bit) over segments 2 to 160 of 64 validation documents, the checkpoint's. "
                 + _source({"provenance": p}, "benchmarks/results/memorization_ablation.json")
                 + " Each row was measured by its own run of the script (commit column).")
    return "\n".join(lines)


REGISTRY["memorization_ablation"] = ("benchmarks/results/memorization_ablation.json", render_memorization_ablation)


def render_custom_corpus_variants(data: dict) -> str:
    """benchmarks/custom_corpus.py --variants: run.sh's default run and each variant on the same char-level data."""
    lines = ["| run | flags added to run.sh | test bpc | valid loss (bits) |", "| --- | --- | --- | --- |",
             f"| run.sh's default (rmt_tiny, 4 memory tokens) | | {data['run']['test_bpc_raw']:.4f} | "
             f"{data['run']['valid_loss']:.4f} |"]
    for name, v in data["variants"].items():
        if v.get("stopped"):
            last = next((ln for ln in reversed(v.get("last_lines", [])) if ln.startswith("error:")), v["stopped"])
            lines.append(f"| {name} | `{v['flags']}` | stopped: {last} | |")
        else:
            lines.append(f"| {name} | `{v['flags']}` | {v['test_bpc_raw']:.4f} | {v['valid_loss']:.4f} |")
    lines += ["", _source(data, "benchmarks/results/custom_corpus_armt.json")]
    return "\n".join(lines)


REGISTRY["custom_corpus_armt"] = ("benchmarks/results/custom_corpus_armt.json", render_custom_corpus_variants)


if __name__ == "__main__":
    sys.exit(main())
