"""python benchmarks/bench_startup.py --preset 1b [--engines fsdp,deepspeed] [--sources scratch,hf]
    [--startup sharded,whole] [--world 2] [--lora-rank 0] [--precision fp32|bf16] [--seq-len 64]
    [--steps 0] [--hf-dir DIR] [--keep-hf] [--json OUT]

Host memory per rank at start-up (issue 19): for each source (`scratch`: the preset drawn from
the seeded init; `hf`: an HF folder of the preset's shape as `init_from`), engine (FSDP2, ZeRO-3
from configs/zero3.json) and start-up, `--world` gloo ranks on the CPU build the engine

    sharded   as training/loop.py does: `model_skeleton` (meta device) → build_engine (ZeRO-3: partition_zero3)
              with its StartWeights, each rank filling only its own part
    whole     as every rank did before: `build_model` (the whole model in fp32 on the CPU) →
              build_engine without weights

then run `--steps` LoRA or full training steps on random tokens (micro batch 1, `--seq-len`).

Each configuration runs in fresh processes, since VmHWM (the peak RSS, /proc/self/status) is per
process. Each rank records VmHWM at these points:

    start      imports done, process group joined
    skeleton   sharded only: the Decoder built on the meta device; for ZeRO-3 then partitioned
               (`partition_zero3`), values not yet set
    filled     its weights filled, before any optimizer state: for sharded ZeRO-3 the partitions
               are filled here once more before `deepspeed.initialize` (which allocates its fp32
               partitions, gradient buffer and Adam state); for sharded FSDP the engine's
               start-up is that point (its optimizer state comes with the first step); for
               whole, the whole model built
    startup    the engine built
    steps      after the steps

Each is given in GB (10^9 bytes) and as a ratio to the fp32 size of the whole model (4 bytes ×
the base model's parameters). Start-up seconds exclude the extra fill.

VmHWM counts file-backed pages too (those of a memory-mapped weight file that a rank has read),
so a watchdog in this process samples each rank's RssAnon and RssFile every `POLL_S` seconds
(the sampled peaks are printed); it also kills every rank when MemAvailable falls
below `LOW_MEMORY` bytes: the configuration is then recorded as "did not fit", with each rank's
VmRSS and VmHWM at that moment and the last point it reached (the first step also records
`forward` and `backward`). MemAvailable at each launch is printed: on a shared machine other
processes' memory decides what fits. Ranks set their oom_score_adj to 1000, so that should the
kernel still run out, it kills a rank and nothing else.

The `hf` folder has random bf16 weights of the preset's shape, written by model.hf.save_hf_sharded
one tensor at a time in ~2 GB shards (the writer never holds the whole model), into `--hf-dir`
(default: a temporary folder); a folder the benchmark wrote is deleted at the end unless
`--keep-hf`, one that already held the same model is reused and kept.

The last line printed is `startup_peak_ratio=<x.xx> filled_peak_ratio=<y.yy>` (the largest
rank's VmHWM after start-up, and at `filled`, over the fp32 whole model, the largest over the
sharded configurations), then ` whole_ratio=<z.zz>` (after start-up, whole configurations) when
they ran, and ` did_not_fit=<n>` when some configuration was killed: its ratio is then the VmHWM it
had reached, a lower bound.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import ModelConfig, preset, preset_names  # noqa: E402
from model.decoder import Decoder, initial_rows  # noqa: E402
from model.hf import check_hf, save_hf_sharded  # noqa: E402
from model.lora import LoRAConfig, apply_lora, lora_parameters  # noqa: E402
from training.config import RunConfig, check, find_config_file  # noqa: E402
from training.engine import free_port  # noqa: E402

ENGINES, SOURCES, STARTUPS = ("fsdp", "deepspeed"), ("scratch", "hf"), ("sharded", "whole")
POINTS = ("start", "skeleton", "filled", "startup", "steps")
PHASES = ("start", "skeleton", "filled", "startup", "forward", "backward", "steps")
"""Every point a rank records, in order (forward and backward: of the first step)."""
GB = 10**9
LOW_MEMORY = 2**30
"""MemAvailable (bytes) below which the watchdog kills the ranks."""
POLL_S = 0.25
"""How often the watchdog reads /proc: two ranks can fault in ~1 GB each in half a second."""
SHARD_BYTES = 2 * GB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b", choices=preset_names(), help="model preset (default 1b)")
    parser.add_argument("--engines", default="fsdp,deepspeed", help="comma-separated: fsdp, deepspeed")
    parser.add_argument("--sources", default="scratch,hf", help="comma-separated: scratch, hf")
    parser.add_argument("--startup", default="sharded,whole", help="comma-separated: sharded, whole")
    parser.add_argument("--world", type=int, default=2, help="ranks (gloo processes)")
    parser.add_argument("--lora-rank", type=int, default=0, help="train.lora.rank (0: every weight trains)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="train.precision")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row of the training steps")
    parser.add_argument("--steps", type=int, default=0, help="training steps after start-up")
    parser.add_argument("--hf-dir", default=None, help="where the hf source's folder is (default: a temp folder)")
    parser.add_argument("--keep-hf", action="store_true", help="keep the hf folder this run wrote")
    parser.add_argument("--timeout-s", type=float, default=3600, help="seconds one configuration may run")
    parser.add_argument("--json", default=None, help="also write every rank's record to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a rank: its job file
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, allowed in (("engines", ENGINES), ("sources", SOURCES), ("startup", STARTUPS)):
        values = [v for v in getattr(args, name).split(",") if v]
        if not values or any(v not in allowed for v in values):
            parser.error(f"--{name}={getattr(args, name)}: choose from {', '.join(allowed)}")
        setattr(args, name, values)
    if args.lora_rank and "scratch" in args.sources:
        parser.error("--lora-rank trains adapters on a pretrained base: use --sources hf")
    if args.world < 1 or args.steps < 0 or args.seq_len < 2:
        parser.error("--world must be at least 1, --steps at least 0 and --seq-len at least 2")
    return args


# --- the model and its HF folder ------------------------------------------------------------


def model_pieces(model_cfg: ModelConfig, args: argparse.Namespace) -> dict[str, float]:
    """What the model's parts weigh (bytes): the fp32 whole model (the ratios' unit), each rank's
    shard of what is stored (a frozen LoRA base in the run's precision, else fp32), and what one
    rank gathers at a time in the run's precision: the root unit (embedding, final norm, output
    projection) and one block."""
    with torch.device("meta"):
        model = Decoder(model_cfg)
    base = model.num_params()
    run_bytes = 2 if args.precision == "bf16" else 4
    root = base - sum(p.numel() for p in model.layers.parameters())
    block = sum(p.numel() for p in model.layers[0].parameters())
    adapters = 0
    if args.lora_rank:
        adapters = sum(p.numel() for p in lora_parameters(apply_lora(model, LoRAConfig(rank=args.lora_rank))))
    stored = run_bytes if args.lora_rank else 4
    return {
        "params": base,
        "adapters": adapters,
        "fp32_bytes": 4 * base,
        "shard_bytes": stored * base / args.world,
        "root_bytes": run_bytes * root,
        "block_bytes": run_bytes * block,
    }


def hf_folder(model_cfg: ModelConfig, folder: Path) -> bool:
    """An HF folder of `model_cfg`'s shape with random bf16 weights at `folder`: reused when it
    holds that model already, else written shard by shard. Returns whether it was written."""
    if (folder / "config.json").exists():
        if check_hf(folder) != model_cfg:
            raise SystemExit(f"--hf-dir {folder} holds another model than the preset's; give another folder")
        return False

    def tensor(name: str, shape: torch.Size) -> torch.Tensor:
        if len(shape) == 1:  # norms are ones, biases zeros, as the init makes them
            return initial_rows(model_cfg, name, shape, 0, shape[0], seed=0)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, model_cfg.init_std, generator=g)

    save_hf_sharded(model_cfg, folder, tensor, torch.bfloat16, max_shard_bytes=SHARD_BYTES)
    return True


def run_config(job: dict) -> RunConfig:
    """The run config of one configuration: the loop's, with micro batch 1 and no export."""
    cfg = RunConfig(engine=job["engine"], export_hf=False)
    if job["engine"] == "deepspeed":
        cfg.deepspeed = json.loads(find_config_file("zero3.json").read_text())
    if job["source"] == "hf":
        cfg.init_from = job["hf_dir"]
    cfg.model.preset = job["preset"]
    cfg.data.seq_len = job["seq_len"]
    t = cfg.train
    t.micro_batch, t.grad_accum, t.precision, t.lora.rank = 1, 1, job["precision"], job["lora_rank"]
    check(cfg)
    return cfg


# --- one rank ---------------------------------------------------------------------------------


def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon and RssFile of a process, in bytes ({} once it is gone)."""
    keys = {"VmHWM:": "hwm", "VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = [line.split() for line in f]
    except OSError:
        return {}
    return {keys[f[0]]: int(f[1]) * 1024 for f in fields if f and f[0] in keys}


class Progress:
    """A rank's record, one JSON line per point, flushed as it is reached (a killed rank's
    points so far stay readable)."""

    def __init__(self, path: Path):
        self.file = open(path, "a")  # noqa: SIM115 (open until the process ends)

    def point(self, name: str, **extra) -> None:
        self.file.write(json.dumps({"point": name, "time": time.time(), **proc_memory(), **extra}) + "\n")
        self.file.flush()


def build_sharded(cfg: RunConfig, where, tokenizer, progress: Progress):
    """The loop's start-up (training/loop.py), with ZeRO-3's partitions filled before
    `deepspeed.initialize` to measure them alone. Returns (engine, seconds without that fill)."""
    from training.engine import build_engine, deepspeed_config, partition_zero3
    from training.startup import fill_partitions, model_skeleton, start_weights

    started, extra = time.perf_counter(), 0.0
    weights = start_weights(cfg, tokenizer)
    model = model_skeleton(cfg, weights.cfg)
    if cfg.engine == "deepspeed":
        partition_zero3(model, deepspeed_config(cfg, where.world_size), where)
    progress.point("skeleton")
    if cfg.engine == "deepspeed":
        t = time.perf_counter()
        fill_partitions(model, weights)  # the engine fills them again, to the same values
        extra = time.perf_counter() - t
        progress.point("filled")
    with contextlib.closing(weights):
        engine = build_engine(model, cfg, where, weights)
    seconds = time.perf_counter() - started - extra
    if cfg.engine == "fsdp":
        progress.point("filled")  # FSDP's optimizer state comes with the first step
    return engine, seconds


def build_whole(cfg: RunConfig, where, tokenizer, progress: Progress):
    """Start-up as before issue 19: the whole model in fp32 on every rank, then the engine."""
    from training.engine import build_engine
    from training.loop import build_model

    started = time.perf_counter()
    model, _ = build_model(cfg, tokenizer)
    progress.point("filled")
    engine = build_engine(model, cfg, where)
    return engine, time.perf_counter() - started


def train_steps(engine, cfg: RunConfig, where, vocab_size: int, steps: int, progress: Progress) -> dict:
    """`steps` optimizer steps on random rows, as training.loop.train_step runs one (every
    position a target, so the global count is world × seq_len). The first step records points
    after its forward and its backward, so that a rank killed in it shows where."""
    g = torch.Generator().manual_seed(where.rank)
    T = cfg.data.seq_len
    times, losses, applied = [], [], []
    for _ in range(steps):
        ids = torch.randint(0, vocab_size, (1, T + 1), generator=g)
        batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "position_ids": None, "doc_ids": None}
        started = time.perf_counter()
        loss_sum, count = engine.loss(batch)
        if not times:
            progress.point("forward")
        engine.backward(loss_sum * engine.grad_divisor / (T * where.world_size), last=True)
        if not times:
            progress.point("backward")
        ok, _ = engine.step(cfg.train.lr)
        times.append(time.perf_counter() - started)
        losses.append(float(loss_sum) / float(count))
        applied.append(bool(ok))
    return {"step_s": times, "loss": losses, "applied": applied}


def worker(job_file: str, rank: int) -> None:
    """One rank of one configuration: start-up, steps, each point recorded; then exit at once."""
    job = json.loads(Path(job_file).read_text())
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(job["port"]),
        RANK=str(rank),
        WORLD_SIZE=str(job["world"]),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    Path("/proc/self/oom_score_adj").write_text("1000")  # should the kernel run out, a rank goes
    if job["engine"] == "deepspeed":
        os.environ["DS_ACCELERATOR"] = "cpu"  # read when deepspeed is first imported
        import deepspeed  # noqa: F401  (imported before `start`, as the engine would import it)
    from training.engine import exit_without_teardown, init_distributed

    progress = Progress(Path(job["out"]) / f"rank{rank}.jsonl")
    try:
        cfg = run_config(job)
        where = init_distributed(needs_group=True)
        progress.point("start")
        tokenizer = SimpleNamespace(vocab_size=job["vocab_size"])  # all start-up reads of it
        build = build_sharded if job["startup"] == "sharded" else build_whole
        engine, seconds = build(cfg, where, tokenizer, progress)
        progress.point("startup", startup_s=seconds)
        if job["steps"]:
            progress.point("steps", **train_steps(engine, cfg, where, job["vocab_size"], job["steps"], progress))
    except Exception as e:
        progress.point("error", error=f"{type(e).__name__}: {e}")
        exit_without_teardown(1)
    exit_without_teardown(0)  # gloo's threads can abort the interpreter's teardown


# --- the configurations, watched --------------------------------------------------------------


def mem_available() -> int:
    """The machine's MemAvailable in bytes."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def watch(procs: list[subprocess.Popen], timeout_s: float) -> dict:
    """Wait for the ranks, sampling their memory; kill them all when memory runs low, a rank
    fails or time runs out. Returns the status, the lowest MemAvailable seen, each rank's
    sampled peak RssAnon/RssFile, and (when killed) each rank's memory and MemAvailable at that
    moment."""
    deadline = time.monotonic() + timeout_s
    peaks = [{"anon": 0, "file": 0} for _ in procs]
    lowest, status, at_kill, available = mem_available(), "ok", None, None
    while any(p.poll() is None for p in procs):
        available = mem_available()
        lowest = min(lowest, available)
        now = [proc_memory(p.pid) for p in procs]
        for peak, mem in zip(peaks, now, strict=True):
            for k in peak:
                peak[k] = max(peak[k], mem.get(k, 0))
        failed = any(p.returncode not in (None, 0) for p in procs)
        if available < LOW_MEMORY or failed or time.monotonic() > deadline:
            status = "did not fit" if available < LOW_MEMORY else "failed" if failed else "timed out"
            at_kill = now
            for p in procs:
                p.kill()
            break
        time.sleep(POLL_S)
    for p in procs:
        p.wait()
    if status == "ok" and any(p.returncode for p in procs):
        status = "failed"
    return {
        "status": status,
        "lowest_available": lowest,
        "sampled_peaks": peaks,
        "at_kill": at_kill,
        "available_at_kill": available if at_kill else None,
    }


def run_configuration(job: dict, timeout_s: float) -> list[dict]:
    """Run one configuration on job["world"] fresh rank processes; one record per rank."""
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as out:
        job = {**job, "out": out, "port": free_port()}
        (Path(out) / "job.json").write_text(json.dumps(job))
        launched, available, procs = time.time(), mem_available(), []
        for rank in range(job["world"]):
            log = open(Path(out) / f"rank{rank}.log", "w")  # noqa: SIM115 (closed with the process)
            command = [sys.executable, __file__, "--worker", str(Path(out) / "job.json"), "--rank", str(rank)]
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
            log.close()
        watched = watch(procs, timeout_s)
        records = []
        for rank in range(job["world"]):
            record = Path(out) / f"rank{rank}.jsonl"  # absent when killed while importing
            lines = record.read_text().splitlines() if record.exists() else []
            points = {p["point"]: p for p in map(json.loads, lines)}
            if watched["status"] == "failed":
                print(
                    f"rank {rank}'s output ends:", (Path(out) / f"rank{rank}.log").read_text()[-2000:], file=sys.stderr
                )
            records.append(
                {
                    **{k: job[k] for k in ("source", "engine", "startup")},
                    "rank": rank,
                    "launched": launched,
                    "available_at_launch": available,
                    "status": watched["status"],
                    "points": points,
                    "lowest_available": watched["lowest_available"],
                    "available_at_kill": watched["available_at_kill"],
                    "sampled_peak": watched["sampled_peaks"][rank],
                    "at_kill": watched["at_kill"][rank] if watched["at_kill"] else None,
                }
            )
    return records


# --- the report -------------------------------------------------------------------------------


def _gb(point: dict | None, fp32_bytes: int) -> str:
    if not point or "hwm" not in point:
        return "-"
    return f"{point['hwm'] / GB:6.2f} ({point['hwm'] / fp32_bytes:.2f}×)"


def print_table(records: list[dict], fp32_bytes: int) -> None:
    print(
        f"{'source':7s} {'engine':9s} {'start-up':8s} {'rank':4s} {'status':11s} {'start':>6s} "
        f"{'skeleton':>14s} {'filled':>14s} {'after start-up':>14s} {'after steps':>14s} {'start-up s':>10s} "
        f"{'s/step':>7s} {'loss':>7s}  sampled peak anon / file"
    )
    for r in records:
        p = r["points"]
        start = f"{p['start']['hwm'] / GB:6.2f}" if "start" in p else "-"
        seconds = f"{p['startup']['startup_s']:10.1f}" if "startup" in p else "-"
        steps = p.get("steps", {})
        step_s = f"{statistics.median(steps['step_s']):7.1f}" if steps.get("step_s") else "-"
        loss = f"{steps['loss'][-1]:7.3f}" if steps.get("loss") else "-"
        peak = r["sampled_peak"]
        memory = " ".join(f"{_gb(p.get(point), fp32_bytes):>14s}" for point in POINTS[1:])
        print(
            f"{r['source']:7s} {r['engine']:9s} {r['startup']:8s} {r['rank']:4d} {r['status']:11s} {start:>6s} "
            f"{memory} {seconds:>10s} {step_s:>7s} {loss:>7s}  {peak['anon'] / GB:.2f} / {peak['file'] / GB:.2f} GB"
        )
        if r["at_kill"] is not None:
            m = {k: v / GB for k, v in r["at_kill"].items()}
            reached = [n for n in PHASES if n in p] or ["none"]
            print(
                f"{'':22s} killed after point {reached[-1]}: VmRSS {m.get('rss', 0):.2f} GB (anon "
                f"{m.get('anon', 0):.2f}, file {m.get('file', 0):.2f}), VmHWM {m.get('hwm', 0):.2f} GB; "
                f"MemAvailable {r['available_at_kill'] / GB:.2f} GB"
            )
        if "error" in p:
            print(f"{'':22s} error: {p['error']['error']}")


def peak_ratio(records: list[dict], startup: str, point: str, fp32_bytes: int) -> float:
    """The largest rank's VmHWM at `point` over the fp32 whole model, over the `startup`
    configurations; for a killed rank that never reached it, the VmHWM it had when killed."""
    peaks = []
    for r in records:
        if r["startup"] != startup:
            continue
        reached = r["points"].get(point) or r["at_kill"] or {}
        peaks.append(reached.get("hwm", math.nan))
    return max(peaks) / fp32_bytes if peaks else math.nan


def run_all(args: argparse.Namespace, model_cfg: ModelConfig) -> list[dict]:
    """Every (source, engine, start-up) configuration in turn, the hf folder made first (and
    deleted after, when this run wrote it, unless --keep-hf); each rank's record."""
    made, hf_dir = False, Path(args.hf_dir or tempfile.mkdtemp(prefix="bench_startup_hf_"))
    records = []
    try:
        if "hf" in args.sources:
            started = time.perf_counter()
            made = hf_folder(model_cfg, hf_dir)
            if made:
                print(f"wrote {hf_dir} (random bf16) in {time.perf_counter() - started:.0f} s", flush=True)
        for source, engine, startup in itertools.product(args.sources, args.engines, args.startup):
            job = {
                **{k: getattr(args, k) for k in ("preset", "world", "lora_rank", "precision", "seq_len", "steps")},
                **{"source": source, "engine": engine, "startup": startup},
                **{"hf_dir": str(hf_dir), "vocab_size": model_cfg.vocab_size},
            }
            records += run_configuration(job, args.timeout_s)
            last = records[-1]
            print(
                f"ran {source} {engine} {startup}: {last['status']} (MemAvailable "
                f"{last['available_at_launch'] / GB:.1f} GB at launch, lowest {last['lowest_available'] / GB:.1f} GB)",
                flush=True,
            )
    finally:
        if (made or args.hf_dir is None) and not args.keep_hf:
            shutil.rmtree(hf_dir, ignore_errors=True)
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.rank)
    model_cfg = preset(args.preset)
    pieces = model_pieces(model_cfg, args)
    fp32 = pieces["fp32_bytes"]
    print(
        f"{args.preset}: {pieces['params'] / 1e9:.3f}B parameters, fp32 whole model {fp32 / GB:.2f} GB; "
        f"{args.world} ranks, {args.precision}, LoRA rank {args.lora_rank} ({pieces['adapters'] / 1e6:.1f}M adapter "
        f"parameters), seq_len {args.seq_len}, {args.steps} step(s); torch {torch.__version__}, "
        f"{os.cpu_count()} cores, {mem_available() / GB:.1f} GB available",
        flush=True,
    )
    print(
        f"pieces: stored shard per rank {pieces['shard_bytes'] / GB:.2f} GB, gathered root unit (embedding, norm, "
        f"output) {pieces['root_bytes'] / GB:.2f} GB and one gathered block {pieces['block_bytes'] / GB:.2f} GB "
        f"in {args.precision}",
        flush=True,
    )
    records = run_all(args, model_cfg)
    print_table(records, fp32)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "pieces": pieces, "records": records}, indent=1))
    line = (
        f"startup_peak_ratio={peak_ratio(records, 'sharded', 'startup', fp32):.2f} "
        f"filled_peak_ratio={peak_ratio(records, 'sharded', 'filled', fp32):.2f}"
    )
    if "whole" in args.startup:
        line += f" whole_ratio={peak_ratio(records, 'whole', 'startup', fp32):.2f}"
    killed = len({(r["source"], r["engine"], r["startup"]) for r in records if r["status"] == "did not fit"})
    print(line + (f" did_not_fit={killed}" if killed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
