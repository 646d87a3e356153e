"""OmegaConf resolvers the config files use. `${required:why}` marks a key a recipe cannot run without
where the base config holds a default: OmegaConf keeps that default when `???` is merged over it, so
the recipe would run silently without the key. Resolving it raises `RequiredValue`, which
tasks.validation reports as `key: is required: why`."""

from omegaconf import OmegaConf


class RequiredValue(Exception):
    """A `${required:why}` key that the command line left unset."""


def _required(why: str):
    raise RequiredValue(why)


OmegaConf.register_new_resolver("required", _required, replace=True)  # replace: importing twice is harmless
