"""genkit's built-in feature extractors for the sample-quality metrics (``classifier``,
``inception``), registered through the ``register_feature_extractors`` hook."""
