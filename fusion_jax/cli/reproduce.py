"""Reproduce the papers' identity-preservation tables on real photos (FlashFace Table 1 and others).

    fusion-jax reproduce --data PHOTOS --prompts PROMPTS.jsonl --model PIPELINE --method flashface \
        --identity-weights EXPORT --recognizer ~/.insightface/models/antelopev2 --clip CLIP_FOLDER \
        --inception pt_inception-2015-12-05.safetensors --protocol reproduce/flashface_table1 --out out/repro
    python infer/reproduce.py ... (the same program from a checkout)

PHOTOS holds <identity>/<photo>. For each identity the protocol's K references condition the method and a held-out
photo is the SimTarget target (FlashFace's protocol); every prompt x seed is generated (batched), and each image and
the face crop the recognizer read are saved with their settings. OUT gets results.md (a row per method x protocol
with the papers' published rows beside it, 95% bootstrap intervals over identities), per_image.csv, plots/*.png and
report.html. Running again with the same OUT computes only what is missing (another --method adds its rows).
`--metric-models tiny` uses tiny random metric models written under OUT (no weights needed; numbers MEANINGLESS,
and every file says so). `--method none` generates without references (the no-identity floor).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "parse_args", "read_prompts"]


def _method_names() -> tuple[str, ...]:
    from fusion_jax.identity import base

    return base.names()


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="FOLDER/<identity>/<photo>")
    p.add_argument("--prompts", type=Path, default=None,
                   help='JSONL, one {"prompt": ...} per line (default: the protocol\'s prompts)')
    p.add_argument("--model", default="tiny", help="pipeline folder, HF cache repo id, or 'tiny'")
    p.add_argument("--method", required=True,
                   help="identity method (" + ", ".join(_method_names()) + ") or 'none' (text only)")
    p.add_argument("--identity-weights", type=Path, default=None, help="train/export.py folder of the method")
    p.add_argument("--protocol", default="reproduce/flashface_table1",
                   help="protocol YAML (a file, or a shipped name such as reproduce/single_reference)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a protocol key (e.g. --set num_references=2 --set seeds=[0])")
    p.add_argument("--metric-models", default="real", choices=["real", "tiny"],
                   help="real: --recognizer/--clip/--inception; tiny: random tiny models (MEANINGLESS numbers)")
    p.add_argument("--recognizer", type=Path, default=None,
                   help="insightface model folder (e.g. antelopev2, buffalo_l) or a recognizer .onnx")
    p.add_argument("--clip", type=Path, default=None, help="transformers CLIPModel folder (CLIP-T / CLIP-I)")
    p.add_argument("--inception", type=Path, default=None,
                   help="pytorch-fid pt_inception-2015-12-05 weights (.safetensors; .pth needs --allow-pickle)")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading a trusted .pth --inception file")
    p.add_argument("--batch-size", type=int, default=4, help="images per generation call")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    for name in _method_names():  # each method's own flags, as infer/generate.py
        from fusion_jax.identity import base

        base.get(name).add_arguments(p.add_argument_group(f"identity method {name}"))
    return p


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def read_prompts(path: Path) -> list[str]:
    """Prompts of a JSONL file; a bad line is an error naming the file and line."""
    if not path.is_file():
        raise SystemExit(f"--prompts {path}: no such file")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--prompts {path}:{n}: not valid JSON ({e.msg}); expected {{\"prompt\": \"...\"}}")
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise SystemExit(f'--prompts {path}:{n}: expected an object with a non-empty string "prompt", got {line!r}')
        prompts.append(item["prompt"])
    if not prompts:
        raise SystemExit(f"--prompts {path}: no prompts in the file")
    return prompts


def _overrides(values: Sequence[str]) -> dict:
    import yaml

    out = {}
    for v in values:
        if "=" not in v:
            raise SystemExit(f"--set {v!r}: expected KEY=VALUE")
        key, text = v.split("=", 1)
        out[key.strip()] = yaml.safe_load(text)
    return out


def load_metric_models(args):
    """The recognizer, CLIP and Inception models (real from the flags, or tiny under OUT/tiny_metric_models)."""
    from fusion_jax.models.inception import load_fid_inception
    from fusion_jax.reproduction.clip_metric import ClipError, ClipMetric
    from fusion_jax.reproduction.face_metric import FaceMetric, RecognizerError
    from fusion_jax.reproduction.harness import MetricModels

    meaningless = args.metric_models == "tiny"
    if meaningless:
        from fusion_jax.reproduction.tiny_models import MEANINGLESS, write_tiny_metric_models

        print(MEANINGLESS, file=sys.stderr)
        paths = write_tiny_metric_models(args.out / "tiny_metric_models")
        recognizer, clip, inception = paths["recognizer"], paths["clip"], paths["inception"]
    else:
        missing = [f for f, v in (("--recognizer", args.recognizer), ("--clip", args.clip),
                                  ("--inception", args.inception)) if v is None]
        if missing:
            raise SystemExit(f"{', '.join(missing)} required with --metric-models real (or use --metric-models tiny "
                             "for a meaningless dry run)")
        recognizer, clip, inception = args.recognizer, args.clip, args.inception
    try:
        face = FaceMetric(recognizer)
    except (RecognizerError, FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    clip, inception = Path(clip).expanduser(), Path(inception).expanduser()
    if not (clip / "config.json").is_file():  # checked now; the model itself loads when first needed
        raise SystemExit(f"--clip {clip}: no config.json (expected a transformers CLIPModel folder, e.g. "
                         "openai/clip-vit-large-patch14)")
    if not inception.is_file():
        raise SystemExit(f"--inception {inception}: no such file (expected pytorch-fid's pt_inception-2015-12-05 "
                         "weights as .safetensors, or the .pth with --allow-pickle)")

    def load_clip():
        try:
            return ClipMetric(clip)
        except (ClipError, ValueError) as e:
            raise SystemExit(str(e)) from None

    def load_inception():
        try:
            return load_fid_inception(inception, allow_pickle=args.allow_pickle)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e)) from None

    names = {"recognizer": face.name, "detector": face.detector_name,
             "clip": f"{clip.name} (transformers CLIPModel folder {clip})",
             "inception": f"{inception.name} (FID Inception-v3, {inception.stat().st_size} bytes)"}
    if meaningless:
        names = {k: f"tiny random {v}" for k, v in names.items()}
    return MetricModels(face, load_clip, load_inception, names, meaningless)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    args = parse_args(argv, prog)
    import numpy as np

    from fusion_jax.config_files import ConfigNotFound, resolve_config
    from fusion_jax.reproduction import dataset, harness, report
    from fusion_jax.reproduction.protocol import load_protocol
    from fusion_jax.reproduction.tiny_models import MEANINGLESS

    if args.method != "none" and args.method not in _method_names():
        raise SystemExit(f"--method {args.method!r}: expected one of {', '.join(_method_names())} or 'none'")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        protocol = load_protocol(resolve_config(args.protocol), _overrides(args.set))
    except ConfigNotFound as e:
        raise SystemExit(f"--protocol: {e}") from None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    prompts = read_prompts(args.prompts) if args.prompts is not None else list(protocol.prompts)
    try:
        dataset.scan_folder(args.data)  # folder errors before any model loads
    except dataset.DataError as e:
        raise SystemExit(str(e)) from None
    models = load_metric_models(args)
    spec = harness.RunSpec(data=args.data, out=args.out, model=args.model, method=args.method,
                           identity_weights=args.identity_weights, protocol=protocol, prompts=prompts,
                           batch_size=args.batch_size, dtype=args.dtype, method_args=args, progress=not args.quiet)
    try:
        done = harness.run(spec, models)
    except (harness.HarnessError, dataset.DataError) as e:
        raise SystemExit(str(e)) from None
    data_inception = np.asarray([done["features"][p]["inception"] for p in done["plan"].usable_photos()])
    files = report.write_reports(args.out, data_inception, models.names, models.meaningless)
    plan = done["plan"]
    print(f"{spec.method}/{protocol.name}: {len(plan.identities)} identities, {done['jobs']} images "
          f"({done['generated']} generated now, {done['measured']} measured now, "
          f"{done['data_photos_analysed']} data photos analysed now)")
    if plan.faceless:
        print(f"photos without a detected face (not used): {', '.join(plan.faceless)}")
    if plan.too_few:
        print("identities left out (too few usable photos): "
              + ", ".join(f"{k} ({v})" for k, v in plan.too_few.items()))
    print(f"wrote {files['results']}, {files['csv']}, {files['html']}, {args.out / 'plots'}")
    if models.meaningless:
        print(f"NOTE: {MEANINGLESS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
