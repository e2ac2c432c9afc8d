"""The quickstart: the miniature Face Fusion model on synthetic faces, sampled and measured with exact metrics.

Default: the shipped model and metric models (`miniature_assets`: trained by `fusion-jax miniature-assets`, the
command and its wall time in their training.json) are sampled for held-out identities x prompts with 0, 1 and 4
references, in a few minutes on 2 CPU cores. `from_scratch` trains every stage first, seeded by `seed`: the
pixel pipeline, the text-to-image base model, Face Fusion on top of it and the metric models (the same code
`miniature-assets` runs). Every figure is printed with a 95% interval from a bootstrap over identities.

Outputs in OUT: grid.png (held-out identity x prompt rows; the reference crops, then samples with 0 / 1 / 4
references, upscaled, columns labelled), two_people.png (two held-out people in one image, each in its box),
metrics.json (every figure, its interval, the Frechet distance in the identity embedder's space beside the
real-vs-real floor, timings, settings).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from fusion_jax import miniature as mm
from fusion_jax import miniature_assets as assets
from fusion_jax.data import synthfaces

SETTING_NAMES = {0: "no_reference", 1: "1_reference", 4: "4_references"}
TABLE_KEYS = ("sim_target", "sim_ref", "paste", "prompt_accuracy")
# The two-person figure: image size (H, W) and each person's box (x0, y0, x1, y1): the left and right halves.
TWO_PEOPLE_SIZE = (32, 64)
TWO_PEOPLE_BOXES = ((0, 0, 32, 32), (32, 0, 64, 32))
# Paired differences the quickstart's claims rest on: name -> (figure, setting a, setting b); per image a - b on the
# same rows (same identity, prompt and initial noise), so the interval is the difference's own, not two overlapping.
DIFFERENCES = {"sim_target_4_minus_1_references": ("sim_target", 4, 1),
               "prompt_accuracy_1_reference_minus_none": ("prompt_accuracy", 1, 0),
               "prompt_accuracy_4_references_minus_none": ("prompt_accuracy", 4, 0)}


@dataclasses.dataclass(frozen=True)
class FusionRound:
    """One Face Fusion training round of the from-scratch recipe."""

    steps: int  # training steps of this round
    # reference photos per training example (the reference branch runs the UNet on batch x this many crops, so a
    # step costs more with more); the quickstart samples with 1 and 4
    references: int = 2
    # each example fills its `references` slots with 1..references distinct photos (padded by repetition), so the
    # model sees every count it is sampled with instead of exactly `references`
    vary_references: bool = False


# The shipped model's recipe (its training.json): two rounds of 2400 steps on 2 references (800 steps gave SimTarget
# 0.25, 2 x 2400 about 0.50), then 1600 steps on 4 slots holding 1-4 distinct photos (4 references above 1).
SHIPPED_FUSION_ROUNDS = (FusionRound(2400), FusionRound(2400), FusionRound(1600, references=4, vary_references=True))


def fusion_schedule(rounds: Optional[int] = None, steps: Optional[int] = None, references: Optional[int] = None,
                    vary_references: Optional[bool] = None,
                    recipe: tuple[FusionRound, ...] = SHIPPED_FUSION_ROUNDS) -> tuple[FusionRound, ...]:
    """`recipe` as the command-line flags change it: its first `rounds` rounds (the last one repeated when more),
    then `steps` / `references` / `vary_references` set in every round; a flag left None keeps the recipe's."""
    if rounds is not None and rounds < 1:
        raise ValueError(f"Face Fusion rounds must be >= 1, got {rounds}")
    chosen = list(recipe[:rounds]) + [recipe[-1]] * max(0, (rounds or 0) - len(recipe))
    changes = {k: v for k, v in (("steps", steps), ("references", references), ("vary_references", vary_references))
               if v is not None}
    return tuple(dataclasses.replace(r, **changes) for r in chosen)


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    """Everything `fusion-jax quickstart` does (defaults: the shipped model, a few minutes on 2 CPU cores)."""

    out: str  # output folder: grid.png, two_people.png, metrics.json (and the stages' folders with from_scratch)
    from_scratch: bool = False  # train every stage here instead of sampling the shipped model
    assets: str = ""  # the shipped-model folder ('' = fusion_jax/assets/miniature)
    # From scratch only (the shipped model's recipe; its training.json has the wall times):
    base_steps: int = 5000  # text-to-image steps of the base model
    # Face Fusion rounds, in order: round r > 1 continues from round r-1's export (its LoRA merged into the UNet,
    # fresh adapters, optimizer and learning-rate schedule: a warm restart); the shipped model's recipe
    fusion_rounds: tuple[FusionRound, ...] = SHIPPED_FUSION_ROUNDS
    fusion_trainable: str = "identity+lora"  # identity projections + rank-4 LoRA of the UNet attention
    fusion_lr: float = 2e-3  # Face Fusion learning rate
    batch_size: int = 16  # training batch (both stages)
    widths: tuple[int, ...] = mm.MiniatureModelConfig().widths  # UNet channels per level
    metric_setup: str = "default"  # metric models trained from scratch: 'default' or 'fast' (tests)
    # Sampling and measuring:
    # held-out identities (the bootstrap resamples these): 64 puts the 4-minus-1-references interval above 0, where
    # 32 left it reaching 0 (16 before that: seeds moved SimTarget 0.03); held-out positions 0..identities-1
    identities: int = 64
    prompts: int = 4  # prompts per identity (EVAL_PROMPTS): identities x prompts images per setting
    grid_rows: int = 8  # (identity, prompt) rows shown in grid.png
    grid_scale: int = 4  # upscale factor of every grid cell (32 px -> 128 px)
    sample_steps: int = 20  # DDIM steps
    # text guidance scale and disentangled reference guidance scale s_ref, both picked on validation identities
    # the quickstart never reports (held-out positions 100-131, `benchmarks/quickstart_sweep.py`, RESULTS.md);
    # (4.5 / 3.0 for the one-round model; with round 2, text guidance 4.5 cost up to 3.7 points of prompt accuracy)
    guidance: float = 5.5
    reference_scale: float = 3.0
    two_people: int = 4  # two-person images (pairs of held-out identities); 0 = no figure
    seed: int = 0  # seeds every stage: sampling noise, and with from_scratch the weights, data order and metrics


def stage_seed_overrides(seed: int) -> tuple[str, ...]:
    """The training stages' seeds (`train.seed`: init and noise; `data.seed`: order) from the quickstart seed."""
    return (f"train.seed={seed}", f"data.seed={seed}")


def seeded_metric_setup(name: str, image_size: int, seed: int):
    """`miniature.metric_setup` with both metric models' training seeded by `seed`."""
    setup = mm.metric_setup(name, image_size)
    return dataclasses.replace(setup, embedder_train=dataclasses.replace(setup.embedder_train, seed=seed),
                               reader_train=dataclasses.replace(setup.reader_train, seed=seed))


def fusion_recipe(cfg: QuickstartConfig, round_: Optional[FusionRound] = None) -> tuple[str, ...]:
    """Overrides of face_fusion.yaml the quickstart trains a round with (default: its first round): trainable set,
    learning rate, references, stage seeds (the evaluation starts every method from these, so a quickstart
    folder's runs are its runs)."""
    round_ = round_ or cfg.fusion_rounds[0]
    return (f"train.trainable={cfg.fusion_trainable}", f"train.lr={cfg.fusion_lr}",
            f"data.pipeline.num_references={round_.references}",
            f"data.pipeline.vary_references={str(round_.vary_references).lower()}", *stage_seed_overrides(cfg.seed))


def quickstart_stage_configs(cfg: QuickstartConfig, out: str):
    """(base config, one Face Fusion config per round, MiniatureModelConfig) of the from-scratch stages under OUT,
    seeded (each round's config has workdir OUT/fusion; `miniature.continuation_stage` moves rounds > 1 on)."""
    fusions = []
    for round_ in cfg.fusion_rounds:
        base, fusion, model_cfg = mm.stage_configs(
            out, cfg.base_steps, round_.steps, cfg.batch_size, cfg.widths, extra_base=stage_seed_overrides(cfg.seed),
            extra_fusion=fusion_recipe(cfg, round_))
        fusions.append(fusion)
    return base, tuple(fusions), dataclasses.replace(model_cfg, seed=cfg.seed)


def train_from_scratch(cfg: QuickstartConfig, out: str, log: Callable[[str], None]) -> tuple[Path, Path, dict, Any]:
    """Every stage in OUT (each resumes): (model folder, metrics folder, timings, last Face Fusion round's config)."""
    from fusion_jax import synth_metrics

    base, fusions, model_cfg = quickstart_stage_configs(cfg, out)
    timings, last = mm.prepare_models(out, base, fusions, model_cfg, log)
    model_dir = Path(out) / "model"
    if not (model_dir / "identity").is_dir() or timings[mm.round_name(len(fusions))]["trained"]:
        assets.export_quickstart_model(last.workdir, os.path.join(out, "pipeline"), model_dir)
    log(f"[4/5] metric models (identity embedder + attribute reader, setup '{cfg.metric_setup}'; cached)")
    t = time.perf_counter()
    metrics_dir = Path(out) / "metrics"
    synth_metrics.prepare_synthface_metrics(
        str(metrics_dir), setup=seeded_metric_setup(cfg.metric_setup, base.data.synthfaces.image_size, cfg.seed))
    timings["metric_models_s"] = time.perf_counter() - t
    return model_dir, metrics_dir, timings, last


def shipped(cfg: QuickstartConfig) -> tuple[Path, Path, dict]:
    """The shipped model and metric models: (model folder, metrics folder, their training record)."""
    root = Path(cfg.assets) if cfg.assets else assets.ASSET_DIR
    model_dir = assets.shipped_model_dir(root)
    record_file = root / assets.RECORD_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    return model_dir, root / assets.METRICS_DIR, record


def load_metrics(cfg: QuickstartConfig, metrics_dir: Path, record: dict, verbose: bool = False):
    """The metric models in `metrics_dir`, with the setup and seed its training `record` names (else cfg's)."""
    from fusion_jax import synth_metrics

    setup = seeded_metric_setup(record.get("metric_setup", cfg.metric_setup), 32, record.get("metric_seed", cfg.seed))
    return synth_metrics.prepare_synthface_metrics(str(metrics_dir), setup=setup, verbose=verbose)


def model_faces(pipeline) -> synthfaces.SynthFaceConfig:
    """The synthfaces world at the model's image size (UNet side x pixel fold; 32 for the miniature)."""
    return synthfaces.SynthFaceConfig(image_size=int(pipeline.unet.config.sample_size) * pipeline.vae_scale_factor)


def eval_faces(eval_set: mm.EvalSet) -> synthfaces.SynthFaceConfig:
    """The synthfaces world the evaluation set was rendered in (its photos' size)."""
    return synthfaces.SynthFaceConfig(image_size=int(eval_set.target_images.shape[2]))


def summarise(per_image: dict[str, np.ndarray], groups: np.ndarray, seed: int) -> dict[str, Any]:
    """Mean of each per-image figure and its 95% percentile interval from a bootstrap over `groups`."""
    from fusion_jax.reproduction.stats import bootstrap_mean_interval

    out: dict[str, Any] = {}
    for key, values in per_image.items():
        mean, low, high = bootstrap_mean_interval(np.asarray(values, np.float64), groups.astype(str), seed=seed)
        out[key], out[f"{key}_ci95"] = mean, [low, high]
    return out


def per_image_scores(metrics, generated: np.ndarray, eval_set: mm.EvalSet, num_references: int
                     ) -> dict[str, np.ndarray]:
    """SimTarget, SimRef, Paste, prompt accuracy (mean over the 4 attributes) and each attribute's correctness,
    per generated image."""
    from fusion_jax import evaluation

    refs = eval_set.reference_images[:, : max(1, num_references)]
    sim_ref = evaluation.sim_ref(metrics.embedder, generated, refs)
    sim_target = evaluation.sim_target(metrics.embedder, generated, eval_set.target_images)
    read = np.asarray(metrics.reader(generated))
    correct = (read == eval_set.labels).astype(np.float64)
    out = {"sim_target": sim_target, "sim_ref": sim_ref, "paste": evaluation.paste(sim_ref, sim_target),
           "prompt_accuracy": correct.mean(axis=1)}
    for a, name in enumerate(synthfaces.ATTRIBUTE_NAMES):
        out[f"prompt_accuracy_{name}"] = correct[:, a]
    return out


def frechet_figures(metrics, generated: dict[int, np.ndarray], eval_set: mm.EvalSet) -> dict[str, float]:
    """Frechet distance in the identity embedder's space: each setting's images vs real held-out photos of the
    same identities (the target photos), beside the floor of real photos vs other real photos at the same N."""
    from fusion_jax import synth_metrics as sm

    ids = np.unique(eval_set.identity_ids)
    per_identity = len(eval_set.captions) // len(ids)
    photos = np.asarray(mm.TARGET_PHOTOS[:per_identity])
    faces = eval_faces(eval_set)
    real, _, _ = sm.render_photos(faces, ids, photos)
    out = {f"frechet_{SETTING_NAMES[n]}": sm.embedder_frechet_distance(metrics.embedder, images, real)
           for n, images in generated.items()}
    floor_photos = np.asarray(mm.REFERENCE_PHOTOS[-1] + 1 + np.arange(per_identity))  # 4.. : neither refs nor targets
    out["frechet_real_floor"] = sm.real_frechet_floor(metrics.embedder, faces, ids,
                                                      floor_photos, photos)
    return out


def save_grid_figure(path: Path, eval_set: mm.EvalSet, images: dict[int, np.ndarray], rows: int, scale: int) -> None:
    """grid.png: a row per (identity, prompt); the 4 reference crops, then the samples with 0 / 1 / 4 references."""
    from fusion_jax.figures import labelled_grid

    n = min(rows, len(eval_set.captions))
    cells = [list(eval_set.reference_crops[r]) + [images[k][r] for k in sorted(images)] for r in range(n)]
    labels = [f"reference {i + 1}" for i in range(eval_set.reference_crops.shape[1])]
    labels += ["no reference" if k == 0 else f"{k} reference{'s' if k > 1 else ''}" for k in sorted(images)]
    row_labels = [eval_set.captions[r].replace("a person ", "").replace(", ", ",\n") for r in range(n)]
    labelled_grid(cells, labels, scale=scale, row_labels=row_labels,
                  title="held-out identities (never trained on): references, then generated").save(path)


def two_people(pipeline, identity_cfg, metrics, cfg: QuickstartConfig, log) -> tuple[dict, list]:
    """Pairs of held-out identities in one 32x64 image, one per box (Face Fusion's region masks), 1 reference
    each. Per-region SimTarget against the region's own person and against the other person (leakage)."""
    import jax

    from fusion_jax import evaluation
    from fusion_jax.sampling import SamplingConfig, generate, tokenize

    faces = model_faces(pipeline)
    heldout = synthfaces.split_identity_ids(faces, "heldout")
    pairs = [(int(heldout[2 * i]), int(heldout[2 * i + 1])) for i in range(cfg.two_people)]
    prompt = synthfaces.build_caption(mm.EVAL_PROMPTS[0])
    refs, targets = [], []
    for pair in pairs:
        refs.append([[synthfaces.render_face(p, mm.REFERENCE_PHOTOS[0], faces)["face_crop"]] for p in pair])
        targets.append([[synthfaces.render_face(p, t, faces)["image"] for t in mm.TARGET_PHOTOS] for p in pair])
    refs = mm.to_unit(np.asarray(refs))  # (B, K=2, N=1, 32, 32, 3)
    targets = np.asarray(targets)  # (B, 2, T, 32, 32, 3)
    h, w = TWO_PEOPLE_SIZE
    sampling = SamplingConfig(num_steps=cfg.sample_steps, guidance_scale=cfg.guidance, height=h, width=w,
                              reference_guidance="disentangled", reference_guidance_scale=cfg.reference_scale)
    boxes = np.broadcast_to(np.asarray(TWO_PEOPLE_BOXES, np.float32), (len(pairs), 2, 4))
    images = np.asarray(generate(pipeline, tokenize(pipeline, [prompt] * len(pairs)), key=jax.random.key(cfg.seed),
                                 cfg=sampling, references=refs, boxes=boxes, identity_cfg=identity_cfg))
    own, other = [], []
    for k, (x0, y0, x1, y1) in enumerate(TWO_PEOPLE_BOXES):
        region = images[:, y0:y1, x0:x1]
        own.append(evaluation.sim_target(metrics.embedder, region, targets[:, k]))
        other.append(evaluation.sim_target(metrics.embedder, region, targets[:, 1 - k]))
    figures = {"pairs": [list(p) for p in pairs], "prompt": prompt,
               "region_sim_target_own": float(np.mean(own)), "region_sim_target_other": float(np.mean(other)),
               "per_region_own": [float(v) for v in np.mean(own, axis=1)],
               "per_region_other": [float(v) for v in np.mean(other, axis=1)],
               "per_pair_own_minus_other": [float(v) for v in np.mean(np.subtract(own, other), axis=0)]}
    log(f"two people in one image ({len(pairs)} pairs): region SimTarget with its own person "
        f"{figures['region_sim_target_own']:.3f}, with the other person {figures['region_sim_target_other']:.3f}")
    return figures, [(images[i], refs[i]) for i in range(len(pairs))]


def save_two_people_figure(path: Path, samples: list, scale: int) -> None:
    """two_people.png: per pair, both reference crops and the generated image with the two boxes drawn."""
    from fusion_jax.figures import draw_boxes, labelled_grid, upscale

    rows = []
    for image, refs in samples:
        crops = [upscale(np.round((refs[k, 0] + 1) * 127.5).astype(np.uint8), scale) for k in range(2)]
        boxed = draw_boxes(upscale(image, scale), [[v * scale for v in b] for b in TWO_PEOPLE_BOXES],
                           [(255, 255, 255), (0, 0, 0)], width=2)
        rows.append([crops[0], crops[1], boxed])
    labelled_grid(rows, ["left (ref.)", "right (ref.)", "generated\n(white: left box,\nblack: right box)"], scale=1,
                  title="two held-out people in one image, one reference each").save(path)


def quickstart(cfg: QuickstartConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (from scratch) or load the shipped model, sample held-out identities with 0 / 1 / 4 references,
    score them, write OUT/grid.png, OUT/two_people.png and OUT/metrics.json. Returns the metrics dict."""
    start = time.perf_counter()
    out = os.path.abspath(cfg.out)
    os.makedirs(out, exist_ok=True)
    if cfg.from_scratch:
        model_dir, metrics_dir, timings, _ = train_from_scratch(cfg, out, log)
        record = {"metric_setup": cfg.metric_setup, "metric_seed": cfg.seed}
    else:
        model_dir, metrics_dir, record = shipped(cfg)
        timings = {}
        log(f"shipped model {model_dir} (trained by: {record.get('command', 'see training.json')}); "
            f"--from-scratch retrains every stage")
    t = time.perf_counter()
    metrics = load_metrics(cfg, metrics_dir, record, verbose=True)
    timings["metric_models_s"] = timings.get("metric_models_s", 0.0) + time.perf_counter() - t

    log(f"sampling {cfg.identities} held-out identities x {cfg.prompts} prompts with 0, 1 and 4 references")
    t = time.perf_counter()
    pipeline, identity_cfg = assets.load_quickstart_model(model_dir)
    eval_set = mm.build_eval_set(model_faces(pipeline), cfg.identities, cfg.prompts)
    images, results, per_image = {}, {}, {}
    for n in SETTING_NAMES:
        images[n] = mm.sample_images(pipeline, identity_cfg, eval_set, n, steps=cfg.sample_steps,
                                     guidance=cfg.guidance, reference_guidance="disentangled",
                                     reference_scale=cfg.reference_scale, batch=min(16, len(eval_set.captions)),
                                     seed=cfg.seed)
        per_image[n] = per_image_scores(metrics, images[n], eval_set, n)
        results[n] = summarise(per_image[n], eval_set.identity_ids, cfg.seed)
    timings["sampling_s"] = time.perf_counter() - t
    save_grid_figure(Path(out) / "grid.png", eval_set, images, cfg.grid_rows, cfg.grid_scale)

    result: dict[str, Any] = {}
    for n, values in results.items():  # 'sim_target_1_reference' and its interval 'sim_target_1_reference_ci95'
        for k, v in values.items():
            name, ci = (k[: -len("_ci95")], "_ci95") if k.endswith("_ci95") else (k, "")
            result[f"{name}_{SETTING_NAMES[n]}{ci}"] = v
    result.update(summarise({name: per_image[a][key] - per_image[b][key] for name, (key, a, b) in DIFFERENCES.items()},
                            eval_set.identity_ids, cfg.seed))
    result.update(frechet_figures(metrics, images, eval_set))
    result.update(mm.real_photo_reference_scores(metrics, eval_set))
    if cfg.two_people:
        result["two_people"], samples = two_people(pipeline, identity_cfg, metrics, cfg, log)
        save_two_people_figure(Path(out) / "two_people.png", samples, cfg.grid_scale)
    report = metrics.report
    result["embedder_verification_accuracy"] = report["verification"]["verification_accuracy"]
    result["reader_accuracy_real_photos"] = report["reader_accuracy"]["mean"]
    timings["total_s"] = time.perf_counter() - start
    result["timings"] = timings
    result["model"] = str(model_dir)
    result["model_training"] = record.get("command") if not cfg.from_scratch else "from scratch (timings)"
    result["settings"] = {**dataclasses.asdict(cfg), "eval_identities": int(len(set(eval_set.identity_ids))),
                          "eval_images_per_setting": len(eval_set.captions),
                          "intervals": "95% percentile bootstrap over held-out identities (2000 resamples)"}
    with open(Path(out) / "metrics.json", "w") as f:
        json.dump(result, f, indent=2)
    log("\n" + format_table_with_intervals(results))
    log("paired differences (same rows): " + ", ".join(
        f"{name} {result[name]:+.3f} [{result[name + '_ci95'][0]:+.3f}, {result[name + '_ci95'][1]:+.3f}]"
        for name in DIFFERENCES))
    log(f"Frechet distance (identity embedder space) vs real held-out photos: "
        + ", ".join(f"{SETTING_NAMES[n]} {result[f'frechet_{SETTING_NAMES[n]}']:.3f}" for n in SETTING_NAMES)
        + f"; real-vs-real floor {result['frechet_real_floor']:.3f}")
    log(f"real held-out photos: same-person similarity {result['real_photo_same_person_similarity']:.3f}, "
        f"other-person {result['real_photo_other_person_similarity']:.3f}; embedder verification accuracy "
        f"{result['embedder_verification_accuracy']:.3f}; reader accuracy on real photos "
        f"{result['reader_accuracy_real_photos']:.3f}")
    log(f"wrote {Path(out) / 'grid.png'}, {Path(out) / 'two_people.png'} and {Path(out) / 'metrics.json'} "
        f"({timings['total_s']:.0f}s)")
    return result


def format_table_with_intervals(results: dict[int, dict[str, Any]], keys=TABLE_KEYS) -> str:
    """Markdown: one row per setting, each cell 'mean [low, high]'."""
    lines = ["| setting | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for n, values in results.items():
        cells = [f"{values[k]:.3f} [{values[k + '_ci95'][0]:.3f}, {values[k + '_ci95'][1]:.3f}]" for k in keys]
        lines.append(f"| {SETTING_NAMES[n]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
