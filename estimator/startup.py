"""What ``import estimator`` does to keep the command's start-up small (issue 8).

Pydantic looks for plugins the first time it builds a model validator: it reads the entry points of
every installed distribution (``importlib.metadata.distributions()``; 20-90 ms with the ~130
distributions of the development machine), before any estimate is made. The config models are the
package's own (no plugin has anything to observe in them), so they are built with plugins off, through
pydantic's documented ``PYDANTIC_DISABLE_PLUGINS`` setting, for the duration of the package's import
only: the user's setting is restored after it, and models built later (say by a traced module's
factory) load the installed plugins as usual. See docs/benchmarks.md, "CLI start-up".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

PLUGINS_SETTING = "PYDANTIC_DISABLE_PLUGINS"


@contextmanager
def pydantic_plugins_off() -> Iterator[None]:
    """Build pydantic models without loading pydantic plugins; the previous setting is restored after."""
    before = os.environ.get(PLUGINS_SETTING)
    os.environ[PLUGINS_SETTING] = "__all__"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PLUGINS_SETTING, None)
        else:
            os.environ[PLUGINS_SETTING] = before
