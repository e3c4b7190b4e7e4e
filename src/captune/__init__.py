"""captune: adapt BLIP-2 image captioners to a domain with LoRA, measured the COCO way.

Python API (the same code the ``captune`` command runs; see docs/api.md):

    run_recipe(recipe, overrides, out=)    run a recipe or Config into a run folder -> RunResult
    RunResult.from_folder(RUN)             read a finished (or partial) run folder -> RunResult
    load_model(RUN, merged=False)          base model + the run's LoRA adapter (PeftModel) and processor
    caption(images, model)                 captions for PIL images, paths, bytes or a datasets.Dataset column
    score(predictions, references)         official COCO metrics, per-image scores and 95% intervals
    prepare_data(source, out)              data cache from a source string or an in-memory datasets.Dataset
    push(RUN, repo, dry_run=True)          the adapter, processor and model card to the Hub (or a dry-run folder)
    resolve_config(recipe, overrides)      a checked Config from a recipe name, YAML path or Config

Problems the user can fix raise ``UserError`` (``ConfigError`` for config keys) with
the one-line message the CLI prints. Importing captune loads no torch or
transformers; the calls do, when they need them.

Example::

    import captune
    result = captune.run_recipe("demo", {"data.num_images": 200}, out="runs/demo")
    result                      # the before/after table in Jupyter
    captioner = captune.load_model("runs/demo")
    captune.caption([pil_image], captioner)
"""

from captune.api import (
    Captioner,
    Gallery,
    PreparedData,
    RunResult,
    ScoreResult,
    caption,
    load_model,
    prepare_data,
    push,
    resolve_config,
    run_recipe,
    score,
)
from captune.config import Config, ConfigError
from captune.errors import UserError

__version__ = "0.1.0"

__all__ = [
    "Captioner",
    "Config",
    "ConfigError",
    "Gallery",
    "PreparedData",
    "RunResult",
    "ScoreResult",
    "UserError",
    "caption",
    "load_model",
    "prepare_data",
    "push",
    "resolve_config",
    "run_recipe",
    "score",
]
