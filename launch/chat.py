"""python launch/chat.py MODEL [--adapter DIR] [--character NAME --world FILE | --card FILE | --system TEXT]
    [--prompt TEXT] [--seed N] [--trust-checkpoint]

Talk to a model in the terminal, its answers streamed as they are generated. MODEL is a Hugging
Face export folder (config.json, model.safetensors and the tokenizer files, as training and
launch/export_hf.py write it), or a run directory with one (RUN/hf). With --adapter DIR, a peft
LoRA adapter folder (a LoRA run's RUN/adapter, or launch/export_hf.py's export of its
checkpoint) is applied to MODEL, its base; the adapter folder's tokenizer is used where it has
one. MODEL may also be an adapter folder itself, whose base is the local folder its
adapter_config.json names (base_model_name_or_path). A training checkpoint
folder, or a run directory without an export (its newest checkpoint), needs --trust-checkpoint:
a checkpoint is code (loading it unpickles files, which can run code), so load only your own
runs' checkpoints. The character card becomes the system message: a character of a world file
({"characters": [{"name": ..., "card": ...}]}), a text file, or text given here. Each line typed
is a user turn, rendered by the model's own chat template; the answer ends at the template's
end-of-turn token (<|im_end|>, <|eot_id|>, ...). The oldest exchanges are dropped when the
conversation would not fit the model's context. With --prompt it answers once, prints only the
answer and exits. Ctrl-D quits. Sampling: --temperature 0.7 --top-p 0.9 --max-tokens 200 by
default; --temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from data_pipeline.chat import encode_prompt, fit_prompt
from data_pipeline.records import DataError
from data_pipeline.tokenizer import Tokenizer
from model.decoder import Decoder
from model.generate import generate
from training.checkpoint import load_for_inference


class ChatError(Exception):
    """A bad input: reported in one line, exit code 2."""


def read_card(args: argparse.Namespace) -> str | None:
    """The system message from --character/--world, --card or --system (None: no system message)."""
    if args.system is not None:
        return args.system
    if args.card is not None:
        return _read_text(args.card, "card").strip()
    if args.character is None:
        return None
    try:
        characters = json.loads(_read_text(args.world, "world"))["characters"]
        cards = {c["name"].lower(): c["card"] for c in characters}
        names = [c["name"] for c in characters]
        if not all(isinstance(card, str) for card in cards.values()):
            raise TypeError("a card is not a string")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ChatError(f'{args.world}: expected {{"characters": [{{"name": ..., "card": ...}}]}} ({e!r})') from e
    if args.character.lower() not in cards:
        raise ChatError(f"{args.world}: no character {args.character!r}; it has {', '.join(names)}")
    return cards[args.character.lower()]


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of a --card or --world file; ChatError naming it when it cannot be read."""
    if not path.is_file():
        raise ChatError(f"{path}: no such {what} file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatError(f"{path}: cannot read the {what} file as UTF-8 text ({e})") from e


def load_model(
    path: Path, device: torch.device, trust_checkpoint: bool = False, adapter: Path | None = None
) -> tuple[Decoder, Tokenizer]:
    """The model (eval mode, bf16 on a GPU, fp32 on CPU; LoRA adapters fp32) and its tokenizer
    from an HF export (with `adapter` applied), an adapter folder on its base, or with
    trust_checkpoint from a checkpoint folder or a run directory."""
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        model, _, tok = load_for_inference(path, device, dtype, trust_checkpoint=trust_checkpoint, adapter=adapter)
    except json.JSONDecodeError as e:  # from config.json or the weight index: it names neither
        raise ChatError(f"{path}: the export's config.json or weight index is not valid JSON ({e})") from e
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise ChatError(str(e)) from e
    except SafetensorError as e:
        raise ChatError(f"{path}: its safetensors weights are damaged ({e})") from e
    return model, tok


def check_card(system: str | None, tok: Tokenizer, max_seq_len: int) -> None:
    """ChatError when the card alone leaves no room for a question and an answer: every turn
    would be refused otherwise, as if the user's line were too long."""
    if system:
        try:
            size = len(encode_prompt([{"role": "system", "content": system}], tok))
        except DataError as e:  # a template that takes no system message (Mistral's) says so here
            raise ChatError(str(e)) from e
        if size + 8 > max_seq_len:  # room for a short question and the first tokens of an answer
            raise ChatError(f"the character card is {size} tokens; the model's context is {max_seq_len}: shorten it")


def build_prompt(
    system: str | None, history: list[tuple[str, str]], user: str, tok: Tokenizer, max_seq_len: int, max_tokens: int
) -> tuple[list[int], int]:
    """Prompt ids for the next answer, dropping the oldest exchanges until prompt + answer fit.

    Args:
        system: the card (None: no system message).
        history: earlier (user, assistant) exchanges, oldest first.
        user: the new user message.
        tok: the tokenizer.
        max_seq_len: the model's context.
        max_tokens: room wanted for the answer; it gets less when even the shortest prompt
            leaves less.
    Returns:
        (prompt ids, number of exchanges dropped from the start of history).
    """
    head = [{"role": "system", "content": system}] if system else []
    turns = [{"role": r, "content": c} for u, a in history for r, c in (("user", u), ("assistant", a))]
    try:
        return fit_prompt([*head, *turns, {"role": "user", "content": user}], tok, max_seq_len, max_tokens)
    except DataError as e:
        raise ChatError(str(e)) from e


def stream_answer(model: Decoder, tok: Tokenizer, prompt: list[int], args, generator) -> str:
    """Generate and print the answer as it comes; return its text."""
    max_new = min(args.max_tokens, model.cfg.context_len - len(prompt))
    ids: list[int] = []
    shown = ""
    settings = dict(temperature=args.temperature, top_p=args.top_p, stop_ids=tok.stop_ids, generator=generator)
    for token in generate(model, prompt, max_new_tokens=max_new, **settings):
        ids.append(token)
        # Decode everything so far and print the new suffix: a character split over several
        # byte tokens appears once it is whole (until then the text ends in U+FFFD).
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):
            print(text[len(shown) :], end="", flush=True)
            shown = text
    text = tok.decode(ids)
    print(text[len(shown) :], flush=True)
    return text


def chat_loop(model: Decoder, tok: Tokenizer, system: str | None, args, generator) -> None:
    """Read user lines until end of input, answering each with the history kept."""
    name = args.character or "assistant"
    adapter = f" + adapter {args.adapter}" if args.adapter else ""
    print(f"chat: {args.model}{adapter} on {model.output_weight.device}; Ctrl-D quits", file=sys.stderr)
    history: list[tuple[str, str]] = []
    try:
        while True:
            user = input("you> ").strip()
            if not user:
                continue
            try:
                prompt, dropped = build_prompt(system, history, user, tok, model.cfg.context_len, args.max_tokens)
            except ChatError as error:
                print(f"chat: {error}; say something shorter", file=sys.stderr)
                continue
            history = history[dropped:]
            print(f"{name}> ", end="", flush=True)
            history.append((user, stream_answer(model, tok, prompt, args, generator)))
    except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C ends the chat
        print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "model", type=Path, help="HF export or LoRA adapter folder (or, with --trust-checkpoint, a checkpoint)"
    )
    parser.add_argument("--adapter", type=Path, help="a peft LoRA adapter folder to apply to MODEL, its base")
    card = parser.add_mutually_exclusive_group()
    card.add_argument("--character", help="a character's name in --world (any case)")
    card.add_argument("--card", type=Path, help="a text file holding the character card")
    card.add_argument("--system", help="the system message itself")
    parser.add_argument("--world", type=Path, help="world.json holding the characters")
    parser.add_argument("--prompt", help="answer this one message, print only the answer, exit")
    parser.add_argument("--temperature", type=float, default=0.7, help="0: greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default 0.9)")
    parser.add_argument("--max-tokens", type=int, default=200, help="longest answer in tokens (default 200)")
    parser.add_argument("--seed", type=int, help="seed the sampling, for reproducible answers")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="MODEL may be a checkpoint or run directory of your own (a checkpoint is code: loading it unpickles)",
    )
    args = parser.parse_args(argv)
    if (args.character is None) != (args.world is None):
        parser.error("--character and --world go together")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        system = read_card(args)
        model, tok = load_model(args.model, device, args.trust_checkpoint, args.adapter)
        check_card(system, tok, model.cfg.context_len)
        if args.prompt is not None:
            prompt, _ = build_prompt(system, [], args.prompt, tok, model.cfg.context_len, args.max_tokens)
    except (ChatError, DataError) as error:
        print(f"chat: error: {error}", file=sys.stderr)
        return 2
    generator = None if args.seed is None else torch.Generator(device).manual_seed(args.seed)
    if args.prompt is not None:
        stream_answer(model, tok, prompt, args, generator)
    else:
        chat_loop(model, tok, system, args, generator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
