"""Helpers for the trainer tests, importable by the tests (via conftest) and by the child
processes they start (which add this folder to ``sys.path``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from genkit.elbo import ELBOTerms
from genkit.model import LatentVariableModel

DATA_SHAPE = (1, 8, 8)


def ddp_config():
    """The two-process DDP test's settings: the same in each rank and in the one process that
    takes the combined batch."""
    from genkit.training import TrainConfig

    return TrainConfig(
        steps=1,
        batch_size=32,
        lr=0.05,
        lr_warmup_steps=0,
        grad_clip=0.5,
        objective_weights={"surrogate": 0.3},
        device="cpu",
    )


def invoke(*args, code: int = 0) -> str:
    """Run the click CLI in this process (as ``genkit ARGS``), check the exit code, return the
    output."""
    from click.testing import CliRunner

    from genkit.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def tiny_images(n: int = 96, seed: int = 0, shape: tuple[int, ...] = DATA_SHAPE) -> Tensor:
    """``n`` images of 8-bit data on the model scale ``k / 127.5 - 1``: a few noisy blobs, so
    a VAE has something to learn."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.randint(1, h - 1, (n, 2), generator=g)
    d2 = (yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2  # (n, h, w)
    img = torch.exp(-d2 / 3.0).unsqueeze(1).expand(n, c, h, w)
    img = img + 0.05 * torch.rand(n, c, h, w, generator=g)
    k = (img.clamp(0, 1) * 255).round()
    return k / 127.5 - 1.0


def tiny_vae(seed: int = 0):
    import genkit

    torch.manual_seed(seed)
    return genkit.create_model("vae", DATA_SHAPE, latent_dim=4, hidden=32, net="mlp")


class TinyModel(LatentVariableModel):
    """A deterministic stand-in with a known ELBO (no sampling), for exact comparisons::

        reconstruction = -1/2 ||x - W x - b||^2,   prior_matching = -1/2 exp(s) mean((W x)^2)

    and an extra ``surrogate = 2 * reconstruction``. ``nan_at`` makes the ``term`` NaN at
    that training call (1-based).
    """

    def __init__(
        self,
        shape: tuple[int, ...] = DATA_SHAPE,
        nan_at: int | None = None,
        term: str = "reconstruction",
    ) -> None:
        super().__init__(shape)
        d = math.prod(shape)
        self.lin = nn.Linear(d, d)
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.nan_at, self.term, self.calls = nan_at, term, 0

    def elbo(self, x: Tensor, estimator=None, **params) -> ELBOTerms:
        flat = x.flatten(1)  # (B, D)
        y = self.lin(flat)
        terms = {
            "reconstruction": -0.5 * ((flat - y) ** 2).sum(1),
            "prior_matching": -0.5 * self.log_scale.exp() * (y**2).mean(1),
        }
        if self.training:
            self.calls += 1
            if self.calls == self.nan_at:
                terms[self.term] = terms[self.term] * float("nan")
        extras = {"surrogate": 2.0 * terms["reconstruction"]}
        return ELBOTerms(terms=terms, extras=extras, num_dims=self.num_dims)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(n, *self.data_shape, generator=generator, device=self.device)
        return u * 2 - 1


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
