"""Web demo (Gradio): reference photos + prompt -> images, in a browser. Same program as `fusion-jax demo`.

    python infer/demo.py --model tiny                 # offline: the tiny random pipeline
    python infer/demo.py --model PIPELINE --identity-weights EXPORT [--method NAME] [--port 7860]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_jax.cli.demo import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(prog="infer/demo.py"))
