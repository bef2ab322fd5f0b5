#!/usr/bin/env python3
"""Pools the paired rounds of several `ddpush-bench signed` runs of one binary.

Usage: signed-pool.py LABEL=RUN.json[,RUN.json...] [LABEL=...]

Each run's JSON (what `ddpush-bench signed` prints on stdout) lists every round; a round is
an unsigned and a signed fleet driven back to back. The ratios are taken within each round,
as the bench itself does, and then summarised over all rounds of all the runs named: the
median, the interquartile range, and a bootstrap 95 % interval of the median (2,000
resamples, fixed seed, so the same files give the same figures). Warm-up rounds are left out.
"""

import json
import random
import statistics
import sys


def rounds(paths):
    """(unsigned, signed) run records of every counted round in the files."""
    out = []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        by_round = {}
        for r in doc["runs"]:
            if r["label"].startswith("warmup"):
                continue
            by_round.setdefault(r["label"].split("#")[1], {})[r["signed"]] = r
        for pair in by_round.values():
            if set(pair) != {False, True}:
                sys.exit(f"{path}: a round without both fleets")
            out.append((pair[False], pair[True]))
    return out


def quantile(v, x):
    v = sorted(v)
    a = x * (len(v) - 1)
    lo = int(a)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (a - lo)


def median_interval(v):
    rng = random.Random(1)
    meds = [statistics.median(rng.choices(v, k=len(v))) for _ in range(2000)]
    return quantile(meds, 0.025), quantile(meds, 0.975)


FIGURES = [
    ("heartbeats/s signed/unsigned", lambda u, s: s["run"]["answered_per_s"] / u["run"]["answered_per_s"]),
    ("per server CPU s signed/unsigned", lambda u, s: u["server_cpu_us_per_answered"] / s["server_cpu_us_per_answered"]),
    ("extra server CPU us per signed hb", lambda u, s: s["server_cpu_us_per_answered"] - u["server_cpu_us_per_answered"]),
    ("server CPU us per v1 hb", lambda u, s: u["server_cpu_us_per_answered"]),
]


def main(args):
    if not args:
        sys.exit(__doc__)
    for arg in args:
        label, _, files = arg.partition("=")
        pairs = rounds(files.split(","))
        if not pairs:
            sys.exit(f"{label}: no rounds")
        for name, fig in FIGURES:
            v = [fig(u, s) for u, s in pairs]
            lo, hi = median_interval(v)
            print(
                f"{label:10} {name:34} rounds={len(v)} median {statistics.median(v):.3f} "
                f"IQR {quantile(v, .25):.3f}-{quantile(v, .75):.3f} 95% {lo:.3f}-{hi:.3f}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
