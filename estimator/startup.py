"""What ``import estimator`` and the command do to keep the start-up small (issue 8).

Pydantic looks for plugins the first time it builds a model validator: it reads the entry points of
every installed distribution (``importlib.metadata.distributions()``; 20-90 ms with the ~130
distributions of the development machine), before any estimate is made. The config models are the
package's own (no plugin has anything to observe in them), so they are built with plugins off, through
pydantic's documented ``PYDANTIC_DISABLE_PLUGINS`` setting, for the duration of the package's import
only: the user's setting is restored after it, and models built later (say by a traced module's
factory) load the installed plugins as usual. See docs/benchmarks.md, "CLI latency".

Even with plugins off, pydantic's plugin loader (``pydantic.plugin._loader``) imports
``importlib.metadata`` (and with it ``email``, ``zipfile``, ``csv``...: about 50 modules) only to
answer "no plugins"; typer (0.29) builds a pydantic ``TypeAdapter`` per option of the command it runs,
with plugins off too, and so imports it as well. :func:`plugin_loader_stand_in` puts a stand-in module
in its place (only if pydantic has not loaded the real one yet): its ``get_plugins()`` answers no
plugins exactly when the real one would without looking (the setting is ``__all__``, ``1`` or
``true``), and otherwise steps aside: it imports the real loader and returns its answer, so plugins
are found as usual. Anything else asked of the stand-in is the real loader's as well. The stand-in is
removed when the context ends (if it is still in place).

While the package and typer are imported, Python's cyclic collector is paused (``nogc.gc_paused``):
importing them makes tens of thousands of objects that all live as long as the process (modules,
classes, pydantic's validators), and the collector scanned them again and again as they accumulated
(58 young and 6 middle-generation collections during ``import estimator.cli``, 36 M instructions of
the seed's 1,006 M ``estimate``). Reference counting frees what is dropped as usual; the collector
runs again after the imports, as it was, and would then scan them all once; the command
(``cli.main``) freezes them instead (``gc.freeze``: they stay out of every later collection, which
still frees the cycles the command makes).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

PLUGINS_SETTING = "PYDANTIC_DISABLE_PLUGINS"
PLUGINS_OFF = ("__all__", "1", "true")
"""The values of the setting for which pydantic's ``get_plugins()`` returns no plugins at once."""
PLUGIN_LOADER = "pydantic.plugin._loader"


def _real_loader() -> Any:
    stand_in = sys.modules.get(PLUGIN_LOADER)
    if isinstance(stand_in, _PluginLoaderStandIn):
        del sys.modules[PLUGIN_LOADER]
    return importlib.import_module(PLUGIN_LOADER)


class _PluginLoaderStandIn(ModuleType):
    """Stands for pydantic's plugin loader until a plugin may be wanted (see the module's docstring)."""

    def __init__(self) -> None:
        super().__init__(PLUGIN_LOADER, "pydantic's plugin loader until a plugin may be wanted (estimator.startup)")

    @staticmethod
    def get_plugins() -> Any:
        """No plugins when the setting turns them all off (as the real loader answers); else the real answer."""
        if os.environ.get(PLUGINS_SETTING) in PLUGINS_OFF:
            return ()
        return _real_loader().get_plugins()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # the import system's questions (``__path__``: not a package)
            raise AttributeError(name)
        return getattr(_real_loader(), name)


@contextmanager
def plugin_loader_stand_in() -> Iterator[None]:
    """Pydantic's plugin loader is a stand-in for the duration, unless pydantic has loaded the real one."""
    stand_in = None
    if PLUGIN_LOADER not in sys.modules:
        stand_in = sys.modules[PLUGIN_LOADER] = _PluginLoaderStandIn()
    try:
        yield
    finally:
        if stand_in is not None and sys.modules.get(PLUGIN_LOADER) is stand_in:
            del sys.modules[PLUGIN_LOADER]


@contextmanager
def pydantic_plugins_off() -> Iterator[None]:
    """Build pydantic models without loading pydantic plugins; the previous setting is restored after."""
    before = os.environ.get(PLUGINS_SETTING)
    os.environ[PLUGINS_SETTING] = "__all__"
    try:
        with plugin_loader_stand_in():
            yield
    finally:
        if before is None:
            os.environ.pop(PLUGINS_SETTING, None)
        else:
            os.environ[PLUGINS_SETTING] = before
