"""The abstract parts of every genkit model: ``Encoder`` q(z|x), ``Decoder`` p(x|z), ``Prior``
p(z), and the :class:`LatentVariableModel` that holds them.

Each part is an ``nn.Module`` whose call returns a :class:`torch.distributions.Distribution`,
so that ``torch.distributions.kl_divergence`` and other libraries work on what it returns.
"""

from __future__ import annotations

import abc
import math
import numbers
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

if TYPE_CHECKING:
    from genkit.elbo import ELBO, ELBOTerms


class Encoder(nn.Module, abc.ABC):
    """The variational posterior ``q(z | x)``: ``encoder(x)`` returns a distribution over z."""

    @abc.abstractmethod
    def forward(self, x: Tensor) -> Distribution:
        """``x: (B, *data_shape)`` -> ``q(z | x)`` with batch shape ``(B,)``."""


class Decoder(nn.Module, abc.ABC):
    """The likelihood ``p(x | z)``: ``decoder(z)`` returns a distribution over x."""

    @abc.abstractmethod
    def forward(self, z: Tensor) -> Distribution:
        """``z: (B, *latent_shape)`` -> ``p(x | z)`` with batch shape ``(B,)`` and event
        shape ``data_shape``."""


class Prior(nn.Module, abc.ABC):
    """The prior ``p(z)``: ``prior()`` returns a distribution over z with batch shape ``()``."""

    @abc.abstractmethod
    def forward(self) -> Distribution:
        """``p(z)``, on the device of the module's buffers/parameters."""


class StandardNormalPrior(Prior):
    """``p(z) = N(0, I)`` over latents of ``shape``."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.register_buffer("_zero", torch.zeros(()), persistent=False)

    def forward(self) -> Distribution:
        from genkit.distributions import standard_normal

        return standard_normal(self.shape, like=self._zero.expand(self.shape))


class LatentVariableModel(nn.Module, abc.ABC):
    """A latent-variable model trained by maximising its ELBO.

    Subclasses set ``data_shape`` and the parts ``encoder``, ``decoder`` and ``prior``, and say
    which estimator ``elbo`` uses by default. Everything the trainer needs is ``elbo(x)``; image
    logging also uses ``sample(n)``.
    """

    #: The estimator ``elbo(x)`` uses when none is given: a registered name or an instance.
    default_estimator: str | ELBO = "elbo"

    def __init__(self, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.data_shape = tuple(int(d) for d in data_shape)

    @property
    def num_dims(self) -> int:
        """``D``, the number of data dimensions (the denominator of bits/dim)."""
        return math.prod(self.data_shape)

    @property
    def train_defaults(self) -> dict[str, Any]:
        """Optimisation settings (fields of :class:`genkit.training.TrainConfig`, those in
        ``genkit.training.config.MODEL_DEFAULT_FIELDS``) this model trains best with, where
        they differ from the trainer's shared defaults: ``genkit train`` and ``genkit run``
        put them under whatever the user sets (``--set``, a recipe's ``[train]``). None by
        default; a plugin's model overrides this property to declare its own."""
        return {}

    def elbo(self, x: Tensor, estimator: str | ELBO | None = None, **params: Any) -> ELBOTerms:
        """A Monte-Carlo estimate of ``ELBO = E_q[log p(x, z) - log q(z | x)]`` for the batch
        ``x: (B, *data_shape)``, as per-sample :class:`~genkit.elbo.ELBOTerms` in nats.

        ``estimator`` is a registered estimator name (``params`` go to its factory) or an
        :class:`~genkit.elbo.ELBO` instance; ``None`` uses ``default_estimator``. See
        :meth:`estimator`.
        """
        from genkit.errors import InvalidParameterError

        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = f"{x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
            raise InvalidParameterError(
                f"elbo() needs a float tensor x on the model scale (8-bit pixels k as "
                f"x = k / 127.5 - 1, see genkit.distributions.to_model_scale), got a {got}"
            )
        if tuple(x.shape[1:]) != self.data_shape:
            raise InvalidParameterError(
                f"elbo() needs x of shape (B, {', '.join(map(str, self.data_shape))}) for "
                f"data_shape {self.data_shape}, got {tuple(x.shape)}"
            )
        return self.estimator(estimator, **params)(self, x)

    def estimator(
        self, name: str | ELBO | None = None, *, evaluation: bool = False, **params: Any
    ) -> ELBO:
        """The :class:`~genkit.elbo.ELBO` object that ``elbo(x, name, **params)`` uses.

        ``name``: a registered estimator name (built with ``params``), an instance (then no
        ``params``), or ``None`` for ``default_estimator``. ``evaluation=True`` asks for the
        estimator a model prefers for measuring its likelihood (more draws per call, say); by
        default it is the same one. Build it once to reuse it across calls, as
        :func:`genkit.evaluation.evaluate` does (an estimator may keep state between calls).
        """
        from genkit.elbo import ELBO
        from genkit.errors import InvalidParameterError
        from genkit.registry import create_estimator

        name = self.default_estimator if name is None else name
        if isinstance(name, ELBO):
            if params:
                raise InvalidParameterError(
                    f"elbo() got parameters {sorted(params)} with an estimator instance "
                    f"({type(name).__name__}); pass them to the estimator instead"
                )
            return name
        return create_estimator(name, **params)

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws from the model, shape ``(n, *data_shape)``, on the data scale.
        Implementations check ``n`` with :func:`check_count`."""

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")


def check_count(name: str, value: Any) -> int:
    """``value`` if it is an integer >= 1 (a number of samples, draws, ...), else one
    :class:`~genkit.errors.InvalidParameterError` line naming ``name``."""
    from genkit.errors import InvalidParameterError

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_sample_params(
    model: LatentVariableModel, params: dict[str, Any], name: str, option: str = "sample_params"
) -> dict[str, Any]:
    """``params`` if each is a keyword ``model.sample`` takes besides ``n`` and ``generator``
    (anything, if it takes ``**kwargs``), else one :class:`~genkit.errors.InvalidParameterError`
    line naming model ``name``, the key (with "did you mean") and the keys it takes."""
    import inspect

    from genkit.config import did_you_mean
    from genkit.errors import InvalidParameterError

    accepted = list(inspect.signature(model.sample).parameters.values())
    fixed = {"n": "-n", "generator": "--seed"}
    settable = [
        p.name
        for p in accepted
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in fixed
    ]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted)
    for key in params:
        if key in fixed:
            raise InvalidParameterError(f"{option} {key}: set it with {fixed[key]}, not {option}")
        if key not in settable and not takes_any:
            raise InvalidParameterError(
                f"model '{name}' sample() has no parameter '{key}'{did_you_mean(key, settable)} "
                f"(its parameters: {', '.join(settable) or 'none'})"
            )
    return params
