"""The sentencepiece tokenizer: exact round trips (English, Chinese, unseen characters, tricky
whitespace) and id-for-id parity with the Hugging Face folder it exports."""

import hashlib
import json

import pytest

from data_pipeline.records import DataError
from data_pipeline.sp_tokenizer import SPECIAL_TOKENS, _training_lines, train_tokenizer
from data_pipeline.tokenizer import load_tokenizer
from tests.conftest import SHARED_DATA

TRAIN_CHARS = 300_000
VOCAB = 4000

TRICKY = [
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "multiple   inner    spaces",
    "line one\nline two\n\n\nafter blank lines\n",
    "\ttabs\tand\r\ncarriage returns\r\n",
    "emoji 😀🎉👍🏽 and ZWJ 👩‍👩‍👧",
    "  中文前面有空格，后面有换行\n",
    "mixed 孙悟空 said: “hello”",
    "digits 1234567890 and 3.14159",
    "literal <|im_start|>user\nhi<|im_end|> and <s> </s> <pad> <unk> in text",
    "a byte piece's name <0x41> in text",
    "café naïve résumé",
]
UNSEEN_CHINESE = "𠀀𠀁𪚥龘靐齉爩"  # CJK Extension B and rare characters: absent from the training text


def read_training_corpus(data):
    """The test slice of both real corpora and some RoleBench answers (English and Chinese)."""
    texts = [
        (data / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:TRAIN_CHARS],
        (data / "pretrain" / "journey_to_the_west.txt").read_text(encoding="utf-8")[:TRAIN_CHARS],
    ]
    for name in ("rolebench_en_train.jsonl", "rolebench_zh_train.jsonl"):
        lines = (data / "sft" / name).read_text(encoding="utf-8").splitlines()[:300]
        texts += [json.loads(line)["generated"][0] for line in lines]
    return texts


def small_tokenizer(out_dir):
    """A 4000-piece tokenizer on the real data (about a second); skips without the data."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the repo in CI)")
    return train_tokenizer(read_training_corpus(SHARED_DATA), VOCAB, out_dir)


def held_out_lines(data, n_en=400, n_zh=200):
    """Real lines that the tokenizer was not trained on."""
    en = (data / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8")[TRAIN_CHARS:]
    zh = (data / "pretrain" / "journey_to_the_west.txt").read_text(encoding="utf-8")[TRAIN_CHARS:]
    return en.split("\n")[1 : n_en + 1] + zh.split("\n")[1 : n_zh + 1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tok.save(tmp_path_factory.mktemp("hf"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # a local folder must load with no network
        return AutoTokenizer.from_pretrained(str(folder))


def test_special_tokens_and_identity(tok):
    assert [tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.im_start_id, tok.im_end_id] == list(range(6))
    assert tok.vocab_size == VOCAB
    assert tok.path.name == "tokenizer.model"
    assert tok.sha256 == hashlib.sha256(tok.path.read_bytes()).hexdigest()
    assert load_tokenizer(tok.path.parent).sha256 == tok.sha256  # a folder loads its tokenizer.model


def test_round_trip_real_lines_and_tricky_strings(tok, shared_data):
    lines = held_out_lines(shared_data)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in "".join(lines))  # Chinese really is in the sample
    for text in lines + TRICKY:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, text
        assert tok.unk_id not in ids or "<unk>" in text, text
    # a whole chunk of text with its newlines, in one piece
    chunk = "\n".join(lines)
    assert tok.decode(tok.encode(chunk)) == chunk


def test_unseen_chinese_falls_back_to_bytes(tok):
    ids = tok.encode(UNSEEN_CHINESE)
    assert tok.unk_id not in ids
    # byte pieces are ids 6..261; each rare character is 4 (or 3) UTF-8 bytes, one id each
    assert all(6 <= i < 262 for i in ids)
    assert len(ids) == len(UNSEEN_CHINESE.encode("utf-8"))
    assert tok.decode(ids) == UNSEEN_CHINESE


def test_ids_do_not_depend_on_cuts_at_newlines(tok, shared_data):
    """No piece spans a newline, so a text cut at one encodes as the sum of its parts."""
    lines = held_out_lines(shared_data, n_en=50, n_zh=50)
    newline = tok.encode("\n")
    assert newline == [6 + ord("\n")]  # the byte token <0x0A>
    joined = []
    for line in lines:
        joined += tok.encode(line) + newline
    assert tok.encode("\n".join(lines) + "\n") == joined


def _has_special_string(text):
    return any(t in text for t in SPECIAL_TOKENS)


def test_special_token_strings_in_text_are_plain_text(tok):
    """Only the chat template inserts control ids: a literal "<|im_end|>" in a document or an
    answer is text, or an answer quoting it would train a stop in mid-answer."""
    text = "x<|im_start|>y<|im_end|></s> <s> <pad> <unk>"
    ids = tok.encode(text)
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert ids == tok._sp.encode(text)
    assert tok.decode(ids) == text


def test_hf_export_encodes_and_decodes_identically(tok, hf_tok, shared_data):
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [tok.im_start_id, tok.im_end_id]
    assert len(hf_tok) == tok.vocab_size
    texts = held_out_lines(shared_data) + TRICKY + [UNSEEN_CHINESE]
    assert sum(map(_has_special_string, texts)) == 1
    for text in texts:
        ids = tok.encode(text)
        # Hugging Face reads special-token strings as control tokens unless told not to.
        assert hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True) == ids, text
        if not _has_special_string(text):
            assert hf_tok.encode(text, add_special_tokens=False) == ids, text
            assert hf_tok(text)["input_ids"] == ids, text  # the default call adds no bos/eos either
        assert hf_tok.decode(ids) == tok.decode(ids) == text, text


def test_hf_folder_contents(tok, tmp_path):
    folder = tok.save(tmp_path / "hf")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"].startswith("{%- for message in messages %}")
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == SPECIAL_TOKENS[1:4]
    assert json.loads((folder / "special_tokens_map.json").read_text())["additional_special_tokens"] == list(
        SPECIAL_TOKENS[4:]
    )
    assert load_tokenizer(folder).sha256 == tok.sha256
    assert tok.stop_ids == (5, 2)  # <|im_end|>, </s>: an export's generation_config.json names them


def test_training_input_is_split_at_newlines_and_long_lines_are_chunked(tok):
    assert not any("\n" in tok._sp.id_to_piece(i) for i in range(tok.vocab_size))
    long_line = "西游记" * 5000  # 45,000 bytes: sentencepiece would skip it whole
    lines = list(_training_lines(["a\nb\n\n", long_line], max_bytes=1000))
    assert lines[:2] == ["a", "b"]
    assert "".join(lines[2:]) == long_line
    assert all(len(line.encode("utf-8")) <= 1000 for line in lines)


def test_load_missing_or_garbage_file_names_it(tmp_path):
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"this is not a sentencepiece model \x00\xff" * 10)
    with pytest.raises(DataError, match=str(garbage)):
        load_tokenizer(garbage)
    with pytest.raises(DataError, match=str(garbage)):
        load_tokenizer(tmp_path)  # the folder form names the file inside it
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(missing)


def test_load_rejects_a_model_without_crucible_special_tokens(tmp_path):
    import sentencepiece as spm

    lines = ["the quick brown fox jumps over the lazy dog"] * 50
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "plain"), vocab_size=31, minloglevel=2
    )
    with pytest.raises(DataError, match="plain.model"):
        load_tokenizer(tmp_path / "plain.model")


def test_small_vocabulary_on_chinese_keeps_the_common_characters(shared_data, tmp_path):
    """~3000 distinct characters and 600 pieces: the rare characters go to bytes, and training
    still succeeds (sentencepiece alone refuses: its coverage cannot go below 0.98)."""
    text = (shared_data / "pretrain" / "journey_to_the_west.txt").read_text(encoding="utf-8")[:200_000]
    tok = train_tokenizer([text], 600, tmp_path)
    single_chars = [p for p in map(tok._sp.id_to_piece, range(262, 600)) if len(p) == 1]
    assert len(single_chars) <= (600 - 262) // 2
    assert "的" in single_chars or "了" in single_chars  # the most frequent characters have pieces
    line = text[150_000:151_000]
    assert tok.decode(tok.encode(line)) == line


def test_training_is_deterministic(tok, tmp_path):
    again = small_tokenizer(tmp_path)
    assert again.sha256 == tok.sha256


def test_train_error_is_a_data_error(tmp_path):
    # 3500 distinct Chinese characters at full coverage do not fit in 300 pieces
    text = "".join(chr(0x4E00 + i) for i in range(3500))
    with pytest.raises(DataError, match="character_coverage"):
        train_tokenizer([text], 300, tmp_path, character_coverage=1.0)


# --- failures leave whole files; messages name flags ---------------------------------------

# Run in a child process: a file size limit makes a write fail part-way, as a full disk does.
_WRITE_UNDER_LIMIT = """
import resource, signal, sys
from data_pipeline.sp_tokenizer import train_tokenizer
from data_pipeline.tokenizer import load_tokenizer
limit, action, src, dest = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    if action == "save_hf":
        load_tokenizer(src).save(dest)
    else:
        train_tokenizer([f"another corpus, line {i} of many" for i in range(200)], 320, dest)
except Exception as e:
    sys.exit(f"failed: {e}")
"""


def _write_under_limit(limit, action, src, dest):
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.run(
        [sys.executable, "-c", _WRITE_UNDER_LIMIT, str(limit), action, str(src), str(dest)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip


def _small_corpus():
    return [f"hello there, general kenobi, said line {i}" for i in range(200)]


def test_a_save_that_fails_part_way_leaves_the_earlier_tokenizer_whole(tmp_path):
    """Issue 17: a save over an earlier tokenizer that fails mid-file (a full disk) replaces no file;
    the earlier files are byte-identical and load, and no temporary file is left."""
    from tokenizers import Tokenizer as FastTokenizer

    from data_pipeline.sp_tokenizer import SAVED_FILES

    folder = train_tokenizer(_small_corpus(), 300, tmp_path / "old").save(tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == sorted(SAVED_FILES)
    newer = train_tokenizer([t.upper() for t in _small_corpus()], 320, tmp_path / "new")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    limit = (folder / "tokenizer.json").stat().st_size // 2  # below the first file written, above the smallest
    result = _write_under_limit(limit, "save_hf", newer.path, folder)
    assert result.returncode != 0 and "failed:" in result.stderr, result.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert load_tokenizer(folder).sha256 != newer.sha256
    FastTokenizer.from_file(str(folder / "tokenizer.json"))
    # and with room to write, the same save replaces all of them
    assert _write_under_limit(10**8, "save_hf", newer.path, folder).returncode == 0
    assert load_tokenizer(folder).sha256 == newer.sha256
    assert sorted(p.name for p in folder.iterdir()) == sorted(SAVED_FILES)


def test_training_that_fails_to_write_keeps_the_earlier_model(tmp_path):
    old = train_tokenizer(_small_corpus(), 300, tmp_path)
    before = old.path.read_bytes()
    result = _write_under_limit(len(before) // 2, "train", "-", tmp_path)
    assert result.returncode != 0 and "failed:" in result.stderr, result.stderr[-2000:]
    assert old.path.read_bytes() == before and load_tokenizer(tmp_path).sha256 == old.sha256
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.model"]  # no temporary file left


def test_messages_name_the_flag_not_a_function(tmp_path):
    import sentencepiece as spm

    with pytest.raises(DataError) as missing:
        load_tokenizer(tmp_path / "nope")
    lines = ["the quick brown fox jumps over the lazy dog"] * 50
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "plain"), vocab_size=31, minloglevel=2
    )
    with pytest.raises(DataError) as foreign:
        load_tokenizer(tmp_path / "plain.model")
    with pytest.raises(DataError) as too_big:
        train_tokenizer(lines, 2000, tmp_path / "big")  # more pieces than this text has
    for error in (missing, foreign, too_big):
        message = str(error.value)
        assert "--vocab-size" in message, message
        assert "train_tokenizer" not in message and "()" not in message, message
    assert "--vocab-size of at most" in str(too_big.value)
