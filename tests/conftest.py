from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Two cores: keep torch from oversubscribing them when tests run processes side by side.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data beside the repository (../shared/data); skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the repo in CI)")
    return SHARED_DATA


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="session")
def training_data(shared_data, tmp_path_factory) -> dict[str, Path]:
    """Real pretraining and SFT shards (with their tokenizer) for the training tests."""
    from tests.training_data import build

    return build(shared_data, tmp_path_factory.mktemp("training_data"))


@pytest.fixture(scope="session")
def lora_base(training_data, tmp_path_factory) -> Path:
    """A random "pretrained" base of TEST_MODEL's shape, exported with the SFT data's tokenizer:
    the init_from of the LoRA tests. Its norms are away from 1, so a misplaced one would show."""
    from model.config import preset
    from model.decoder import Decoder
    from tests.training_data import TEST_MODEL, VOCAB
    from training.checkpoint import write_export

    cfg = preset("tiny", **TEST_MODEL, vocab_size=VOCAB)
    torch.manual_seed(7)
    model = Decoder(cfg)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("lora") / "base"
    return write_export(model.state_dict(), cfg, out, training_data["sft"] / "tokenizer")
