"""The Gradio page of the demo and its command line (`fusion-jax demo`, `python infer/demo.py`).

    fusion-jax demo --model tiny                         # offline: the tiny random pipeline (labelled in the page)
    fusion-jax demo --model PIPELINE --identity-weights EXPORT [--method NAME] [--port 7860]

The page: up to two people, each with 1-4 reference photos, a box (typed as x0,y0,x1,y1 fractions of the image,
or drawn on a canvas, which fills the box field) and a strength slider; prompt, negative prompt, method, steps,
seed, text / reference guidance; a Generate button; a status line (every error appears there); the aligned
reference crops (what the face detector found); a gallery of this session's results, each a PNG with its settings
in the `fusion_jax` text chunk (as `infer/generate.py` writes them). Uploads are checked as soon as they arrive
(the crops appear) and again on Generate.

Requests go through Gradio's queue, one generation at a time, all sessions sharing one `DemoEngine` (one
pipeline per method, the process-wide cache of compiled generators). Nothing here reaches the network: Gradio's
analytics are off, the page uses system fonts, and `share` is never set.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

from fusion_jax.demo.uploads import UploadLimits

GRADIO_CAP_FACTOR = 5  # Gradio's own upload cap is this many times --max-upload-mb, so larger files still get our
# message (naming the person and the file) up to that size, and Gradio's beyond it


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="pipeline folder, HF cache repo id, or 'tiny' (default)")
    p.add_argument("--method", default=None,
                   help="identity method to serve (default: the one in --identity-weights, else all registered)")
    p.add_argument("--identity-weights", default=None, help="identity modules exported by train/export.py")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype; auto: bfloat16 on GPU / TPU, float32 on CPU (fusion_jax/precision.py)")
    p.add_argument("--face-models", default=None,
                   help="insightface model folder (default ~/.insightface/models/buffalo_l; else OpenCV Haar)")
    p.add_argument("--face-detector", default="auto", choices=["auto", "insightface", "opencv"])
    p.add_argument("--height", type=int, default=None, help="image height (default: the UNet's sample size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--reference-size", type=int, default=None, help="reference crop side (default: method / image)")
    p.add_argument("--reference-margin", type=float, default=0.4)
    p.add_argument("--steps", type=int, default=None, help="the steps slider's start value (default 4 tiny, else 30)")
    p.add_argument("--max-upload-mb", type=float, default=UploadLimits.max_megabytes, help="largest photo accepted")
    p.add_argument("--out", default=None, help="folder for the generated PNGs (default: a temporary folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    return p


def config_from_args(args):
    from fusion_jax.demo.engine import DemoConfig

    if args.max_upload_mb <= 0:
        raise SystemExit(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    if args.reference_margin < 0:
        raise SystemExit(f"--reference-margin must be >= 0, got {args.reference_margin}")
    for flag in ("height", "width", "reference_size"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be a positive number of pixels, got {value}")
    if args.identity_weights is not None and not Path(args.identity_weights).exists():
        raise SystemExit(f"--identity-weights {args.identity_weights}: no such folder")
    return DemoConfig(model=args.model, method=args.method, identity_weights=args.identity_weights, dtype=args.dtype,
                      face_models=args.face_models, face_detector=args.face_detector, height=args.height,
                      width=args.width, reference_size=args.reference_size, reference_margin=args.reference_margin,
                      output_dir=args.out, limits=UploadLimits(max_megabytes=args.max_upload_mb))


def _theme():
    import gradio as gr

    # system fonts only: the default theme would fetch web fonts, and the demo must work offline
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def build_app(engine, steps: Optional[int] = None):
    """The Gradio Blocks of the page, bound to `engine` (shared by every session)."""
    import gradio as gr
    import numpy as np

    from fusion_jax.demo import handlers

    limits = engine.config.limits
    steps = steps or (4 if engine.config.model == "tiny" else 30)
    methods = engine.method_names()
    aspect = engine.height / engine.width
    canvas = np.full((int(round(256 * aspect)), 256, 3), 255, np.uint8)
    with gr.Blocks(title="fusion-jax demo") as app:
        gr.Markdown("# fusion-jax: identity-preserving generation\n"
                    f"Model: {engine.model_label}. Image size {engine.width}x{engine.height}. Identity modules: "
                    + (f"`{engine.config.identity_weights}`" if engine.identity_trained() else
                       "**untrained** (no `--identity-weights`: the references run the path but give no likeness)")
                    + f". Face detector: {engine.analyzer.backend}.", elem_id="header")
        people = []
        with gr.Row():
            for k in range(limits.max_people):
                with gr.Column():
                    gr.Markdown(f"### Person {k + 1}" + (" (optional)" if k else ""))
                    files = gr.File(label=f"Person {k + 1}: 1-{limits.max_photos} reference photos",
                                    file_count="multiple", elem_id=f"photos{k + 1}")
                    box = gr.Textbox(label="Box x0,y0,x1,y1 (fractions of the image; needed with two people)",
                                     placeholder="e.g. 0.05,0.1,0.5,0.9", elem_id=f"box{k + 1}")
                    strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Identity strength",
                                         elem_id=f"strength{k + 1}")
                    with gr.Accordion("Draw the box instead", open=False):
                        editor = gr.ImageEditor(value=canvas, type="numpy", sources=(), transforms=(), layers=False,
                                                brush=gr.Brush(colors=["#e0218a"], default_size=12),
                                                label="Paint over where this person goes", elem_id=f"draw{k + 1}")
                    # `input` fires after each stroke in Gradio 6 (`change` only when the value is set by code)
                    editor.input(lambda v, old: handlers.box_from_drawing(v) or old, [editor, box], box,
                                  queue=False)
                    people.append((files, box, strength))
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", value="a photo of a person", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", value="", elem_id="negative")
            with gr.Column(scale=1):
                method = gr.Dropdown(methods, value=engine.default_method(), label="Identity method",
                                     elem_id="method")
                form = gr.Radio(["disentangled", "cfg"], value="disentangled", label="Guidance form")
                scheduler = gr.Dropdown(["ddim", "dpmpp_2m", "euler", "euler_ancestral"], value="ddim",
                                        label="Scheduler")
        with gr.Row():
            steps_in = gr.Slider(1, 50, value=steps, step=1, label="Steps", elem_id="steps")
            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
            guidance = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="Text guidance", elem_id="guidance")
            ref_guidance = gr.Slider(0.0, 10.0, value=2.0, step=0.5, label="Reference guidance",
                                     elem_id="reference_guidance")
        gr.Markdown("Changing steps, guidance, scheduler or the number of people compiles a new generator the "
                    "first time (slow on CPU); prompts, seeds, photos, boxes and strengths reuse it.")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown("Upload photos (or none, for text-to-image) and press Generate.", elem_id="status")
        crops = gr.Gallery(label="Aligned reference crops (what the face detector found)", columns=8, height=180,
                           fit_columns=False, object_fit="contain", elem_id="crops", format="png")
        results = gr.Gallery(label="Results (PNG with the settings inside)", columns=4, height=360, fit_columns=False,
                             object_fit="contain", elem_id="results")
        history = gr.State([])

        flat_people = [c for person in people for c in person]

        def _people(values):
            return [tuple(values[i : i + 3]) for i in range(0, len(values), 3)]

        def on_preview(method_name, *values):
            return handlers.preview(engine, method_name, _people(values))

        def on_generate(hist, prompt_text, negative_text, method_name, n_steps, seed_value, g, g_ref, form_name,
                        scheduler_name, *values):
            return handlers.generate(engine, hist, prompt_text, negative_text, method_name, n_steps, seed_value, g,
                                     g_ref, form_name, scheduler_name, _people(values))

        for files, _, _ in people:
            files.upload(on_preview, [method] + flat_people, [crops, status], concurrency_limit=2)
        button.click(on_generate, [history, prompt, negative, method, steps_in, seed, guidance, ref_guidance, form,
                                   scheduler] + flat_people, [history, results, crops, status],
                     concurrency_limit=1, concurrency_id="generate")
    return app


def launch(engine, host: str = "127.0.0.1", port: int = 7860, steps: Optional[int] = None, block: bool = True):
    """Build the page and serve it (queued; Gradio's upload cap above ours)."""
    app = build_app(engine, steps)
    app.queue(default_concurrency_limit=1, max_size=64)
    cap = int(engine.config.limits.max_megabytes * GRADIO_CAP_FACTOR * 2**20)
    return app.launch(server_name=host, server_port=port, share=False, show_error=True, max_file_size=cap,
                      allowed_paths=[str(engine.out_dir)], prevent_thread_lock=not block, theme=_theme(),
                      footer_links=[], quiet=False)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network
    args = build_parser(prog).parse_args(argv)
    config = config_from_args(args)
    from fusion_jax.demo.engine import DemoEngine, DemoError

    try:
        engine = DemoEngine(config)
    except DemoError as e:
        raise SystemExit(str(e)) from None
    print(f"fusion-jax demo: {engine.model_label}; PNGs in {engine.out_dir}; serving http://{args.host}:{args.port}",
          flush=True)
    launch(engine, args.host, args.port, args.steps)
    return 0


__all__ = ["build_app", "build_parser", "config_from_args", "launch", "main"]
