"""A package's main function that also answers for the package.

``lipnet.export`` and ``lipnet.convert`` are functions, and also the packages that hold them
(``from lipnet.export import load``). Bound to the package's name in ``lipnet``, a plain
function would hide the package from attribute lookups: ``import lipnet.export.runtime as rt``
and ``lipnet.export.load`` both fail, the first with an ``ImportError`` from Python's import
machinery. :class:`PackageFunction` calls the function and looks up every other attribute in
the package, importing its submodules on demand.
"""

from __future__ import annotations

import functools
import importlib


class PackageFunction:
    """``function``, callable as itself, whose attributes are also those of the package ``package``.

    Example:
        >>> import lipnet
        >>> lipnet.export.load is importlib.import_module("lipnet.export.runtime").load
        True
        >>> import lipnet.export.runtime as runtime  # resolved through this object's attributes
        >>> runtime.__name__
        'lipnet.export.runtime'
    """

    def __init__(self, function, package: str):
        functools.update_wrapper(self, function)  # name, docstring, __wrapped__ (inspect.signature follows it)
        self._package = package

    def __call__(self, *args, **kwargs):
        return self.__wrapped__(*args, **kwargs)

    def __getattr__(self, name: str):
        # Only names the instance lacks arrive here; dunders (inspect's, pickle's, copy's) are not the package's.
        if name.startswith("__") or name == "_package":
            raise AttributeError(name)
        package = importlib.import_module(self._package)
        try:
            return getattr(package, name)
        except AttributeError:
            pass
        try:
            return importlib.import_module(f"{self._package}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{self._package}.{name}":
                raise  # a submodule that exists but fails to import names what it lacks
        raise AttributeError(f"{self.__name__!r} (the function, and the package {self._package}) has no attribute "
                             f"{name!r}")

    def __dir__(self):
        return sorted({*super().__dir__(), *dir(importlib.import_module(self._package))})

    def __repr__(self):
        return f"<function {self.__module__}.{self.__qualname__} (package {self._package})>"
