"""Prompt sets for RL: rows read with their info and refused with path:line, and the stream's
dealing: seeded, the same prompts per optimizer step on any layout of equal global batch, exact
resume, reshuffled epochs."""

import json
from itertools import islice

import pytest

from data_pipeline.prompts import PromptItem, PromptStream, read_prompts
from data_pipeline.records import DataError

CARD = {"role": "system", "content": "You are Halka, a goblin."}


def _row(i: int, **extra) -> dict:
    return {"messages": [CARD, {"role": "user", "content": f"Question {i}?"}], "expected": f"fact {i}", **extra}


def _write(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def _items(n: int) -> list[PromptItem]:
    return [PromptItem(messages=_row(i)["messages"], info={"expected": f"fact {i}"}, source=f"p:{i}") for i in range(n)]


# --- read_prompts -----------------------------------------------------------------------------


def test_rows_become_items_with_their_info_and_source(tmp_path):
    multi = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Who are you?"},
        ],
        "character": "Halka",
    }
    _write(tmp_path / "a.jsonl", [_row(0, conflicts=["x"]), "", multi])
    items = read_prompts(tmp_path / "a.jsonl")
    assert [i.source for i in items] == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'a.jsonl'}:3"]
    assert items[0].messages == _row(0)["messages"]
    assert items[0].info == {"expected": "fact 0", "conflicts": ["x"]}
    assert items[1].info == {"character": "Halka"} and items[1].messages == multi["messages"]
    assert (items[0].epoch, items[0].index) == (-1, -1)


def test_a_folder_is_read_file_by_file_in_sorted_order(tmp_path):
    _write(tmp_path / "b.jsonl", [_row(1)])
    _write(tmp_path / "a.jsonl", [_row(0)])
    assert [i.info["expected"] for i in read_prompts(tmp_path)] == ["fact 0", "fact 1"]


@pytest.mark.parametrize(
    "row, reason",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"prompt": "hi"}, "no 'messages' field"),
        ({"messages": "hi"}, "not a list"),
        ({"messages": []}, "empty"),
        ({"messages": [CARD]}, "end with the user turn"),
        ({"messages": [CARD, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "end with"),
        ({"messages": [{"role": "bot", "content": "q"}]}, "role 'bot' is not one of"),
        ({"messages": [{"role": "user", "content": 3}]}, "content must be a non-blank string"),
        ({"messages": [{"role": "user", "content": "  "}]}, "content must be a non-blank string"),
        ({"messages": [{"role": "user", "content": "q"}, CARD]}, "system message may only come first"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "expected a user"),
        ({"messages": [{"role": "user", "content": "\ud83d"}]}, "lone surrogate"),
    ],
)
def test_bad_rows_are_named_by_path_and_line(tmp_path, row, reason):
    _write(tmp_path / "p.jsonl", [_row(0), row])
    with pytest.raises(DataError, match=rf"p\.jsonl:2: .*{reason}"):
        read_prompts(tmp_path / "p.jsonl")


def test_bytes_that_are_not_utf8_are_named(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(json.dumps(_row(0)).encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: not UTF-8 \(byte 0xFF\)"):
        read_prompts(tmp_path / "p.jsonl")


def test_an_empty_set_is_refused(tmp_path):
    _write(tmp_path / "p.jsonl", [""])
    with pytest.raises(DataError, match="no prompt rows"):
        read_prompts(tmp_path / "p.jsonl")


# --- PromptStream ------------------------------------------------------------------------------


def _step_prompts(items, *, world: int, per_batch: int, accum: int, steps: int, seed: int = 3) -> list[list]:
    """Each optimizer step's (epoch, index, source) over all ranks and micro-batches, sorted."""
    streams = [
        PromptStream(items, prompts_per_batch=per_batch, rank=r, world_size=world, seed=seed) for r in range(world)
    ]
    return [
        sorted((p.epoch, p.index, p.source) for s in streams for batch in islice(s, accum) for p in batch)
        for _ in range(steps)
    ]


@pytest.mark.parametrize("world, per_batch, accum", [(2, 2, 2), (2, 1, 4), (4, 1, 2), (1, 8, 1), (4, 2, 1)])
def test_layouts_of_equal_global_batch_see_the_same_prompts_each_step(world, per_batch, accum):
    items = _items(11)  # 11 prompts, 8 a step: steps run across epoch ends
    reference = _step_prompts(items, world=1, per_batch=4, accum=2, steps=7)
    assert _step_prompts(items, world=world, per_batch=per_batch, accum=accum, steps=7) == reference
    # consecutive positions: step s holds the s-th eight of the concatenated epochs
    positions = [[e * 11 + i for e, i, _ in step] for step in reference]
    assert positions == [list(range(8 * s, 8 * s + 8)) for s in range(7)]


def test_every_epoch_is_a_seeded_permutation_and_epochs_reshuffle():
    items = _items(12)
    stream = PromptStream(items, prompts_per_batch=3, rank=0, world_size=1, seed=5)
    epochs = [[p.source for b in islice(stream, 4) for p in b] for _ in range(3)]
    assert all(sorted(e) == sorted(i.source for i in items) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    again = PromptStream(items, prompts_per_batch=3, rank=0, world_size=1, seed=5)
    assert [[p.source for b in islice(again, 4) for p in b] for _ in range(3)] == epochs
    other = PromptStream(items, prompts_per_batch=3, rank=0, world_size=1, seed=6)
    assert [p.source for b in islice(other, 4) for p in b] != epochs[0]


def test_items_carry_epoch_and_index_and_ranks_get_disjoint_prompts():
    items = _items(6)
    a, b = (PromptStream(items, prompts_per_batch=2, rank=r, world_size=2, seed=0) for r in (0, 1))
    dealt = [p for s in (a, b) for batch in islice(s, 3) for p in batch]
    assert sorted((p.epoch, p.index) for p in dealt) == [(e, i) for e in range(2) for i in range(6)]
    assert items[0].epoch == -1  # the read items stay as read
    dealt[0].info["finished"] = True  # as the RL loop adds its keys
    assert all("finished" not in i.info for i in items)


def test_resume_mid_epoch_gives_the_same_following_batches():
    items = _items(10)
    whole = PromptStream(items, prompts_per_batch=2, rank=1, world_size=2, seed=9)
    list(islice(whole, 3))  # 12 prompts dealt: into the second epoch
    state = whole.state_dict()
    assert state == {"position": 12, "seed": 9, "n_items": 10, "items_digest": state["items_digest"]}
    assert all(isinstance(v, int) for v in state.values()) and whole.epoch == 1
    resumed = PromptStream(items, prompts_per_batch=2, rank=1, world_size=2, seed=9)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert list(islice(resumed, 5)) == list(islice(whole, 5))


def test_resume_on_another_layout_of_whole_rounds_continues_the_same_order():
    items = _items(10)
    one = PromptStream(items, prompts_per_batch=4, rank=0, world_size=1, seed=2)
    list(islice(one, 2))
    two = [PromptStream(items, prompts_per_batch=2, rank=r, world_size=2, seed=2) for r in (0, 1)]
    for s in two:
        s.load_state_dict(one.state_dict())
    assert sorted(p.source for p in next(one)) == sorted(p.source for s in two for p in next(s))


def test_resume_refuses_another_seed_set_or_a_partial_round():
    items = _items(10)
    state = PromptStream(items, prompts_per_batch=2, rank=0, world_size=1, seed=1).state_dict()
    with pytest.raises(DataError, match=r"seed=1 \(now 2\)"):
        PromptStream(items, prompts_per_batch=2, rank=0, world_size=1, seed=2).load_state_dict(state)
    edited = _items(10)
    edited[3].info["expected"] = "another fact"
    with pytest.raises(DataError, match="items_digest"):
        PromptStream(edited, prompts_per_batch=2, rank=0, world_size=1, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="not a multiple of world_size × prompts_per_batch = 4"):
        PromptStream(items, prompts_per_batch=4, rank=0, world_size=1, seed=1).load_state_dict({**state, "position": 2})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompts_per_batch": 0, "rank": 0, "world_size": 1}, "prompts_per_batch must be at least 1"),
        ({"prompts_per_batch": 1, "rank": 2, "world_size": 2}, r"rank must be in \[0, world_size\)"),
    ],
)
def test_bad_layouts_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptStream(_items(3), seed=0, **kwargs)
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptStream([], prompts_per_batch=1, rank=0, world_size=1, seed=0)
