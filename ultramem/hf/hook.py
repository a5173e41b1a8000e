"""Register ultramem with transformers' Auto classes the moment transformers is imported.

``import ultramem`` calls :func:`install`: if transformers is already imported it registers
now; otherwise it puts a finder on ``sys.meta_path`` that, when ``transformers`` itself is
imported, lets the import finish and then registers. So ``import ultramem`` never imports
transformers (nor fails without it), and costs nothing until the user imports transformers.
A failed registration (an incompatible transformers) warns and leaves transformers usable.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

from ultramem.hf import register


def _register() -> None:
    try:
        register()
    except Exception as e:  # noqa: BLE001 -- never break the user's `import transformers`
        warnings.warn(f"ultramem: could not register with transformers ({e}); "
                      "load exported models with trust_remote_code=True", stacklevel=2)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _register()


class _TransformersFinder(importlib.abc.MetaPathFinder):
    """Finds ``transformers`` with the other finders and wraps its loader (then steps aside)."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 (importlib signature)
        if name != "transformers":
            return None
        remove()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            for finder in sys.meta_path:
                spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
                if spec is not None and spec.loader is not None:
                    break
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def remove() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TransformersFinder)]


def install() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _TransformersFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TransformersFinder())
