"""Federated heavy hitters on Shakespeare: the top 50 words across 715 speaking roles, with DP.

Command (writes experiments/results/heavy_hitters_shakespeare.{md,json}):
  python experiments/heavy_hitters_shakespeare.py [--epsilons 1 4 8] [--repetitions 5] [--m 4 8 16]
  python experiments/heavy_hitters_shakespeare.py --render-only   # the .md again from the .json

Data: the train split of federated Shakespeare (``fljax.data.datasets.shakespeare``), one client
per speaking role (715). Words are the lowercase alphabetic tokens of a role's lines
(``re.findall("[a-z]+", text.lower())``: "'tis" gives "tis"), at most ``MAX_LENGTH`` letters
(longer tokens are dropped; their share is reported). Each role lists its distinct words by
decreasing frequency in its own lines, ties broken by a random order drawn from the ``"data"``
stream of the run key, and sends its first ``2 m`` of them; the library keeps the first ``m``
distinct ones (``max_contributions``): a role contributes its ``m`` most frequent words.

Truth (non-private): the 50 words held by the most roles under the same bound (a word's count is
the number of roles among whose ``m`` words it is; ties at rank 50 broken alphabetically).
Private: :func:`fljax.analytics.heavy_hitters.discover` (prefix tree, one letter per level,
``MAX_LENGTH`` levels, ``MAX_CANDIDATES`` survivors per level), noise multiplier calibrated so
that the whole query spends the target epsilon (PLD, delta = 1e-5, add/remove one role) and a
threshold from :func:`~fljax.analytics.heavy_hitters.calibrate_threshold` (probability at most
5% that any string of a single role survives any level); the private top 50 are the 50 found
words with the largest noisy counts (fewer when fewer are found). Precision = |private top 50 and
truth| / |private top 50|; recall = |private top 50 and truth| / 50. Seeded noise: a reproducible
simulation, not a private release.

A noiseless run at threshold = the 50th count checks that the discovery then returns exactly the
words at or above it.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import platform
import re
import time

import jax
import numpy as np

from fljax import random as fl_random
from fljax.analytics import heavy_hitters as hh
from fljax.data.datasets import shakespeare

HERE = pathlib.Path(__file__).resolve().parent
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
MAX_LENGTH = 10
MAX_CANDIDATES = 256
TOP = 50
DELTA = 1e-5
FALSE_POSITIVE_RATE = 0.05
SEED = 0


def role_words(seed: int) -> tuple[list[list[str]], dict]:
    """Each role's distinct words, most frequent first (random tie order from the ``"data"`` stream)."""
    snippets = shakespeare.read_snippets("train")
    data_key = fl_random.stream(fl_random.run_key(seed), "data")
    roles, tokens, dropped = [], 0, 0
    for index, cid in enumerate(sorted(snippets)):
        text = " ".join(s.decode("utf-8") for s in snippets[cid]).lower()
        words = re.findall("[a-z]+", text)
        tokens += len(words)
        kept = [w for w in words if len(w) <= MAX_LENGTH]
        dropped += len(words) - len(kept)
        freq = collections.Counter(kept)
        distinct = sorted(freq)
        tie = fl_random.host_rng(data_key, index).permutation(len(distinct))
        order = sorted(range(len(distinct)), key=lambda i: (-freq[distinct[i]], tie[i]))
        roles.append([distinct[i] for i in order])
    return roles, {"num_roles": len(roles), "tokens": tokens, "dropped_longer_than_max_length": dropped}


def truth(roles: list[list[str]], m: int) -> tuple[list[str], collections.Counter]:
    counts = collections.Counter(w for r in roles for w in r[:m])
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    return ranked[:TOP], counts


def run(roles, m: int, epsilons, repetitions: int) -> dict:
    top, counts = truth(roles, m)
    words, word_mask = hh.encode_clients(
        [r[: 2 * m] for r in roles], alphabet=ALPHABET, max_length=MAX_LENGTH
    )
    client_mask = np.ones(len(roles), bool)
    base = hh.HeavyHittersConfig(
        max_length=MAX_LENGTH,
        alphabet_size=len(ALPHABET) + 1,
        max_contributions=m,
        max_candidates=MAX_CANDIDATES,
        threshold=float(counts[top[-1]]),
        population_size=len(roles),
        delta=DELTA,
    )
    run_key = fl_random.run_key(SEED)

    # Noiseless check: exactly the words whose bounded count reaches the 50th count.
    t0 = time.perf_counter()
    state, metrics = hh.discover(base, words, word_mask, client_mask, fl_random.round_key(run_key, 0))
    jax.block_until_ready(state)
    noiseless_seconds = time.perf_counter() - t0
    found = dict(hh.found(state, alphabet=ALPHABET))
    expected = {w: float(c) for w, c in counts.items() if c >= base.threshold}
    assert found == expected and int(metrics["num_truncated"].sum()) == 0, "noiseless discovery is not exact"
    out = {
        "max_contributions": m,
        "words_sent_per_role": 2 * m,
        "truth_top": top,
        "truth_counts": [counts[w] for w in top],
        "count_at_rank_50": counts[top[-1]],
        "noiseless_check": {
            "threshold": base.threshold,
            "found": len(found),
            "exact": True,
            "seconds_with_compile": round(noiseless_seconds, 2),
        },
        "epsilons": {},
    }
    for e_index, target in enumerate(epsilons):
        cfg = hh.calibrate_noise_multiplier(base, target_epsilon=target)
        cfg = hh.calibrate_threshold(cfg, false_positive_rate=FALSE_POSITIVE_RATE, count=1)
        reps = []
        for rep in range(repetitions):
            key = fl_random.round_key(run_key, 1 + e_index * repetitions + rep)
            t0 = time.perf_counter()
            state, metrics = hh.discover(cfg, words, word_mask, client_mask, key)
            jax.block_until_ready(state)
            seconds = time.perf_counter() - t0
            result = hh.found(state, alphabet=ALPHABET)
            private_top = [w for w, _ in result[:TOP]]
            hits = len(set(private_top) & set(top))
            reps.append(
                {
                    "num_found": len(result),
                    "precision": hits / len(private_top) if private_top else float("nan"),
                    "recall": hits / TOP,
                    "found_with_count_1": sum(counts[w] <= 1 for w, _ in result),
                    "truncated": int(metrics["num_truncated"].sum()),
                    "seconds": round(seconds, 3),
                }
            )
        arr = lambda k, reps=reps: np.array([r[k] for r in reps], float)
        out["epsilons"][str(target)] = {
            "epsilon": hh.epsilon(cfg),
            "delta": cfg.target_delta,
            "noise_multiplier": cfg.noise_multiplier,
            "noise_std": cfg.noise_std,
            "threshold": cfg.threshold,
            "truth_above_threshold": sum(counts[w] >= cfg.threshold for w in top) / TOP,
            "precision_mean": float(np.nanmean(arr("precision"))),
            "precision_sd": float(np.nanstd(arr("precision"))),
            "recall_mean": float(arr("recall").mean()),
            "recall_sd": float(arr("recall").std()),
            "num_found_mean": float(arr("num_found").mean()),
            "repetitions": reps,
        }
        print(f"m={m} eps={target}: {out['epsilons'][str(target)]['recall_mean']:.3f} recall", flush=True)
    return out


def write_markdown(path: pathlib.Path, results: dict) -> None:
    lines = [
        "# Federated heavy hitters on Shakespeare (top 50 words over 715 roles)",
        "",
        f"Command: `{results['command']}`  ",
        f"Hardware: {results['hardware']}; total runtime {results['runtime_seconds']:.0f} s "
        f"(jax {results['jax_version']}).",
        "",
        "Each speaking role is one client and contributes its `m` most frequent distinct words "
        f"(lowercase alphabetic tokens of at most {MAX_LENGTH} letters; "
        f"{results['data']['dropped_longer_than_max_length']} of {results['data']['tokens']} tokens are "
        "longer and dropped). Truth: the 50 words held by the most roles under the same bound. Private: "
        f"prefix tree, one letter per level ({MAX_LENGTH} levels), {MAX_CANDIDATES} survivors per level, "
        "Gaussian noise calibrated so the whole query spends epsilon (PLD, delta 1e-5, add/remove one "
        f"role), threshold such that any single-role string survives with probability <= "
        f"{FALSE_POSITIVE_RATE}. Private top 50 = the 50 found words with the largest noisy counts. "
        f"Mean +- sd over {results['repetitions']} noise draws (seeded: a reproducible simulation).",
        "",
        "| m | epsilon | noise std | threshold | found | precision | recall | top 50 above threshold "
        "| s per run (compiled) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for block in results["runs"]:
        for eps, r in block["epsilons"].items():
            sec = np.mean([x["seconds"] for x in r["repetitions"][1:]] or [np.nan])
            lines.append(
                f"| {block['max_contributions']} | {eps} | {r['noise_std']:.1f} | {r['threshold']:.1f} | "
                f"{r['num_found_mean']:.1f} | {r['precision_mean']:.3f} +- {r['precision_sd']:.3f} | "
                f"{r['recall_mean']:.3f} +- {r['recall_sd']:.3f} | {r['truth_above_threshold']:.2f} | {sec:.2f} |"
            )
    lines += [""]
    for block in results["runs"]:
        chk = block["noiseless_check"]
        lines.append(
            f"m = {block['max_contributions']}: the 50th word is held by {block['count_at_rank_50']} roles "
            f"(the first by {block['truth_counts'][0]}); without noise at threshold {chk['threshold']:.0f} "
            f"the discovery returned exactly the {chk['found']} words at or above it."
        )
    lines += [
        "",
        "Top 50 above threshold: the share of the true top 50 whose count reaches the threshold, "
        "about the best recall that threshold allows. Seconds per run: the mean over repetitions 2 and later, which reuse the compiled query; the "
        "first run of each (m, epsilon) also compiles it (the configuration is static): "
        + ", ".join(
            f"m={b['max_contributions']} eps={e}: {r['repetitions'][0]['seconds']:.1f} s"
            for b in results["runs"]
            for e, r in b["epsilons"].items()
        )
        + ".",
        "",
        "## Reading",
        "",
        READING,
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--m", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--results", default=str(HERE / "results" / "heavy_hitters_shakespeare"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    args = parser.parse_args()
    out = pathlib.Path(args.results)
    if args.render_only:
        write_markdown(out.with_suffix(".md"), json.loads(out.with_suffix(".json").read_text()))
        return
    t0 = time.perf_counter()
    roles, data = role_words(SEED)
    runs = [run(roles, m, args.epsilons, args.repetitions) for m in args.m]
    results = {
        "command": "python experiments/heavy_hitters_shakespeare.py "
        + f"--epsilons {' '.join(f'{e:g}' for e in args.epsilons)} --repetitions {args.repetitions} "
        + f"--m {' '.join(map(str, args.m))}",
        "hardware": f"2-core CPU ({platform.processor() or platform.machine()})",
        "jax_version": jax.__version__,
        "data": data,
        "repetitions": args.repetitions,
        "runs": runs,
        "runtime_seconds": time.perf_counter() - t0,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    write_markdown(out.with_suffix(".md"), results)
    print(f"wrote {out}.{{md,json}} in {results['runtime_seconds']:.0f} s")


READING = """\
Precision is 1.0 in every run and no string of a single role was ever released: the threshold
sits about 4.8 noise standard deviations above 1 (a single role's string survives any of the 10
levels with probability at most 0.05), far above the noise, so every word found is a genuine
top-50 word. The cost of privacy is recall, and it is set by the threshold: only words held by
more roles than the threshold can be found, so recall follows the share of the true top 50
above it (previous column). Each query is 10 releases (one per letter), so each count carries
sqrt(10) times the noise of a single release at the same epsilon. A larger contribution bound helps on this
data (recall at epsilon 8: 0.39, 0.61, 0.84 for m = 4, 8, 16): a common word's count grows
roughly linearly with m while the noise grows as sqrt(m); the truth also changes with m (it is
the top 50 under that bound). At epsilon 1 only the 5 to 11 most common function words (the,
and, i, to, of, ...) are found. 715 roles is a small population for this query: the threshold
is an absolute number of clients while the counts grow with the population, so recall rises
with more clients, with fewer levels (chars_per_level=2 halves the releases at 27 times the
histogram), a looser false-positive target, or a shorter max_length. After compilation (5 to 9 s
per configuration, once 22 s under load) a query over the 715 roles takes about half a second on the 2-core
CPU (shared with other jobs while measured)."""

if __name__ == "__main__":
    main()
