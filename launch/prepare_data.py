"""python launch/prepare_data.py pretrain --input PATH... --out DIR [--tokenizer DIR | --vocab-size N]
python launch/prepare_data.py sft --format rolebench|messages|sharegpt|alpaca --input PATH... \
    --tokenizer DIR --out DIR [--chat-template FILE] [--show-masks N]
python launch/prepare_data.py pref --format trl|ultrafeedback|alpaca_pref|sharegpt_pref --input PATH... \
    --tokenizer DIR --out DIR [--chat-template FILE] [--max-len N] [--show-masks N]

Raw text, chat data or preference pairs → cleaned, deduplicated, tokenized webdataset shards with
a manifest.json and the tokenizer beside them (a preference pair: one sample holding prompt +
chosen then prompt + rejected, loss on the two completions only; manifest kind "preference").
--tokenizer is a tokenizer Crucible trained (an earlier run's tokenizer/, an export) or a Hugging
Face model or tokenizer folder (tokenizer.json + tokenizer_config.json): conversations are then
rendered by that model's own chat template, or by --chat-template FILE. Runs as a Ray Data job:
on a local Ray by default, on a cluster with --address. The stages themselves are plain functions
in data_pipeline/prepare.py; this file only wires them into Ray Data (data_pipeline/ never
imports ray).

The job writes into a temporary folder beside --out (`.NAME.tmp-XXXXXXXX`) that takes --out's
place only when the dataset is complete: a failed run leaves --out as it was. An --out that holds
an earlier dataset is refused unless --overwrite is given; then only what that dataset's manifest
lists is deleted, and any other file in --out is kept (data_pipeline.prepare.swap_in).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.dedup import Deduplicator
from data_pipeline.formats import CONVERSATION_FORMATS, PREFERENCE_FORMATS
from data_pipeline.prepare import (
    ERROR,
    PairStats,
    PrepareOptions,
    PrepareResult,
    add_dedup_keys,
    build_beside,
    encode_rows,
    import_rows,
    nothing_kept,
    show_payload,
    swap_in,
    write_outputs,
)
from data_pipeline.records import DataError, DropReport, Sample
from data_pipeline.shards import MANIFEST_NAME
from data_pipeline.sp_tokenizer import SPECIAL_TOKENS, train_tokenizer
from data_pipeline.tokenizer import Tokenizer, load_tokenizer
from training.ray_cluster import init_ray


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="prepare_data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind in ("pretrain", "sft", "pref"):
        p = sub.add_parser(kind, help=f"prepare {'preference' if kind == 'pref' else kind} data")
        p.add_argument("--input", nargs="+", required=True, help="input files or folders")
        p.add_argument("--out", required=True, help="output folder (shards, manifest.json, tokenizer/)")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the dataset an earlier run left in --out, once the new one is complete (deletes what "
            "its manifest lists; other files in --out are kept)",
        )
        p.add_argument(
            "--tokenizer",
            help="a tokenizer folder: one Crucible trained, or a Hugging Face model or tokenizer folder",
        )
        p.add_argument("--chat-template", help="a Jinja chat template replacing the Hugging Face tokenizer's own")
        p.add_argument(
            "--on-error", choices=("raise", "skip"), default="raise", help="invalid records: stop, or skip and count"
        )
        p.add_argument(
            "--bad-bytes",
            choices=("reject", "replace"),
            default="reject",
            help="bytes that are not UTF-8: reject the record (an error, or dropped and counted with "
            "--on-error skip), or replace them with U+FFFD",
        )
        # Off for pairs: a ranked set binarized into pairs repeats a long prompt and chosen answer
        # with short rejected ones, nearly equal as text but distinct comparisons.
        p.add_argument(
            "--near-dup-threshold",
            type=float,
            default=0.0 if kind == "pref" else 0.8,
            help="MinHash Jaccard threshold; 0 disables near-dedup (the default for pref: pairs that share a "
            "prompt and chosen answer are distinct comparisons, however alike their text)",
        )
        p.add_argument("--shard-mb", type=float, default=64, help="target shard size in MiB")
        p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
        if kind == "pretrain":
            p.add_argument("--vocab-size", type=int, help="train a new tokenizer with this vocabulary")
            p.add_argument("--text-field", default="text", help="text field of .jsonl/.json/.parquet inputs")
            p.add_argument("--split", help="regex or separator cutting a .txt file into documents")
            p.add_argument("--min-chars", type=int, default=16, help="drop shorter documents")
            p.add_argument("--max-chars", type=int, help="drop longer documents")
        elif kind == "sft":
            p.add_argument("--format", dest="fmt", required=True, choices=CONVERSATION_FORMATS)
            p.add_argument("--profiles", help="RoleBench: .json/.yaml mapping a role to its persona text")
            p.add_argument("--max-len", type=int, default=2048, help="longest tokenized conversation")
        else:
            p.add_argument("--format", dest="fmt", required=True, choices=PREFERENCE_FORMATS)
            p.add_argument(
                "--max-len",
                type=int,
                default=2048,
                help="longest prompt + completion, each of chosen and rejected (a completion's end is cut to fit)",
            )
        if kind != "pretrain":
            p.add_argument(
                "--show-masks", type=int, default=0, metavar="N", help="print N rendered samples, trained tokens marked"
            )
    args = parser.parse_args(argv)
    if args.kind == "pretrain" and not (args.tokenizer or args.vocab_size):
        parser.error("pretrain needs --tokenizer DIR or --vocab-size N")
    if args.kind != "pretrain" and not args.tokenizer:
        parser.error(
            f"{args.kind} needs --tokenizer DIR: the model's (its folder, or the tokenizer/ of the data it was "
            "pretrained on)"
        )
    for path in args.input + [p for p in (args.tokenizer, args.chat_template) if p]:
        if not Path(path).exists():
            parser.error(f"{path}: no such file or folder")
        if not os.access(path, os.R_OK):
            parser.error(f"{path}: cannot be read (permission denied)")
    _check_values(parser, args)
    return args


def _check_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag values that would fail only inside a Ray worker, or after the whole import: usage errors now."""
    if not 0.0 <= args.near_dup_threshold <= 1.0:
        parser.error(f"--near-dup-threshold must be in [0, 1] (0 disables near-dedup), not {args.near_dup_threshold}")
    if args.shard_mb <= 0:
        parser.error(f"--shard-mb must be positive, not {args.shard_mb}")
    if args.kind == "pretrain":
        if args.vocab_size is not None and args.vocab_size <= len(SPECIAL_TOKENS) + 256:
            parser.error(
                f"--vocab-size must exceed the {len(SPECIAL_TOKENS)} special and 256 byte tokens, not {args.vocab_size}"
            )
        if args.min_chars < 1:
            parser.error(f"--min-chars must be at least 1, not {args.min_chars}")
        if args.max_chars is not None and args.max_chars < args.min_chars:
            parser.error(f"--max-chars ({args.max_chars}) must be at least --min-chars ({args.min_chars})")
    elif args.max_len < 1:
        parser.error(f"--max-len must be at least 1, not {args.max_len}")
    if args.chat_template and not args.tokenizer:
        parser.error("--chat-template goes with --tokenizer (a Hugging Face tokenizer folder)")
    if args.tokenizer:
        try:
            tok = load_tokenizer(args.tokenizer, args.chat_template)
            if args.kind != "pretrain":  # a template that cannot render or mask a chat fails now, not in a worker
                _probe(tok)
        except DataError as error:
            parser.error(f"--tokenizer {args.tokenizer}: {error}")
    _check_out(parser, args)


PROBE_CHAT = [
    {"role": "user", "content": "Who goes there?"},
    {"role": "assistant", "content": "A friend."},
    {"role": "user", "content": "Pass."},
    {"role": "assistant", "content": "Thanks."},
]
"""A conversation a chat template must render and mask before the job starts, with a character
card (system message) or, for templates that refuse one (Mistral's), without."""


def _probe(tok: Tokenizer) -> None:
    try:
        tok.encode_chat([{"role": "system", "content": "You are a guard."}, *PROBE_CHAT])
    except DataError:
        tok.encode_chat(PROBE_CHAT)


def _check_out(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--out must be a folder (or not exist yet) whose parent is writable and hold no dataset unless
    --overwrite: the new dataset is built beside it and renamed into its place, and a wrong --out
    should fail now, not after the job."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder (new, empty, or an earlier dataset's)")
    if os.path.ismount(out.resolve()):  # a mount point cannot be renamed
        parser.error(f"--out {args.out} is a mount point; give a folder inside it (e.g. {out / 'data'})")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        parser.error(
            f"--out {args.out}: cannot write in {parent} (permission denied), where the new dataset is built "
            "before it replaces --out"
        )
    earlier = _earlier_outputs(out)
    if earlier and not args.overwrite:
        names = ", ".join(p.name for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        parser.error(
            f"--out {args.out} already holds shards or a manifest ({names}); give an empty or new folder, or pass "
            "--overwrite to replace the earlier dataset (only what its manifest lists is deleted)"
        )


def _earlier_outputs(out: Path) -> list[Path]:
    """What an earlier run left in --out that a new one would be mistaken for, or mixed with."""
    if not out.is_dir():
        return []
    return [p for p in (out / MANIFEST_NAME, *sorted(out.glob("*.tar")), *sorted(out.glob("*.tar.tmp"))) if p.exists()]


def options(args: argparse.Namespace) -> PrepareOptions:
    extra = {
        k: getattr(args, k, None)
        for k in ("fmt", "text_field", "split", "profiles", "min_chars", "max_chars", "max_len")
    }
    return PrepareOptions(
        kind="preference" if args.kind == "pref" else args.kind,
        inputs=args.input,
        out=args.out,
        on_error=args.on_error,
        bad_bytes=args.bad_bytes,
        near_dup_threshold=args.near_dup_threshold or None,
        shard_bytes=int(args.shard_mb * 2**20),
        **{k: v for k, v in extra.items() if v is not None},
    )


def run(
    opts: PrepareOptions,
    tokenizer: str | None,
    vocab_size: int | None,
    out_dir: str | Path | None = None,
    chat_template: str | None = None,
    show: int = 0,
) -> PrepareResult:
    """The Ray Data job: import+clean per file, dedup keys per batch, dedup decisions in order,
    tokenizer, tokenization per batch, shards written in order.

    Args:
        opts: what to prepare; `opts.out` is the folder the messages name.
        tokenizer: an existing tokenizer (--tokenizer), or None to train one of `vocab_size` pieces.
        vocab_size: the size of the tokenizer to train (--vocab-size).
        out_dir: the folder to write into (main's temporary folder beside --out); default `opts.out`.
        chat_template: a Jinja file replacing a Hugging Face tokenizer's template (--chat-template).
        show: print this many rendered conversations with their trained tokens marked (--show-masks).
    Returns:
        The shards and manifest written into `out_dir`.
    """
    import ray.data

    out_dir = Path(out_dir if out_dir is not None else opts.out)

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # reproducible shards
    # Progress bars on a terminal; without one Ray Data would log every operator at INFO instead.
    context.enable_progress_bars = sys.stderr.isatty()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Use 'expr' instead of 'fn'")  # our filters are cheap
    files = [{"path": str(p), "index": i} for i, p in enumerate(opts.inputs)]
    rows = ray.data.from_items(files, override_num_blocks=len(files))
    rows = rows.flat_map(lambda f: list(import_rows(f["path"], f["index"], opts))).materialize()

    report = DropReport(input_records=rows.count())
    for row in rows.filter(lambda r: r["drop"] != "").iter_rows():
        if row["drop"] == ERROR:
            raise DataError(row["payload"])
        report.drop(row["drop"], row["source"])
    kept = (
        rows.filter(lambda r: r["drop"] == "")
        .map_batches(add_dedup_keys, fn_kwargs={"kind": opts.kind}, batch_format="numpy")
        .materialize()
    )

    decide, duplicates = Deduplicator(opts.near_dup_threshold), set()
    keys = kept.select_columns(["id", "source", "exact_key", "signature", "group"]).iter_rows()
    for row in tqdm(keys, desc="dedup", unit=" rec", total=kept.count(), disable=not sys.stderr.isatty()):
        signature = np.frombuffer(row["signature"], dtype=np.uint64)
        reason = decide.check(row["id"], row["exact_key"], signature, row["group"])
        if reason:
            duplicates.add(row["id"])
            report.drop(reason, row["source"])
    unique = kept.filter(lambda r: r["id"] not in duplicates).select_columns(["source", "payload"]).materialize()
    if unique.count() == 0:  # before a tokenizer is trained on no text (write_outputs checks after encoding)
        raise nothing_kept(report, opts.out)

    tok = _tokenizer_in(out_dir / "tokenizer", unique, tokenizer, vocab_size, chat_template)
    for row in unique.take(show):
        print(show_payload(row["payload"], opts.kind, tok), end="\n\n")
    encoded = unique.map_batches(
        encode_rows, fn_kwargs={"tokenizer_path": str(out_dir / "tokenizer"), "opts": opts}, batch_format="numpy"
    )
    extra = {"options": vars(opts)}
    samples = _samples(encoded, report, PairStats(opts.fmt) if opts.kind == "preference" else None, extra)
    return write_outputs(samples, tok, opts, report, extra=extra, out_dir=out_dir)


def _tokenizer_in(folder: Path, unique, tokenizer: str | None, vocab_size: int | None, chat_template) -> Tokenizer:
    """The dataset's tokenizer, saved into its tokenizer/ folder (template included) and loaded
    back from there: the workers, the manifest and later the runs all read that one copy."""
    if tokenizer:
        load_tokenizer(tokenizer, chat_template).save(folder)
    else:
        texts = (r["payload"] for r in unique.iter_rows())  # only pretraining trains a tokenizer
        train_tokenizer(texts, vocab_size, folder).save(folder)
    return load_tokenizer(folder)


def _samples(encoded, report: DropReport, pairs: PairStats | None, extra: dict):
    """The encoded rows' Samples, in order, counting drops and notes in `report`; for preference
    rows (`pairs` given) with their segments, and extra["preference"] set once the last is out,
    which is before write_outputs writes the manifest."""
    for row in tqdm(encoded.iter_rows(), desc="write shards", unit=" rec", disable=not sys.stderr.isatty()):
        if row["drop"] == ERROR:
            raise DataError(row["note"])
        if row["drop"]:
            report.drop(row["drop"], row["source"])
            continue
        if row["note"]:  # kept, but changed (earlier turns or a completion's end cut): counted, not a drop
            report.modified[row["note"]] += 1
        report.kept_records += 1
        sample = Sample(input_ids=row["input_ids"].astype("int32"), labels=row["labels"].astype("int32"))
        if pairs is not None:
            sample.segments = tuple(int(n) for n in row["segments"])
            pairs.add(sample, row["note"], (row["score_chosen"], row["score_rejected"]))
        yield sample
    if pairs is not None:
        extra["preference"] = pairs.to_dict()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = options(args)
    init_ray(args.address)
    import ray  # after init_ray, which sets how a local Ray binds

    # Built beside --out and swapped in when complete: a failure (or Ctrl-C) leaves --out as it was.
    with build_beside(opts.out) as build:
        try:
            vocab_size, show = getattr(args, "vocab_size", None), getattr(args, "show_masks", 0)
            result = run(opts, args.tokenizer, vocab_size, build, args.chat_template, show)
        except DataError as error:
            print(f"prepare_data: error: {error}", file=sys.stderr)
            if Path(opts.out).exists():
                print(f"prepare_data: nothing in --out {opts.out} was changed", file=sys.stderr)
            return 1
        finally:
            ray.shutdown()
        kept_aside = swap_in(build, opts.out)
    print(result.report.table())
    total, kept = sum(s["tokens"] for s in result.shards), result.report.kept_records
    manifest = Path(opts.out) / MANIFEST_NAME
    print(f"wrote {len(result.shards)} shards, {kept:,} samples, {total:,} tokens → {manifest}")
    if kept_aside:
        print(
            f"prepare_data: --out {opts.out} held files that no manifest there lists and whose names the new "
            f"dataset uses (left by an unfinished run?); they were not deleted but moved to {kept_aside}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
