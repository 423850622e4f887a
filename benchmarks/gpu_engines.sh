#!/usr/bin/env bash
# The training loop on one GPU through each engine (single, FSDP2 under torchrun, DeepSpeed ZeRO-3
# under the deepspeed launcher), then a 125m-shape throughput run; prints a summary per run.
#
#   bash benchmarks/gpu_engines.sh DATA_DIR [OUT_DIR]
#
# DATA_DIR holds pretrain/ (shards + tokenizer/), e.g. what tests/training_data.py builds.
set -euo pipefail
DATA=${1:?usage: gpu_engines.sh DATA_DIR [OUT_DIR]}
OUT=${2:-runs/gpu}
PY=${PYTHON:-python3}
common=(data.train="$DATA/pretrain" data.val=null init_from=null train.eval_every=0 train.patience=0
        train.warmup_steps=10 train.checkpoint_every=30 model.preset=tiny)
short=(data.seq_len=256 train.max_steps=60 train.micro_batch=16)

$PY launch/sft.py run_dir="$OUT/single" "${common[@]}" "${short[@]}"
$PY -m torch.distributed.run --nproc-per-node 1 launch/sft.py --config configs/fsdp.yaml \
    run_dir="$OUT/fsdp" "${common[@]}" "${short[@]}"
$PY -m deepspeed.launcher.runner --num_gpus 1 launch/sft.py --config zero3.json \
    run_dir="$OUT/zero3" "${common[@]}" "${short[@]}"
# exact resume on the GPU: stop at 30, resume to 60, compare with the straight single run
$PY launch/sft.py run_dir="$OUT/resumed" "${common[@]}" "${short[@]}" train.exit_at_step=30
$PY launch/sft.py run_dir="$OUT/resumed" "${common[@]}" "${short[@]}"
# throughput: the 125m shape (vocab from the tokenizer), bf16, seq 1024
$PY launch/sft.py run_dir="$OUT/125m" "${common[@]}" model.preset=125m data.seq_len=1024 \
    train.max_steps=40 train.micro_batch=16 train.checkpoint_every=40 export_hf=false

$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for run in ("single", "fsdp", "zero3", "resumed", "125m"):
    rows = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines()]
    tail = rows[len(rows) // 2:]
    mean = lambda k: sum(r[k] for r in tail) / len(tail)
    mfu = [r["mfu"] for r in tail if r["mfu"] is not None]
    print(f"{run:8s} steps {rows[-1]['step']:3d} loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}  "
          f"tokens/s {mean('tokens_per_s'):,.0f}  TFLOP/s {mean('tflops'):.1f}  "
          f"mfu {sum(mfu) / len(mfu) if mfu else float('nan'):.3f}  peak mem {rows[-1]['peak_mem_bytes'] / 2**30:.2f} GiB  "
          f"data_wait_frac {mean('data_wait_frac'):.2%}")
a = {r["step"]: r["loss"] for r in map(json.loads, (out / "single/metrics.jsonl").read_text().splitlines())}
b = {r["step"]: r["loss"] for r in map(json.loads, (out / "resumed/metrics.jsonl").read_text().splitlines())}
diff = max(abs(a[s] - b[s]) for s in range(31, 61))
print(f"resume on GPU: max |loss straight - loss resumed| over steps 31-60 = {diff:.3e}")
PY
