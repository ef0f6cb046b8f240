"""Trace without importing ``torch._dynamo``: a one-shot trace compiles nothing, and the import costs up to
0.6x ``import torch`` again (0.36x beyond the sympy that fake tensors import anyway; docs/module.md).

Two places in torch reach ``torch._dynamo`` during a trace on fake tensors (found with a ``sys.meta_path``
hook printing the stack of the first import, torch 2.13):

1. ``FakeTensorMode.__init__`` runs ``import torch._dynamo.config`` and reads two settings from it
   (``fake_tensor_cache_enabled``, ``fake_tensor_cache_crosscheck_enabled``); the dispatch reads one more
   (``_custom_ops_profile``). Importing the submodule first runs the package's ``__init__`` (sympy,
   ``trace_rules``, the variable trackers). The config module itself needs only ``torch._environment`` and
   ``torch.utils._config_module``: it is loaded alone, from its own file with the import system's own finder,
   as the real module ``torch._dynamo.config`` (registered in ``sys.modules`` under that name, so its settings
   and the environment variables they read are the ones a normal import gives). While the block runs,
   ``torch._dynamo`` is a stand-in whose ``config`` is that module. The config module stays in
   ``sys.modules``: a later ``import torch._dynamo`` (a ``torch.compile``, ``verify --parallel``'s ranks) runs
   the package's ``__init__``, whose ``from . import config`` takes it from there, so the process has one
   config module, as always.
2. ``torch._compile._disable_dynamo`` wraps functions (every ``TorchDispatchMode.__torch_dispatch__``, the
   ``torch._refs`` decompositions, ...) in ``inner``, which on its first call runs ``import torch._dynamo`` and
   caches ``torch._dynamo.disable(fn)`` on ``fn`` as ``fn.__dynamo_disable``. ``disable``'s wrapper only
   switches Dynamo's frame evaluation off around ``fn``; nothing is compiled in a trace, so it is off already and
   calling ``fn`` itself is the same. While the block runs, ``builtins.__import__`` answers that one import
   statement -- ``import torch._dynamo`` with the globals of ``torch._compile`` -- with a view of ``torch`` whose
   ``_dynamo.disable(fn, ...)`` returns ``fn``; ``inner`` caches ``fn`` as its own ``__dynamo_disable``. Every
   such cache is removed when the block ends (if it is still ``fn``), so a later call, or ``torch.compile``,
   imports Dynamo and gets the real wrapper.

Anything else that asks for Dynamo while the block runs -- an attribute of the stand-in other than ``config``
(non-reentrant ``torch.utils.checkpoint`` calls ``torch._dynamo.disable`` in backward), an ``import
torch._dynamo...`` statement, a real tensor made fake (``meta_utils`` imports ``torch._dynamo.source``) --
gets the real package, imported in a thread of its own (:meth:`_Block.load_dynamo` says why); every other
import goes to the original ``__import__``.

Anything that does not look as described (another torch layout, checked by feature, not by version; an import
already done) leaves that part alone, and torch imports Dynamo as usual: the trace's records are the same
either way (``tests/test_trace_dynamo_free.py``). Setting the environment variable ``ESTIMATOR_TRACE_DYNAMO=1``
turns the block off.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

DISABLE_ENV = "ESTIMATOR_TRACE_DYNAMO"
_CONFIG = "torch._dynamo.config"
_CACHE = "__dynamo_disable"  # the attribute torch._compile._disable_dynamo's inner caches on the wrapped function


@contextlib.contextmanager
def dynamo_free() -> Iterator[None]:
    """Keep ``torch._dynamo`` unimported while the block runs (a trace), as described in the module doc.

    Nothing is done if Dynamo is imported already, or with ``ESTIMATOR_TRACE_DYNAMO=1`` in the environment.
    """
    if os.environ.get(DISABLE_ENV, "") not in ("", "0") or "torch._dynamo" in sys.modules:
        yield
        return
    import torch

    block = _Block.install(torch)
    try:
        yield
    finally:
        if block is not None:
            block.remove()


class _Block:
    """What :func:`dynamo_free` installs: the config stand-in and the ``__import__`` that answers
    ``_disable_dynamo``'s import and imports the real package, when something asks for it, in a clean thread."""

    def __init__(self, torch: types.ModuleType, stub: _DynamoStandIn | None,
                 compile_globals: dict[str, Any] | None) -> None:
        self.torch = torch
        self.stub = stub
        self.compile_globals = compile_globals
        self.original: Callable[..., Any] = builtins.__import__
        self.cached: list[Callable[..., Any]] = []  # functions whose __dynamo_disable is themselves
        self.view = _TorchView(torch, self)
        self.active = True
        self.loading = False

    @classmethod
    def install(cls, torch: types.ModuleType) -> _Block | None:
        compile_module = getattr(torch, "_compile", None)
        wrapper = getattr(compile_module, "_disable_dynamo", None)
        compile_globals = vars(compile_module) if wrapper is not None and _inner_matches(wrapper) else None
        stub = _install_config_stub(torch)
        if stub is None and compile_globals is None:
            return None  # nothing this torch lets us keep out: FakeTensorMode imports Dynamo before the trace
        block = cls(torch, stub, compile_globals)
        if stub is not None:
            stub.load = block.load_dynamo  # type: ignore[attr-defined]
        builtins.__import__ = block.import_
        return block

    def import_(self, name: str, globals: Any = None, locals: Any = None,  # noqa: A002, ANN401
                fromlist: Any = (), level: int = 0) -> Any:  # noqa: ANN401
        # a trace runs thousands of import statements: those that cannot name Dynamo go straight through
        if (("_dynamo" in name or (fromlist and "_dynamo" in fromlist)) and self.active and not self.loading
                and "torch._dynamo" not in sys.modules):
            if (name == "torch._dynamo" and level == 0 and not fromlist and globals is not None
                    and globals is self.compile_globals):
                return self.view  # _disable_dynamo's inner, on the first call of a function it wraps
            if _asks_for_dynamo(name, globals, fromlist, level, config_loaded=self.stub is not None):
                self.load_dynamo()
        return self.original(name, globals, locals, fromlist, level)

    def disable(self, fn: Callable[..., Any], recursive: bool = True, **_: Any) -> Callable[..., Any]:
        """``torch._dynamo.disable`` as ``inner`` calls it: nothing is compiled in the block, so ``fn`` itself."""
        self.cached.append(fn)
        return fn

    def load_dynamo(self) -> None:
        """Import the real ``torch._dynamo`` now, in a thread of its own unless this thread is importing a
        module (then here, as torch would have): its import makes reference cycles holding the importing
        thread's frames (``torch.fx.wrap`` keeps ``inspect.currentframe()``), which a trace that pauses the
        collector would otherwise see as tensors kept alive; and a fresh thread has no dispatch mode,
        autocast or grad mode of the trace's, like the import before the trace that it replaces."""
        if "torch._dynamo" in sys.modules:
            return
        self.loading = True
        try:
            if _importing_here():
                importlib.import_module("torch._dynamo")
                return
            failed: list[BaseException] = []

            def load() -> None:
                try:
                    importlib.import_module("torch._dynamo")
                except BaseException as exc:  # noqa: BLE001 -- re-raised in the calling thread
                    failed.append(exc)

            thread = threading.Thread(target=load, name="estimator-import-torch._dynamo", daemon=True)
            thread.start()
            thread.join()
            if failed:
                raise failed[0]
        finally:
            self.loading = False

    def remove(self) -> None:
        self.active = False
        if builtins.__import__ == self.import_:
            builtins.__import__ = self.original
        for fn in self.cached:
            if getattr(fn, "__dict__", {}).get(_CACHE) is fn:
                delattr(fn, _CACHE)
        self.cached.clear()
        if self.stub is not None and self.torch.__dict__.get("_dynamo") is self.stub:
            del self.torch._dynamo


def _asks_for_dynamo(name: str, globals: Any, fromlist: Any, level: int,  # noqa: A002, ANN401
                     config_loaded: bool) -> bool:
    """Whether an import statement needs the package ``torch._dynamo`` (``import torch._dynamo.x``,
    ``from torch._dynamo import x``, ``from torch import _dynamo``, relative forms inside torch)."""
    if level:
        package = None
        if isinstance(globals, dict):
            package = globals.get("__package__") or getattr(globals.get("__spec__"), "parent", None)
        if not package:
            return False
        try:
            name = importlib.util.resolve_name("." * level + name, package)
        except (ImportError, ValueError):
            return False
    if name == "torch":
        return bool(fromlist) and "_dynamo" in fromlist
    if name == _CONFIG and config_loaded:
        return False  # sys.modules has it; torch._dynamo is the stand-in whose config it is
    return name == "torch._dynamo" or name.startswith("torch._dynamo.")


def _importing_here() -> bool:
    """Whether the calling thread is inside an import (a module's body is running)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_load_unlocked" and code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


# --------------------------------------------------------------------------- 1. the config module alone
class _DynamoStandIn(types.ModuleType):
    """``torch._dynamo`` while the block runs: ``config`` is the real config module; anything else imports the
    real package (:meth:`_Block.load_dynamo`; the import replaces this object as ``torch._dynamo``) and answers
    from it."""

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        if name.startswith("__") or name == "load":
            raise AttributeError(name)
        self.load()
        return getattr(sys.modules["torch._dynamo"], name)


def _load_config(torch: types.ModuleType) -> types.ModuleType | None:
    """``torch._dynamo.config`` as the import system would load it, without its package; None if the layout
    differs from what this expects (the caller then leaves torch alone)."""
    loaded = sys.modules.get(_CONFIG)
    if loaded is not None:
        return loaded if getattr(loaded, "__spec__", None) is not None else None
    package = importlib.machinery.PathFinder.find_spec("torch._dynamo", list(getattr(torch, "__path__", [])))
    if package is None or not package.submodule_search_locations:
        return None
    spec = importlib.machinery.PathFinder.find_spec(_CONFIG, list(package.submodule_search_locations))
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_CONFIG] = module  # the file installs itself through sys.modules[__name__]
    try:
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 -- any failure: torch imports the real package as usual
        if sys.modules.get(_CONFIG) is module:
            del sys.modules[_CONFIG]
        return None
    return module


def _install_config_stub(torch: types.ModuleType) -> _DynamoStandIn | None:
    if "_dynamo" in torch.__dict__:
        return None
    config = _load_config(torch)
    if config is None or not hasattr(config, "fake_tensor_cache_enabled"):
        return None
    stub = _DynamoStandIn("torch._dynamo")
    stub.config = config  # type: ignore[attr-defined]
    torch._dynamo = stub
    return stub


# --------------------------------------------------------------------------- 2. _disable_dynamo's first call
class _TorchView:
    """What ``import torch._dynamo`` binds as ``torch`` in ``inner``: ``torch._dynamo.disable`` is the
    block's; every other attribute is torch's."""

    def __init__(self, torch: types.ModuleType, block: _Block) -> None:
        self._torch = torch
        self._dynamo = types.SimpleNamespace(disable=block.disable)

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        return getattr(self._torch, name)


def _inner_matches(wrapper: Callable[..., Any]) -> bool:
    """``_disable_dynamo``'s nested ``inner`` caches ``torch._dynamo.disable(fn, ...)`` as ``fn.__dynamo_disable``
    after ``import torch._dynamo`` (torch 2.13): the shape the block answers."""
    code = getattr(wrapper, "__code__", None)
    inners = [c for c in getattr(code, "co_consts", ()) if isinstance(c, types.CodeType) and c.co_name == "inner"]
    if len(inners) != 1:
        return False
    names = set(inners[0].co_names)
    return {"torch._dynamo", "disable", _CACHE} <= names and "fn" in inners[0].co_freevars
