"""mergekit's schema through ``ckreg merge --config``: gradients, filters, precedence, slices,
per-slice bases, mergekit defaults, tokenizer settings, ``model+lora`` and bad configs."""

from __future__ import annotations

import pytest
import torch

from mergeops.mergekit.gradients import _MISSING, evaluate
from tests.mergeops.mergekit.harness import (
    CkregMergeFailed,
    assert_close,
    max_difference,
    run_ckreg,
    run_mergekit,
)

SETTINGS = [
    0.5,
    [0.0, 1.0],
    [1, 0.7, 0.1],
    [0, 0.3, 0.7, 1],
    [True, False],
    ["a", "b", "c"],
    [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.1}],
    [{"filter": "self_attn", "value": 0.3}],
    {"filter": "*", "value": [1.0, 0.0]},
]


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"])
def test_settings_evaluate_as_mergekit(setting, name):
    from mergekit.config import ConditionalParameter, evaluate_setting

    theirs_setting = setting
    if isinstance(setting, dict):
        theirs_setting = ConditionalParameter(**setting)
    elif isinstance(setting, list) and setting and isinstance(setting[0], dict):
        theirs_setting = [ConditionalParameter(**c) for c in setting]
    for t in (0.0, 1 / 3, 0.5, 2 / 3, 1.0):
        theirs = evaluate_setting(name, theirs_setting, t, validate=lambda v: v)
        ours = evaluate(setting, name, t)
        assert (None if ours is _MISSING else ours) == theirs, (setting, name, t)


def _path(zoo, name, dtype="float32"):
    return zoo.path(dtype, name)


def test_precedence_source_over_slice_over_global(zoo, tmp_path):
    config = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": _path(zoo, "ft1"), "layer_range": [0, 3],
                     "parameters": {"weight": [1.0, 0.2]}},
                    {"model": _path(zoo, "ft2"), "layer_range": [1, 4]},
                ],
                "parameters": {"weight": [{"filter": "mlp", "value": 0.7}]},
            },
            {
                "sources": [
                    {"model": _path(zoo, "ft2"), "layer_range": [3, 4]},
                    {"model": _path(zoo, "ft3"), "layer_range": [3, 4],
                     "parameters": {"weight": 2.0}},
                ],
            },
        ],
        "parameters": {"weight": 0.4, "normalize": [{"filter": "norm", "value": False},
                                                    {"value": True}]},
    }  # fmt: skip
    theirs = run_mergekit(config, tmp_path / "mk")
    ours = run_ckreg(config, tmp_path / "ck")
    assert len([k for k in ours if k.endswith("mlp.up_proj.weight")]) == 4
    assert_close(ours, theirs, "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_per_slice_base_and_omitted_density(zoo, tmp_path, dtype):
    config = {
        "merge_method": "ties",
        "base_model": _path(zoo, "base", dtype),
        "slices": [
            {"sources": [
                {"model": _path(zoo, "base", dtype), "layer_range": [0, 2]},
                {"model": _path(zoo, "ft1", dtype), "layer_range": [0, 2]},
                {"model": _path(zoo, "ft2", dtype), "layer_range": [0, 2],
                 "parameters": {"density": 0.4}},
            ]},
            {"base_model": _path(zoo, "ft3", dtype),
             "sources": [
                {"model": _path(zoo, "ft3", dtype), "layer_range": [2, 4]},
                {"model": _path(zoo, "ft1", dtype), "layer_range": [2, 4]},
                {"model": _path(zoo, "ft2", dtype), "layer_range": [2, 4]},
            ], "parameters": {"weight": [0.2, 0.8]}},
        ],
        "parameters": {"weight": 0.5},
        "dtype": dtype,
    }  # fmt: skip
    theirs = run_mergekit(config, tmp_path / "mk")
    ours = run_ckreg(config, tmp_path / "ck")
    assert_close(ours, theirs, dtype)


def test_routed_equals_plain_for_a_uniform_config(zoo, tmp_path):
    plain = {
        "merge_method": "ties",
        "base_model": _path(zoo, "base"),
        "models": [
            {"model": _path(zoo, m), "parameters": {"density": 0.5}} for m in ("ft1", "ft2")
        ],
        "parameters": {"weight": 0.6},
    }
    routed = {**plain, "parameters": {"weight": [{"value": 0.6}]}}  # a filter list: routed
    a = run_ckreg(plain, tmp_path / "plain")
    b = run_ckreg(routed, tmp_path / "routed")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_ckreg_conventions_keep_ckreg_defaults(zoo, tmp_path):
    config = {
        "merge_method": "ties",
        "base_model": _path(zoo, "base"),
        "models": [{"model": _path(zoo, m), "parameters": {"weight": 0.5}} for m in ("ft1", "ft2")],
    }
    theirs = run_mergekit(config, tmp_path / "mk")
    assert_close(run_ckreg(config, tmp_path / "ck"), theirs, "float32")
    ckreg = run_ckreg({**config, "conventions": "ckreg"}, tmp_path / "ck2")
    assert max_difference(ckreg, theirs) > 1e-3  # density 0.2 trims, mergekit's 1.0 keeps all


def test_random_seed_reproducible(zoo, tmp_path):
    config = {
        "merge_method": "dare_ties",
        "base_model": _path(zoo, "base"),
        "models": [{"model": _path(zoo, m), "parameters": {"density": 0.5, "weight": 0.5}}
                   for m in ("ft1", "ft2")],
        "random_seed": 7,
    }  # fmt: skip
    a = run_ckreg(config, tmp_path / "a")
    b = run_ckreg(config, tmp_path / "b")
    c = run_ckreg(config, tmp_path / "c", "--random-seed", "8")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    "tokenizer",
    [{"tokenizer_source": "base"}, {"tokenizer": {"source": "union", "pad_to_multiple_of": 80}}],
    ids=["base", "union-padded"],
)
def test_tokenizer_settings_match_mergekit(zoo, tmp_path, tokenizer):
    config = {
        "merge_method": "task_arithmetic",
        "base_model": _path(zoo, "base"),
        "models": [{"model": _path(zoo, m), "parameters": {"weight": 0.5}}
                   for m in ("ft1", "ft2")],
        **tokenizer,
    }  # fmt: skip
    theirs = run_mergekit(config, tmp_path / "mk")
    ours = run_ckreg(config, tmp_path / "ck")
    assert_close(ours, theirs, "float32")
    assert (tmp_path / "ck" / "tokenizer.json").is_file()


def test_model_plus_lora_reference(zoo, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_path(zoo, "base"))
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    torch.manual_seed(3)
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    lora.save_pretrained(tmp_path / "lora")
    config = {
        "merge_method": "linear",
        "models": [
            {"model": f"{_path(zoo, 'base')}+{tmp_path / 'lora'}", "parameters": {"weight": 1}},
            {"model": _path(zoo, "ft1"), "parameters": {"weight": 1}},
        ],
    }
    theirs = run_mergekit(config, tmp_path / "mk", lora_merge_cache=str(tmp_path / "cache"))
    ours = run_ckreg(config, tmp_path / "ck")
    assert_close(ours, theirs, "float32")


BAD = [
    ({"modules": {"text": {}}}, r"modules.*not supported"),
    ({"parameters": {"wieght": 0.5}}, "unknown parameter 'wieght'"),
    ({"colour": "red"}, "colour: unknown key"),
    ({"parameters": {"weight": [{"filtr": "mlp", "value": 1}]}}, "unknown key 'filtr'"),
    ({"tokenizer_source": "base", "tokenizer": {"source": "union"}}, "tokenizer_source"),
]


@pytest.mark.parametrize(("change", "match"), BAD, ids=[m for _, m in BAD])
def test_bad_configs_name_the_key(zoo, tmp_path, change, match):
    config = {
        "merge_method": "linear",
        "models": [{"model": _path(zoo, m)} for m in ("ft1", "ft2")],
        **change,
    }
    with pytest.raises(CkregMergeFailed, match=match) as info:
        run_ckreg(config, tmp_path / "out")
    assert info.value.exit_code == 2 and not (tmp_path / "out").exists()


BAD_SLICES = [
    ([{"sources": [{"model": "ft1", "layer_range": [0, 5]}]}], "has 4 layers"),
    ([{"sources": [{"model": "ft1", "layer_range": [2, 1]}]}], "layer_range"),
    (
        [{"sources": [{"model": "ft1", "layer_range": [0, 2]},
                      {"model": "ft2", "layer_range": [0, 3]}]}],
        "same number of layers",
    ),
    ([{"sources": [{"model": "ft1", "layer_range": [0, 2]}],
       "parameters": {"weight": "x"}}], "weight"),
    ([{"sources": [{"model": "nowhere/llama-7b", "layer_range": [0, 2]}]}], "not downloaded"),
]  # fmt: skip


@pytest.mark.parametrize(("slices", "match"), BAD_SLICES, ids=[m for _, m in BAD_SLICES])
def test_bad_slices_name_the_problem(zoo, tmp_path, slices, match):
    for out_slice in slices:
        for source in out_slice["sources"]:
            if source["model"].startswith("ft"):
                source["model"] = _path(zoo, source["model"])
    config = {"merge_method": "linear", "slices": slices}
    with pytest.raises(CkregMergeFailed, match=match):
        run_ckreg(config, tmp_path / "out")


def test_base_missing_from_a_slice_is_named(zoo, tmp_path):
    config = {
        "merge_method": "ties",
        "base_model": _path(zoo, "base"),
        "slices": [{"sources": [{"model": _path(zoo, "ft1"), "layer_range": [0, 4]}]}],
    }
    with pytest.raises(CkregMergeFailed, match=r"base_model .* is not among the sources"):
        run_ckreg(config, tmp_path / "out")


def test_chat_template_and_routing_refusal(zoo, tmp_path):
    config = {
        "merge_method": "linear",
        "models": [{"model": _path(zoo, m), "parameters": {"weight": 1}} for m in ("ft1", "ft2")],
        "chat_template": "chatml",
    }
    run_ckreg(config, tmp_path / "ck")
    tokenizer_config = (tmp_path / "ck" / "tokenizer_config.json").read_text()
    chat = tmp_path / "ck" / "chat_template.jinja"
    assert "im_start" in tokenizer_config or (chat.is_file() and "im_start" in chat.read_text())
    needs_metrics = {
        "merge_method": "mwa",
        "slices": [{"sources": [{"model": _path(zoo, "ft1"), "layer_range": [0, 4]}]}],
    }
    with pytest.raises(CkregMergeFailed, match="method 'mwa' needs metrics"):
        run_ckreg(needs_metrics, tmp_path / "mwa")
