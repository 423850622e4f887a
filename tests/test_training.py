"""The run config, the single-process loop, checkpoints and exports (in one process, CPU).

The multi-process behaviour (exact accumulation over ranks, NaN skips on every rank, exact resume
through the launchers, Ray restarts) is in test_training_dist.py.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.hf import load_hf
from tests.conftest import ROOT
from tests.training_data import TEST_MODEL
from training.checkpoint import find_latest, load_checkpoint, load_model_weights, read_meta
from training.config import ConfigError, RunConfig, load_config
from training.engine import LossScaler, TorchEngine, init_distributed
from training.loop import TrainingError, build_model, train

# --- the launchers, and the checks the loop makes itself ---------------------------------------------
# (the run config's own tests are in test_config.py, the checks before any worker starts in test_preflight.py)


def data_overrides(data: dict, kind: str = "pretrain") -> list[str]:
    return [f"data.train={data[kind]}", "data.seq_len=128", "model.overrides=" + json.dumps(TEST_MODEL)]


@pytest.mark.parametrize("launcher", ["launch/pretrain.py", "launch/sft.py", "launch/export_hf.py"])
def test_launchers_print_help(launcher):
    done = subprocess.run([sys.executable, launcher, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout
    assert done.stdout.count("python launch/") + done.stdout.count("deepspeed launch/") >= 1  # the command line


def test_init_from_damaged_after_the_check_is_a_config_error_in_the_loop(training_data, tmp_path):
    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.hf import save_hf

    model_cfg = ModelConfig(**TEST_MODEL, vocab_size=1024, max_seq_len=256)
    save_hf(Decoder(model_cfg), model_cfg, tmp_path / "init")
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=1)
    cfg.init_from = str(tmp_path / "init")
    weights = tmp_path / "init" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short after the preflight
    named = rf"init_from={tmp_path / 'init'}: {weights}: not a readable safetensors file"
    with pytest.raises(ConfigError, match=named):
        train(cfg)


def test_precision_auto_is_fp32_on_a_cpu_and_the_choice_is_printed_and_recorded(training_data, tmp_path, capsys):
    from training.engine import resolve_precision

    cfg = single_cfg(tmp_path / "run", training_data, max_steps=1)
    cfg.train.precision = "auto"
    assert RunConfig().train.precision == "auto"  # the default
    assert resolve_precision(cfg, torch.device("cpu")).train.precision == "fp32"
    assert cfg.train.precision == "auto"  # a copy: the caller's config is unchanged
    train(cfg)
    assert "single engine on 1 × cpu, fp32 (train.precision=auto)" in capsys.readouterr().out
    assert "precision: fp32" in (tmp_path / "run" / "config.yaml").read_text()


# --- the single-process loop -------------------------------------------------------------------------


def single_cfg(run_dir: Path, data: dict, kind: str = "pretrain", **train) -> RunConfig:
    cfg = load_config([], [f"run_dir={run_dir}", *data_overrides(data, kind)])
    cfg.train.micro_batch, cfg.train.warmup_steps, cfg.train.precision = 4, 2, "fp32"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_single_run_writes_metrics_checkpoints_and_a_loadable_export(training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=6, checkpoint_every=2, keep_checkpoints=2)
    summary = train(cfg)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in ("loss", "grad_norm", "lr", "tokens", "tokens_per_s", "tflops", "peak_mem_bytes", "data_wait_frac"):
        assert all(r[key] is not None for r in records), key
    assert all("mfu" in r for r in records) and records[-1]["tokens"] == 6 * 4 * 128
    assert records[-1]["loss"] < records[0]["loss"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert load_config([str(run / "config.yaml")], []).train.max_steps == 6  # the resolved config reloads

    # the export loads in transformers and gives the loop's model's logits
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32)
    ours, _ = load_hf(run / "hf")
    tokens = torch.randint(0, 1000, (2, 16))
    torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)
    assert (run / "hf" / "tokenizer.model").is_file()
    # launch/export_hf.py writes the same weights from the last checkpoint, without the engine
    out = tmp_path / "exported"
    subprocess.run([sys.executable, "launch/export_hf.py", str(run), "--out", str(out)], cwd=ROOT, check=True)
    a, b = load_file(str(run / "hf" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary["step"] == 6 and summary["export"] == str(run / "hf")

    # SFT starts from the export: the model is the exported one, and SFT trains from it
    sft = single_cfg(tmp_path / "sft", training_data, kind="sft", max_steps=2, checkpoint_every=2)
    sft.init_from, sft.data.seq_len = str(run / "hf"), 256
    model, _ = build_model(sft, _tokenizer(sft))
    assert all(torch.equal(p, ours.state_dict()[name]) for name, p in model.state_dict().items())
    assert all(math.isfinite(x) for x in train(sft)["losses"])
    # ... but not with data tokenized by another tokenizer
    (run / "hf" / "tokenizer.model").write_bytes(b"another tokenizer")
    with pytest.raises(ConfigError, match=r"init_from=.*has another tokenizer .* than data\.train"):
        build_model(sft, _tokenizer(sft))


def test_export_refuses_a_tokenizer_the_weights_did_not_train_with(training_data, shared_data, tmp_path, capsys):
    import shutil

    from data_pipeline.sp_tokenizer import train_tokenizer
    from launch.export_hf import main as export_hf

    data = tmp_path / "data"  # a copy, so that its tokenizer can be "re-prepared" below
    shutil.copytree(training_data["pretrain"], data)
    cfg = single_cfg(tmp_path / "run", {"pretrain": data}, max_steps=1, checkpoint_every=1)
    cfg.export_hf = False
    train(cfg)
    lines = (shared_data / "pretrain" / "tinyshakespeare.txt").read_text().splitlines()
    other = train_tokenizer(lines[:4000], 700, tmp_path / "other")  # fewer pieces, but not the run's
    train_tokenizer(lines[:4000], 1100, tmp_path / "bigger")  # more pieces than vocab_size=1024
    out = tmp_path / "out"

    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            export_hf([cfg.run_dir, "--out", str(out), *args])
        assert exit_info.value.code == 2 and not out.exists()
        return capsys.readouterr().err

    assert "is not the tokenizer" in refused("--tokenizer", str(tmp_path / "other"))
    message = refused("--tokenizer", str(tmp_path / "bigger"), "--force")  # --force does not cover this
    assert "has 1100 ids, more than the vocab_size=1024" in message
    # the run's own tokenizer folder, re-prepared since training: the checkpoint carries its own copy
    trained = (data / "tokenizer" / "tokenizer.model").read_bytes()
    shutil.copyfile(tmp_path / "other" / "tokenizer.model", data / "tokenizer" / "tokenizer.model")
    assert export_hf([cfg.run_dir, "--out", str(out)]) == 0
    assert (out / "tokenizer.model").read_bytes() == trained
    assert (
        export_hf([cfg.run_dir, "--out", str(out), "--overwrite", "--tokenizer", str(other.path.parent), "--force"])
        == 0
    )
    assert (out / "tokenizer.model").read_bytes() == other.path.read_bytes()


def test_a_resumed_optimizer_has_its_moments_back(training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=3, checkpoint_every=3)
    train(cfg)
    folder = find_latest(cfg.run_dir)
    where = init_distributed(needs_group=False)
    fresh = TorchEngine(build_model(cfg, _tokenizer(cfg))[0], cfg, where)
    assert not fresh.optimizer.state  # no moments before loading
    fresh.load(folder / "engine")
    moments = [s["exp_avg_sq"] for s in fresh.optimizer.state.values()]
    assert len(moments) == len(list(fresh.model.parameters())) and all(m.abs().sum() > 0 for m in moments)
    assert all(int(s["step"]) == 3 for s in fresh.optimizer.state.values())
    # the weights are the checkpoint's, not the fresh init
    saved = load_model_weights(folder)
    for name, param in fresh.model.named_parameters():
        torch.testing.assert_close(param.detach(), saved[name], rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["meta", "rank_file", "engine_file"])
def test_a_damaged_checkpoint_is_refused_with_its_folder_named(damage, training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=1, checkpoint_every=1)
    cfg.export_hf = False
    train(cfg)
    folder = find_latest(cfg.run_dir)
    if damage == "meta":
        (folder / "meta.json").write_text('{"engine": "sin')
    else:
        path = folder / "rank_00000.pt" if damage == "rank_file" else max((folder / "engine").glob("*.distcp"))
        path.write_bytes(path.read_bytes()[:100])  # cut short
    cfg.train.max_steps = 2
    named = rf"checkpoint {re.escape(str(folder))}: .*move the folder out"
    with pytest.raises(ConfigError, match=named):
        train(cfg)
    if damage != "rank_file":  # export and chat read the weights alone: the same one line, no traceback
        done = subprocess.run(
            [sys.executable, "launch/export_hf.py", str(folder), "--out", str(tmp_path / "hf")],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and re.search(named, done.stderr) and "Traceback" not in done.stderr


def test_a_resume_with_another_precision_does_not_carry_the_loss_scale(training_data, tmp_path, capsys):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=2, checkpoint_every=2)
    cfg.train.precision, cfg.export_hf = "fp16", False
    first = train(cfg)["last_record"]["grad_norm"]
    cfg.train.precision, cfg.train.max_steps = "fp32", 3  # fp16 → fp32: the scale is not applied any more
    capsys.readouterr()
    resumed = train(cfg)["last_record"]["grad_norm"]
    assert 0.1 < resumed / first < 10, "the gradients are the model's, not multiplied by an fp16 loss scale"
    notice = "resume: changed since the checkpoint, in effect from step 3: train.max_steps 2 -> 3, train.precision"
    assert f"{notice} fp16 -> fp32" in capsys.readouterr().out
    # and fp32 → fp16 starts from the initial scale rather than the disabled scaler's 1
    where = init_distributed(needs_group=False)
    cfg.train.precision = "fp16"
    engine = TorchEngine(build_model(cfg, _tokenizer(cfg))[0], cfg, where)
    load_checkpoint(engine, find_latest(cfg.run_dir), where, "single")
    assert engine.scaler.scale == 2.0**16


def _tokenizer(cfg: RunConfig):
    from data_pipeline.tokenizer import load_tokenizer

    return load_tokenizer(Path(cfg.data.train) / "tokenizer")


def test_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=20, checkpoint_every=2, max_bad_steps=3)
    state = {"calls": 0}

    def poison_after_step_4(model):
        def hook(module, inputs, output):
            state["calls"] += torch.is_grad_enabled()
            return output * float("nan") if state["calls"] > 4 else output

        model.norm.register_forward_hook(hook)

    with pytest.raises(TrainingError, match=r"3 non-finite steps in a row \(last at step 7\).*step_00000006"):
        train(cfg, model_hook=poison_after_step_4)
    latest = find_latest(cfg.run_dir)
    assert read_meta(latest)["state"]["step"] == 6 and read_meta(latest)["state"]["skipped_steps"] == 2
    # skipped steps leave the weights alone: step 6's checkpoint holds step 4's weights
    before, after = load_model_weights(latest.with_name("step_00000004")), load_model_weights(latest)
    assert all(torch.equal(before[k], after[k]) for k in before)
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False] * 4 + [True] * 3
    assert all(r["loss"] is None for r in records[4:])  # NaN is written as null


def test_the_count_of_non_finite_steps_carries_across_a_resume(training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=20, checkpoint_every=100, max_bad_steps=4)

    def poison_from(first_bad_call):
        def hook_model(model):
            calls = {"n": 0}

            def hook(module, inputs, output):
                calls["n"] += torch.is_grad_enabled()
                return output * float("nan") if calls["n"] >= first_bad_call else output

            model.norm.register_forward_hook(hook)

        return hook_model

    cfg.train.exit_at_step = 4  # steps 3 and 4 are bad, then the run stops with a checkpoint
    train(cfg, model_hook=poison_from(3))
    assert read_meta(find_latest(cfg.run_dir))["state"]["bad_in_a_row"] == 2
    cfg.train.exit_at_step = 0
    with pytest.raises(TrainingError, match=r"4 non-finite steps in a row \(last at step 6\)"):
        train(cfg, model_hook=poison_from(1))  # as an uninterrupted run: the 4th bad step in a row is step 6


def test_fp16_overflows_at_the_lowest_loss_scale_count_as_bad_steps(training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=40, checkpoint_every=100, max_bad_steps=3)
    cfg.train.precision, cfg.export_hf = "fp16", False

    def infinite_gradients_from_step_3(model):
        calls = {"n": 0}

        def hook(grad):
            calls["n"] += 1
            return grad * float("inf") if calls["n"] >= 3 else grad

        model.layers[0].ffn.w2.weight.register_hook(hook)

    # The loss stays finite: the first 16 overflows halve the scale from 2**16 to 1 and are
    # expected; the next 3, at scale 1, are the gradients' own.
    with pytest.raises(TrainingError, match=r"3 non-finite steps in a row \(last at step 21\)"):
        train(cfg, model_hook=infinite_gradients_from_step_3)


def test_sft_evaluates_and_stops_early_on_patience(training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, kind="sft", max_steps=50, lr=0.0, eval_every=1, patience=2)
    cfg.data.val, cfg.data.seq_len, cfg.train.eval_batches = str(training_data["sft_val"]), 256, 2
    summary = train(cfg)  # lr 0: the validation loss never improves after the first evaluation
    assert summary["step"] == 3
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isclose(r["val_ppl"], math.exp(r["val_loss"]), rel_tol=1e-9) for r in records)
    assert (Path(cfg.run_dir) / "hf" / "config.json").is_file()


def test_bf16_and_fp16_single_runs_train(training_data, tmp_path):
    for precision in ("bf16", "fp16"):
        cfg = single_cfg(tmp_path / precision, training_data, max_steps=8, checkpoint_every=8, lr=3e-3)
        cfg.train.precision, cfg.export_hf = precision, False
        losses = train(cfg)["losses"]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], precision


def test_loss_scaler_halves_on_overflow_and_grows_after_a_window():
    scaler = LossScaler(True, scale=1024.0, window=2)
    scaler.update(False)
    assert scaler.scale == 512.0 and scaler.lowered
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 1024.0 and not scaler.lowered
    scaler.scale = 1.0
    scaler.update(False)
    assert scaler.scale == 1.0 and not scaler.lowered  # an overflow at scale 1 is not the scale's
    assert LossScaler(False).scale == 1.0


def test_activation_checkpointing_gives_the_same_losses(training_data, tmp_path):
    runs = []
    for mode in ("none", "full", "selective"):
        cfg = single_cfg(tmp_path / mode, training_data, max_steps=3, checkpoint_every=3)
        cfg.train.activation_checkpointing, cfg.export_hf = mode, False
        runs.append(train(cfg)["losses"])
    assert runs[0] == pytest.approx(runs[1], abs=1e-6)
    assert runs[0] == pytest.approx(runs[2], abs=1e-6)


def test_a_run_dir_with_newer_checkpoints_is_not_mixed_with(training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=4, checkpoint_every=2)
    cfg.export_hf = False
    train(cfg)
    cfg.resume = "never"
    with pytest.raises(ConfigError, match=r"already holds step_00000004, newer than the start \(step 0\)"):
        train(cfg)
    cfg.resume = str(Path(cfg.run_dir) / "checkpoints" / "step_00000002")
    with pytest.raises(ConfigError, match=r"newer than the start \(step 2\)"):
        train(cfg)
    other = single_cfg(tmp_path / "run", training_data, max_steps=6, checkpoint_every=2)
    other.model.overrides = {**TEST_MODEL, "n_layers": 3}
    with pytest.raises(ConfigError, match="model shape or tokenizer differs"):
        train(other)


def test_engine_single_refuses_several_processes(training_data):
    from training.engine import Dist

    cfg = load_config([], data_overrides(training_data))
    model, _ = build_model(cfg, _tokenizer(cfg))
    with pytest.raises(ConfigError, match="engine=single runs one process, but 2 were started"):
        TorchEngine(model, cfg, Dist(0, 2, 0, torch.device("cpu")))


@pytest.mark.parametrize("fused", [True, False], ids=["fused, decided on the device", "unfused, on the host"])
def test_a_non_finite_step_is_skipped_whole_and_the_step_returns_device_tensors(fused, monkeypatch):
    """good, NaN, good gives what good, good gives: weights, AdamW moments and step counts."""
    from model.config import ModelConfig
    from model.decoder import Decoder
    from training.engine import Dist

    if not fused:
        monkeypatch.setattr("training.optim.FUSED_ADAMW_DEVICES", set())
    cfg = RunConfig()
    cfg.train.grad_clip = 1.0
    where = Dist(0, 1, 0, torch.device("cpu"))
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))

    def engine_after(grads: list[float]) -> TorchEngine:
        torch.manual_seed(0)
        model = Decoder(ModelConfig(vocab_size=256, **TEST_MODEL))
        model.init_weights()
        engine = TorchEngine(model, cfg, where)
        assert bool(engine.optimizer.defaults["fused"]) == fused
        for factor in grads:
            loss_sum, count = engine.model(tokens, labels=tokens)
            engine.backward(loss_sum / count * factor, last=True)
            applied, norm = engine.step(1e-2)
            assert isinstance(applied, torch.Tensor) and applied.dtype == torch.bool and norm.ndim == 0
            assert bool(applied) == math.isfinite(factor) == math.isfinite(float(norm))
        return engine

    skipped, plain = engine_after([1.0, math.nan, 1.0]), engine_after([1.0, 1.0])
    for (name, p), q in zip(skipped.model.named_parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(p, q), name
        for key, value in skipped.optimizer.state[p].items():
            assert torch.equal(value, plain.optimizer.state[q][key]), (name, key)


def test_find_latest_passes_over_copies_and_unfinished_folders(tmp_path, monkeypatch):
    from training import checkpoint

    root = tmp_path / "checkpoints"
    for name, meta in [("step_00000004", 1), ("step_00000006", 1), ("step_00000010.bak", 1), ("step_00000008", 0)]:
        (root / name).mkdir(parents=True)
        if meta:
            (root / name / "meta.json").write_text("{}")
    (root / "step_00000009.tmp").mkdir()
    with pytest.warns(UserWarning) as caught:
        assert find_latest(tmp_path) == root / "step_00000006"
    assert sorted(str(w.message).split(":")[0].rsplit("/", 1)[1] for w in caught) == [
        "step_00000008",
        "step_00000009.tmp",
        "step_00000010.bak",
    ]
    (root / "step_100000000").mkdir()  # nine digits: step 10^8 sorts after step 6
    (root / "step_100000000" / "meta.json").write_text("{}")
    with pytest.warns(UserWarning):
        assert find_latest(tmp_path) == root / "step_100000000"

    def crash(path, *args, **kwargs):
        raise OSError("disk went away")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", crash)
    with pytest.raises(OSError):
        checkpoint._prune(root, keep=2)  # dies deleting step 4
    assert not (root / "step_00000004" / "meta.json").exists()  # so it can never be taken for complete
    monkeypatch.undo()
    checkpoint._prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == [
        "step_00000004",  # no meta.json (left by the crash above): not pruned, passed over
        "step_00000006",
        "step_00000008",
        "step_00000010.bak",
        "step_100000000",
    ]
