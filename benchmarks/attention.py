"""CPU attention forward + backward: our kernel (hand-written backward) vs autodiff through the same blocked
forward vs PyTorch's scaled_dot_product_attention, alternating call by call.

    python benchmarks/attention.py [--repeats 15] [--threads 2] [--json FILE]

Shapes are those of the `mid` and SD1.5-size UNets' attention layers (8 heads; self-attention at 1024 and 256
tokens, cross-attention to 77 text tokens) at batch 1 and 2. Each call computes the three gradients of
sum(attention(q, k, v) * g). The table gives the median of the per-round ratios (ours / autodiff, ours /
PyTorch) with their min and max; quote ratios, not the absolute milliseconds (2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import device_description, print_table, write_json  # noqa: E402
from fusion_jax.models import blocked_attention as kernel  # noqa: E402
from fusion_jax.precision import CPU_QUERY_BLOCK  # noqa: E402

# (batch, query tokens, key tokens, heads, head dim)
SHAPES = ((1, 1024, 1024, 8, 16), (2, 1024, 1024, 8, 16), (1, 1024, 77, 8, 16), (2, 256, 256, 8, 32),
          (2, 256, 77, 8, 32))


def calls(shape, block: int):
    import torch

    b, lq, lk, h, d = shape
    rng = np.random.default_rng(0)
    q, g = (jnp.asarray(rng.standard_normal((b, lq, h, d)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, lk, h, d)), jnp.float32) for _ in range(2))

    def grads_of(fn):
        step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, block) * g), argnums=(0, 1, 2)))
        return lambda: jax.block_until_ready(step(q, k, v))

    tq, tk, tv = (torch.tensor(np.asarray(x)).permute(0, 2, 1, 3).contiguous().requires_grad_() for x in (q, k, v))
    tg = torch.tensor(np.asarray(g)).permute(0, 2, 1, 3).contiguous()

    def torch_grads():
        return torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(tq, tk, tv), (tq, tk, tv), tg)

    ours, autodiff = grads_of(kernel.blocked_attention), grads_of(kernel._primal)
    diff = max(float(jnp.max(jnp.abs(a - c)) / jnp.max(jnp.abs(c))) for a, c in zip(ours(), autodiff()))
    return {"ours": ours, "autodiff": autodiff, "torch": torch_grads}, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for shape in SHAPES:
        fns, diff = calls(shape, CPU_QUERY_BLOCK)
        for fn in fns.values():
            fn()
            fn()
        times = {n: [] for n in fns}
        for _ in range(args.repeats):
            for n, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[n].append(time.perf_counter() - start)
        row = {"shape (B, Lq, Lk, H, D)": "x".join(map(str, shape)), "max_rel_diff_vs_autodiff": diff}
        for n in fns:
            row[f"{n}_ms"] = statistics.median(times[n]) * 1e3
        for other in ("autodiff", "torch"):
            ratios = [a / c for a, c in zip(times["ours"], times[other])]
            row[f"ours/{other}"] = statistics.median(ratios)
            row[f"ours/{other} min-max"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
        rows.append(row)
    columns = list(rows[0])
    print_table(rows, columns)
    print(f"block {CPU_QUERY_BLOCK} queries; {args.repeats} alternating rounds; torch threads {args.threads}; "
          f"device: {device_description()}")
    write_json(args.json, {"rows": rows, "repeats": args.repeats, "threads": args.threads, "block": CPU_QUERY_BLOCK,
                           "device": device_description()})


if __name__ == "__main__":
    main()
