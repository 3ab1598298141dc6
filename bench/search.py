"""Benchmark the tree search: exact DP against plain enumeration, and scalable against exact.

Everything is measured in this one run, on random symmetric affinity tensors and random
integer block costs (seeded). Printed:

1. exact DP time (cold: first call for that task count, which builds the partition lattice;
   warm: the best of a few repeats) against the plain enumeration of :func:`rank_all_trees`
   (walk every stem-to-sink path of the networkx refinement DAG, score and sort). Where the
   enumeration is too long it is timed on two prefixes of the paths, and the full time is
   extrapolated from the measured rate (the table says so).
2. scalable search time for many tasks.
3. scalable against exact cost where the exact optimum is computable.
4. a one-line summary: the scalable/exact cost ratios (mean, worst) next to the 40-task times.

Usage::

    python bench/search.py            # about two minutes on two cores
    python bench/search.py --quick    # skips the longest enumerations
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from branchnas.search import ScalableSearch, count_trees, rank_all_trees, refinement_dag, search


def instance(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, list[int]]:
    a = rng.uniform(-1, 1, (d, n, n))
    a = (a + a.transpose(0, 2, 1)) / 2
    a[:, range(n), range(n)] = 1.0
    return a, rng.integers(100, 1000, d).tolist()


def mid_budget(blocks: list[int], n: int, fraction: float = 0.5) -> int:
    lo, hi = sum(blocks), n * sum(blocks)
    return int(lo + fraction * (hi - lo))


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def enumeration_time(a: np.ndarray, blocks: list[int], full_limit: int) -> tuple[float, float, str]:
    """(seconds for all trees, measured trees per second of the path walk, how it was obtained)."""
    n, d = a.shape[1], a.shape[0]
    total = count_trees(n, d)
    if total <= full_limit:
        seconds, _ = timed(lambda: rank_all_trees(a, blocks))
        return seconds, total / seconds, "measured"
    paths = 500_000
    build, _ = timed(lambda: refinement_dag(n, d))
    walk, _ = timed(lambda: rank_all_trees(a, blocks, max_trees=paths))
    rate = paths / max(1e-9, walk - build)
    return build + total / rate, rate, f"extrapolated: DAG build {build:.1f} s + {paths // 1000}k paths timed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="skip the 7- and 8-task enumerations")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    print("1. exact DP vs plain enumeration (random affinity, budget halfway between all-shared and all-separate)")
    header = f"{'tasks x points':>14} {'trees':>15} {'DP cold s':>10} {'DP warm s':>10} {'enum s':>12} {'enum/DP':>10}  enumeration"
    print(header)
    print("-" * len(header))
    rate_seen = None
    instances = {}
    for n, d, repeats in [(5, 4, 20), (7, 4, 5), (8, 4, 3), (10, 4, 2)]:
        a, blocks = instance(rng, n, d)
        instances[n] = (a, blocks)
        budget = mid_budget(blocks, n)
        cold, _ = timed(lambda a=a, b=blocks, B=budget: search(a, b, B, mode="exact"))
        warm, result = timed(lambda a=a, b=blocks, B=budget: search(a, b, B, mode="exact"), repeats)
        if n == 10:
            enum_s = count_trees(n, d) / rate_seen
            how = f"lower bound at the 8x4 walk rate ({rate_seen:,.0f} trees/s), without building its DAG (3 x 16.7M edges)"
        elif args.quick and n >= 7:
            continue
        else:
            enum_s, rate, how = enumeration_time(a, blocks, full_limit=1_000_000)
            how = f"{how}, {rate:,.0f} trees/s"
            rate_seen = rate
            check = rank_all_trees(a, blocks) if count_trees(n, d) <= 1_000_000 else None
            if check is not None:  # the two must agree on the answer
                best = next(r for r in check if r[1] <= budget)
                assert (best[0], best[3]) == (result.cost, result.tree.partitions)
        print(f"{n:>8} x {d:<3} {count_trees(n, d):>15,} {cold:>10.4f} {warm:>10.4f} {enum_s:>12.1f} "
              f"{enum_s / warm:>10,.0f}  {how}")

    print()
    print("2. scalable search, 40 tasks x 4 points (random affinity)")
    a40, blocks40 = instance(rng, 40, 4)
    times40 = {}
    for fraction in (0.25, 0.5):
        budget = mid_budget(blocks40, 40, fraction)
        seconds, result = timed(lambda B=budget: search(a40, blocks40, B, mode="scalable"))
        times40[f"{fraction:.0%} budget"] = seconds
        print(f"  budget at {fraction:.0%}: {seconds:6.2f} s, {result.trees_considered:,} trees in the candidate DAG, "
              f"candidates per point {result.details['candidates_per_point']}, cost {result.cost:.4f}, "
              f"groups {result.tree.groups_per_point()}")
    seconds, result = timed(lambda: search(a40, blocks40, None, mode="scalable", pareto=True))
    times40["Pareto"] = seconds
    print(f"  Pareto front (no budget): {seconds:6.2f} s, {len(result.pareto)} budget levels")

    print()
    print("3. scalable vs exact cost (same instances; budget as a fraction of the way from all-shared to all-separate)")
    header = f"{'tasks x points':>14} {'budget':>7} {'exact cost':>11} {'scalable':>10} {'scal/exact':>11} {'exact s':>8} {'scal s':>7}"
    print(header)
    print("-" * len(header))
    ratios = []
    for n in (8, 10):
        a, blocks = instances[n]
        for fraction in (0.1, 0.25, 0.5, 0.75):
            budget = mid_budget(blocks, n, fraction)
            t_exact, exact = timed(lambda a=a, b=blocks, B=budget: search(a, b, B, mode="exact"))
            t_scal, scal = timed(lambda a=a, b=blocks, B=budget: search(a, b, B, mode=ScalableSearch()))
            ratio = scal.cost / exact.cost
            ratios.append(ratio)
            print(f"{n:>8} x {4:<3} {fraction:>7.0%} {exact.cost:>11.4f} {scal.cost:>10.4f} {ratio:>11.3f} "
                  f"{t_exact:>8.2f} {t_scal:>7.2f}")
    print(f"  scalable / exact cost: mean {np.mean(ratios):.3f}, worst {max(ratios):.3f} (1.000 = optimal)")

    print()
    print(f"4. summary: scalable / exact cost mean {np.mean(ratios):.3f}, worst {max(ratios):.3f} "
          f"({len(ratios)} instances, 8 and 10 tasks); scalable on 40 tasks x 4 points: "
          + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in times40.items()))


if __name__ == "__main__":
    main()
