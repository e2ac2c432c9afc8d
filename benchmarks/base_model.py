"""The miniature text-to-image base model, measured: prompt accuracy per attribute and the Frechet distance in the
identity embedder's feature space, beside the real-vs-real floor.

    python benchmarks/base_model.py --pipeline DIR/base_pipeline --metrics DIR/metrics [--guidance 3,5] [--json F]

Samples every combination of the four prompt attributes once (3 x 3 x 6 x 4 = 216 prompts: each value equally
often), DDIM, text guidance; scores them with the synthfaces attribute reader (`synth_metrics`, trained or loaded
from --metrics). Frechet distance (`synth_metrics.embedder_frechet_distance`): the generated set against 216 real
held-out photos (54 identities x photos 0-3); floor: those against 216 other real photos of the same identities
(photos 4-7). Also the x0 pass-through probe: RMSE of the model's x0 estimate on real held-out photos noised to
timestep t, beside the noise the input itself carries (sqrt(1 - a_t) / sqrt(a_t) in x0 units).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fusion_jax import evaluation, miniature, synth_metrics, weights  # noqa: E402
from fusion_jax.data import synthfaces  # noqa: E402

PROBE_TIMESTEPS = (1, 10, 50, 200, 500)  # timesteps of the x0 pass-through probe


def all_prompts() -> list[synthfaces.PromptAttributes]:
    """Every combination of the four attributes, each stated."""
    return [synthfaces.PromptAttributes(*combo) for combo in itertools.product(*synthfaces.ATTRIBUTE_VALUES.values())]


def sample(pipeline, prompts, *, guidance: float, steps: int, seed: int, batch: int = 24) -> np.ndarray:
    """uint8 (N, S, S, 3) text-only samples of `prompts`; the same initial noise for every guidance scale."""
    from fusion_jax.sampling import SamplingConfig, generate, latent_shape, tokenize

    size = int(pipeline.unet.config.sample_size) * pipeline.vae_scale_factor  # image side (pixel fold f)
    cfg = SamplingConfig(num_steps=steps, guidance_scale=guidance, height=size, width=size)
    noise = np.asarray(jax.random.normal(jax.random.key(seed), latent_shape(pipeline, cfg, len(prompts)), jnp.float32))
    ids = tokenize(pipeline, [synthfaces.build_caption(p) for p in prompts])
    out = []
    for lo in range(0, len(prompts), batch):
        hi = min(len(prompts), lo + batch)
        out.append(np.asarray(generate(pipeline, ids[lo:hi], key=jax.random.fold_in(jax.random.key(seed), lo),
                                       cfg=cfg, noise=jnp.asarray(noise[lo:hi]))))
    return np.concatenate(out)


def x0_probe(pipeline, photos: np.ndarray, seed: int) -> dict[str, dict[str, float]]:
    """At each of PROBE_TIMESTEPS: RMSE of the model's x0 estimate (empty prompt) on the photos noised to t, and the
    noise the input itself carries in x0 units. An estimate far above the input's noise at small t means the
    model cannot pass a nearly clean image through (the last sampling steps blur)."""
    from fusion_jax.sampling import tokenize
    from fusion_jax.schedulers import add_noise
    from fusion_jax.schedulers.base import x0_from_vp_output

    schedule = pipeline.schedule
    x0 = pipeline.vae.encode(jnp.asarray(miniature.to_unit(photos))).mean  # folded as the UNet sees them
    text = pipeline.text_encoder(jnp.asarray(tokenize(pipeline, [""] * len(photos)))).last_hidden_state
    noise = jax.random.normal(jax.random.key(seed), x0.shape)
    result = {}
    for t in PROBE_TIMESTEPS:
        tt = jnp.full((len(photos),), t, jnp.int32)
        xt = add_noise(schedule, x0, noise, tt)
        a = float(schedule.alphas_cumprod[t])
        out = pipeline.unet(xt, tt, text)
        pred = x0_from_vp_output(schedule.prediction_type, out, xt, np.sqrt(a), np.sqrt(1 - a))
        result[str(t)] = {"x0_rmse": float(jnp.sqrt(jnp.mean((pred - x0) ** 2))),
                          "input_noise_rmse_x0_units": float(np.sqrt((1 - a) / a))}
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="pipeline folder with the trained base UNet "
                                                          "(e.g. DIR/base_pipeline of the quickstart)")
    parser.add_argument("--metrics", required=True, help="metric-model cache folder (trained there if empty)")
    parser.add_argument("--guidance", default="3", help="comma-separated text guidance scales (default 3)")
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--limit", type=int, default=0, help="score only every k-th prompt so that about this "
                                                              "many remain (smoke runs; 0 = all 216)")
    parser.add_argument("--save-images", default=None, help="write the samples of each scale here (.npz)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    unet = weights.load_unet(args.pipeline)
    pipeline = miniature.pixel_pipeline(args.pipeline, unet)
    size = int(unet.config.sample_size) * pipeline.vae_scale_factor  # image side (pixels folded f x f)
    metrics = synth_metrics.prepare_synthface_metrics(args.metrics, setup=miniature.metric_setup("default", size))
    faces = synthfaces.SynthFaceConfig(image_size=size)
    prompts = all_prompts()
    if args.limit:
        prompts = prompts[:: max(1, len(prompts) // args.limit)]
    labels = np.stack([p.labels() for p in prompts])
    heldout = synthfaces.split_identity_ids(faces, "heldout")[: len(prompts) // 4]
    real_a, _, real_labels = synth_metrics.render_photos(faces, heldout, np.arange(0, 4))
    floor = synth_metrics.real_frechet_floor(metrics.embedder, faces, heldout, np.arange(0, 4), np.arange(4, 8))
    real_acc = evaluation.prompt_accuracy(metrics.reader, real_a, real_labels, synthfaces.ATTRIBUTE_NAMES)
    result = {"pipeline": os.path.abspath(args.pipeline), "prediction_type": pipeline.schedule.prediction_type,
              "images": len(prompts), "sample_steps": args.sample_steps, "seed": args.seed,
              "frechet_floor_real_vs_real": floor, "reader_accuracy_real": real_acc, "by_guidance": {},
              "x0_probe": x0_probe(pipeline, real_a[:32], args.seed)}
    saved = {}
    for g in [float(x) for x in args.guidance.split(",")]:
        t = time.perf_counter()
        images = sample(pipeline, prompts, guidance=g, steps=args.sample_steps, seed=args.seed)
        acc = evaluation.prompt_accuracy(metrics.reader, images, labels, synthfaces.ATTRIBUTE_NAMES)
        fd = synth_metrics.embedder_frechet_distance(metrics.embedder, images, real_a)
        result["by_guidance"][str(g)] = {"prompt_accuracy": acc, "frechet_distance": fd,
                                         "sampling_s": time.perf_counter() - t}
        saved[f"guidance_{g}"] = images
        print(f"guidance {g}: prompt accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
              + f"; Frechet distance {fd:.4f} (real-vs-real floor {floor:.4f})", flush=True)
    print("reader on real held-out photos: " + ", ".join(f"{k} {v:.3f}" for k, v in real_acc.items()))
    print("x0 probe (t: model x0 RMSE / input noise): " + ", ".join(
        f"{t}: {v['x0_rmse']:.3f}/{v['input_noise_rmse_x0_units']:.3f}" for t, v in result["x0_probe"].items()))
    result["wall_s"] = time.perf_counter() - start
    if args.save_images:
        np.savez_compressed(args.save_images, prompts=np.array([synthfaces.build_caption(p) for p in prompts]),
                            **saved)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
