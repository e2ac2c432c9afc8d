"""FaceStudio (seed 001; Yan et al., arXiv 2312.02663): hybrid style / text / identity guidance as identity tokens.

From the paper (its equations):
- image branch `e_i = Linear(CLIP_V(style) || ArcFace(face))`, text branch `e_p = Linear(Prior(CLIP_T(text)) || e_f)`
  with the *same* linear layer; hybrid `e_g = alpha e_i + (1 - alpha) e_p`;
- several photos of one person blended `e_f = sum_i beta_i e_f^i`;
- multi-identity cross-attention: queries in person i's region attend only to person i's tokens;
- training by reconstruction (style input = the image with its face masked, identity = its face crop), condition
  dropout style 0.64 / face 0.1; linear layer + whole UNet, or linear layer + LoRA.

Our choices (the paper has no public code):
- `e_g` (width N * D) is reshaped into N tokens of the UNet's cross-attention width D and LayerNorm'ed
  (IP-Adapter's token head); N = `facestudio.num_tokens`.
- The tokens enter every cross-attention layer through the shared identity token slot with new projections
  `to_k_ref` / `to_v_ref` initialised as copies of the layer's text `to_k` / `to_v`, combine 'joint' by default
  (one softmax over [text; identity tokens]: at initialisation exactly "identity tokens appended to the prompt").
- `text_branch: prior` runs the prompt through the prior's own CLIP text encoder with projection (Karlo's
  `text_encoder/`, same tokenizer as SD 1.5) and the DALL-E 2 prior (`models/prior.py`, `sample_prior`, guidance
  `prior_guidance`, `prior_steps` steps, noise from the generation key) inside the jitted sampler; `attach_prior`
  gives the adapter those modules. `text_branch: direct` uses the pooled CLIP text state of the prompt (the UNet's
  own text encoder at the EOS token) in place of Prior(CLIP_T(text)), so the method runs without a prior
  checkpoint; its width must equal the style embedding width.
- A dropped / absent style image or face is a zero vector (the same zero the dropout trains).
- Training uses the image branch only (alpha = 1: the reconstruction recipe has no text condition for the identity
  branch); the shared linear layer is what the text branch reuses at inference.
- Outside every person's region queries see text only (`outside: text`), or the tokens of one person drawn at
  random per image from the generation key (`outside: random`, the paper's option).
- People's regions come from boxes or from instance masks (`ReferenceRequest.masks`, `--identity-mask`): a
  latent cell belongs to a person if any of its pixels does.
- Padding references (`reference_valid` False) are left out of e_f = sum_i beta_i e_f^i; the other betas are
  rescaled to the same total (the default 1/N becomes 1 / number of real photos).
- Training reads two fields of the image stream: `masked_target` (the training image with its face box filled
  with mid-grey; the style input) encoded inside the step by the frozen style encoder (`facestudio.style_encoder`,
  resized bicubically to its input size), and `face_embedding` (the photo's ArcFace embedding stored by the
  dataset builder; zeros for photos without a face, the paper's non-person images).
- Sampling defaults to the paper's Euler-ancestral, 25 steps (`sampling_defaults`; the CLI's --scheduler /
  --steps win). `facestudio.img2img` (`--img2img-strength S`) starts from the style image's VAE latents noised
  to fraction S of the schedule.

At sampling time the ArcFace embeddings come with the request (`ReferenceRequest.face_embeddings`, from the CLI's
face detector) or from a .npy file (`facestudio.face_embeddings`, `--face-embeddings`: insightface cannot run inside
the jitted sampler) and the style image from a file (`facestudio.style_image`,
`--style-image`) or one per row with the request (`ReferenceRequest.style_images`, `generate(style_images=...)`),
encoded inside the jitted function by the adapter's CLIP vision tower (`style_encoder`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax.identity.slots import copy_text_projections
from fusion_jax.identity.base import IdentityMethod, register
from fusion_jax.identity.context import IdentityContext
from fusion_jax.schedulers import add_noise, training_target

TEXT_BRANCHES = ("prior", "direct")
COMBINES = ("joint", "decoupled")
TRAINABLE = ("adapter", "adapter+lora", "adapter+unet")
OUTSIDE = ("text", "random")
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
_ADAPTER_PARAM = re.compile(r"(^|\.)(facestudio\.(fuse|token_norm)\.|to_[kv]_ref\.)")
_LORA_PARAM = re.compile(r"(^|\.)lora\.lora_[ab]$")
_STYLE_ENCODER = re.compile(r"(^|\.)facestudio\.(style_encoder|prior|prior_text_encoder)\.")


@dataclass(frozen=True)
class FaceStudioConfig:
    """`facestudio.*` options."""

    num_tokens: int = 4  # N identity tokens made from the hybrid embedding e_g
    style_dim: int = 768  # width of the style embedding CLIP_V(style) (ViT-L/14 image_embeds: 768)
    face_dim: int = 512  # width of the ArcFace embedding
    alpha: float = 0.5  # hybrid weight: e_g = alpha e_i + (1 - alpha) e_p (1 = image branch only); --alpha
    text_branch: Literal["prior", "direct"] = "direct"  # Prior(CLIP_T(text)) or the pooled CLIP text state itself
    combine: Literal["joint", "decoupled"] = "joint"  # identity tokens in the text softmax, or text + s * identity
    strength: float = 1.0  # identity strength of the token slot (0 = the base UNet exactly)
    betas: tuple[float, ...] | None = None  # per-reference weights of e_f = sum_i beta_i e_f^i (None: 1/N); --beta
    style_image: str | None = None  # sampling: the style image file (None: no style, a zero embedding); --style-image
    face_embeddings: str | None = None  # sampling: .npy ArcFace embeddings (E,), (N, E) or (K, N, E); --face-embeddings
    style_size: int = 224  # side the style image is resized to (the attached CLIP tower's image_size wins)
    style_dropout: float = 0.64  # training: probability of dropping the style input (paper: 0.64)
    face_dropout: float = 0.1  # training: probability of dropping the face input (paper: 0.1)
    lora_rank: int = 4  # 'adapter+lora': rank of the LoRA adapters on the UNet attention
    outside: Literal["text", "random"] = "text"  # several people: queries outside every region see text only, or
    #   one person drawn at random per image
    prior_steps: int = 25  # text_branch 'prior': UnCLIP sampling steps of the prior
    prior_guidance: float = 4.0  # text_branch 'prior': classifier-free guidance scale of the prior (Karlo: 4)
    style_encoder: tuple[str, ...] | None = None  # the style towers, their image_embeds concatenated in this order
    #   (the paper: ViT-L/14, RN101, ViT-B/32): a folder is a CLIP ViT (transformers CLIPVisionModelWithProjection
    #   or a whole CLIPModel), a .safetensors file an OpenAI / open_clip RN tower (`visual.*` keys); --style-encoder
    prior: str | None = None  # text_branch 'prior': Karlo-style folder (prior/, prior_scheduler/, text_encoder/);
    #   --prior
    img2img: bool = False  # sampling: start from the style image's noised latents (SamplingConfig.init_strength
    #   says how much of the schedule is re-run); --img2img-strength

    def __post_init__(self):
        if isinstance(self.style_encoder, (str, Path)):  # one tower given as a plain path
            object.__setattr__(self, "style_encoder", (str(self.style_encoder),))
        elif self.style_encoder is not None:
            object.__setattr__(self, "style_encoder", tuple(str(p) for p in self.style_encoder))
            if not self.style_encoder:
                raise ValueError("facestudio.style_encoder must name at least one tower, or be null")
        if self.outside not in OUTSIDE:
            raise ValueError(f"facestudio.outside must be one of {OUTSIDE}, got {self.outside!r}")
        if self.prior_guidance < 0:
            raise ValueError(f"facestudio.prior_guidance must be >= 0, got {self.prior_guidance!r}")
        for key in ("num_tokens", "style_dim", "face_dim", "style_size", "lora_rank", "prior_steps"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"facestudio.{key} must be a positive integer, got {getattr(self, key)!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"facestudio.alpha must be in [0, 1], got {self.alpha!r}")
        if self.text_branch not in TEXT_BRANCHES:
            raise ValueError(f"facestudio.text_branch must be one of {TEXT_BRANCHES}, got {self.text_branch!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"facestudio.combine must be one of {COMBINES}, got {self.combine!r}")
        if self.strength < 0:
            raise ValueError(f"facestudio.strength must be >= 0, got {self.strength!r}")
        if self.betas is not None:
            if isinstance(self.betas, (str, bytes)) or not len(self.betas):
                raise ValueError(f"facestudio.betas must be a non-empty list of weights or None, got {self.betas!r}")
            if any(b < 0 for b in self.betas):
                raise ValueError(f"facestudio.betas must be >= 0, got {self.betas!r}")
        for key in ("style_dropout", "face_dropout"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"facestudio.{key} must be a probability in [0, 1], got {getattr(self, key)!r}")


class FaceStudioAdapter(nnx.Module):
    """The shared linear layer (`fuse`: [style or text embedding || face embedding] -> N * D), the token norm and,
    optionally, the CLIP vision tower that encodes style images (`style_encoder`, frozen)."""

    def __init__(self, cfg: FaceStudioConfig, cross_dim: int, *, rngs: nnx.Rngs, style_encoder=None,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.num_tokens, self.cross_dim = cfg.num_tokens, cross_dim
        self.style_dim, self.face_dim = cfg.style_dim, cfg.face_dim
        self.fuse = nnx.Linear(cfg.style_dim + cfg.face_dim, cfg.num_tokens * cross_dim, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
        self.token_norm = nnx.LayerNorm(cross_dim, epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype,
                                        use_fast_variance=False, rngs=rngs)
        self.style_encoder = nnx.data(style_encoder)
        # text_branch 'prior' (attach_prior): the prior, its CLIP text encoder with projection, its UnCLIP sampler
        self.prior = nnx.data(None)
        self.prior_text_encoder = nnx.data(None)
        self.prior_sampler = None


def attach_prior(model, prior, text_encoder, sampler):
    """Give the adapter the text branch's Prior(CLIP_T(text)): `prior` (a `PriorTransformer`), `text_encoder` (a
    `CLIPTextModelWithProjection` on the UNet's tokenizer) and `sampler` (an `UnCLIPSampler`); all frozen. Widths
    are checked: the prior must map the encoder's `text_embeds` to `facestudio.style_dim`-wide image embeddings."""
    adapter = _adapter(model)
    if prior.config.output_dim != adapter.style_dim:
        raise ValueError(f"facestudio prior: it outputs {prior.config.output_dim}-wide CLIP image embeddings, "
                         f"facestudio.style_dim is {adapter.style_dim}")
    proj = getattr(text_encoder, "text_projection", None)
    if proj is None:
        raise ValueError("facestudio prior: the text encoder must be a CLIPTextModelWithProjection (text_embeds)")
    if proj.kernel.get_value().shape[1] != prior.config.text_embed_dim:
        raise ValueError(f"facestudio prior: the text encoder gives {proj.kernel.get_value().shape[1]}-wide "
                         f"text_embeds, the prior takes {prior.config.text_embed_dim}")
    adapter.prior, adapter.prior_text_encoder, adapter.prior_sampler = prior, text_encoder, sampler
    return model


def load_prior_branch(model, folder, cfg: "FaceStudioConfig"):
    """`attach_prior` from a Karlo-style pipeline folder (prior/, prior_scheduler/, text_encoder/ with projection);
    a prior of another embedding width than `facestudio.style_dim` is an error naming the folder."""
    from fusion_jax import encoders, weights

    prior = encoders.load_prior(folder, expected_embedding_dim=cfg.style_dim)
    sampler = encoders.load_prior_sampler(folder, cfg.prior_steps)
    return attach_prior(model, prior, weights.load_text_encoder(folder), sampler)


def prior_text_embedding(model, input_ids, empty_ids, key, cfg: "FaceStudioConfig") -> jax.Array:
    """Prior(CLIP_T(text)) (B, style_dim): the prompt's CLIP text embedding through the DALL-E 2 prior (negative:
    the empty prompt). Token mask: every position up to each prompt's first EOS (CLIP's highest id)."""
    from fusion_jax.models.prior import sample_prior

    adapter = _adapter(model)
    if adapter.prior is None:
        raise ValueError("facestudio.text_branch='prior' needs the prior: facestudio.load_prior_branch(model, FOLDER,"
                         " cfg) or attach_prior (or use facestudio.text_branch=direct)")

    def encode(ids):
        out = adapter.prior_text_encoder(ids)
        mask = jnp.arange(ids.shape[1])[None] <= jnp.argmax(ids, axis=-1)[:, None]
        return out.text_embeds, out.last_hidden_state, mask

    negative = encode(empty_ids[:1]) if cfg.prior_guidance > 1.0 else None
    return sample_prior(adapter.prior, adapter.prior_sampler, *encode(input_ids), negative=negative,
                        guidance_scale=cfg.prior_guidance, key=key).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# the equations
# ----------------------------------------------------------------------------------------------------------------


def blend_faces(face_embeds: jax.Array, betas=None, valid=None) -> jax.Array:
    """e_f = sum_i beta_i e_f^i over the reference axis: (..., N, E) -> (..., E); betas (N,) (default 1/N).

    `valid` (..., N) bool drops padding references: their weight is 0 and the others are rescaled to the same
    total (so the default 1/N becomes 1/(number of real photos)); a row with no valid reference gives zeros."""
    face_embeds = jnp.asarray(face_embeds)
    n = face_embeds.shape[-2]
    w = jnp.full((n,), 1.0 / n, jnp.float32) if betas is None else jnp.asarray(betas, jnp.float32)
    if w.shape != (n,):
        raise ValueError(f"facestudio.betas: {w.shape[0] if w.ndim == 1 else w.shape} weights for {n} references")
    if valid is None:
        return jnp.einsum("...ne,n->...e", face_embeds.astype(jnp.float32), w)
    valid = jnp.asarray(valid, bool)
    if valid.shape != face_embeds.shape[:-1]:
        raise ValueError(f"reference_valid {valid.shape} must match the embeddings' leading axes "
                         f"{face_embeds.shape[:-1]}")
    wv = jnp.where(valid, w, 0.0)
    total = jnp.sum(wv, axis=-1, keepdims=True)
    wv = wv * jnp.where(total > 0, jnp.sum(w) / jnp.where(total > 0, total, 1.0), 0.0)
    return jnp.einsum("...ne,...n->...e", face_embeds.astype(jnp.float32), wv)


def hybrid_embedding(adapter: FaceStudioAdapter, style_embeds: jax.Array, text_embeds: jax.Array,
                     face_embed: jax.Array, alpha) -> jax.Array:
    """e_g = alpha Linear(style || e_f) + (1 - alpha) Linear(text || e_f), (M, N * D) float32.

    style_embeds / text_embeds (M, style_dim), face_embed (M, face_dim); alpha scalar or (M,). alpha 1 reads no
    text and alpha 0 no style: the unused branch is multiplied by an exact 0 (and never NaN: inputs are finite)."""
    alpha = jnp.asarray(alpha, jnp.float32)
    alpha = alpha[:, None] if alpha.ndim == 1 else alpha
    e_i = adapter.fuse(jnp.concatenate([style_embeds, face_embed], axis=-1).astype(adapter.fuse.dtype))
    e_p = adapter.fuse(jnp.concatenate([text_embeds, face_embed], axis=-1).astype(adapter.fuse.dtype))
    return alpha * e_i.astype(jnp.float32) + (1.0 - alpha) * e_p.astype(jnp.float32)


def hybrid_tokens(adapter: FaceStudioAdapter, style_embeds, text_embeds, face_embeds, alpha, betas=None,
                  reference_valid=None) -> tuple[jax.Array, jax.Array]:
    """Per-identity tokens: style_embeds / text_embeds (B, style_dim) (shared by the K people of a row),
    face_embeds (B, K, N, face_dim) (`reference_valid` (B, K, N): padding references left out of the blend)
    -> tokens (B, K * num_tokens, D) and token identity (B, K * num_tokens)."""
    face_embeds = jnp.asarray(face_embeds)
    if face_embeds.ndim != 4 or face_embeds.shape[-1] != adapter.face_dim:
        raise ValueError(f"face_embeds must be (B, K, N, {adapter.face_dim}), got {face_embeds.shape}")
    b, k = face_embeds.shape[:2]
    for name, x in (("style_embeds", style_embeds), ("text_embeds", text_embeds)):
        if tuple(jnp.shape(x)) != (b, adapter.style_dim):
            raise ValueError(f"{name} must be (B={b}, {adapter.style_dim}), got {tuple(jnp.shape(x))} (the text "
                             "branch's width must equal the style embedding width facestudio.style_dim)")
    e_f = blend_faces(face_embeds, betas, reference_valid).reshape(b * k, -1)
    rep = lambda x: jnp.repeat(jnp.asarray(x, jnp.float32), k, axis=0)
    alpha = jnp.asarray(alpha, jnp.float32)
    e_g = hybrid_embedding(adapter, rep(style_embeds), rep(text_embeds), e_f, rep(alpha) if alpha.ndim else alpha)
    tokens = adapter.token_norm(e_g.reshape(b * k, adapter.num_tokens, adapter.cross_dim))
    tokens = tokens.reshape(b, k * adapter.num_tokens, adapter.cross_dim)
    ids = jnp.broadcast_to(jnp.repeat(jnp.arange(k, dtype=jnp.int32), adapter.num_tokens), (b, k * adapter.num_tokens))
    return tokens, ids


def identity_context(model, style_embeds, text_embeds, face_embeds, alpha, *, betas=None, strength=1.0,
                     region_masks=None, reference_valid=None) -> IdentityContext:
    """FaceStudio's IdentityContext: the hybrid tokens in every adapted layer's cross-attention slot."""
    from fusion_jax.identity.fusion import strength_array

    face_embeds = jnp.asarray(face_embeds)
    if face_embeds.ndim == 2:
        face_embeds = face_embeds[:, None, None]
    elif face_embeds.ndim == 3:
        face_embeds = face_embeds[:, None]
    if reference_valid is not None and face_embeds.ndim == 4 and jnp.ndim(reference_valid) == 3 \
            and tuple(jnp.shape(reference_valid)) != face_embeds.shape[:3]:
        reference_valid = None  # embeddings from a file with its own N: every one of them is real
    tokens, ids = hybrid_tokens(_adapter(model), style_embeds, text_embeds, face_embeds, alpha, betas,
                                reference_valid)
    layers = [n for n, b in model.transformer_blocks().items() if b.attn2.has_identity_slot]
    return IdentityContext(reference_tokens={n: tokens for n in layers}, token_identity={n: ids for n in layers},
                           strength=strength_array(strength, tokens.shape[0], face_embeds.shape[1]),
                           region_masks=region_masks)


def fill_outside(region_masks: dict[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
    """`outside: random`: query positions inside no person's region join one person drawn per image (the same
    person at every latent level). region_masks {level: (B, K, P) bool} -> the same with those positions added."""
    first = next(iter(region_masks.values()))
    b, k = first.shape[:2]
    pick = jax.nn.one_hot(jax.random.randint(key, (b,), 0, k), k, dtype=bool)  # (B, K)
    return {level: m | (~jnp.any(m, axis=1, keepdims=True) & pick[:, :, None]) for level, m in region_masks.items()}


def pooled_text(text_hidden: jax.Array, input_ids: jax.Array) -> jax.Array:
    """The pooled CLIP text state (the hidden state at each prompt's EOS token, CLIP's highest token id): the
    'direct' text branch. text_hidden (B, L, D), input_ids (B, L) -> (B, D)."""
    eos = jnp.argmax(input_ids, axis=-1)
    return jnp.take_along_axis(text_hidden, eos[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def style_towers(adapter: "FaceStudioAdapter") -> list:
    """The adapter's style towers (one module, or several whose embeddings are concatenated)."""
    enc = adapter.style_encoder
    if enc is None:
        return []
    return list(enc) if isinstance(enc, (list, tuple, nnx.List)) else [enc]


def style_input_size(adapter: "FaceStudioAdapter", cfg: "FaceStudioConfig") -> int:
    """Side of the style pixels handed to the towers: the first tower's input size (others resize), else
    `facestudio.style_size`."""
    towers = style_towers(adapter)
    return towers[0].config.image_size if towers else cfg.style_size


def style_embedding(model, pixels: jax.Array | None, batch: int) -> jax.Array:
    """CLIP_V(style) (B, style_dim) of CLIP-normalised pixels (B, S, S, 3) through the adapter's style towers
    (each at its own input size: bicubic resize of the normalised pixels, a linear map that commutes with the
    per-channel normalisation), their embeddings concatenated; zeros when `pixels` is None (no style)."""
    adapter = _adapter(model)
    if pixels is None:
        return jnp.zeros((batch, adapter.style_dim), jnp.float32)
    towers = style_towers(adapter)
    if not towers:
        raise ValueError("facestudio: a style image was given but the adapter has no style encoder (set "
                         "facestudio.style_encoder, or attach with style_encoder=encoders.load_clip_vision(FOLDER))")
    embs = []
    for tower in towers:
        size = tower.config.image_size
        x = pixels
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="bicubic", antialias=True)
        out = tower(x)
        embs.append(out.image_embeds if getattr(out, "image_embeds", None) is not None else out.pooler_output)
    emb = jnp.concatenate([e.astype(jnp.float32) for e in embs], axis=-1)
    if emb.shape[-1] != adapter.style_dim:
        raise ValueError(f"facestudio.style_dim={adapter.style_dim}, the style encoder gives {emb.shape[-1]}")
    return emb.astype(jnp.float32)


def clip_pixels(images: jax.Array, size: int) -> jax.Array:
    """Images in [-1, 1] (B, H, W, 3) -> CLIP-normalised pixels (B, size, size, 3) (bicubic resize, antialiased
    when shrinking): the style input of a training batch's `masked_target`, inside the jitted step."""
    x = (jnp.asarray(images, jnp.float32) + 1.0) * 0.5
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bicubic", antialias=True)
    return (x - CLIP_MEAN) / CLIP_STD


def load_style_image(path, size: int, *, what: str = "--style-image") -> np.ndarray:
    """A style image file -> (size, size, 3) CLIP-normalised float32 (resize of the centre square crop)."""
    from fusion_jax.data.images import read_centre_crop

    return (read_centre_crop(path, size, size, what) - CLIP_MEAN) / CLIP_STD


def style_init_image(path, height: int, width: int, *, what: str = "facestudio.style_image") -> np.ndarray:
    """The style image as an img2img start, (height, width, 3) in [-1, 1] (centre crop of that aspect)."""
    from fusion_jax.data.images import read_centre_crop

    return read_centre_crop(path, height, width, what) * 2.0 - 1.0


def _load_style_tower(path: str):
    """One style tower and its embedding width: a folder -> our CLIP ViT with projection; a file -> an OpenAI /
    open_clip ModifiedResNet (`visual.*` keys). Errors name `facestudio.style_encoder` and the path."""
    from fusion_jax import encoders

    try:
        if Path(path).is_file():
            tower = encoders.load_clip_resnet(path)
            return tower, tower.config.output_dim
        tower = encoders.load_clip_vision(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"facestudio.style_encoder {path}: cannot load the CLIP image tower ({e})") from e
    if not hasattr(tower, "visual_projection"):
        raise ValueError(f"facestudio.style_encoder {path}: a CLIP vision tower without projection (no "
                         "image_embeds); give a CLIPVisionModelWithProjection or CLIPModel folder")
    return tower, tower.config.projection_dim


def _adapter(model) -> FaceStudioAdapter:
    adapter = getattr(model, "facestudio", None)
    if adapter is None:
        raise ValueError("facestudio: the UNet has no FaceStudio adapter (attach_adapter / FaceStudio.attach first)")
    return adapter


# ----------------------------------------------------------------------------------------------------------------
# model surgery, training
# ----------------------------------------------------------------------------------------------------------------


def attach_adapter(unet, cfg: FaceStudioConfig = FaceStudioConfig(), *, style_encoder=None, rngs=None):
    """Give `unet` (in place) the adapter `unet.facestudio` and, on every transformer block's `attn2`,
    `to_k_ref` / `to_v_ref` as copies of its text `to_k` / `to_v` (no bias), combine `cfg.combine`."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    blocks = unet.transformer_blocks()
    cross = {b.attn2.to_k.kernel.get_value().shape[0] for b in blocks.values()}
    if len(cross) != 1:
        raise ValueError(f"facestudio: the UNet's cross-attention widths differ ({sorted(cross)}); one token width "
                         "serves every layer")
    first = next(iter(blocks.values())).attn2.to_k
    unet.facestudio = FaceStudioAdapter(cfg, cross.pop(), rngs=rngs, style_encoder=style_encoder, dtype=first.dtype,
                                        param_dtype=first.kernel.get_value().dtype)
    copy_text_projections(unet, cfg.combine, rngs=rngs)
    return unet


def trainable_filter(preset: str):
    """'adapter': the shared linear layer, token norm and to_k_ref / to_v_ref; 'adapter+lora': plus LoRA;
    'adapter+unet': plus the whole UNet (the paper's recipe). The CLIP style encoder is never trained."""
    if preset not in TRAINABLE:
        raise ValueError(f"train.trainable must be one of {TRAINABLE} for facestudio, got {preset!r}")

    def selected(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        key = ".".join(str(p) for p in path)
        if _STYLE_ENCODER.search(key):
            return False
        if preset == "adapter+unet" or _ADAPTER_PARAM.search(key):
            return True
        return preset == "adapter+lora" and bool(_LORA_PARAM.search(key))

    return selected


def reconstruction_loss(model, batch: dict, rng: jax.Array, schedule, cfg: FaceStudioConfig):
    """FaceStudio's reconstruction loss: the target is the image itself, the style input its face-masked version
    ('style_embedding' (B, style_dim), its CLIP image embedding, or 'style_image' (B, S, S, 3) CLIP-normalised
    pixels encoded by the adapter's style encoder), the identity its face crop's ArcFace 'face_embedding' (B, E) or
    (B, N, E). Style dropped with `style_dropout`, face with `face_dropout` (zero vectors); image branch only."""
    for key in ("latents", "text_emb", "face_embedding"):
        if key not in batch:
            raise ValueError(f"facestudio loss: batch has no {key!r} (has {sorted(batch)})")
    x0 = batch["latents"]
    b = x0.shape[0]
    if "style_embedding" in batch:
        style = jnp.asarray(batch["style_embedding"], jnp.float32)
    elif "style_image" in batch:
        style = style_embedding(model, batch["style_image"], b)
    elif "masked_target" in batch:  # the image stream's face-masked target, encoded here by the style encoder
        if not style_towers(_adapter(model)):
            raise ValueError("facestudio loss: the batch's 'masked_target' needs the style encoder (set "
                             "facestudio.style_encoder to a CLIP vision folder)")
        style = style_embedding(model, clip_pixels(batch["masked_target"], style_input_size(_adapter(model), cfg)), b)
    else:
        raise ValueError(f"facestudio loss: batch needs 'style_embedding', 'style_image' or 'masked_target' (has "
                         f"{sorted(batch)})")
    k_t, k_noise, k_style, k_face = jax.random.split(rng, 4)
    t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32).astype(x0.dtype)
    x_t = add_noise(schedule, x0, noise, t)
    drop_style = jax.random.bernoulli(k_style, cfg.style_dropout, (b,))
    drop_face = jax.random.bernoulli(k_face, cfg.face_dropout, (b,))
    style = jnp.where(drop_style[:, None], 0.0, style)
    face = jnp.asarray(batch["face_embedding"], jnp.float32)
    face = jnp.where(drop_face.reshape((b,) + (1,) * (face.ndim - 1)), 0.0, face)
    ctx = identity_context(model, style, jnp.zeros_like(style), face, 1.0, strength=cfg.strength)
    pred = model(x_t, t, batch["text_emb"], batch.get("added_cond_kwargs"), identity=ctx).astype(jnp.float32)
    target = training_target(schedule, x0, noise, t).astype(jnp.float32)
    return jnp.mean((pred - target) ** 2), {"style_dropped": jnp.mean(drop_style.astype(jnp.float32)),
                                            "faces_dropped": jnp.mean(drop_face.astype(jnp.float32))}


def parse_betas(value: str, flag: str = "--beta") -> tuple[float, ...]:
    """'0.7,0.3' -> (0.7, 0.3); errors name the flag."""
    try:
        betas = tuple(float(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} {value!r}: expected comma-separated numbers, e.g. 0.7,0.3") from None
    if not betas or any(b < 0 for b in betas):
        raise ValueError(f"{flag} {value!r}: expected one or more weights >= 0")
    return betas


# ----------------------------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------------------------


@register
class FaceStudio(IdentityMethod):
    """FaceStudio behind the identity-method interface."""

    name = "facestudio"
    section = "facestudio"
    config_class = FaceStudioConfig
    trainable_presets = TRAINABLE
    batch_keys = ("face_embedding", "masked_target")  # the image stream's; the style encoder runs in the step
    display_name = "FaceStudio"
    accepts_identity_masks = True  # regions from instance masks as well as boxes
    accepts_style_images = True  # one style image per row (ReferenceRequest.style_images) wins over style_image

    def attach(self, unet, cfg: FaceStudioConfig, *, trainable: str = "all", rngs=None):
        attach_adapter(unet, cfg, rngs=rngs)
        if trainable == "adapter+lora":
            from fusion_jax.identity.slots import attach_lora

            attach_lora(unet, cfg.lora_rank, rngs=rngs)
        return unet

    def prepare_model(self, model, cfg: FaceStudioConfig):
        adapter = _adapter(model)
        if cfg.style_encoder is not None and adapter.style_encoder is None:
            towers, widths = [], []
            for path in cfg.style_encoder:
                tower, width = _load_style_tower(path)
                towers.append(tower)
                widths.append(width)
            if sum(widths) != cfg.style_dim:
                raise ValueError(f"facestudio.style_encoder {', '.join(cfg.style_encoder)}: the towers give "
                                 f"{'+'.join(map(str, widths))} = {sum(widths)}-wide image_embeds, "
                                 f"facestudio.style_dim is {cfg.style_dim}")
            adapter.style_encoder = nnx.data(towers[0]) if len(towers) == 1 else nnx.List(towers)
        if cfg.text_branch == "prior" and cfg.prior is not None and adapter.prior is None:
            try:
                load_prior_branch(model, cfg.prior, cfg)
            except (OSError, KeyError) as e:
                raise ValueError(f"facestudio.prior {cfg.prior}: cannot load the prior ({e})") from e
        return model

    def sampling_defaults(self, cfg):
        return {"scheduler": "euler_ancestral", "num_steps": 25}  # the paper's sampler

    def trainable_filter(self, preset, cfg):
        return trainable_filter(preset)

    def loss(self, model, batch, rng, schedule, cfg):
        return reconstruction_loss(model, batch, rng, schedule, cfg)

    def sampling_inputs(self, model, cfg: FaceStudioConfig, request, *, batch, image_size, latent_size):
        from fusion_jax.identity import ip_adapter_faceid
        from fusion_jax.identity.fusion import request_region_masks, strength_array

        if cfg.text_branch == "prior" and _adapter(model).prior is None:
            raise ValueError("facestudio.text_branch='prior' needs the prior: facestudio.load_prior_branch(model, "
                             "FOLDER, cfg) or attach_prior (or use facestudio.text_branch=direct)")
        _adapter(model)
        k, n = np.shape(request.references)[1:3]
        emb = ip_adapter_faceid.request_face_embeddings(request, cfg.face_embeddings, cfg.face_dim, batch,
                                                        "facestudio.face_embeddings")
        if emb.shape[2] != n:
            raise ValueError(f"--face-embeddings {cfg.face_embeddings}: {emb.shape[2]} embeddings per person, the "
                             f"references hold {n} photos per person")
        if cfg.betas is not None and len(cfg.betas) != emb.shape[2]:
            raise ValueError(f"--beta: {len(cfg.betas)} weights for {emb.shape[2]} references per person "
                             "(facestudio.betas)")
        out = {"face_embeds": jnp.asarray(emb),
               "strength": strength_array(cfg.strength if request.strength is None else request.strength, batch, k)}
        if request.style_images is not None:  # one per row, in [-1, 1]
            if cfg.img2img:
                raise ValueError("facestudio.img2img starts from facestudio.style_image; per-row style_images "
                                 "are not an img2img start")
            out["style_pixels"] = clip_pixels(request.style_images, style_input_size(_adapter(model), cfg))
        elif cfg.style_image is not None:
            size = style_input_size(_adapter(model), cfg)  # the towers' input size wins over facestudio.style_size
            pixels = load_style_image(cfg.style_image, size, what="facestudio.style_image")
            out["style_pixels"] = jnp.broadcast_to(jnp.asarray(pixels), (batch,) + pixels.shape)
            if cfg.img2img:
                init = style_init_image(cfg.style_image, *image_size)
                out["init_images"] = jnp.broadcast_to(jnp.asarray(init), (batch,) + init.shape)
        elif cfg.img2img:
            raise ValueError("facestudio.img2img starts from the style image, and none was given "
                             "(--style-image / facestudio.style_image)")
        masks = request_region_masks(model, request, batch, k, image_size, latent_size)
        if masks is not None:
            out["region_masks"] = masks
        return out

    def encode_references(self, model, cfg: FaceStudioConfig, parts, key):
        inputs = parts.inputs
        style = style_embedding(model, inputs.get("style_pixels"), parts.batch)
        if cfg.text_branch == "prior":
            text = prior_text_embedding(model, inputs["input_ids"], inputs["empty_ids"], jax.random.fold_in(key, 7),
                                        cfg)
        else:
            text = pooled_text(parts.text_cond, inputs["input_ids"])
        masks = inputs.get("region_masks")
        if masks is not None and cfg.outside == "random":
            masks = fill_outside(masks, jax.random.fold_in(key, 11))
        return identity_context(model, style, text, inputs["face_embeds"], cfg.alpha, betas=cfg.betas,
                                strength=inputs["strength"], region_masks=masks,
                                reference_valid=inputs.get("reference_valid"))

    def guided_prediction(self, model, cfg, sampling_cfg, cache, parts, x_in, t, step, key):
        from fusion_jax.sampling import identity_guided_prediction

        return identity_guided_prediction(model, x_in, t, parts.text_uncond, parts.text_cond, cache, sampling_cfg)

    def export_tensors(self, model, cfg) -> dict[str, np.ndarray]:
        from fusion_jax import weights

        return {k: v for k, v in weights.state_dict(model).items()
                if _ADAPTER_PARAM.search(k) and not _STYLE_ENCODER.search(k)}

    def load_tensors(self, unet, cfg, tensors, source: str):
        from fusion_jax import weights

        attach_adapter(unet, cfg)
        weights.load_state_dict(unet, tensors, allow_missing=(r".*",), source=source)
        expected = set(self.export_tensors(unet, cfg))
        missing = sorted(expected - set(tensors))
        if missing:
            raise ValueError(f"{source}: FaceStudio tensors missing from the file: {missing[:5]}")
        return unet

    def add_arguments(self, parser) -> None:
        parser.add_argument("--style-image", default=None, help="FaceStudio style image (facestudio.style_image)")
        parser.add_argument("--alpha", type=float, default=None,
                            help="FaceStudio hybrid weight: 1 = style image branch only, 0 = text branch only")
        parser.add_argument("--beta", default=None,
                            help="FaceStudio per-reference weights B[,B...] of the blended face embedding")
        parser.add_argument("--style-encoder", action="append", default=None, metavar="PATH",
                            help="FaceStudio style tower (repeat for several, embeddings concatenated in order): a "
                                 "CLIP ViT folder or an RN .safetensors file (facestudio.style_encoder)")
        parser.add_argument("--prior", default=None,
                            help="FaceStudio: prior folder (Karlo layout) for the text branch; sets "
                                 "facestudio.text_branch=prior")
        parser.add_argument("--img2img-strength", type=float, default=None,
                            help="FaceStudio img2img: start from the style image noised to this fraction of the "
                                 "schedule (0 < S <= 1)")
        # ArcFace embeddings: --face-embeddings is declared by ip_adapter_faceid (one flag for both methods)

    def apply_arguments(self, args, cfg: FaceStudioConfig, sampling_cfg):
        changes = {}
        if getattr(args, "style_image", None) is not None:
            if not Path(args.style_image).is_file():
                raise ValueError(f"--style-image {args.style_image}: no such file")
            load_style_image(args.style_image, cfg.style_size, what="--style-image")
            changes["style_image"] = str(args.style_image)
        if getattr(args, "alpha", None) is not None:
            if not 0.0 <= args.alpha <= 1.0:
                raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
            changes["alpha"] = float(args.alpha)
        if getattr(args, "beta", None) is not None:
            changes["betas"] = parse_betas(args.beta)
        towers = getattr(args, "style_encoder", None)
        if towers:
            for path in towers:
                if not Path(path).exists():
                    raise ValueError(f"--style-encoder {path}: no such folder or file")
            changes["style_encoder"] = tuple(str(p) for p in towers)
        if getattr(args, "prior", None) is not None:
            if not Path(args.prior).is_dir():
                raise ValueError(f"--prior {args.prior}: no such folder")
            changes["prior"] = str(args.prior)
        if getattr(args, "prior", None) is not None:
            changes["text_branch"] = "prior"
        strength = getattr(args, "img2img_strength", None)
        if strength is not None:
            if not 0.0 < strength <= 1.0:
                raise ValueError(f"--img2img-strength must be in (0, 1], got {strength}")
            if changes.get("style_image", cfg.style_image) is None:
                raise ValueError("--img2img-strength starts from the style image: give --style-image")
            changes["img2img"] = True
            sampling_cfg = dataclasses.replace(sampling_cfg, init_strength=float(strength))
        if getattr(args, "face_embeddings", None) is not None:
            from fusion_jax.identity import ip_adapter_faceid

            ip_adapter_faceid.load_face_embeddings(args.face_embeddings, cfg.face_dim, what="--face-embeddings")
            changes["face_embeddings"] = str(args.face_embeddings)
        return (dataclasses.replace(cfg, **changes) if changes else cfg), sampling_cfg


__all__ = ["FaceStudio", "FaceStudioConfig", "FaceStudioAdapter", "attach_adapter", "attach_prior",
           "load_prior_branch", "prior_text_embedding", "fill_outside", "blend_faces", "hybrid_embedding",
           "hybrid_tokens", "identity_context", "pooled_text", "style_embedding", "load_style_image",
           "style_init_image", "style_towers", "style_input_size",
           "reconstruction_loss", "trainable_filter", "parse_betas"]
