"""The LM zoo's model: a small Llama-style causal LM built from a config in code (no hub).

``lm_config()`` is the one architecture every zoo model shares (tied input/output embeddings,
so ``save_pretrained`` stores ``model.embed_tokens.weight`` and no ``lm_head.weight``).
``batch`` turns (prompt, answer) pairs into padded tensors whose labels cover only the answer
and its EOS; ``exact_match`` scores greedy decoding with ONE teacher-forced pass: greedy
decoding yields the answer (then EOS) exactly when, at every answer position, the argmax next
token given the true prefix is the true token — the same test without a decoding loop.
``generate`` is the decoding loop itself (``model.generate``, greedy), for checks and demos.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from bench.lmzoo.tasks import BOS, EOS, MAX_LEN, PAD, TOKEN_ID, VOCAB, decode, encode

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

IGNORE = -100


def lm_config(*, hidden: int = 128, layers: int = 2, heads: int = 4) -> LlamaConfig:
    """The zoo's architecture: Llama blocks, character vocabulary, tied embeddings."""
    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=MAX_LEN,
        tie_word_embeddings=True,
        pad_token_id=TOKEN_ID[PAD],
        bos_token_id=TOKEN_ID[BOS],
        eos_token_id=TOKEN_ID[EOS],
        rms_norm_eps=1e-5,
    )


def new_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model (deterministic for a seed)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids, attention mask, answer labels and where each answer starts."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def batch(pairs: Sequence[tuple[str, str]]) -> Batch:
    """``<s> prompt answer </s>`` per pair, padded; labels are IGNORE outside answer + EOS."""
    rows, labels = [], []
    for prompt, answer in pairs:
        head = [TOKEN_ID[BOS], *encode(prompt)]
        tail = [*encode(answer), TOKEN_ID[EOS]]
        rows.append(head + tail)
        labels.append([IGNORE] * len(head) + tail)
    width = max(len(r) for r in rows)
    if width > MAX_LEN:
        raise ValueError(f"an example is {width} tokens long; the zoo's models take {MAX_LEN}")
    ids = torch.full((len(rows), width), TOKEN_ID[PAD], dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        target[i, : len(label)] = torch.tensor(label)
    return Batch(ids, mask, target)


def answer_loss(model: torch.nn.Module, data: Batch) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (and their EOS)."""
    logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), data.labels[:, 1:].flatten(), ignore_index=IGNORE
    )


@torch.no_grad()
def exact_match(model: torch.nn.Module, data: Batch) -> torch.Tensor:
    """Per example, 1.0 when greedy decoding reproduces the answer and stops (see module doc)."""
    logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    predicted = logits[:, :-1].argmax(-1)
    target = data.labels[:, 1:]
    wrong = (predicted != target) & (target != IGNORE)
    return (~wrong.any(dim=1)).float()


@torch.no_grad()
def generate(
    model: LlamaForCausalLM, prompts: Sequence[str], *, max_new_tokens: int = 12
) -> list[str]:
    """Greedy decoding of each prompt (one at a time: no padding questions); returns the answers."""
    answers = []
    for prompt in prompts:
        ids = torch.tensor([[TOKEN_ID[BOS], *encode(prompt)]])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=TOKEN_ID[PAD],
            eos_token_id=TOKEN_ID[EOS],
        )
        answers.append(decode(out[0, ids.shape[1] :].tolist()))
    return answers


def load_weights(model: LlamaForCausalLM, state: Mapping[str, torch.Tensor]) -> LlamaForCausalLM:
    """Put ``state`` (saved keys: no ``lm_head.weight`` when tied) into ``model``; a missing or
    unexpected key other than the tied head is an error naming it."""
    params = {k: v.detach().to(torch.float32) for k, v in state.items()}
    result = model.load_state_dict(params, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise KeyError(
            f"state dict does not fit the LM zoo model: missing {missing}, "
            f"unexpected {list(result.unexpected_keys)}"
        )
    model.tie_weights()
    return model
