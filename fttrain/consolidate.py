"""Merge sharded final weights into one standard Hugging Face folder.

    python -m fttrain.consolidate RUN_DIR/model [--out DIR]

A run with ``dist.save_format=sharded`` (full fine-tuning under ZeRO-3 or
FSDP) leaves each rank's shard in ``model/``, because gathering a model too
big for one rank's memory is what it avoids. This command runs later, on one
machine and CPU only, and writes ``model.safetensors`` (split into 5 GB
files when larger) plus the config and tokenizer next to it. The default
output is ``<folder>_hf``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from fttrain.errors import FttrainError, report

KEEP = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
        "special_tokens_map.json", "tokenizer.model")


def sharded_kind(folder: Path) -> str:
    if (folder / "latest").exists() and any(folder.glob("global_step*")):
        return "zero_sharded"
    if (folder / "pytorch_model_fsdp_0").is_dir():
        return "fsdp_sharded"
    raise FttrainError(
        f"{folder} holds no sharded weights (no DeepSpeed 'latest'/global_step*, "
        "no pytorch_model_fsdp_0/): nothing to merge"
    )


def consolidate(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out)
    kind = sharded_kind(folder)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if kind == "zero_sharded":
        from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

        convert_zero_checkpoint_to_fp32_state_dict(str(folder), str(tmp), safe_serialization=True)
    else:
        from accelerate.utils import merge_fsdp_weights

        merge_fsdp_weights(str(folder / "pytorch_model_fsdp_0"), str(tmp), safe_serialization=True)
    for name in KEEP:
        if (folder / name).exists():
            shutil.copy2(folder / name, tmp / name)
    from fttrain.atomic import publish_dir

    publish_dir(tmp, out)  # whole or absent: a crash leaves only the .tmp folder
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fttrain.consolidate", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the run's model/ folder with sharded weights")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <folder>_hf)")
    args = parser.parse_args(argv)
    out = args.out or args.folder.with_name(args.folder.name + "_hf")
    try:
        consolidate(args.folder, out)
    except FttrainError as e:
        return report("fttrain.consolidate", e)
    print(f"merged weights written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
