"""Miniature Face Fusion on synthetic faces: a pixel-space text-to-image base model, Face Fusion on top of it,
sampling with 0 / 1 / 4 references and the exact synthetic-face metrics. Library of `infer/quickstart.py` and
`infer/evaluate.py`.

Why pixel space: the project's tiny VAE is random (nothing here can train or download a VAE), so its latents are
not decodable images; a pixel-space UNet at 32x32 has no autoencoder to learn first, and its loss is the image
itself. `PixelCodec` stands in for the VAE (exact encode / decode: the pixels, folded 2 x 2 into channels by
default, `models/pixels.py`) so the project's own
jitted sampler (`sampling.generate`, Face Fusion guidance included) runs unchanged.

The recipe (as the real one fine-tunes Stable Diffusion):
  1. `write_miniature_pipeline`: a diffusers-layout folder holding a small random 3-channel UNet, a frozen random
     text encoder over a word-level tokenizer of the synthfaces caption vocabulary (one token per caption word,
     so the random frozen encoder keeps words apart), the tiny VAE (only read for its config) and a scheduler.
  2. text-to-image training of the whole UNet on synthfaces (`configs/synthfaces/text_to_image.yaml`).
  3. `export_base_pipeline`: the trained base UNet is written into a copy of the pipeline folder; the Face Fusion
     run (`configs/synthfaces/face_fusion.yaml`) points `model.pipeline` at it, so it starts from the base weights
     and trains only the identity projections (`train.trainable: identity`), references = other photos of the
     same identity. No change to `experiment.py` was needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax import weights
from fusion_jax.data import synthfaces
from fusion_jax.models.pixels import PixelCodec, fold_factor  # noqa: F401  (PixelCodec: re-exported)

# ----------------------------------------------------------------------------------------------------------------
# The pipeline folder
# ----------------------------------------------------------------------------------------------------------------

TEXT_LENGTH = 32  # token context of the miniature text encoder (captions are at most ~20 word tokens)


@dataclasses.dataclass(frozen=True)
class MiniatureModelConfig:
    """Sizes of the miniature pixel-space pipeline."""

    image_size: int = 32  # generated image side (pixels); the UNet runs on pixels
    # Pixels folded f x f into channels (models/pixels.py): the UNet sees (32/f)^2 positions x 3 f^2 channels.
    # 2 = 16x16x12, so the widths below cost what a quarter of them would at 32x32 (benchmarks/RESULTS.md).
    pixel_fold: int = 2
    widths: tuple[int, ...] = (48, 96, 96)  # UNet channels per level (16, 8, 4 positions at image_size 32, fold 2)
    text_width: int = 64  # text encoder width = the UNet's cross-attention dim
    text_layers: int = 2  # text encoder transformer layers (random, frozen)
    heads: int = 4  # attention heads in the UNet cross-attention blocks
    seed: int = 0  # seed of the random initial weights
    # Noise schedule written to scheduler/ (read by training and sampling): see benchmarks/RESULTS.md for why.
    # v-prediction on a cosine schedule (Min-SNR-5 weighted in text_to_image.yaml): x0 prediction makes blobs
    # within a few hundred steps but cannot pass a clean image through, so its last sampling step blurs; SD's
    # epsilon / scaled_linear sampled pure noise after 300 steps. v needs thousands of steps (the shipped model).
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    rescale_betas_zero_snr: bool = False


def caption_vocabulary() -> list[str]:
    """Every word the synthfaces captions use (lowercase, punctuation split off)."""
    words = set("a person with on background".split())
    for phrase in list(synthfaces._EXPRESSION_PHRASES.values()) + list(synthfaces._GAZE_PHRASES.values()):
        words.update(phrase.split())
    words.update(synthfaces.BACKGROUND_COLOURS)
    words.update(synthfaces.BACKGROUND_PATTERNS)
    return sorted(words)


def _bpe_segments(symbols: Sequence[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """What CLIP's BPE makes of one word's symbols: repeatedly merge the adjacent pair of lowest rank (merges apply
    by priority, not left to right), every occurrence of that pair at once, until no pair has a merge."""
    word = list(symbols)
    while len(word) > 1:
        pairs = [(ranks.get(p, len(ranks)), p) for p in zip(word[:-1], word[1:])]
        rank, best = min(pairs)
        if rank == len(ranks):
            break
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def _word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges under which each of `words` is ONE `word</w>` token.

    A chain per word (left to right, shared prefixes merged once) is not enough on its own: BPE applies merges by
    priority, so an early merge of another word ('o' + 'n</w>' of "on") can fire inside "person" and break its
    chain. So each word is then run through the BPE itself (`_bpe_segments`) and, when it ends in several pieces,
    merges joining those pieces left to right are appended. Appended merges rank after every existing one, so
    words that were already one token are unchanged (their BPE finished before reaching any of them)."""
    from fusion_jax.tiny import bytes_to_unicode

    byte_map = bytes_to_unicode()
    symbols_of = {}
    merges, seen = [], set()

    def add(pair):
        if pair not in seen:
            seen.add(pair)
            merges.append(pair)

    for word in words:
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        symbols_of[word] = symbols
        current = symbols[0]
        for sym in symbols[1:]:
            add((current, sym))
            current = current + sym
    for _ in range(len(words) + 1):
        ranks = {pair: i for i, pair in enumerate(merges)}
        split = [w for w in words if len(_bpe_segments(symbols_of[w], ranks)) > 1]
        if not split:
            return merges
        for word in split:
            pieces = _bpe_segments(symbols_of[word], {pair: i for i, pair in enumerate(merges)})
            current = pieces[0]
            for piece in pieces[1:]:
                add((current, piece))
                current = current + piece
    raise RuntimeError(f"could not make one BPE token of each word; still split: {split}")


def write_word_tokenizer(folder: str | os.PathLike, words: Sequence[str], context: int = TEXT_LENGTH) -> Path:
    """A CLIP BPE tokenizer folder whose merges make each of `words` one token (other text stays byte-wise)."""
    from fusion_jax.tiny import BOS_TOKEN, EOS_TOKEN, bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    merges = _word_merges(words)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens = list(dict.fromkeys(tokens)) + [BOS_TOKEN, EOS_TOKEN]
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    with open(folder / "special_tokens_map.json", "w") as f:
        json.dump(special, f, indent=2)
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": context, "do_lower_case": True,
                   **special}, f, indent=2)
    return folder


def miniature_unet_config(cfg: MiniatureModelConfig):
    """Pixel UNet over the folded image (3 f^2 channels): a plain ResNet level first, cross-attention below it."""
    from fusion_jax.models.unet import UNetConfig

    n = len(cfg.widths)
    if cfg.image_size % cfg.pixel_fold:
        raise ValueError(f"pixel_fold {cfg.pixel_fold} must divide image_size {cfg.image_size}")
    channels = 3 * cfg.pixel_fold ** 2
    return UNetConfig(
        sample_size=cfg.image_size // cfg.pixel_fold, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(cfg.widths),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=cfg.text_width, attention_head_dim=cfg.heads,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
    )


def miniature_schedule(cfg: MiniatureModelConfig):
    """The pipeline's noise schedule (training target and sampler)."""
    from fusion_jax.schedulers import NoiseSchedule

    return NoiseSchedule(beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type,
                         rescale_betas_zero_snr=cfg.rescale_betas_zero_snr)


def write_miniature_pipeline(path: str | os.PathLike, cfg: MiniatureModelConfig = MiniatureModelConfig()) -> Path:
    """Writes the miniature pipeline folder (diffusers layout) once; an existing complete folder is kept."""
    from fusion_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from fusion_jax.models.unet import UNet2DConditionModel
    from fusion_jax.models.vae import AutoencoderKL
    from fusion_jax.tiny import BOS_TOKEN, EOS_TOKEN, _random_model, _write_json, tiny_vae_config

    root = Path(path)
    if (root / "model_index.json").is_file():
        return root
    if root.exists() and not root.is_dir():
        raise ValueError(f"miniature pipeline path {str(root)!r} exists and is not a folder")
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer_dir = write_word_tokenizer(tmp / "tokenizer", caption_vocabulary())
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    text_config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
        projection_dim=cfg.text_width, num_hidden_layers=cfg.text_layers, num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH, bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN])
    text_encoder = _random_model(lambda: CLIPTextModel(text_config, rngs=nnx.Rngs(0)), cfg.seed)
    # Random frozen encoder: word embeddings ~ N(0, 1) (not CLIP's 0.02) so words dominate positions and stay apart.
    emb = text_encoder.text_model.embeddings.token_embedding.embedding
    emb.set_value(emb.get_value() * 50.0)
    vae = _random_model(lambda: AutoencoderKL(tiny_vae_config(), rngs=nnx.Rngs(0)), cfg.seed + 1)
    unet = _random_model(lambda: UNet2DConditionModel(miniature_unet_config(cfg), rngs=nnx.Rngs(0)), cfg.seed + 2)
    weights.save_text_encoder(text_encoder, tmp / "text_encoder")
    weights.save_vae(vae, tmp / "vae")
    weights.save_unet(unet, tmp / "unet")
    _write_json(tmp / "scheduler" / "scheduler_config.json",
                {"_class_name": "DDIMScheduler", **miniature_schedule(cfg).to_diffusers_config()})
    _write_json(tmp / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "fusion_jax_miniature": dataclasses.asdict(cfg)})
    shutil.rmtree(root, ignore_errors=True)
    os.rename(tmp, root)
    return root


# ----------------------------------------------------------------------------------------------------------------
# Pixel "VAE" and pipelines for sampling
# ----------------------------------------------------------------------------------------------------------------


def pixel_pipeline(pipeline_dir: str | os.PathLike, unet: nnx.Module) -> weights.Pipeline:
    """A `weights.Pipeline` for `sampling.generate`: `unet` (trained) with the folder's text encoder, tokenizer and
    schedule, and `PixelCodec` (the UNet's pixel fold, read from its input channels) in place of the VAE."""
    from fusion_jax.tokenizer import load_tokenizer

    fold = fold_factor(unet.config.in_channels)
    return weights.Pipeline(unet=unet, vae=PixelCodec(fold), text_encoder=weights.load_text_encoder(pipeline_dir),
                            tokenizer=load_tokenizer(Path(pipeline_dir) / "tokenizer"),
                            schedule=weights.load_schedule(pipeline_dir))


# ----------------------------------------------------------------------------------------------------------------
# Training stages
# ----------------------------------------------------------------------------------------------------------------


def restore_model(workdir: str, use_ema: bool = True):
    """(TrainModel with the newest checkpoint's params, its resolved config, step) of a finished run."""
    from fusion_jax.experiment import restore_run

    run = restore_run(workdir, use_ema=use_ema)
    return run.model, run.config, run.step


def run_identity_config(config):
    """The identity method config a run was trained with (its objective's section; None for text-to-image)."""
    from fusion_jax.experiment import identity_method
    from fusion_jax.identity import base as identity_base

    method = identity_method(config)
    return identity_base.method_config(config, method) if method is not None else None


def finished_step(workdir: str) -> Optional[int]:
    """Newest checkpoint step under WORKDIR/checkpoints (None when there is none)."""
    folder = Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
    return max(steps) if steps else None


def train_stage(config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains `config` in config.workdir unless its checkpoint already reached train.steps (then nothing runs).
    Returns {'trained': bool, 'seconds': wall time, 'step': final step}."""
    from fusion_jax.experiment import run

    done = finished_step(config.workdir)
    if done is not None and done >= config.train.steps:
        log(f"  {config.workdir}: checkpoint at step {done} >= {config.train.steps}; not retraining")
        return {"trained": False, "seconds": 0.0, "step": done}
    start = time.perf_counter()
    result = run(config)
    seconds = time.perf_counter() - start
    return {"trained": True, "seconds": seconds, "step": int(result.step), "resumed_from": result.resumed_from}


def export_base_pipeline(base_workdir: str, pipeline_dir: str, out_dir: str, use_ema: bool = True) -> Path:
    """The base run's trained UNet written into a copy of `pipeline_dir` (text encoder, tokenizer, VAE config and
    scheduler linked by copy) at `out_dir`: the `model.pipeline` of the Face Fusion run. Kept when present."""
    out = Path(out_dir)
    marker = out / "base_run.json"
    if marker.is_file() and json.loads(marker.read_text()).get("step") == finished_step(base_workdir):
        return out  # already exported from this checkpoint
    model, _, step = restore_model(base_workdir, use_ema=use_ema)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(pipeline_dir, tmp, ignore=shutil.ignore_patterns("unet"))
    weights.save_unet(model.unet, tmp / "unet")
    with open(tmp / "base_run.json", "w") as f:
        json.dump({"workdir": os.path.abspath(base_workdir), "step": int(step), "ema": use_ema}, f)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Evaluation set and sampling
# ----------------------------------------------------------------------------------------------------------------

# Prompts of the evaluation (all four attributes stated, so prompt accuracy scores each of them).
EVAL_PROMPTS: tuple[synthfaces.PromptAttributes, ...] = (
    synthfaces.PromptAttributes("smiling", "camera", "blue", "plain"),
    synthfaces.PromptAttributes("neutral", "left", "red", "striped"),
    synthfaces.PromptAttributes("surprised", "right", "green", "dotted"),
    synthfaces.PromptAttributes("smiling", "right", "yellow", "checkered"),
    synthfaces.PromptAttributes("neutral", "camera", "purple", "plain"),
    synthfaces.PromptAttributes("surprised", "left", "orange", "striped"),
)
REFERENCE_PHOTOS = (0, 1, 2, 3)  # held-out identity photos used as references (1 reference = the first)
TARGET_PHOTOS = (8, 9, 10, 11)  # other photos of the same person: SimTarget's targets (never references)


@dataclasses.dataclass
class EvalSet:
    """Held-out identities x prompts, with references (crops and full photos) and target photos."""

    identity_ids: np.ndarray  # (M,) identity of each row
    captions: list[str]  # (M,) prompts
    labels: np.ndarray  # (M, 4) prompted attribute classes
    reference_crops: np.ndarray  # (M, 4, S, S, 3) uint8 aligned face crops (the conditioning)
    reference_images: np.ndarray  # (M, 4, H, W, 3) uint8 the same photos, full (SimRef compares with these)
    target_images: np.ndarray  # (M, T, H, W, 3) uint8 other photos of the same person (SimTarget)
    reference_labels: Optional[np.ndarray] = None  # (M, 4, 4) attribute classes of the reference photos
    reference_boxes: Optional[np.ndarray] = None  # (M, 4, 4) pixel face boxes (x0, y0, x1, y1) of those photos
    # (M, 4, 512) float32 recognition embeddings of those photos (`data.synth_recognition`, the ArcFace stand-in
    # that the embedding methods read; the others ignore them)
    reference_embeddings: Optional[np.ndarray] = None


def build_eval_set(faces: synthfaces.SynthFaceConfig, num_identities: int, num_prompts: int,
                   first_identity: int = 0) -> EvalSet:
    """Held-out identities `first_identity` .. `first_identity + num_identities - 1` (positions in the held-out
    list) under the first `num_prompts` EVAL_PROMPTS. The quickstart reports the first ones; a settings sweep
    picks its settings on a later, disjoint range so the reported figures are not tuned on."""
    heldout = synthfaces.split_identity_ids(faces, "heldout")
    if first_identity < 0 or not 1 <= num_identities <= len(heldout) - first_identity:
        raise ValueError(f"identities={num_identities} from held-out position {first_identity}: must fit in the "
                         f"{len(heldout)} held-out identities")
    if not 1 <= num_prompts <= len(EVAL_PROMPTS):
        raise ValueError(f"prompts={num_prompts}: must be in [1, {len(EVAL_PROMPTS)}]")
    ids, caps, labels, crops, refs, targets, ref_labels, ref_boxes, ref_embs = [], [], [], [], [], [], [], [], []
    recognised = dataclasses.replace(faces, recognition_embedding=True)  # same pixels, plus the embedding
    for identity in heldout[first_identity:first_identity + num_identities]:
        ref_records = [synthfaces.render_face(int(identity), p, recognised) for p in REFERENCE_PHOTOS]
        target_records = [synthfaces.render_face(int(identity), p, faces) for p in TARGET_PHOTOS]
        for attrs in EVAL_PROMPTS[:num_prompts]:
            ids.append(int(identity))
            caps.append(synthfaces.build_caption(attrs))
            labels.append(attrs.labels())
            crops.append(np.stack([r["face_crop"] for r in ref_records]))
            refs.append(np.stack([r["image"] for r in ref_records]))
            targets.append(np.stack([r["image"] for r in target_records]))
            ref_labels.append(np.stack([r["attribute_labels"] for r in ref_records]))
            ref_boxes.append(np.stack([r["face_box"] for r in ref_records]))
            ref_embs.append(np.stack([r["embedding"] for r in ref_records]))
    return EvalSet(np.asarray(ids), caps, np.stack(labels), np.stack(crops), np.stack(refs), np.stack(targets),
                   np.stack(ref_labels), np.stack(ref_boxes), np.stack(ref_embs))


def to_unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1.0


def sample_images(pipeline, identity_cfg, eval_set: EvalSet, num_references: int, *, steps: int,
                  guidance: float, reference_guidance: str, reference_scale: float, batch: int, seed: int,
                  reference_max_timestep: Optional[int] = None, scheduler: str = "ddim", progress=None,
                  sampler: Optional[Callable] = None,
                  boxes: Optional[np.ndarray] = None, style_images: Optional[np.ndarray] = None) -> np.ndarray:
    """Generated uint8 images (M, H, W, 3): 0 references (text only) or the first `num_references` references.
    The same initial noise per row for every setting (only the conditioning changes). `boxes` (M, K, 4): pixel
    boxes of each row's face(s) in the generated image, for methods that read them (with references only).
    `reference_max_timestep`: reference guidance only while t <= it (None: every step); `scheduler`: the
    sampler (`SamplingConfig.scheduler`); `style_images` (M, H, W, 3) uint8: each row's style image (FaceStudio's
    style branch; with references only)."""
    from fusion_jax.sampling import SamplingConfig, generate, latent_shape, tokenize

    size = eval_set.target_images.shape[2]
    cfg = SamplingConfig(num_steps=steps, guidance_scale=guidance, height=size, width=size, scheduler=scheduler,
                         reference_guidance=reference_guidance, reference_guidance_scale=reference_scale,
                         reference_guidance_max_timestep=reference_max_timestep)
    m = len(eval_set.captions)
    # initial noise in the UNet's space ((size/f)^2 x 3 f^2 for pixels folded f x f)
    noise_all = np.asarray(jax.random.normal(jax.random.key(seed), latent_shape(pipeline, cfg, m), jnp.float32))
    out = []
    for lo in range(0, m, batch):
        hi = min(m, lo + batch)
        ids = tokenize(pipeline, eval_set.captions[lo:hi])
        noise = noise_all[lo:hi]
        pad = batch - (hi - lo)  # fixed batch shape: one compile per setting
        if pad:
            ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
            noise = np.concatenate([noise, np.repeat(noise[-1:], pad, 0)])
        refs = row_boxes = embeddings = styles = None
        if num_references:
            if style_images is not None:
                styles = to_unit(style_images[lo:hi])
                if pad:
                    styles = np.concatenate([styles, np.repeat(styles[-1:], pad, 0)])
            refs = to_unit(eval_set.reference_crops[lo:hi, :num_references])
            row_boxes = None if boxes is None else np.asarray(boxes[lo:hi], np.float32)
            if eval_set.reference_embeddings is not None:  # (B, K=1, N, 512)
                embeddings = eval_set.reference_embeddings[lo:hi, None, :num_references]
            if pad:
                refs = np.concatenate([refs, np.repeat(refs[-1:], pad, 0)])
                if row_boxes is not None:
                    row_boxes = np.concatenate([row_boxes, np.repeat(row_boxes[-1:], pad, 0)])
                if embeddings is not None:
                    embeddings = np.concatenate([embeddings, np.repeat(embeddings[-1:], pad, 0)])
        key = jax.random.fold_in(jax.random.key(seed), lo)
        if sampler is not None:
            images = sampler(pipeline, ids, key=key, cfg=cfg, noise=noise, references=refs, identity_cfg=identity_cfg,
                             **({"boxes": row_boxes} if row_boxes is not None else {}),
                             **({"face_embeddings": embeddings} if embeddings is not None else {}),
                             **({"style_images": styles} if styles is not None else {}))
        else:
            images = generate(pipeline, ids, key=key, cfg=cfg, noise=jnp.asarray(noise), references=refs,
                              boxes=row_boxes, face_embeddings=embeddings, style_images=styles,
                              identity_cfg=identity_cfg if refs is not None else None)
        out.append(np.asarray(images)[: hi - lo])
        if progress is not None:
            progress.update(hi - lo)
    return np.concatenate(out)


def real_photo_reference_scores(metrics, eval_set: EvalSet) -> dict[str, float]:
    """Ceilings: the metrics of the real held-out target photos themselves (same-person similarity of real photos,
    reader accuracy on real photos is in the metrics report)."""
    from fusion_jax import evaluation

    first_target = eval_set.target_images[:, 0]
    sims = evaluation.sim_target(metrics.embedder, first_target, eval_set.target_images[:, 1:])
    other = np.roll(eval_set.target_images[:, 1:], shift=len(eval_set.captions) // max(1, len(set(
        eval_set.identity_ids.tolist()))), axis=0)
    diff = evaluation.sim_target(metrics.embedder, first_target, other)
    return {"real_photo_same_person_similarity": float(sims.mean()),
            "real_photo_other_person_similarity": float(diff.mean())}


def grid_rows(eval_set: EvalSet, generated: dict[int, np.ndarray], rows: int) -> list[np.ndarray]:
    """Grid cells, row by row: the 4 reference crops (resized to image size), then 0 / 1 / 4-reference samples."""
    import cv2

    size = eval_set.target_images.shape[2]
    cells = []
    for r in range(min(rows, len(eval_set.captions))):
        for crop in eval_set.reference_crops[r]:
            cells.append(crop if crop.shape[0] == size else cv2.resize(crop, (size, size),
                                                                       interpolation=cv2.INTER_AREA))
        for n in sorted(generated):
            cells.append(generated[n][r])
    return cells


# ----------------------------------------------------------------------------------------------------------------
# The quickstart
# ----------------------------------------------------------------------------------------------------------------


def metric_setup(name: str, image_size: int):
    """The SynthMetricSetup of the metric models: 'default' or 'fast' (tests; low accuracy)."""
    from fusion_jax import synth_metrics as sm

    faces = synthfaces.SynthFaceConfig(image_size=image_size)
    if name == "default":
        return sm.SynthMetricSetup(faces=faces)
    if name == "fast":
        quick = sm.TrainConfig(steps=40, batch_size=32, steps_per_call=20)
        return sm.SynthMetricSetup(faces=faces, train_identities=40, train_photos=4, eval_identities=20,
                                   eval_photos=2, verification_pairs=100, embedder_train=quick, reader_train=quick,
                                   embedder_net=sm.ConvNetConfig(input_size=32, widths=(16, 32)),
                                   reader_net=sm.ConvNetConfig(input_size=32, widths=(16, 32),
                                                               out_features=sm._OFFSETS[-1]))
    raise ValueError(f"metric setup must be 'default' or 'fast', got {name!r}")


def stage_configs(out: str, base_steps: int, fusion_steps: int, batch_size: int, widths: Sequence[int],
                  extra_base: Sequence[str] = (), extra_fusion: Sequence[str] = (),
                  config_dir: str = "") -> tuple[Any, Any, MiniatureModelConfig]:
    """The two stage configs (configs/synthfaces/{text_to_image,face_fusion}.yaml + overrides) under `out`."""
    from fusion_jax.config import load_config

    if not config_dir:
        from fusion_jax.config_files import shipped_config_dir

        config_dir = str(shipped_config_dir() / "synthfaces")
    model_cfg = MiniatureModelConfig(widths=tuple(widths))
    common = [f"data.batch_size={batch_size}", f"checkpoint.every={max(base_steps, fusion_steps)}"]
    base = load_config(os.path.join(config_dir, "text_to_image.yaml"), [
        f"model.pipeline={os.path.join(out, 'pipeline')}", f"workdir={os.path.join(out, 'base')}",
        f"train.steps={base_steps}", f"train.warmup_steps={max(1, min(50, base_steps // 10))}", *common,
        *extra_base])
    fusion = load_config(os.path.join(config_dir, "face_fusion.yaml"), [
        f"model.pipeline={os.path.join(out, 'base_pipeline')}", f"workdir={os.path.join(out, 'fusion')}",
        f"train.steps={fusion_steps}", f"train.warmup_steps={max(1, min(50, fusion_steps // 10))}", *common,
        *extra_fusion])
    return base, fusion, model_cfg


ROUND_SEED_STRIDE = 1000  # round r trains with train.seed / data.seed + 1000 (r - 1): new data order and noise


def continuation_stage(fusion, previous_model: str | os.PathLike, pipeline_dir: str | os.PathLike, out: str,
                       index: int):
    """Face Fusion round `index` (> 1) of config `fusion`, continued from an exported model
    (`export_quickstart_model`): its UNet (LoRA merged) in a copy of `pipeline_dir` at OUT/<round>_pipeline, its
    identity modules as `model.identity_init`, fresh LoRA adapters, optimizer and schedule (a warm restart), the
    seeds moved on (`ROUND_SEED_STRIDE`), workdir OUT/<round>."""
    name = round_name(index)
    previous = Path(previous_model)
    pipe = Path(out) / f"{name}_pipeline"
    marker = pipe / "continued_from.json"
    unet_file = previous / "unet" / f"{weights.DIFFUSERS_WEIGHTS}.safetensors"
    stamp = {"model": str(previous.resolve()), "unet_sha256": hashlib.sha256(unet_file.read_bytes()).hexdigest()}
    if not (marker.is_file() and json.loads(marker.read_text()) == stamp):
        tmp = pipe.with_name(pipe.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(pipeline_dir, tmp, ignore=shutil.ignore_patterns("unet"))
        shutil.copytree(previous / "unet", tmp / "unet")
        (tmp / "continued_from.json").write_text(json.dumps(stamp))
        shutil.rmtree(pipe, ignore_errors=True)
        os.rename(tmp, pipe)
    model = dataclasses.replace(fusion.model, pipeline=str(pipe), identity_init=str(previous))
    shift = ROUND_SEED_STRIDE * (index - 1)
    return dataclasses.replace(fusion, model=model, workdir=os.path.join(out, name),
                               train=dataclasses.replace(fusion.train, seed=fusion.train.seed + shift),
                               data=dataclasses.replace(fusion.data, seed=fusion.data.seed + shift))


def round_name(index: int) -> str:
    """Workdir name of Face Fusion round `index` (1-based; round 1 keeps the name 'fusion')."""
    return "fusion" if index == 1 else f"fusion_round{index}"


def prepare_models(out: str, base, fusions: Sequence[Any], model_cfg: MiniatureModelConfig, log=print
                   ) -> tuple[dict[str, Any], Any]:
    """Pipeline folder, base training, base export, then Face Fusion round r with config `fusions[r - 1]` (rounds
    r > 1 continue from round r-1's export), each skipped when already done: (timings, last round's config)."""
    from fusion_jax.miniature_assets import export_quickstart_model

    if len(fusions) < 1:
        raise ValueError("Face Fusion rounds must be >= 1, got none")
    timings = {}
    pipeline_dir = os.path.join(out, "pipeline")
    log("[1/5] miniature pipeline (random pixel UNet, word-level tokenizer, frozen random text encoder)")
    write_miniature_pipeline(pipeline_dir, model_cfg)
    log(f"[2/5] text-to-image base model: {base.train.steps} steps, batch {base.data.batch_size}")
    timings["base"] = train_stage(base, log)
    export_base_pipeline(base.workdir, pipeline_dir, os.path.join(out, "base_pipeline"))
    stage, last_workdir = None, ""
    rounds = len(fusions)
    for index, fusion in enumerate(fusions, start=1):
        stage = fusion
        if index > 1:
            previous = Path(out) / f"{round_name(index - 1)}_model"
            if not (previous / "identity").is_dir() or timings[round_name(index - 1)]["trained"]:
                export_quickstart_model(last_workdir, pipeline_dir, previous)
            stage = continuation_stage(fusion, previous, pipeline_dir, out, index)
        pipe = stage.data.pipeline
        distinct = " (1 to that many distinct)" if pipe.vary_references else ""
        log(f"[3/5] Face Fusion round {index}/{rounds}: {stage.train.steps} steps, trainable={stage.train.trainable}, "
            f"{pipe.num_references} references per example{distinct}")
        timings[round_name(index)] = train_stage(stage, log)
        last_workdir = stage.workdir
    return timings, stage
