"""Checkpoints: rank files that read without unpickling code, RNG states restored draw for draw,
the tokenizer carried in each checkpoint, checkpoints refused for inference unless trusted,
exports replaced whole, and ranks that agree on a save or load failing on one of them (real
processes over gloo)."""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from data_pipeline.sp_tokenizer import train_tokenizer
from data_pipeline.tokenizer import Tokenizer, load_tokenizer
from model.config import preset
from model.decoder import Decoder
from model.hf import load_hf
from training.checkpoint import (
    TrainState,
    UntrustedCheckpoint,
    check_shared_run_dir,
    find_latest,
    load_checkpoint,
    load_for_inference,
    save_checkpoint,
    write_export,
)
from training.config import ConfigError
from training.engine import (
    Dist,
    LossScaler,
    barrier_last,
    exit_without_teardown,
    free_port,
    init_distributed,
    single_process_dcp,
)

ALONE = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
WORDS = "the a red small old quick cat dog bird tree house river sees finds likes eats runs to from over".split()


def make_tokenizer(folder: Path, vocab_size: int = 320) -> Tokenizer:
    lines = [" ".join(WORDS[(i * k + k) % len(WORDS)] for k in range(1, 8)) + "." for i in range(400)]
    return train_tokenizer(lines, vocab_size, folder)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


class DecoderEngine:
    """The checkpoint calls of an engine, over a plain Decoder saved as the single engine does
    (torch.distributed.checkpoint), with an fp16 loss scaler's extra state."""

    def __init__(self, model: Decoder):
        self.model, self.scaler = model, LossScaler(enabled=True, scale=1024.0)

    def save(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        with single_process_dcp():
            dcp.save({"model": self.model.state_dict()}, checkpoint_id=str(folder))

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        state = {"model": self.model.state_dict()}
        with single_process_dcp():
            dcp.load(state, checkpoint_id=str(folder))

    def extra_state(self) -> dict:
        return {"loss_scaler": self.scaler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.scaler.load_state_dict(state["loss_scaler"])


def tiny_model(tok: Tokenizer) -> Decoder:
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)
    model = Decoder(cfg)
    model.init_weights()
    return model


def save_run(run_dir: Path, tok: Tokenizer, step: int = 1, stream_state: dict | None = None) -> Path:
    """One checkpoint of a one-process run, with the meta the loop records."""
    model = tiny_model(tok)
    meta = {
        "engine": "single",
        "model": asdict(model.cfg),
        "tokenizer_dir": str(tok.path.parent),
        "tokenizer_sha256": tok.sha256,
    }
    state = TrainState(step=step, tokens=100 * step)
    stream = {"epoch": 0, "buffer": [[0, 1], [2, 3]], "carry": None} if stream_state is None else stream_state
    return save_checkpoint(DecoderEngine(model), run_dir / "checkpoints", state, stream, ALONE, meta, 3, tok)


def draws() -> list:
    return [random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()]


def test_a_rank_file_reads_without_unpickling_and_restores_every_rng(tok, tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.randn()  # numpy holds a cached Gaussian now: part of its state
    folder = save_run(tmp_path / "run", tok)
    expected = draws()

    rank_state = torch.load(folder / "rank_00000.pt", weights_only=True)  # tensors and plain values only
    assert rank_state["engine"] == {"loss_scaler": {"scale": 1024.0, "good_steps": 0, "enabled": True}}
    assert rank_state["stream"] == {"epoch": 0, "buffer": [[0, 1], [2, 3]], "carry": None}

    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    engine = DecoderEngine(tiny_model(tok))
    engine.scaler.scale = 1.0
    state, stream = load_checkpoint(engine, folder, ALONE, "single")
    assert draws() == expected
    assert (state.step, state.tokens, engine.scaler.scale) == (1, 100, 1024.0)
    assert stream == rank_state["stream"]


def test_a_rank_state_that_would_not_read_back_is_refused_at_save(tok, tmp_path):
    good = save_run(tmp_path / "run", tok, step=1)
    with pytest.raises(TypeError, match=r"rank state\['stream'\]\['index'\] is a numpy\.int64"):
        save_run(tmp_path / "run", tok, step=2, stream_state={"index": np.int64(3)})
    with pytest.warns(UserWarning, match="unfinished checkpoint"):
        assert find_latest(tmp_path / "run") == good  # the checkpoint before it is as it was


def test_a_rank_file_from_before_plain_data_is_named_as_such_not_as_damaged(tok, tmp_path):
    folder = save_run(tmp_path / "run", tok, step=1)
    rank_file = folder / "rank_00000.pt"
    old = torch.load(rank_file, weights_only=True)
    old["rng"]["numpy"] = np.random.get_state()  # as every rank file held it before
    torch.save(old, rank_file)
    with pytest.raises(ConfigError, match=r"rank_00000\.pt: written by an earlier Crucible.*init_from=EXPORT"):
        load_checkpoint(DecoderEngine(tiny_model(tok)), folder, ALONE, "single")


def test_a_checkpoint_carries_the_tokenizer_it_trained_with(tok, tmp_path):
    from launch.export_hf import main as export_hf

    source = tmp_path / "data_tokenizer"
    trained = make_tokenizer(source)
    folder = save_run(tmp_path / "run", trained)
    make_tokenizer(source, vocab_size=300)  # prepare_data run again: the data's tokenizer replaced
    assert load_tokenizer(source).sha256 != trained.sha256

    _, _, loaded = load_for_inference(folder, trust_checkpoint=True)
    assert loaded.sha256 == trained.sha256
    assert export_hf([str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert load_tokenizer(tmp_path / "hf").sha256 == trained.sha256


def test_a_checkpoint_loads_for_inference_only_when_trusted(tok, tmp_path):
    run = tmp_path / "run"
    folder = save_run(run, tok)
    for path in (folder, run):  # a checkpoint, and a run directory without an export
        with pytest.raises(UntrustedCheckpoint) as refused:
            load_for_inference(path)
        assert "a checkpoint is code" in str(refused.value) and "--trust-checkpoint" in str(refused.value)
        model, _, _ = load_for_inference(path, trust_checkpoint=True)
        assert torch.equal(model.output_weight, tiny_model(tok).output_weight)
    write_export(tiny_model(tok).state_dict(), tiny_model(tok).cfg, run / "hf", tok)
    load_for_inference(run)  # a run directory with its HF export: data, loaded without trust


def test_an_export_replaces_everything_an_earlier_one_left(tok, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    stale_index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(stale_index))  # would win over the new weights
    (out / "notes.txt").write_text("a user's file")
    model = tiny_model(tok)
    with pytest.raises(ConfigError, match=r"holds files an export does not write \(notes\.txt\)"):
        write_export(model.state_dict(), model.cfg, out, tok)  # only an earlier export is replaced
    assert (out / "notes.txt").read_text() == "a user's file"
    (out / "notes.txt").unlink()
    link = tmp_path / "latest"
    link.symlink_to(out)
    assert write_export(model.state_dict(), model.cfg, link, tok) == out  # through a link: its folder
    assert link.is_symlink() and not (out / "model.safetensors.index.json").exists()
    loaded, _ = load_hf(out)
    assert torch.equal(loaded.output_weight, model.output_weight)
    assert not list(tmp_path.glob(".hf*"))  # no staging or set-aside folder left

    broken = {k: v for k, v in model.state_dict().items() if k != "norm.weight"}
    with pytest.raises(KeyError):
        write_export(broken, model.cfg, out, tok)  # fails halfway: the export before stays whole
    assert torch.equal(load_hf(out)[0].output_weight, model.output_weight) and not list(tmp_path.glob(".hf*"))


def test_export_cli_refuses_a_non_empty_out_unless_overwrite(tok, tmp_path, capsys):
    from launch.export_hf import main as export_hf

    run = tmp_path / "run"
    save_run(run, tok)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        export_hf([str(run), "--out", str(out)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["model.safetensors.index.json"]  # untouched
    assert export_hf([str(run), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "model.safetensors.index.json").exists()
    assert torch.equal(load_hf(out)[0].output_weight, tiny_model(tok).output_weight)
    for wrong in (run, tmp_path):  # the run itself, a folder above it: never replaced, --overwrite or not
        with pytest.raises(SystemExit) as exit_info:
            export_hf([str(run), "--out", str(wrong), "--overwrite"])
        assert exit_info.value.code == 2 and "holds files an export does not write" in capsys.readouterr().err
    assert find_latest(run) is not None
    with pytest.raises(SystemExit):
        export_hf(["--help"])
    assert "A checkpoint is code" in capsys.readouterr().out


# --- ranks agree: two real processes over gloo ------------------------------------------------


class FileEngine:
    """An engine's checkpoint calls without a model (one small file per rank, no collective):
    what is under test is the ranks' agreement, not the engine. `on_save` injects a fault."""

    def __init__(self, rank: int):
        self.rank, self.weight, self.extra, self.on_save = rank, torch.arange(4.0) + rank, {}, None

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"w": self.weight}, folder / f"shard_{self.rank}.pt")
        if self.on_save is not None:
            self.on_save(folder)

    def load(self, folder: Path) -> None:
        self.weight = torch.load(folder / f"shard_{self.rank}.pt", weights_only=True)["w"]

    def extra_state(self) -> dict:
        return {"loss_scaler": {"scale": 512.0, "good_steps": 7, "enabled": True}}

    def load_extra_state(self, state: dict) -> None:
        self.extra = state


def _scenarios(where: Dist, base: Path, tok: Tokenizer) -> dict:
    """Every rank runs these in order; each one's outcome: None, or (error type, message), and seconds."""
    engine, shared, own = FileEngine(where.rank), base / "shared", base / f"node{where.rank}"
    results = {}

    def attempt(name, fn):
        started = time.monotonic()
        try:
            outcome = fn()
        except Exception as e:
            outcome = [type(e).__name__, str(e)]
        results[name] = [outcome, time.monotonic() - started]

    def save(root: Path, step: int):
        stream = {"index": step, "rank": where.rank}
        save_checkpoint(engine, root / "checkpoints", TrainState(step=step), stream, where, {"engine": "f"}, 3, tok)

    def fail_on_rank_1(folder: Path):
        if where.rank == 1:  # the rank file's path taken by a folder: rank 1's torch.save fails
            (folder.parent / "rank_00001.pt").mkdir()

    def damage_rank_1_file():
        if where.is_main:
            (shared / "checkpoints" / "step_00000001" / "rank_00001.pt").write_bytes(b"not a torch file")
        torch.distributed.barrier()
        return load_checkpoint(engine, shared / "checkpoints" / "step_00000001", where, "f")

    def stale_tmp_on_rank_1():
        if where.rank == 1:  # left on node 1's own disk by an earlier run: rank 1 sees a folder, not rank 0's
            (own / "checkpoints" / "step_00000002.tmp").mkdir(parents=True)
        torch.distributed.barrier()
        return save(own, 2)

    attempt("shared_run_dir", lambda: check_shared_run_dir(shared, where))
    attempt("save", lambda: save(shared, 1))
    engine.on_save = fail_on_rank_1
    attempt("save_failing_on_rank_1", lambda: save(shared, 2))
    engine.on_save = None
    attempt("save_after_the_failure", lambda: save(shared, 3))
    attempt("load_damaged_on_rank_1", damage_rank_1_file)
    attempt("load", lambda: load_checkpoint(engine, shared / "checkpoints" / "step_00000003", where, "f")[1])
    attempt("own_run_dir", lambda: check_shared_run_dir(own, where))
    attempt("save_unseen_on_rank_1", lambda: save(own, 1))
    attempt("save_unseen_on_rank_0", stale_tmp_on_rank_1)
    return results


def _dist_worker(rank: int, world: int, port: int, base: str, tokenizer: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    # A short timeout: a rank left waiting fails this test in a minute rather than hanging it.
    where = init_distributed(needs_group=True, timeout_s=60)
    results = _scenarios(where, Path(base), load_tokenizer(tokenizer))
    barrier_last()
    (Path(base) / f"rank{rank}.json").write_text(json.dumps(results))
    exit_without_teardown(0)  # as launch/sft.py: gloo's threads can abort the teardown


@pytest.fixture(scope="module")
def two_ranks(tok, tmp_path_factory) -> tuple[Path, list[dict]]:
    base = tmp_path_factory.mktemp("dist")
    context = mp.start_processes(
        _dist_worker, args=(2, free_port(), str(base), str(tok.path)), nprocs=2, start_method="spawn", join=False
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish in 240 s: one waits for the other")
    return base, [json.loads((base / f"rank{r}.json").read_text()) for r in range(2)]


def agreed(two_ranks, name: str) -> tuple[str, str]:
    """The error both ranks raised in one scenario, checked to be the same, and prompt."""
    (first, seconds_0), (second, seconds_1) = (r[name] for r in two_ranks[1])
    assert first == second, (first, second)
    assert max(seconds_0, seconds_1) < 20  # not a rank left waiting until the timeout
    return tuple(first)


def test_ranks_save_and_load_together(two_ranks):
    base, results = two_ranks
    for name in ("shared_run_dir", "save", "save_after_the_failure"):
        assert [r[name][0] for r in results] == [None, None], name
    assert [r["load"][0] for r in results] == [{"index": 3, "rank": 0}, {"index": 3, "rank": 1}]
    assert not list((base / "shared").glob(".crucible_rank0_*"))  # the run_dir check leaves nothing behind


def test_a_rank_file_write_failing_on_one_rank_fails_every_rank_alike(two_ranks):
    kind, message = agreed(two_ranks, "save_failing_on_rank_1")
    assert kind == "RankError"
    assert message.startswith("saving checkpoint step_00000002 failed on rank 1: ") and "rank_00001.pt" in message
    complete = [p.name for p in (two_ranks[0] / "shared" / "checkpoints").iterdir() if (p / "meta.json").is_file()]
    assert sorted(complete) == ["step_00000001", "step_00000003"]  # nothing lost, nothing half-written kept


def test_a_damaged_rank_file_fails_every_rank_alike_on_load(two_ranks):
    kind, message = agreed(two_ranks, "load_damaged_on_rank_1")
    folder = two_ranks[0] / "shared" / "checkpoints" / "step_00000001"
    assert kind == "ConfigError"
    assert message.startswith(f"loading checkpoint step_00000001 failed on rank 1: checkpoint {folder}: ")
    assert "rank_00001.pt does not load (ValueError: it holds more than plain values and tensors" in message
    assert "weights_only` set to `False`" not in message  # torch's advice, wrong for a file of unknown origin
    assert "move the folder out" in message


def test_a_run_dir_not_shared_by_the_ranks_is_named(two_ranks):
    kind, message = agreed(two_ranks, "own_run_dir")
    assert kind == "ConfigError"
    assert f"run_dir={two_ranks[0] / 'node1'} is not the same folder on every rank (rank 1 does not see" in message
    assert message.endswith("put run_dir on storage every node sees")
    kind, message = agreed(two_ranks, "save_unseen_on_rank_1")
    assert kind == "ConfigError" and "failed on rank 1" in message and "rank 1 does not see it" in message
    kind, message = agreed(two_ranks, "save_unseen_on_rank_0")
    missing = two_ranks[0] / "node0" / "checkpoints" / "step_00000002.tmp" / "rank_00001.pt"
    assert kind == "ConfigError" and f"failed on rank 0: {missing}: written, but rank 0 does not see it" in message
    assert "run_dir must be on storage every rank sees" in message
    assert not (two_ranks[0] / "node0" / "checkpoints" / "step_00000002").exists()  # no meta.json written
