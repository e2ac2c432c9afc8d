"""One-time checkpoint conversions: `python -m fusion_jax.convert {flashface,ip_adapter_faceid} SRC OUT [options]`.

`flashface`: the released FlashFace UNet (`flashface.ckpt`, a torch pickle, read only with `--allow-pickle` and then
with `torch.load(weights_only=True)`; or a `.safetensors` file with the same keys) -> OUT in the project's export
layout (`OUT/unet/` the 5-channel main UNet as a diffusers folder, `OUT/identity/flashface.safetensors` +
`identity_config.json`), so users unpickle at most once; `flashface.load_flashface(OUT)` reads it back. With
`--base PIPELINE` (a local SD 1.5 diffusers folder) its vae/, text_encoder/, tokenizer/ and scheduler/ are copied
in, so OUT is also a whole pipeline for `infer/generate.py --model OUT --identity-weights OUT`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def convert_flashface(src, out, *, unet_config=None, allow_pickle: bool = False, base=None) -> Path:
    """Convert the released FlashFace checkpoint `src` into the export folder `out` (see the module docstring)."""
    from fusion_jax.identity import export, flashface

    model = flashface.load_flashface(src, unet_config=unet_config, allow_pickle=allow_pickle)
    method = flashface.FlashFace.instance()
    cfg = flashface.FlashFaceConfig()
    out = Path(out)
    export.export_identity(model, method, cfg, out, extra={"source": str(src)})
    if base is not None:
        base = Path(base)
        for part in PIPELINE_PARTS:
            if not (base / part).is_dir():
                raise ValueError(f"--base {base}: no {part}/ folder (expected a diffusers SD 1.5 pipeline folder)")
            if (out / part).exists():
                shutil.rmtree(out / part)
            shutil.copytree(base / part, out / part)
    return out


def convert_ip_adapter_faceid(src, out, *, allow_pickle: bool = False, unet=None, lora=None) -> Path:
    """A published IP-Adapter-FaceID file -> OUT: a `.safetensors` with the same `image_proj.*` / `ip_adapter.*`
    keys (what diffusers' `load_ip_adapter` and `ip_adapter_faceid.load` read), or, with `unet` (a diffusers SD 1.5
    UNet / pipeline folder), an export folder (OUT/unet with the FaceID LoRA merged, OUT/identity/); `lora` (a
    separate `*_lora.safetensors`, kohya layout) is merged into OUT/unet too (needs `unet`)."""
    from fusion_jax.identity import base, export, ip_adapter_faceid as ipa

    tensors = ipa.read_published(src, allow_pickle=allow_pickle)
    proj, _ = ipa.split_sections(tensors, str(src))
    out = Path(out)
    if unet is None:
        if lora is not None:
            raise ValueError("--lora is merged into the UNet: give --unet as well (OUT is then an export folder)")
        if out.suffix != ".safetensors":
            raise ValueError(f"OUT {out}: give a .safetensors file, or --unet to write an export folder")
        from safetensors.numpy import save_file

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        tmp.replace(out)
        return out
    from fusion_jax import weights

    model, cfg = ipa.load_adapter_tensors(weights.load_unet(unet), tensors, str(src))
    if lora is not None:
        ipa.merge_lora_file(model, lora)
    export.export_identity(model, base.get("ip_adapter_faceid"), cfg, out, extra={"source": str(src)})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion_jax.convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    ff = sub.add_parser("flashface", help="the released FlashFace UNet -> an export folder")
    ff.add_argument("src", help="flashface.ckpt (needs --allow-pickle) or a .safetensors file with its keys")
    ff.add_argument("out", help="output folder")
    ff.add_argument("--unet-config", default=None,
                    help="diffusers config.json (file or folder) of the 4-channel base UNet (default: SD 1.5's)")
    ff.add_argument("--allow-pickle", action="store_true", help="trust SRC and unpickle it (torch weights_only)")
    ff.add_argument("--base", default=None, help="diffusers SD 1.5 pipeline folder whose vae/text_encoder/"
                                                 "tokenizer/scheduler are copied into OUT")
    ip = sub.add_parser("ip_adapter_faceid", help="a published IP-Adapter-FaceID file -> safetensors / an export")
    ip.add_argument("src", help="ip-adapter-faceid_sd15.bin (needs --allow-pickle) or a .safetensors file")
    ip.add_argument("out", help="OUT.safetensors (same keys), or an export folder with --unet")
    ip.add_argument("--allow-pickle", action="store_true", help="trust SRC and unpickle it (torch weights_only)")
    ip.add_argument("--unet", default=None, help="diffusers SD 1.5 UNet or pipeline folder: write an export folder")
    ip.add_argument("--lora", default=None, help="a separate FaceID LoRA (*_lora.safetensors) merged into OUT/unet")
    args = parser.parse_args(argv)
    try:
        if args.what == "ip_adapter_faceid":
            out = convert_ip_adapter_faceid(args.src, args.out, allow_pickle=args.allow_pickle, unet=args.unet,
                                            lora=args.lora)
        else:
            out = convert_flashface(args.src, args.out, unet_config=args.unet_config,
                                    allow_pickle=args.allow_pickle, base=args.base)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
