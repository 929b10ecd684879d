"""Make the stock ``anomalib`` command see the anomalib-vqflow models and datamodules.

Anomalib 2.7 resolves short names such as ``--model MsFlow`` only among the classes
already imported when its CLI parser is built, and it has no plugin entry points. This
module is imported at interpreter start-up by ``anomalib_vqflow_autoload.pth`` (installed
at the site-packages root). It imports nothing heavy: it only registers an import hook
that, once ``anomalib.cli.cli`` has been imported, imports ``anomalib_vqflow`` too, so
every ``anomalib`` sub-command (train, test, export, benchmark, ...) knows the plugin.
Other Python programs are untouched: torch and anomalib are not imported by this hook.

Switch it off with the environment variable ``ANOMALIB_VQFLOW_AUTOLOAD=0``; the full
class paths (``--model anomalib_vqflow.models.MsFlow``) keep working without it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

TRIGGER_MODULE = "anomalib.cli.cli"
PLUGIN_MODULE = "anomalib_vqflow"
DISABLE_VARIABLE = "ANOMALIB_VQFLOW_AUTOLOAD"


class _PluginLoader(importlib.abc.Loader):
    """Run the real loader of the trigger module, then import the plugin."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        try:
            importlib.import_module(PLUGIN_MODULE)
        except Exception as error:
            warnings.warn(
                f"anomalib-vqflow could not be loaded ({error!r}); its short names are unavailable. "
                f"Set {DISABLE_VARIABLE}=0 to stop trying.",
                RuntimeWarning,
                stacklevel=2,
            )


class _AutoloadFinder(importlib.abc.MetaPathFinder):
    """Wrap the loader of ``anomalib.cli.cli`` and step aside for every other module."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TRIGGER_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PluginLoader(spec.loader)
        return spec


def install() -> None:
    """Register the hook once, unless ``ANOMALIB_VQFLOW_AUTOLOAD=0`` switches it off."""
    if os.environ.get(DISABLE_VARIABLE, "1").strip().lower() in {"0", "false", "no", "off"}:
        return
    if not any(isinstance(finder, _AutoloadFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AutoloadFinder())


install()
