"""Train-step benchmark: XLA FLOPs per step, compile time, XLA memory, step time, examples/s, MFU (on GPU).

    python benchmarks/train_step.py [--rows tiny,tiny_bf16] [--steps 20] [--mesh -1,1,1] [--json FILE]
    python benchmarks/train_step.py --rows fusion_tiny --remat none,full,dots_saveable,dots_with_no_batch_dims_saveable

`--remat` repeats each UNet row once per `train.remat` policy (rows without a UNet have no remat: 'none' only);
the `temp MiB` column is XLA's estimate of the step's temporaries (`compiled.memory_analysis()`: the saved
activations live there), `XLA MiB` adds the arguments and outputs (state + batch).

Each row is a (model, loss, batch spec, train config) in `ROWS`; the UNet / Face Fusion rows are added by
their modules with `register_row`. FLOPs come from XLA's cost analysis of the compiled step: for a sharded
step that is the program ONE device runs (its shard of the work plus any replicated work), so the column is
per device and MFU = per-device FLOPs / step time / per-device peak. On a GPU the peak is the measured bf16
matmul rate of the device (a large square matmul), not a datasheet number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.config import MeshConfig, TrainConfig
from fusion_jax.parallel import make_mesh, shard_batch
from fusion_jax.training import SyntheticBatches, Trainer
from fusion_jax.training.tiny import BATCH_SPEC, make_tiny_model, tiny_loss


@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmark configuration."""

    name: str  # row label
    model_factory: Callable[..., Any]  # rngs -> nnx.Module
    loss_fn: Callable[..., Any]  # (model, batch, rng) -> (loss, aux)
    batch_spec: dict  # name -> per-example shape (float32 synthetic data)
    batch_size: int  # global batch size
    train: TrainConfig  # optimizer / precision settings
    timed: bool = True  # False: FLOPs and compile time only (a step too slow for this machine's CPU)
    remat: str = "none"  # train.remat policy the model factory applies to the UNet blocks
    with_remat: Callable[[str], "Row"] | None = None  # the same row with another train.remat policy (UNet rows)


ROWS: dict[str, Row] = {}


def register_row(row: Row) -> None:
    ROWS[row.name] = row


# rows are float32 unless named _bf16 (pinned: train.compute_dtype's default 'auto' is bfloat16 on an accelerator)
_TINY_TRAIN = TrainConfig(steps=1000, lr=1e-3, warmup_steps=10, ema_decay=0.999, compute_dtype="float32")
register_row(Row("tiny", make_tiny_model, tiny_loss, BATCH_SPEC, 64, _TINY_TRAIN))
register_row(Row("tiny_bf16", make_tiny_model, tiny_loss, BATCH_SPEC, 64, dataclasses.replace(_TINY_TRAIN, compute_dtype="bfloat16")))
register_row(Row("tiny_accum4", make_tiny_model, tiny_loss, BATCH_SPEC, 64, dataclasses.replace(_TINY_TRAIN, grad_accum=4)))


def face_fusion_row(name: str, preset: str, resolution: int, reference_size: int, batch_size: int,
                    train: TrainConfig, *, num_references: int = 1, timed: bool = True) -> Row:
    """A Face Fusion train step on an inline UNet preset (`fusion_jax.experiment.UNET_PRESETS`) with pre-encoded
    synthetic inputs (VAE moments of `resolution` px targets / `reference_size` px references, text embeddings):
    the reference pass through the shared UNet, the generated pass, and the backward of both."""
    from fusion_jax.config import ExperimentConfig, load_config
    from fusion_jax.experiment import PRESET_VAE_FACTOR, UNET_PRESETS, build_experiment

    config = load_config(None, [f"model.unet_preset={preset}", "model.latents=preencoded", "data.source=synthetic",
                                "objective.name=face_fusion", f"data.pipeline.resolution={resolution}",
                                f"data.pipeline.reference_size={reference_size}",
                                f"data.pipeline.num_references={num_references}"])
    config = dataclasses.replace(config, train=train)
    assert isinstance(config, ExperimentConfig)
    exp = build_experiment(config)  # its model factory applies config.train.remat to the UNet blocks
    unet = UNET_PRESETS[preset]()
    h, hr, c = resolution // PRESET_VAE_FACTOR, reference_size // PRESET_VAE_FACTOR, unet.in_channels
    spec = {"latent_mean": (h, h, c), "latent_logvar": (h, h, c), "reference_latent_mean": (num_references, hr, hr, c),
            "reference_latent_logvar": (num_references, hr, hr, c),
            "text_embedding": (config.model.text_length, unet.cross_attention_dims()[0])}

    def with_remat(policy: str) -> Row:
        return face_fusion_row(name, preset, resolution, reference_size, batch_size,
                               dataclasses.replace(train, remat=policy), num_references=num_references, timed=timed)

    return Row(name, exp.model_factory, exp.loss_fn, spec, batch_size, train, timed, train.remat, with_remat)


_FUSION_TRAIN = TrainConfig(steps=1000, lr=1e-4, warmup_steps=10, trainable="to_[kv]_ref",  # 'identity' mode
                            compute_dtype="float32")
register_row(face_fusion_row("fusion_tiny", "tiny", 128, 128, 8, _FUSION_TRAIN))  # 16x16 latents
register_row(face_fusion_row("fusion_mid", "mid", 256, 128, 4, _FUSION_TRAIN))  # 32x32 latents, ~10M params
# Headline: SD1.5-size UNet, 512x512 targets (64x64 latents), one 224 px reference (28x28 latents), bf16 compute
# with fp32 master weights, the whole UNet trained (+ identity projections). Not timed on a CPU.
register_row(face_fusion_row(
    "sd15_fusion_bf16", "sd15", 512, 224, 1,
    dataclasses.replace(_FUSION_TRAIN, trainable="all", compute_dtype="bfloat16", mu_dtype="bfloat16"),
    timed=jax.default_backend() != "cpu"))


def matmul_peak_flops(n: int = 8192, dtype=jnp.bfloat16, reps: int = 10) -> float:
    """Measured FLOP/s of an n x n x n matmul on the default device (the MFU denominator)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def bench_row(row: Row, mesh_cfg: MeshConfig, steps: int, peak: float | None) -> dict:
    mesh = make_mesh(mesh_cfg)
    trainer = Trainer(row.model_factory, row.loss_fn, row.train, mesh)
    batch_shapes = {k: jax.ShapeDtypeStruct((row.batch_size,) + tuple(s), jnp.float32) for k, s in row.batch_spec.items()}
    t0 = time.perf_counter()
    compiled = trainer.lower(batch_shapes).compile()
    compile_s = time.perf_counter() - t0
    flops = _flops(compiled)
    if row.train.grad_accum > 1:
        # XLA's cost analysis counts a while-loop (scan) body once, not per trip: take the FLOPs of the
        # equivalent grad_accum=1 step on the same global batch (identical math, same update).
        single = Trainer(row.model_factory, row.loss_fn, dataclasses.replace(row.train, grad_accum=1), mesh)
        flops = _flops(single.lower(batch_shapes).compile())
    memory = compiled.memory_analysis()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params))
    n_params += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.frozen))
    result = {
        "row": row.name,
        "remat": row.remat,
        "mesh": "x".join(str(v) for v in mesh.devices.shape),
        "params": n_params,
        "batch": row.batch_size,
        "gflops_per_step_per_device": flops / 1e9,
        "compile_s": compile_s,
        "temp_mib": memory.temp_size_in_bytes / 2**20 if memory is not None else None,
        "xla_mib": (memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes) / 2**20
        if memory is not None else None,
        "step_ms": None,
        "examples_per_s": None,
        "mfu": None,
    }
    if not row.timed:
        return result

    state = trainer.init()
    batches = SyntheticBatches(row.batch_spec, row.batch_size, seed=0)
    device_batches = [shard_batch(next(batches), mesh) for _ in range(4)]
    for i in range(3):  # warm-up
        state, metrics = compiled(state, device_batches[i % 4])
    jax.block_until_ready(metrics)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, device_batches[i % 4])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    result.update(step_ms=step_s * 1e3, examples_per_s=row.batch_size / step_s,
                  mfu=(flops / step_s) / peak if peak else None)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows from {list(ROWS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row (median reported)")
    parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes (one may be -1)")
    parser.add_argument("--remat", default="none",
                        help="comma-separated train.remat policies: each UNet row once per policy")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    from fusion_jax.models.remat import REMAT_POLICIES

    policies = args.remat.split(",")
    for policy in policies:
        if policy not in REMAT_POLICIES:
            parser.error(f"--remat {policy!r}: expected names from {list(REMAT_POLICIES)}")
    mesh_cfg = MeshConfig(*(int(v) for v in args.mesh.split(",")))
    backend = jax.default_backend()
    peak = matmul_peak_flops() if backend == "gpu" else None
    rows = []
    for name in args.rows.split(","):
        row = ROWS[name]
        if row.with_remat is None:
            rows.append(row)
        else:
            rows += [row if policy == row.remat else row.with_remat(policy) for policy in policies]
    results = [bench_row(row, mesh_cfg, args.steps, peak) for row in rows]

    device = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({backend})"
    print(f"# train step, {device}" + (f", measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s/device" if peak else ""))
    if peak is None:
        print(f"# MFU not measurable: no GPU ({backend} backend); rows marked 'not timed' report FLOPs and compile only")
    header = (f"{'row':<18}{'remat':<34}{'mesh':>8}{'params':>10}{'batch':>7}{'GFLOP/dev':>12}{'compile s':>11}"
              f"{'temp MiB':>10}{'XLA MiB':>10}{'step ms':>10}{'ex/s':>10}{'MFU':>7}")
    print(header)
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        timing = (f"{r['step_ms']:>10.2f}{r['examples_per_s']:>10.1f}" if r["step_ms"] is not None
                  else f"{'not timed':>20}")
        mem = "".join(f"{v:>10.1f}" if v is not None else f"{'-':>10}" for v in (r["temp_mib"], r["xla_mib"]))
        print(
            f"{r['row']:<18}{r['remat']:<34}{r['mesh']:>8}{r['params']:>10}{r['batch']:>7}"
            f"{r['gflops_per_step_per_device']:>12.4f}{r['compile_s']:>11.2f}{mem}{timing}{mfu:>7}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "peak_flops": peak, "rows": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
