"""The miniature's training step (UNet forward + backward + Adam) per UNet layout, measured alternating.

    python benchmarks/miniature_step.py [--batch 16] [--repeats 8] [--json FILE]

Why: the quickstart's base model is bounded by CPU time, so its layout was chosen by this table. Rows: the old
32x32 RGB pixel UNet (16/32/64 and 32/64/64 channels) and pixels folded 2x2 into 12 channels (16x16 positions,
`fusion_jax/models/pixels.py`) at several widths. Every row's step is compiled first; then the rows are called
round-robin `--repeats` times, so each ratio (row / first row, per round) compares calls made moments apart;
the table gives the median ms per step and the median, min and max of the per-round ratio. Random inputs (the cost does not depend on the data).
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
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import print_table, write_json  # noqa: E402
from fusion_jax.miniature import MiniatureModelConfig, miniature_unet_config  # noqa: E402
from fusion_jax.models.unet import UNet2DConditionModel  # noqa: E402

# name -> (pixel fold, widths)
LAYOUTS = {
    "rgb32_16-32-64": (1, (16, 32, 64)),
    "rgb32_32-64-64": (1, (32, 64, 64)),
    "fold2_32-64-128": (2, (32, 64, 128)),
    "fold2_48-96-96": (2, (48, 96, 96)),
    "fold2_64-128-128": (2, (64, 128, 128)),
}


def build_step(fold: int, widths, batch: int):
    cfg = MiniatureModelConfig(pixel_fold=fold, widths=tuple(widths))
    unet_cfg = miniature_unet_config(cfg)
    model = UNet2DConditionModel(unet_cfg, rngs=nnx.Rngs(0))
    params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    side, ch = unet_cfg.sample_size, unet_cfg.in_channels
    x = jax.random.normal(jax.random.key(0), (batch, side, side, ch))
    t = jnp.full((batch,), 500)
    text = jax.random.normal(jax.random.key(1), (batch, 32, cfg.text_width))

    @nnx.jit
    def step(model, optimizer, x):
        def loss_fn(m):
            return jnp.mean((m(x, t, text) - x) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    def call():
        step(model, optimizer, x).block_until_ready()

    return call, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names of LAYOUTS")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        parser.error(f"--layouts: unknown {unknown}; known: {list(LAYOUTS)}")
    calls, rows = {}, []
    for name in names:
        fold, widths = LAYOUTS[name]
        call, params = build_step(fold, widths, args.batch)
        start = time.perf_counter()
        call()  # compile + first step
        rows.append({"layout": name, "fold": fold, "widths": "/".join(map(str, widths)), "params_M": params / 1e6,
                     "compile_s": time.perf_counter() - start})
        calls[name] = call
    times = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    first = names[0]
    for row in rows:
        ratios = [a / b for a, b in zip(times[row["layout"]], times[first])]
        row.update({"ms_per_step": 1000 * statistics.median(times[row["layout"]]),
                    "examples_per_s": args.batch / statistics.median(times[row["layout"]]),
                    f"ratio_vs_{first}": statistics.median(ratios), "ratio_min": min(ratios),
                    "ratio_max": max(ratios)})
    print(f"batch {args.batch}, {args.repeats} alternating rounds, {jax.devices()[0].platform}")
    print_table(rows, list(rows[0]))
    if args.json:
        write_json(args.json, {"batch": args.batch, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
