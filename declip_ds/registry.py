"""The method registry: a method is a class registered by name; tests loop over METHODS."""

from __future__ import annotations

METHODS: dict[str, type] = {}


def register_method(name: str):
    """Class decorator: ``@register_method("clip")`` adds the class to METHODS under ``name``."""

    def deco(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"Method '{name}' is already registered by {METHODS[name].__qualname__}.")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type:
    """The registered class for ``name``; an unknown name lists the known ones."""
    import declip_ds.methods  # noqa: F401  (importing registers every method)

    if name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise KeyError(f"Unknown method '{name}'. Known: {known}. Set method.name to one of them.")
    return METHODS[name]
