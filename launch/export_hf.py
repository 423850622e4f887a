"""python launch/export_hf.py CHECKPOINT --out DIR [--tokenizer DIR]

Write a Hugging Face export (config.json, model.safetensors, tokenizer files) from a training
checkpoint, in one process: run_dir/checkpoints/step_XXXXXXXX of any engine (FSDP/single through
torch.distributed.checkpoint, DeepSpeed ZeRO through its own files). CHECKPOINT may also be a
run directory, whose newest complete checkpoint is used. transformers' AutoModelForCausalLM and
launch/sft.py (init_from=DIR) load the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.config import ModelConfig
from training.checkpoint import find_latest, load_model_weights, read_meta, write_export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint folder, or a run directory")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the one the run trained with)")
    args = parser.parse_args(argv)
    folder = args.checkpoint
    if not (folder / "meta.json").is_file():
        folder = find_latest(folder)
        if folder is None:
            parser.error(f"{args.checkpoint}: neither a complete checkpoint nor a run directory with one")
    meta = read_meta(folder)
    tokenizer = args.tokenizer or Path(meta["tokenizer_dir"])
    if not (tokenizer / "tokenizer.model").is_file():
        parser.error(f"{tokenizer}: no tokenizer.model there; pass --tokenizer DIR")
    write_export(load_model_weights(folder), ModelConfig(**meta["model"]), args.out, tokenizer)
    print(f"exported {folder} (step {meta['state']['step']}) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
