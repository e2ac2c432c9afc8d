"""The model side of the web demo: one loaded pipeline per identity method, shared by every browser session.

`DemoEngine.generate(GenerationRequest)` does what `infer/generate.py` does for one prompt and one image: checks
the uploads (`uploads.py`), aligns the reference faces through the identity method's own `reference_photos`, calls
`sampling.generate` and writes a PNG whose `fusion_jax` text chunk holds the settings (`cli_utils.save_png`, the
generate CLI's format and key names, so a demo PNG reads back like a CLI PNG).

Compilation: `sampling.generate` keeps one jitted function per (model structure, `SamplingConfig`, method config)
in a process-wide cache, and jax caches per input shape, so every session shares the compiled generators. To keep
the shapes few, each person's photos are padded to `UploadLimits.max_photos` with invalid slots (never attended,
`reference_valid` False): a request compiles once per people count (0, 1, 2) and sampling setting (steps,
guidance, scheduler: `SamplingConfig` is static), after which changing the prompt, seed, photos, boxes or
strengths runs the compiled function. Generation runs under a lock (one at a time; the page queues requests too).
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fusion_jax.demo.uploads import UploadError, UploadLimits, check_people, display_name

TINY_LABEL = ("tiny random pipeline (`--model tiny`): random weights, so the images are noise-like; it shows the "
              "whole path running offline")


class DemoError(ValueError):
    """A request the demo cannot run (bad settings, boxes, or what the model says about them); shown in the page."""


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo server loads and how it treats requests (the `fusion-jax demo` flags)."""

    model: str = "tiny"  # pipeline folder, HF cache repo id, or 'tiny' (the project's tiny random pipeline)
    method: Optional[str] = None  # identity method name; None: the exported one, else every registered method
    identity_weights: Optional[str] = None  # train/export.py folder; None: fresh, UNTRAINED identity modules
    dtype: str = "auto"  # auto (bfloat16 on GPU / TPU, float32 on CPU: fusion_jax/precision.py) | float32 | bfloat16
    face_models: Optional[str] = None  # insightface model folder (None: ~/.insightface/models/buffalo_l)
    face_detector: str = "auto"  # auto (insightface when its models are there, else OpenCV Haar) | insightface | opencv
    height: Optional[int] = None  # generated image size in pixels (None: the UNet's sample size)
    width: Optional[int] = None
    reference_size: Optional[int] = None  # reference crop side (None: the method's, else the image size)
    reference_margin: float = 0.4  # crop margin around the aligned face (the training crops use 0.4)
    pad_photos: bool = True  # pad each person's photos to limits.max_photos (fewer shapes to compile)
    output_dir: Optional[str] = None  # where the PNGs go (None: a fresh temporary folder)
    limits: UploadLimits = UploadLimits()  # people / photos / file size / faces per photo


@dataclasses.dataclass
class PersonRequest:
    """One person of a request: the uploaded photo paths and where they go."""

    photos: Sequence[str] = ()  # 1..limits.max_photos file paths (empty: this person is not used)
    box: str = ""  # 'x0,y0,x1,y1' fractions of the image (0..1); required with two people
    strength: float = 1.0  # identity strength of this person


@dataclasses.dataclass
class GenerationRequest:
    """Everything one click on Generate sends."""

    prompt: str
    negative_prompt: str = ""
    method: Optional[str] = None  # None: the engine's default method
    steps: int = 4
    seed: int = 0
    guidance: float = 7.5  # classifier-free (text) guidance scale
    reference_guidance: float = 2.0  # s_ref of the disentangled form
    guidance_form: str = "disentangled"  # disentangled | cfg
    scheduler: str = "ddim"
    people: Sequence[PersonRequest] = ()


@dataclasses.dataclass
class GenerationResult:
    """One generated image: its PNG (settings inside), the settings, the aligned crops that conditioned it."""

    path: Path
    image: np.ndarray  # (H, W, 3) uint8
    settings: dict
    crops: list  # [(uint8 crop, caption)] of the real (non-padding) references, person by person


def parse_fraction_box(value: str, who: str) -> tuple[float, float, float, float]:
    """'x0,y0,x1,y1' with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 -> the 4 floats."""
    parts = [p.strip() for p in str(value).replace(";", ",").split(",")]
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4 or not all(np.isfinite(box)):
        raise DemoError(f"{who} box: expected x0,y0,x1,y1 as fractions of the image (e.g. 0.1,0.2,0.5,0.9), "
                        f"got {value!r}")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise DemoError(f"{who} box {value!r}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the "
                        "image width and height)")
    return box  # type: ignore[return-value]


@dataclasses.dataclass
class _Loaded:
    pipeline: object
    method: object  # IdentityMethod, None for the text-only pipeline
    method_cfg: object
    trained: bool


class DemoEngine:
    """Loads pipelines lazily (text-only, and one per identity method used) and runs requests one at a time."""

    def __init__(self, config: DemoConfig = DemoConfig()):
        from fusion_jax.data.faces import DEFAULT_MODEL_DIR, FaceAnalyzer, FaceAnalyzerConfig
        from fusion_jax.identity import base as identity_base

        self.config = config
        self.analyzer = FaceAnalyzer(FaceAnalyzerConfig(model_dir=config.face_models or DEFAULT_MODEL_DIR,
                                                        backend=config.face_detector))
        self.exported_method = None
        if config.identity_weights is not None:
            from fusion_jax.identity import export as identity_export

            folder = identity_export.identity_folder(config.identity_weights)
            if folder is None:
                raise DemoError(f"--identity-weights {config.identity_weights}: no identity/identity_config.json "
                                "there (expected a folder written by train/export.py)")
        try:
            if config.method is not None:
                identity_base.get(config.method, what="--method")
        except ValueError as e:
            raise DemoError(str(e)) from None
        self.out_dir = Path(config.output_dir or tempfile.mkdtemp(prefix="fusion_jax_demo_"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._loaded: dict[Optional[str], _Loaded] = {}
        self._load_lock = threading.Lock()
        self._generate_lock = threading.Lock()
        self._detect_lock = threading.Lock()
        self._counter = itertools.count()
        # the served (or default) method's pipeline now, so a bad --identity-weights fails at start; the text-only
        # pipeline is loaded on the first request without photos
        first = self._load("__exported__" if config.identity_weights is not None
                           else (config.method or identity_base.names()[0]))
        if config.identity_weights is not None:
            self.exported_method = first.method.name
        unet = first.method.base_unet(first.pipeline.unet)
        sample = unet.config.sample_size * first.pipeline.vae_scale_factor
        self.height = config.height or sample
        self.width = config.width or sample

    # ------------------------------------------------------------------------------------------------ models
    @property
    def model_label(self) -> str:
        return TINY_LABEL if self.config.model == "tiny" else f"`{self.config.model}`"

    def method_names(self) -> list[str]:
        """The methods the page offers: the exported one, the one given, or every registered method."""
        from fusion_jax.identity import base as identity_base

        if self.exported_method is not None:
            return [self.exported_method]
        if self.config.method is not None:
            return [self.config.method]
        return list(identity_base.names())

    def default_method(self) -> str:
        return self.method_names()[0]

    def identity_trained(self) -> bool:
        return self.config.identity_weights is not None

    def _load(self, method: Optional[str]) -> _Loaded:
        """The pipeline for `method` (None: text only), loaded once. With identity weights every method name maps
        to the one exported model (checked against `--method` when given)."""
        from fusion_jax import cli_utils

        if method is None:
            key, name = None, None
        elif self.config.identity_weights is not None:
            key, name = "__exported__", self.config.method
        else:
            key, name = method, method
        with self._load_lock:
            if key in self._loaded:
                return self._loaded[key]
            pipeline = cli_utils.load_pipeline_arg(self.config.model, self.config.dtype)
            if key is None:
                loaded = _Loaded(pipeline, None, None, False)
            else:
                try:
                    pipeline, m, cfg, trained = cli_utils.attach_identity_modules(
                        pipeline, self.config.identity_weights, self.config.dtype, method=name)
                except SystemExit as e:  # the CLI helper reports bad flags by exiting: a message here
                    raise DemoError(str(e)) from None
                try:  # the frozen encoders the method's config names by folder (as infer/generate.py does)
                    pipeline = dataclasses.replace(pipeline, unet=m.prepare_model(pipeline.unet, cfg))
                except ValueError as e:
                    raise DemoError(str(e)) from None
                loaded = _Loaded(pipeline, m, cfg, trained)
            self._loaded[key] = loaded
            return loaded

    def method_for(self, name: Optional[str]) -> _Loaded:
        name = name or self.default_method()
        if name not in self.method_names():
            raise DemoError(f"method {name!r} is not served here; choose one of {self.method_names()}")
        return self._load(name)

    # -------------------------------------------------------------------------------------------- references
    def prepare_references(self, people: Sequence[PersonRequest], method: Optional[str] = None):
        """Check the uploads and align the faces as the method wants them.

        Returns (loaded method, ReferenceSet padded as configured, strengths (K,), pixel boxes (K, 4) or None,
        box fractions, records with the uploaded file names); raises UploadError / DemoError with a page message."""
        from fusion_jax import references as refs

        people = [p for p in people if p.photos]
        if not people:
            raise DemoError("no reference photos uploaded")
        groups = [[str(path) for path in p.photos] for p in people]
        with self._detect_lock:
            check_people(groups, self.analyzer, self.config.limits)
        boxes = [parse_fraction_box(p.box, f"person {k + 1}") if str(p.box).strip() else None
                 for k, p in enumerate(people)]
        if len(people) > 1 and any(b is None for b in boxes):
            missing = [k + 1 for k, b in enumerate(boxes) if b is None]
            raise DemoError(f"person {missing[0]}: with {len(people)} people every person needs a box (type "
                            "x0,y0,x1,y1 fractions or draw it) saying where they go in the image")
        fractions = None if all(b is None for b in boxes) else [list(b) for b in boxes]
        pixel_boxes = None
        if fractions is not None:
            if any(b is None for b in boxes):  # one person: a box is optional, but all-or-none
                raise DemoError("give a box for every person or for none")
            scale = np.array([self.width, self.height, self.width, self.height], np.float64)
            try:
                pixel_boxes = refs.check_boxes([np.asarray(b) * scale for b in boxes], len(people), self.height,
                                               self.width, flag="box", ref_flag="photos")
            except refs.ReferenceError as e:
                raise DemoError(str(e)) from None
        for k, p in enumerate(people):
            if not np.isfinite(p.strength) or p.strength < 0:
                raise DemoError(f"person {k + 1} strength must be a finite number >= 0, got {p.strength}")
        loaded = self.method_for(method)
        m, cfg = loaded.method, loaded.method_cfg
        size = self.config.reference_size or m.reference_size(cfg) or max(self.height, self.width)
        factor = loaded.pipeline.vae_scale_factor
        if size % factor:
            raise DemoError(f"reference crop size {size} must be a multiple of the VAE's downsampling factor {factor}")
        try:
            with self._detect_lock:
                ref_set = m.reference_photos(groups, self.analyzer, size, self.config.reference_margin, cfg)
        except refs.ReferenceError as e:
            raise UploadError(str(e).replace("--reference", "reference photos")) from None
        records = []
        for record in ref_set.records:
            record = dict(record)
            record["path"] = display_name(record.get("path", ""))
            records.append(record)
        if self.config.pad_photos:
            ref_set = pad_reference_set(ref_set, self.config.limits.max_photos)
        strengths = np.asarray([p.strength for p in people], np.float32)
        return loaded, ref_set, strengths, pixel_boxes, fractions, records

    @staticmethod
    def crop_gallery(ref_set, records) -> list:
        """[(uint8 crop, caption)] of the real references, with the uploaded file names."""
        names = {(r["identity"], r["index"]): r["path"] for r in records}
        return [(crop, f"person {k + 1}: {names.get((k, n), n)}") for k, n, crop in ref_set.uint8_crops()]

    # ------------------------------------------------------------------------------------------- generation
    def sampling_config(self, request: GenerationRequest):
        from fusion_jax import sampling

        if int(request.steps) != request.steps or not 1 <= int(request.steps) <= 200:
            raise DemoError(f"steps must be a whole number in 1..200, got {request.steps}")
        for name in ("guidance", "reference_guidance"):
            value = getattr(request, name)
            if not np.isfinite(value):
                raise DemoError(f"{name.replace('_', ' ')} must be a finite number, got {value}")
        try:
            return sampling.SamplingConfig(num_steps=int(request.steps), guidance_scale=float(request.guidance),
                                           scheduler=request.scheduler, height=self.height, width=self.width,
                                           reference_guidance=request.guidance_form,
                                           reference_guidance_scale=float(request.reference_guidance))
        except ValueError as e:
            raise DemoError(f"bad sampling settings: {e}") from None

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """One image for `request`, written as a PNG with its settings; errors are UploadError / DemoError."""
        import jax

        from fusion_jax import cli_utils, precision, sampling

        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise DemoError("the prompt is empty; describe the image to generate")
        seed = request.seed
        if seed is None or int(seed) != seed or not 0 <= int(seed) < 2**31:
            raise DemoError(f"seed must be a whole number in 0..2^31-1, got {seed}")
        seed = int(seed)
        cfg = self.sampling_config(request)
        settings = {"source": "fusion_jax demo", "model": self.config.model,
                    "dtype": precision.resolve_compute_dtype(self.config.dtype),
                    "prompt": request.prompt, "negative_prompt": request.negative_prompt or "", "seed": seed,
                    "steps": cfg.num_steps, "guidance": cfg.guidance_scale, "scheduler": cfg.scheduler,
                    "height": cfg.height, "width": cfg.width}
        kwargs, crops = {}, []
        people = [p for p in request.people if p.photos]
        if people:
            loaded, ref_set, strengths, boxes, fractions, records = self.prepare_references(people, request.method)
            m, method_cfg = loaded.method, loaded.method_cfg
            crops = self.crop_gallery(ref_set, records)
            kwargs = {"references": ref_set.crops[None], "reference_valid": ref_set.valid[None],
                      "strength": strengths[None], "boxes": None if boxes is None else boxes[None],
                      "identity_cfg": method_cfg,
                      "face_embeddings": None if ref_set.embeddings is None else ref_set.embeddings[None]}
            settings.update({
                "method": m.name, "identity_method": m.name, m.section: dataclasses.asdict(method_cfg),
                "identity_weights": self.config.identity_weights if loaded.trained else "untrained (fresh modules)",
                "references": records, "identity_boxes": None if boxes is None else boxes.tolist(),
                "identity_box_fractions": fractions, "reference_strength": strengths.tolist(),
                "reference_size": int(ref_set.crops.shape[-2]), "reference_guidance": cfg.reference_guidance_scale,
                "guidance_form": cfg.reference_guidance, "face_detector": self.analyzer.backend,
                "reference_margin": self.config.reference_margin})
            pipeline = loaded.pipeline
        else:
            pipeline = self._load(None).pipeline
        settings["sampling"] = dataclasses.asdict(cfg)
        key = jax.random.fold_in(jax.random.key(seed), 0)  # as infer/generate.py's first batch: same seed, same image
        try:
            with self._generate_lock:
                image = sampling.generate(pipeline, sampling.tokenize(pipeline, [request.prompt]),
                                          uncond_ids=sampling.tokenize(pipeline, [request.negative_prompt or ""]),
                                          key=key, cfg=cfg, **kwargs)
                image = np.asarray(image)[0]
        except ValueError as e:  # what the sampler / method says about the inputs (e.g. missing face embeddings)
            raise DemoError(f"the model refused the request: {e}") from None
        path = self.out_dir / f"{next(self._counter):05d}_seed{seed}.png"
        cli_utils.save_png(path, image, settings)
        return GenerationResult(path=path, image=image, settings=settings, crops=crops)


def pad_reference_set(ref_set, count: int):
    """A ReferenceSet with N padded to `count` photos per person (padding repeats the last crop, valid False)."""
    from fusion_jax.references import ReferenceSet

    k, n = ref_set.valid.shape
    if n >= count:
        return ref_set
    index = np.minimum(np.arange(count), n - 1)
    valid = np.zeros((k, count), bool)
    valid[:, :n] = ref_set.valid
    embeddings = None if ref_set.embeddings is None else ref_set.embeddings[:, index]
    return ReferenceSet(ref_set.crops[:, index], valid, list(ref_set.records), embeddings)


__all__ = ["DemoConfig", "DemoEngine", "DemoError", "GenerationRequest", "GenerationResult", "PersonRequest",
           "TINY_LABEL", "pad_reference_set", "parse_fraction_box"]
