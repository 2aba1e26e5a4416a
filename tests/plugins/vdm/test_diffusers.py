"""diffusers interop: the UNet2DModel denoiser, import of a DDPMPipeline, export back.

Every number genkit computes is checked against diffusers' own schedulers (their tables and
their ``step``) or a hand computation from those tables; the networks are tiny random
UNet2DModels (1 x 8 x 8, two levels of 8 and 16 channels)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import genkit
from genkit.errors import ConfigError, DataError, IncompatibleModelError, InvalidParameterError

diffusers = pytest.importorskip("diffusers")

T = 100
SHAPE = (1, 8, 8)
UNET = {
    "block_out_channels": (8, 16),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


def tiny_unet(out_channels: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=out_channels, **UNET)


def save_pipeline(folder, *, out_channels: int = 1, scheduler_cls=None, **scheduler) -> str:
    """A tiny DDPMPipeline saved with save_pretrained; returns the folder."""
    scheduler = {"num_train_timesteps": T, "clip_sample": False, **scheduler}
    sched = (scheduler_cls or diffusers.DDPMScheduler)(**scheduler)
    diffusers.DDPMPipeline(unet=tiny_unet(out_channels), scheduler=sched).save_pretrained(folder)
    return str(folder)


def pixels(n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *SHAPE), generator=g) / 127.5 - 1.0


# -- schedules ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        {"beta_schedule": "linear"},
        {"beta_schedule": "linear", "beta_start": 2e-4, "beta_end": 0.04},
        {"beta_schedule": "scaled_linear", "beta_start": 8.5e-4, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"trained_betas": torch.linspace(1e-3, 0.2, 37).tolist(), "num_train_timesteps": 37},
    ],
)
def test_imported_alphas_cumprod_equal_the_schedulers(config):
    from genkit.diffusers_io import vdm_params
    from genkit.registry import get_catalog

    config = {"num_train_timesteps": 250, **config}
    sched = diffusers.DDPMScheduler(**config)
    unet_cfg = {"sample_size": 8, "in_channels": 1, "out_channels": 1}
    _, params = vdm_params(unet_cfg, dict(sched.config), "DDPMScheduler")
    schedule = get_catalog().build(
        "schedules", "diffusers", timesteps=params["timesteps"], **params["schedule_params"]
    )
    expected = sched.alphas_cumprod.double()  # diffusers' index i is genkit's step i + 1
    assert schedule.timesteps == expected.numel()
    torch.testing.assert_close(schedule.alpha_bars, expected, rtol=2e-6, atol=1e-7)


# -- the reverse step against DDPMScheduler.step -----------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_reverse_step_equals_the_schedulers_step(tmp_path, prediction_type, variance_type):
    out_channels = 2 if variance_type == "learned_range" else 1
    path = save_pipeline(
        tmp_path / "p",
        out_channels=out_channels,
        prediction_type=prediction_type,
        variance_type=variance_type,
        beta_schedule="squaredcos_cap_v2",
    )
    model = genkit.from_diffusers(path)
    pipe = diffusers.DDPMPipeline.from_pretrained(path)
    assert model.decoder.parameterization == {"epsilon": "eps", "v_prediction": "v"}.get(
        prediction_type, "x0"
    )
    x_t = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(2))
    for i in (1, 42, T - 1):  # diffusers' index i = genkit's step t = i + 1
        with torch.no_grad():
            out = pipe.unet(x_t, i).sample
            res = pipe.scheduler.step(out, i, x_t, generator=torch.Generator().manual_seed(i))
            noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(i))
            t = torch.full((3,), i + 1)
            pred = model.decoder.predict(x_t, t)
            step = model.decoder.step_from(x_t, t, pred)
        torch.testing.assert_close(pred.x0, res.pred_original_sample, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            step.mean + step.stddev * noise, res.prev_sample, rtol=1e-4, atol=1e-5
        )


def test_learned_range_variance_by_hand(tmp_path):
    """log sigma^2 = f log beta_t + (1 - f) log beta-tilde_t, f = (v + 1) / 2, with
    beta-tilde_1 replaced by beta-tilde_2 (improved-diffusion's clipped log-variance)."""
    path = save_pipeline(tmp_path / "p", out_channels=2, variance_type="learned_range")
    model = genkit.from_diffusers(path)
    sched = diffusers.DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    betas = sched.betas.double()
    ac = torch.cumprod(1 - betas, 0)  # in float64: diffusers' float32 1 - alpha_bar_1 has 3 digits
    tilde = betas[1:] * (1 - ac[:-1]) / (1 - ac[1:])  # beta-tilde at diffusers' i = 1..T-1
    clipped = torch.cat([tilde[:1], tilde])
    v = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    for i in (0, 1, 50, T - 1):
        f = (v.double() + 1) / 2
        expected = f * betas[i].log() + (1 - f) * clipped[i].log()
        got = model.decoder.log_variance(torch.full((2,), i + 1), v, v)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # and the decoder's scale at t = 1 uses it
    x1 = torch.randn(2, *SHAPE)
    with torch.no_grad():
        pred = model.decoder.predict(x1, torch.ones(2, dtype=torch.long))
        scale = model.decoder.decoder_from(pred).base_dist.scale
    f = (pred.var.double() + 1) / 2
    expected = (0.5 * (f * betas[0].log() + (1 - f) * clipped[0].log())).exp()
    torch.testing.assert_close(scale.double(), expected, rtol=1e-5, atol=1e-8)


# -- the ELBO ----------------------------------------------------------------------------
def _log_cdf_bins(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Ho et al.'s discretized Gaussian log-likelihood of 8-bit x in [-1, 1], element-wise."""
    inv = torch.exp(-log_scale)
    cdf = torch.distributions.Normal(0.0, 1.0).cdf
    upper = torch.where(x > 0.999, torch.ones_like(x), cdf(inv * (x - mean + 1 / 255)))
    lower = torch.where(x < -0.999, torch.zeros_like(x), cdf(inv * (x - mean - 1 / 255)))
    return torch.log((upper - lower).clamp(min=1e-12))


def hand_elbo(pipe, x0: torch.Tensor) -> torch.Tensor:
    """One draw of the exact-in-t ELBO (nats, (B,)) from diffusers' tables and its step:
    log p(x0|x1) - sum_{i>=1} KL(q(x_{i-1}|x_i,x0) || p) - KL(q(x_T|x0) || N(0, I)),
    fixed_small (Ho et al.): sigma^2 = beta-tilde, beta-tilde_2 at the decoder."""
    s = pipe.scheduler
    betas = s.betas.double()
    ac = torch.cumprod(1 - betas, 0)
    tilde = betas[1:] * (1 - ac[:-1]) / (1 - ac[1:])
    tilde = torch.cat([tilde[:1], tilde])  # index 0: beta-tilde_2, Ho et al.'s clipped value
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for i in range(s.config.num_train_timesteps):
        eps = torch.randn_like(x0)
        x_t = s.add_noise(x0, eps, torch.tensor([i]))
        with torch.no_grad():
            out = pipe.unet(x_t, i).sample
        res = s.step(out, i, x_t, generator=torch.Generator().manual_seed(i))
        if i == 0:
            mean, log_scale = res.pred_original_sample.double(), 0.5 * tilde[0].log()
            total += _log_cdf_bins(x0.double(), mean, log_scale.expand_as(mean)).sum((1, 2, 3))
            continue
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(i))
        mean_p = (res.prev_sample - tilde[i].sqrt().float() * noise).double()
        a_prev = ac[i - 1]
        mean_q = (
            a_prev.sqrt() * betas[i] * x0.double()
            + (1 - betas[i]).sqrt() * (1 - a_prev) * x_t.double()
        ) / (1 - ac[i])
        kl = 0.5 * (mean_q - mean_p).square() / tilde[i]  # equal variances
        total -= kl.sum((1, 2, 3))
    aT = ac[-1]
    prior = 0.5 * (aT * x0.double().square() + (1 - aT) - 1 - (1 - aT).log())
    return total - prior.sum((1, 2, 3))


def test_imported_elbo_matches_a_hand_sum_over_every_t(tmp_path):
    path = save_pipeline(tmp_path / "p")
    model = genkit.from_diffusers(path)
    pipe = diffusers.DDPMPipeline.from_pretrained(path)
    x = pixels(4)
    torch.manual_seed(0)
    with torch.no_grad():
        ours = torch.stack([model.elbo(x, t_samples=None).total.sum() for _ in range(4)])
    theirs = torch.stack([hand_elbo(pipe, x).sum() for _ in range(4)])
    se = math.sqrt(ours.var().item() / 4 + theirs.var().item() / 4)
    assert abs(ours.double().mean().item() - theirs.mean().item()) < 3 * se + 1e-3 * abs(
        theirs.mean().item()
    )


def test_imported_elbo_equals_native_vdm_with_the_same_network(tmp_path):
    from genkit_vdm.diffusers_unet import DiffusersUNet

    path = save_pipeline(tmp_path / "p", prediction_type="v_prediction")
    imported = genkit.from_diffusers(path)
    native = genkit.create_model(
        "vdm",
        SHAPE,
        timesteps=T,
        schedule="linear",
        parameterization="v",
        variance="fixed_small",
        net=DiffusersUNet(imported.net.unet),
    ).eval()
    x = pixels(3)
    with torch.no_grad():
        torch.manual_seed(5)
        a = imported.elbo(x, t_samples=None)
        torch.manual_seed(5)
        b = native.elbo(x, t_samples=None)
    for name in a.terms:
        torch.testing.assert_close(a.terms[name], b.terms[name], rtol=1e-5, atol=1e-4)


# -- the denoiser in a genkit VDM, export and back ---------------------------------------
def test_diffusers_denoiser_trains_and_exports_to_a_loadable_pipeline(tmp_path):
    from genkit.diffusers_io import export_diffusers

    model = genkit.create_model(
        "vdm",
        SHAPE,
        timesteps=50,
        schedule="cosine",
        parameterization="eps",
        denoiser="diffusers",
        unet=UNET,
        clip_denoised=False,
    )
    assert type(model.net.unet).__name__ == "UNet2DModel"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = pixels(8)
    for _ in range(3):
        loss = -model.elbo(x).total.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = export_diffusers(model, tmp_path / "exported")
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    torch.testing.assert_close(
        pipe.scheduler.betas.double(), model.encoder.betas[1:], rtol=1e-5, atol=1e-7
    )
    assert not list(tmp_path.glob(".exported*"))  # the temporary folder is gone
    with pytest.raises(genkit.OutputError, match="exists"):
        export_diffusers(model, out)

    # same initial and per-step noise: diffusers' loop and genkit's ancestral sampler agree
    n = 2
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        x_t = torch.randn((n, *SHAPE), generator=g)
        pipe.scheduler.set_timesteps(50)
        for i in pipe.scheduler.timesteps:
            x_t = pipe.scheduler.step(pipe.unet(x_t, i).sample, i, x_t, generator=g).prev_sample
        ours = model.sample(n, generator=torch.Generator().manual_seed(7), clip=False)
    levels = torch.round((x_t.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
    assert (
        ours - levels
    ).abs().max() <= 2 / 255 + 1e-6  # genkit quantizes; bin edges may differ by one
    assert (ours - levels).abs().gt(1e-6).float().mean() < 0.05
    images = pipe(batch_size=1, num_inference_steps=50, generator=g, output_type="np").images
    assert images.shape == (1, 8, 8, 1)

    again = genkit.from_diffusers(out)
    assert again.decoder.variance == "posterior"  # genkit.json keeps the decoder's sqrt(beta_1)
    with torch.no_grad():
        torch.manual_seed(3)
        a = model.elbo(x, t_samples=None).total
        torch.manual_seed(3)
        b = again.elbo(x, t_samples=None).total
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_an_export_carries_the_loss_aware_statistics_back_into_the_import(tmp_path):
    """genkit.json holds E[L_t^2] and its counts, so the re-imported model evaluates with the
    native model's proposal (the same draws and network calls), not a pilot fit of its own;
    statistics of another length are one line."""
    from genkit.diffusers_io import GENKIT_FILE, export_diffusers

    model = genkit.create_model(
        "vdm", SHAPE, timesteps=50, denoiser="diffusers", unet=UNET, clip_denoised=False
    ).eval()
    steps = torch.arange(1, 51, dtype=torch.float64)
    model.loss_moments.mean_sq.copy_(1e4 / steps)  # warm: every step seen history times
    model.loss_moments.seen.fill_(model.config.t_history)
    again = genkit.from_diffusers(export_diffusers(model, tmp_path / "e"))
    assert torch.equal(again.loss_moments.mean_sq, model.loss_moments.mean_sq)
    assert torch.equal(again.loss_moments.seen, model.loss_moments.seen)
    x = pixels(4)
    with torch.no_grad():
        torch.manual_seed(3)
        a = model.elbo(x)
        torch.manual_seed(3)
        b = again.elbo(x)
    assert a.nfe == b.nfe
    torch.testing.assert_close(a.total, b.total, rtol=1e-5, atol=1e-4)

    model.loss_moments.seen.zero_()  # nothing recorded: nothing written, the import fits a pilot
    bare = genkit.from_diffusers(export_diffusers(model, tmp_path / "bare"))
    assert "loss_moments" not in json.loads((tmp_path / "bare" / GENKIT_FILE).read_text())
    with torch.no_grad():
        assert bare.elbo(x).nfe > a.nfe

    info = json.loads((tmp_path / "e" / GENKIT_FILE).read_text())
    info["loss_moments"]["seen"] = info["loss_moments"]["seen"][:-1]
    (tmp_path / "e" / GENKIT_FILE).write_text(json.dumps(info))
    with pytest.raises(
        IncompatibleModelError, match="50 mean_sq and 49 seen entries; the scheduler has 50 steps"
    ):
        genkit.from_diffusers(tmp_path / "e")


# -- command line ------------------------------------------------------------------------
def test_cli_eval_diffusers_on_digits(tmp_path):
    from click.testing import CliRunner

    from genkit.cli import cli

    path = save_pipeline(tmp_path / "p", num_train_timesteps=20)
    result = tmp_path / "r.json"
    args = ["eval", f"diffusers:{path}", "--data", "builtin:digits", "--cache-dir", str(tmp_path)]
    run = CliRunner().invoke(cli, [*args, "--mc-se", "0", "--json", str(result)])
    assert run.exit_code == 0, run.output
    got = json.loads(result.read_text())
    assert got["estimator"] == "denoising_matching" and got["bits_per_dim"]["mc_se"] > 0
    assert math.isfinite(got["bits_per_dim"]["mean"]) and got["bits_per_dim"]["se"] > 0
    run = CliRunner().invoke(cli, ["eval", f"diffusers:{path}"])
    assert run.exit_code == 1 and "--data" in run.output and "Traceback" not in run.output


# -- errors ------------------------------------------------------------------------------
def test_missing_folder_and_incompatible_pipelines_are_one_line(tmp_path):
    with pytest.raises(IncompatibleModelError, match="no such folder"):
        genkit.from_diffusers(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IncompatibleModelError, match=r"model_index\.json"):
        genkit.from_diffusers(tmp_path / "empty")
    ldm = tmp_path / "ldm"
    save_pipeline(ldm)
    index = json.loads((ldm / "model_index.json").read_text())
    index |= {"_class_name": "LDMPipeline", "vqvae": ["diffusers", "VQModel"]}
    (ldm / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(IncompatibleModelError, match=r"latent-diffusion.*not on pixels"):
        genkit.from_diffusers(ldm)


@pytest.mark.parametrize(
    "scheduler, unet, match",
    [
        ({"beta_schedule": "sigmoid"}, {}, "beta_schedule 'sigmoid'"),
        ({"variance_type": "learned"}, {}, "variance_type 'learned'"),
        ({"prediction_type": "flow"}, {}, "prediction_type 'flow'"),
        ({"rescale_betas_zero_snr": True}, {}, "rescale_betas_zero_snr"),
        ({}, {"num_class_embeds": 10}, "class-conditional"),
        ({"variance_type": "learned_range"}, {}, "2 output channels|needs 2"),
    ],
)
def test_unsupported_configs_are_one_line(scheduler, unet, match):
    from genkit.diffusers_io import vdm_params

    unet = {"sample_size": 8, "in_channels": 1, "out_channels": 1, **unet}
    with pytest.raises(IncompatibleModelError, match=match):
        vdm_params(unet, scheduler, "DDPMScheduler")
    with pytest.raises(IncompatibleModelError, match="EulerDiscreteScheduler"):
        vdm_params(unet, {}, "EulerDiscreteScheduler")


def test_data_of_another_shape_is_one_line(tmp_path):
    from click.testing import CliRunner

    from genkit.cli import cli

    path = tmp_path / "p3"
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, **UNET)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(10)).save_pretrained(path)
    run = CliRunner().invoke(
        cli, ["eval", f"diffusers:{path}", "--data", "builtin:digits", "--cache-dir", str(tmp_path)]
    )
    assert run.exit_code == 1 and "shape" in run.output and "Traceback" not in run.output


def test_bad_denoiser_params_are_one_line():
    with pytest.raises(InvalidParameterError, match="does not take"):
        genkit.create_model("vdm", SHAPE, denoiser="diffusers", unet={**UNET, "chanels": 3})
    with pytest.raises(InvalidParameterError, match="sample_size"):
        genkit.create_model("vdm", SHAPE, denoiser="diffusers", unet={**UNET, "sample_size": 16})
    with pytest.raises(InvalidParameterError, match="needs denoiser='diffusers'"):
        genkit.create_model("vdm", SHAPE, unet=UNET)
    with pytest.raises(ConfigError, match="variance"):
        genkit.create_model("vdm", SHAPE, variance="huge")
    assert DataError  # imported for the CLI test's class of error
