"""Launch the unmodified ``open_clip_train.main`` after registering extra model config directories.

``open_clip_train`` only knows model names from open_clip's config registry, and that registry lives in the
training process, so the registration has to happen there: ``--model-config-dir DIR`` (repeatable) is taken
off the command line, every ``*.json`` in DIR is registered, and the rest reaches the trainer as given.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def split_config_dirs(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--model-config-dir`` values from the trainer's own arguments."""
    dirs: list[str] = []
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--model-config-dir":
            value = next(it, None)
            if value is None:
                raise SystemExit("--model-config-dir needs a directory")
            dirs.append(value)
        elif arg.startswith("--model-config-dir="):
            dirs.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return dirs, rest


def main(argv: Sequence[str] | None = None) -> int:
    """Register the configs and run the trainer; its ``-1`` ("experiment already exists") becomes status 1."""
    dirs, rest = split_config_dirs(sys.argv[1:] if argv is None else argv)
    import open_clip
    from open_clip_train.main import main as train_main

    for d in dirs:
        open_clip.add_model_config(d)
    # open_clip_train's own __main__ drops main()'s return value, so a refused run would exit 0.
    rc = train_main(rest)
    return 0 if rc in (None, 0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
