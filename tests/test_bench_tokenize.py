"""benchmarks/bench_tokenize.py: its quick run prints the table of both tokenizers on both stages and
the ratios last; its Qwen2 tokenizer is the one the tests' fixtures model, and its multi-turn
conversations are well formed."""

import re

from benchmarks import bench_tokenize
from data_pipeline.tokenizer import load_tokenizer
from tests import hf_fixtures


def test_quick_run_prints_the_table_and_the_ratios_last(shared_data, capsys):
    assert bench_tokenize.main(["--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if re.match(r"\| (pretrain|sft) \|", line)]
    expected = [[f"| {stage}", side] for stage in bench_tokenize.STAGES for side in bench_tokenize.SIDES]
    assert [row.split(" | ")[:2] for row in rows] == expected
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 8 and float(cells[2].replace(",", "")) > 0 and cells[6] == "0"  # nothing dropped
    assert re.fullmatch(
        r"hf_over_sp pretrain_docs_per_s=\d+\.\d\d pretrain_tokens_per_s=\d+\.\d\d "
        r"sft_conversations_per_s=\d+\.\d\d sft_tokens_per_s=\d+\.\d\d",
        lines[-1],
    )


def test_qwen2_side_is_the_fixtures_qwen2_layout(shared_data, tmp_path):
    # The benchmark keeps its own copies; they must stay the published ones the tests check against.
    assert bench_tokenize.QWEN25_TEMPLATE == hf_fixtures.QWEN25_TEMPLATE
    assert bench_tokenize.QWEN2_SPLIT == hf_fixtures.QWEN2_SPLIT
    docs = bench_tokenize.documents(2000, 8)
    folder = bench_tokenize.train_qwen2_style(docs, 600, tmp_path / "qwen2")
    tok = load_tokenizer(folder)
    assert tok.vocab_size == 600 and tok.bos_id is None
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert tok.decode(tok.encode_chat(chat).ids) == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    )


def test_conversations_mix_languages_and_join_exchanges_of_one_character(shared_data):
    chats = bench_tokenize.conversations(40)
    assert len(chats) == 40
    assert any(re.search(r"[\u4e00-\u9fff]", c[1]["content"]) for c in chats)  # Chinese rows are in
    assert {len(c) for c in chats} == {3, 5, 7}  # 1, 2 and 3 exchanges
    for chat in chats:
        assert chat[0]["role"] == "system"
        assert [m["role"] for m in chat[1:]] == ["user", "assistant"] * ((len(chat) - 1) // 2)
