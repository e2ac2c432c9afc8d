"""The reproduction run: plan, generate (batched, resumable), measure (resumable), then hand over to the report.

Layout under OUT (everything a rerun needs to skip finished work):
  metric_models.json                 which recognizer / CLIP / Inception measured this folder (a rerun must match)
  data/faces/<identity>/<photo>.json face analysis of each data photo; data/crops/... its aligned face crop
  data/features.npz                  CLIP image embeddings and Inception features of the usable data photos
  runs/<method>/<protocol>/images/<unit>/p<prompt>_s<seed>.png   generated image, settings in the PNG metadata
  runs/<method>/<protocol>/faces/<unit>/p..._s..._<k>.png        the face crop(s) the recognizer read
  runs/<method>/<protocol>/measure/<unit>/p..._s....json / .npz  per-image numbers and features
A unit is one identity (or, for two-person protocols, a pair `a+b`). The initial noise of each image comes from its
own seed (not from its batch), so a resumed run draws the same images as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from argparse import Namespace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from fusion_jax.reproduction import dataset as data_lib
from fusion_jax.reproduction.protocol import ProtocolConfig
from fusion_jax.reproduction.stats import identity_scores


class HarnessError(ValueError):
    """A run that cannot proceed; the message names the flag or file."""


class MetricModels:
    """The three metric models, loaded on first use (a rerun with nothing to measure loads only the detector), and
    what the tables call them."""

    def __init__(self, face, load_clip: Callable[[], Any], load_inception: Callable[[], Any], names: dict,
                 meaningless: bool):
        self.face = face  # face_metric.FaceMetric (needed for every run: the data photos)
        self._load_clip, self._load_inception = load_clip, load_inception
        self.names = names  # role -> description (written to metric_models.json and every table)
        self.meaningless = meaningless  # tiny random models: every output file says so

    @functools.cached_property
    def clip(self):
        """clip_metric.ClipMetric"""
        return self._load_clip()

    @functools.cached_property
    def inception(self):
        """models.inception.FIDInceptionV3"""
        return self._load_inception()


@dataclasses.dataclass
class RunSpec:
    """One method x protocol run."""

    data: Path  # FOLDER/<identity>/<photo>
    out: Path  # output folder (shared by several runs: results.md covers every run in it)
    model: str  # pipeline folder / HF cache id / tiny
    method: str  # registered identity method, or "none" (text only: the no-identity floor)
    identity_weights: Optional[Path]  # train/export.py folder (None: fresh modules, warned)
    protocol: ProtocolConfig
    prompts: list[str]
    batch_size: int = 4  # images per generate call
    dtype: str = "float32"
    reference_margin: float = 0.4  # crop margin of the references fed to the method
    method_args: Optional[Namespace] = None  # parsed method-specific flags (method.apply_arguments)
    progress: bool = True

    @property
    def run_dir(self) -> Path:
        return self.out / "runs" / self.method / self.protocol.name


@dataclasses.dataclass
class Job:
    """One image to generate and measure."""

    unit: str  # identity name or "a+b"
    people: list[data_lib.IdentitySplit]
    prompt_index: int
    prompt: str
    seed: int

    @property
    def stem(self) -> str:
        return f"{self.unit}/p{self.prompt_index:03d}_s{self.seed}"


def check_metric_models(out: Path, models: MetricModels) -> None:
    """Record the metric models in OUT, or check that they are the ones OUT was measured with."""
    file = out / "metric_models.json"
    record = {"names": models.names, "meaningless": models.meaningless}
    if file.is_file():
        old = json.loads(file.read_text())
        if old != record:
            raise HarnessError(f"--out {out}: measured before with other metric models ({old['names']}); now "
                               f"{models.names}. Use another --out (numbers from different models do not mix)")
        return
    out.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(record, indent=2))


def units(plan: data_lib.DataPlan, people_per_image: int) -> list[tuple[str, list[data_lib.IdentitySplit]]]:
    """Identities (one person per image) or consecutive pairs of identities (two-person protocols)."""
    ids = plan.identities
    if people_per_image == 1:
        return [(s.name, [s]) for s in ids]
    if len(ids) < 2:
        raise HarnessError(f"--data: a two-person protocol needs >= 2 usable identities, got {len(ids)}")
    return [(f"{a.name}+{b.name}", [a, b]) for a, b in zip(ids[0::2], ids[1::2])]


def make_jobs(spec: RunSpec, plan: data_lib.DataPlan) -> list[Job]:
    return [Job(unit, people, pi, prompt, seed) for unit, people in units(plan, spec.protocol.people_per_image)
            for pi, prompt in enumerate(spec.prompts) for seed in spec.protocol.seeds]


# --------------------------------------------------------------------------------------------------------------
# Data photos
# --------------------------------------------------------------------------------------------------------------


def prepare_data(spec: RunSpec, models: MetricModels) -> tuple[data_lib.DataPlan, int]:
    """Scan and analyse --data (cached), split it; returns (plan, photos analysed now)."""
    photos = data_lib.scan_folder(spec.data)
    faces, unreadable, new = data_lib.analyze_photos(spec.data, [p for ps in photos.values() for p in ps],
                                                     models.face, spec.out / "data", spec.progress)
    plan = data_lib.plan(photos, faces, unreadable, spec.protocol.num_references, spec.protocol.num_targets,
                         spec.data)
    plan.faces = faces  # type: ignore[attr-defined]  # embeddings of every analysed photo, for the metrics
    return plan, new


def data_features(spec: RunSpec, models: MetricModels, plan: data_lib.DataPlan) -> dict[str, dict[str, np.ndarray]]:
    """CLIP image embeddings and Inception features of the usable photos (cached in OUT/data/features.npz)."""
    from fusion_jax.data.images import read_image
    from fusion_jax.models.inception import fid_features

    file = spec.out / "data" / "features.npz"
    cached: dict[str, dict[str, np.ndarray]] = {}
    if file.is_file():
        with np.load(file, allow_pickle=False) as z:
            for key in z.files:
                kind, rel = key.split(":", 1)
                cached.setdefault(rel, {})[kind] = z[key]
    missing = [p for p in plan.usable_photos() if p not in cached]
    if missing:
        images = [read_image(spec.data / p) for p in missing]
        clip = models.clip.image_embeds(images)
        inc = fid_features(models.inception, np.stack([_square(im, 299) for im in images]))
        for rel, c, f in zip(missing, clip, inc):
            cached[rel] = {"clip": c, "inception": f}
        file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(file, **{f"{kind}:{rel}": v for rel, d in cached.items() for kind, v in d.items()})
    return cached


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop resized to `size` (so photos of any shape batch together for Inception)."""
    from PIL import Image

    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return np.asarray(Image.fromarray(image[top : top + s, left : left + s]).resize((size, size), Image.BILINEAR))


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def _load_generator(spec: RunSpec, face_analyzer):
    """Pipeline + identity modules + sampling config, as infer/generate.py builds them."""
    import warnings

    from fusion_jax import cli_utils, sampling

    pipeline = cli_utils.load_pipeline_arg(spec.model, spec.dtype)
    size = spec.protocol.image_size or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    p = spec.protocol
    cfg = sampling.SamplingConfig(num_steps=p.steps, guidance_scale=p.guidance, height=size, width=size,
                                  reference_guidance=p.guidance_form, reference_guidance_scale=p.reference_guidance,
                                  reference_guidance_max_timestep=p.reference_max_timestep)
    if spec.method == "none":
        return pipeline, None, None, cfg, False
    pipeline, method, method_cfg, trained = cli_utils.attach_identity_modules(
        pipeline, spec.identity_weights, spec.dtype, method=spec.method, flag="--identity-weights")
    if not trained:
        warnings.warn(f"--method {spec.method} without --identity-weights: fresh UNTRAINED identity modules (the run "
                      "measures the code path, not the method)", stacklevel=2)
    if spec.method_args is not None:
        try:
            method_cfg, cfg = method.apply_arguments(spec.method_args, method_cfg, cfg)
        except ValueError as e:
            raise HarnessError(str(e)) from e
    return pipeline, method, method_cfg, cfg, trained


def _reference_inputs(spec, job: Job, method, method_cfg, analyzer, size: int):
    from fusion_jax import references as refs_lib

    groups = [[spec.data / p for p in person.references] for person in job.people]
    try:
        return method.reference_photos(groups, analyzer, size, spec.reference_margin, method_cfg)
    except refs_lib.ReferenceError as e:
        raise HarnessError(f"{job.unit}: {e}") from e


def check_existing(spec: RunSpec, jobs: list[Job]) -> None:
    """An image already in OUT must be the one this run would make (same prompt, seed, references, model):
    otherwise resuming would mix two experiments, so it is an error naming the file."""
    from fusion_jax import cli_utils

    for j in jobs:
        path = spec.run_dir / "images" / f"{j.stem}.png"
        if not path.is_file():
            continue
        try:
            old = cli_utils.read_png_settings(path)
        except (KeyError, OSError, ValueError):
            continue  # an image placed by hand (no settings): taken as given
        want = {"prompt": j.prompt, "seed": j.seed, "model": spec.model,
                "references": [p for person in j.people for p in person.references]}
        diff = sorted(k for k, v in want.items() if old.get(k) != v)
        if diff:
            raise HarnessError(f"--out {spec.out}: {path.relative_to(spec.out)} was generated with other settings "
                               f"({', '.join(f'{k}: {old.get(k)!r} now {want[k]!r}' for k in diff)}); use another "
                               "--out, or delete that run folder to regenerate it")


def generate_missing(spec: RunSpec, jobs: list[Job], models: MetricModels) -> int:
    """Generate every job whose PNG is missing; returns how many were generated."""
    missing = [j for j in jobs if not (spec.run_dir / "images" / f"{j.stem}.png").is_file()]
    if not missing:
        return 0
    import jax
    from tqdm import tqdm

    from fusion_jax import cli_utils, sampling

    pipeline, method, method_cfg, cfg, trained = _load_generator(spec, models.face.analyzer)
    size = None
    if method is not None:
        size = method.reference_size(method_cfg) or max(cfg.height, cfg.width)
    ref_cache: dict[str, Any] = {}
    k_people = spec.protocol.people_per_image
    boxes = None
    if k_people == 2:  # left and right halves
        boxes = np.float32([[0, 0, cfg.width // 2, cfg.height], [cfg.width // 2, 0, cfg.width, cfg.height]])
    shape = sampling.latent_shape(pipeline, cfg, 1)
    done = 0
    for start in tqdm(range(0, len(missing), spec.batch_size), desc=f"generating {spec.method}", unit="batch",
                      disable=not spec.progress):
        chunk = missing[start : start + spec.batch_size]
        rows = chunk + [chunk[-1]] * (spec.batch_size - len(chunk))  # one compiled shape: pad with the last job
        noise = np.concatenate([np.asarray(jax.random.normal(jax.random.key(j.seed), shape)) for j in rows])
        kwargs = {}
        if method is not None:
            sets = []
            for j in rows:
                if j.unit not in ref_cache:
                    ref_cache[j.unit] = _reference_inputs(spec, j, method, method_cfg, models.face.analyzer, size)
                sets.append(ref_cache[j.unit])
            strength = float(getattr(method_cfg, "strength", 1.0))
            kwargs = {"references": np.stack([s.crops for s in sets]), "identity_cfg": method_cfg,
                      "reference_valid": np.stack([s.valid for s in sets]),
                      "strength": np.full((len(rows), len(sets[0].crops)), strength, np.float32),
                      "boxes": None if boxes is None else np.broadcast_to(boxes, (len(rows),) + boxes.shape),
                      "face_embeddings": None if any(s.embeddings is None for s in sets)
                      else np.stack([s.embeddings for s in sets])}
        images = sampling.generate(pipeline, sampling.tokenize(pipeline, [j.prompt for j in rows]),
                                   uncond_ids=sampling.tokenize(pipeline, [""] * len(rows)),
                                   key=jax.random.key(0), cfg=cfg, noise=noise, **kwargs)
        images = np.asarray(images)[: len(chunk)]
        for j, image in zip(chunk, images):
            path = spec.run_dir / "images" / f"{j.stem}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            settings = {"unit": j.unit, "prompt": j.prompt, "prompt_index": j.prompt_index, "seed": j.seed,
                        "method": spec.method, "model": spec.model, "protocol": spec.protocol.name,
                        "identity_weights": str(spec.identity_weights) if trained else "untrained (fresh modules)",
                        "references": [p for person in j.people for p in person.references],
                        "targets": [p for person in j.people for p in person.targets],
                        "sampling": dataclasses.asdict(cfg),
                        "identity_config": None if method_cfg is None else dataclasses.asdict(method_cfg),
                        "metric_models": models.names, "meaningless_metrics": models.meaningless}
            cli_utils.save_png(path, image, settings)
            done += 1
    return done


# --------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------


def _assign_faces(faces, people, plan) -> list[Optional[int]]:
    """For each person, the index of their face among `faces` (most similar to their references), or None."""
    ref_sets = [np.stack([plan.faces[p].embedding for p in person.references]) for person in people]
    if not faces:
        return [None] * len(people)
    sims = np.array([[float(np.mean(r @ f.embedding)) for f in faces] for r in ref_sets])  # (people, faces)
    if len(people) == 1:
        return [int(np.argmax(sims[0]))] if len(faces) else [None]
    best, choice = -np.inf, [None, None]
    for a in range(len(faces)):
        for b in [None] + list(range(len(faces))):
            if b == a:
                continue
            score = sims[0, a] + (sims[1, b] if b is not None else 0.0)
            if score > best:
                best, choice = score, [a, b]
    for b in range(len(faces)):  # person 0 unmatched, person 1 matched
        if sims[1, b] > best:
            best, choice = sims[1, b], [None, b]
    return choice


def measure_missing(spec: RunSpec, jobs: list[Job], models: MetricModels, plan, features) -> int:
    """Measure every generated image that has no measurement yet; returns how many were measured."""
    from PIL import Image
    from tqdm import tqdm

    from fusion_jax import cli_utils
    from fusion_jax.models.inception import fid_features

    todo = [j for j in jobs if not (spec.run_dir / "measure" / f"{j.stem}.json").is_file()]
    chunk_size = 16
    for start in tqdm(range(0, len(todo), chunk_size), desc=f"measuring {spec.method}", unit="chunk",
                      disable=not spec.progress or not todo):
        chunk = todo[start : start + chunk_size]
        images = [np.asarray(Image.open(spec.run_dir / "images" / f"{j.stem}.png").convert("RGB")) for j in chunk]
        clip_img = models.clip.image_embeds(images)
        clip_txt = models.clip.text_embeds([j.prompt for j in chunk])
        inc = fid_features(models.inception, np.stack([_square(im, 299) for im in images]))
        for j, image, ci, ct, f in zip(chunk, images, clip_img, clip_txt, inc):
            k = spec.protocol.people_per_image
            faces = models.face.analyze_all(image, limit=k)
            assigned = _assign_faces(faces, j.people, plan)
            persons = []
            for idx, (person, face_index) in enumerate(zip(j.people, assigned)):
                row = {"identity": person.name, "face_found": face_index is not None}
                if face_index is not None:
                    face = faces[face_index]
                    crop_path = spec.run_dir / "faces" / f"{j.stem}_{idx}.png"
                    crop_path.parent.mkdir(parents=True, exist_ok=True)
                    cli_utils.save_png(crop_path, face.crop, {
                        "image": f"{j.stem}.png", "identity": person.name, "face_box": face.box.tolist(),
                        "recognizer": models.names["recognizer"], "meaningless_metrics": models.meaningless})
                    refs = np.stack([plan.faces[p].embedding for p in person.references])
                    targets = np.stack([plan.faces[p].embedding for p in person.targets])
                    row.update(identity_scores(face.embedding, refs, targets))
                    row["face_crop"] = str(crop_path.relative_to(spec.out))
                    row["face_box"] = [round(float(v), 1) for v in face.box]
                persons.append(row)
            ref_clip = np.stack([features[p]["clip"] for person in j.people for p in person.references])
            record = {"unit": j.unit, "prompt_index": j.prompt_index, "prompt": j.prompt, "seed": j.seed,
                      "method": spec.method, "protocol": spec.protocol.name,
                      "image": str((spec.run_dir / "images" / f"{j.stem}.png").relative_to(spec.out)),
                      "references": [p for person in j.people for p in person.references],
                      "clip_t": float(100.0 * ci @ ct), "clip_i": float(100.0 * np.mean(ref_clip @ ci)),
                      "persons": persons, "meaningless_metrics": models.meaningless}
            out = spec.run_dir / "measure" / f"{j.stem}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            np.save(out.with_suffix(".inception.npy"), np.asarray(f, np.float64))
            out.write_text(json.dumps(record, indent=1))  # written last: its presence means "measured"
    return len(todo)


def run(spec: RunSpec, models: MetricModels) -> dict[str, Any]:
    """The whole run; returns counts of what was done now (0s on a complete rerun) and the data plan."""
    check_metric_models(spec.out, models)
    plan, analysed = prepare_data(spec, models)
    features = data_features(spec, models, plan)
    jobs = make_jobs(spec, plan)
    check_existing(spec, jobs)  # before anything of this run is written
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    (spec.run_dir / "run.json").write_text(json.dumps({
        "method": spec.method, "model": spec.model, "protocol": dataclasses.asdict(spec.protocol),
        "identity_weights": None if spec.identity_weights is None else str(spec.identity_weights),
        "prompts": spec.prompts, "data": str(spec.data),
        "plan": {"identities": [dataclasses.asdict(s) for s in plan.identities], "faceless": plan.faceless,
                 "too_few": plan.too_few, "unreadable": plan.unreadable}}, indent=1))
    generated = generate_missing(spec, jobs, models)
    measured = measure_missing(spec, jobs, models, plan, features)
    return {"data_photos_analysed": analysed, "generated": generated, "measured": measured, "jobs": len(jobs),
            "plan": plan, "features": features}
