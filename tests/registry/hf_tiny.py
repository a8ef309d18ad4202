"""A tiny Llama with a tokenizer built in code, and a real ``transformers.Trainer`` run that saves
``checkpoint-N`` folders (weights, config, tokenizer, optimizer.pt, scheduler, RNG state): the
folders the registry's folder upload, pull and Hub API tests use. Offline, a few seconds."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far"]
TEXTS = ["the cat sat on a mat", "the dog ran far", "a cat ran on the mat", "the dog sat"]


def tiny_config(*, tie: bool = False):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def tiny_tokenizer():  # type: ignore[no-untyped-def]
    """A word-level fast tokenizer over ``VOCAB`` (built with ``tokenizers``, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )


def save_tiny_model(folder: Path, *, seed: int = 0) -> Path:
    """A loadable model folder: model.safetensors, config.json, generation_config.json, tokenizer."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config())
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


REFERENCE_MOMENTS = "reference_second_moment.safetensors"


def train_tiny(folder: Path, *, steps: int = 2, seed: int = 0) -> Path:
    """Train the tiny model ``steps`` AdamW steps with ``transformers.Trainer``, saving at the
    last; returns the ``checkpoint-<steps>`` folder. The live optimizer's ``exp_avg_sq`` by
    parameter (matched by identity, not by index) is saved beside it as ``REFERENCE_MOMENTS``."""
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from registry.client.capture import capture_second_moments

    if (folder / REFERENCE_MOMENTS).is_file():  # trained earlier in this test session
        return folder / f"checkpoint-{steps}"

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    model = LlamaForCausalLM(tiny_config(tie=True))  # tied: lm_head is embed_tokens
    rows = [tokenizer(t, padding="max_length", max_length=8) for t in TEXTS]
    data = [{**r, "labels": list(r["input_ids"])} for r in rows]
    args = TrainingArguments(
        output_dir=str(folder),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        save_steps=steps,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    assert trainer.optimizer is not None
    capture_second_moments(model, trainer.optimizer, folder / REFERENCE_MOMENTS)
    return folder / f"checkpoint-{steps}"


def save_tiny_adapter(folder: Path, base: Path, *, seed: int = 1) -> Path:
    """A PEFT LoRA adapter of the model in ``base`` (random B so it changes the outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
