"""The LM zoo's task generators, splits, tokenisation and the exact-match scorer (no training)."""

from __future__ import annotations

import pytest
import torch

from bench.lmzoo.model import IGNORE, batch, exact_match, generate, lm_config, new_model
from bench.lmzoo.tasks import (
    BOS,
    DEFAULT_TASKS,
    EOS,
    TASKS,
    TOKEN_ID,
    decode,
    encode,
    examples,
    get_task,
    split_of,
)


@pytest.mark.parametrize(
    ("task", "text", "answer"),
    [
        ("copy", "ab3", "ab3"),
        ("reverse", "abc", "cba"),
        ("sort", "5313", "1335"),
        ("add", "57+8", "65"),
        ("count", "abaa", "3"),
        ("parity", "abca", "0"),
        ("shift", "aij", "bja"),
        ("brackets", "([])", "1"),
        ("brackets", "([)]", "0"),
        ("brackets", "(()", "0"),
    ],
)
def test_tasks_answer(task: str, text: str, answer: str) -> None:
    prompt, got = get_task(task).example(text)
    assert prompt == f"{TASKS[task].tag}{text}=" and got == answer


def test_eight_tasks_with_distinct_tags() -> None:
    assert len(DEFAULT_TASKS) == 8
    assert len({t.tag for t in TASKS.values()}) == 8


def test_splits_are_disjoint_and_seeded() -> None:
    for task in DEFAULT_TASKS:
        test = examples(task, "test", n=112, seed=0)
        val = examples(task, "validation", n=64, seed=0)
        train = examples(task, "train", n=300, seed=0)
        assert len(set(test)) == 112 and not set(test) & set(train) and not set(val) & set(test)
        assert all(split_of(task, p[1:-1]) == "test" for p, _ in test)
        assert examples(task, "test", n=112, seed=0) == test  # deterministic
    assert examples("copy", "train", n=50, seed=1) != examples("copy", "train", n=50, seed=0)
    with pytest.raises(ValueError, match="distinct inputs"):
        examples("count", "test", n=10_000, seed=0)
    with pytest.raises(KeyError, match="known tasks"):
        get_task("nope")


def test_encode_decode_and_batch_labels() -> None:
    assert decode(encode("R(ab)=")) == "R(ab)="
    with pytest.raises(ValueError, match="not in the LM zoo vocabulary"):
        encode("Z")
    data = batch([("Rab=", "ba"), ("Cabcd=", "abcd")])
    assert data.input_ids.shape == (2, 12) and int(data.attention_mask[0].sum()) == 8
    labelled = (data.labels != IGNORE).sum(dim=1).tolist()
    assert labelled == [3, 5]  # answer + EOS only


def test_teacher_forced_argmax_is_greedy_decoding() -> None:
    """``exact_match`` relies on it: the argmax next token given the generated prefix is the
    token ``model.generate`` (greedy) produced, at every step."""
    model = new_model(lm_config(hidden=32, heads=2), seed=3)
    for prompt, _ in examples("copy", "test", n=4, seed=0):
        ids = [TOKEN_ID[BOS], *encode(prompt)]
        out = model.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=TOKEN_ID[EOS],
        )[0, len(ids):]  # fmt: skip
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out.tolist()])).logits[0]
        predicted = logits[len(ids) - 1 : len(ids) - 1 + len(out)].argmax(-1)
        assert torch.equal(predicted, out)


def test_exact_match_needs_every_token_and_the_stop() -> None:
    model = new_model(lm_config(hidden=32, heads=2), seed=3)
    data = batch([("Cab=", "ab")])
    logits_answer = exact_match(model, data)
    assert logits_answer.shape == (1,) and float(logits_answer[0]) in (0.0, 1.0)
    assert generate(model, ["Cab="], max_new_tokens=3)[0] is not None
