"""One process of tests/test_aot_sampling.py: `python -m tests.aot_sampling_worker OUT.npz`.

Compiles the tiny pipeline's sampler ahead of time (`sampling.compile_generate`) in whatever persistent
compilation cache the environment names, generates one image with it and one with `sampling.generate`, and
writes both, the compile's cache verdict and the error a call with other shapes gets to OUT.npz.
"""

from __future__ import annotations

import sys

import numpy as np


def main(argv: list[str]) -> int:
    import jax

    from fusion_jax import cli_utils, sampling

    pipeline = cli_utils.load_pipeline_arg("tiny", "auto")
    cfg = sampling.SamplingConfig(num_steps=2, height=16, width=16)
    ids = sampling.tokenize(pipeline, ["a photo of a person"])
    gen = sampling.compile_generate(pipeline, ids, cfg=cfg)
    key = jax.random.key(3)
    aot = np.asarray(gen(ids, key=key))
    jitted = np.asarray(sampling.generate(pipeline, ids, key=key, cfg=cfg))
    try:
        gen(sampling.tokenize(pipeline, ["a", "b"]), key=key)
        mismatch = ""
    except ValueError as e:
        mismatch = str(e)
    np.savez(argv[0], aot=aot, generate=jitted, from_cache=gen.from_cache, compile_seconds=gen.compile_seconds,
             mismatch=mismatch)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
