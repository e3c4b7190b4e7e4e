"""How a run is named to people (report, model card): its title, description and data source.

A recipe's description speaks of the recipe's own data; once ``data.source`` is overridden
it describes data the run never saw, so it is replaced by one built from the config.
Local paths are shortened to their last part wherever the text may leave the machine.
"""

from __future__ import annotations

from pathlib import PurePath

from captune.config import Config

LOCAL_KINDS = ("coco", "manifest", "imagefolder", "parquet", "arrow")


def public_source(source: str) -> str:
    """``data.source`` without the local folders: ``imagefolder:/home/me/pets`` -> ``imagefolder:pets``."""
    kind, sep, rest = source.partition(":")
    if kind in LOCAL_KINDS and rest:
        return f"{kind}{sep}{PurePath(rest.rstrip('/')).name or rest}"
    return source


def recipe_source(cfg: Config) -> str | None:
    """The data source of the built-in recipe the run was made from (None for other recipes)."""
    from captune.config import list_recipes, load_config

    if cfg.name not in list_recipes():
        return None
    try:
        return load_config(cfg.name).data.source
    except Exception:  # a recipe that no longer loads cannot vouch for its description
        return None


def data_overridden(cfg: Config) -> bool:
    """True when the run reads other data than its recipe describes."""
    return recipe_source(cfg) not in (None, cfg.data.source)


def title(cfg: Config) -> str:
    """``demo``, or ``demo recipe on imagefolder:pets`` once the data is not the recipe's."""
    if data_overridden(cfg):
        return f"{cfg.name} recipe on {public_source(cfg.data.source)}"
    return cfg.name


def description(cfg: Config) -> str:
    """The recipe's description, or a plain one when the recipe's data was swapped out."""
    if data_overridden(cfg) or not cfg.description.strip():
        return (
            f"LoRA fine-tune of {model_label(cfg)} on captions from `{public_source(cfg.data.source)}` "
            f"(settings of the '{cfg.name}' recipe)."
        )
    return cfg.description


def model_label(cfg: Config) -> str:
    """The base model as it may be shown outside: its Hub id, builtin:demo, or a local folder's name."""
    from captune.config import is_hub_id

    name = cfg.hub.base_model or cfg.model.name_or_path
    if name == "builtin:demo" or is_hub_id(name):
        return name
    return f"a local model ({PurePath(name.rstrip('/')).name})"
