"""The LM zoo's tasks: procedurally generated string problems sharing one prompt format.

Every example is ``<tag><input>=<output>`` in a character vocabulary defined here (no tokenizer
download): ``C`` copy, ``R`` reverse, ``S`` sort digits, ``A`` add a number below 100 and a digit,
``N`` count the ``a``s, ``P`` parity of the number of ``a``s, ``H`` shift letters by one (a->b, ..., j->a), ``B`` are the
brackets (``()`` and ``[]``) balanced. Splits are disjoint by construction: an input belongs to ``train``,
``validation`` or ``test`` by a hash of ``(task, input)``, so held-out prompts are never trained on.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
LETTERS = "abcdefghij"
SYMBOLS = "0123456789" + LETTERS + "()[]+="
TAGS = "CRSANPHB"
VOCAB: tuple[str, ...] = (PAD, BOS, EOS, *SYMBOLS, *TAGS)
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
SPLITS = ("train", "validation", "test")
MAX_LEN = 24  # longest example (BOS + tag + input + '=' + output + EOS) is well below this


@dataclass(frozen=True)
class LMTask:
    """One task: its tag, how to draw an input and how to answer it."""

    name: str
    tag: str
    draw: Callable[[random.Random], str]
    solve: Callable[[str], str]

    def example(self, text: str) -> tuple[str, str]:
        """(prompt, answer): the prompt ends with ``=``; the answer is followed by EOS."""
        return f"{self.tag}{text}=", self.solve(text)


def _chars(alphabet: str, low: int, high: int) -> Callable[[random.Random], str]:
    return lambda rng: "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _addends(rng: random.Random) -> str:
    return f"{rng.randint(0, 99)}+{rng.randint(0, 9)}"


def _add(text: str) -> str:
    left, right = text.split("+")
    return str(int(left) + int(right))


def _brackets(rng: random.Random) -> str:
    """Half balanced strings of ``()`` and ``[]``, half random ones (mostly unbalanced)."""
    pairs = rng.randint(1, 5)
    if rng.random() >= 0.5:
        return "".join(rng.choice("()[]") for _ in range(2 * pairs))
    out, stack, opened = [], [], 0
    while len(out) < 2 * pairs:
        if opened < pairs and (not stack or rng.random() < 0.5):
            char = rng.choice("([")
            out.append(char)
            stack.append(char)
            opened += 1
        else:
            out.append(")" if stack.pop() == "(" else "]")
    return "".join(out)


def _balanced(text: str) -> str:
    stack: list[str] = []
    for char in text:
        if char in "([":
            stack.append(char)
        elif not stack or stack.pop() != ("(" if char == ")" else "["):
            return "0"
    return "0" if stack else "1"


def _shift(text: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in text)


TASKS: dict[str, LMTask] = {
    task.name: task
    for task in (
        LMTask("copy", "C", _chars(LETTERS + "0123456789", 3, 6), lambda s: s),
        LMTask("reverse", "R", _chars(LETTERS, 3, 6), lambda s: s[::-1]),
        LMTask("sort", "S", _chars("0123456789", 3, 6), lambda s: "".join(sorted(s))),
        LMTask("add", "A", _addends, _add),
        LMTask("count", "N", _chars("ab", 3, 9), lambda s: str(s.count("a"))),
        LMTask("parity", "P", _chars("abc", 3, 6), lambda s: str(s.count("a") % 2)),
        LMTask("shift", "H", _chars(LETTERS, 3, 6), _shift),
        LMTask("brackets", "B", _brackets, _balanced),
    )
}
DEFAULT_TASKS = tuple(TASKS)


def get_task(name: str) -> LMTask:
    """The task called ``name``; an unknown name is an error listing the known ones."""
    if name not in TASKS:
        raise KeyError(f"unknown LM task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def split_of(task: str, text: str) -> str:
    """``test`` (1/8 of inputs), ``validation`` (1/8) or ``train``, by a hash of the input."""
    bucket = zlib.crc32(f"{task}:{text}".encode()) % 8
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def examples(
    task: str, split: str, *, n: int, seed: int, at_most: bool = False
) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, answer) pairs of ``task`` from ``split``, drawn with ``seed``.

    Raises if the split has fewer than ``n`` distinct inputs within a generous number of draws,
    unless ``at_most`` (then the ones found are returned: small tasks have few distinct inputs).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    spec = get_task(task)
    rng = random.Random(f"{seed}:{task}:{split}")
    seen: dict[str, None] = {}
    for _ in range(200 * n):
        if len(seen) == n:
            break
        text = spec.draw(rng)
        if split_of(task, text) == split:
            seen.setdefault(text)
    if len(seen) < n and not at_most:
        raise ValueError(
            f"task {task!r} split {split!r}: only {len(seen)} distinct inputs, {n} asked"
        )
    return [spec.example(text) for text in seen]


def encode(text: str) -> list[int]:
    """Token ids of a plain string (one character per token); an unknown character is an error."""
    try:
        return [TOKEN_ID[c] for c in text]
    except KeyError as exc:
        raise ValueError(
            f"character {exc.args[0]!r} of {text!r} is not in the LM zoo vocabulary"
        ) from None


def decode(ids: Sequence[int]) -> str:
    """The string of token ids up to the first EOS (special tokens dropped)."""
    out = []
    for i in ids:
        token = VOCAB[i]
        if token == EOS:
            break
        if token not in (PAD, BOS):
            out.append(token)
    return "".join(out)
