"""`fusion-jax COMMAND [ARGS ...]`: one command line for every entry point of the project.

Each subcommand is one module of this package with a `main(argv, prog=None) -> int` (exit status); the dispatcher
imports only the module of the command it runs, so `fusion-jax --help` and a mistyped command answer without loading
JAX. The scripts under `train/` and `infer/` of a source checkout are thin wrappers around the same `main`s, so
`python train/train.py ...` and `fusion-jax train ...` are one program.

Commands whose module is not part of this installation (a command announced here before its code landed) fail with
a clear "not available in this version" message and exit status 2, never with a traceback.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Optional, Sequence

PROG = "fusion-jax"

# command -> (module under fusion_jax.cli, one line of help). Order = order of the help text.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "text-to-image and identity generation (any identity method) into PNGs + a grid"),
    "train": ("train", "train from a YAML config (--config tiny | configs/X.yaml | /abs/path.yaml) + key=value"),
    "export": ("export", "export a trained run: diffusers UNet folder + the identity method's tensors"),
    "build-dataset": ("build_dataset", "build the face_identities TFDS dataset from a folder of photos"),
    "preencode": ("preencode", "pre-encode a face dataset (VAE latents, text and face embeddings) to TFRecords"),
    "quickstart": ("quickstart", "the shipped miniature Face Fusion model on held-out synthetic faces: grid + metrics"),
    "evaluate": ("evaluate", "the miniature reproduction table (no reference / single token / Face Fusion)"),
    "reproduce": ("reproduce", "reproduction harness of the papers' comparisons"),
    "demo": ("demo", "web demo"),
    "miniature-base": ("miniature_base", "train the miniature text-to-image base model alone"),
    "miniature-assets": ("miniature_assets", "train the quickstart's shipped model + metric models (all stages)"),
}


class CommandNotAvailable(RuntimeError):
    """The command is known but its module is not part of this installation."""


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {PROG} COMMAND [ARGS ...]     ({PROG} COMMAND --help for a command's flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Configs: `--config NAME` finds the shipped configs (tiny, sd15_face_fusion, synthfaces/experiment, ...);",
              "a path to a YAML file (absolute or relative to the current folder) is used as is."]
    return "\n".join(lines)


def load_command(name: str):
    """The module implementing command `name`; CommandNotAvailable when it is not installed, KeyError if unknown."""
    module_name = f"{__name__}.{COMMANDS[name][0]}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the command exists but one of its own imports is missing: say which
            raise
        raise CommandNotAvailable(f"{PROG} {name}: not available in this version of fusion-jax "
                                  f"(module {module_name} is not installed)") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help", "help"):
        if name == "help" and rest:  # `fusion-jax help train` == `fusion-jax train --help`
            return main([rest[0], "--help"])
        print(usage())
        return 0
    if name == "--version":
        from fusion_jax import __version__

        print(f"{PROG} {__version__}")
        return 0
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"{PROG}: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = load_command(name)
    except CommandNotAvailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = module.main(rest, prog=f"{PROG} {name}")
    return 0 if status is None else int(status)
