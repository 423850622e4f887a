"""python benchmarks/bench_dpo.py [--preset tiny|125m|... | --init-from HF_FOLDER] [--seq-len 256] [--batch 8]
    [--prompt-frac 0.5] [--steps 20] [--warmup 3] [--precision fp32|bf16] [--compile off|crucible|both]
    [--ac none|full|selective]

One DPO step (loss sigmoid, beta 0.1), side by side: Crucible's (training.loop.train_step with the
Preference objective on the single engine, batches from the PackedStream of a preference set)
against TRL's DPOTrainer on transformers' LlamaForCausalLM (or the HF folder's CausalLM), from
the same weights, on the same pairs, with the same AdamW (lr, betas, eps, weight decay 0, fused
where training.optim fuses it) and clipping at 1.0.

The pairs: `--batch` pairs per step, each a shared prompt of `--prompt-frac` of `--seq-len` random
ids followed by a chosen and a rejected answer of random ids ending in EOS, so every sequence is
`--seq-len` tokens and nothing is padded on either side. Crucible packs each pair whole into one
row of 2 × seq_len (its two sequences are documents of their own); TRL batches the 2 × batch
sequences as rows of seq_len. Both train on the answers' tokens only.

The reference, once, before any step, each side its own way: Crucible's `Preference.prepare`
scores the set with the initial weights into the run's reference shards (as launch/dpo.py does);
TRL's `precompute_ref_log_probs=True` scores its dataset when the trainer is built. Neither
holds a reference model or runs a reference forward in a step. The policy starts as its
reference, so both first-step losses are ln 2; they are printed with their difference.

TRL takes the pairs as text through a word-level tokenizer whose word "t<i>" is id i ("</s>" is
EOS, "<pad>" 0): trl 1.16's DPOTrainer tokenizes every dataset it is given (pre-tokenized columns
are not taken as they are), and this gives it exactly the pairs' ids. Its trainer is
`train_sampling_strategy="sequential"`, so its step k trains on the same pairs as Crucible's.

Timing: TRL's own training loop (`DPOTrainer.train`, dataloader in-process, no logging, saving
or evaluation) runs the steps; a TrainerCallback times each of its optimizer steps from
on_step_begin to on_step_end (forward, DPO loss and TRL's step metrics, backward, clipping,
AdamW, scheduler; the batch is fetched and collated before on_step_begin) and then runs and times
Crucible's step of the same index (train_step on fixed micro-batches: the stream's first batches,
taken once). So the two alternate step by step in this one process, as in bench_train.py, but
TRL's loop, not bench_train.alternate, drives the alternation.

Everything else is bench_train.py's and reused from it: the model (a preset with random weights,
`--init-from HF_FOLDER`, `--make-qwen2-0.5b DIR`), the command line, and peak memory per side in
a fresh subprocess (CUDA: max_memory_allocated; CPU: peak RSS above what it held before its model
was built). That machinery names the sides "crucible" and "hf"; here "hf" is TRL's.

The last line printed is `speedup_vs_trl=<x.xx> peak_mem_ratio_vs_trl=<y.yy>` (Crucible over TRL:
tokens/s, and peak memory).
"""

from __future__ import annotations

import importlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import trl  # imported here, before the memory subprocess's baseline, on both sides alike
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, PrinterCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_train  # noqa: E402
from data_pipeline.records import DropReport, Sample  # noqa: E402
from data_pipeline.shards import ShardWriter, write_manifest  # noqa: E402
from data_pipeline.stream import PackedStream  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.decoder import Decoder  # noqa: E402
from model.hf import config_to_hf  # noqa: E402
from model.loss import IGNORE_INDEX  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.engine import Dist, build_engine  # noqa: E402
from training.loop import train_step  # noqa: E402
from training.metrics import peak_rss_bytes  # noqa: E402
from training.optim import FUSED_ADAMW_DEVICES  # noqa: E402
from training.preference import Preference  # noqa: E402

BETA = 0.1
LR = 1e-5
"""configs/dpo/tiny.yaml's learning rate (constant here on both sides)."""
SIDES = {"crucible": "crucible", "trl": "hf"}
"""This benchmark's name of each side: bench_train's (its `--memory-of`)."""
PAD, EOS = 0, 1
"""Ids of the word-level tokenizer's "<pad>" and "</s>"; the pairs' other ids are drawn from 2 on."""


def parse_args(argv: list[str] | None = None):
    parser = bench_train.arg_parser(__doc__)
    # --seq-len: tokens of each sequence (prompt + answer); --batch: pairs per step (Crucible's rows)
    parser.set_defaults(seq_len=256, prompt_frac=0.5)
    return bench_train.parse_args(argv, parser)


def make_pairs(args, cfg: ModelConfig) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(prompt, chosen, rejected) ids of every step's pairs, seeded; each answer ends in EOS."""
    g = np.random.default_rng(1)
    prompt_len = int(args.prompt_frac * args.seq_len)
    answer_len = args.seq_len - prompt_len
    out = []
    for _ in range((args.warmup + args.steps) * args.batch):
        prompt = g.integers(EOS + 1, cfg.vocab_size, prompt_len)
        chosen, rejected = g.integers(EOS + 1, cfg.vocab_size, (2, answer_len))
        chosen[-1] = rejected[-1] = EOS
        out.append((prompt, chosen, rejected))
    return out


def _aligned_labels(prompt: np.ndarray, answer: np.ndarray) -> np.ndarray:
    """labels[t] = the next token where that is an answer's token, else IGNORE_INDEX."""
    ids = np.concatenate([prompt, answer])
    labels = np.full(len(ids), IGNORE_INDEX, np.int64)
    first = max(len(prompt) - 1, 0)  # without a prompt, the first token is context only
    labels[first:-1] = ids[first + 1 :]
    return labels


def write_preference_set(pairs, folder: Path) -> str:
    """The pairs as a preference set, one pair a Sample of two sequences, as prepare_data.py pref
    writes it (no reference yet: Preference.prepare scores it)."""
    with ShardWriter(folder, target_bytes=1 << 40) as writer:  # one shard: the stream reads it in order
        for prompt, chosen, rejected in pairs:
            a, b = np.concatenate([prompt, chosen]), np.concatenate([prompt, rejected])
            labels = np.concatenate([_aligned_labels(prompt, chosen), _aligned_labels(prompt, rejected)])
            writer.write(Sample(np.concatenate([a, b]), labels, segments=(len(a), len(b))))
    report = DropReport(input_records=len(pairs), kept_records=len(pairs))
    write_manifest(folder, kind="preference", shards=writer.shards, tokenizer_sha256="", report=report)
    (folder / "tokenizer").mkdir()  # a dataset folder's layout: the reference set copies it
    return str(folder)


def id_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the ids: "t<i>" is id i, "<pad>" PAD, "</s>" EOS."""
    vocab = {"<pad>": PAD, "</s>": EOS, **{f"t{i}": i for i in range(EOS + 1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>")


def _words(ids: np.ndarray) -> str:
    return " ".join("</s>" if i == EOS else f"t{i}" for i in ids.tolist())


def text_dataset(pairs) -> Dataset:
    """The pairs as TRL's standard (not conversational) preference rows; answers start with a
    space so that prompt + answer splits into the same words."""
    return Dataset.from_dict({
        "prompt": [_words(p) for p, _, _ in pairs],
        "chosen": [" " + _words(c) for _, c, _ in pairs],
        "rejected": [" " + _words(r) for _, _, r in pairs],
    })  # fmt: skip


class CrucibleDPO:
    """Crucible's DPO: the Decoder on the single engine, Preference's reference and loss, train_step."""

    def __init__(self, cfg: ModelConfig, state: dict, args, pairs, work: Path):
        run = RunConfig(run_dir=str(work / "crucible"), engine="single", resume="never", export_hf=False)
        run.data.train, run.data.seq_len = write_preference_set(pairs, work / "pairs"), 2 * args.seq_len
        t = run.train
        t.precision, t.compile, t.activation_checkpointing = args.precision, args.compile != "off", args.ac
        t.micro_batch, t.grad_accum, t.lr, t.weight_decay = args.batch, 1, LR, 0.0
        run.dpo.loss, run.dpo.beta = "sigmoid", BETA
        self.where = Dist(rank=0, world_size=1, local_rank=0, device=torch.device(args.device))
        model = Decoder(cfg)
        model.load_state_dict(state)
        self.engine = build_engine(model.to(self.where.device), run, self.where)
        self.objective = Preference(run)
        self.run = self.objective.prepare(self.engine, run, self.where, tokenizer=None)  # the reference, once
        stream = PackedStream(self.run.data.train, seq_len=run.data.seq_len, batch_size=args.batch, shuffle_buffer=0)
        self.batches = [next(stream) for _ in range(args.warmup + args.steps)]
        stream.close()

    def step(self, i: int) -> float:
        """Optimizer step i on the i-th micro-batch; its mean loss over the pairs."""
        return train_step(self.engine, [self.batches[i]], self.run, self.where, LR, self.objective).loss


class _DPOTrainer(DPOTrainer):
    """DPOTrainer that keeps each step's loss (detached, not read: no wait for the device)."""

    def __init__(self, *args, **kwargs):
        self.step_losses: list[torch.Tensor] = []
        super().__init__(*args, **kwargs)

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.step_losses.append(loss)
        return loss


def trl_trainer(cfg: ModelConfig, state: dict, args, pairs, work: Path, callbacks=()) -> _DPOTrainer:
    """TRL's DPOTrainer over the pairs (its reference log-probs computed as it is built)."""
    model = bench_train.hf_pretrained(args.init_from) if args.init_from else bench_train.hf_llama(cfg, state)
    t = RunConfig().train  # Crucible's AdamW settings
    fused = torch.device(args.device).type in FUSED_ADAMW_DEVICES
    # transformers 5 renamed gradient checkpointing (the old name warns)
    renamed = "activation_checkpointing" in DPOConfig.__dataclass_fields__
    ac = "activation_checkpointing" if renamed else "gradient_checkpointing"
    config = DPOConfig(
        output_dir=str(work / "trl"), loss_type=["sigmoid"], beta=BETA, precompute_ref_log_probs=True,
        max_length=args.seq_len, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps, train_sampling_strategy="sequential",
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch_fused" if fused else "adamw_torch", adam_beta1=t.betas[0], adam_beta2=t.betas[1],
        adam_epsilon=t.eps, max_grad_norm=t.grad_clip,
        use_cpu=args.device == "cpu", bf16=args.precision == "bf16", torch_compile=args.compile == "both",
        **{ac: args.ac != "none", f"{ac}_kwargs": {"use_reentrant": False}},  # TRL's default is on
        dataloader_num_workers=0, dataloader_pin_memory=False,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = _DPOTrainer(
        model=model, args=config, train_dataset=text_dataset(pairs), processing_class=id_tokenizer(cfg.vocab_size),
        callbacks=list(callbacks),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # its end-of-training summary: stdout keeps this benchmark's lines
    return trainer


class Alternation(TrainerCallback):
    """Times each of TRL's optimizer steps (on_step_begin to on_step_end), then runs and times
    Crucible's step of the same index: the two alternate step by step. Seconds per timed step."""

    def __init__(self, crucible: CrucibleDPO, args):
        self.crucible, self.device, self.warmup = crucible, args.device, args.warmup
        self.times = {"crucible": [], "trl": []}
        self.crucible_losses = []
        self.started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        bench_train._sync(self.device)
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        bench_train._sync(self.device)
        trl_s = time.perf_counter() - self.started
        i = state.global_step - 1
        started = time.perf_counter()
        self.crucible_losses.append(self.crucible.step(i))  # train_step reads its loss back: synced
        crucible_s = time.perf_counter() - started
        if i >= self.warmup:
            self.times["trl"].append(trl_s)
            self.times["crucible"].append(crucible_s)


def check_first_losses(crucible: float, trl: float, args) -> None:
    """The same weights and pairs give the same first loss, ln 2 (the policy is its reference)."""
    tolerance = 1e-4 if args.precision == "fp32" else 2e-2
    difference = abs(crucible - trl)
    if difference > tolerance * abs(trl) or max(abs(crucible - math.log(2)), abs(trl - math.log(2))) > tolerance:
        raise SystemExit(f"the first losses are crucible {crucible}, trl {trl}, not both ln 2: the sides differ")
    print(
        f"first-step loss: crucible {crucible:.6f}, trl {trl:.6f} (difference {difference:.1e}), ln 2 {math.log(2):.6f}"
    )


def measure_memory_here(args) -> None:
    """The subprocess of bench_train.peak_memory: one side's reference and steps, its peak."""
    cfg, state = bench_train.source(args)
    for tensor in state.values():  # a folder's mapped weights read in before the baseline (bench_train)
        tensor.sum()
    pairs = make_pairs(args, cfg)
    arch = config_to_hf(cfg)["model_type"]  # both sides import the HF model's code before the baseline
    importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    importlib.import_module("transformers.models.auto.modeling_auto")
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as work:
        before = torch.cuda.memory_allocated() if cuda else bench_train.rss_bytes()
        if args.memory_of == "crucible":
            side = CrucibleDPO(cfg, state, args, pairs, Path(work))
            for i in range(args.warmup + args.steps):
                side.step(i)
        else:
            trl_trainer(cfg, state, args, pairs, Path(work)).train()
        bench_train._sync(args.device)
        peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    print(json.dumps({"peak_bytes": peak - before}))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_of:
        measure_memory_here(args)
        return 0
    if args.make_qwen2:
        folder = bench_train.make_hf_folder(bench_train.QWEN2_0_5B, args.make_qwen2)
        print(f"wrote {folder} (Qwen2.5-0.5B's shapes, random weights)")
        return 0
    torch.manual_seed(0)
    cfg, state = bench_train.source(args)
    pairs = make_pairs(args, cfg)
    prompt_len = len(pairs[0][0])
    tokens_per_step = 2 * args.batch * args.seq_len
    n_params = sum(v.numel() for v in state.values())
    model = args.preset if args.preset else f"{args.init_from} ({config_to_hf(cfg)['architectures'][0]})"
    print(
        f"{model}: {n_params / 1e6:.1f}M parameters (vocab {cfg.vocab_size}), {args.batch} pairs per step, each "
        f"two sequences of {args.seq_len} tokens (prompt {prompt_len}, answers {args.seq_len - prompt_len}), "
        f"DPO sigmoid beta {BETA}, {args.precision} on {args.device}, compile={args.compile}, ac={args.ac}, "
        f"{args.steps} steps per side after {args.warmup} warm-up, torch {torch.__version__}, trl {trl.__version__}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as work:
        timer = Alternation(CrucibleDPO(cfg, state, args, pairs, Path(work)), args)
        trainer = trl_trainer(cfg, state, args, pairs, Path(work), callbacks=[timer])
        del state  # each side holds its own copy
        trainer.train()
        check_first_losses(timer.crucible_losses[0], float(trainer.step_losses[0]), args)
        times = timer.times
        del timer, trainer
    argv = sys.argv[1:] if argv is None else argv  # the memory subprocesses run with these arguments
    memory = {name: bench_train.peak_memory(side, argv, __file__) for name, side in SIDES.items()}
    speed = {name: tokens_per_step * len(t) / sum(t) for name, t in times.items()}
    for name in SIDES:
        ms = [t * 1e3 for t in times[name]]
        pairs_per_s = speed[name] / (2 * args.seq_len)
        print(
            f"{name:9s} {speed[name]:10,.1f} tokens/s {pairs_per_s:7,.2f} pairs/s  (step median "
            f"{statistics.median(ms):,.1f} ms, {min(ms):,.1f}–{max(ms):,.1f})  "
            f"peak memory {memory[name] / 2**20:9,.1f} MiB"
        )
    ratio = memory["crucible"] / memory["trl"]
    print(f"speedup_vs_trl={speed['crucible'] / speed['trl']:.2f} peak_mem_ratio_vs_trl={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
