"""Copy ultramem's pure-PyTorch modules into an exported directory as flat files.

Hugging Face loads a directory's own code as a "dynamic module": it copies the file named in
``auto_map`` and, recursively, every file named in a ``from .name import ...`` line of the same
directory -- flat files only, no sub-packages. So each module ``ultramem.a.b`` (package
``__init__`` files included) becomes ``um_a_b.py`` with its ``ultramem`` imports rewritten:

- ``from ultramem.a.b import x``  ->  ``from .um_a_b import x``
- ``from ultramem.a import b`` (``b`` a module)  ->  ``from . import um_a_b as b``
- ``import ultramem.a``  ->  ``from . import um_a`` (only used for its side effects)
- an import of a module that is not copied (the Triton kernels) -> ``raise ImportError``, which
  only an ``except`` around it may meet (the ops' dispatchers: "no kernels"); a kernel module
  named in a string (imported on first use) gets a suffix that makes it unimportable.

The set copied is the import closure of :data:`ROOTS`; nothing is copied by a hand-kept list,
so the copy follows the package as it changes.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

from ultramem.errors import ConfigError

ROOTS = ("ultramem.hf.ultramem_backend", "ultramem.layers")  # backend + every layer type
EXCLUDED_LEAVES = ("triton",)  # kernel modules: the copy runs the reference ops


def _path(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(spec.origin) if spec is not None and spec.origin else None


def _is_module(name: str) -> bool:
    if not name.startswith("ultramem"):
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def flat_name(module: str) -> str:
    """``ultramem.layers.ultramem`` -> ``um_layers_ultramem``."""
    return "um_" + "_".join(module.split(".")[1:])


def _excluded(module: str) -> bool:
    return module.split(".")[-1] in EXCLUDED_LEAVES


def _targets(node: ast.AST) -> list[str]:
    """The ultramem modules an import statement loads."""
    out = []
    if isinstance(node, ast.Import):
        out = [a.name for a in node.names if a.name.split(".")[0] == "ultramem"]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
            node.module.split(".")[0] == "ultramem":
        for a in node.names:
            full = f"{node.module}.{a.name}"
            out.append(full if _is_module(full) else node.module)
    return out


def _imports(tree: ast.AST) -> list[ast.stmt]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and _targets(n)]


def closure(roots: tuple[str, ...] = ROOTS) -> list[str]:
    """Every ultramem module the roots import (transitively), kernels excluded; sorted."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        mod = todo.pop()
        if mod in seen or _excluded(mod):
            continue
        seen.add(mod)
        tree = ast.parse(_path(mod).read_text(encoding="utf-8"))
        for node in _imports(tree):
            todo.extend(_targets(node))
    return sorted(seen)


def _rewrite_stmt(node: ast.stmt, copied: set[str], where: str) -> str:
    if isinstance(node, ast.Import):
        parts = []
        for a in node.names:
            if a.asname is not None or a.name not in copied:
                raise ConfigError(f"{where}: 'import {a.name}' cannot be flattened; use 'from ... import'")
            parts.append(f"from . import {flat_name(a.name)}  # noqa: F401")
        return "; ".join(parts)
    assert isinstance(node, ast.ImportFrom) and node.module is not None
    stmts, names = [], []
    for a in node.names:
        full = f"{node.module}.{a.name}"
        alias = a.asname or a.name
        if _is_module(full):
            if _excluded(full):
                return f'raise ImportError("{full} is not part of the exported copy")'
            stmts.append(f"from . import {flat_name(full)} as {alias}")
        else:
            names.append(a.name if a.asname is None else f"{a.name} as {a.asname}")
    if names:
        if _excluded(node.module):
            return f'raise ImportError("{node.module} is not part of the exported copy")'
        stmts.insert(0, f"from .{flat_name(node.module)} import {', '.join(names)}")
    return "; ".join(stmts)


NOT_COPIED = " (not in the exported copy)"


def _module_strings(tree: ast.AST, copied: set[str]) -> set[str]:
    """String constants naming an ultramem module that is not copied (the kernel modules the
    ops import by name on first use)."""
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and re.fullmatch(r"ultramem(\.\w+)+", n.value) and n.value not in copied}


def rewrite(source: str, copied: set[str], where: str) -> str:
    """``source`` with every ultramem import made relative to the flat copy, and every kernel
    module named as a string made unimportable (so an installed ultramem of another version is
    never reached from the copy: the ops take their reference)."""
    tree = ast.parse(source)
    for name in _module_strings(tree, copied):
        for q in ('"', "'"):
            source = source.replace(f"{q}{name}{q}", f"{q}{name}{NOT_COPIED}{q}")
    lines = source.splitlines(keepends=True)
    for node in sorted(_imports(ast.parse(source)), key=lambda n: n.lineno, reverse=True):
        indent = lines[node.lineno - 1][: node.col_offset]
        new = indent + _rewrite_stmt(node, copied, f"{where}:{node.lineno}") + "\n"
        lines[node.lineno - 1 : node.end_lineno] = [new]
    return "".join(lines)


def write_flat_copy(out: Path, roots: tuple[str, ...] = ROOTS) -> list[str]:
    """Write ``um_*.py`` for every module of the closure into ``out``; returns the file names."""
    mods = closure(roots)
    copied = set(mods)
    names = []
    for mod in mods:
        src = _path(mod).read_text(encoding="utf-8")
        name = flat_name(mod) + ".py"
        (out / name).write_text(rewrite(src, copied, mod), encoding="utf-8")
        names.append(name)
    return names


BACKEND_SWITCH = '''"""Chooses what runs this model: the installed ultramem (with its Triton kernels) when its
version is the one this directory was exported with, else the copy of ultramem's modules here
(``um_*.py``, plain PyTorch). ``ULTRAMEM_HF_REFERENCE=1`` forces the copy."""

import os

EXPORTED_WITH = {version!r}

try:
    if os.environ.get("ULTRAMEM_HF_REFERENCE", "0") == "1":
        raise ImportError("ULTRAMEM_HF_REFERENCE=1")
    import ultramem

    if ultramem.__version__ != EXPORTED_WITH:
        raise ImportError(f"ultramem {{ultramem.__version__}} is installed, this model is {{EXPORTED_WITH}}")
    from ultramem.hf.ultramem_backend import Transformer, model_config, new_decode_state

    BACKEND = "ultramem"
except ImportError:
    # transformers copies a dynamic module's files by following `from .name import` lines:
    # every file of the copy is named here once.
{listing}
    from .um_hf_ultramem_backend import Transformer, model_config, new_decode_state

    BACKEND = "reference copy"

__all__ = ["BACKEND", "Transformer", "model_config", "new_decode_state"]
'''


def backend_switch(files: list[str], version: str) -> str:
    listing = "\n".join(f"    from .{f[:-3]} import __name__ as _  # noqa: F401" for f in files)
    return BACKEND_SWITCH.format(version=version, listing=listing)
