"""UNet forward: XLA FLOPs, compile time, our forward vs diffusers' PyTorch UNet (same weights, same machine).

    python benchmarks/unet.py                       # tiny and mid configs (seconds on a CPU)
    python benchmarks/unet.py --configs tiny,mid,sd15 --repeats 3 --json out/unet.json

Both models get identical random weights (diffusers' initialisation, copied into ours with the checkpoint
converter). Times are medians over `--repeats` calls after one warm-up; the ratio is ours / PyTorch measured side
by side in one run. Peak memory: XLA's buffer estimate for our call, and this process's peak RSS after each model
ran (monotonic, so read it as an upper bound for whichever ran later).
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


def benchmark(name: str, batch: int, repeats: int) -> dict:
    import torch
    from flax import nnx

    torch_unet, ours, config = build_pair(name)
    size = config.sample_size
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((batch, size, size, config.in_channels)).astype(np.float32)
    context = rng.standard_normal((batch, TEXT_TOKENS, CONFIGS[name]["cross_attention_dim"])).astype(np.float32)
    t = np.full((batch,), 500, np.int32)

    graphdef, state = nnx.split(ours)

    @jax.jit
    def forward(state, sample, t, context):
        return nnx.merge(graphdef, state)(sample, t, context)

    args = (state, jnp.asarray(sample), jnp.asarray(t), jnp.asarray(context))
    compile_s, compiled = common.compile_seconds(forward, *args)
    flops = common.xla_flops(forward, *args)
    ours_s = common.median_seconds(lambda: compiled(*args).block_until_ready(), repeats)
    rss_after_ours = common.peak_rss_mib()

    torch.set_num_threads(os.cpu_count() or 1)
    ts, tt, tc = torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(context)
    with torch.no_grad():
        torch_s = common.median_seconds(lambda: torch_unet(ts, tt, tc).sample, repeats)
        reference = torch_unet(ts, tt, tc).sample.numpy().transpose(0, 2, 3, 1)
    ours_out = np.asarray(compiled(*args))
    rel_err = float(np.linalg.norm(ours_out - reference) / np.linalg.norm(reference))
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))
    return {
        "config": name, "params_M": params / 1e6, "latent": f"{batch}x{size}x{size}",
        "gflops_per_forward": flops / 1e9, "compile_s": compile_s, "ours_s": ours_s, "torch_s": torch_s,
        "ours_over_torch": ours_s / torch_s, "xla_mem_mib": common.xla_memory_mib(compiled),
        "peak_rss_after_ours_mib": rss_after_ours, "peak_rss_after_torch_mib": common.peak_rss_mib(),
        "rel_l2_vs_torch": rel_err,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,mid", help=f"comma-separated from {sorted(CONFIGS)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    rows = [benchmark(n, args.batch, args.repeats) for n in names]
    common.print_table(rows, ["config", "params_M", "latent", "gflops_per_forward", "compile_s", "ours_s",
                              "torch_s", "ours_over_torch", "xla_mem_mib", "peak_rss_after_torch_mib",
                              "rel_l2_vs_torch"])
    print(f"device: {common.device_description()}")
    common.write_json(args.json, {"device": common.device_description(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
