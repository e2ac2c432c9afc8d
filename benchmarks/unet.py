"""UNet forward and train step: ours (jitted NNX UNet) vs diffusers' PyTorch UNet, same weights, same machine.

    python benchmarks/unet.py                       # tiny and mid configs, forward + train step
    python benchmarks/unet.py --configs tiny,mid,sd15 --repeats 5 --no-train --json out/unet.json

Both models get identical random weights (diffusers' initialisation, copied into ours with the checkpoint
converter). The two sides ALTERNATE call by call (ours, PyTorch, ours, PyTorch, ...) after one warm-up each, so
load from other processes on a shared machine hits both alike; each pair gives a ratio ours / PyTorch and the
table reports the median of those per-pair ratios with their min and max (quote ratios, not absolute times).
Train step: forward + MSE loss + backward + AdamW update, ours one jitted step (params and optimizer state
donated), PyTorch's eager loop (`zero_grad`, forward, `backward`, `AdamW.step`). Both use `--threads` CPU
threads (PyTorch: `torch.set_num_threads`; ours: the process's XLA:CPU thread pool, sized by the cores it
sees). Peak memory: XLA's buffer estimate for our forward call.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

CONFIGS = {
    "tiny": dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=8, sample_size=16,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
    "mid": dict(block_out_channels=[128, 256, 512], layers_per_block=2, cross_attention_dim=512,
                attention_head_dim=8, norm_num_groups=32, sample_size=32,
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
    # Stable Diffusion 1.5 (unet/config.json of the public checkpoint), 512x512 images = 64x64 latents.
    "sd15": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32, sample_size=64,
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
}
TEXT_TOKENS = 77


def build_pair(name: str):
    """A diffusers UNet with random weights and ours with the same weights."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from flax import nnx

    from fusion_jax import weights
    from fusion_jax.models.unet import UNet2DConditionModel, UNetConfig

    torch.manual_seed(0)
    torch_unet = TorchUNet(**CONFIGS[name]).eval()
    tensors = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
    config = UNetConfig.from_dict(dict(torch_unet.config))
    ours = weights.build_from_tensors(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)), tensors,
                                      source=f"diffusers random {name}")
    return torch_unet, ours, config


def alternate(ours, theirs, repeats: int) -> dict:
    """Times `ours()` and `theirs()` (each must block until done) alternately; per-pair ratio statistics."""
    import statistics
    import time

    ours(), theirs()  # warm-up (compile / allocator)
    pairs = []
    for _ in range(repeats):
        start = time.perf_counter()
        ours()
        mid = time.perf_counter()
        theirs()
        pairs.append((mid - start, time.perf_counter() - mid))
    ratios = [a / b for a, b in pairs]
    return {"ours_s": statistics.median(a for a, _ in pairs), "torch_s": statistics.median(b for _, b in pairs),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def benchmark(name: str, batch: int, repeats: int, train: bool, parts: bool = False) -> list[dict]:
    import torch
    from flax import nnx

    torch_unet, ours, config = build_pair(name)
    size = config.sample_size
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((batch, size, size, config.in_channels)).astype(np.float32)
    context = rng.standard_normal((batch, TEXT_TOKENS, CONFIGS[name]["cross_attention_dim"])).astype(np.float32)
    target = rng.standard_normal((batch, size, size, config.out_channels)).astype(np.float32)
    t = np.full((batch,), 500, np.int32)

    graphdef, state = nnx.split(ours)

    @jax.jit
    def forward(state, sample, t, context):
        return nnx.merge(graphdef, state)(sample, t, context)

    args = (state, jnp.asarray(sample), jnp.asarray(t), jnp.asarray(context))
    compile_s, compiled = common.compile_seconds(forward, *args)
    flops = common.xla_flops(forward, *args)
    ts, tt, tc = torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(context)
    with torch.no_grad():
        reference = torch_unet(ts, tt, tc).sample.numpy().transpose(0, 2, 3, 1)
        timing = alternate(lambda: compiled(*args).block_until_ready(), lambda: torch_unet(ts, tt, tc).sample,
                           repeats)
    ours_out = np.asarray(compiled(*args))
    rel_err = float(np.linalg.norm(ours_out - reference) / np.linalg.norm(reference))
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))
    base = {"config": name, "params_M": params / 1e6, "latent": f"{batch}x{size}x{size}"}
    rows = [{**base, "what": "forward", "gflops": flops / 1e9, "compile_s": compile_s, **timing,
             "xla_mem_mib": common.xla_memory_mib(compiled), "rel_l2_vs_torch": rel_err}]
    if train:
        if parts:  # before the whole step, whose donation deletes the module's own parameter buffers
            parts_rows = [{**base, **row} for row in train_step_parts(torch_unet, ours, sample, t, context, target,
                                                                      repeats)]
        rows.append({**base, "what": "train step", **train_step_pair(torch_unet, ours, sample, t, context, target,
                                                                      repeats)})
        rows += parts_rows if parts else []
    return rows


def train_step(graphdef, rest):
    """(jitted step, jitted optimizer init) of forward + MSE + backward + AdamW(lr 1e-4) on the UNet's params:
    `step(params, opt_state, sample, t, context, target) -> (params, opt_state, loss)`, params and state donated."""
    import optax
    from flax import nnx

    tx = optax.adamw(1e-4)

    def step(params, opt_state, sample, t, context, target):
        def loss_fn(p):
            pred = nnx.merge(graphdef, p, rest)(sample, t, context)
            return jnp.mean((pred - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), jax.jit(tx.init)


def train_step_pair(torch_unet, ours, sample, t, context, target, repeats: int) -> dict:
    """Forward + MSE + backward + AdamW(lr 1e-4): our jitted step vs PyTorch's eager loop, alternated."""
    import torch
    from flax import nnx

    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
    jx = tuple(jnp.asarray(a) for a in (sample, t, context, target))
    jitted, init = train_step(graphdef, rest)
    opt_state = init(params)
    compile_s, compiled = common.compile_seconds(jitted, params, opt_state, *jx)
    flops = common.xla_flops(jitted, params, opt_state, *jx)
    carry = {"params": params, "opt": opt_state}

    def ours_step():
        carry["params"], carry["opt"], loss = compiled(carry["params"], carry["opt"], *jx)
        loss.block_until_ready()

    torch_unet.train()
    optimizer = torch.optim.AdamW(torch_unet.parameters(), lr=1e-4)
    ts, tt, tc = torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(context)
    ttarget = torch.from_numpy(target.transpose(0, 3, 1, 2))

    def torch_step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(torch_unet(ts, tt, tc).sample, ttarget)
        loss.backward()
        optimizer.step()

    timing = alternate(ours_step, torch_step, repeats)
    return {"gflops": flops / 1e9, "compile_s": compile_s, **timing, "xla_mem_mib": common.xla_memory_mib(compiled)}


def train_step_parts(torch_unet, ours, sample, t, context, target, repeats: int) -> list[dict]:
    """The train step in two parts, each alternated against PyTorch's: forward + MSE + backward (gradients only),
    and the AdamW(lr 1e-4) update alone on gradients of that shape (ours jitted and donated; PyTorch's default)."""
    import optax
    import torch
    from flax import nnx

    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
    jx = tuple(jnp.asarray(a) for a in (sample, t, context, target))

    def loss_fn(p, sample, t, context, target):
        return jnp.mean((nnx.merge(graphdef, p, rest)(sample, t, context) - target) ** 2)

    grad_fn = jax.jit(jax.grad(loss_fn))
    grads = grad_fn(params, *jx)
    tx = optax.adamw(1e-4)

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    apply = jax.jit(update, donate_argnums=(0, 1))
    carry = {"params": jax.tree.map(jnp.copy, params), "opt": jax.jit(tx.init)(params)}  # donated: a copy

    def ours_update():
        carry["params"], carry["opt"] = apply(carry["params"], carry["opt"], grads)
        jax.block_until_ready(carry["params"])

    torch_unet.train()
    optimizer = torch.optim.AdamW(torch_unet.parameters(), lr=1e-4)
    ts, tt, tc = torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(context)
    ttarget = torch.from_numpy(target.transpose(0, 3, 1, 2))

    def torch_gradients():
        optimizer.zero_grad(set_to_none=False)  # keeps the .grad buffers the update below reads
        torch.nn.functional.mse_loss(torch_unet(ts, tt, tc).sample, ttarget).backward()

    torch_gradients()
    return [{"what": "forward+backward", **alternate(lambda: jax.block_until_ready(grad_fn(params, *jx)),
                                                     torch_gradients, repeats)},
            {"what": "AdamW update", **alternate(ours_update, optimizer.step, repeats)}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,mid", help=f"comma-separated from {sorted(CONFIGS)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="alternating (ours, PyTorch) pairs per row")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch CPU threads")
    p.add_argument("--no-train", action="store_true", help="forward only (no train-step rows)")
    p.add_argument("--parts", action="store_true",
                   help="also the train step's parts: forward+backward, and the AdamW update alone")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    import torch

    torch.set_num_threads(args.threads)
    rows = [row for n in names for row in benchmark(n, args.batch, args.repeats, not args.no_train, args.parts)]
    common.print_table(rows, ["config", "what", "params_M", "latent", "gflops", "compile_s", "ours_s", "torch_s",
                              "ratio_median", "ratio_min", "ratio_max", "xla_mem_mib", "rel_l2_vs_torch"])
    print(f"ratio = ours / PyTorch per alternating pair ({args.repeats} pairs); torch threads {args.threads}")
    print(f"device: {common.device_description()}")
    common.write_json(args.json, {"device": common.device_description(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
