"""`fusion-jax demo`: the web demo (a Gradio page; `fusion_jax/demo/`).

    fusion-jax demo --model tiny                   # offline, the tiny random pipeline
    fusion-jax demo --model PIPELINE --identity-weights EXPORT [--method NAME] [--port 7860]

(`python infer/demo.py ...` in a source checkout is the same program.) Needs the `demo` extra (Gradio).
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("fusion-jax demo needs Gradio: pip install -e \".[demo]\" (or pip install gradio)") from None
    from fusion_jax.demo.app import main as demo_main

    return demo_main(argv, prog=prog)
