"""The ``vdm`` model: construction, the default denoisers, a user's own net, the contract."""

import pytest
import torch
from torch import nn

import genkit
from genkit.distributions import DiscretizedGaussian
from genkit.errors import ConfigError, InvalidParameterError


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (2, 7, 6), (5,)])
def test_default_denoiser_keeps_the_shape_and_trains(shape):
    m = genkit.create_model("vdm", shape, timesteps=10, channels=8, hidden=16)
    expected = "MLPDenoiser" if len(shape) == 1 else "UNet"
    assert type(m.net).__name__ == expected
    x = torch.rand(2, *shape) * 2 - 1
    t = torch.tensor([1, 10])
    out = m.net(x, t)
    assert out.shape == x.shape
    # the output layer starts at zero; one gradient step must move it
    loss = (
        m.elbo(torch.round((x + 1) * 127.5) / 127.5 - 1 if len(shape) == 3 else x)
        .objective()
        .mean()
    )
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    assert sum(p.grad.abs().sum() for p in m.parameters()) > 0


def test_unet_depth_and_width_are_configurable():
    small = genkit.create_model("vdm", (1, 28, 28), channels=8, channel_mults=(1,))
    big = genkit.create_model(
        "vdm",
        (1, 28, 28),
        channels=8,
        channel_mults=(1, 2, 2),
        num_res_blocks=2,
        attention_resolution=8,
    )
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < count(big)
    x = torch.zeros(1, 1, 28, 28)
    assert big.net(x, torch.tensor([3])).shape == x.shape
    attention = [mod for mod in big.modules() if type(mod).__name__ == "SelfAttention"]
    assert attention  # at 7x7 and in the middle, with attention_resolution=8
    plain = genkit.create_model("vdm", (1, 28, 28), channels=8)  # the default: none
    assert not [mod for mod in plain.modules() if type(mod).__name__ == "SelfAttention"]
    assert plain.net(x, torch.tensor([3])).shape == x.shape


def test_a_users_net_is_called_as_net_x_t_t():
    calls = []

    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.zeros(()))

        def forward(self, x_t, t):
            calls.append((tuple(x_t.shape), t.dtype, int(t.min()), int(t.max())))
            return self.scale * x_t

    m = genkit.create_model("vdm", (4,), timesteps=7, net=Zero())
    m.elbo(torch.zeros(3, 4), t_samples=None)
    assert all(dtype == torch.long and 1 <= lo <= hi <= 7 for _, dtype, lo, hi in calls)
    assert {lo for _, _, lo, _ in calls} >= {1, 2}
    # the sampled estimators too: the integer steps themselves (no time_scale for a user's net)
    calls.clear()
    m.elbo(torch.zeros(3, 4))
    m.eval()  # a cold loss-aware proposal fits its pilot here: more calls, still net(x_t, t)
    m.elbo(torch.zeros(3, 4))
    assert len(calls) >= 2
    assert all(dtype == torch.long and 1 <= lo <= hi <= 7 for _, dtype, lo, hi in calls)
    # the state: the user's parameters, and the loss-aware proposal's statistics (default)
    assert list(m.state_dict()) == [
        "decoder.net.scale",
        "loss_moments.mean_sq",
        "loss_moments.seen",
    ]
    uniform = genkit.create_model("vdm", (4,), timesteps=7, net=Zero(), t_proposal="uniform")
    assert list(uniform.state_dict()) == ["decoder.net.scale"]


def test_default_denoisers_see_the_step_itself_in_discrete_time():
    """``time_scale`` is 1 in discrete time (1000 in continuous time, where t is in [0, 1]):
    the embedding of the default nets sees the integer step."""
    from genkit_vdm.unet import MLPDenoiser

    for shape in [(5,), (1, 8, 8)]:
        discrete = genkit.create_model("vdm", shape, timesteps=10, channels=8, hidden=16)
        continuous = genkit.create_model("vdm", shape, timesteps=0, channels=8, hidden=16)
        assert discrete.net.time_scale == 1.0 and continuous.net.time_scale == 1000.0
    torch.manual_seed(0)
    net = MLPDenoiser(3, hidden=8, depth=1)
    torch.nn.init.normal_(net.net[-1].weight)  # not the zero output layer: t must show
    scaled = MLPDenoiser(3, hidden=8, depth=1, time_scale=1000.0)
    scaled.load_state_dict(net.state_dict())
    x, t = torch.randn(2, 3), torch.tensor([0.003, 0.5])
    torch.testing.assert_close(scaled(x, t), net(x, 1000 * t))
    assert not torch.allclose(net(x, t), net(x, 1000 * t))


def test_decoder_is_the_discretized_gaussian_with_scale_sqrt_beta_1():
    m = genkit.create_model("vdm", (1, 4, 4), timesteps=10, channels=8)
    x1 = torch.zeros(2, 1, 4, 4)
    dec = m.decoder(x1)
    assert isinstance(dec.base_dist, DiscretizedGaussian)
    torch.testing.assert_close(dec.base_dist.scale, torch.full_like(x1, 1e-4**0.5))
    # zero-initialised eps-net: x0_hat(x1, 1) = x1 / sqrt(alpha_1)
    torch.testing.assert_close(dec.base_dist.loc, x1 / (1 - 1e-4) ** 0.5)
    vec = genkit.create_model("vdm", (3,), timesteps=10)
    assert type(vec.decoder(torch.zeros(2, 3)).base_dist).__name__ == "Normal"


def test_bad_parameters_are_clear_errors():
    with pytest.raises(ConfigError, match="parameterization"):
        genkit.create_model("vdm", (3,), parameterization="score")
    with pytest.raises(ConfigError, match="did you mean 'timesteps'"):
        genkit.create_model("vdm", (3,), timestep=10)
    with pytest.raises(InvalidParameterError, match=r"nn\.Module"):
        genkit.create_model("vdm", (3,), net=lambda x, t: x)
    with pytest.raises(InvalidParameterError, match="images"):
        genkit.create_model("vdm", (3,), denoiser="unet")
    with pytest.raises(ConfigError, match="Length of 'channel_mults' must be >= 1"):
        genkit.create_model("vdm", (1, 8, 8), channel_mults=[])
    with pytest.raises(ConfigError, match="'channel_mults' must be >= 1: 0"):
        genkit.create_model("vdm", (1, 8, 8), channel_mults=[1, 0])

    class Narrow(nn.Module):
        def forward(self, x_t, t):
            return x_t[:, :2]

    wrong = genkit.create_model("vdm", (3,), timesteps=5, net=Narrow())
    with pytest.raises(InvalidParameterError, match=r"shape \(2, 2\) for x_t of shape \(2, 3\)"):
        wrong.elbo(torch.zeros(2, 3))
