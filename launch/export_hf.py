"""python launch/export_hf.py CHECKPOINT --out DIR [--merge] [--base DIR] [--overwrite] [--tokenizer DIR [--force]]

Write a Hugging Face export (config.json, model.safetensors, tokenizer files) from a training
checkpoint, in one process: run_dir/checkpoints/step_XXXXXXXX of any engine (FSDP/single through
torch.distributed.checkpoint, DeepSpeed ZeRO through its own files). CHECKPOINT may also be a
run directory, whose newest complete checkpoint is used. transformers' AutoModelForCausalLM and
launch/sft.py (init_from=DIR) load the result.

A LoRA checkpoint (train.lora.rank > 0) holds the adapters only: its export is a peft adapter
folder (adapter_config.json, adapter_model.safetensors, tokenizer files) that
`peft.PeftModel.from_pretrained` loads on the base, and launch/chat.py and launch/evaluate.py
with --adapter. With --merge it is the whole model instead: the base with the adapters added to
its weights. The base is the folder the run trained on (init_from, named in the checkpoint's
meta.json with the sha256 of its weights), or --base DIR where it has moved; either must hold
the same weights, or the export is refused naming both digests.

A checkpoint is code: reading it unpickles files (DCP's metadata, DeepSpeed's files), which can
run code. Export only your own runs' checkpoints, and share the export: safetensors and JSON,
data that is never run.

The tokenizer is the checkpoint's own copy (CHECKPOINT/tokenizer/; a checkpoint written before
checkpoints carried one names the run's tokenizer folder). One given with --tokenizer must be the
one the checkpoint was trained with (its sha256 is in the checkpoint's meta.json): another one is
refused unless --force. A tokenizer with more pieces than the model's vocab_size is always refused.

The export is written beside DIR and renamed into place when complete, so DIR never holds half
an export, nor files of an earlier one. A DIR that holds an earlier export is refused unless
--overwrite, which replaces it once the new export is complete; a DIR holding anything an export
does not write (a run directory, data, notes) is never replaced.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.config import ModelConfig
from model.lora import LoRAConfig
from training.checkpoint import (
    checkpoint_tokenizer,
    find_latest,
    load_adapter_weights,
    load_model_weights,
    lora_base,
    lora_merged_weights,
    not_export_files,
    read_meta,
    write_adapter_folder,
    write_export,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint", type=Path, help="a checkpoint folder, or a run directory (your own: a checkpoint is code)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out, once the new export is complete"
    )
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the checkpoint's own copy)")
    parser.add_argument(
        "--force", action="store_true", help="pair the weights with a tokenizer other than the one they trained with"
    )
    parser.add_argument(
        "--merge", action="store_true", help="LoRA: the base with the adapters merged in (default: the adapter folder)"
    )
    parser.add_argument(
        "--base", type=Path, help="LoRA: the base's folder where it has moved (checked by sha256; default: init_from)"
    )
    args = parser.parse_args(argv)
    problem = out_problem(args.out, args.overwrite)
    if problem:
        parser.error(problem)
    folder = args.checkpoint
    if not (folder / "meta.json").is_file():
        folder = find_latest(folder)
        if folder is None:
            parser.error(f"{args.checkpoint}: neither a complete checkpoint nor a run directory with one")
    try:
        meta = read_meta(folder)
        if not meta.get("lora") and (args.merge or args.base):
            flag = "--merge" if args.merge else "--base"
            parser.error(f"{flag}: {folder} was trained without LoRA, so its export is the whole model already")
        bases = {Path(meta["base"]["path"]), *([args.base] if args.base else [])} if meta.get("lora") else set()
        if args.out.resolve() in {b.resolve() for b in bases}:  # --overwrite would replace the base itself
            parser.error(f"--out {args.out} is the base the adapters were trained on: export into another folder")
        tokenizer = args.tokenizer or checkpoint_tokenizer(folder, meta)
        problem = tokenizer_problem(tokenizer, meta, folder, args.force)
        if problem:
            parser.error(problem)
        what = export(folder, meta, args.out, tokenizer, args.merge, args.base)
    except (OSError, ValueError) as e:  # a damaged checkpoint (ConfigError), a missing or changed base
        parser.error(str(e))
    print(f"exported {folder} (step {meta['state']['step']}) → {args.out}{what}")
    return 0


def export(folder: Path, meta: dict, out: Path, tokenizer: Path, merge: bool, base: Path | None) -> str:
    """Write the export of checkpoint `folder` to `out`; return what was written, for the log line
    ("" for a whole model's export)."""
    model_cfg = ModelConfig(**meta["model"])
    if not meta.get("lora"):
        write_export(load_model_weights(folder), model_cfg, out, tokenizer)
        return ""
    if merge:
        write_export(lora_merged_weights(folder, base), model_cfg, out, tokenizer)
        return " (LoRA adapters merged into the base)"
    base_dir = lora_base(folder, meta, base).resolve()  # the weights the adapters were trained on, or refused
    write_adapter_folder(load_adapter_weights(folder), LoRAConfig(**meta["lora"]), out, tokenizer, str(base_dir))
    return f" (LoRA adapter on {base_dir})"


def out_problem(out: Path, overwrite: bool) -> str | None:
    """Why the export must not go to `out`, or None."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    if not (out.is_dir() and any(out.iterdir())):
        return None
    foreign = not_export_files(out)
    if foreign:  # a run directory, a data folder, `.`: never replaced, --overwrite or not
        return (
            f"--out {out} holds files an export does not write ({', '.join(foreign[:3])}): choose a new folder, "
            "or an earlier export's"
        )
    if not overwrite:
        return (
            f"--out {out} holds an earlier export: pass --overwrite to replace it once the new export is "
            "complete, or choose another folder"
        )
    return None


def tokenizer_problem(tokenizer: Path, meta: dict, folder: Path, force: bool) -> str | None:
    """Why `tokenizer` must not be exported beside the checkpoint's weights, or None."""
    from data_pipeline.records import DataError
    from data_pipeline.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(tokenizer)
    except DataError as e:
        return f"{e}; pass --tokenizer DIR"

    vocab_size = meta["model"]["vocab_size"]
    if tok.vocab_size > vocab_size:
        return (
            f"the tokenizer {tokenizer} has {tok.vocab_size} ids, more than the vocab_size={vocab_size} of "
            f"{folder}: its ids past {vocab_size - 1} have no embedding row"
        )
    trained = meta.get("tokenizer_sha256")
    if trained is not None and tok.sha256 != trained and not force:
        return (
            f"the tokenizer {tokenizer} (sha256 {tok.sha256[:12]}…) is not the tokenizer {folder} was trained "
            f"with (sha256 {trained[:12]}…); pass that one with --tokenizer DIR, or --force to pair them anyway"
        )
    return None


if __name__ == "__main__":
    sys.exit(main())
