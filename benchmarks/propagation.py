"""Speed of apro's propagation kernels, as ratios measured in one run.

    python benchmarks/propagation.py [--repeats 15] [--skip-scale]

Prints a markdown table. Every ratio compares two timings taken in this process: the two
sides run alternately ``--repeats`` times each; times are medians, and the ratio is the
median of the per-pair ratios, so machine noise affects both sides alike.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

import apro
from apro._color import imagenet_normalize
from apro.tree import grid_edge_weights



def best_time(fn, repeats):
    fn()  # warm-up (numba compile, allocator)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def paired(fa, fb, repeats):
    """Run ``fa`` and ``fb`` alternately ``repeats`` times each; return their median times
    and the median of the per-pair ratios ``t_a / t_b``. Alternating and taking medians
    keeps a slow spell (or a lucky one) of a shared machine from deciding the ratio."""
    fa()
    fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    ta, tb = np.array(ta), np.array(tb)
    return float(np.median(ta)), float(np.median(tb)), float(np.median(ta / tb))


def natural_image(size):
    """scikit-image's bundled astronaut (512x512, offline), resized and ImageNet-normalised."""
    from skimage import data

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
    return imagenet_normalize(img)


def unfold_local_propagation(values, image, kernel_size, zeta, iterations):
    """The straightforward reference: unfold the window every step (as released code does)."""
    b, c, h, w = values.shape
    r = kernel_size // 2
    padded = F.pad(image, (r, r, r, r), value=1e4)  # far-away value: outside is no neighbour
    neigh = F.unfold(padded, kernel_size).view(b, image.shape[1], kernel_size**2, h * w)
    dist = (neigh - image.view(b, -1, 1, h * w)).pow(2).sum(1)
    aff = torch.exp(-dist / zeta**2)
    aff = (aff / aff.sum(1, keepdim=True)).unsqueeze(1)
    y = values
    for _ in range(iterations):
        cols = F.unfold(F.pad(y, (r, r, r, r)), kernel_size).view(b, c, kernel_size**2, h * w)
        y = (cols * aff).sum(2).view(b, c, h, w)
    return y


@njit(cache=True)
def _bruteforce_gp(edges, weights, n, inv_zeta2, values):
    """O(N^2): from every pixel, walk the whole tree keeping the running max edge."""
    deg = np.zeros(n + 1, dtype=np.int64)
    for e in range(edges.shape[0]):
        deg[edges[e, 0] + 1] += 1
        deg[edges[e, 1] + 1] += 1
    for i in range(n):
        deg[i + 1] += deg[i]
    fill = deg[:-1].copy()
    nbr = np.empty(2 * edges.shape[0], dtype=np.int64)
    nw = np.empty(2 * edges.shape[0])
    for e in range(edges.shape[0]):
        a, b = edges[e, 0], edges[e, 1]
        nbr[fill[a]] = b
        nw[fill[a]] = weights[e]
        fill[a] += 1
        nbr[fill[b]] = a
        nw[fill[b]] = weights[e]
        fill[b] += 1
    out = np.empty_like(values)
    stack = np.empty(n, dtype=np.int64)
    cost = np.empty(n)
    seen = np.zeros(n, dtype=np.int64)
    for src in range(n):
        num = 0.0
        den = 0.0
        top = 0
        stack[0] = src
        cost[src] = 0.0
        seen[src] = src + 1
        top = 1
        while top > 0:
            top -= 1
            i = stack[top]
            a = np.exp(-cost[i] * inv_zeta2)
            num += a * values[i]
            den += a
            for j in range(deg[i], deg[i + 1]):
                k = nbr[j]
                if seen[k] != src + 1:
                    seen[k] = src + 1
                    cost[k] = max(cost[i], nw[j])
                    stack[top] = k
                    top += 1
        out[src] = num / den
    return out


def peak_memory_mb(size, channels):
    """Peak resident memory (MB) above the level just before one GP call at ``size x size``,
    sampled from /proc every millisecond in a fresh process (kernels compiled beforehand)."""
    code = f"""
import threading, time, torch, apro
page = __import__("os").sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
g = torch.rand(1, 3, {size}, {size}); v = torch.rand(1, {channels}, {size}, {size})
apro.global_propagation(torch.rand(1, 1, 8, 8), torch.rand(1, 3, 8, 8), 0.1)
base = peak = rss(); done = False
def sample():
    global peak
    while not done:
        peak = max(peak, rss()); time.sleep(0.001)
t = threading.Thread(target=sample); t.start()
apro.global_propagation(v, g, 0.1)
done = True; t.join()
print((peak - base) / 2**20)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.split()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-scale", action="store_true", help="skip the 2048x2048 memory runs")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []

    image = natural_image((512, 512))
    w = grid_edge_weights(image)[0].numpy()
    w = w[np.isfinite(w)]  # the 2N - H - W real edges
    v1 = torch.rand(1, 1, 512, 512)
    v21 = torch.rand(1, 21, 512, 512)
    t_gp1, t_sort, r_sort = paired(lambda: apro.global_propagation(v1, image, 0.1), lambda: np.sort(w), args.repeats)
    _, t_argsort, r_argsort = paired(lambda: apro.global_propagation(v1, image, 0.1), lambda: np.argsort(w), args.repeats)
    t_gp21, _, r_21 = paired(
        lambda: apro.global_propagation(v21, image, 0.1), lambda: apro.global_propagation(v1, image, 0.1), args.repeats
    )
    rows.append(("GP 512x512, C=1 / `np.sort` of its edge weights", t_gp1, t_sort, r_sort, "<= 3"))
    rows.append(("GP 512x512, C=1 / `np.argsort` of its edge weights", t_gp1, t_argsort, r_argsort, "(context)"))
    rows.append(("GP 512x512, C=21 / C=1", t_gp21, t_gp1, r_21, "<= 2"))

    batch = natural_image((256, 256)).repeat(8, 1, 1, 1) + 0.01 * torch.randn(8, 3, 256, 256)
    vb = torch.rand(8, 1, 256, 256)
    t_one, t_two, r_threads = paired(
        lambda: apro.global_propagation(vb, batch, 0.1, num_workers=1),
        lambda: apro.global_propagation(vb, batch, 0.1, num_workers=2),
        args.repeats,
    )
    rows.append(("GP 8x256x256 throughput, 2 threads / 1 thread", t_one, t_two, r_threads, ">= 1.6"))

    lp_img = natural_image((200, 336)).repeat(8, 1, 1, 1) + 0.05 * torch.randn(8, 3, 200, 336)
    lp_val = torch.rand(8, 1, 200, 336)
    ref = unfold_local_propagation(lp_val, lp_img, 5, 0.15, 20)
    fast = apro.local_propagation(lp_val, lp_img, 5, 0.15, 20)
    lp_err = float((ref - fast).abs().max())
    t_lp, t_ref, r_lp = paired(
        lambda: apro.local_propagation(lp_val, lp_img, 5, 0.15, 20),
        lambda: unfold_local_propagation(lp_val, lp_img, 5, 0.15, 20),
        max(1, args.repeats // 3),
    )
    rows.append((f"LP 8x200x336 k=5 T=20 / unfold reference (max abs diff {lp_err:.1e})", t_lp, t_ref, r_lp, "<= 0.333"))

    table8 = []
    for size in (64, 128):
        img = natural_image((size, size))
        val = torch.rand(1, 1, size, size)
        tree = apro.minimum_spanning_tree(img)
        e, tw = tree.edges[0].numpy(), tree.weights[0].double().numpy()
        pv = val.double().flatten().numpy()
        t_brute = best_time(lambda: _bruteforce_gp(e, tw, size * size, 100.0, pv), 1)
        t_fast = best_time(lambda: apro.global_propagation(val, img, 0.1), args.repeats)
        err = float(np.abs(_bruteforce_gp(e, tw, size * size, 100.0, pv) - apro.global_propagation(val, img, 0.1).double().flatten().numpy()).max())
        table8.append((size, t_brute, t_fast, err))

    print("| measurement | time (ms) | reference (ms) | ratio | target |")
    print("|---|---:|---:|---:|---|")
    for name, a, b, ratio, target in rows:
        print(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {ratio:.2f} | {target} |")
    print()
    print("Table 8 analogue (one GP call, C=1; brute force = O(N^2) tree walk from every pixel, numba):")
    print()
    print("| size | brute force (ms) | apro (ms) | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for size, tb, tf, err in table8:
        print(f"| {size}x{size} | {tb * 1e3:.1f} | {tf * 1e3:.2f} | {tb / tf:.0f}x | {err:.1e} |")
    if not args.skip_scale:
        print()
        print("Peak extra resident memory of one GP call at 2048x2048 (fresh process):")
        print()
        print("| C | peak extra (MB) | bytes per pixel |")
        print("|---|---:|---:|")
        for c in (1, 4, 16):
            mb = peak_memory_mb(2048, c)
            print(f"| {c} | {mb:.0f} | {mb * 2**20 / (2048 * 2048):.0f} |")
    print()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
