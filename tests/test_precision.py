"""Float32 heads under bf16 autocast (:class:`genkit.nets.Float32Head`).

Under ``torch.autocast(dtype=torch.bfloat16)`` the layer that outputs a distribution's
parameters must run in float32: bf16 spaces the numbers near 1 by 2^-8..2^-7, half a bin to a
whole bin of 8-bit data, so a bf16 ``loc`` makes the discretized likelihood a function of the
rounding. Each check below compares with the float32 layer applied, outside autocast, to the same
bf16 features, and shows that bf16 rounding would miss the tolerance it uses.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution

import genkit
from genkit.distributions import to_model_scale
from genkit.likelihoods import MIN_LOG_SCALE
from genkit.nets import Float32Conv2d, Float32Head, Float32Linear, mlp

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}
#: torch.testing.assert_close's float32 tolerances: what "equal to float32 rounding" means here.
F32 = {"rtol": 1.3e-6, "atol": 1e-5}
#: log-scale clamps: the decoder likelihoods' (genkit.likelihoods) and the latent Gaussians'.
LIKELIHOOD_CLAMP, GAUSSIAN_CLAMP = (MIN_LOG_SCALE, 7.0), (-10.0, 5.0)


def _images(n: int = 8, seed: int = 0, shape: tuple[int, ...] = (1, 8, 8)) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return to_model_scale(torch.randint(0, 256, (n, *shape), generator=g))


def _last_layer(module: nn.Module) -> nn.Linear | nn.Conv2d:
    """The last ``Linear``/``Conv2d`` registered in ``module``: the layer giving its output
    (found by type, not as a Float32Head, so that an unconverted head is checked too)."""
    return [m for m in module.modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1]


def _float32_layer(layer: nn.Linear | nn.Conv2d, features: Tensor) -> Tensor:
    """``layer`` applied in float32, autocast off, to ``features`` (cast exactly to float32)."""
    with torch.autocast("cpu", enabled=False):
        h = features.float()
        if isinstance(layer, nn.Linear):
            return F.linear(h, layer.weight, layer.bias)
        return F.conv2d(h, layer.weight, layer.bias, layer.stride, layer.padding)


def _run_capturing_head_input(part: nn.Module, *args: Tensor) -> tuple[object, Tensor]:
    """``part(*args)`` under bf16 autocast, and the features its last layer received."""
    seen: dict[str, Tensor] = {}
    hook = _last_layer(part).register_forward_hook(lambda m, a, out: seen.update(h=a[0]))
    try:
        with torch.autocast(**BF16):
            out = part(*args)
    finally:
        hook.remove()
    assert seen["h"].dtype == torch.bfloat16  # the trunk did run in bf16
    return out, seen["h"]


def _bf16_rounding_is_visible(exact: Tensor) -> None:
    """Rounding ``exact`` to bf16 misses the float32 tolerance: the checks can fail."""
    assert not torch.allclose(exact.bfloat16().float(), exact, **F32)


# -- the layer itself ---------------------------------------------------------------------


def _layer_pair(kind: str) -> tuple[nn.Module, nn.Module, Tensor]:
    """A plain layer, its float32-head twin with the same weights, and bf16 features near |h| = 1
    (what a bf16 trunk hands over)."""
    torch.manual_seed(0)
    if kind == "linear":
        plain, head, shape = nn.Linear(32, 16), Float32Linear(32, 16), (64, 32)
    else:
        plain, head, shape = (
            nn.Conv2d(8, 4, 3, padding=1),
            Float32Conv2d(8, 4, 3, padding=1),
            (4, 8, 6, 6),
        )
    head.load_state_dict(plain.state_dict())  # strict: the same parameter names
    h = (torch.rand(shape) + 0.5) * torch.randn(shape).sign()
    return plain, head, h.bfloat16()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_head_under_bf16_autocast_is_the_float32_layer_on_the_same_features(kind):
    plain, head, h = _layer_pair(kind)
    with torch.autocast(**BF16):
        got, plain_bf16 = head(h), plain(h)
    exact = _float32_layer(plain, h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, exact, **F32)
    # the plain layer under autocast (bf16 weights, matmul and output) is off by bf16 rounding:
    # its largest error is about 2^-8 of the largest output (measured 2^-8.3 and 2^-8.6), far
    # outside the float32 tolerance just passed
    assert plain_bf16.dtype == torch.bfloat16
    err = (plain_bf16.float() - exact).abs().max() / exact.abs().max()
    assert 2**-10 < err < 2**-6
    with pytest.raises(AssertionError):
        torch.testing.assert_close(plain_bf16.float(), exact, **F32)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_head_without_autocast_is_the_plain_layer(kind):
    plain, head, h = _layer_pair(kind)
    x = h.float()
    assert torch.equal(head(x), plain(x))
    # a float64 model stays float64: the input goes to the weights' dtype, not always float32
    plain, head = plain.double(), head.double()
    assert head(x).dtype == torch.float64
    assert torch.equal(head(x), plain(x.double()))


def test_mlp_head_keeps_the_state_dict_names_and_backpropagates_under_autocast():
    plain, float32 = mlp([3, 8, 5]), mlp([3, 8, 5], float32_head=True)
    assert list(plain.state_dict()) == list(float32.state_dict())
    float32.load_state_dict(plain.state_dict())  # strict
    assert isinstance(float32[-1], Float32Head) and not isinstance(float32[0], Float32Head)
    x = torch.randn(4, 3)
    with torch.autocast(**BF16):
        y = float32(x)
    y.sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in float32.parameters())


def test_head_compiles_without_graph_breaks_under_autocast():
    torch.manual_seed(0)
    net, x = mlp([4, 16, 6], float32_head=True), torch.randn(3, 4)
    validate = Distribution._validate_args
    try:
        compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
        with torch.autocast(**BF16):
            got, eager = compiled(x), net(x)
    finally:  # torch.compile turns argument validation off for the whole process (dynamo's
        Distribution.set_default_validate_args(validate)  # TorchPatcher): put it back
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, eager, **F32)


# -- every part of vae and hvae that outputs a distribution's parameters -------------------


def _check_gaussian_params(part: nn.Module, inp: Tensor, clamp: tuple[float, float]) -> None:
    """Under bf16 autocast ``part(inp)``'s ``loc`` and ``scale`` are float32 and equal the
    float32 head on the bf16 features it received: ``[loc, log scale]`` split along dim 1
    (image-shaped for an MLP decoder on images), ``scale = exp(clamp(log scale))``."""
    dist, features = _run_capturing_head_input(part, inp)
    base = dist.base_dist
    params = _float32_layer(_last_layer(part), features)
    params = params.reshape(params.shape[0], -1, *base.loc.shape[2:])
    loc, log_scale = params.chunk(2, dim=1)
    assert base.loc.dtype == base.scale.dtype == torch.float32
    torch.testing.assert_close(base.loc, loc, **F32)
    torch.testing.assert_close(base.scale, torch.exp(log_scale.clamp(*clamp)), **F32)
    _bf16_rounding_is_visible(loc)


VAE = {"latent_dim": 4, "hidden": 32, "channels": 8}
HVAE = {"levels": 2, "latent_dims": [4, 3], "hidden": 32, "channels": 8}


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_vae_encoder_and_decoder_params_are_float32_under_bf16_autocast(net):
    torch.manual_seed(0)
    model = genkit.create_model("vae", (1, 8, 8), net=net, **VAE)
    _check_gaussian_params(model.encoder, _images(), GAUSSIAN_CLAMP)
    _check_gaussian_params(model.decoder, torch.randn(8, 4), LIKELIHOOD_CLAMP)


@pytest.mark.parametrize(
    "params",
    [{"net": "mlp"}, {"net": "conv"}, {"transitions": "conv"}],
    ids=["mlp", "conv-net", "conv-transitions"],
)
def test_hvae_every_transition_is_float32_under_bf16_autocast(params):
    torch.manual_seed(0)
    model = genkit.create_model("hvae", (1, 8, 8), **HVAE, **params)
    z1, z2 = (torch.randn(8, *shape) for shape in model.latent_shapes)
    _check_gaussian_params(model.encoder, _images(), GAUSSIAN_CLAMP)  # q(z_1|x)
    _check_gaussian_params(model.decoder, z1, LIKELIHOOD_CLAMP)  # p(x|z_1)
    _check_gaussian_params(model.q_steps[0], z1, GAUSSIAN_CLAMP)  # q(z_2|z_1)
    _check_gaussian_params(model.p_steps[0], z2, GAUSSIAN_CLAMP)  # p(z_1|z_2)


# -- the VDM's denoisers -------------------------------------------------------------------


def _vdm(data_shape: tuple[int, ...], **extra) -> nn.Module:
    """A tiny VDM whose denoiser's output layer is moved off its zero initialisation (a zero
    head gives eps_hat = 0 in any precision, which would test nothing)."""
    torch.manual_seed(0)
    params = {"channels": 8} if len(data_shape) == 3 else {"hidden": 32, "depth": 2}
    model = genkit.create_model("vdm", data_shape, **params, **extra)
    with torch.no_grad():
        head = _last_layer(model.net)
        head.weight.normal_(0.0, 0.2)
        head.bias.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("data_shape", [(1, 8, 8), (12,)], ids=["unet", "mlp"])
def test_vdm_denoiser_output_is_float32_under_bf16_autocast(data_shape):
    model = _vdm(data_shape)
    x_t, t = torch.randn(8, *data_shape), torch.randint(1, model.timesteps + 1, (8,))
    eps_hat, features = _run_capturing_head_input(model.net, x_t, t)
    assert eps_hat.dtype == torch.float32
    exact = _float32_layer(_last_layer(model.net), features)
    torch.testing.assert_close(eps_hat, exact, **F32)
    _bf16_rounding_is_visible(exact)


# -- the ELBO under bf16 autocast against fp32 ---------------------------------------------

# Tolerances on |elbo_bf16 - elbo_fp32| per example, relative to the size of its terms
# (sum over terms of |term|: for vector data the terms can cancel to a total near 0), from
# measurement: 20 model and noise seeds, 8 examples each, this machine's CPU. What is left is
# the bf16 rounding of the trunks, which autocast keeps by design.
# - vae, hvae: at most 3.3e-5 (about 0.01 nat of 380); 2e-4 leaves a margin of 6. Before the
#   heads were float32 the hvae's consistency term came out in bf16, 4.5e-4 (conv transitions)
#   to 4e-3 (mlp) off, so the hvae cases fail without them.
# - vdm: at most 7.3e-3 (U-Net, tolerance 2e-2) and 2.8e-4 (MLP on vectors, 1.5e-3). Every
#   layer but the head runs in bf16, so eps_hat is 0.4 to 1.1% off (measured), which the
#   denoising-matching term, quadratic in eps - eps_hat, carries. A bf16 head added little to
#   that (eps_hat 0.87% off instead of 0.85% for the U-Net, 0.50% instead of 0.43% for the MLP).
ELBO_CASES = {
    "vae-mlp": ("vae", (1, 8, 8), {**VAE, "net": "mlp"}, 2e-4),
    "vae-conv": ("vae", (1, 8, 8), {**VAE, "net": "conv"}, 2e-4),
    "hvae-mlp": ("hvae", (1, 8, 8), {**HVAE, "net": "mlp"}, 2e-4),
    "hvae-conv": ("hvae", (1, 8, 8), {**HVAE, "transitions": "conv"}, 2e-4),
    "vdm-unet": ("vdm", (1, 8, 8), None, 2e-2),
    "vdm-unet-attention": ("vdm", (1, 8, 8), {"attention_resolution": 8}, 2e-2),
    "vdm-mlp": ("vdm", (12,), None, 1.5e-3),
}


@pytest.mark.parametrize("case", list(ELBO_CASES))
def test_elbo_under_bf16_autocast_is_float32_and_close_to_fp32(case):
    name, data_shape, params, rtol = ELBO_CASES[case]
    if name == "vdm":
        model = _vdm(data_shape, **(params or {}))
    else:
        torch.manual_seed(0)
        model = genkit.create_model(name, data_shape, **params)
    if len(data_shape) == 3:
        x = _images(shape=data_shape)
    else:
        x = torch.randn(8, *data_shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    fp32 = model.elbo(x)
    torch.manual_seed(1)  # the same z, t and noise
    with torch.autocast(**BF16):
        bf16 = model.elbo(x)
    assert set(bf16.terms) == set(fp32.terms)
    for term, value in bf16.terms.items():
        assert value.dtype == torch.float32, term
        assert bool(torch.isfinite(value).all()), term
    size = sum(value.abs() for value in fp32.terms.values())
    gap = ((bf16.total - fp32.total).abs() / size).detach()
    assert float(gap.max()) < rtol, f"{case}: relative gap {float(gap.max()):.2e}"


# -- float64 VDMs: the time, the embedding, the loss and the ODE stay float64 ---------------


class _Scaled(nn.Module):
    """``net(z, t) = w z`` with one parameter ``w`` (0.5): a net whose output is known exactly;
    it records the dtype of every ``t`` it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.seen: list[torch.dtype] = []

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        self.seen.append(t.dtype)
        return self.w * z


@pytest.mark.parametrize(
    ("data_shape", "params"),
    [
        ((4,), {"schedule": "fixed_linear"}),
        ((1, 4, 4), {"channels": 8, "schedule": "fixed_linear"}),
        ((1, 4, 4), {"channels": 8, "timesteps": 3}),
        ((1, 4, 4), {"channels": 8, "attention_resolution": 4, "schedule": "fixed_linear"}),
    ],
    ids=["mlp", "unet-fourier", "unet-discrete", "unet-attention"],
)
def test_float64_vdm_with_the_default_denoiser_runs_end_to_end(data_shape, params):
    """``create_vdm((4,), timesteps=0).double().elbo(x64)`` crashed: the time embedding was
    float32. ELBO, ancestral sampling and the ODE now run in float64."""
    torch.manual_seed(0)
    model = genkit.create_model("vdm", data_shape, **{"timesteps": 0, **params}).double()
    if len(data_shape) == 3:
        x = _images(3, shape=data_shape).double()
    else:
        x = torch.randn(3, *data_shape, dtype=torch.float64)
    terms = model.elbo(x)
    for name, value in terms.terms.items():
        assert value.dtype == torch.float64 and bool(torch.isfinite(value).all()), name
    steps = None if model.timesteps else 4  # discrete: ancestral over T = 3 steps
    draws = model.sample(2, generator=torch.Generator().manual_seed(0), steps=steps)
    assert draws.dtype == torch.float64
    ode = model.eval().elbo(x, "ode", rtol=1e-2, atol=1e-2, divergence="hutchinson")
    assert ode.terms["log_likelihood"].dtype == torch.float64


def test_time_embedding_and_fourier_features_of_float64_inputs_are_float64():
    from genkit_vdm.unet import fourier_features, timestep_embedding

    t = torch.tensor([123.456789012345, 0.001], dtype=torch.float64)
    emb = timestep_embedding(t, 8)
    freqs = [10_000.0 ** (-i / 4) for i in range(4)]
    expected = [
        [math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in t.tolist()
    ]
    torch.testing.assert_close(emb, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-13)
    x = torch.tensor([[[0.123456789012345]]], dtype=torch.float64)  # (1, 1, 1)
    feats = fourier_features(x, [7])
    angle = 2**7 * math.pi * x.item()
    torch.testing.assert_close(
        feats.flatten(),
        torch.tensor([math.sin(angle), math.cos(angle)], dtype=torch.float64),
        rtol=0,
        atol=1e-13,
    )


def test_float64_continuous_loss_squared_error_is_float64():
    """``||eps - eps_hat||^2`` of the continuous loss was computed in float32 (relative error
    ~1e-7); against the same draw by hand it now agrees to float64 rounding."""
    from genkit_vdm.continuous_elbo import diffusion_loss

    model = genkit.create_model(
        "vdm", (4,), timesteps=0, schedule="fixed_linear", net=_Scaled()
    ).double()
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    torch.manual_seed(0)
    loss, sq_err, _ = diffusion_loss(model, x, t)
    torch.manual_seed(0)
    eps = torch.randn_like(x)
    lam = 13.3 - 18.3 * t
    z = torch.sigmoid(lam).sqrt()[:, None] * x + torch.sigmoid(-lam).sqrt()[:, None] * eps
    expected = (eps - 0.5 * z).square().sum(1)
    assert sq_err.dtype == torch.float64
    torch.testing.assert_close(sq_err, expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(loss, 0.5 * 18.3 * expected, rtol=1e-13, atol=0)


def test_float64_ode_time_is_float64():
    """The ODE read the schedule at ``t.float()`` and gave the net a float32 time: at t = 1/3,
    lambda was 2e-7 off. Now lambda(t), the net's time and the solve stay float64."""
    from genkit_vdm.ode import flow_time

    net = _Scaled()
    model = genkit.create_model("vdm", (4,), timesteps=0, schedule="fixed_linear", net=net)
    model = model.double().eval()
    lam, _, net_t = flow_time(model).at(torch.tensor([1 / 3], dtype=torch.float64))
    torch.testing.assert_close(lam.item(), 13.3 - 18.3 / 3, rtol=1e-14, atol=0)
    torch.testing.assert_close(net_t.item(), 1 / 3, rtol=1e-14, atol=0)
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = model.elbo(x, "ode", rtol=1e-3, atol=1e-3)
    assert out.terms["log_likelihood"].dtype == torch.float64
    assert net.seen and set(net.seen) == {torch.float64}
