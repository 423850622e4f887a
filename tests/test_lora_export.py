"""A LoRA run's checkpoint exported (adapter folder, merged model) and used for inference.

References: the run's own adapter/ folder is the reference of launch/export_hf.py's adapter export
from its checkpoint (tensors bit-identical), on the single and the DeepSpeed engine; Crucible's
base + adapter (unmerged) is the reference of the merged export's logits, in Crucible and in
transformers (fp32, 1e-5); the merged export is the reference of chat's and evaluate's output on
base + --adapter (the same greedy answers, perplexity to 1e-5).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.hf import load_hf
from tests.dist_helpers import run_processes
from tests.training_data import TEST_MODEL, VOCAB
from training import loop
from training.checkpoint import (
    find_latest,
    load_adapter_weights,
    load_for_inference,
    load_model_weights,
    read_meta,
    weights_sha256,
    write_export,
)
from training.config import RunConfig, find_config_file

pytestmark = pytest.mark.slow


def lora_cfg(run_dir: Path, data: dict, base: Path, engine: str) -> RunConfig:
    """Two steps of LoRA rank 4 on the SFT shards, at a learning rate that moves the adapters far
    enough to change a sampled answer of the (near-uniform) random base."""
    cfg = RunConfig(run_dir=str(run_dir), engine=engine, resume="never", init_from=str(base))
    cfg.data.train, cfg.data.seq_len = str(data["sft"]), 256
    cfg.train.precision, cfg.train.lr, cfg.train.warmup_steps = "fp32", 5e-2, 1
    cfg.train.max_steps, cfg.train.micro_batch = 2, 4
    cfg.train.lora.rank, cfg.train.lora.alpha = 4, 8.0
    if engine == "deepspeed":
        cfg.deepspeed = json.loads(find_config_file("zero3.json").read_text())
    return cfg


@pytest.fixture(scope="module")
def lora_run(training_data, lora_base, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora_run") / "run"
    loop.train(lora_cfg(run_dir, training_data, lora_base, "single"))
    return run_dir


@pytest.fixture(scope="module")
def exports(lora_run, tmp_path_factory) -> dict[str, Path]:
    """launch/export_hf.py's adapter folder and merged export of the run's last checkpoint."""
    from launch.export_hf import main as export_hf

    out = tmp_path_factory.mktemp("exports")
    assert export_hf([str(lora_run), "--out", str(out / "adapter")]) == 0
    assert export_hf([str(lora_run), "--out", str(out / "merged"), "--merge"]) == 0
    return {"adapter": out / "adapter", "merged": out / "merged"}


def assert_same_tensors(folder: Path, reference: Path, file: str = "model.safetensors") -> dict:
    a, b = load_file(str(folder / file)), load_file(str(reference / file))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    return a


def assert_same_adapter(folder: Path, reference: Path) -> None:
    a = assert_same_tensors(folder, reference, "adapter_model.safetensors")
    assert len(a) == 2 * 7 * TEST_MODEL["n_layers"]  # A and B of 7 projections
    assert all(a[n].abs().max() > 0 for n in a if "lora_B" in n), "every B must have moved from its zero init"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config == json.loads((reference / "adapter_config.json").read_text())


def test_the_adapter_export_of_a_checkpoint_is_the_runs_adapter_folder(lora_run, lora_base, exports):
    assert_same_adapter(exports["adapter"], lora_run / "adapter")
    config = json.loads((exports["adapter"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(lora_base.resolve())
    _, _, tok = load_for_inference(exports["adapter"])
    assert tok.sha256 == read_meta(find_latest(lora_run))["tokenizer_sha256"]
    # The checkpoint holds no base: the full-model reader refuses it rather than fail in DCP.
    with pytest.raises(ValueError, match="LoRA checkpoint: it holds the adapters only"):
        load_model_weights(find_latest(lora_run))


def test_the_merged_export_has_the_logits_of_base_plus_adapter(lora_run, lora_base, exports, tmp_path):
    from transformers import AutoModelForCausalLM

    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with_adapter, _, tok = load_for_inference(lora_base, adapter=exports["adapter"])
    merged, _, _ = load_for_inference(exports["merged"])
    base, _, _ = load_for_inference(lora_base)
    hf = AutoModelForCausalLM.from_pretrained(exports["merged"], dtype=torch.float32).eval()
    with torch.no_grad():
        want = with_adapter(x)
        torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf(x).logits, want, rtol=1e-5, atol=1e-5)
        # The same adapters from an adapter folder alone (its base named in it), a run directory
        # without an export, and the checkpoint itself (trusted): the same numbers.
        run_without_export = tmp_path / "run"
        shutil.copytree(lora_run / "adapter", run_without_export / "adapter")
        for source in (exports["adapter"], run_without_export):
            torch.testing.assert_close(load_for_inference(source)[0](x), want, rtol=0, atol=0)
        checkpoint, _, _ = load_for_inference(find_latest(lora_run), trust_checkpoint=True)
        torch.testing.assert_close(checkpoint(x), want, rtol=0, atol=0)
        assert (base(x) - want).abs().max() > 1e-2  # the adapter changes the model: the check above is not vacuous
    assert tok.path.parent == exports["adapter"]  # the adapter folder's own tokenizer


def test_a_changed_base_is_refused_and_base_points_at_a_good_copy(lora_run, lora_base, exports, tmp_path, capsys):
    from launch.export_hf import main as export_hf

    # The checkpoint, naming a base that has since changed.
    folder = tmp_path / "run" / "checkpoints" / find_latest(lora_run).name
    shutil.copytree(find_latest(lora_run), folder)
    changed = tmp_path / "changed_base"
    model, model_cfg = load_hf(lora_base)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    write_export(model.state_dict(), model_cfg, changed, lora_base)
    meta = json.loads((folder / "meta.json").read_text())
    meta["base"]["path"] = str(changed)
    (folder / "meta.json").write_text(json.dumps(meta))

    for extra in ([], ["--base", str(changed)], ["--no-merge"]):  # the adapter alone is checked too
        merge = [] if extra == ["--no-merge"] else ["--merge", *extra]
        with pytest.raises(SystemExit) as e:
            export_hf([str(folder), "--out", str(tmp_path / "out"), *merge])
        assert e.value.code == 2
        error = capsys.readouterr().err
        assert str(changed) in error and weights_sha256(changed) in error and meta["base"]["sha256"] in error
    assert not (tmp_path / "out").exists()

    copy = shutil.copytree(lora_base, tmp_path / "moved_base")
    assert export_hf([str(folder), "--out", str(tmp_path / "out"), "--merge", "--base", str(copy)]) == 0
    assert_same_tensors(tmp_path / "out", exports["merged"])
    # Without --merge the adapter folder names the copy as its base.
    assert export_hf([str(folder), "--out", str(tmp_path / "adapter"), "--base", str(copy)]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(copy)
    # --out never replaces the base the adapters need, --overwrite or not.
    with pytest.raises(SystemExit):
        export_hf([str(folder), "--out", str(copy), "--merge", "--base", str(copy), "--overwrite"])
    assert "is the base the adapters were trained on" in capsys.readouterr().err
    assert weights_sha256(copy) == weights_sha256(lora_base)


def test_merge_or_base_on_a_checkpoint_without_lora_is_refused_naming_the_flag(lora_base, tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    from launch.export_hf import main as export_hf
    from training.engine import single_process_dcp

    model, _, tok = load_for_inference(lora_base)
    folder = tmp_path / "run" / "checkpoints" / "step_00000001"
    with single_process_dcp():
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(folder / "engine"))
    meta = {"engine": "single", "model": asdict(model.cfg), "tokenizer_dir": str(lora_base), "state": {"step": 1}}
    (folder / "meta.json").write_text(json.dumps({**meta, "tokenizer_sha256": tok.sha256}))
    for flag in (["--merge"], ["--base", str(lora_base)]):
        with pytest.raises(SystemExit):
            export_hf([str(folder), "--out", str(tmp_path / "out"), *flag])
        assert f"{flag[0]}: {folder} was trained without LoRA" in capsys.readouterr().err
    assert export_hf([str(folder), "--out", str(tmp_path / "out")]) == 0  # a full checkpoint exports as before
    with pytest.raises(ValueError, match="trained without LoRA"):
        load_adapter_weights(folder)


def test_chat_with_an_adapter_answers_as_the_merged_model(lora_base, exports, tmp_path, capsys):
    from launch import chat

    def answer(*model) -> str:
        # Sampled, so that the answer shows the whole distribution (this random model's greedy
        # answer is newlines, with or without the adapter); the same seed draws the same tokens.
        args = ["--prompt", "Who are you?", "--max-tokens", "40", "--temperature", "1", "--top-p", "1", "--seed", "0"]
        assert chat.main([*map(str, model), *args]) == 0
        return capsys.readouterr().out

    want = answer(exports["merged"])
    assert answer(lora_base, "--adapter", exports["adapter"]) == want
    assert answer(exports["adapter"]) == want  # an adapter folder brings its base
    assert answer(lora_base) != want  # and the adapter is applied

    # An adapter whose base is not a local folder (moved, or a hub id) is one error line naming it.
    moved = shutil.copytree(exports["adapter"], tmp_path / "adapter")
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/some-model"}))
    assert chat.main([str(moved), "--prompt", "hi"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "'org/some-model'" in error and f"--adapter {moved}" in error
    assert chat.main([str(lora_base), "--adapter", str(tmp_path), "--prompt", "hi"]) == 2  # not an adapter folder
    assert "adapter_config.json: not found" in capsys.readouterr().err


def test_evaluate_with_an_adapter_scores_as_the_merged_model(lora_base, exports, tmp_path):
    from launch.evaluate import main as evaluate

    corpus = tmp_path / "corpus"
    (corpus / "eval").mkdir(parents=True)
    card = {"role": "system", "content": "You are Brakka, a dwarf smith of Ravenford."}
    for split, question, fact in (
        ("facts", "Where do you live?", "Ravenford"),
        ("lore", "What is your trade?", "smith"),
    ):
        item = {
            "messages": [card, {"role": "user", "content": question}],
            "reference": f"I am a {fact}.",
            "expected": fact,
        }
        (corpus / "eval" / f"{split}.jsonl").write_text(json.dumps(item) + "\n")
    heldout = ["To be, or not to be, that is the question.", "Now is the winter of our discontent."]
    (corpus / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in heldout))

    def scores(*model) -> tuple[dict, list]:
        out = tmp_path / f"eval{len(list(tmp_path.glob('eval*.json')))}.json"
        argv = [*map(str, model), "--corpus", str(corpus), "--max-new-tokens", "8", "--device", "cpu"]
        assert evaluate([*argv, "--out", str(out), "--answers", str(out.with_suffix(".jsonl"))]) == 0
        answers = [json.loads(line)["answers"] for line in out.with_suffix(".jsonl").read_text().splitlines()]
        return json.loads(out.read_text())["checkpoints"][0], [list(a.values()) for a in answers]

    def others(row: dict) -> dict:
        return {k: v for k, v in row.items() if k not in ("checkpoint", "adapter", "perplexity")}

    merged, merged_answers = scores(exports["merged"])
    base, _ = scores(lora_base)
    assert abs(base["perplexity"] / merged["perplexity"] - 1) > 1e-3  # the adapter changes the scores
    for model in ([lora_base, "--adapter", exports["adapter"]], [exports["adapter"]]):
        row, answers = scores(*model)
        assert row["perplexity"] == pytest.approx(merged["perplexity"], rel=1e-5)
        assert answers == merged_answers and others(row) == others(merged)
        assert row.get("adapter") == (str(exports["adapter"]) if len(model) == 3 else None)
    with pytest.raises(SystemExit):  # one adapter for two models: which one?
        evaluate([str(lora_base), str(lora_base), "--adapter", str(exports["adapter"]), "--corpus", str(corpus)])


def test_a_deepspeed_lora_checkpoint_exports_as_its_run(training_data, lora_base, tmp_path):
    """DeepSpeed's files, read in one process by its zero_to_fp32 (adapters only: the base was
    saved as frozen and excluded), give the run's own adapter folder and merged export."""
    from launch.export_hf import main as export_hf

    run_dir = tmp_path / "run"
    run_processes(lora_cfg(run_dir, training_data, lora_base, "deepspeed"), 1, tmp_path / "out")
    assert read_meta(find_latest(run_dir))["engine"] == "deepspeed"
    assert export_hf([str(run_dir), "--out", str(tmp_path / "adapter")]) == 0
    assert_same_adapter(tmp_path / "adapter", run_dir / "adapter")
    assert export_hf([str(run_dir), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert_same_tensors(tmp_path / "merged", run_dir / "hf")
