"""The public contract, checked for every registered model (third parties' included).

Every model must: take ``data_shape``, return per-sample ``ELBOTerms`` whose total is the sum of
its terms, give gradients to its parameters through ``elbo(x).objective()``, and sample
``(n, *data_shape)`` on the data scale, reproducibly under a generator.
"""

import math

import pytest
import torch

import genkit
from genkit.distributions import to_model_scale

#: Tiny settings for the built-ins so the suite stays fast; other models run with defaults.
TINY = {
    "vae": {"latent_dim": 4, "hidden": 16, "channels": 4},
    "hvae": {"levels": 2, "latent_dims": [4, 2], "hidden": 16, "channels": 4},
    "vdm": {"timesteps": 20, "channels": 8, "hidden": 16, "depth": 1},
}
SHAPE = (1, 8, 8)
#: Variants of the built-ins whose code paths differ enough to hold to the contract separately.
VARIANTS = {
    "hvae-conv": ("hvae", {**TINY["hvae"], "transitions": "conv"}),
    "vdm-x0-cosine": ("vdm", {**TINY["vdm"], "parameterization": "x0", "schedule": "cosine"}),
}


def _cases():
    names = genkit.available_models()
    cases = {name: (name, TINY.get(name, {})) for name in names}
    cases.update({k: v for k, v in VARIANTS.items() if v[0] in names})
    return cases


CASES = _cases()


@pytest.fixture(params=sorted(CASES))
def model(request):
    name, params = CASES[request.param]
    torch.manual_seed(0)
    try:
        return genkit.create_model(name, SHAPE, **params)
    except genkit.ConfigError:  # a third-party model whose parameters differ from the table
        return genkit.create_model(name, SHAPE)


def test_model_is_a_latent_variable_model(model):
    assert isinstance(model, genkit.LatentVariableModel)
    assert model.data_shape == SHAPE and model.num_dims == math.prod(SHAPE)
    for part in ("encoder", "decoder", "prior"):
        assert isinstance(getattr(model, part), torch.nn.Module), part


def test_elbo_terms_are_per_sample_and_sum_to_the_total(model):
    x = to_model_scale(torch.randint(0, 256, (3, *SHAPE)))
    out = model.elbo(x)
    assert isinstance(out, genkit.ELBOTerms)
    for name, value in {**out.terms, **out.extras}.items():
        assert value.shape == (3,), name
    torch.testing.assert_close(out.total, sum(out.terms.values()))
    assert torch.isfinite(out.total).all()
    out.objective().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_elbo_of_a_batch_of_the_wrong_shape_is_one_clear_error(model):
    with pytest.raises(genkit.InvalidParameterError, match=r"needs x of shape \(B, 1, 8, 8\)"):
        model.elbo(torch.zeros(3, 1, 4, 4))


def test_sample_shape_scale_and_generator(model):
    a = model.sample(2, generator=torch.Generator().manual_seed(5))
    b = model.sample(2, generator=torch.Generator().manual_seed(5))
    assert a.shape == (2, *SHAPE)
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
