"""The continuous VDM's decoder ``p(x|z_0)`` on 8-bit images: Kingma et al.'s softmax over the
256 values (the default) or the bin mass, chosen by ``decoder``; the ELBO, sampling and the
ODE with either."""

import pytest
import torch
from genkit_vdm.continuous_elbo import reconstruction
from torch.distributions import Independent, Normal

import genkit
from genkit.distributions import DiscretizedGaussian, GridGaussian, eight_bit, to_model_scale
from genkit.errors import InvalidParameterError

SMALL = dict(timesteps=0, denoiser="mlp", hidden=16, depth=1, fourier=[], schedule="fixed_linear")


def _model(decoder="auto", seed=0, shape=(1, 4, 4)):
    torch.manual_seed(seed)
    return genkit.create_model("vdm", shape, decoder=decoder, **SMALL)


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return to_model_scale(torch.randint(0, 256, (n, 1, 4, 4), generator=g))


@pytest.mark.parametrize(
    ("decoder", "kind"),
    [("auto", GridGaussian), ("softmax", GridGaussian), ("bin_mass", DiscretizedGaussian)],
)
def test_decoder_parameter_picks_the_distribution(decoder, kind):
    m = _model(decoder)
    dist = m.decoder(torch.zeros(2, 1, 4, 4))
    assert isinstance(dist, Independent) and isinstance(dist.base_dist, kind)
    assert dist.event_shape == (1, 4, 4)


def test_decoder_is_checked_against_time_and_likelihood():
    with pytest.raises(InvalidParameterError, match="continuous time only"):
        genkit.create_model("vdm", (1, 4, 4), timesteps=5, decoder="softmax", denoiser="mlp")
    with pytest.raises(InvalidParameterError, match="density"):
        genkit.create_model("vdm", (4,), timesteps=0, decoder="softmax")
    with pytest.raises(InvalidParameterError, match="decoder"):
        genkit.create_model("vdm", (1, 4, 4), timesteps=0, decoder="kingma")
    vectors = genkit.create_model("vdm", (4,), timesteps=0)
    assert isinstance(vectors.decoder(torch.zeros(2, 4)).base_dist, Normal)


def test_switching_the_decoder_changes_only_the_reconstruction():
    """Same weights, same draws: the prior and diffusion terms agree to the bit, the terms sum
    to the total, and at one z_0 the softmax's reconstruction is the bin mass's plus the gap
    computed from the two distributions, positive at lambda(0) = 13.3."""
    x = _images()
    soft, binm = _model("softmax"), _model("bin_mass")
    binm.load_state_dict(soft.state_dict())
    out = {}
    for name, m in (("softmax", soft), ("bin_mass", binm)):
        torch.manual_seed(5)
        out[name] = m.elbo(x, t_samples=2)
    for term in ("prior_matching", "denoising_matching"):
        assert torch.equal(out["softmax"].terms[term], out["bin_mass"].terms[term])
    for terms in out.values():
        assert set(terms.terms) == {"reconstruction", "prior_matching", "denoising_matching"}
        torch.testing.assert_close(terms.total, sum(terms.terms.values()))
    # the reconstruction term itself at one z_0, replayed by hand
    lam0 = torch.tensor(13.3)
    recon = {}
    for name, m in (("softmax", soft), ("bin_mass", binm)):
        torch.manual_seed(7)
        recon[name] = reconstruction(m, x, lam0)
    torch.manual_seed(7)
    alpha, sigma = torch.sigmoid(lam0).sqrt(), torch.sigmoid(-lam0).sqrt()
    z_0 = alpha * x + sigma * torch.randn_like(x)
    loc, scale = z_0 / alpha, torch.full_like(x, torch.exp(-lam0 / 2).item())
    gap = GridGaussian(loc, scale).log_prob(x) - DiscretizedGaussian(loc, scale).log_prob(x)
    torch.testing.assert_close(
        recon["softmax"], GridGaussian(loc, scale).log_prob(x).flatten(1).sum(1)
    )
    torch.testing.assert_close(
        recon["softmax"] - recon["bin_mass"], gap.flatten(1).sum(1), rtol=1e-5, atol=1e-4
    )
    assert (gap.flatten(1).sum(1) > 0).all()  # tighter at lambda(0) = 13.3 on every image


def test_sampling_ends_with_the_softmax_decoder():
    m = _model("softmax").eval()
    a = m.sample(5, generator=torch.Generator().manual_seed(0), steps=3, final="sample")
    b = m.sample(5, generator=torch.Generator().manual_seed(0), steps=3, final="sample")
    assert torch.equal(a, b) and bool(eight_bit.check(a).all())
    mode = m.sample(5, generator=torch.Generator().manual_seed(0), steps=3)
    assert bool(eight_bit.check(mode).all())
    # at lambda(0) = 13.3 the decoder is sharp (scale 0.0013, a sixth of a bin): a draw is
    # nearly always the mode
    assert (a == mode).float().mean() > 0.9


def test_ode_dequantizes_8bit_data_under_either_decoder():
    """The ODE's bound is on the 8-bit data (uniform dequantization), whatever p(x|z_0): off-grid
    data are refused by both."""
    for decoder in ("softmax", "bin_mass"):
        m = _model(decoder).eval()
        with pytest.raises(InvalidParameterError, match="8-bit"):
            m.elbo(_images() + 1e-3, "ode", rtol=1e-2, atol=1e-2)


def test_the_report_names_the_decoder():
    from genkit.recipes.runner import describe_decoder

    assert describe_decoder(_model()) == "softmax over the 256 values"
    assert describe_decoder(_model("bin_mass")) == "discretized_gaussian"
    assert describe_decoder(genkit.create_model("vdm", (4,), timesteps=0)) == "gaussian"
