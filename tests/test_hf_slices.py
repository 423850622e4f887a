"""model.hf's sliced reader and sharded writer (issue 19): `HFSlices.rows`/`flat` give exactly the
slices of `load_hf`'s state dict that FSDP2's Shard(0) and ZeRO-3's partitions put on each rank,
reading only those rows; `save_hf_sharded` writes shard by shard a folder that `load_hf` and
transformers read back."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from model.config import ModelConfig
from model.decoder import Decoder
from model.hf import HFSlices, check_hf, hf_sources, load_hf, save_hf, save_hf_sharded, state_dict_to_hf

# q_out 48, kv_out 16: wqkv has 80 rows, so the ranks of a world of 3 (27 rows each) span q and k,
# then k and v; w13 has 2·40 rows, the middle rank spanning gate and up.
CONFIGS = {
    "llama-gqa-untied": ModelConfig(
        vocab_size=101, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=40, tie_embeddings=False
    ),
    "qwen2-bias-tied": ModelConfig(
        vocab_size=101, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=40, arch="qwen2", qkv_bias=True
    ),
}
FOLDERS = [
    ("llama-gqa-untied", "save_hf", torch.float32),
    ("llama-gqa-untied", "save_pretrained", torch.float32),
    ("qwen2-bias-tied", "save_hf", torch.bfloat16),
    ("qwen2-bias-tied", "save_pretrained", torch.bfloat16),
]
"""(config, writer, dtype): Crucible's single-file export, and transformers' sharded one with an index."""


def random_state_dict(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random, norm weights and biases included, so that a misplaced row shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Decoder(cfg).state_dict().items()}
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def write_folder(cfg: ModelConfig, writer: str, dtype: torch.dtype, path: Path) -> Path:
    sd = {name: t.to(dtype) for name, t in random_state_dict(cfg).items()}
    save_hf(Decoder(cfg), cfg, path, state_dict=sd)
    if writer == "save_pretrained":
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        path = path.with_name(path.name + "-sharded")
        hf.save_pretrained(path, max_shard_size="20KB")
        assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    return path


@pytest.fixture(scope="module", params=FOLDERS, ids=["-".join(map(str, f)) for f in FOLDERS])
def folder(request, tmp_path_factory):
    """(path, load_hf's full state dict) of one written folder."""
    name, writer, dtype = request.param
    path = write_folder(CONFIGS[name], writer, dtype, tmp_path_factory.mktemp(name) / "hf")
    model, _ = load_hf(path)
    return path, model.state_dict()


def test_names_shapes_and_dtypes_come_from_the_headers(folder):
    path, full = folder
    with HFSlices(path) as slices:
        assert slices.cfg == check_hf(path)
        assert slices.names() == list(full)  # the Decoder's order
        for name, t in full.items():
            assert slices.shape(name) == t.shape, name
            assert slices.dtype(name) == t.dtype, name  # the stored dtype


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rows_of_each_fsdp_rank_are_its_torch_chunk(folder, world):
    path, full = folder
    with HFSlices(path) as slices:
        for name, t in full.items():
            size = -(-len(t) // world)  # FSDP2's Shard(0) is torch.chunk: the last ranks may get fewer or none
            chunks = list(t.chunk(world)) + [t[:0]] * (world - len(t.chunk(world)))
            for rank in range(world):
                got = slices.rows(name, rank * size, (rank + 1) * size)
                assert got.dtype == t.dtype and torch.equal(got, chunks[rank]), (name, world, rank)


@pytest.mark.parametrize("world", [2, 3])
def test_flat_of_each_zero3_partition_is_its_slice(folder, world):
    path, full = folder
    with HFSlices(path) as slices:
        for name, t in full.items():
            size = -(-t.numel() // world)  # ZeRO-3 pads the flattened tensor to world · size
            for rank in range(world):
                got = slices.flat(name, rank * size, (rank + 1) * size)
                expected = t.flatten()[rank * size : (rank + 1) * size]
                assert got.dtype == t.dtype and torch.equal(got, expected), (name, world, rank)


def test_odd_and_empty_ranges_and_a_cast(folder):
    path, full = folder
    with HFSlices(path) as slices:
        for name, t in full.items():
            n, numel, width = len(t), t.numel(), t[0].numel()
            for lo, hi in [(0, 1), (1, n - 1), (n - 1, n), (n, n), (n + 3, n + 9), (5, 2), (0, n + 4)]:
                assert torch.equal(slices.rows(name, lo, hi), t[lo:hi]), (name, lo, hi)
            flat = t.flatten()
            spans = [
                (1, width + 2),
                (width - 1, 2 * width + 1),
                (numel - 1, numel),
                (numel, numel),
                (numel + 2, numel + 5),
            ]
            for lo, hi in [*spans, (3, 3), (0, numel)]:
                assert torch.equal(slices.flat(name, lo, hi), flat[lo:hi]), (name, lo, hi)
            assert torch.equal(slices.rows(name, 1, n, dtype=torch.float64), t[1:n].double())
            assert slices.flat(name, 0, 3, dtype=torch.float16).dtype == torch.float16


def test_rows_and_flat_read_only_the_rows_they_return(tmp_path, monkeypatch):
    cfg = CONFIGS["qwen2-bias-tied"]
    path = write_folder(cfg, "save_pretrained", torch.float32, tmp_path / "hf")
    reads, read_bytes = [], []
    real_read, real_preadv = HFSlices._read, os.preadv

    def spy_read(self, hf_name, start, stop):  # the rows asked of each stored tensor
        reads.append((hf_name, start, stop))
        return real_read(self, hf_name, start, stop)

    def spy_preadv(fd, buffers, offset):  # the bytes read from the files
        read_bytes.append(sum(len(b) for b in buffers))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(HFSlices, "_read", spy_read)
    monkeypatch.setattr(os, "preadv", spy_preadv)
    with HFSlices(path) as slices:
        assert reads == [] and read_bytes == []  # opening reads headers only
        slices.rows("layers.1.attn.wqkv.weight", 40, 70)  # q ends at 48, k at 64
        layer = "model.layers.1.self_attn."
        assert reads == [
            (layer + "q_proj.weight", 40, 48),
            (layer + "k_proj.weight", 0, 16),
            (layer + "v_proj.weight", 0, 6),
        ]
        reads.clear()
        slices.rows("layers.0.attn.wqkv.bias", 50, 60)
        assert reads == [("model.layers.0.self_attn.k_proj.bias", 2, 12)]
        reads.clear()
        slices.flat("layers.0.ffn.w13.weight", 39 * 48 + 47, 40 * 48 + 1)  # the last element of gate, the first of up
        assert reads == [("model.layers.0.mlp.gate_proj.weight", 39, 40), ("model.layers.0.mlp.up_proj.weight", 0, 1)]
        reads.clear()
        slices.rows("tok_embeddings.weight", 200, 300)  # past the end: no row read
        assert reads == [("model.embed_tokens.weight", 0, 0)]
    # Every byte read belongs to a requested row: 30 + 10 rows of 48 fp32 values, and 10 + 2 elements.
    assert sum(read_bytes) == (30 * 48 + 10 + 2 * 48) * 4


def test_a_missing_tensor_names_it_and_the_folder(tmp_path):
    path = write_folder(CONFIGS["llama-gqa-untied"], "save_hf", torch.float32, tmp_path / "hf")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{path}: tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        HFSlices(path)


def test_a_truncated_file_names_it(tmp_path):
    path = write_folder(CONFIGS["llama-gqa-untied"], "save_pretrained", torch.float32, tmp_path / "hf")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{shard}: not a readable safetensors file"):
        HFSlices(path)


def test_q_and_k_that_fit_only_together_are_refused_naming_them(tmp_path):
    """wqkv would have the right shape, but its rows would be cut at the wrong places."""
    path = write_folder(CONFIGS["llama-gqa-untied"], "save_hf", torch.float32, tmp_path / "hf")
    tensors = load_file(path / "model.safetensors")
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    tensors[q] = torch.cat([tensors[q], tensors[k][:8]])
    tensors[k] = tensors[k][8:]
    save_file(tensors, path / "model.safetensors")
    for read in (HFSlices, load_hf):
        with pytest.raises(
            ValueError, match=rf"{path}: the weights do not fit .*q_proj.weight \(56, 48\), not 48 rows"
        ):
            read(path)


def test_unknown_names_and_negative_indices_are_refused(tmp_path):
    path = write_folder(CONFIGS["qwen2-bias-tied"], "save_hf", torch.float32, tmp_path / "hf")
    with HFSlices(path) as slices:
        with pytest.raises(ValueError, match="'output.weight' is not a tensor of this model"):
            slices.rows("output.weight", 0, 1)  # tied: the embedding is the output projection
        with pytest.raises(ValueError, match="at least 0"):
            slices.flat("norm.weight", -1, 2)


def test_hf_sources_lists_the_fused_parts_in_the_order_state_dict_to_hf_writes():
    cfg = CONFIGS["qwen2-bias-tied"]
    sources = hf_sources(cfg)
    assert sources["layers.1.attn.wqkv.bias"] == [
        ("model.layers.1.self_attn.q_proj.bias", 48),
        ("model.layers.1.self_attn.k_proj.bias", 16),
        ("model.layers.1.self_attn.v_proj.bias", 16),
    ]
    assert sources["layers.0.ffn.w13.weight"] == [
        ("model.layers.0.mlp.gate_proj.weight", 40),
        ("model.layers.0.mlp.up_proj.weight", 40),
    ]
    hf = state_dict_to_hf(random_state_dict(cfg), cfg)
    assert list(hf) == [hf_name for parts in sources.values() for hf_name, _ in parts]


# --- the sharded writer ----------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_save_hf_sharded_writes_shard_by_shard_what_load_hf_and_transformers_read(config, tmp_path):
    cfg = CONFIGS[config]
    made, files_before = {}, []

    def tensor_fn(name, shape):
        files_before.append(len(list(tmp_path.glob("*.safetensors"))))
        made[name] = torch.randn(shape, generator=torch.Generator().manual_seed(len(made)))
        return made[name]

    save_hf_sharded(cfg, tmp_path, tensor_fn, max_shard_bytes=20_000)
    assert list(made) == list(random_state_dict(cfg))  # once each, in the Decoder's order
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 3 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    # each shard is on disk before the next one's tensors are made, so one shard is held at a time
    assert files_before == sorted(files_before) and files_before[0] == 0 and files_before[-1] == n - 1
    stored = {}
    for file in files:
        stored.update(load_file(tmp_path / file))
        assert (tmp_path / file).stat().st_size < 20_000 + 4096  # the tensors, and a header
    assert index["weight_map"] == {k: f for f in files for k in load_file(tmp_path / f)}
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in stored.values())

    model, loaded_cfg = load_hf(tmp_path)
    assert loaded_cfg == cfg
    for name, t in model.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, made[name].bfloat16()), name
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    theirs = hf.state_dict()
    for name, t in state_dict_to_hf(made, cfg).items():
        assert torch.equal(theirs[name], t.bfloat16()), name


def test_save_hf_sharded_refuses_a_tensor_of_the_wrong_shape_and_a_shadowing_single_file(tmp_path):
    cfg = CONFIGS["llama-gqa-untied"]
    with pytest.raises(
        ValueError, match=r"tensor_fn\('layers.0.attn.wqkv.weight'\) gave shape \(48, 48\), not \(80, 48\)"
    ):
        save_hf_sharded(
            cfg, tmp_path, lambda name, shape: torch.zeros(48, 48) if "wqkv" in name else torch.zeros(shape)
        )
    save_hf(Decoder(cfg), cfg, tmp_path / "single")
    with pytest.raises(FileExistsError, match="model.safetensors"):
        save_hf_sharded(cfg, tmp_path / "single", lambda name, shape: torch.zeros(shape))
