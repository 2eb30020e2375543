"""One file per method; importing this package registers them all in declip_ds.registry.METHODS."""

from declip_ds.methods import clip  # noqa: F401
from declip_ds.methods import declip  # noqa: F401
from declip_ds.methods import defilip  # noqa: F401
from declip_ds.methods import filip  # noqa: F401
from declip_ds.methods import slip  # noqa: F401
from declip_ds.methods.base import Method

__all__ = ["Method"]
