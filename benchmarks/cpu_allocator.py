"""CPU train step with and without transparent huge pages for glibc's large allocations.

    python benchmarks/cpu_allocator.py --config mid --rounds 2 --steps 8 [--json FILE]

XLA:CPU allocates each execution's temporary buffer afresh and glibc serves a buffer that large with mmap, so
every step page-faults it in again, 4 KiB at a time. `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35,
transparent huge pages in 'madvise' mode) makes those mappings huge pages. glibc reads its tunables once, at
process start, so the two settings run in fresh child processes, alternating (A B A B ...). Each child times
`--steps` jitted train steps (forward + MSE + backward + AdamW, donated) of a `benchmarks/unet.py` config and
reports seconds per step, minor page faults per step and system seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = {"default": None, "hugetlb": "glibc.malloc.hugetlb=1"}  # name -> GLIBC_TUNABLES (None: unset)


def child(config: str, steps: int) -> dict:
    """Times `steps` train steps of `config` in this process (after 2 warm-up steps)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.unet import CONFIGS, TEXT_TOKENS, train_step
    from fusion_jax.models.unet import UNet2DConditionModel, UNetConfig

    cfg = UNetConfig.from_dict(dict(CONFIGS[config]))
    # shapes only, then constant weights (timing does not depend on their values; un-jitted init is slow)
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))),
                                       nnx.Param, ...)
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), params)
    rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rest)
    size = cfg.sample_size
    keys = jax.random.split(jax.random.key(0), 3)
    batch = (jax.random.normal(keys[0], (1, size, size, cfg.in_channels)), jnp.full((1,), 500, jnp.int32),
             jax.random.normal(keys[1], (1, TEXT_TOKENS, CONFIGS[config]["cross_attention_dim"])),
             jax.random.normal(keys[2], (1, size, size, cfg.out_channels)))
    jitted, init = train_step(graphdef, rest)
    opt_state = init(params)
    compiled = jitted.lower(params, opt_state, *batch).compile()
    for _ in range(2):
        params, opt_state, loss = compiled(params, opt_state, *batch)
        loss.block_until_ready()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        params, opt_state, loss = compiled(params, opt_state, *batch)
        loss.block_until_ready()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"s_per_step": wall / steps, "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "sys_s_per_step": (after.ru_stime - before.ru_stime) / steps,
            "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mid", help="a benchmarks/unet.py config (default mid)")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds, each a fresh process per setting")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per process")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.config, args.steps)))
        return 0

    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, tunables in SETTINGS.items():
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
            if tunables:
                env["GLIBC_TUNABLES"] = tunables
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--config", args.config,
                                  "--steps", str(args.steps)], env=env, check=True, capture_output=True, text=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    rows = [{"setting": name, "GLIBC_TUNABLES": SETTINGS[name] or "(unset)",
             **{k: statistics.median(r[k] for r in results) for k in results[0]}} for name, results in runs.items()]
    ratio = [b["s_per_step"] / a["s_per_step"] for a, b in zip(runs["default"], runs["hugetlb"])]
    from benchmarks.common import print_table

    print_table(rows, list(rows[0]))
    print(f"hugetlb / default step time per round: {', '.join(f'{r:.3f}' for r in ratio)} "
          f"({args.config}, {args.steps} steps per process, {args.rounds} rounds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/cpu_allocator.py " + " ".join(argv), "rows": rows,
                       "ratio_per_round": ratio, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
