"""LoRA through the loop: every engine, real processes (gloo on CPU), the adapter folder in peft.

References: world 1 × micro-batch 8 is the reference of world 2 × accumulation 2 × micro-batch 2
under FSDP2 and ZeRO-3 (fp32, losses to 1e-5, adapters to 3e-5 after three AdamW steps); an
uninterrupted run is the reference of a resumed one (fp32, losses and adapters to 1e-6);
transformers + peft on the base and the run's adapter folder is the reference of Crucible's
logits, and of the merged export's (fp32, 1e-5); the base file is the reference of the frozen
weights after training (bit-identical).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.stream import PackedStream
from model.decoder import Decoder
from model.hf import load_hf
from model.lora import apply_lora, load_adapter, read_adapter_config
from tests.dist_helpers import global_batches, run_processes
from tests.training_data import TEST_MODEL, VOCAB
from training import loop
from training.checkpoint import find_latest, read_meta, write_export
from training.config import ConfigError, RunConfig, find_config_file

pytestmark = pytest.mark.slow
SEQ = 256


def make_cfg(run_dir: Path, data: dict, base: Path, engine: str, **train) -> RunConfig:
    cfg = RunConfig(run_dir=str(run_dir), engine=engine, resume="never", init_from=str(base))
    cfg.data.train, cfg.data.seq_len = str(data["sft"]), SEQ
    cfg.train.precision, cfg.train.lr, cfg.train.warmup_steps = "fp32", 1e-2, 1
    cfg.train.lora.rank, cfg.train.lora.alpha = 4, 8.0
    for key, value in train.items():
        setattr(cfg.train, key, value)
    if engine == "deepspeed":
        cfg.deepspeed = json.loads(find_config_file("zero3.json").read_text())
    return cfg


def adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def crucible_with_adapter(base: Path, adapter: Path) -> Decoder:
    model, _ = load_hf(base)
    lora, _ = read_adapter_config(adapter)
    return load_adapter(apply_lora(model, lora), adapter).eval()


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_lora_world2_accum2_mb2_equals_world1_mb8(engine, training_data, lora_base, tmp_path):
    steps = 3
    batches = global_batches(PackedStream(training_data["sft"], seq_len=SEQ, batch_size=8, seed=0), steps)
    ref_cfg = make_cfg(tmp_path / "ref", training_data, lora_base, engine, max_steps=steps, micro_batch=8)
    (ref,) = run_processes(ref_cfg, 1, tmp_path / "ref_out", batches)
    cfg = make_cfg(tmp_path / "dist", training_data, lora_base, engine, max_steps=steps, micro_batch=2, grad_accum=2)
    cfg.train.activation_checkpointing = "selective"
    dist = run_processes(cfg, 2, tmp_path / "dist_out", batches)

    for rank in dist:
        np.testing.assert_allclose(rank["losses"], ref["losses"], rtol=0, atol=1e-5)
    a, b = adapters(tmp_path / "ref"), adapters(tmp_path / "dist")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * TEST_MODEL["n_layers"]  # A and B of 7 projections
    for name in a:
        assert b[name].numel() > 0, name  # a gathered adapter, never a ZeRO-3 placeholder
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=3e-5, msg=name)
    assert all(a[n].abs().max() > 0 for n in a if "lora_B" in n), "every B must have moved from its zero init"

    # The checkpoint holds the adapters and their optimizer state only, and names the base.
    meta = read_meta(find_latest(tmp_path / "dist"))
    assert meta["base"]["path"] == str(lora_base.resolve()) and len(meta["base"]["sha256"]) == 64
    assert meta["lora"]["rank"] == 4
    # The merged export is the base plus the adapters.
    merged, _ = load_hf(tmp_path / "dist" / "hf")
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = crucible_with_adapter(lora_base, tmp_path / "dist" / "adapter")(x)
        torch.testing.assert_close(merged.eval()(x), want, rtol=1e-5, atol=1e-5)


def test_adapter_folder_loads_in_peft_with_crucibles_logits(training_data, lora_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(tmp_path / "run", training_data, lora_base, "single", max_steps=2, micro_batch=4)
    cfg.export_hf = False
    summary = loop.train(cfg)
    adapter = Path(summary["adapter"])
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(lora_base)
    assert not (tmp_path / "run" / "hf").exists()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora_base), adapter).eval()
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(
            crucible_with_adapter(lora_base, adapter)(x), peft_model(x).logits, rtol=1e-5, atol=1e-5
        )


def test_base_stays_bit_identical_and_only_adapters_are_checkpointed(training_data, lora_base, tmp_path):
    cfg = make_cfg(tmp_path / "run", training_data, lora_base, "single", max_steps=3, micro_batch=4)
    cfg.export_hf = False
    models = []
    loop.train(cfg, model_hook=models.append)
    base, _ = load_hf(lora_base)
    trained = models[0].state_dict()
    for name, weight in base.state_dict().items():
        assert torch.equal(trained[name], weight), name
    moved = [n for n, p in models[0].named_parameters() if p.requires_grad and "lora_B" in n and p.abs().max() > 0]
    assert len(moved) == 7 * TEST_MODEL["n_layers"]

    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(find_latest(tmp_path / "run") / "engine")).read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), weights[:3]


def test_resume_refuses_another_base_or_lora(training_data, lora_base, tmp_path):
    cfg = make_cfg(tmp_path / "run", training_data, lora_base, "single", max_steps=2, micro_batch=4, exit_at_step=1)
    cfg.export_hf = False
    loop.train(cfg)
    cfg.resume = "auto"

    other_rank = make_cfg(tmp_path / "run", training_data, lora_base, "single", max_steps=2, micro_batch=4)
    other_rank.resume, other_rank.train.lora.rank = "auto", 8
    with pytest.raises(ConfigError, match=r"train\.lora=.*'rank': 4.*'rank': 8"):
        loop.train(other_rank)

    other_base = tmp_path / "other_base"
    model, model_cfg = load_hf(lora_base)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    write_export(model.state_dict(), model_cfg, other_base, lora_base)
    cfg.init_from = str(other_base)
    with pytest.raises(ConfigError, match="holds other weights"):
        loop.train(cfg)


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_lora_resume_is_exact(engine, training_data, lora_base, tmp_path):
    batches = global_batches(PackedStream(training_data["sft"], seq_len=SEQ, batch_size=4, seed=0), 4)
    whole = make_cfg(tmp_path / "whole", training_data, lora_base, engine, max_steps=4, micro_batch=2)
    (ref, _) = run_processes(whole, 2, tmp_path / "whole_out", batches)
    part = make_cfg(tmp_path / "part", training_data, lora_base, engine, max_steps=4, micro_batch=2, exit_at_step=2)
    run_processes(part, 2, tmp_path / "part_out1", batches)
    part.resume, part.train.exit_at_step = "auto", 0
    (resumed, _) = run_processes(part, 2, tmp_path / "part_out2", batches)

    assert resumed["resumes"] == 1
    np.testing.assert_allclose(resumed["losses"], ref["losses"][2:], rtol=0, atol=1e-6)
    a, b = adapters(tmp_path / "whole"), adapters(tmp_path / "part")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_bf16_lora_keeps_a_bf16_base_and_trains_fp32_adapters(engine, training_data, lora_base, tmp_path):
    """Mixed precision with a frozen bf16 base and fp32 adapters in the same FSDP2 unit or ZeRO-3
    block: the run follows the fp32 run's losses to bf16's precision (2e-2)."""
    batches = global_batches(PackedStream(training_data["sft"], seq_len=SEQ, batch_size=4, seed=0), 4)
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = make_cfg(tmp_path / precision, training_data, lora_base, engine, max_steps=4, micro_batch=2)
        cfg.train.precision, cfg.export_hf = precision, False
        runs[precision] = run_processes(cfg, 2, tmp_path / f"{precision}_out", batches)[0]
    np.testing.assert_allclose(runs["bf16"]["losses"], runs["fp32"]["losses"], rtol=0, atol=2e-2)
    a, b = adapters(tmp_path / "fp32"), adapters(tmp_path / "bf16")
    assert all(b[name].dtype == torch.float32 for name in b)  # the fp32 masters, not a bf16 copy
    # Adam moves every weight by about lr whatever its gradient's size, so bf16's rounding of
    # the smallest gradients moves single weights; as a whole the adapters stay close.
    # B starts at zero, so its value is the whole learned update: compare that.
    learned = [n for n in a if "lora_B" in n]
    diff = torch.cat([(b[n] - a[n]).flatten() for n in learned]).norm()
    assert diff < 0.2 * torch.cat([a[n].flatten() for n in learned]).norm(), float(diff)
