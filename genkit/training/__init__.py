"""The one trainer for every genkit model (``genkit train``/``eval``/``sample``).

``Trainer(model, TrainConfig(...), train_dataset, test_dataset, run_dir).fit()`` trains by
the ELBO with AdamW, EMA, clipping, bf16 autocast, ``torch.compile``, TensorBoard, atomic
exact-resume checkpoints and DDP under ``torchrun``. See ``docs/training.md``.
"""

from genkit.evaluation import EvalResult
from genkit.training.config import TrainConfig, apply_overrides, make_config, parse_value
from genkit.training.trainer import Trainer

__all__ = ["EvalResult", "TrainConfig", "Trainer", "apply_overrides", "make_config", "parse_value"]
