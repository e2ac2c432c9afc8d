"""Identity-method inference cost: XLA FLOPs per generated image, base text-to-image vs references.

    python benchmarks/fusion.py                          # SD1.5 shapes, 512x512, 30 steps (a few minutes on a CPU)
    python benchmarks/fusion.py --size tiny --steps 4    # seconds
    python benchmarks/fusion.py --json out/fusion.json --reference-size 224

What is counted: everything `sampling.generate` runs for one image: the CLIP text encoder (prompt, negative prompt
and, with references, the empty prompt of the reference branch), the VAE encoder on the reference crops, the
reference branch of the UNet, every denoising step with its guidance, and the VAE decoder. Models have SD1.5 shapes
(UNet 320-640-1280-1280, CLIP ViT-L/14 text tower, the SD VAE) and are built abstractly under `nnx.eval_shape`
(no weights); the jitted parts are lowered on `jax.ShapeDtypeStruct` inputs and compiled for the CPU, and the
FLOPs come from XLA's cost analysis of the compiled executables.

XLA counts a `lax.fori_loop` body once, not once per trip, so a generation is counted as
    one-off parts (text encode + reference encoding + VAE decode) + steps x (one guided step),
the step being `sampling.denoise_step_fn` / `sampling.reference_step_fn`, the very loop bodies the sampler runs.
(`tests/test_fusion_benchmark.py` checks this sum against the whole sampler with its loop unrolled: equal for the
lowered HLO; for the compiled one the sum is an upper bound by a few percent, because a step counted alone
recomputes loop-invariant work (key/value projections of the text and of the fixed reference tokens) that XLA
computes once when it sees all steps together. The ratios below are therefore slightly pessimistic for `fixed`.)

Rows: base text-to-image with classifier-free guidance (2 UNet predictions per step), and Face Fusion with 1 and 4
references of one person, `fixed` (reference branch once per image, tokens cached) vs `current` (references
noised to t and re-encoded every step), in both guidance forms:
  cfg           eps_none + s (eps_text+ref - eps_none): 2 predictions per step, the form comparable to base CFG;
  disentangled  eps_none + s_text (eps_text - eps_none) + s_ref (eps_text+ref - eps_text) (FlashFace's): it needs
                a third prediction per step (text only, beside uncond and text+ref), so about 1.5x base by
                construction, whatever the references cost.
`--methods flashface,flashface_cached,single_token` adds rows of other registered methods through the same
interface calls (their `encode_references` once per image, their `guided_prediction` per step): FlashFace as
released (the ReferenceNet runs on the references at every step's t) vs cached (once at t=0), with the parameter
MiB of the denoiser (FlashFace: main UNet + ReferenceNet).

`fixed_4ref_flops_ratio` is the `cfg` form with `fixed` references, 4 references, over base
(`fixed_4ref_disentangled_flops_ratio` the disentangled one). The issue's target: <= 1.15 at 512x512, 30 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402

TARGET_RATIO = 1.15
TEXT_TOKENS = 77


def sd15_configs():
    """SD1.5 UNet, SD VAE and CLIP ViT-L/14 text tower (the public checkpoints' config.json values)."""
    from fusion_jax.models.clip import CLIPTextConfig
    from fusion_jax.models.unet import UNetConfig
    from fusion_jax.models.vae import AutoencoderKLConfig

    unet = UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKLConfig(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                              norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
    text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                          num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=TEXT_TOKENS)
    return unet, vae, text


def tiny_configs():
    from fusion_jax import tiny

    return tiny.tiny_unet_config(), tiny.tiny_vae_config(), tiny.tiny_text_encoder_config()


SIZES = {  # name -> (configs, image side in pixels, default reference crop side in pixels)
    "sd15": (sd15_configs, 512, 256),
    "tiny": (tiny_configs, 32, 16),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: base (references 0) or Face Fusion with `references` crops of one person."""

    references: int = 0
    reference_timestep: str = "fixed"
    guidance: str = "cfg"
    # another registered identity method's config (None: Face Fusion with `reference_timestep`); `label` names it
    method_cfg: object = None
    label: str = ""

    @property
    def name(self) -> str:
        if not self.references:
            return "base"
        if self.method_cfg is not None:
            return f"{self.label}_{self.references}ref_{self.guidance}"
        return f"{self.reference_timestep}_{self.references}ref_{self.guidance}"

    @property
    def predictions_per_step(self) -> int:
        return 2 if not self.references or self.guidance == "cfg" else 3


def default_cases(reference_counts=(1, 4)) -> list[Case]:
    cases = [Case()]
    for timestep in ("fixed", "current"):
        for n in reference_counts:
            for guidance in ("cfg", "disentangled"):
                cases.append(Case(n, timestep, guidance))
    return cases


class Abstract:
    """Abstract (shape-only) SD-shaped models and the abstract inputs of one image's generation."""

    def __init__(self, size: str, reference_size: int | None = None, num_steps: int = 30):
        from fusion_jax import schedulers

        make, self.image, default_ref = SIZES[size]
        self.unet_cfg, self.vae_cfg, self.text_cfg = make()
        self.reference_size = reference_size or default_ref
        self.num_steps = num_steps
        self.schedule = schedulers.NoiseSchedule()  # SD1.x: scaled_linear 0.00085 .. 0.012, 1000 steps
        self.vae_factor = 2 ** (len(self.vae_cfg.block_out_channels) - 1)
        if self.image % self.vae_factor or self.reference_size % self.vae_factor:
            raise ValueError(f"--reference-size {self.reference_size} and the image side {self.image} must be "
                             f"multiples of the VAE factor {self.vae_factor}")

    def models(self, identity_cfg):
        """(graphdefs, abstract states) of (identity model or unet, vae, text_encoder); the identity method's modules
        (the method whose config `identity_cfg` is) when given."""
        from fusion_jax.identity import base as identity_base
        from fusion_jax.models.clip import CLIPTextModel
        from fusion_jax.models.unet import UNet2DConditionModel
        from fusion_jax.models.vae import AutoencoderKL

        def build():
            rngs = nnx.Rngs(0)
            unet = UNet2DConditionModel(self.unet_cfg, rngs=rngs)
            if identity_cfg is not None:
                unet = identity_base.for_config(identity_cfg).attach(unet, identity_cfg, rngs=rngs)
            return unet, AutoencoderKL(self.vae_cfg, rngs=rngs), CLIPTextModel(self.text_cfg, rngs=rngs)

        graphdefs, states = zip(*(nnx.split(m) for m in nnx.eval_shape(build)))
        return tuple(graphdefs), tuple(states)

    def sampling_cfg(self, case: Case):
        from fusion_jax import sampling

        return sampling.SamplingConfig(num_steps=self.num_steps, height=self.image, width=self.image,
                                       reference_guidance=case.guidance)

    def fusion_cfg(self, case: Case):
        """The identity method config of `case` (Face Fusion's; None without references)."""
        from fusion_jax.identity import fusion

        if case.method_cfg is not None:
            return case.method_cfg
        return fusion.FusionConfig(reference_timestep=case.reference_timestep) if case.references else None

    def method_inputs(self, case: Case) -> dict:
        """Shapes of what the generic sampler and the method's `sampling_inputs` give the jitted function, from
        dummy host inputs (one person, a centred face box, random face embeddings)."""
        import numpy as np

        from fusion_jax.identity import base as identity_base

        method = identity_base.for_config(case.method_cfg)
        s, n = self.reference_size, case.references
        model = nnx.eval_shape(lambda: method.attach(self._unet(), case.method_cfg))
        request = identity_base.ReferenceRequest(
            references=np.zeros((1, 1, n, s, s, 3), np.float32), reference_valid=np.ones((1, 1, n), bool),
            boxes=np.array([[[self.image / 4, self.image / 4, 3 * self.image / 4, 3 * self.image / 4]]]),
            face_embeddings=np.ones((1, 1, n, 512), np.float32) / np.sqrt(512))
        side = self.image // self.vae_factor
        extra = method.sampling_inputs(model, case.method_cfg, request, batch=1, image_size=(self.image,) * 2,
                                       latent_size=(side, side))
        host = {"references": request.references, "reference_valid": request.reference_valid,
                "empty_ids": np.zeros((1, TEXT_TOKENS), np.int32), **extra}
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), host)

    def _unet(self):
        from fusion_jax.models.unet import UNet2DConditionModel

        return UNet2DConditionModel(self.unet_cfg, rngs=nnx.Rngs(0))

    def latent(self, batch: int = 1) -> jax.ShapeDtypeStruct:
        side = self.image // self.vae_factor
        return jax.ShapeDtypeStruct((batch, side, side, self.unet_cfg.in_channels), jnp.float32)

    def inputs(self, case: Case) -> dict:
        """Abstract inputs of `sampling._text_to_image` for one image (B=1, one person)."""
        ids = jax.ShapeDtypeStruct((1, TEXT_TOKENS), jnp.int32)
        out = {"input_ids": ids, "uncond_ids": ids}
        if case.method_cfg is not None:
            return {**out, **self.method_inputs(case)}
        if case.references:
            s = self.reference_size
            out.update(empty_ids=ids, references=jax.ShapeDtypeStruct((1, 1, case.references, s, s, 3), jnp.float32),
                       reference_valid=jax.ShapeDtypeStruct((1, 1, case.references), jnp.bool_),
                       strength=jax.ShapeDtypeStruct((1, 1), jnp.float32))
        return out


def lowered_flops(jitted, *args) -> float:
    """FLOPs from XLA's cost analysis of the lowered (not yet optimised) HLO: no compile, so minutes faster at SD
    size; convolutions and dots (nearly all of the FLOPs) count the same, fused elementwise work a little more."""
    cost = jitted.lower(*args).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


ANALYSES = {"compiled": common.xla_flops, "lowered": lowered_flops}


def _abstract_key():
    return jax.eval_shape(lambda: jax.random.key(0))


def _abstract_key_value():
    """A concrete key for the once-per-image part inside the trace (the methods here draw no noise there)."""
    return jax.random.key(0)


def _parts(ab: Abstract, out: dict, inputs: dict):
    from fusion_jax import sampling

    return sampling.reference_parts(out["text_uncond"], out["text_cond"], out["empty_text"], out["ref_latents"],
                                    inputs, ab.schedule)


def one_off_fn(ab: Abstract, case: Case, graphdefs):
    """Jitted: text encode + reference encoding (VAE encoder, and whatever the method computes once per image,
    e.g. Face Fusion's `fixed` reference branch) + decode. Returns everything it computes (nothing is dead code)
    and the step's inputs."""
    from fusion_jax import sampling
    from fusion_jax.identity import base as identity_base

    cfg, fusion_cfg = ab.sampling_cfg(case), ab.fusion_cfg(case)

    def run(states, inputs, latents):
        unet, vae, text_encoder = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
        out = {"text_cond": text_encoder(inputs["input_ids"]).last_hidden_state,
               "text_uncond": text_encoder(inputs["uncond_ids"]).last_hidden_state}
        if case.references:
            empty = text_encoder(inputs["empty_ids"]).last_hidden_state
            ref_latents = sampling.encode_reference_images(vae, inputs["references"].astype(jnp.float32))
            out.update(empty_text=empty, ref_latents=ref_latents)
            method = identity_base.for_config(fusion_cfg)
            out["cache"] = method.encode_references(unet, fusion_cfg, _parts(ab, out, inputs), _abstract_key_value())
        out["image"] = sampling.decode_latents(vae, latents, cfg.output)
        return out

    return jax.jit(run)


def step_fn(ab: Abstract, case: Case, graphdefs):
    """Jitted: one guided denoising step, the sampler's own loop body, at a traced step index."""
    from fusion_jax import sampling
    from fusion_jax.identity import base as identity_base

    cfg, fusion_cfg = ab.sampling_cfg(case), ab.fusion_cfg(case)

    def run(states, x, sampler_state, i, key, parts, inputs):
        unet = nnx.merge(graphdefs[0], states[0])
        sampler = sampling._make_sampler(cfg, ab.schedule)
        if not case.references:
            step = sampling.denoise_step_fn(unet, sampler, parts["text_uncond"], parts["text_cond"], key, cfg)
        else:
            method = identity_base.for_config(fusion_cfg)
            step = sampling.reference_step_fn(unet, sampler, method, fusion_cfg, _parts(ab, parts, inputs),
                                              parts.get("cache"), key, cfg)
        return step(i, (x, sampler_state))

    return jax.jit(run)


def count_case(ab: Abstract, case: Case, with_times: bool = False, analysis: str = "compiled") -> dict:
    """FLOPs of one image for `case`: one-off parts, one step, and the total over `ab.num_steps` steps."""
    from fusion_jax import sampling

    flops = ANALYSES[analysis]
    graphdefs, states = ab.models(ab.fusion_cfg(case))
    inputs, latents = ab.inputs(case), ab.latent()
    start = time.perf_counter()
    one_off = one_off_fn(ab, case, graphdefs)
    one_off_flops = flops(one_off, states, inputs, latents)
    parts = jax.eval_shape(one_off, states, inputs, latents)
    parts.pop("image")
    sampler = sampling._make_sampler(ab.sampling_cfg(case), ab.schedule)
    sampler_state = jax.eval_shape(sampler.init_state, latents)
    i = jax.ShapeDtypeStruct((), jnp.int32)
    step_flops = flops(step_fn(ab, case, graphdefs), states, latents, sampler_state, i, _abstract_key(),
                                  parts, inputs)
    row = {"case": case.name, "references": case.references,
           "reference_timestep": case.reference_timestep if case.references else "-",
           "guidance": case.guidance if case.references else "cfg (base)",
           "predictions_per_step": case.predictions_per_step, "one_off_flops": one_off_flops,
           "step_flops": step_flops, "image_flops": one_off_flops + ab.num_steps * step_flops,
           "denoiser_params_mib": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(states[0])) / 2**20}
    if with_times:
        row["count_seconds"] = time.perf_counter() - start
    return row


def _concrete(tree):
    """Zeros of the abstract leaves (timing does not depend on the weights' values)."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, tree)


def time_cases(ab: Abstract, cases: list, repeats: int) -> dict[str, dict]:
    """CPU (or whatever device JAX has) seconds per image of each case: one-off parts + steps x one step, every
    case compiled first, then measured round-robin (case by case within each repeat) so that a machine's load
    drifts over all rows alike; ratios to the first case (base) are taken within each repeat, then the median."""
    from fusion_jax import sampling

    runners = []
    for case in cases:
        graphdefs, states = ab.models(ab.fusion_cfg(case))
        states, inputs, latents = _concrete(states), _concrete(ab.inputs(case)), _concrete(ab.latent())
        one_off, step = one_off_fn(ab, case, graphdefs), step_fn(ab, case, graphdefs)
        parts = one_off(states, inputs, latents)
        parts.pop("image")
        sampler = sampling._make_sampler(ab.sampling_cfg(case), ab.schedule)
        sstate = sampler.init_state(latents)
        key, i = jax.random.key(0), jnp.int32(0)
        jax.block_until_ready(step(states, latents, sstate, i, key, parts, inputs))  # compile

        def run(one_off=one_off, step=step, states=states, inputs=inputs, latents=latents, parts=parts,
                sstate=sstate, key=key, i=i):
            t0 = time.perf_counter()
            jax.block_until_ready(one_off(states, inputs, latents))
            t1 = time.perf_counter()
            jax.block_until_ready(step(states, latents, sstate, i, key, parts, inputs))
            return (t1 - t0) + ab.num_steps * (time.perf_counter() - t1)

        runners.append(run)
    times = [[] for _ in cases]
    for _ in range(repeats):
        for k, run in enumerate(runners):
            times[k].append(run())
    out = {}
    for case, t in zip(cases, times):
        ratios = sorted(a / b for a, b in zip(t, times[0]))
        out[case.name] = {"image_seconds": sorted(t)[len(t) // 2], "seconds_ratio_vs_base": ratios[len(ratios) // 2],
                          "seconds_ratio_min": ratios[0], "seconds_ratio_max": ratios[-1]}
    return out


def method_cases(names: str, reference_counts, text_width: int = 768) -> list[Case]:
    """Rows of other registered methods (`--methods`): 'flashface' (ReferenceNet at every step, as released),
    'flashface_cached' (ReferenceNet once at t=0), 'single_token', 'ip_adapter_faceid', 'facestudio' (text branch
    'direct', no style image); disentangled guidance (3 predictions)."""
    from fusion_jax.identity import facestudio, flashface, ip_adapter_faceid, single_token

    table = {"flashface": flashface.FlashFaceConfig(reference_timestep="current"),
             "flashface_cached": flashface.FlashFaceConfig(reference_timestep="cached"),
             "single_token": single_token.SingleTokenConfig(),
             "ip_adapter_faceid": ip_adapter_faceid.IPAdapterFaceIDConfig(),
             # the 'direct' text branch is the pooled text state: its width is the style embedding width here
             "facestudio": facestudio.FaceStudioConfig(style_dim=text_width)}
    cases = []
    for name in [n for n in names.split(",") if n]:
        if name not in table:
            raise SystemExit(f"--methods: unknown row {name!r}; choose from {sorted(table)}")
        for n in reference_counts:
            cases.append(Case(n, guidance="disentangled", method_cfg=table[name], label=name))
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="sd15", choices=sorted(SIZES), help="sd15: 512x512 SD1.5 shapes; tiny: quick")
    p.add_argument("--steps", type=int, default=30, help="denoising steps per image")
    p.add_argument("--reference-size", type=int, default=None,
                   help="reference crop side in pixels (default 256 for sd15 = 32x32 latents; FlashFace uses 224)")
    p.add_argument("--references", default="1,4", help="comma-separated reference counts")
    p.add_argument("--analysis", default="compiled", choices=sorted(ANALYSES),
                   help="cost analysis of the compiled executables (exact) or of the lowered HLO (no compile: fast)")
    p.add_argument("--methods", default="",
                   help="extra rows of other methods: flashface, flashface_cached, single_token, ip_adapter_faceid, "
                        "facestudio (comma-separated)")
    p.add_argument("--only-base", action="store_true",
                   help="leave out the Face Fusion rows: base text-to-image and the --methods rows only")
    p.add_argument("--time", type=int, default=0, metavar="REPEATS",
                   help="also measure seconds per image on this machine's device, REPEATS rounds alternating the "
                        "rows (0: FLOPs only; at --size sd15 on a CPU a step takes minutes)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    try:
        counts = tuple(int(v) for v in args.references.split(","))
        if not counts or min(counts) < 1:
            raise ValueError
        ab = Abstract(args.size, args.reference_size, args.steps)
    except ValueError as e:
        raise SystemExit(f"--references must be positive integers (e.g. 1,4); or {e}") from None

    rows = []
    cases = default_cases(counts)
    cases = (cases[:1] if args.only_base else cases) + method_cases(args.methods, counts, ab.text_cfg.hidden_size)
    for case in cases:
        row = count_case(ab, case, with_times=True, analysis=args.analysis)
        rows.append(row)
        print(f"  {case.name}: {row['image_flops'] / 1e12:.3f} TFLOP ({row['count_seconds']:.0f} s)", flush=True)
    base = rows[0]["image_flops"]
    for row in rows:
        row["ratio_vs_base"] = row["image_flops"] / base
        row["image_tflop"] = row["image_flops"] / 1e12
        row["step_gflop"] = row["step_flops"] / 1e9
        row["one_off_gflop"] = row["one_off_flops"] / 1e9
    print(f"\nFLOPs per generated image: {args.size}, {ab.image}x{ab.image}, {args.steps} steps, reference crops "
          f"{ab.reference_size}x{ab.reference_size} px ({ab.reference_size // ab.vae_factor}x"
          f"{ab.reference_size // ab.vae_factor} latents), batch 1, float32, {args.analysis} HLO cost analysis")
    columns = ["case", "predictions_per_step", "one_off_gflop", "step_gflop", "image_tflop", "ratio_vs_base",
               "denoiser_params_mib"]
    if args.time:
        for row, (name, timing) in zip(rows, time_cases(ab, cases, args.time).items()):
            row.update(timing)
        columns += ["image_seconds", "seconds_ratio_vs_base", "seconds_ratio_min", "seconds_ratio_max"]
        print(f"seconds per image: {jax.devices()[0].platform}, median of {args.time} round-robin repeats "
              f"({common.device_description()})")
    common.print_table(rows, columns)
    by_name = {r["case"]: r for r in rows}
    payload = {"size": args.size, "image_size": ab.image, "steps": args.steps, "reference_size": ab.reference_size,
               "target_ratio": TARGET_RATIO, "base_image_flops": base, "analysis": args.analysis, "rows": rows}
    for form, suffix in (("cfg", ""), ("disentangled", "_disentangled")):
        for timestep in ("fixed", "current"):
            for n in counts:
                if f"{timestep}_{n}ref_{form}" in by_name:
                    payload[f"{timestep}_{n}ref{suffix}_flops_ratio"] = by_name[f"{timestep}_{n}ref_{form}"]["ratio_vs_base"]
    for row in rows:
        if row["case"].startswith(("flashface", "single_token", "ip_adapter_faceid", "facestudio")):
            payload[f"{row['case']}_flops_ratio"] = row["ratio_vs_base"]
    if 4 in counts and not args.only_base:
        ratio = payload["fixed_4ref_flops_ratio"]
        payload["target_met"] = ratio <= TARGET_RATIO
        print(f"\nfixed, 4 references, cfg guidance: {ratio:.4f}x base (target <= {TARGET_RATIO}: "
              f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}); disentangled form: "
              f"{payload['fixed_4ref_disentangled_flops_ratio']:.4f}x (3 predictions per step)")
    else:
        print("\n(no 4-reference rows: pass --references 1,4 for fixed_4ref_flops_ratio)")
    common.write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
