"""The test accuracy of the ``classifier`` feature extractor (docs/metrics.md) on each data set
given, as genkit trains and caches it for sample-quality metrics:

    python benchmarks/classifier_accuracy.py [builtin:digits builtin:mnist FILE.h5 ...]
        [--steps 1000] [--cache DIR]

Prints, per data set, the architecture, the test accuracy, the test examples, the seconds of
training (0 when it came from the cache) and the cache file. The issue's target: at least 97 %
on builtin:digits and builtin:mnist.
"""

from __future__ import annotations

import argparse
import tempfile

from genkit.data import open_dataset
from genkit.features import FeatureContext, create_feature_extractor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="*", default=["builtin:digits", "builtin:mnist"])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--cache", help="classifier cache (default: a fresh temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or tmp
        for spec in args.data:
            context = FeatureContext(
                data=spec,
                train=open_dataset(spec, "train"),
                test=open_dataset(spec, "test"),
                echo=lambda _line: None,
            )
            info = create_feature_extractor(
                "classifier", context, steps=args.steps, cache=cache
            ).info
            seconds = 0.0 if info.get("cached") else info["train_seconds"]
            print(
                f"{spec}: {info['arch']}, test accuracy {info['test_accuracy']:.4f} on "
                f"{info['test_examples']} images, {seconds:.1f} s of training, {info['file']}"
            )


if __name__ == "__main__":
    main()
