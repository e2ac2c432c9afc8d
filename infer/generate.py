"""Batch text-to-image from the command line.

    python infer/generate.py --model PATH --prompt "a photo of an astronaut" --out out/
    python infer/generate.py --model tiny --prompts prompts.jsonl --steps 4 --out out/

`--model` is a diffusers pipeline folder, a Hugging Face cache entry or repo id already in the local cache
(nothing is downloaded), or `tiny`: a tiny randomly initialised pipeline that the project writes itself (the
images are noise-like; it shows the whole path running). Every PNG stores its generation settings in its
metadata (key `fusion_jax`), and `grid.png` tiles the batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_jax import cli_utils  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="pipeline folder, HF cache repo id, or 'tiny'")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help='JSONL file, one {"prompt": ..., "negative_prompt": ...} per line')
    p.add_argument("--negative-prompt", default="", help="negative prompt for prompts that have none")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "dpmpp_2m", "euler", "euler_ancestral"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (different seeds)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--height", type=int, default=None, help="defaults to the UNet's sample size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p.parse_args(argv)


def read_prompts(args) -> list[dict]:
    items = [{"prompt": p, "negative_prompt": args.negative_prompt} for p in args.prompt]
    if args.prompts:
        for n, line in enumerate(args.prompts.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{args.prompts}:{n}: not valid JSON ({e})")
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise SystemExit(f'{args.prompts}:{n}: expected an object with a string "prompt"')
            item.setdefault("negative_prompt", args.negative_prompt)
            items.append(item)
    if not items:
        raise SystemExit("no prompts: give --prompt TEXT or --prompts FILE.jsonl")
    return items


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np
    from tqdm import tqdm

    from fusion_jax import sampling

    pipeline = cli_utils.load_pipeline_arg(args.model, args.dtype)
    sample = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    cfg = sampling.SamplingConfig(
        num_steps=args.steps,
        guidance_scale=args.guidance,
        guidance_rescale=args.guidance_rescale,
        scheduler=args.scheduler,
        height=args.height or sample,
        width=args.width or sample,
    )
    jobs = [(item, k) for item in read_prompts(args) for k in range(args.num_images)]
    args.out.mkdir(parents=True, exist_ok=True)
    images, names = [], []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="generating", unit="batch"):
        chunk = jobs[start : start + args.batch_size]
        pad = args.batch_size - len(chunk)  # keep one compiled shape: pad the last batch
        prompts = [j[0]["prompt"] for j in chunk] + [""] * pad
        negatives = [j[0]["negative_prompt"] for j in chunk] + [""] * pad
        key = jax.random.fold_in(jax.random.key(args.seed), start)
        batch = sampling.generate(
            pipeline,
            sampling.tokenize(pipeline, prompts),
            uncond_ids=sampling.tokenize(pipeline, negatives),
            key=key,
            cfg=cfg,
        )
        batch = np.asarray(batch)[: len(chunk)]
        for (item, k), image in zip(chunk, batch):
            index = len(names)
            settings = {**vars(args), "prompt": item["prompt"], "negative_prompt": item["negative_prompt"],
                        "batch_start": start, "image_in_batch": index - start, "sampling": cfg.__dict__}
            name = f"{index:05d}.png"
            cli_utils.save_png(args.out / name, image, settings)
            images.append(image)
            names.append(name)
    cli_utils.save_grid(args.out / "grid.png", images)
    print(f"wrote {len(names)} images and grid.png to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
