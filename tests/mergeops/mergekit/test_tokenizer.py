"""Tokenizer settings against mergekit 0.1.5: output vocabulary, permuted embed_tokens/lm_head,
missing-token fill, pad_to_multiple_of and chat_template, on tiny Llamas with different
tokenizers (base; chat = base + 3 added tokens; other = 3 words dropped, 2 new)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mergekit  # noqa: F401 - the oracle (dev extra); a missing one is an error, not a skip
import pytest
import torch
from safetensors.torch import load_file

from mergeops.mergekit.chat_templates import BUNDLED, resolve_chat_template
from mergeops.mergekit.tokenizer import TokenizerSettings, VocabPlan, plan_vocabulary, remap_rows
from tests.mergeops.mergekit.tiny_vocab_models import build_zoo

VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
WEIGHTS = {"base": 1.0, "chat": 0.5, "other": 0.3}


@pytest.fixture(scope="module")
def zoos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """The three models per dtype name, built on first use."""
    built: dict[str, dict[str, Path]] = {}

    class Lazy(dict):
        def __missing__(self, dtype: str) -> dict[str, Path]:
            folder = tmp_path_factory.mktemp(f"vocab-zoo-{dtype}")
            self[dtype] = build_zoo(folder, dtype=getattr(torch, dtype))
            return self[dtype]

    return Lazy(built)


@pytest.fixture(scope="module")
def zoo(zoos) -> dict[str, Path]:
    return zoos["float32"]


def _config(zoo: dict[str, Path], base: str | None = "base", **extra: Any) -> dict[str, Any]:
    models = [{"model": str(zoo[n]), "parameters": {"weight": w}} for n, w in WEIGHTS.items()]
    config: dict[str, Any] = {"merge_method": "linear", "models": models, "dtype": "float32"}
    if base:
        config["base_model"] = str(zoo[base])
    return {**config, **extra}


def _run_mergekit(config: dict[str, Any], out: Path) -> tuple[dict[str, torch.Tensor], Any]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoTokenizer

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True))
    return load_file(str(out / "model.safetensors")), AutoTokenizer.from_pretrained(str(out))


def _run_ours(config: dict[str, Any], zoo: dict[str, Path], out: Path):
    """plan_vocabulary + remap_rows + mergekit's linear formula on the vocabulary tensors."""
    dirs = {str(zoo[n]): zoo[n] for n in WEIGHTS}
    plan = plan_vocabulary(
        TokenizerSettings.from_mergekit(config), dirs, config.get("base_model"), out
    )
    assert plan is not None
    merged = {}
    for key in VOCAB_KEYS:
        inputs = {
            name: load_file(str(path / "model.safetensors"))[key] for name, path in dirs.items()
        }
        rows = remap_rows(inputs, plan)
        weights = torch.tensor(list(WEIGHTS.values())).view(-1, 1, 1)
        merged[key] = (weights * torch.stack(list(rows.values()))).sum(0) / weights.sum()
    return merged, plan


def _max_diff_by_token(ours, plan: VocabPlan, theirs, their_vocab: dict[str, int]) -> float:
    """Rows compared token by token (mergekit orders new tokens by hash; ckreg by model id)."""
    assert set(plan.vocab) == set(their_vocab)
    worst = 0.0
    for key in VOCAB_KEYS:
        assert ours[key].shape == theirs[key].shape, key
        ids = list(their_vocab.values())
        mine = torch.tensor([plan.vocab[t] for t in their_vocab])
        worst = max(worst, float((ours[key][mine] - theirs[key][ids]).abs().max()))
        n = len(their_vocab)
        if ours[key].shape[0] > n:  # padding rows: the mean of the real rows
            worst = max(worst, float((ours[key][n:] - theirs[key][n:]).abs().max()))
    return worst


@pytest.mark.parametrize(
    ("case", "extra", "base"),
    [
        ("union", {"tokenizer_source": "union"}, "base"),
        ("union-no-base", {"tokenizer_source": "union"}, None),
        ("base", {"tokenizer_source": "base"}, "base"),
        ("model", {"tokenizer_source": "@chat"}, "base"),
        ("block", {"tokenizer": {"source": "union", "pad_to_multiple_of": 8}}, "other"),
    ],
)
def test_vocabulary_and_rows_match_mergekit(zoo, tmp_path, case, extra, base) -> None:
    extra = json.loads(json.dumps(extra).replace('"@chat"', json.dumps(str(zoo["chat"]))))
    config = _config(zoo, base, **extra)
    theirs, their_tok = _run_mergekit(config, tmp_path / "mk")
    ours, plan = _run_ours(config, zoo, tmp_path / "ours")
    assert _max_diff_by_token(ours, plan, theirs, their_tok.get_vocab()) <= 1e-6
    mk_config = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert plan.vocab_size == mk_config["vocab_size"]
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    assert saved.get_vocab() == plan.vocab
    text = "w1 w3 x0 <|im_start|> w19 <tool>"
    decode = [their_tok.convert_ids_to_tokens(i) for i in their_tok(text)["input_ids"]]
    assert [saved.convert_ids_to_tokens(i) for i in saved(text)["input_ids"]] == decode


def test_tokens_block_sources_force_and_padding_match_mergekit(zoo, tmp_path) -> None:
    tokens = {
        "<|im_start|>": {"source": str(zoo["chat"])},
        "x0": {"source": {"kind": "zero"}},
        "w5": {
            "source": {"kind": "model_token", "model": str(zoo["other"]), "token": "w6"},
            "force": True,
        },
        "w8": {
            "source": {"kind": "model_token", "model": str(zoo["chat"]), "token_id": 4},
            "force": True,
        },
        "<brand-new>": {"source": {"kind": "zero"}},
    }
    config = _config(
        zoo, "base", tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 16}
    )
    theirs, their_tok = _run_mergekit(config, tmp_path / "mk")
    ours, plan = _run_ours(config, zoo, tmp_path / "ours")
    assert "<brand-new>" in plan.vocab and plan.vocab_size == 32
    assert _max_diff_by_token(ours, plan, theirs, their_tok.get_vocab()) <= 1e-6
    embed = ours["model.embed_tokens.weight"]
    assert torch.count_nonzero(embed[plan.vocab["<brand-new>"]]) == 0


def test_missing_rows_follow_mergekit_rule(zoo, tmp_path) -> None:
    """Per token: the only model that has it; else the base's row; else the mean; forced rows."""
    dirs = {n: zoo[n] for n in WEIGHTS}
    plan = plan_vocabulary(TokenizerSettings(source="union"), dirs, None, tmp_path)
    key = "model.embed_tokens.weight"
    inputs = {
        n: load_file(str(p / "model.safetensors"))[key].to(torch.bfloat16) for n, p in dirs.items()
    }
    rows = remap_rows(inputs, plan)
    vocab, orig = plan.vocab, plan.original_vocabs
    tool = vocab["<tool>"]  # only in chat: chat's row everywhere
    for name in dirs:
        assert torch.equal(rows[name][tool], inputs["chat"][orig["chat"]["<tool>"]])
    w3 = vocab["w3"]  # in base and chat, no base_model: their mean, summed in bf16 as mergekit
    mean = (
        torch.zeros(16, dtype=torch.bfloat16)
        + inputs["base"][orig["base"]["w3"]]
        + inputs["chat"][orig["chat"]["w3"]]
    ) / 2
    assert torch.equal(rows["other"][w3], mean)
    assert torch.equal(rows["base"][w3], inputs["base"][orig["base"]["w3"]])  # present: own row
    with_base = remap_rows(inputs, plan, base_model="base")
    assert torch.equal(with_base["other"][w3], inputs["base"][orig["base"]["w3"]])


def test_chat_templates(zoo, tmp_path) -> None:
    import importlib.resources

    from mergekit._data import chat_templates
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(zoo["base"]))
    messages = [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": " Hi\n"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    for name in ("chatml", "llama3", "mistral"):
        theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
        for gen in (False, True):
            render = [
                tok.apply_chat_template(
                    messages, chat_template=t, tokenize=False, add_generation_prompt=gen
                )
                for t in (BUNDLED[name], theirs)
            ]
            assert render[0] == render[1], name
    assert resolve_chat_template("auto", [zoo["base"], zoo["chat"]]).startswith("{% for m in")
    assert resolve_chat_template("auto", [zoo["base"]]) is None
    with pytest.raises(ValueError, match="neither a bundled name"):
        resolve_chat_template("chatm", [])
    config = _config(zoo, "base", tokenizer_source="base", chat_template="chatml")
    _run_ours(config, zoo, tmp_path / "ours")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "ours")).chat_template == BUNDLED["chatml"]


def test_no_source_copies_the_donor_tokenizer(zoo, tmp_path) -> None:
    from transformers import AutoTokenizer

    dirs = {n: zoo[n] for n in WEIGHTS}
    assert plan_vocabulary(TokenizerSettings(), dirs, "chat", tmp_path / "copy") is None
    assert (tmp_path / "copy" / "tokenizer.json").read_bytes() == (
        zoo["chat"] / "tokenizer.json"
    ).read_bytes()
    settings = TokenizerSettings(chat_template="llama3")
    assert plan_vocabulary(settings, dirs, None, tmp_path / "tpl") is None
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "tpl"))
    assert saved.chat_template == BUNDLED["llama3"] and len(saved) == 23


def test_bad_settings_name_the_key(zoo, tmp_path) -> None:
    dirs = {n: zoo[n] for n in WEIGHTS}
    with pytest.raises(ValueError, match="either 'tokenizer_source' or 'tokenizer'"):
        TokenizerSettings.from_mergekit(
            {"tokenizer_source": "union", "tokenizer": {"source": "base"}}
        )
    with pytest.raises(ValueError, match="unknown key"):
        TokenizerSettings.from_mergekit({"tokenizer": {"sauce": "base"}})
    bad = TokenizerSettings.from_mergekit({"tokenizer": {"tokens": {"x": {"source": "nope"}}}})
    with pytest.raises(ValueError, match=r"tokenizer.tokens\['x'\].source: model 'nope'"):
        plan_vocabulary(bad, dirs, "base", tmp_path)
    with pytest.raises(ValueError, match="model 'nope' is not one of"):
        plan_vocabulary(TokenizerSettings(source="nope"), dirs, "base", tmp_path)
    plan = plan_vocabulary(TokenizerSettings(source="union"), dirs, "base", tmp_path)
    with pytest.raises(ValueError, match="vocabulary tensor has 5 rows"):
        remap_rows({"base": torch.zeros(5, 16)}, plan)
    with pytest.raises(ValueError, match="differ beyond the vocabulary axis"):
        remap_rows({"base": torch.zeros(23, 16), "chat": torch.zeros(26, 8)}, plan)


def _in_their_order(ours: dict, our_vocab: dict[str, int], their_vocab: dict[str, int]) -> dict:
    """Our vocabulary tensors with rows reordered to mergekit's token ids (padding rows kept)."""
    order = [our_vocab[tok] for tok, _ in sorted(their_vocab.items(), key=lambda kv: kv[1])]
    out = dict(ours)
    for key in VOCAB_KEYS:
        tail = list(range(len(order), ours[key].shape[0]))
        out[key] = ours[key][torch.tensor(order + tail)]
    return out


@pytest.mark.parametrize(
    ("method", "dtype", "extra"),
    [
        ("linear", "float32", {"tokenizer_source": "union"}),
        (
            "task_arithmetic",
            "float32",
            {
                "tokenizer": {
                    "source": "union",
                    "pad_to_multiple_of": 8,
                    "tokens": {
                        "x0": {"source": {"kind": "zero"}},
                        "w4": {"source": "@other", "force": True},
                    },
                },
                "chat_template": "chatml",
            },
        ),
        ("ties", "float32", {"tokenizer_source": "base"}),
        ("linear", "bfloat16", {"tokenizer_source": "union"}),
    ],
)
def test_ckreg_merge_matches_mergekit(zoos, tmp_path, method, dtype, extra) -> None:
    """The whole ``ckreg merge`` (H3's harness) against mergekit-yaml, tensors compared by token."""
    from transformers import AutoTokenizer

    from tests.mergeops.mergekit.harness import assert_close, run_ckreg, run_mergekit

    zoo = zoos[dtype]
    extra = json.loads(json.dumps(extra).replace('"@other"', json.dumps(str(zoo["other"]))))
    weights = {"chat": 0.5, "other": 0.3} | ({"base": 1.0} if method == "linear" else {})
    density = {"density": 0.5} if method == "ties" else {}
    models = [
        {"model": str(zoo[n]), "parameters": {"weight": w, **density}} for n, w in weights.items()
    ]
    config = {"merge_method": method, "base_model": str(zoo["base"]), "dtype": dtype,
              "models": models, **extra}  # fmt: skip
    theirs = run_mergekit(config, tmp_path / "mk")
    ours = run_ckreg(config, tmp_path / "ours")
    their_vocab = AutoTokenizer.from_pretrained(str(tmp_path / "mk")).get_vocab()
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    assert set(saved.get_vocab()) == set(their_vocab)
    assert_close(_in_their_order(ours, saved.get_vocab(), their_vocab), theirs, dtype)
    out_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (
        out_config["vocab_size"]
        == json.loads((tmp_path / "mk" / "config.json").read_text())["vocab_size"]
    )
    if "chat_template" in extra:
        assert saved.chat_template == BUNDLED["chatml"]


def test_donor_tokens_beyond_vocab_size_are_stripped_like_mergekit(tmp_path) -> None:
    """BPE tokenizer with 10 tokens on an 8-row model: the 2 tokens without a row go."""
    from transformers import AutoTokenizer

    from tests.mergeops.mergekit.tiny_vocab_models import save_bpe_llama

    dirs = {str(tmp_path / n): save_bpe_llama(tmp_path / n, seed=i, model_rows=8)
            for i, n in enumerate(("b0", "b1"))}  # fmt: skip
    base = next(iter(dirs))
    models = [{"model": name, "parameters": {"weight": 1.0}} for name in dirs]
    config = {"merge_method": "linear", "base_model": base, "models": models,
              "tokenizer_source": "base", "dtype": "float32"}  # fmt: skip
    theirs, their_tok = _run_mergekit(config, tmp_path / "mk")
    plan = plan_vocabulary(TokenizerSettings(source="base"), dirs, base, tmp_path / "ours")
    assert plan is not None and plan.vocab == their_tok.get_vocab() and len(plan.vocab) == 8
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    assert saved.tokenize("abc ab") == their_tok.tokenize("abc ab") == ["abc", "ab"]
    assert theirs["lm_head.weight"].shape[0] == plan.vocab_size == 8
    # A dropped token that a kept merge produces: mergekit cannot load the result; ckreg drops
    # that merge too.
    vocab = {"<unk>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "bc": 5}
    odd = save_bpe_llama(tmp_path / "odd", seed=3, model_rows=5, vocab=vocab,
                         merges=[("a", "b"), ("b", "c")])  # fmt: skip
    plan = plan_vocabulary(TokenizerSettings(source="base"), {"odd": odd}, "odd", tmp_path / "o2")
    assert plan is not None and "bc" not in plan.vocab
    assert AutoTokenizer.from_pretrained(str(tmp_path / "o2")).tokenize("abc") == ["ab", "c"]
