"""launch/prepare_data.py as a user runs it: real files in, shards + manifest + tokenizer out."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.shards import MANIFEST_NAME, load_manifest
from data_pipeline.sp_tokenizer import SAVED_FILES
from data_pipeline.stream import PackedStream
from data_pipeline.tokenizer import load_tokenizer
from model.loss import IGNORE_INDEX
from tests.conftest import ROOT

SCRIPT = str(ROOT / "launch" / "prepare_data.py")


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def pretrain_dir(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    result = prepare(
        "pretrain", "--input", str(shared_data / "pretrain" / "journey_to_the_west.txt"),
        str(shared_data / "pretrain" / "tinyshakespeare.txt"),
        "--split", r"^(第.+回|[A-Z][A-Za-z ]+:$)", "--vocab-size", "2000", "--out", str(out), "--shard-mb", "0.25",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_pretrain_shards_manifest_and_report(pretrain_dir):
    out, stdout = pretrain_dir
    manifest = load_manifest(out)
    assert manifest["kind"] == "pretrain" and manifest["format_version"] == 1
    assert len(manifest["shards"]) > 1  # 0.25 MiB target on ~1M tokens
    # Every record is accounted for: read = kept + dropped.
    assert manifest["input_records"] == manifest["kept_records"] + sum(manifest["dropped"].values())
    assert manifest["kept_records"] == sum(s["samples"] for s in manifest["shards"]) > 100
    assert "read" in stdout and "kept" in stdout and "manifest.json" in stdout
    tok = load_tokenizer(out / "tokenizer")
    assert tok.sha256 == manifest["tokenizer_sha256"]
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()
    # The shards stream back; the packed labels are the next tokens of each document.
    stream = PackedStream(out, seq_len=128, batch_size=2, tokenizer_sha256=tok.sha256)
    batch = next(stream)
    tokens, labels, doc_ids = batch["tokens"][0], batch["labels"][0], batch["doc_ids"][0]
    same_doc = doc_ids[1:] == doc_ids[:-1]
    np.testing.assert_array_equal(labels[:-1][same_doc], tokens[1:][same_doc])
    assert "<p>" not in tok.decode(tokens.tolist())


def test_sft_rolebench_with_the_pretraining_tokenizer(pretrain_dir, shared_data, tmp_path):
    out, _ = pretrain_dir
    result = prepare(
        "sft", "--format", "rolebench", "--input", str(shared_data / "sft" / "rolebench_zh_train.jsonl"),
        "--tokenizer", str(out / "tokenizer"), "--out", str(tmp_path), "--max-len", "256",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["kind"] == "sft"
    assert manifest["tokenizer_sha256"] == load_tokenizer(out / "tokenizer").sha256
    assert manifest["input_records"] == manifest["kept_records"] + sum(manifest["dropped"].values())
    stream = PackedStream(tmp_path, seq_len=256, batch_size=4)
    batch = next(stream)
    # SFT: only assistant tokens are targets, so a good share of positions carry no loss.
    masked = (batch["labels"] == IGNORE_INDEX).mean()
    assert 0.1 < masked < 0.9


def test_invalid_json_line_is_one_clear_error(tmp_path):
    bad = tmp_path / "chats.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    from data_pipeline.sp_tokenizer import train_tokenizer

    train_tokenizer(["hello there, general kenobi"] * 50, 300, tok_dir)
    result = prepare(
        "sft", "--format", "messages", "--input", str(bad), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("prepare_data: error:")]
    assert len(error_lines) == 1 and f"{bad}:2" in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_nothing_kept_is_one_clear_error_with_the_drop_table(tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": f"tiny {i}"}) + "\n" for i in range(3)), encoding="utf-8")
    out = tmp_path / "o"
    result = prepare("pretrain", "--input", str(short), "--vocab-size", "300", "--out", str(out))
    assert result.returncode == 1, result.stdout[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("prepare_data: error:")]
    assert len(error_lines) == 1 and "no record was kept" in error_lines[0], result.stderr[-2000:]
    assert re.search(rf"dropped: too_short +3 +{re.escape(str(short))}:1", result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (out / "manifest.json").exists()


def test_write_outputs_refuses_to_write_an_empty_dataset(tmp_path):
    from data_pipeline.prepare import PrepareOptions, write_outputs
    from data_pipeline.records import DataError, DropReport
    from data_pipeline.sp_tokenizer import train_tokenizer

    tok = train_tokenizer(["hello there, general kenobi"] * 50, 300, tmp_path / "tok")
    report = DropReport(input_records=2)
    report.drop("too_long", "chats.jsonl:1")
    report.drop("too_long", "chats.jsonl:2")
    opts = PrepareOptions(kind="sft", inputs=["chats.jsonl"], out=str(tmp_path / "o"))
    with pytest.raises(DataError, match=r"(?s)no record was kept.*dropped: too_long +2 +chats.jsonl:1"):
        write_outputs(iter([]), tok, opts, report)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_bad_arguments_exit_nonzero_with_one_line(tmp_path):
    result = prepare(
        "pretrain", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path), "--vocab-size", "100"
    )
    assert result.returncode == 2 and "missing.txt: no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr
    result = prepare("pretrain", "--input", SCRIPT, "--out", str(tmp_path))
    assert result.returncode == 2 and "--tokenizer DIR or --vocab-size N" in result.stderr
    assert "usage:" in prepare("--help").stdout


def test_wrong_values_are_usage_errors_before_ray_starts(tmp_path, capsys):
    """Values that used to fail inside a Ray worker (a traceback) or after the whole import
    (exit 1) are one usage line naming the flag, exit 2, before any work."""
    from launch.prepare_data import parse_args

    text = tmp_path / "a.txt"
    text.write_text("a document long enough to keep\n", encoding="utf-8")
    not_a_model = tmp_path / "fake.model"
    not_a_model.write_text("not a sentencepiece model", encoding="utf-8")
    used = tmp_path / "used"
    used.mkdir()
    (used / "shard-000003.tar").write_bytes(b"")  # left by an earlier run with more shards
    base = ["pretrain", "--input", str(text), "--out", str(tmp_path / "o")]
    cases = {
        "--near-dup-threshold": [*base, "--vocab-size", "300", "--near-dup-threshold", "1.5"],
        "--shard-mb": [*base, "--vocab-size", "300", "--shard-mb", "0"],
        "--min-chars": [*base, "--vocab-size", "300", "--min-chars", "0"],
        "--max-chars": [*base, "--vocab-size", "300", "--max-chars", "5"],
        "--vocab-size": [*base, "--vocab-size", "5"],
        f"--tokenizer {not_a_model}": [*base, "--tokenizer", str(not_a_model)],
        f"--tokenizer {tmp_path}": [*base, "--tokenizer", str(tmp_path)],  # a folder without tokenizer.model
        f"--out {used}": ["pretrain", "--input", str(text), "--out", str(used), "--vocab-size", "300"],
        f"--out {text} is a file": ["pretrain", "--input", str(text), "--out", str(text), "--vocab-size", "300"],
    }
    for flag, argv in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, flag
        assert f"error: {flag}" in err and "Traceback" not in err, (flag, err)
    assert parse_args(["pretrain", "--input", str(text), "--out", str(used), "--vocab-size", "300", "--overwrite"])


def test_an_hf_tokenizer_without_a_usable_chat_template_is_refused_before_ray_starts(tmp_path, capsys):
    """sft with a Hugging Face tokenizer that has no chat template (or one whose masks cannot be
    derived) is one usage line naming --tokenizer and the advice, before any work; --chat-template
    supplies the template. A chat template with Crucible's own tokenizer is a usage error too."""
    from launch.prepare_data import parse_args
    from tests.hf_fixtures import QWEN25_TEMPLATE, qwen2_tokenizer

    bare = qwen2_tokenizer(tmp_path / "bare", template=None)
    drops_answers = tmp_path / "drops.jinja"  # renders assistant turns without their content
    drops_answers.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role != 'assistant' %}"
        "{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    )
    template = tmp_path / "qwen.jinja"
    template.write_text(QWEN25_TEMPLATE)
    chats = tmp_path / "c.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    base = [
        "sft",
        "--format",
        "messages",
        "--input",
        str(chats),
        "--out",
        str(tmp_path / "o"),
        "--tokenizer",
        str(bare),
    ]
    for extra, expected in (
        ([], "has no chat_template: prepare the data with --chat-template"),
        (["--chat-template", str(drops_answers)], f"--chat-template {drops_answers}: cannot derive"),
    ):
        with pytest.raises(SystemExit):
            parse_args([*base, *extra])
        err = capsys.readouterr().err
        assert f"error: --tokenizer {bare}" in err and expected in err and "Traceback" not in err, err
    assert parse_args([*base, "--chat-template", str(template)]).chat_template == str(template)


def test_sft_same_turns_under_another_card_are_kept_copies_across_files_are_not(tmp_path):
    from data_pipeline.sp_tokenizer import train_tokenizer

    train_tokenizer(["Who are you? I am the Great Sage, Equal of Heaven."] * 50, 300, tmp_path / "tok")

    def chat(card: str) -> str:
        turns = [("user", "Who are you?"), ("assistant", "I am the Great Sage, Equal of Heaven.")]
        messages = [{"role": "system", "content": card}] + [{"role": r, "content": c} for r, c in turns]
        return json.dumps({"messages": messages}) + "\n"

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(chat("You are Sun Wukong.") + chat("You are Zhang Fei."), encoding="utf-8")
    second.write_text(chat("You are Sun Wukong."), encoding="utf-8")  # a copy of a.jsonl:1
    out = tmp_path / "o"
    result = prepare(
        "sft", "--format", "messages", "--input", str(first), str(second),
        "--tokenizer", str(tmp_path / "tok"), "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = load_manifest(out)
    assert manifest["input_records"] == 3 and manifest["dropped"] == {"exact_duplicate": 1}
    assert manifest["kept_records"] == sum(s["samples"] for s in manifest["shards"]) == 2
    assert re.search(rf"dropped: exact_duplicate +1 +{re.escape(str(second))}:1", result.stdout), result.stdout


# --- --overwrite: nothing destroyed before its replacement exists (issue 17) ---------------


def _docs(tag: str, n: int = 60) -> list[str]:
    return [f"{tag} document number {i}: {' '.join(f'{tag}{i * j % 97}' for j in range(12))}" for i in range(n)]


def _earlier_dataset(out):
    """A dataset as prepare_data leaves it (several shards, manifest, tokenizer/), made without Ray."""
    from data_pipeline.chat import encode_document
    from data_pipeline.prepare import PrepareOptions, write_outputs
    from data_pipeline.records import DropReport
    from data_pipeline.sp_tokenizer import train_tokenizer

    texts = _docs("old")
    tok = train_tokenizer(texts, 300, out.parent / "old_tok")
    opts = PrepareOptions("pretrain", ["old.txt"], str(out), shard_bytes=2048)
    result = write_outputs((encode_document(t, tok) for t in texts), tok, opts, DropReport(input_records=len(texts)))
    assert len(result.shards) > 2
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _new_input(tmp_path, bad_line: bool = False):
    path = tmp_path / "new.jsonl"
    lines = [json.dumps({"text": t}) for t in _docs("new", 40)]
    if bad_line:
        lines.insert(20, "{oops")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_overwrite_that_fails_on_a_bad_record_leaves_the_earlier_dataset(tmp_path):
    out = tmp_path / "o"
    before = _earlier_dataset(out)
    bad = _new_input(tmp_path, bad_line=True)
    result = prepare("pretrain", "--input", str(bad), "--vocab-size", "300", "--out", str(out), "--overwrite")
    assert result.returncode == 1, result.stderr[-2000:]
    assert _files(out) == before  # manifest, every shard and tokenizer/ byte-identical
    assert f"{bad}:21" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"nothing in --out {out} was changed" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.jsonl", "o", "old_tok"]  # no temporary folder


# Crash the job after its tokenizer and shards are written, before the manifest: a fault mid-job.
_CRASH_BEFORE_MANIFEST = """
import sys
import data_pipeline.prepare
def crash(*args, **kwargs):
    raise RuntimeError("simulated crash after the shards were written")
data_pipeline.prepare.write_manifest = crash
from launch.prepare_data import main
sys.exit(main(sys.argv[1:]))
"""


def test_overwrite_that_crashes_mid_job_leaves_the_earlier_dataset(tmp_path):
    out = tmp_path / "o"
    before = _earlier_dataset(out)
    args = ["pretrain", "--input", str(_new_input(tmp_path)), "--vocab-size", "300", "--out", str(out), "--overwrite"]
    result = subprocess.run(
        [sys.executable, "-c", _CRASH_BEFORE_MANIFEST, *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode != 0 and "simulated crash" in result.stderr, result.stderr[-3000:]
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.jsonl", "o", "old_tok"]


def test_overwrite_replaces_only_what_the_earlier_manifest_lists(tmp_path):
    out = tmp_path / "o"
    before = _earlier_dataset(out)
    mine = {"mine.tar": b"a user's own archive, not Crucible's", "notes.txt": b"my notes\n"}
    mine["tokenizer/README.md"] = b"which tokenizer this is\n"
    for name, data in mine.items():
        (out / name).write_bytes(data)
    result = prepare(
        "pretrain", "--input", str(_new_input(tmp_path)), "--vocab-size", "300", "--out", str(out), "--overwrite"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = load_manifest(out)
    assert manifest["kept_records"] == 40 and len(manifest["shards"]) == 1
    tok = load_tokenizer(out / "tokenizer")
    assert tok.sha256 == manifest["tokenizer_sha256"]
    after = _files(out)
    for name, data in mine.items():
        assert after[name] == data, name  # the user's files are kept where they were
    new_files = {MANIFEST_NAME} | {s["path"] for s in manifest["shards"]} | {f"tokenizer/{n}" for n in SAVED_FILES}
    assert set(after) == new_files | set(mine)  # the earlier shards past the new ones are gone
    assert after["tokenizer/tokenizer.model"] != before["tokenizer/tokenizer.model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.jsonl", "o", "old_tok"]  # nothing set aside


def test_a_swapped_in_out_keeps_its_permissions(tmp_path):
    from data_pipeline.prepare import build_beside, swap_in

    umask = os.umask(0o022)
    try:
        for out, mode in ((tmp_path / "existing", 0o750), (tmp_path / "new", None)):
            if mode is not None:
                out.mkdir(mode=mode)
                out.chmod(mode)
            with build_beside(out) as build:
                (build / "manifest.json").write_text("{}")
                swap_in(build, out)
            assert out.stat().st_mode & 0o777 == (mode or 0o755), out  # not mkdtemp's 0700
    finally:
        os.umask(umask)


def test_swap_in_keeps_unlisted_files_whose_names_the_new_dataset_uses(tmp_path):
    """Shards without a manifest (an unfinished run's) are not the earlier dataset's: not deleted,
    and since the new dataset uses their names, kept in a folder beside --out."""
    from data_pipeline.prepare import build_beside, swap_in

    out = tmp_path / "o"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"stale")
    (out / "notes.txt").write_bytes(b"mine")
    with build_beside(out) as build:
        assert build.parent == tmp_path and build.name.startswith(".o.tmp-")
        (build / "shard-000000.tar").write_bytes(b"new")
        (build / MANIFEST_NAME).write_text("{}")
        kept = swap_in(build, out)
    assert _files(out) == {MANIFEST_NAME: b"{}", "notes.txt": b"mine", "shard-000000.tar": b"new"}
    assert kept is not None and kept.name.startswith("o.previous-") and _files(kept) == {"shard-000000.tar": b"stale"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", kept.name]


def test_build_beside_removes_its_folder_when_the_job_fails(tmp_path):
    from data_pipeline.prepare import build_beside

    out = tmp_path / "o"
    before = _earlier_dataset(out)
    with pytest.raises(RuntimeError, match="mid-job"), build_beside(out) as build:
        (build / "shard-000000.tar").write_bytes(b"half")
        raise RuntimeError("mid-job")
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "old_tok"]


def test_chats_an_hf_template_cannot_take_are_named_or_counted_never_trained_wrong(tmp_path):
    """With a Hugging Face template: a chat quoting a special token is dropped by its own reason
    (the template would read it as a control token); a chat the template refuses (Mistral's:
    two user turns in a row) names its record under on_error=raise and is counted under skip."""
    from data_pipeline.prepare import ERROR, PrepareOptions, encode_rows
    from tests.hf_fixtures import MISTRAL_TEMPLATE, mistral_tokenizer

    folder = mistral_tokenizer(tmp_path / "mistral", template=MISTRAL_TEMPLATE)
    chats = [
        [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A guard."}],
        [{"role": "user", "content": "Say </s> now"}, {"role": "assistant", "content": "</s>"}],
        [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo"}],
    ]
    batch = {
        "source": np.array(["c.jsonl:1", "c.jsonl:2", "c.jsonl:3"]),
        "payload": np.array([json.dumps(c) for c in chats]),
    }
    for on_error, third in (("raise", ERROR), ("skip", "chat_template_error")):
        opts = PrepareOptions(kind="sft", inputs=[], out=str(tmp_path / "o"), on_error=on_error)
        rows = encode_rows(batch, str(folder), opts)
        assert list(rows["drop"]) == ["", "control_token_in_text", third]
        assert len(rows["input_ids"][0]) > 0
        if on_error == "raise":  # the driver raises this note: the record and the template named
            assert rows["note"][2].startswith("c.jsonl:3: ") and "cannot render" in rows["note"][2]
