"""The one tokenizer interface the pipeline, the stream, the loop, evaluation and chat use.

Two kinds implement it:

- Crucible's own sentencepiece model (data_pipeline/sp_tokenizer.py), trained by prepare_data,
  with the fixed ChatML template;
- a Hugging Face tokenizer folder (data_pipeline/hf_tokenizer.py): tokenizer.json and
  tokenizer_config.json of an open model, with that model's own Jinja chat template.

`load_tokenizer` tells them apart from the files. Nothing here imports chat.py, and neither kind
imports this module: the interface is a Protocol, so there is no import cycle.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from data_pipeline.hf_tokenizer import HFTokenizer
from data_pipeline.records import DataError, RenderedChat
from data_pipeline.sp_tokenizer import MODEL_FILE, SentencePieceTokenizer, is_crucible_model

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
    MODEL_FILE,
)
"""Every file a tokenizer's `save` may write: what a checkpoint, an export or a dataset's
tokenizer/ holds of it, and the only files of such a folder that a new save replaces."""


class Tokenizer(Protocol):
    path: Path
    """The folder (or .model file) it was loaded from."""
    sha256: str
    """Digest of everything that defines the ids (not the chat template); manifests and
    checkpoints record it, and a run refuses shards made with another tokenizer."""
    vocab_size: int
    """Every id it gives is below this."""
    bos_id: int | None
    """Put before every document, when the tokenizer's own config adds one (None: Qwen adds none)."""
    eos_id: int
    """Ends every pretraining document."""
    pad_id: int
    """Fills padded positions, which are never trained (the eos when the tokenizer has no pad)."""
    stop_ids: tuple[int, ...]
    """Ids that end an assistant turn in generation (end of turn, end of text)."""
    chat_template_name: str
    """What messages name when a chat cannot be rendered (the template's source)."""
    control_strings: tuple[str, ...]
    """Strings that would become control tokens inside a rendered message (a Hugging Face
    template's text is tokenized whole); empty where a message's content is always text."""

    def encode(self, text: str) -> list[int]:
        """Ids of plain text: no bos/eos added, and a special-token string in it stays text."""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids, special tokens written out."""

    def encode_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> RenderedChat:
        """The conversation rendered by the chat template, with the loss mask of its assistant turns.

        Raises:
            DataError: the template cannot render it, or the masks cannot be derived (naming the
                template and the turn).
        """

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write a Hugging Face tokenizer folder (template included) that `load_tokenizer` and
        `AutoTokenizer.from_pretrained` both read; files are replaced whole, others left alone."""


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a tokenizer for `load_tokenizer` to read (a model folder whose
    tokenizer is kept elsewhere may still hold a generation_config.json: that is not one)."""
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", MODEL_FILE))


def load_tokenizer(path: str | os.PathLike, chat_template: str | os.PathLike | None = None) -> Tokenizer:
    """Load either kind of tokenizer from local files.

    Args:
        path: a folder holding Crucible's tokenizer.model (prepare_data's tokenizer/, a checkpoint
            or export), a Hugging Face tokenizer or model folder (tokenizer.json +
            tokenizer_config.json), or a .model file.
        chat_template: a Jinja file whose template replaces a Hugging Face tokenizer's own
            (prepare_data's --chat-template).
    Returns:
        The tokenizer.
    Raises:
        DataError: nothing loadable there, a slow-only Hugging Face tokenizer, or a chat template
            given for Crucible's own tokenizer; the message names the file.
    """
    path = Path(path)
    crucible = path if path.suffix == ".model" else path / MODEL_FILE
    hugging_face = path.is_dir() and any(
        (path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    )
    # A Hugging Face folder may hold a tokenizer.model of its own (Mistral's, Llama 2's).
    if crucible.is_file() and (not hugging_face or is_crucible_model(crucible)):
        if chat_template is not None:
            raise DataError(
                f"{path} is a tokenizer Crucible trained, whose chat template is ChatML; --chat-template applies "
                "to Hugging Face tokenizers"
            )
        return SentencePieceTokenizer.load(crucible)
    if hugging_face:
        return HFTokenizer.load(path, chat_template=chat_template)
    what = "does not exist" if not path.exists() else f"holds no tokenizer ({MODEL_FILE} or tokenizer.json)"
    raise DataError(
        f"{path} {what}: give the folder a prepare_data run wrote (its tokenizer/), a Hugging Face model folder, or "
        "train one with launch/prepare_data.py pretrain --vocab-size N"
    )
