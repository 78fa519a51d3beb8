"""The model registry: each family module registers its names, with what a study needs to know
about them (as timm's `register_model`, one entry per family of names).

`family_of(name)` finds the family that builds a name; `list_models(pattern)` lists the names the
families name as examples (a family's names are open-ended: resnet{6n+2}, wrn{6n+4}_{k}).
"""

import dataclasses
import fnmatch
import inspect
import re
from collections.abc import Callable

from scaling import ScalingError


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    pattern: str  # a regular expression every name of the family matches in full
    build: Callable  # build(name, rngs=..., **settings) -> the model
    constructor: Callable  # its keyword arguments are the family's settings
    examples: tuple[str, ...]  # the names `list_models` shows
    image_size: Callable[[str], int]  # the resolution a name was designed for
    names: str  # the valid names, in words, for error messages
    resolution_dependent: bool = False  # parameters depend on image_size (built for one)
    width: str | None = None  # the setting that multiplies the width
    depth: str | None = None  # the setting that multiplies the depth
    extra_settings: tuple[str, ...] = ()  # settings `build` takes besides the constructor's
    # scale(name, settings, image_size, coefficients) -> (settings, image_size): for families
    # whose widths and depths are absolute settings, not multipliers (scaling.scale.apply)
    scale: Callable | None = None

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None

    @property
    def settings(self) -> frozenset[str]:
        init = self.constructor.__init__ if isinstance(self.constructor, type) else self.constructor
        parameters = inspect.signature(init).parameters
        keywords = {
            n for n, p in parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
        return frozenset(keywords - {"self", "rngs"} | set(self.extra_settings))


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_of(name) -> Family:
    """The family that builds `name`; a ScalingError listing every family's names if none."""
    for family in FAMILIES.values():
        if isinstance(name, str) and family.matches(name):
            return family
    valid = "; ".join(f.names for f in FAMILIES.values())
    raise ScalingError(f"unknown model {name!r}; valid names: {valid}")


def list_models(pattern: str = "*") -> list[str]:
    """The example names of every family that match the shell-style `pattern` (e.g. 'wrn*')."""
    names = [n for family in FAMILIES.values() for n in family.examples]
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]
