"""``fttrain COMMAND ...``: one entry point for what fttrain does.

    fttrain train +exp=tiny_sft [group=option ...] [key=value ...]   compose, check, train
    fttrain ls [GROUP ...] [--config-dir DIR]                        the config options there are
    fttrain slurm OVERRIDES [--submit] [--array]                     render / submit a Slurm job
    fttrain sweep DIR                                                summarise a sweep
    fttrain status RUN_DIR                                           running or not, checkpoint, ranks' last steps
    fttrain export RUN_DIR --out DIR [--no-merge] [--push-to-hub R]  merged or adapter model, model card
    fttrain generate RUN_DIR --prompt TEXT                           sample from a trained run
    fttrain compare RUN_DIR [EXPORTED_DIR ...] [--base PATH]         base vs tuned: size, memory, speed, quality
    fttrain eval RUN_DIR --tasks hellaswag,arc_easy [--limit N]      lm-evaluation-harness benchmarks
    fttrain prune SRC --out DIR [--sparsity S] [--heads K]           sparser or smaller, scored, recovery command
    fttrain numerics RUN_DIR                                         compare numerics of saved outputs
    fttrain consolidate CHECKPOINT                                   merge sharded weights
    fttrain bench +exp=tiny_sft [--chats 3000] [--steps 40]          speed against TRL and a raw loop
    fttrain estimate +exp=llama8b_qlora [--world-size 8]             peak GPU memory, from the config alone

``fttrain train ARGS`` is ``python -m fttrain ARGS``; under several processes
keep ``accelerate launch -m fttrain ARGS``. Every command takes ``-h``.

Your own configs: a folder laid out like fttrain's (``exp/``, ``model/``,
``data/`` ...) added with ``--config-dir DIR`` (or ``hydra.searchpath=[file://DIR]``)
composes with the shipped groups: ``fttrain train --config-dir ./conf +exp=mine``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# command -> (module, function taking argv); train goes through Hydra's own argv parsing.
COMMANDS: Dict[str, str] = {
    "train": "fttrain.__main__",
    "slurm": "fttrain.slurm",
    "sweep": "fttrain.sweep",
    "status": "fttrain.outputs",
    "export": "fttrain.export",
    "generate": "fttrain.generate",
    "compare": "fttrain.compare",
    "eval": "fttrain.harness",
    "prune": "fttrain.prune",
    "numerics": "fttrain.numerics",
    "consolidate": "fttrain.consolidate",
    "bench": "fttrain.bench",
    "estimate": "fttrain.estimate",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "ls":
        return list_options(rest)
    if command not in COMMANDS:
        print(f"fttrain: error: unknown command {command!r}; one of: {', '.join([*COMMANDS, 'ls'])}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command])
    if command == "train":
        sys.argv = [f"{Path(sys.argv[0]).name} train", *rest]
        return module.cli()
    return module.main(rest)


def config_dirs(extra: Sequence[str] = ()) -> List[Path]:
    """fttrain's own config folder, then the user's (later ones add options and win on a clash)."""
    from fttrain.paths import CONF_DIR

    return [CONF_DIR, *(Path(d) for d in extra)]


def list_options(argv: Sequence[str]) -> int:
    """``fttrain ls [GROUP ...] [--config-dir DIR]``: each config group and its options."""
    import argparse

    parser = argparse.ArgumentParser(prog="fttrain ls", description=list_options.__doc__)
    parser.add_argument("groups", nargs="*", help="only these groups (e.g. peft exp)")
    parser.add_argument("--config-dir", "-cd", action="append", default=[], help="your config folder as well")
    args = parser.parse_args(argv)
    options: Dict[str, Dict[str, Path]] = {}
    for root in config_dirs(args.config_dir):
        if not root.is_dir():
            print(f"fttrain: error: --config-dir {root}: no such folder", file=sys.stderr)
            return 2
        for path in sorted(root.rglob("*.yaml")):
            group = path.parent.relative_to(root).as_posix()
            if group != ".":
                options.setdefault(group, {})[path.stem] = path
    unknown = [g for g in args.groups if g not in options]
    if unknown:
        print(f"fttrain: error: no config group {', '.join(unknown)}; there are: {', '.join(sorted(options))}",
              file=sys.stderr)
        return 2
    for group in sorted(args.groups or options):
        print(f"{group}: {' '.join(sorted(options[group]))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
