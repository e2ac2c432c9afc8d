"""The miniature reproduction (`infer/evaluate.py`): the identity methods that fit the miniature, trained on one
base model with the same training compute, scored on held-out synthetic identities, and the seed papers' claims
checked against the figures.

Equal compute: every method trains for the FLOPs of `fusion_steps` steps of Face Fusion decoupled / fixed (the
quickstart's method). A method's FLOPs per step are XLA's cost analysis of its lowered training step (forward,
backward and optimizer on the real batch shapes), so a method whose step costs twice as much trains half the steps.

Every figure is a mean over held-out identities x prompts with a 95% percentile bootstrap interval over identities;
a claim compares two settings through the paired per-image difference (same rows, same initial noise) and its
interval: `held` when the interval lies above 0, `not held` otherwise, `not testable here` when the miniature
cannot measure it (the reason is given).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from fusion_jax import miniature as mm
from fusion_jax import miniature_style
from fusion_jax.data import synthfaces


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row family of the table: a registered identity method with its options."""

    label: str  # the table's name for it
    overrides: tuple[str, ...]  # key=value overrides of configs/synthfaces/face_fusion.yaml ({reference_size}: the
    #                             stream's reference crop side)
    region_masks: bool = False  # takes one box per person (the two-people test runs on it)
    face_box: bool = False  # is told where the face goes (a box per image; FlashFace's mask channel): the mean
    #                         face box of the held-out photos
    style_tower: bool = False  # reads the miniature's style tower (OUT/style_tower, trained once per folder by
    #                            miniature_style; {style_tower} / {text_width} in the overrides); also sampled
    #                            over FaceStudio's alpha sweep with contradicting style images (style_sweep)


_FACESTUDIO = ("objective.name=facestudio", "train.trainable=adapter+lora", "data.synthfaces.recognition_embedding=true",
               "facestudio.style_encoder={style_tower}", "facestudio.style_dim={text_width}",
               "facestudio.text_branch=direct")

VARIANTS: dict[str, Variant] = {
    "decoupled_fixed": Variant("Face Fusion (decoupled, fixed t)",
                               ("fusion.combine=decoupled", "fusion.reference_timestep=fixed"), True),
    "joint_fixed": Variant("Face Fusion (joint, fixed t)", ("fusion.combine=joint", "fusion.reference_timestep=fixed"),
                           True),
    "decoupled_current": Variant("Face Fusion (decoupled, current t)",
                                 ("fusion.combine=decoupled", "fusion.reference_timestep=current"), True),
    "joint_current": Variant("Face Fusion (joint, current t)",
                             ("fusion.combine=joint", "fusion.reference_timestep=current"), True),
    # decoupled_fixed trained on 4 reference slots holding 1-4 distinct photos (data.pipeline.vary_references):
    # the ablation for "more references help" (the others train on 2 distinct photos and never see 1 or 4)
    "decoupled_fixed_varied": Variant("Face Fusion (decoupled, fixed t, 1-4 references in training)", (
        "fusion.combine=decoupled", "fusion.reference_timestep=fixed", "data.pipeline.num_references=4",
        "data.pipeline.vary_references=true"), True),
    # the pooled one-token baseline (identity/single_token.py): IP-Adapter-like, same options as decoupled_fixed
    "single_token": Variant("single token (IP-Adapter-like)", (
        "objective.name=single_token", "single_token.combine=decoupled", "single_token.reference_timestep=fixed")),
    # IP-Adapter-FaceID: tokens from a face-recognition embedding (the miniature's ArcFace stand-in,
    # data.synth_recognition), adapter + LoRA, the release's recipe otherwise
    "ip_adapter_faceid": Variant("IP-Adapter-FaceID (recognition-embedding tokens)", (
        "objective.name=ip_adapter_faceid", "train.trainable=adapter+lora",
        "data.synthfaces.recognition_embedding=true")),
    # FlashFace: ReferenceNet feature maps into the decoder self-attention, the face-mask channel, trained from
    # the base model's copy
    "flashface": Variant("FlashFace (reference feature maps)", (
        "objective.name=flashface", "flashface.reference_size={reference_size}", "train.trainable=reference"),
        face_box=True),
    # FaceStudio: tokens from [style image embedding || recognition embedding] through one linear layer, trained by
    # reconstruction with the face-masked photo as the style input; the text branch is the pooled text state the
    # style tower was trained to meet (text_branch=direct); adapter + LoRA (the paper's lighter recipe). Half the
    # training captions leave the background out (data.synthfaces.caption_background_dropout), as real captions
    # leave out much of what the style image shows: with every caption stating it, the style input tells the
    # model nothing the prompt does not (facestudio_full_captions, the ablation)
    "facestudio": Variant("FaceStudio (hybrid style / identity tokens)", (
        *_FACESTUDIO, "data.synthfaces.caption_background_dropout=0.5"), style_tower=True),
    "facestudio_full_captions": Variant("FaceStudio (hybrid style / identity tokens, every caption states the "
                                        "background)", _FACESTUDIO, style_tower=True),
}
REFERENCE_VARIANT = "decoupled_fixed"  # the compute budget is counted in this variant's steps
SINGLE_CFG_VARIANT = "flashface"  # also sampled with single CFG (FlashFace's disentangled-guidance claim)

STYLE_TOWER_DIR = "style_tower"  # under OUT: the miniature style tower (miniature_style.train_style_tower)

# Registered methods the miniature cannot train, and why (reported in the table's notes); none at present.
NOT_IN_MINIATURE: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """`infer/evaluate.py --config configs/synthfaces/experiment.yaml`: the miniature reproduction."""

    out: str = ""  # output folder (shares pipeline/, base/, base_pipeline/, metrics/ with a quickstart DIR)
    base_steps: int = 5000  # text-to-image base steps
    fusion_steps: int = 800  # the compute budget: this many training steps of decoupled_fixed, in FLOPs
    batch_size: int = 16  # training batch
    widths: tuple[int, ...] = mm.MiniatureModelConfig().widths  # UNet channels per level
    variants: tuple[str, ...] = tuple(VARIANTS)  # which VARIANTS to train and evaluate
    identities: int = 16  # held-out identities
    prompts: int = 4  # prompts per identity
    sample_steps: int = 20  # DDIM steps
    guidance: float = 3.0  # text guidance scale
    reference_scale: float = 2.0  # reference guidance scale (disentangled guidance)
    two_people: int = 4  # pairs of identities in one image (region test), 0 = skip
    metric_setup: str = "default"  # metric models: 'default' | 'fast' (tests)
    seed: int = 0  # seeds every stage as the quickstart's --seed: weights, data order, metric models, sampling
    style_tower_steps: int = miniature_style.StyleTowerConfig().steps  # FaceStudio's style tower training steps
    figures_dir: str = ""  # also copy the PNG plots here (docs/)
    results_md: str = ""  # also write the section between this file's evaluate markers (benchmarks/RESULTS.md)


RESULTS_BEGIN = "<!-- evaluate.py section: begin -->"
RESULTS_END = "<!-- evaluate.py section: end -->"
PLOTS = ("evaluation_identity_vs_prompt.png", "evaluation_sim_target_vs_references.png")


# ------------------------------------------------------------------------------------------------- compute
def identity_recipe(seed: int) -> tuple[str, ...]:
    """Overrides every variant starts from: the quickstart's Face Fusion recipe and stage seeds."""
    from fusion_jax.quickstart import QuickstartConfig, fusion_recipe

    return fusion_recipe(QuickstartConfig(out="", seed=seed))


def stage_configs(cfg: EvaluationConfig, out: str, steps: int, extra_fusion: Sequence[str] = ()):
    """(base config, identity-stage config, MiniatureModelConfig) under OUT, seeded as the quickstart's."""
    from fusion_jax.quickstart import stage_seed_overrides

    return mm.stage_configs(out, cfg.base_steps, steps, cfg.batch_size, cfg.widths,
                            extra_base=stage_seed_overrides(cfg.seed),
                            extra_fusion=(*identity_recipe(cfg.seed), *extra_fusion))


def variant_config(cfg: EvaluationConfig, out: str, name: str, steps: int):
    """The training config of variant `name` with `steps` steps, in its own workdir OUT/fusion_<name> (never a
    quickstart folder's 'fusion': that run has the quickstart's length and rounds, not this budget)."""
    workdir = f"fusion_{name}"
    _, probe, model_cfg = stage_configs(cfg, out, steps)
    fill = {"reference_size": probe.data.pipeline.reference_size, "text_width": model_cfg.text_width,
            "style_tower": os.path.join(out, STYLE_TOWER_DIR)}
    overrides = [o.format(**fill) for o in VARIANTS[name].overrides]
    _, fusion, _ = stage_configs(cfg, out, steps, (*overrides, f"workdir={os.path.join(out, workdir)}"))
    return fusion


# Settings a saved run may differ in and still be reused: where it lives, logging and saving. Not its length:
# the learning-rate schedule is laid out over train.steps, so a run of another length (cut short or extended) is
# not the run this budget asks for.
_REUSABLE_DIFFERENCES = {"workdir"}
_REUSABLE_PREFIXES = ("logging.", "checkpoint.")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """'a.b.c' -> value of a config; the registered method sections under their own names ('facestudio.alpha')."""
    if dataclasses.is_dataclass(tree):
        tree = dataclasses.asdict(tree)
        if isinstance(tree.get("sections"), (tuple, list)):
            tree.update(dict(tree.pop("sections")))
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def check_reusable(config) -> None:
    """A workdir that already holds a run must have been trained with `config` (up to its length): otherwise a
    ValueError names the folder and the settings that differ (nothing is trained over it)."""
    from fusion_jax.config import load_config

    saved_path = os.path.join(config.workdir, "config.yaml")
    if mm.finished_step(config.workdir) is None or not os.path.isfile(saved_path):
        return
    from fusion_jax.precision import resolve_compute_dtype

    saved, wanted = _flat(load_config(saved_path, [], cls=type(config))), _flat(config)
    for flat in (saved, wanted):  # 'auto' and the dtype it means on this machine are the same run
        flat["train.compute_dtype"] = str(resolve_compute_dtype(flat["train.compute_dtype"]))
    differ = sorted(k for k in set(saved) | set(wanted) if k not in _REUSABLE_DIFFERENCES
                    and not k.startswith(_REUSABLE_PREFIXES) and saved.get(k) != wanted.get(k))
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} here" for k in differ[:6])
        raise ValueError(f"{config.workdir} holds a run with other settings ({detail}); use another out= or "
                         f"remove that folder")


def step_flops(config) -> float:
    """XLA's FLOP count of one training step of `config` (lowered on the stream's batch shapes, not run)."""
    import jax

    from fusion_jax.experiment import build_experiment
    from fusion_jax.parallel import single_device_mesh
    from fusion_jax.training import Trainer

    exp = build_experiment(config)
    trainer = Trainer(exp.model_factory, exp.loss_fn, config.train, single_device_mesh(), trainable=exp.trainable,
                      pretrained=exp.pretrained)
    batch = next(exp.batch_iterator_factory(config))
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), batch)
    cost = trainer.lower(shapes).cost_analysis()
    flops = float((cost or {}).get("flops", float("nan")))
    if not np.isfinite(flops) or flops <= 0:
        raise RuntimeError(f"XLA reported no FLOP count for the training step of {config.workdir}")
    return flops


def plan_steps(flops: dict[str, float], budget_steps: int) -> dict[str, int]:
    """Steps per variant for the FLOPs of `budget_steps` steps of REFERENCE_VARIANT (at least 1)."""
    budget = budget_steps * flops[REFERENCE_VARIANT]
    return {name: max(1, int(round(budget / f))) for name, f in flops.items()}


def measure_flops(cfg: EvaluationConfig, out: str, names: Sequence[str], log) -> dict[str, float]:
    """FLOPs per training step of each variant, cached in OUT/compute.json (keyed by the settings that change
    them)."""
    path = Path(out) / "compute.json"
    key = json.dumps({"batch": cfg.batch_size, "widths": list(cfg.widths), "base_steps": cfg.base_steps})
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if cache.get("key") != key:
        cache = {"key": key, "flops_per_step": {}}
    for name in names:
        if name not in cache["flops_per_step"]:
            t = time.perf_counter()
            cache["flops_per_step"][name] = step_flops(variant_config(cfg, out, name, 1))
            log(f"  {name}: {cache['flops_per_step'][name] / 1e9:.2f} GFLOP per training step "
                f"({time.perf_counter() - t:.0f} s to lower)")
            path.write_text(json.dumps(cache, indent=2))
    return {n: cache["flops_per_step"][n] for n in names}


# ------------------------------------------------------------------------------------------------ sampling
def mean_face_boxes(eval_set: mm.EvalSet) -> np.ndarray:
    """(M, 1, 4) pixel boxes: the mean face box of the held-out reference photos, for every row."""
    box = eval_set.reference_boxes.reshape(-1, 4).mean(axis=0)
    return np.broadcast_to(box, (len(eval_set.captions), 1, 4)).astype(np.float32)


def sample_and_score(pipeline, identity_cfg, metrics, eval_set, cfg: EvaluationConfig, n: int,
                     guidance_mode: str = "disentangled", boxes: Optional[np.ndarray] = None
                     ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from fusion_jax.quickstart import per_image_scores

    images = mm.sample_images(pipeline, identity_cfg, eval_set, n, steps=cfg.sample_steps, guidance=cfg.guidance,
                              reference_guidance=guidance_mode, reference_scale=cfg.reference_scale,
                              batch=min(16, len(eval_set.captions)), seed=cfg.seed, boxes=boxes)
    return images, per_image_scores(metrics, images, eval_set, n)


def alpha_sweep(pipeline, identity_cfg, metrics, eval_set: mm.EvalSet, cfg: EvaluationConfig, faces,
                variant: str) -> dict[str, dict[str, np.ndarray]]:
    """FaceStudio with 1 reference and each row's contradicting style photo at every style_sweep.ALPHAS: the
    table's scores plus style / text fidelity per image (same rows and initial noise at every alpha)."""
    from fusion_jax import style_sweep
    from fusion_jax.quickstart import per_image_scores

    styles, style_labels = style_sweep.contradicting_styles(eval_set, faces, cfg.seed)
    rows = {}
    for alpha in style_sweep.ALPHAS:
        images = mm.sample_images(pipeline, dataclasses.replace(identity_cfg, alpha=float(alpha)), eval_set, 1,
                                  steps=cfg.sample_steps, guidance=cfg.guidance, reference_guidance="disentangled",
                                  reference_scale=cfg.reference_scale, batch=min(16, len(eval_set.captions)),
                                  seed=cfg.seed, style_images=styles)
        rows[style_sweep.row_name(variant, alpha)] = {
            **per_image_scores(metrics, images, eval_set, 1),
            **style_sweep.fidelity_scores(metrics, images, eval_set, style_labels)}
    return rows


def contradicting_rows(eval_set: mm.EvalSet, attribute: str) -> np.ndarray:
    """Rows whose prompted `attribute` differs from the (first) reference photo's: prompts against the reference."""
    a = synthfaces.ATTRIBUTE_NAMES.index(attribute)
    return eval_set.labels[:, a] != eval_set.reference_labels[:, 0, a]


# ---------------------------------------------------------------------------------------------------- claims
def paired_difference(a: np.ndarray, b: np.ndarray, groups: np.ndarray, seed: int) -> dict[str, Any]:
    """Mean of a - b (per image, same rows) with its 95% bootstrap interval over `groups`."""
    from fusion_jax.reproduction.stats import bootstrap_mean_interval

    mean, low, high = bootstrap_mean_interval(np.asarray(a) - np.asarray(b), np.asarray(groups).astype(str),
                                              seed=seed)
    return {"difference": mean, "ci95": [low, high]}


def verdict(difference: dict[str, Any]) -> str:
    return "held" if difference["ci95"][0] > 0 else "not held"


def check_claims(per_image: dict[str, dict[str, np.ndarray]], eval_set: mm.EvalSet, extras: dict[str, Any],
                 seed: int) -> list[dict[str, Any]]:
    """The seed papers' claims, each with its verdict and the figure that decides it."""
    groups = eval_set.identity_ids
    claims: list[dict[str, Any]] = []

    def compare(claim, first, second, metric, rows=None, what=""):
        if first not in per_image or second not in per_image:
            claims.append({"claim": claim, "verdict": "not testable here",
                           "figure": f"needs rows {first} and {second} (not in this run's variants)"})
            return
        keep = np.ones(len(groups), bool) if rows is None else rows
        if not keep.any():
            claims.append({"claim": claim, "verdict": "not testable here", "figure": f"no rows {what}"})
            return
        d = paired_difference(per_image[first][metric][keep], per_image[second][metric][keep], groups[keep], seed)
        claims.append({"claim": claim, "verdict": verdict(d), "difference": d["difference"], "ci95": d["ci95"],
                       "figure": f"{metric} {first} - {second}{what}: {d['difference']:+.3f} "
                                 f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"})

    compare("Face Fusion: multi-scale reference encoding by the UNet beats a single embedding token",
            "decoupled_fixed_1", "single_token_1", "sim_target")
    if "ip_adapter_faceid_1" in per_image:  # the recognition-embedding baseline, when this run has it
        compare("Face Fusion: multi-scale reference encoding beats tokens from a face-recognition embedding "
                "(IP-Adapter-FaceID)", "decoupled_fixed_1", "ip_adapter_faceid_1", "sim_target")
    compare("Face Fusion: more references help (4 vs 1)", "decoupled_fixed_4", "decoupled_fixed_1", "sim_target")
    if "decoupled_fixed_varied_1" in per_image:  # the ablation row, when this run has it
        compare("Face Fusion trained with 1-4 references: more references help (4 vs 1)",
                "decoupled_fixed_varied_4", "decoupled_fixed_varied_1", "sim_target")
    two = extras.get("two_people")
    if two:
        from fusion_jax.reproduction.stats import bootstrap_mean_interval

        diffs = np.asarray(two["per_pair_own_minus_other"])
        mean, low, high = bootstrap_mean_interval(diffs, np.arange(len(diffs)).astype(str), seed=seed)
        claims.append({"claim": "Face Fusion: several identities in one image each keep their identity inside "
                                "their region", "verdict": "held" if low > 0 else "not held",
                       "difference": mean, "ci95": [low, high],
                       "figure": f"region SimTarget own {two['region_sim_target_own']:.3f} vs other person "
                                 f"{two['region_sim_target_other']:.3f} (leakage); own - other {mean:+.3f} "
                                 f"[{low:+.3f}, {high:+.3f}] over {len(diffs)} pairs"})
    else:
        claims.append({"claim": "Face Fusion: several identities in one image each keep their identity inside "
                                "their region", "verdict": "not testable here",
                       "figure": "two_people=0 or no region-mask variant in this run"})
    claims.append({"claim": "FlashFace: feature maps keep details (moles, scars, tattoos) a token loses",
                   "verdict": "not testable here",
                   "figure": "the detail reader (fusion_jax/synth_details.py) reads held-out real 32 px photos at "
                             "0.265 against a majority class of 0.285: the marks are a pixel or less at this size"})
    for attribute in ("expression", "gaze"):
        rows = contradicting_rows(eval_set, attribute)
        compare(f"FlashFace: disentangled guidance follows {attribute} prompts that contradict the reference "
                f"better than single CFG", "flashface_1", "flashface_1_cfg", f"prompt_accuracy_{attribute}",
                rows=rows, what=f" on the {int(rows.sum())} rows whose prompted {attribute} differs from the "
                                f"reference's")
    from fusion_jax import style_sweep

    swept = [v for v in VARIANTS if VARIANTS[v].style_tower and style_sweep.row_name(v, 0.0) in per_image]
    for v in swept or [next(v for v in VARIANTS if VARIANTS[v].style_tower)]:
        claims.append(style_sweep.trade_off_claim(per_image, groups, seed, v, v if len(swept) > 1 else ""))
    return claims


# ----------------------------------------------------------------------------------------------------- report
TABLE_KEYS = ("sim_target", "sim_ref", "paste", "prompt_accuracy", "prompt_accuracy_expression",
              "prompt_accuracy_gaze")


def summarise_rows(per_image: dict[str, dict[str, np.ndarray]], groups: np.ndarray, seed: int) -> dict[str, dict]:
    from fusion_jax.quickstart import summarise

    return {row: summarise(values, groups, seed) for row, values in per_image.items()}


def row_label(row: str) -> str:
    """'decoupled_fixed_4' -> 'Face Fusion (decoupled, fixed t), 4 references'."""
    if row == "no_reference":
        return "no reference (base model)"
    from fusion_jax import style_sweep

    if style_sweep.sweep_of(row):
        name, alpha = style_sweep.sweep_of(row)
        return f"{VARIANTS[name].label}, 1 reference, contradicting style image, alpha {alpha}"
    if row.endswith("_1_cfg"):
        return f"{VARIANTS[row[: -len('_1_cfg')]].label}, 1 reference, single CFG"
    name, n = row.rsplit("_", 1)
    return f"{VARIANTS[name].label}, {n} reference{'s' if n != '1' else ''}"


def results_table(summary: dict[str, dict], keys: Sequence[str] = TABLE_KEYS) -> str:
    lines = ["| setting | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row, values in summary.items():
        cells = [f"{values[k]:.3f} [{values[k + '_ci95'][0]:.3f}, {values[k + '_ci95'][1]:.3f}]" if k in values
                 else "" for k in keys]
        lines.append(f"| {row_label(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plots(out: Path, summary: dict[str, dict], variants: Sequence[str]) -> list[Path]:
    """Identity similarity vs prompt accuracy per method (1 and 4 references, and the base model); SimTarget vs
    the number of references per method (0 = the base model)."""
    from fusion_jax.reproduction.report import scatter_png

    base = summary.get("no_reference")
    scatter, curve = {}, {}
    for v in variants:
        rows = [r for r in (f"{v}_1", f"{v}_4") if r in summary]
        scatter[v] = (np.array([summary[r]["prompt_accuracy"] for r in rows]),
                      np.array([summary[r]["sim_target"] for r in rows]))
        refs = ([0] if base else []) + [int(r.rsplit("_", 1)[1]) for r in rows]
        sims = ([base["sim_target"]] if base else []) + [summary[r]["sim_target"] for r in rows]
        curve[v] = (np.array(refs, float), np.array(sims))
    if base:
        scatter["no reference"] = (np.array([base["prompt_accuracy"]]), np.array([base["sim_target"]]))
    paths = [out / PLOTS[0], out / PLOTS[1]]
    scatter_png(paths[0], scatter, "prompt accuracy", "SimTarget",
                "identity similarity vs prompt accuracy (1 and 4 references)")
    scatter_png(paths[1], curve, "number of references", "SimTarget", "SimTarget vs number of references")
    from fusion_jax import style_sweep

    for v in variants:
        if VARIANTS[v].style_tower and style_sweep.write_plot(out / style_sweep.plot_name(v), summary, v):
            paths.append(out / style_sweep.plot_name(v))
    return paths


def report_markdown(cfg: EvaluationConfig, doc: dict[str, Any]) -> str:
    from fusion_jax import style_sweep

    compute = doc["compute"]
    lines = [
        "Command: `python infer/evaluate.py --config configs/synthfaces/experiment.yaml out=OUT"
        + "".join(f" {o}" for o in doc["overrides"] if not o.startswith(("out=", "results_md=", "figures_dir=")))
        + "`",
        "",
        f"Held-out identities: {doc['eval_identities']} x {cfg.prompts} prompts = {doc['eval_images_per_setting']} "
        f"images per row; base model {cfg.base_steps} steps; every method trained for the FLOPs of "
        f"{cfg.fusion_steps} steps of Face Fusion decoupled / fixed ({compute['budget_tflop']:.1f} TFLOP); DDIM "
        f"{cfg.sample_steps}, text guidance {cfg.guidance}, reference guidance {cfg.reference_scale} "
        f"(disentangled unless the row says single CFG). Brackets: 95% bootstrap interval over identities.",
        "",
        results_table({r: v for r, v in doc["summary"].items() if not style_sweep.sweep_of(r)}),
        "",
        "| method | GFLOP per training step | steps | wall s (training) |",
        "|---|---|---|---|",
    ]
    for v in cfg.variants:
        timing = doc["timings"][v]
        wall = f"{timing['seconds']:.0f}" if timing.get("trained", True) else "reused"
        lines.append(f"| {VARIANTS[v].label} | {compute['gflop_per_step'][v]:.2f} | {compute['steps'][v]} | "
                     f"{wall} |")
    sweep = {r: v for r, v in doc["summary"].items() if style_sweep.sweep_of(r)}
    if sweep:
        lines += ["", "FaceStudio's alpha sweep (style fidelity / text fidelity: the background colour and pattern "
                      "read as the style image's / the prompt's, which always differ):", "",
                  results_table(sweep, ("style_fidelity", "text_fidelity", "sim_target", "prompt_accuracy"))]
    real = doc["real_photos"]
    lines += ["", f"Real held-out photos: same-person similarity {real['real_photo_same_person_similarity']:.3f}, "
                  f"other-person {real['real_photo_other_person_similarity']:.3f}; embedder verification accuracy "
                  f"{doc['embedder_verification_accuracy']:.3f}; reader accuracy on real photos "
                  f"{doc['reader_accuracy_real_photos']:.3f}."
                  + (" Not in the miniature: " + "; ".join(f"{k} ({why})" for k, why in NOT_IN_MINIATURE.items())
                     + "." if NOT_IN_MINIATURE else "")
                  + style_tower_note(doc.get("style_tower")),
              "", "Claims of the seed papers:", "", "| claim | verdict | deciding figure |", "|---|---|---|"]
    for c in doc["claims"]:
        lines.append(f"| {c['claim']} | **{c['verdict']}** | {c['figure']} |")
    swept = dict.fromkeys(style_sweep.sweep_of(r)[0] for r in doc["summary"] if style_sweep.sweep_of(r))
    plots = PLOTS + tuple(style_sweep.plot_name(v) for v in swept)
    lines += ["", f"Plots: {', '.join(plots)}. Wall time of this run: {doc['wall_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def style_tower_note(record: Optional[dict]) -> str:
    """The style tower's line in the report: its training and held-out background retrieval."""
    if not record:
        return ""
    r = record["heldout_background_retrieval"]
    return (f" FaceStudio's style tower (miniature_style: a {record['settings']['tower']['layers']}-layer CLIP ViT "
            f"trained {record['steps']} steps against the frozen text encoder, {record['seconds']:.0f} s) retrieves "
            f"held-out masked photos' background colour / pattern / both among the 24 background captions at "
            f"{r['colour']:.3f} / {r['pattern']:.3f} / {r['both']:.3f} (chance 0.167 / 0.250 / 0.042); the "
            f"FaceStudio rows with references use alpha 1 and no style image (the condition training saw with the "
            f"style dropped), the alpha rows a style photo whose background contradicts the prompt.")


def replace_section(path: str, section: str) -> None:
    """Write `section` between RESULTS_BEGIN and RESULTS_END of `path` (appended with the markers if absent)."""
    text = Path(path).read_text() if os.path.isfile(path) else ""
    block = f"{RESULTS_BEGIN}\n{section}{RESULTS_END}"
    if RESULTS_BEGIN in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_BEGIN, 1)
        text = head + block + rest.split(RESULTS_END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    Path(path).write_text(text)


# ------------------------------------------------------------------------------------------------------- run
def evaluate(cfg: EvaluationConfig, log: Callable[[str], None] = print,
             overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Trains the base model and each variant at equal compute (every stage resumes), samples held-out identities
    with 0 / 1 / 4 references, checks the claims; writes OUT/evaluation.{md,json} and the plots."""
    from fusion_jax import synth_metrics
    from fusion_jax.quickstart import QuickstartConfig, seeded_metric_setup, two_people

    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    if not cfg.variants:
        raise ValueError("variants: name at least one of " + ", ".join(VARIANTS))
    if not cfg.out:
        raise ValueError("out: set the output folder (out=DIR)")
    start = time.perf_counter()
    out = os.path.abspath(cfg.out)
    base, _, model_cfg = stage_configs(cfg, out, cfg.fusion_steps)
    model_cfg = dataclasses.replace(model_cfg, seed=cfg.seed)
    check_reusable(base)
    mm.write_miniature_pipeline(os.path.join(out, "pipeline"), model_cfg)
    log(f"base model: {cfg.base_steps} steps")
    timings: dict[str, Any] = {"base": mm.train_stage(base, log)}
    mm.export_base_pipeline(base.workdir, os.path.join(out, "pipeline"), os.path.join(out, "base_pipeline"))
    metrics = synth_metrics.prepare_synthface_metrics(os.path.join(out, "metrics"), setup=seeded_metric_setup(
        cfg.metric_setup, base.data.synthfaces.image_size, cfg.seed))
    eval_set = mm.build_eval_set(base.data.synthfaces, cfg.identities, cfg.prompts)

    style_record = None
    if any(VARIANTS[v].style_tower for v in cfg.variants):  # before the FLOP count: the step runs the tower
        t = time.perf_counter()
        style_record = miniature_style.train_style_tower(
            os.path.join(out, STYLE_TOWER_DIR), os.path.join(out, "base_pipeline"), base.data.synthfaces,
            miniature_style.StyleTowerConfig(steps=cfg.style_tower_steps, seed=cfg.seed), log)
        timings["style_tower_s"] = time.perf_counter() - t
    log("FLOPs per training step (XLA cost analysis of the lowered step):")
    flops = measure_flops(cfg, out, sorted({REFERENCE_VARIANT, *cfg.variants}), log)
    steps = plan_steps(flops, cfg.fusion_steps)

    per_image: dict[str, dict[str, np.ndarray]] = {}
    t = time.perf_counter()
    base_model, _, _ = mm.restore_model(base.workdir, use_ema=True)
    base_pipeline = mm.pixel_pipeline(os.path.join(out, "base_pipeline"), base_model.unet)
    _, per_image["no_reference"] = sample_and_score(base_pipeline, None, metrics, eval_set, cfg, 0)
    timings["no_reference_sampling_s"] = time.perf_counter() - t
    extras: dict[str, Any] = {}
    for name in cfg.variants:
        config = variant_config(cfg, out, name, steps[name])
        log(f"{VARIANTS[name].label}: {steps[name]} steps ({flops[name] / 1e9:.2f} GFLOP each)")
        check_reusable(config)
        timings[name] = mm.train_stage(config, log)
        model, run_config, _ = mm.restore_model(config.workdir, use_ema=True)
        pipeline = mm.pixel_pipeline(config.model.pipeline, model.unet)
        identity_cfg = mm.run_identity_config(run_config)
        boxes = mean_face_boxes(eval_set) if VARIANTS[name].face_box else None
        t = time.perf_counter()
        if VARIANTS[name].style_tower:  # the identity rows: no style image, alpha 1 (training's style-dropped input)
            styled_cfg, identity_cfg = identity_cfg, dataclasses.replace(identity_cfg, alpha=1.0)
        for n in (1, 4):
            _, per_image[f"{name}_{n}"] = sample_and_score(pipeline, identity_cfg, metrics, eval_set, cfg, n,
                                                           boxes=boxes)
        if VARIANTS[name].style_tower:
            per_image.update(alpha_sweep(pipeline, styled_cfg, metrics, eval_set, cfg, base.data.synthfaces, name))
        if name == SINGLE_CFG_VARIANT:  # single CFG on the same rows: the disentangled-guidance claim
            _, per_image[f"{name}_1_cfg"] = sample_and_score(pipeline, identity_cfg, metrics, eval_set, cfg, 1, "cfg",
                                                             boxes=boxes)
        if VARIANTS[name].region_masks and cfg.two_people and "two_people" not in extras:
            qs = QuickstartConfig(out=out, sample_steps=cfg.sample_steps, guidance=cfg.guidance,
                                  reference_scale=cfg.reference_scale, two_people=cfg.two_people, seed=cfg.seed)
            extras["two_people"], _ = two_people(pipeline, identity_cfg, metrics, qs, log)
            extras["two_people"]["variant"] = name
        timings[f"{name}_sampling_s"] = time.perf_counter() - t
    summary = summarise_rows(per_image, eval_set.identity_ids, cfg.seed)
    claims = check_claims(per_image, eval_set, extras, cfg.seed)
    doc = {
        "config": dataclasses.asdict(cfg), "overrides": list(overrides), "summary": summary, "claims": claims,
        "extras": extras,
        "compute": {"gflop_per_step": {k: v / 1e9 for k, v in flops.items()}, "steps": steps,
                    "budget_tflop": cfg.fusion_steps * flops[REFERENCE_VARIANT] / 1e12,
                    "how": "XLA cost analysis of each method's lowered training step, batch "
                           f"{cfg.batch_size}; steps = budget / FLOPs per step"},
        "real_photos": mm.real_photo_reference_scores(metrics, eval_set), "style_tower": style_record,
        "embedder_verification_accuracy": metrics.report["verification"]["verification_accuracy"],
        "reader_accuracy_real_photos": metrics.report["reader_accuracy"]["mean"],
        "eval_identities": int(len(set(eval_set.identity_ids.tolist()))),
        "eval_images_per_setting": len(eval_set.captions), "timings": timings,
        "per_image": {row: {k: [float(x) for x in v] for k, v in values.items()} for row, values in per_image.items()},
        "wall_s": time.perf_counter() - start,
    }
    with open(os.path.join(out, "evaluation.json"), "w") as f:
        json.dump(doc, f, indent=2)
    plots = write_plots(Path(out), summary, cfg.variants)
    markdown = report_markdown(cfg, doc)
    Path(out, "evaluation.md").write_text(markdown)
    if cfg.figures_dir:
        os.makedirs(cfg.figures_dir, exist_ok=True)
        for p in plots:
            shutil.copy(p, Path(cfg.figures_dir) / p.name)
    if cfg.results_md:
        replace_section(cfg.results_md, markdown)
    log(markdown)
    return doc


__all__ = ["VARIANTS", "EvaluationConfig", "evaluate", "plan_steps", "check_claims", "paired_difference"]
