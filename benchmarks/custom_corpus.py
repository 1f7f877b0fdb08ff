"""What examples/custom-corpus/README.md quotes, measured by running it: prepare.sh at the three levels on a raw
text (default: tinyshakespeare) and run.sh (the default rmt_tiny run) on the char-level data. Writes
benchmarks/results/custom_corpus.json (with the commit and commands); the README's numbers are rendered from it
by benchmarks/docs_blocks.py.

    python benchmarks/custom_corpus.py [--raw input.txt] [--out benchmarks/results/custom_corpus.json]
        [--workdir outputs/custom-corpus-bench] [--run-level char] [-- extra run.sh flags]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

from rmt_fairseq.provenance import write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "custom-corpus")
DEFAULT_RAW = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare", "input.txt")


def _run(cmd, env, log):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(p.stdout + p.stderr)
    if p.returncode != 0:
        sys.stderr.write((p.stdout + p.stderr)[-3000:])
        raise SystemExit(f"error: {' '.join(cmd)} failed ({p.returncode}); log: {log}")
    return time.perf_counter() - t0


def run_example(flags, data, save, log) -> dict:
    """run.sh with `flags` on `data` into `save` -> its results.json (less its provenance) with the command and the
    script's seconds; exits naming the log if run.sh fails."""
    seconds = _run(["bash", os.path.join(EXAMPLE, "run.sh"), *flags], dict(os.environ, DATA=data, SAVE=save), log)
    result = json.load(open(os.path.join(save, "results.json")))
    result.pop("provenance", None)
    result.update(command=f"DATA=OUT/bin examples/custom-corpus/run.sh {' '.join(flags)}".strip(),
                  script_seconds=round(seconds, 1))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", default=DEFAULT_RAW, help="the raw text (default: tinyshakespeare)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "custom_corpus.json"))
    ap.add_argument("--workdir", default=os.path.join(REPO, "outputs", "custom-corpus-bench"))
    ap.add_argument("--run-level", default="char", choices=["word", "bpe", "char"])
    ap.add_argument("--workers", default="2", help="WORKERS for prepare.sh")
    ap.add_argument("--variants", default="", help="also run run.sh with these flags on the same data, each into "
                    "its own SAVE: 'NAME=FLAGS;NAME=FLAGS' (e.g. 'none=--mem-tokens 0;armt=--arch armt_tiny'); their "
                    "results.json go under \"variants\"")
    ap.add_argument("extra", nargs="*", help="flags passed on to run.sh (after --)")
    a = ap.parse_args(argv)
    if not os.path.isfile(a.raw):
        ap.error(f"--raw {a.raw}: no such file")
    os.makedirs(a.workdir, exist_ok=True)
    levels = {}
    for level in ("char", "bpe", "word"):
        out = os.path.join(a.workdir, level)
        env = dict(os.environ, LEVEL=level, WORKERS=a.workers)
        seconds = _run(["bash", os.path.join(EXAMPLE, "prepare.sh"), a.raw, out], env,
                       os.path.join(a.workdir, f"prepare_{level}.log"))
        splits = json.load(open(os.path.join(out, "splits.json")))
        log = open(os.path.join(out, "preprocess.log")).read()
        counts = {s: dict(zip(("tokens", "unk_percent"), (int(t), float(u)))) for s, t, u in
                  re.findall(r"(train|valid|test)\.txt: \d+ sents, (\d+) tokens, ([\d.]+)% replaced", log)}
        levels[level] = {"command": f"LEVEL={level} WORKERS={a.workers} examples/custom-corpus/prepare.sh RAW OUT",
                         "seconds": round(seconds, 1), "dictionary": sum(1 for _ in open(f"{out}/bin/dict.txt")) + 4,
                         "splits": {s: {**splits[s], **counts.get(s, {})} for s in ("train", "valid", "test")}}
        print(json.dumps({level: levels[level]}), flush=True)
    data = os.path.join(a.workdir, a.run_level, "bin")
    run = run_example(a.extra, data, os.path.join(a.workdir, f"ckpt_{a.run_level}"), os.path.join(a.workdir, "run.log"))
    run.update(level=a.run_level)
    result = {"raw": os.path.basename(os.path.dirname(os.path.abspath(a.raw))) + "/" + os.path.basename(a.raw),
              "prepare": levels, "run": run, "variants": {}}
    for spec in filter(None, (v.strip() for v in a.variants.split(";"))):
        name, _, flags = spec.partition("=")
        log = os.path.join(a.workdir, f"run_{name}.log")
        try:
            v = run_example(flags.split(), data, os.path.join(a.workdir, f"ckpt_{a.run_level}_{name}"), log)
        except SystemExit as e:  # a run that stops (e.g. a non-finite loss) is a result: its last lines
            v = {"stopped": str(e), "last_lines": open(log).read().strip().splitlines()[-3:],
                 "command": f"DATA=OUT/bin examples/custom-corpus/run.sh {flags}".strip()}
        result["variants"][name] = dict(v, flags=flags)
        print(json.dumps({name: {k: v.get(k) for k in ("test_bpc_raw", "valid_loss", "stopped")}}), flush=True)
    write_results(a.out, result)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
