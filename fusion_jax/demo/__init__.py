"""Web demo of identity-preserving generation (`fusion-jax demo`): a Gradio page over the library.

- `uploads.py`: checks of uploaded photos (size, decodable, exactly one face) with messages for the page.
- `engine.py`: `DemoEngine`, the model side shared by every session (pipelines, references, one generation at a
  time, PNGs with their settings).
- `handlers.py`: the page's handlers as plain functions (tested without a browser).
- `app.py`: the Gradio page and the command line.

Gradio is an optional dependency (`pip install -e ".[demo]"`); only `app.py` imports it.
"""
