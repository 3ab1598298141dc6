"""Benchmark of stage 2 (RSA task affinity), measured side by side in one run.

compare: branchnas's RDMs + Spearman affinity against rsatoolbox on the same features.
    rsatoolbox's ``calc_rdm(method='correlation')`` is 1 - Pearson between the rows;
    ``compare(method='spearman')`` ranks the strict upper triangles (``squareform`` order,
    ``scipy.stats.rankdata``: average ranks for ties) and takes the cosine of the centred
    ranks, i.e. Pearson of the ranks. That is exactly what branchnas computes, so the two
    must agree to rounding. Features are float32 (what a network gives); rsatoolbox gets
    them as float64 numpy (its working type; the conversion is not timed), branchnas as
    float32 torch (its float64 conversion is timed). The branchnas side is the stage's own
    path: CorrelationAccumulator (the same code extract_rdms feeds) then rsa_affinity.

memory: peak resident memory of extract_rdms for a torchvision ResNet-50 (weights=None;
    stem = conv1..maxpool, branch points layer1..layer4) at 288x384 with K images, in a
    fresh subprocess (ru_maxrss). Images are generated per batch from their index, as a
    dataset read from disk would be, so they are never all in memory.

Run (needs the bench extra: pip install rsatoolbox)::

    python bench/affinity.py                    # both, with the defaults below
    python bench/affinity.py compare --scale 0.25
    python bench/affinity.py memory --images 500 --passes first
    python bench/affinity.py plan               # passes and their cost, timed per block
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

#: ResNet-50 output channels and reduction at layer1..layer4.
RESNET50_POINTS = [(256, 4), (512, 8), (1024, 16), (2048, 32)]


def feature_sizes(height: int, width: int) -> list[int]:
    """C * H * W per image at layer1..layer4 of ResNet-50 for an input of height x width."""
    return [c * math.ceil(height / r) * math.ceil(width / r) for c, r in RESNET50_POINTS]


# --------------------------------------------------------------------------- compare


def _features(k: int, size: int, task: int, point: int):
    """Structured float32 features: tasks 0, 2, 4 share one latent, tasks 1, 3 another."""
    import torch

    g = torch.Generator().manual_seed(1000 * point + task)
    latent = torch.randn(k, 16, generator=torch.Generator().manual_seed(100 * point + task % 2))
    mixing = torch.randn(16, size, generator=g)
    noise = (1.0 + task) * torch.randn(k, size, generator=g)
    return torch.relu(latent @ mixing + noise)  # non-negative, with exact zeros, like activations


def compare(k: int, tasks: int, scale: float) -> dict[str, float]:
    import numpy as np
    import rsatoolbox
    import torch

    from branchnas.affinity import CorrelationAccumulator, rsa_affinity

    sizes = feature_sizes(round(288 * scale), round(384 * scale))
    print(f"compare: N={tasks} tasks, D={len(sizes)} points, K={k} images, features per image {sizes} "
          f"(ResNet-50 layer1..4 at {round(288 * scale)}x{round(384 * scale)}), torch threads {torch.get_num_threads()}")
    # Warm both up (thread pools, lazy imports, first-call allocations) before timing.
    warm = _features(k, 64, 0, 0)
    acc = CorrelationAccumulator(k)
    acc.update(warm)
    rsa_affinity(torch.stack([acc.compute()] * 2)[:, None])
    warm_rdm = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(warm.double().numpy()), method="correlation")
    rsatoolbox.rdm.compare(warm_rdm, warm_rdm, method="spearman")
    ours_time = theirs_time = 0.0
    ours_rdms = torch.empty(tasks, len(sizes), k, k, dtype=torch.float64)
    theirs_rdms = []
    for d, size in enumerate(sizes):
        per_point = []
        for t in range(tasks):
            feats = _features(k, size, t, d)
            as_numpy = feats.double().numpy()
            start = time.perf_counter()
            acc = CorrelationAccumulator(k)
            acc.update(feats)
            ours_rdms[t, d] = acc.compute()
            ours_time += time.perf_counter() - start
            start = time.perf_counter()
            per_point.append(rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(as_numpy), method="correlation"))
            theirs_time += time.perf_counter() - start
            del feats, as_numpy
        theirs_rdms.append(per_point)
    start = time.perf_counter()
    ours = rsa_affinity(ours_rdms)
    ours_spearman = time.perf_counter() - start
    start = time.perf_counter()
    theirs = np.stack([
        rsatoolbox.rdm.compare(rsatoolbox.rdm.concat(per_point), rsatoolbox.rdm.concat(per_point), method="spearman")
        for per_point in theirs_rdms
    ])
    theirs_spearman = time.perf_counter() - start
    theirs_matrices = np.stack([[r.get_matrices()[0] for r in per_point] for per_point in theirs_rdms], axis=1)
    rdm_diff = float(np.abs(theirs_matrices - ours_rdms.numpy()).max())
    affinity_diff = float(np.abs(theirs - ours.numpy()).max())
    off = ~np.eye(tasks, dtype=bool)
    result = {
        "rdm_max_abs_diff": rdm_diff,
        "affinity_max_abs_diff": affinity_diff,
        "ours_rdm_s": ours_time, "theirs_rdm_s": theirs_time,
        "ours_spearman_s": ours_spearman, "theirs_spearman_s": theirs_spearman,
        "speedup_rdm": theirs_time / ours_time,
        "speedup_spearman": theirs_spearman / ours_spearman,
        "speedup_total": (theirs_time + theirs_spearman) / (ours_time + ours_spearman),
    }
    print(f"  affinity off-diagonal range [{ours.numpy()[:, off].min():.3f}, {ours.numpy()[:, off].max():.3f}]")
    print(f"  max |RDM diff|      {rdm_diff:.2e}   (target <= 1e-6)")
    print(f"  max |affinity diff| {affinity_diff:.2e}   (target <= 1e-6)")
    print(f"  RDMs      branchnas {ours_time:7.2f} s   rsatoolbox {theirs_time:7.2f} s   x{result['speedup_rdm']:.1f}")
    print(f"  Spearman  branchnas {ours_spearman:7.2f} s   rsatoolbox {theirs_spearman:7.2f} s   x{result['speedup_spearman']:.1f}")
    print(f"  total     x{result['speedup_total']:.1f} faster (target >= 5x)")
    return result


# --------------------------------------------------------------------------- memory


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(k: int, batch_size: int, max_memory: int, passes: str) -> dict[str, object]:
    """Runs in a fresh process: build ResNet-50, extract its RDMs, report peak RSS."""
    import torch
    import torchvision

    from branchnas import affinity as aff

    model = torchvision.models.resnet50(weights=None)
    backbone = torch.nn.Module()
    backbone.stem = torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    backbone.blocks = torch.nn.ModuleList([model.layer1, model.layer2, model.layer3, model.layer4])
    del model

    def images(indices: list[int]) -> torch.Tensor:
        # Each image from its own seed: the same image in every pass, none kept in memory.
        return torch.stack([torch.randn(3, 288, 384, generator=torch.Generator().manual_seed(i)) for i in indices])

    sizes = feature_sizes(288, 384)
    capacity = max(1, max_memory // (k * 4))
    plan = aff.plan_passes(sizes, capacity)
    baseline = _rss_mib()
    start = time.perf_counter()
    if passes == "all":
        out = aff.extract_rdms([backbone], images, k, batch_size, max_memory=max_memory)
        finite = bool(torch.isfinite(out).all())
    else:
        # Every pass holds a buffer of the same size (the last one smaller) and runs through
        # layer1, the widest activations; the first also runs to layer4. So the first pass
        # reaches the peak of the whole extraction; the other passes mostly take time (they
        # measured up to ~0.1 GiB more at K=100: memory the allocator keeps after pass 1).
        # This is extract_rdms's own loop (_run_pass + CorrelationAccumulator), stopped
        # after pass 1.
        backbone.eval()
        with torch.inference_mode():
            assert aff._feature_sizes(backbone, images, torch.device("cpu")) == sizes
            accumulators = {point: aff.CorrelationAccumulator(k, "cpu") for point, _, _ in plan[0]}
            width = max(sum(stop - start for _, start, stop in slices) for slices in plan)
            buffer = torch.empty(k, width)
            aff._run_pass(backbone, images, plan[0], buffer, batch_size)
            offset = 0
            for point, first, stop in plan[0]:
                accumulators[point].update(buffer[:, offset : offset + stop - first])
                offset += stop - first
            del buffer
            finite = all(bool(torch.isfinite(acc.compute()).all()) for acc in accumulators.values())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "images": k, "batch_size": batch_size, "max_memory_mib": max_memory / 2**20,
        "passes_planned": len(plan), "pass_depths": [max(p for p, _, _ in s) + 1 for s in plan],
        "passes_run": 1 if passes == "first" else len(plan),
        "seconds": seconds, "baseline_rss_mib": baseline, "peak_rss_mib": peak,
        "materialised_mib": k * sum(sizes) * 4 / 2**20, "finite": finite,
    }


def memory(k: int, batch_size: int, max_memory: int, passes: str) -> dict[str, object]:
    cmd = [sys.executable, __file__, "_memory_child", "--images", str(k), "--batch-size", str(batch_size),
           "--max-memory", str(max_memory), "--passes", passes]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"memory child failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    sizes = feature_sizes(288, 384)
    print(f"memory: ResNet-50 (weights=None) at 288x384, K={k}, batch {batch_size}, "
          f"max_memory {result['max_memory_mib']:.0f} MiB, features per image {sizes}")
    print(f"  passes planned {result['passes_planned']} (deepest block per pass {result['pass_depths']}); "
          f"ran {result['passes_run']} in {result['seconds']:.1f} s")
    print(f"  RSS after model build {result['baseline_rss_mib']:.0f} MiB; peak {result['peak_rss_mib']:.0f} MiB "
          f"({result['peak_rss_mib'] / 1024:.2f} GiB; target < 2 GiB)")
    print(f"  all K x F features in float32 would be {result['materialised_mib']:.0f} MiB "
          f"(x{result['materialised_mib'] / result['peak_rss_mib']:.1f} the measured peak)")
    return result


def plan(k: int, max_memory: int, probe: int = 4) -> dict[str, object]:
    """The pass plan for ResNet-50 at 288x384 and its cost in full forward passes.

    The cost of running to each block is timed on ``probe`` images (after a warm-up), so
    the estimate reflects this machine, where the high-resolution early blocks cost more
    than their share of FLOPs.
    """
    import torch
    import torchvision

    from branchnas import affinity as aff

    model = torchvision.models.resnet50(weights=None).eval()
    stem = torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    blocks = [model.layer1, model.layer2, model.layer3, model.layer4]
    x = torch.randn(probe, 3, 288, 384, generator=torch.Generator().manual_seed(0))
    cumulative = []
    with torch.inference_mode():
        for _ in range(2):  # the first round warms up
            times, start = [], time.perf_counter()
            h = stem(x)
            for block in blocks:
                h = block(h)
                times.append((time.perf_counter() - start) / probe)
            cumulative = times
    sizes = feature_sizes(288, 384)
    passes = aff.plan_passes(sizes, max(1, max_memory // (k * 4)))
    depths = [max(p for p, _, _ in s) for s in passes]
    full = sum(cumulative[d] for d in depths) / cumulative[-1]
    print(f"plan: K={k}, max_memory {max_memory / 2**20:.0f} MiB -> {len(passes)} passes, deepest block "
          f"{[d + 1 for d in depths]}; forward to layer1..4 costs "
          f"{[round(c / cumulative[-1], 2) for c in cumulative]} of a full forward here, so the passes cost "
          f"{full:.1f} full forward passes (~{full * k * cumulative[-1]:.0f} s for K={k} at "
          f"{cumulative[-1]:.2f} s per image)")
    return {"passes": len(passes), "full_forwards": full, "seconds_per_image": cumulative[-1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", default="all", choices=["all", "compare", "memory", "plan", "_memory_child"])
    parser.add_argument("--images", type=int, default=500, help="K")
    parser.add_argument("--tasks", type=int, default=5, help="N (compare)")
    parser.add_argument("--scale", type=float, default=1 / 6,
                        help="compare: features of ResNet-50 at this fraction of 288x384 (rsatoolbox is slow)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-memory", type=int, default=None, help="bytes (default: branchnas's)")
    parser.add_argument("--passes", choices=["first", "all"], default="first")
    args = parser.parse_args(argv)
    if args.max_memory is None:
        from branchnas.affinity import DEFAULT_MAX_MEMORY

        args.max_memory = DEFAULT_MAX_MEMORY
    if args.what == "_memory_child":
        print(json.dumps(memory_child(args.images, args.batch_size, args.max_memory, args.passes)))
        return
    if args.what in ("all", "compare"):
        compare(args.images, args.tasks, args.scale)
    if args.what in ("all", "memory"):
        memory(args.images, args.batch_size, args.max_memory, args.passes)
    if args.what in ("all", "plan"):
        for budget in sorted({args.max_memory, 2 * args.max_memory}):
            plan(args.images, budget)


if __name__ == "__main__":
    main()
