"""regmean: the closed form equals least squares over the models' stacked inputs (the
paper's objective, solved here with numpy), reductions, bad Grams; and capture_gram."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mergeops
from registry.client.capture_gram import GramRecorder, capture_gram


def _inputs(seed, n=40, width=5):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def _model(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    return {"fc.weight": torch.randn(3, 5, generator=gen), "fc.bias": torch.randn(3, generator=gen)}


def _gram(x):
    return {"fc.weight": x.T @ x / x.shape[0]}


def test_regmean_is_least_squares_over_every_models_inputs():
    xs = [_inputs(0), _inputs(1)]
    models = [_model(0), _model(1)]
    out = mergeops.merge("regmean", models, grams=[_gram(x) for x in xs], alpha=1.0, device="cpu")
    # argmin_W Σ_i ‖X_i W_iᵀ - X_i Wᵀ‖² / n_i, as one least-squares problem
    a = np.concatenate([x.double().numpy() for x in xs])
    b = np.concatenate(
        [(x @ m["fc.weight"].T).double().numpy() for x, m in zip(xs, models, strict=True)]
    )
    expected = np.linalg.lstsq(a, b, rcond=None)[0].T
    assert np.allclose(out["fc.weight"].double().numpy(), expected, atol=1e-5)
    bias_mean = (models[0]["fc.bias"] + models[1]["fc.bias"]) / 2
    assert torch.allclose(out["fc.bias"], bias_mean)


def test_equal_grams_or_alpha_zero_with_equal_diagonals_give_the_average():
    models = [_model(0), _model(1)]
    gram = _gram(_inputs(3))
    out = mergeops.merge("regmean", models, grams=[gram, gram], device="cpu")
    mean = (models[0]["fc.weight"] + models[1]["fc.weight"]) / 2
    assert torch.allclose(out["fc.weight"], mean, atol=1e-5)
    identity = {"fc.weight": torch.eye(5)}
    plain = mergeops.merge("regmean", models, grams=[identity, identity], alpha=0.0, device="cpu")
    assert torch.allclose(plain["fc.weight"], mean, atol=1e-6)


def test_alpha_shrinks_off_diagonals():
    xs = [_inputs(0), _inputs(1)]
    grams = [_gram(x)["fc.weight"].double() for x in xs]
    models = [_model(0), _model(1)]
    shrunk = [0.5 * g + 0.5 * torch.diag(torch.diagonal(g)) for g in grams]
    rhs = sum(m["fc.weight"].double() @ g for m, g in zip(models, shrunk, strict=True))
    expected = rhs @ torch.linalg.inv(sum(shrunk))
    out = mergeops.merge("regmean", models, grams=[_gram(x) for x in xs], alpha=0.5, device="cpu")
    assert torch.allclose(out["fc.weight"].double(), expected, atol=1e-5)


def test_bad_grams_name_the_model_and_tensor():
    models = [_model(0), _model(1)]
    with pytest.raises(mergeops.MergeError, match="needs a gram per model"):
        mergeops.merge("regmean", models, device="cpu")
    wrong = {"fc.weight": torch.eye(3)}
    with pytest.raises(mergeops.MergeError, match=r"gram of model .* for 'fc.weight'.*\(5, 5\)"):
        mergeops.merge("regmean", models, grams=[wrong, wrong], device="cpu")
    with pytest.raises(mergeops.MergeError, match="model 'model_1' has no gram"):
        mergeops.merge("regmean", models, grams=[_gram(_inputs(0)), {}], device="cpu")


def test_capture_gram_records_every_linear_layers_mean_gram(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    batches = [torch.randn(8, 4) for _ in range(3)]
    path = capture_gram(model, batches, tmp_path / "gram.safetensors")
    grams = load_file(str(path))
    x = torch.cat(batches)
    hidden = torch.relu(model[0](x)).detach()
    assert set(grams) == {"0.weight", "2.weight"}
    assert torch.allclose(grams["0.weight"], x.T @ x / 24, atol=1e-5)
    assert torch.allclose(grams["2.weight"], hidden.T @ hidden / 24, atol=1e-5)


def test_gram_recorder_samples_every_nth_forward(tmp_path):
    model = torch.nn.Linear(3, 1)
    batches = [torch.full((2, 3), float(i)) for i in range(4)]
    with GramRecorder(model, every=2) as recorder:
        for batch in batches:
            model(batch)
    grams = load_file(str(recorder.save(tmp_path / "g.safetensors")))
    x = torch.cat([batches[0], batches[2]])
    assert torch.allclose(grams["weight"], x.T @ x / 4)
    with pytest.raises(ValueError, match=r"no torch\.nn\.Linear"):
        GramRecorder(torch.nn.ReLU())


class _MlpProbe:
    """Two linear layers with a ReLU; each model has its own inputs."""

    def __init__(self, inputs):
        self.inputs = inputs

    def linear_weights(self):
        return ["l1.weight", "l2.weight"]

    def input_grams(self, params, model_name):
        x = self.inputs[model_name]
        h = torch.relu(x @ params["l1.weight"].T)
        return {"l1.weight": x.T @ x / len(x), "l2.weight": h.T @ h / len(h)}


def _mlp(seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        "l1.weight": torch.randn(6, 4, generator=gen),
        "l2.weight": torch.randn(3, 6, generator=gen),
    }


def test_regmean_plusplus_takes_the_second_layers_grams_on_the_merged_first_layer():
    inputs = {"a": _inputs(0, width=4), "b": _inputs(1, width=4)}
    probe = _MlpProbe(inputs)
    models = {"a": _mlp(0), "b": _mlp(1)}
    out = mergeops.merge("regmean_plusplus", models, objective=probe, alpha=1.0, device="cpu")
    grams1 = [{"l1.weight": x.T @ x / len(x)} for x in inputs.values()]
    first = mergeops.merge(
        "regmean", [{"l1.weight": m["l1.weight"]} for m in models.values()], grams=grams1,
        alpha=1.0, device="cpu",
    )["l1.weight"]  # fmt: skip
    assert torch.allclose(out["l1.weight"], first, atol=1e-5)
    hidden = {k: torch.relu(x @ first.T) for k, x in inputs.items()}
    grams2 = [h.T @ h / len(h) for h in hidden.values()]
    second = sum(
        m["l2.weight"].double() @ g.double() for m, g in zip(models.values(), grams2, strict=True)
    )
    expected = second @ torch.linalg.inv(sum(g.double() for g in grams2))
    assert torch.allclose(out["l2.weight"].double(), expected, atol=1e-4)
    plain = mergeops.merge(
        "regmean", list(models.values()),
        grams=[probe.input_grams(m, k) for k, m in models.items()], alpha=1.0, device="cpu",
    )  # fmt: skip
    assert not torch.allclose(plain["l2.weight"], out["l2.weight"], atol=1e-3)


def test_regmean_plusplus_needs_a_probe():
    with pytest.raises(mergeops.MergeError, match=r"needs an objective|gram probe"):
        mergeops.merge("regmean_plusplus", [_mlp(0), _mlp(1)], device="cpu")
