"""Registers genkit's feature extractors through the ``register_feature_extractors`` hook,
exactly as a third party's plugin would.

- ``classifier`` (the offline default): a small CNN trained on the data's labelled train
  split, cached per data file; features: its penultimate layer (128).
- ``inception``: the FID Inception-v3 pool features (2,048), from local weights only.
"""

from __future__ import annotations

import genkit
from genkit_features.classifier import classifier
from genkit_features.inception import inception


@genkit.hookimpl
def register_feature_extractors(register) -> None:
    register(
        "classifier",
        classifier,
        description="a small CNN trained on the data's labels (cached); penultimate features",
    )
    register("inception", inception, description="FID Inception-v3 pool3 features (local weights)")
