"""Batch text-to-image (optionally with reference faces, through any registered identity method) from the command line.

    fusion-jax generate --model PATH --prompt "a photo of an astronaut" --out out/
    fusion-jax generate --model tiny --prompts prompts.jsonl --steps 4 --out out/
    fusion-jax generate --model PATH --identity-weights EXPORT --reference me1.jpg --reference me2.jpg \
        --prompt "a photo of a person in a garden" --out out/
    fusion-jax generate --model PATH --identity-weights EXPORT --reference 0:ann.jpg --reference 1:bob.jpg \
        --identity-box 0,64,256,448 --identity-box 256,64,512,448 --reference-strength 1.0,0.8 \
        --prompt "two people on a bench" --out out/

`--model` is a diffusers pipeline folder, a Hugging Face cache entry or repo id already in the local cache
(nothing is downloaded), or `tiny`: a tiny randomly initialised pipeline that the project writes itself (the
images are noise-like; it shows the whole path running). Every PNG stores its generation settings in its
metadata (key `fusion_jax`), and `grid.png` tiles the batch.

References: `--reference [ID:]PATH` (repeatable; ID is the 0-based person index, default 0; several photos of one
person are concatenated). Each photo's largest face is detected (insightface models from `--face-models`, else
OpenCV's Haar cascade) and aligned to a `--reference-size` crop (saved under OUT/references/). With several people,
`--identity-box x0,y0,x1,y1` (pixels of the generated image, one per person, in ID order) says where each goes.
The identity modules come from `--identity-weights` (a `train/export.py` folder, whose identity_config.json names
the method); without it, fresh untrained modules of `--method` (default face_fusion) are attached (a warning says
so; useful only to run the path). `--method NAME` picks the identity method (face_fusion, single_token, ...; each
adds its own flags below). Every reference setting (photos, face boxes, identity boxes, strengths, guidance, the
method and its config) is stored in the PNG metadata.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from fusion_jax import cli_utils


def parse_args(argv=None, prog: Optional[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="pipeline folder, HF cache repo id, or 'tiny'")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help='JSONL file, one {"prompt": ..., "negative_prompt": ...} per line')
    p.add_argument("--negative-prompt", default="", help="negative prompt for prompts that have none")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps (default {DEFAULT_STEPS}, or the identity method's own, e.g. FaceStudio 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--scheduler", default=None, choices=["ddim", "dpmpp_2m", "euler", "euler_ancestral"],
                   help=f"sampler (default {DEFAULT_SCHEDULER}, or the identity method's own, e.g. FaceStudio "
                        "euler_ancestral)")
    p.add_argument("--init-image", type=Path, default=None,
                   help="img2img: start from this image (centre crop, resized to the output size) noised to "
                        "--init-strength of the schedule")
    p.add_argument("--init-strength", type=float, default=0.8,
                   help="img2img: fraction of the schedule re-run from the noised --init-image (0 < S <= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (different seeds)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--height", type=int, default=None, help="defaults to the UNet's sample size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (the weights are loaded in it); auto: bfloat16 on GPU / TPU, float32 on CPU "
                        "(fusion_jax/precision.py); the PNG settings record the resolved one")
    p.add_argument("--attention-kernel", default="auto", choices=["auto", "xla", "cudnn", "chunked"],
                   help="UNet attention implementation; auto: cuDNN flash attention on a CUDA GPU where it applies, "
                        "else XLA (chunked for long sequences on CPU)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    r = p.add_argument_group("reference faces (identity methods)")
    r.add_argument("--method", default=None,
                   help="identity method (registered: " + ", ".join(_method_names()) + "); default: the one named "
                        "in --identity-weights, else face_fusion")
    r.add_argument("--reference", action="append", default=[], metavar="[ID:]PATH",
                   help="reference photo of person ID (0-based, default 0); repeatable")
    r.add_argument("--identity-box", action="append", default=[], metavar="x0,y0,x1,y1",
                   help="region of person ID (in order) in the generated image, pixels; one per person")
    r.add_argument("--identity-mask", action="append", default=[], metavar="PATH",
                   help="one person's region as a mask image (white = inside; resized to the output size), once per "
                        "person in --reference order; instead of --identity-box")
    r.add_argument("--reference-strength", action="append", default=[], metavar="S[,S...]",
                   help="identity strength: one value, or one per person (default: the model's)")
    r.add_argument("--reference-guidance", type=float, default=2.0, help="reference guidance scale s_ref")
    r.add_argument("--guidance-form", default="disentangled", choices=["disentangled", "cfg"],
                   help="disentangled: uncond/text/text+ref (3 predictions per step); cfg: uncond vs text+ref (2)")
    r.add_argument("--reference-max-timestep", type=int, default=None,
                   help="apply reference guidance only while t <= this (disentangled form)")
    r.add_argument("--identity-weights", type=Path, default=None, help="identity modules exported by train/export.py")
    r.add_argument("--face-models", default=None,
                   help="insightface model folder (default ~/.insightface/models/buffalo_l; else OpenCV Haar)")
    r.add_argument("--reference-size", type=int, default=None,
                   help="reference crop side in pixels (default: the generated image size)")
    r.add_argument("--reference-margin", type=float, default=0.4,
                   help="crop margin around the aligned face (the training crops use 0.4)")
    for name in _method_names():  # each method's own flags, in its own group
        _method(name).add_arguments(p.add_argument_group(f"identity method {name}"))
    return p.parse_args(argv)


DEFAULT_STEPS, DEFAULT_SCHEDULER = 30, "ddim"
# SamplingConfig fields an identity method may default (`sampling_defaults`) -> the flag that overrides them
_METHOD_DEFAULT_FLAGS = {"num_steps": "steps", "scheduler": "scheduler"}


def _method_names() -> tuple[str, ...]:
    from fusion_jax.identity import base

    return base.names()


def _method(name: str):
    from fusion_jax.identity import base

    try:
        return base.get(name, what="--method")
    except ValueError as e:
        raise SystemExit(str(e)) from None


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


def check_reference_args(args) -> tuple[list, list, list]:
    """Syntax of the reference flags (before anything is loaded): (groups, boxes, strengths)."""
    from fusion_jax import references as refs

    try:
        groups = refs.group_references(args.reference)
        boxes = [refs.parse_box(b) for b in args.identity_box]
        strengths = refs.parse_strengths(args.reference_strength)
    except refs.ReferenceError as e:
        raise SystemExit(str(e)) from None
    if not groups:
        for flag, value in (("--identity-box", args.identity_box), ("--identity-mask", args.identity_mask),
                            ("--reference-strength", args.reference_strength),
                            ("--identity-weights", args.identity_weights), ("--reference-size", args.reference_size),
                            ("--reference-max-timestep", args.reference_max_timestep), ("--method", args.method)):
            if value:
                raise SystemExit(f"{flag} given without any --reference photo")
    try:  # counts now (before anything loads); the bounds once the image size is known
        if not args.identity_mask:  # masks say where each person goes instead
            refs.check_boxes(boxes, len(groups))
        if groups:
            refs.strengths_per_identity(strengths, len(groups), 1.0)
    except refs.ReferenceError as e:
        raise SystemExit(str(e)) from None
    if args.identity_mask:
        if args.identity_box:
            raise SystemExit("give --identity-box or --identity-mask for the people's regions, not both")
        if len(args.identity_mask) != len(groups):
            raise SystemExit(f"--identity-mask: {len(args.identity_mask)} masks for {len(groups)} people (one per "
                             "person, in --reference order)")
        for path in args.identity_mask:
            if not Path(path).is_file():
                raise SystemExit(f"--identity-mask {path}: no such file")
    if args.method is not None:
        _method(args.method)
    if args.identity_weights is not None:
        from fusion_jax.identity import export as identity_export

        folder = Path(args.identity_weights)
        if identity_export.identity_folder(folder) is None:
            raise SystemExit(f"--identity-weights {folder}: no identity/identity_config.json there (expected a "
                             "folder written by train/export.py)")
    if args.reference_size is not None and args.reference_size <= 0:
        raise SystemExit(f"--reference-size must be a positive number of pixels, got {args.reference_size}")
    if args.reference_margin < 0:
        raise SystemExit(f"--reference-margin must be >= 0, got {args.reference_margin}")
    if args.face_models is not None:
        from fusion_jax.data.faces import find_insightface_models

        if not find_insightface_models(args.face_models):
            raise SystemExit(f"--face-models {args.face_models}: no insightface *.onnx models in that folder")
    return groups, boxes, strengths


def prepare_references(args, pipeline, cfg, groups, boxes, strengths):
    """Photos -> aligned crops, checked boxes and strengths, the identity method's modules on the UNet.

    Returns (pipeline, identity inputs for one row (with "sampling_cfg": `cfg` with the method's flags applied),
    metadata dict)."""
    import dataclasses
    import warnings

    from fusion_jax import references as refs
    from fusion_jax.data.faces import DEFAULT_MODEL_DIR, FaceAnalyzer, FaceAnalyzerConfig

    num_ids = len(groups)
    try:
        box_array = None if args.identity_mask else refs.check_boxes(boxes, num_ids, cfg.height, cfg.width)
    except refs.ReferenceError as e:
        raise SystemExit(str(e)) from None
    pipeline, method, method_cfg, trained = cli_utils.attach_identity_modules(pipeline, args.identity_weights,
                                                                              args.dtype, method=args.method)
    if not trained:
        warnings.warn("references given without --identity-weights: the identity modules are fresh and UNTRAINED "
                      "(the references will not produce a likeness; export a trained run with train/export.py)",
                      stacklevel=2)
    defaults = {k: v for k, v in method.sampling_defaults(method_cfg).items()
                if k in _METHOD_DEFAULT_FLAGS and getattr(args, _METHOD_DEFAULT_FLAGS[k]) is None}
    try:
        cfg = dataclasses.replace(cfg, **defaults)
        method_cfg, cfg = method.apply_arguments(args, method_cfg, cfg)
        pipeline = dataclasses.replace(pipeline, unet=method.prepare_model(pipeline.unet, method_cfg))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    size = args.reference_size or method.reference_size(method_cfg) or max(cfg.height, cfg.width)
    f = pipeline.vae_scale_factor
    if size % f:
        raise SystemExit(f"--reference-size {size}: must be a multiple of the VAE's downsampling factor {f}")
    analyzer = FaceAnalyzer(FaceAnalyzerConfig(model_dir=args.face_models or DEFAULT_MODEL_DIR))
    try:
        ref_set = method.reference_photos(groups, analyzer, size, args.reference_margin, method_cfg)
    except refs.ReferenceError as e:
        raise SystemExit(str(e)) from None
    try:
        strength = refs.strengths_per_identity(strengths, num_ids, getattr(method_cfg, "strength", 1.0))
    except refs.ReferenceError as e:
        raise SystemExit(str(e)) from None
    crops_dir = args.out / "references"
    crops_dir.mkdir(parents=True, exist_ok=True)
    for (k, n, crop), record in zip(ref_set.uint8_crops(), ref_set.records):  # both in (identity, index) order
        cli_utils.save_png(crops_dir / f"id{k}_{n}.png", crop, record)
    masks = read_identity_masks(args.identity_mask, cfg.height, cfg.width) if args.identity_mask else None
    identity = {"references": ref_set.crops, "reference_valid": ref_set.valid, "strength": strength,
                "boxes": box_array, "masks": masks, "identity_cfg": method_cfg, "sampling_cfg": cfg,
                "face_embeddings": ref_set.embeddings}
    meta = {"references": ref_set.records, "identity_boxes": None if box_array is None else box_array.tolist(),
            "identity_masks": list(map(str, args.identity_mask)) or None,
            "reference_strength": strength.tolist(), "reference_size": size,
            "identity_weights": str(args.identity_weights) if trained else "untrained (fresh modules)",
            "identity_method": method.name, method.section: dataclasses.asdict(method_cfg),
            "face_detector": analyzer.backend}
    return pipeline, identity, meta


def read_identity_masks(paths, height: int, width: int):
    """`--identity-mask` files -> (K, height, width) bool: each image resized (nearest) to the output size, inside
    where its grey level is above half."""
    import numpy as np

    from fusion_jax.data.images import CorruptImageError, read_image
    from PIL import Image

    masks = []
    for path in paths:
        try:
            grey = Image.fromarray(read_image(path)).convert("L").resize((width, height), Image.NEAREST)
        except CorruptImageError as e:
            raise SystemExit(f"--identity-mask {path}: cannot load the mask image ({e})") from None
        mask = np.asarray(grey) > 127
        if not mask.any():
            raise SystemExit(f"--identity-mask {path}: the mask is empty (no pixel above half grey)")
        masks.append(mask)
    return np.stack(masks)


def _batch_identity(identity, batch: int) -> dict:
    """One row's identity inputs -> `sampling.generate` keyword arguments for `batch` rows."""
    import numpy as np

    if identity is None:
        return {}
    rows = lambda a: np.broadcast_to(a[None], (batch,) + a.shape)  # noqa: E731
    return {"references": rows(identity["references"]), "reference_valid": rows(identity["reference_valid"]),
            "strength": rows(identity["strength"]),
            "boxes": None if identity["boxes"] is None else rows(identity["boxes"]),
            "identity_masks": None if identity["masks"] is None else rows(identity["masks"]),
            "identity_cfg": identity["identity_cfg"],
            "face_embeddings": None if identity["face_embeddings"] is None else rows(identity["face_embeddings"])}


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    args = parse_args(argv, prog)
    groups, boxes, strengths = check_reference_args(args)
    items = read_prompts(args)
    import jax
    import numpy as np
    from tqdm import tqdm

    from fusion_jax import precision, sampling

    args.dtype = precision.resolve_compute_dtype(args.dtype)  # 'auto' -> what runs (and what the PNGs record)
    pipeline = cli_utils.load_pipeline_arg(args.model, args.dtype)
    sample = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    try:
        cfg = sampling.SamplingConfig(
            num_steps=args.steps or DEFAULT_STEPS,
            guidance_scale=args.guidance,
            guidance_rescale=args.guidance_rescale,
            scheduler=args.scheduler or DEFAULT_SCHEDULER,
            height=args.height or sample,
            width=args.width or sample,
            reference_guidance=args.guidance_form,
            reference_guidance_scale=args.reference_guidance,
            reference_guidance_max_timestep=args.reference_max_timestep,
        )
    except ValueError as e:
        raise SystemExit(f"bad sampling settings: {e}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    identity, identity_meta = None, {}
    if groups:
        pipeline, identity, identity_meta = prepare_references(args, pipeline, cfg, groups, boxes, strengths)
        cfg = identity["sampling_cfg"]
    init_images = None
    if args.init_image is not None:
        import dataclasses

        from fusion_jax.data.images import read_centre_crop

        try:
            cfg = dataclasses.replace(cfg, init_strength=args.init_strength)
            init = read_centre_crop(args.init_image, cfg.height, cfg.width, what="--init-image") * 2.0 - 1.0
        except ValueError as e:
            raise SystemExit(str(e).replace("init_strength", "--init-strength")) from None
        init_images = np.broadcast_to(init[None], (args.batch_size,) + init.shape)
        from fusion_jax import schedulers

        if not schedulers.make_sampler(cfg.scheduler, pipeline.schedule, cfg.num_steps).supports_partial:
            raise SystemExit(f"--init-image: the {cfg.scheduler} sampler cannot start part-way; use --scheduler "
                             "ddim, euler or euler_ancestral")
    if args.attention_kernel != "auto":  # every attention of the (identity) model, reference branches included
        from fusion_jax.models.unet import set_attention_kernel

        set_attention_kernel(pipeline.unet, args.attention_kernel)
    jobs = [(item, k) for item in items for k in range(args.num_images)]
    images, names = [], []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="generating", unit="batch"):
        chunk = jobs[start : start + args.batch_size]
        pad = args.batch_size - len(chunk)  # keep one compiled shape: pad the last batch
        prompts = [j[0]["prompt"] for j in chunk] + [""] * pad
        negatives = [j[0]["negative_prompt"] for j in chunk] + [""] * pad
        key = jax.random.fold_in(jax.random.key(args.seed), start)
        try:
            batch = sampling.generate(
                pipeline,
                sampling.tokenize(pipeline, prompts),
                uncond_ids=sampling.tokenize(pipeline, negatives),
                key=key,
                cfg=cfg,
                init_images=init_images,
                **_batch_identity(identity, args.batch_size),
            )
        except ValueError as e:  # bad combinations the sampler finds (shapes, img2img twice...)
            raise SystemExit(f"cannot generate: {e}") from None
        batch = np.asarray(batch)[: len(chunk)]
        for (item, k), image in zip(chunk, batch):
            index = len(names)
            settings = {**vars(args), "prompt": item["prompt"], "negative_prompt": item["negative_prompt"],
                        "batch_start": start, "image_in_batch": index - start, "sampling": cfg.__dict__,
                        **identity_meta}
            name = f"{index:05d}.png"
            cli_utils.save_png(args.out / name, image, settings)
            images.append(image)
            names.append(name)
    cli_utils.save_grid(args.out / "grid.png", images)
    print(f"wrote {len(names)} images and grid.png to {args.out}")
    return 0

