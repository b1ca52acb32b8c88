"""lipnet.export and lipnet.convert are functions that answer for their packages."""

import copy
import inspect
import pickle

import pytest

import lipnet
from lipnet.convert import traced_lipschitz_bound
from lipnet.export import exporter, load, runtime


def test_calls_run_the_function_and_attributes_are_the_packages():
    assert inspect.signature(lipnet.export) == inspect.signature(exporter.export)
    assert lipnet.export.__doc__ == exporter.export.__doc__ and lipnet.export.__name__ == "export"
    assert lipnet.export.load is load and lipnet.export.runtime is runtime
    assert lipnet.convert.traced_lipschitz_bound is traced_lipschitz_bound
    assert {"load", "runtime", "ExportedModel"} <= set(dir(lipnet.export))


def test_an_unknown_name_is_an_attribute_error_and_dunders_are_not_looked_up_in_the_package():
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        lipnet.export.nonexistent
    assert not hasattr(lipnet.export, "__path__")  # a function, not the package (no submodule search on it)
    with pytest.raises(AttributeError):
        lipnet.convert.__reduce_ex_not__
    assert "package lipnet.export" in repr(lipnet.export)


def test_it_survives_pickle_and_copy():
    # __getattr__ must not answer the dunders pickle and copy probe (__reduce_ex__, __setstate__) from the
    # package, nor recurse before __init__ has set _package.
    for copied in (pickle.loads(pickle.dumps(lipnet.export)), copy.deepcopy(lipnet.export)):
        assert copied.load is load and copied.__wrapped__ is exporter.export
