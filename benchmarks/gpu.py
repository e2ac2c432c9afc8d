"""Accelerator benchmark: text-to-image, identity methods and training on whatever device JAX sees.

    python benchmarks/gpu.py                                  # GPU / TPU: --size sd15; CPU: --size tiny
    python benchmarks/gpu.py --size sd15 --json out/gpu_sd15.json
    python benchmarks/gpu.py --size sd15 --sections train --remat none,full --json out/gpu_train.json
    python benchmarks/gpu.py --size tiny --steps 1 --repeats 1 --train-steps 1    # CPU smoke run (the test's)

On a GPU machine (one H100 / H200, jax with the CUDA plugin; no downloads, random weights), the whole run is

    python benchmarks/gpu.py --size sd15 --json out/gpu_sd15.json

and, where it has to fit a time limit, one section per call: `--sections t2i,identity`, then `--sections train`
(8 train-step compiles at SD1.5 size: face_fusion and flashface x 4 remat policies), then `--sections torch`.
NO GPU FIGURES EXIST YET: the task that wrote this benchmark had no accelerator; it was run on CPU at
`--size tiny` only (tests/test_gpu_benchmark.py), where its numbers mean nothing about a GPU.

Sizes: `sd15` = the SD1.5 UNet (320-640-1280-1280), SD VAE and CLIP ViT-L/14 text tower at 512 px (64x64 latents),
references 256 px; `tiny` = the project's tiny pipeline shapes (32 px). Weights are random (host NumPy, N(0, 0.02)
per tensor: timing does not depend on their values) in the compute dtype `--dtype` (default auto =
`fusion_jax.precision`: bfloat16 on GPU / TPU, float32 on CPU; attention kernel auto = cuDNN flash attention on
a CUDA GPU where it applies). Prompts are token ids (no tokenizer needed). Every figure is a median of `--repeats`
timed calls after a warm-up call, each blocking on its result.

Sections and figures (the JSON has the same, `--json FILE`):
  t2i       ms per CFG step at batch 1: one guided step (both CFG rows in one UNet call + the sampler update,
            `sampling.denoise_step_fn`, the sampler's own loop body) compiled and timed alone; images/s at batch
            `--large-batch` (16): whole generations (text encoder, `--steps` DDIM steps, VAE decode) through
            `sampling.compile_generate`, the ahead-of-time compiled sampler (`from_cache`: the persistent
            compilation cache had it).
  identity  seconds per image (batch 1, `--references` reference crops of one person, disentangled guidance =
            3 UNet predictions per step) through the same compiled sampler, for face_fusion, flashface (its
            ReferenceNet at every step, as released) and the token methods ip_adapter_faceid, single_token,
            facestudio (built as in benchmarks/fusion.py).
  train     step ms, examples/s, XLA FLOPs per step (cost analysis of the compiled step) and MFU = FLOPs / step
            time / the device's peak (table `PEAK_FLOPS` by device_kind: dense bf16, and TF32 for float32,
            which XLA's default matmul precision uses on these GPUs; 'n/a' on CPU or an unknown device) for
            face_fusion and flashface on the inline UNet preset of the size (pre-encoded synthetic batches,
            `--train-batch`, all UNet parameters trained, AdamW, fp32 master weights), once per `--remat` policy.
  memory    the device's peak bytes in use after each row (`device.memory_stats()`: a high-water mark over the
            whole process, so it grows row by row; 'n/a' where the backend has no memory stats, e.g. CPU) and
            XLA's estimate for each compiled program (arguments + outputs + temporaries).
  torch     when torch sees a CUDA device and diffusers is importable: the same text-to-image shapes under
            diffusers' UNet / VAE + transformers' CLIP text model, `torch.compile`d UNet, same dtype, DDIM; ratio
            = ours / theirs (time: < 1 means ours is faster). Otherwise the reason it is skipped is printed.
            `--torch cpu` runs that path on the CPU (eager unless `--torch-compile`), to check it works.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import fusion as fusion_bench  # noqa: E402

TEXT_TOKENS = 77
IDENTITY_METHODS = ("face_fusion", "flashface", "ip_adapter_faceid", "single_token", "facestudio")
TRAIN_METHODS = ("face_fusion", "flashface")
SECTIONS = ("t2i", "identity", "train", "torch")
# Dense peak FLOP/s per chip (vendor datasheets, no sparsity), keyed by a substring of `device.device_kind`, first
# match wins. 'float32': the TF32 tensor-core rate, which float32 dots run at under XLA's default matmul precision
# on these GPUs; None on TPUs (float32 dots there are bf16 passes, how many depends on the precision setting).
PEAK_FLOPS: tuple[tuple[str, dict[str, float | None]], ...] = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989.4e12, "float32": 494.7e12}),  # SXM
    ("H200", {"bfloat16": 989.4e12, "float32": 494.7e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": None}),  # v5e reports itself as 'TPU v5 lite'
    ("TPU v5e", {"bfloat16": 197e12, "float32": None}),
    ("TPU v5p", {"bfloat16": 459e12, "float32": None}),
    ("TPU v5", {"bfloat16": 459e12, "float32": None}),
    ("TPU v4", {"bfloat16": 275e12, "float32": None}),
)
SIZE_DEFAULTS = {  # defaults of --steps, --repeats, --train-batch, --train-steps per --size
    "sd15": dict(steps=30, repeats=3, train_batch=4, train_steps=5),
    "tiny": dict(steps=4, repeats=3, train_batch=2, train_steps=3),
}
UNET_PRESET = {"sd15": "sd15", "tiny": "tiny"}  # fusion_jax.experiment.UNET_PRESETS entry of each size
TRAIN_PIXELS = {"sd15": (512, 256), "tiny": (128, 64)}  # target / reference side (presets: latents = pixels / 8)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The table's peak for this device and compute dtype, or None (CPU, unknown device, no figure)."""
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def device_peak_mib() -> float | None:
    """Peak device bytes in use so far (process-wide high-water mark), or None where jax has no memory stats."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------------------
# models with random weights
# ----------------------------------------------------------------------------------------------------------------


class IdsTokenizer:
    """Stands in for a tokenizer: every prompt is `TEXT_TOKENS` ids 0 (the benchmark times shapes, not words)."""

    max_length = TEXT_TOKENS

    def __call__(self, prompts):
        return np.zeros((len(prompts), TEXT_TOKENS), np.int32)


class RandomWeights:
    """N(0, 0.02) host arrays per (parameter path, shape), drawn once and reused by every model that has them."""

    def __init__(self, dtype):
        self.dtype = dtype
        self._cache: dict[tuple, jax.Array] = {}

    def fill(self, abstract_state):
        def leaf(path, x):
            name = jax.tree_util.keystr(path)
            key = (name, tuple(x.shape), str(x.dtype))
            if key not in self._cache:
                if jnp.issubdtype(x.dtype, jnp.floating):
                    rng = np.random.default_rng(zlib.crc32(name.encode()))
                    value = (rng.standard_normal(x.shape, np.float32) * 0.02).astype(x.dtype)
                else:
                    value = np.zeros(x.shape, x.dtype)
                self._cache[key] = jnp.asarray(value)
            return self._cache[key]

        return jax.tree_util.tree_map_with_path(leaf, abstract_state)


@functools.lru_cache(maxsize=4)
def _abstract_base(size: str, dtype_name: str) -> tuple:
    """Shape-only (UNet, VAE, text encoder) of the size, in the compute dtype (traced once: it takes seconds)."""
    from fusion_jax.models.clip import CLIPTextModel
    from fusion_jax.models.unet import UNet2DConditionModel
    from fusion_jax.models.vae import AutoencoderKL

    unet_cfg, vae_cfg, text_cfg = fusion_bench.SIZES[size][0]()
    kw = dict(dtype=jnp.dtype(dtype_name), param_dtype=jnp.dtype(dtype_name))  # as `generate --dtype` loads

    def build():
        rngs = nnx.Rngs(0)
        return (UNet2DConditionModel(unet_cfg, rngs=rngs, **kw), AutoencoderKL(vae_cfg, rngs=rngs, **kw),
                CLIPTextModel(text_cfg, rngs=rngs, **kw))

    return nnx.eval_shape(build)


def build_pipeline(size: str, identity_cfg, dtype, random_weights: RandomWeights):
    """A `weights.Pipeline` of the size's UNet (with `identity_cfg`'s method attached), VAE and text encoder, weights
    in the compute dtype (what `generate --dtype` loads)."""
    from fusion_jax import schedulers
    from fusion_jax.identity import base as identity_base
    from fusion_jax.weights import Pipeline

    unet, vae, text = _abstract_base(size, jnp.dtype(dtype).name)
    if identity_cfg is not None:
        method = identity_base.for_config(identity_cfg)
        unet = nnx.eval_shape(lambda u: method.attach(u, identity_cfg, rngs=nnx.Rngs(0)), nnx.clone(unet))
    modules = []
    for abstract in (unet, vae, text):
        graphdef, state = nnx.split(abstract)
        modules.append(nnx.merge(graphdef, random_weights.fill(state)))
    return Pipeline(unet=modules[0], vae=modules[1], text_encoder=modules[2], tokenizer=IdsTokenizer(),
                    schedule=schedulers.NoiseSchedule())


def identity_request(size: str, references: int, batch: int = 1) -> dict:
    """`generate`'s reference arguments for one person: zero crops, a centred box, unit face embeddings."""
    _, image, ref = fusion_bench.SIZES[size]
    return {"references": np.zeros((batch, 1, references, ref, ref, 3), np.float32),
            "reference_valid": np.ones((batch, 1, references), bool),
            "boxes": np.tile(np.array([[[image / 4, image / 4, 3 * image / 4, 3 * image / 4]]]), (batch, 1, 1)),
            "face_embeddings": np.ones((batch, 1, references, 512), np.float32) / math.sqrt(512)}


def identity_configs(text_width: int) -> dict:
    from fusion_jax.identity import facestudio, flashface, fusion, ip_adapter_faceid, single_token

    return {"face_fusion": fusion.FusionConfig(),
            "flashface": flashface.FlashFaceConfig(reference_timestep="current"),  # ReferenceNet every step
            "ip_adapter_faceid": ip_adapter_faceid.IPAdapterFaceIDConfig(),
            "single_token": single_token.SingleTokenConfig(),
            # the 'direct' text branch is the pooled text state: its width is the style embedding width here
            "facestudio": facestudio.FaceStudioConfig(style_dim=text_width)}


# ----------------------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------------------


def cfg_step(pipeline, cfg, batch: int, repeats: int) -> dict:
    """One guided text-to-image step at `batch`, compiled and timed alone."""
    from fusion_jax import sampling

    graphdef, state = nnx.split(pipeline.unet)
    sampler = sampling._make_sampler(cfg, pipeline.schedule)
    shape = sampling.latent_shape(pipeline, cfg, batch)
    width = pipeline.unet.config.cross_attention_dims()[0]

    def run(state, x, sampler_state, i, uncond, cond, key):
        unet = nnx.merge(graphdef, state)
        return sampling.denoise_step_fn(unet, sampler, uncond, cond, key, cfg)(i, (x, sampler_state))

    x = jnp.zeros(shape, jnp.float32)
    text = jnp.zeros((batch, TEXT_TOKENS, width), pipeline.unet.dtype)
    args = (state, x, sampler.init_state(x), jnp.int32(0), text, text, jax.random.key(0))
    start = time.perf_counter()
    compiled = jax.jit(run).lower(*args).compile()
    compile_s = time.perf_counter() - start
    seconds = _median_s(lambda: compiled(*args), repeats)
    return {"batch": batch, "compile_s": compile_s, "ms_per_step": seconds * 1e3, "step_gflop": _flops(compiled) / 1e9,
            "xla_mib": common.xla_memory_mib(compiled)}


def generation(pipeline, cfg, batch: int, repeats: int, **request) -> dict:
    """Whole generations at `batch` through the ahead-of-time compiled sampler."""
    from fusion_jax import sampling

    ids = sampling.tokenize(pipeline, [""] * batch)
    gen = sampling.compile_generate(pipeline, ids, cfg=cfg, **request)
    key = jax.random.key(0)
    seconds = _median_s(lambda: gen(ids, key=key, **request), repeats)
    return {"batch": batch, "compile_s": gen.compile_seconds, "from_cache": gen.from_cache,
            "seconds_per_batch": seconds, "seconds_per_image": seconds / batch, "images_per_s": batch / seconds,
            "xla_mib": common.xla_memory_mib(gen.compiled)}


def text_to_image_section(args, dtype, weights: RandomWeights) -> dict:
    from fusion_jax import sampling

    _, image, _ = fusion_bench.SIZES[args.size]
    cfg = sampling.SamplingConfig(num_steps=args.steps, height=image, width=image)
    pipeline = build_pipeline(args.size, None, dtype, weights)
    step = cfg_step(pipeline, cfg, 1, args.repeats)
    step["device_peak_mib"] = device_peak_mib()
    large = generation(pipeline, cfg, args.large_batch, args.repeats)
    large["device_peak_mib"] = device_peak_mib()
    return {"steps": args.steps, "image_size": image, "batch1_step": step, "large_batch": large,
            "ms_per_cfg_step_batch1": step["ms_per_step"], "images_per_s_large_batch": large["images_per_s"]}


def identity_section(args, dtype, weights: RandomWeights) -> list[dict]:
    from fusion_jax import sampling

    _, image, ref = fusion_bench.SIZES[args.size]
    text_width = fusion_bench.SIZES[args.size][0]()[2].hidden_size
    table = identity_configs(text_width)
    rows = []
    for name in args.methods:
        identity_cfg = table[name]
        pipeline = build_pipeline(args.size, identity_cfg, dtype, weights)
        cfg = sampling.SamplingConfig(num_steps=args.steps, height=image, width=image,
                                      reference_guidance="disentangled")
        row = generation(pipeline, cfg, 1, args.repeats, identity_cfg=identity_cfg,
                         **identity_request(args.size, args.references))
        rows.append({"method": name, "references": args.references, "reference_size": ref,
                     "predictions_per_step": 3, **row, "device_peak_mib": device_peak_mib()})
        print(f"  identity {name}: {row['seconds_per_image']:.4g} s/image", flush=True)
    return rows


def train_row(args, method: str, policy: str) -> dict:
    from fusion_jax.config import load_config
    from fusion_jax.experiment import build_experiment
    from fusion_jax.parallel import shard_batch, single_device_mesh
    from fusion_jax.training import Trainer

    image, ref = TRAIN_PIXELS[args.size]
    config = load_config(None, [
        f"model.unet_preset={UNET_PRESET[args.size]}", "model.latents=preencoded", "data.source=synthetic",
        f"objective.name={method}", f"data.pipeline.resolution={image}", f"data.pipeline.reference_size={ref}",
        f"data.pipeline.num_references={args.references}", f"data.batch_size={args.train_batch}",
        f"train.remat={policy}", f"train.compute_dtype={args.dtype}", "train.warmup_steps=1"])
    exp = build_experiment(config)
    mesh = single_device_mesh()
    trainer = Trainer(exp.model_factory, exp.loss_fn, config.train, mesh, trainable=exp.trainable,
                      pretrained=exp.pretrained)
    batches = exp.batch_iterator_factory(config)
    host = [next(batches) for _ in range(2)]
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), host[0])
    start = time.perf_counter()
    compiled = trainer.lower(shapes).compile()
    compile_s = time.perf_counter() - start
    flops = _flops(compiled)
    state = trainer.init()
    device_batches = [shard_batch(b, mesh) for b in host]
    for i in range(2):  # warm-up
        state, metrics = compiled(state, device_batches[i % 2])
    jax.block_until_ready(metrics)
    times = []
    for i in range(args.train_steps):
        t = time.perf_counter()
        state, metrics = compiled(state, device_batches[i % 2])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    from fusion_jax import precision

    dtype = precision.resolve_compute_dtype(args.dtype)
    peak = peak_flops(jax.devices()[0].device_kind, dtype)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params))
    memory = compiled.memory_analysis()
    return {"method": method, "remat": policy, "batch": args.train_batch, "resolution": image, "reference_size": ref,
            "trained_params_M": n_params / 1e6,
            "compile_s": compile_s, "gflop_per_step": flops / 1e9, "step_ms": step_s * 1e3,
            "examples_per_s": args.train_batch / step_s, "mfu": (flops / step_s) / peak if peak else None,
            "temp_mib": memory.temp_size_in_bytes / 2**20 if memory is not None else None,
            "xla_mib": common.xla_memory_mib(compiled), "device_peak_mib": device_peak_mib(),
            "loss": float(metrics["loss"])}


def train_section(args) -> list[dict]:
    rows = []
    for method in args.train_methods:
        for policy in args.remat:
            try:
                row = train_row(args, method, policy)
            except Exception as e:  # noqa: BLE001  (e.g. out of device memory: report it, go on with the rest)
                if not args.keep_going:
                    raise
                row = {"method": method, "remat": policy, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            print(f"  train {method} remat={policy}: " + (f"{row['step_ms']:.4g} ms/step" if "step_ms" in row
                                                          else row["error"]), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# diffusers + torch.compile
# ----------------------------------------------------------------------------------------------------------------


def torch_skip_reason(mode: str) -> str | None:
    """Why the diffusers comparison does not run here (None: it runs)."""
    if mode == "off":
        return "--torch off"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if mode == "auto" and not torch.cuda.is_available():
        return "torch sees no CUDA device (ours vs diffusers is only compared on a GPU; --torch cpu to try the path)"
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"diffusers / transformers not importable ({e})"
    return None


def torch_section(args, dtype_name: str, ours: dict) -> dict:
    """Diffusers' UNet / VAE and transformers' CLIP text model at the same shapes: ms per CFG step at batch 1 and
    images/s at the large batch, timed like ours (median of repeats after warm-up calls)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel

    diffusers_logging.set_verbosity_error()  # its advice on casting random weights with .to() does not apply

    device = "cuda" if args.torch == "auto" else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    unet_cfg, vae_cfg, text_cfg = fusion_bench.SIZES[args.size][0]()
    _, image, _ = fusion_bench.SIZES[args.size]
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_cfg.to_dict()).to(device, dtype).eval()
    vae = AutoencoderKL.from_config(vae_cfg.to_dict()).to(device, dtype).eval()
    text = CLIPTextModel(CLIPTextConfig(**text_cfg.to_dict())).to(device, dtype).eval()
    if args.torch_compile:
        unet = torch.compile(unet)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
    side = image // factor
    guidance = 7.5

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def median(fn, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def guided(latents, t, context):
        x_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps = unet(x_in, t, encoder_hidden_states=context).sample
        uncond, cond = eps.chunk(2)
        return scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample

    def generate(batch: int):
        ids = torch.zeros((batch, TEXT_TOKENS), dtype=torch.long, device=device)
        context = text(ids)[0]
        context = torch.cat([context, context])
        scheduler.set_timesteps(args.steps)
        latents = torch.randn((batch, unet_cfg.in_channels, side, side), device=device, dtype=dtype)
        for t in scheduler.timesteps:
            latents = guided(latents, t, context)
        return vae.decode(latents / vae_cfg.scaling_factor).sample

    with torch.inference_mode():
        scheduler.set_timesteps(args.steps)
        t0 = scheduler.timesteps[0]
        x = torch.zeros((1, unet_cfg.in_channels, side, side), device=device, dtype=dtype)
        ctx = torch.zeros((2, TEXT_TOKENS, unet_cfg.cross_attention_dims()[0]), device=device, dtype=dtype)
        step_s = median(lambda: guided(x, t0, ctx), warmup=3)  # torch.compile compiles in the first calls
        batch_s = median(lambda: generate(args.large_batch), warmup=1)
    out = {"device": device, "torch_compile": bool(args.torch_compile), "dtype": dtype_name,
           "ms_per_cfg_step_batch1": step_s * 1e3, "images_per_s_large_batch": args.large_batch / batch_s}
    if ours:
        out["step_time_ratio_ours_over_torch"] = ours["ms_per_cfg_step_batch1"] / out["ms_per_cfg_step_batch1"]
        out["image_time_ratio_ours_over_torch"] = out["images_per_s_large_batch"] / ours["images_per_s_large_batch"]
    return out


# ----------------------------------------------------------------------------------------------------------------


def _csv(value: str, allowed, flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"{flag}: unknown {bad}; choose from {list(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    from fusion_jax.models.remat import REMAT_POLICIES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default=None, choices=sorted(SIZE_DEFAULTS),
                   help="sd15 (512 px SD1.5 shapes) or tiny; default sd15 on an accelerator, tiny on CPU")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated from {list(SECTIONS)}")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="compute dtype")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per image (sd15: 30, tiny: 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per figure, median (sd15/tiny: 3)")
    p.add_argument("--large-batch", type=int, default=16, help="batch of the images/s figure")
    p.add_argument("--references", type=int, default=1, help="reference crops of the one person")
    p.add_argument("--methods", default=",".join(IDENTITY_METHODS), help="identity rows (comma-separated)")
    p.add_argument("--train-methods", default=",".join(TRAIN_METHODS), help="train rows (comma-separated)")
    p.add_argument("--remat", default=",".join(REMAT_POLICIES), help="train.remat policies, each a train row")
    p.add_argument("--train-batch", type=int, default=None, help="train batch (sd15: 4, tiny: 2)")
    p.add_argument("--train-steps", type=int, default=None, help="timed train steps per row (sd15: 5, tiny: 3)")
    p.add_argument("--keep-going", action="store_true", help="a failing train row (e.g. OOM) is reported, not fatal")
    p.add_argument("--torch", default="auto", choices=["auto", "cpu", "off"],
                   help="diffusers comparison: auto = on a CUDA device only; cpu = run that path on the CPU")
    p.add_argument("--torch-compile", type=int, default=None, help="torch.compile the UNet (default: 1 on CUDA)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    args.size = args.size or ("tiny" if jax.default_backend() == "cpu" else "sd15")
    for name, value in SIZE_DEFAULTS[args.size].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.steps, args.repeats, args.large_batch, args.references, args.train_batch, args.train_steps) < 1:
        raise SystemExit("--steps, --repeats, --large-batch, --references, --train-batch, --train-steps must be >= 1")
    args.sections = _csv(args.sections, SECTIONS, "--sections")
    args.methods = _csv(args.methods, IDENTITY_METHODS, "--methods")
    args.train_methods = _csv(args.train_methods, TRAIN_METHODS, "--train-methods")
    args.remat = _csv(args.remat, REMAT_POLICIES, "--remat")
    if args.torch_compile is None:
        args.torch_compile = int(args.torch == "auto")
    return args


def _fmt(v) -> Any:
    return "n/a" if v is None else v


def main(argv=None) -> int:
    args = parse_args(argv)
    from fusion_jax import precision

    dtype_name = precision.resolve_compute_dtype(args.dtype)
    dtype = jnp.dtype(dtype_name)
    device = jax.devices()[0]
    backend = precision.current_backend()
    peak = peak_flops(device.device_kind, dtype_name)
    payload: dict[str, Any] = {
        "device": common.device_description(), "device_kind": device.device_kind, "backend": backend,
        "size": args.size, "compute_dtype": dtype_name, "attention_kernel": "auto", "steps": args.steps,
        "repeats": args.repeats, "peak_flops": peak, "jax": jax.__version__}
    print(f"# {common.device_description()} ({backend}), size {args.size}, compute {dtype_name}, attention auto, "
          f"peak {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} ({dtype_name})", flush=True)
    weights = RandomWeights(dtype)
    if "t2i" in args.sections:
        t2i = text_to_image_section(args, dtype, weights)
        payload["text_to_image"] = t2i
        print(f"\ntext-to-image, {t2i['image_size']} px, {args.steps} steps, CFG (2 UNet rows per step)")
        common.print_table([{"figure": "ms per CFG step", "batch": 1, "value": t2i["ms_per_cfg_step_batch1"],
                             "compile_s": t2i["batch1_step"]["compile_s"], "xla_mib": t2i["batch1_step"]["xla_mib"]},
                            {"figure": "images/s", "batch": args.large_batch, "value": t2i["images_per_s_large_batch"],
                             "compile_s": t2i["large_batch"]["compile_s"], "xla_mib": t2i["large_batch"]["xla_mib"],
                             "from_cache": t2i["large_batch"]["from_cache"]}],
                           ["figure", "batch", "value", "compile_s", "from_cache", "xla_mib"])
    if "identity" in args.sections:
        payload["identity"] = identity_section(args, dtype, weights)
        print(f"\nidentity methods, batch 1, {args.references} reference(s), {args.steps} steps, disentangled guidance")
        common.print_table([{k: _fmt(v) for k, v in r.items()} for r in payload["identity"]],
                           ["method", "seconds_per_image", "compile_s", "from_cache", "xla_mib", "device_peak_mib"])
    if "train" in args.sections:
        payload["train"] = train_section(args)
        print(f"\ntrain step, batch {args.train_batch}, compute {dtype_name}, fp32 master weights, all UNet params")
        common.print_table([{k: _fmt(v) for k, v in r.items()} for r in payload["train"]],
                           ["method", "remat", "step_ms", "examples_per_s", "gflop_per_step", "mfu", "compile_s",
                            "temp_mib", "xla_mib", "device_peak_mib", "error"])
    if "torch" in args.sections:
        reason = torch_skip_reason(args.torch)
        if reason is None and "text_to_image" not in payload:
            reason = "needs the t2i section (its figures are the ratios' numerators)"
        if reason is not None:
            payload["torch"] = {"skipped": reason}
            print(f"\ndiffusers + torch.compile comparison skipped: {reason}")
        else:
            payload["torch"] = torch_section(args, dtype_name, payload["text_to_image"])
            how = "torch.compile" if args.torch_compile else "torch eager"
            print(f"\ndiffusers ({how}, {payload['torch']['device']}), ratios ours / theirs in time")
            common.print_table([payload["torch"]], ["ms_per_cfg_step_batch1", "images_per_s_large_batch",
                                                    "step_time_ratio_ours_over_torch",
                                                    "image_time_ratio_ours_over_torch"])
    payload["peak_device_memory_mib"] = device_peak_mib()
    print(f"\npeak device memory: {_fmt(payload['peak_device_memory_mib'])} MiB (device.memory_stats)")
    common.write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
