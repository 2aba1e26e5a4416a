"""Models from diffusers and back: a ``DDPMPipeline`` as a discrete genkit VDM, and a genkit
VDM trained with the diffusers denoiser as a ``DDPMPipeline`` folder (docs/diffusers.md).

Import (:func:`from_diffusers`) reads the pipeline's ``UNet2DModel`` and its ``DDPMScheduler``
or ``DDIMScheduler`` config and builds ``create_model("vdm", (C, H, W), denoiser="diffusers",
schedule="diffusers", ...)`` with the UNet's weights. The translation:

- steps: diffusers' index ``i = 0..T-1`` is genkit's step ``t = i + 1`` (``alphas_cumprod[i] =
  alpha_bar_{i+1}``; the denoiser is called at ``t - 1``);
- betas: ``beta_schedule`` ``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` (with
  ``beta_start``, ``beta_end``) or ``trained_betas``, recomputed in float64;
- ``prediction_type``: ``epsilon`` -> ``eps``, ``v_prediction`` -> ``v``, ``sample`` -> ``x0``;
- ``variance_type``: ``fixed_small`` (and ``_log``), ``fixed_large`` (and ``_log``),
  ``learned_range`` -> genkit's ``variance`` of the same name (DDIM: ``fixed_small``);
- ``clip_sample`` -> ``clip_denoised`` (the sampler only; ``thresholding`` is not reproduced:
  neither changes the ELBO, which is that of the unclipped reverse process);
- pixels: the pipelines' images are ``x = 2 k / 255 - 1`` in [-1, 1] (``DDPMPipeline`` returns
  ``(x / 2 + 0.5).clamp(0, 1)``), which is identical to genkit's scale ``x = k / 127.5 - 1``.

diffusers is imported lazily; without the ``diffusers`` extra the functions say so in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from genkit.errors import IncompatibleModelError, MissingDependencyError, OutputError

#: Pipelines genkit reads: pixel-space, unconditional, one UNet2DModel and a DDPM-family scheduler.
PIPELINES = ("DDPMPipeline", "DDIMPipeline")
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
VARIANCES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}
#: A file genkit adds to an exported folder: the settings diffusers' config has no key for.
GENKIT_FILE = "genkit.json"


def require_diffusers() -> Any:
    """The ``diffusers`` module, or :class:`MissingDependencyError` saying how to get it."""
    try:
        import diffusers
    except ImportError:
        raise MissingDependencyError(
            "diffusers is not installed: pip install 'genkit[diffusers]' (or pip install diffusers)"
        ) from None
    return diffusers


def _check_pipeline_class(name: str, components: set[str], where: str) -> None:
    latent = {"vae", "vqvae", "text_encoder"} & components
    if latent or "LDM" in name or "Latent" in name or "StableDiffusion" in name:
        raise IncompatibleModelError(
            f"{where}: {name} is a latent-diffusion pipeline; its bound is on the autoencoder's "
            "latents, not on pixels, so it has no bits/dim of the images: genkit reads "
            f"pixel-space {' / '.join(PIPELINES)} only"
        )
    if name not in PIPELINES:
        raise IncompatibleModelError(
            f"{where}: a {name or 'pipeline of unknown class'}; genkit reads "
            f"{' / '.join(PIPELINES)} (a UNet2DModel and a {' / '.join(SCHEDULERS)})"
        )


def vdm_params(
    unet_config: dict[str, Any],
    scheduler_config: dict[str, Any],
    scheduler_class: str,
    where: str = "diffusers",
) -> tuple[tuple[int, int, int], dict[str, Any]]:
    """``(data_shape, params)`` of ``create_model("vdm", data_shape, **params)`` for a UNet
    config and a scheduler config (module docstring); anything genkit cannot read exactly is
    an :class:`IncompatibleModelError`."""
    if scheduler_class not in SCHEDULERS:
        raise IncompatibleModelError(
            f"{where}: scheduler {scheduler_class}; genkit reads {' / '.join(SCHEDULERS)} configs"
        )
    s = scheduler_config
    if s.get("rescale_betas_zero_snr"):
        raise IncompatibleModelError(
            f"{where}: rescale_betas_zero_snr makes alpha_bar_T = 0 (beta_T = 1), a process "
            "with no density at T; genkit's ELBO needs every beta < 1"
        )
    prediction = s.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise IncompatibleModelError(
            f"{where}: prediction_type '{prediction}'; genkit reads {', '.join(PREDICTIONS)}"
        )
    variance_type = (
        s.get("variance_type", "fixed_small")
        if scheduler_class == "DDPMScheduler"
        else "fixed_small"
    )
    if variance_type not in VARIANCES:
        raise IncompatibleModelError(
            f"{where}: variance_type '{variance_type}'; genkit reads {', '.join(VARIANCES)}"
        )
    schedule = s.get("beta_schedule", "linear")
    known = ("linear", "scaled_linear", "squaredcos_cap_v2")
    if s.get("trained_betas") is None and schedule not in known:
        raise IncompatibleModelError(
            f"{where}: beta_schedule '{schedule}'; genkit reads {', '.join(known)} or "
            "explicit trained_betas"
        )
    timesteps = int(s.get("num_train_timesteps", 1000))
    schedule_params: dict[str, Any] = {
        "beta_schedule": schedule,
        "beta_start": float(s.get("beta_start", 1e-4)),
        "beta_end": float(s.get("beta_end", 0.02)),
    }
    if s.get("trained_betas") is not None:
        schedule_params = {"trained_betas": [float(b) for b in s["trained_betas"]]}
    u = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    if u.get("class_embed_type") is not None or u.get("num_class_embeds") is not None:
        raise IncompatibleModelError(
            f"{where}: a class-conditional UNet2DModel; its bound is of p(x | class), genkit "
            "evaluates unconditional models"
        )
    size = u.get("sample_size")
    if size is None:
        raise IncompatibleModelError(f"{where}: the UNet2DModel config has no sample_size")
    h, w = tuple(size) if isinstance(size, list | tuple) else (size, size)
    c = int(u.get("in_channels", 3))
    variance = VARIANCES[variance_type]
    out = int(u.get("out_channels", c))
    if out != (2 * c if variance == "learned_range" else c):
        raise IncompatibleModelError(
            f"{where}: the UNet has {c} input and {out} output channels; variance_type "
            f"'{variance_type}' needs {2 * c if variance == 'learned_range' else c}"
        )
    params = {
        "timesteps": timesteps,
        "schedule": "diffusers",
        "schedule_params": schedule_params,
        "parameterization": PREDICTIONS[prediction],
        "variance": variance,
        "denoiser": "diffusers",
        "unet": u,
        "clip_denoised": bool(s.get("clip_sample", True))
        and float(s.get("clip_sample_range", 1.0)) == 1.0,
    }
    return (c, int(h), int(w)), params


def from_diffusers(path_or_pipeline: str | os.PathLike | Any) -> torch.nn.Module:
    """A diffusers ``DDPMPipeline`` (a local ``save_pretrained`` folder or the pipeline object)
    as a discrete genkit VDM in eval mode, on the CPU; ``model.elbo``, ``model.sample`` and
    :func:`genkit.evaluation.evaluate` then work as on genkit's own. Weights load through
    diffusers (safetensors)."""
    from genkit.registry import create_model

    diffusers = require_diffusers()
    extra: dict[str, Any] = {}
    if isinstance(path_or_pipeline, str | os.PathLike):
        folder = Path(path_or_pipeline).expanduser()
        where = f"diffusers:{folder}"
        index_file = folder / "model_index.json"
        if not folder.is_dir():
            raise IncompatibleModelError(f"{where}: no such folder")
        if not index_file.is_file():
            raise IncompatibleModelError(
                f"{where}: not a save_pretrained pipeline folder (no model_index.json)"
            )
        try:
            index = json.loads(index_file.read_text())
            scheduler_class = index["scheduler"][1]
            scheduler_config = json.loads(
                (folder / "scheduler" / "scheduler_config.json").read_text()
            )
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise IncompatibleModelError(f"{where}: unreadable pipeline config ({exc})") from None
        components = {k for k in index if not k.startswith("_")}
        _check_pipeline_class(str(index.get("_class_name", "")), components, where)
        if (folder / GENKIT_FILE).is_file():
            extra = json.loads((folder / GENKIT_FILE).read_text())
        try:
            unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False)
        except (OSError, ValueError, RuntimeError) as exc:
            raise IncompatibleModelError(f"{where}: cannot load the UNet2DModel ({exc})") from None
    else:
        pipe = path_or_pipeline
        where = f"diffusers {type(pipe).__name__}"
        components = set(getattr(pipe, "components", {}) or {})
        _check_pipeline_class(type(pipe).__name__, components, where)
        unet = pipe.unet
        scheduler_class = type(pipe.scheduler).__name__
        scheduler_config = dict(pipe.scheduler.config)
    if not isinstance(unet, diffusers.UNet2DModel):
        raise IncompatibleModelError(
            f"{where}: the unet is a {type(unet).__name__}, not a UNet2DModel"
        )
    data_shape, params = vdm_params(dict(unet.config), scheduler_config, scheduler_class, where)
    if extra.get("variance") == "posterior" and params["variance"] == "fixed_small":
        params["variance"] = "posterior"  # a genkit export: decoder scale sqrt(beta_1)
    model = create_model("vdm", data_shape, **params)
    model.net.unet.load_state_dict(unet.state_dict())
    if "loss_moments" in extra:
        _load_loss_moments(model, extra["loss_moments"], where)
    return model.eval()


def _load_loss_moments(model: torch.nn.Module, entry: Any, where: str) -> None:
    """Fill the imported model's loss-aware statistics (``loss_moments.mean_sq``, ``seen``:
    E[L_t^2] per step and its count) from a genkit export's ``genkit.json``, so that its
    evaluation draws t from the proposal genkit trained with instead of fitting a pilot."""
    moments = getattr(model, "loss_moments", None)
    try:
        mean_sq = torch.tensor(entry["mean_sq"], dtype=torch.float64)
        seen = torch.tensor(entry["seen"], dtype=torch.int64)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise IncompatibleModelError(
            f"{where}: {GENKIT_FILE} loss_moments must hold the lists mean_sq and seen ({exc})"
        ) from None
    steps = model.timesteps
    if moments is None or mean_sq.shape != (steps,) or seen.shape != (steps,):
        raise IncompatibleModelError(
            f"{where}: {GENKIT_FILE} loss_moments holds {mean_sq.numel()} mean_sq and "
            f"{seen.numel()} seen entries; the scheduler has {steps} steps"
        )
    if not bool(torch.isfinite(mean_sq).all() and (mean_sq >= 0).all() and (seen >= 0).all()):
        raise IncompatibleModelError(f"{where}: {GENKIT_FILE} loss_moments must be finite and >= 0")
    moments.mean_sq.copy_(mean_sq)
    moments.seen.copy_(seen)


def load_for_eval(
    spec: str, data: str | None, device: str = "auto"
) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """``genkit eval diffusers:PATH --data SPEC``: ``(model, run-config-like info, folder)``,
    the model on ``device`` in eval mode; ``--data`` is required (a pipeline names none)."""
    from genkit.errors import ConfigError
    from genkit.training import distributed

    folder = Path(spec.removeprefix("diffusers:"))
    if data is None:
        raise ConfigError(
            f"{spec}: a diffusers pipeline names no data; pass --data FILE.h5|builtin:NAME"
        )
    model = from_diffusers(folder)
    model.to(distributed.resolve_device(device, distributed.current()))
    info = {"data": data, "train": {}, "model": {"name": "vdm"}, "weights": "diffusers"}
    return model, info, folder


_TO_PREDICTION = {v: k for k, v in PREDICTIONS.items()}


def scheduler_config(model: torch.nn.Module) -> dict[str, Any]:
    """The ``DDPMScheduler`` keyword arguments of a discrete genkit VDM: its betas (by name
    where diffusers has the same table, else ``trained_betas``), prediction and variance type."""
    cfg = model.config
    name, sp = cfg.schedule_name, dict(cfg.schedule_params)
    kwargs: dict[str, Any] = {"num_train_timesteps": model.timesteps}
    if name == "linear":
        kwargs |= {"beta_schedule": "linear", "beta_start": sp.get("beta_start", 1e-4)}
        kwargs["beta_end"] = sp.get("beta_end", 0.02)
    elif name == "cosine" and sp.get("s", 0.008) == 0.008 and sp.get("max_beta", 0.999) == 0.999:
        kwargs["beta_schedule"] = "squaredcos_cap_v2"
    elif name == "diffusers" and sp.get("trained_betas") is None:
        kwargs |= {k: sp[k] for k in ("beta_schedule", "beta_start", "beta_end") if k in sp}
    else:
        kwargs["trained_betas"] = model.encoder.betas[1:].tolist()
    variance = "fixed_small" if cfg.variance == "posterior" else cfg.variance
    kwargs |= {
        "prediction_type": _TO_PREDICTION[cfg.parameterization],
        "variance_type": variance,
        "clip_sample": bool(cfg.clip_denoised),
        "clip_sample_range": 1.0,
    }
    return kwargs


def export_diffusers(model: torch.nn.Module, out: str | os.PathLike) -> Path:
    """Write a discrete genkit VDM with the diffusers denoiser as a ``DDPMPipeline`` folder
    ``out`` (``DDPMPipeline.from_pretrained(out)``), with the ``DDPMScheduler`` of the same
    betas, prediction and variance type, plus ``genkit.json`` (the decoder variance diffusers
    has no key for, and the loss-aware proposal's statistics, which :func:`from_diffusers`
    reads back so that an evaluation draws t as the native model's does). Written to a
    temporary folder beside ``out``, then renamed; an existing ``out`` is an
    :class:`OutputError`."""
    diffusers = require_diffusers()
    out = Path(out).expanduser()
    cfg = getattr(model, "config", None)
    unet = getattr(getattr(model, "net", None), "unet", None)
    if (
        cfg is None
        or getattr(cfg, "timesteps", 0) < 1
        or not isinstance(unet, diffusers.UNet2DModel)
    ):
        raise IncompatibleModelError(
            "export --format diffusers needs a discrete-time VDM trained with "
            "denoiser='diffusers' (a UNet2DModel); this model has "
            f"{type(getattr(model, 'net', model)).__name__}"
        )
    if out.exists():
        raise OutputError(f"{out} exists; choose a new folder")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent} is not a folder")
    scheduler = diffusers.DDPMScheduler(**scheduler_config(model))
    device = next(unet.parameters()).device
    pipe = diffusers.DDPMPipeline(unet=unet.cpu(), scheduler=scheduler)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        info: dict[str, Any] = {
            "variance": cfg.variance,
            "parameterization": cfg.parameterization,
        }
        moments = getattr(model, "loss_moments", None)
        if moments is not None and int(moments.seen.sum()) > 0:
            info["loss_moments"] = {
                "mean_sq": moments.mean_sq.tolist(),
                "seen": moments.seen.tolist(),
            }
        (tmp / GENKIT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        os.rename(tmp, out)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc}") from None
    finally:
        unet.to(device)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["export_diffusers", "from_diffusers", "scheduler_config", "vdm_params"]
