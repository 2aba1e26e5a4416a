"""Recipes: TOML files that compare models on the same data and the same likelihood scale.

``genkit run RECIPE`` (:mod:`genkit.recipes.cli`) reads one (:mod:`genkit.recipes.schema`),
checks all of it, trains and evaluates each run (:mod:`genkit.recipes.runner`) and writes the
report (:mod:`genkit.recipes.report`). Reference: ``docs/recipes.md``.
"""

from genkit.recipes.schema import Budget, EvalSettings, Recipe, RunSpec, load_recipe

__all__ = ["Budget", "EvalSettings", "Recipe", "RunSpec", "load_recipe"]
