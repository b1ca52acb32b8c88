"""Switch: a setter returning the previous value, a context manager restoring it."""

import pytest

from lipnet.bounds import gram, refine_exceeding, set_refine_exceeding
from lipnet.bounds.switch import Switch


def test_set_returns_the_previous_value_and_scoped_restores_it_even_on_errors():
    switch = Switch(False)
    assert switch.set(True) is False and switch.enabled
    with pytest.raises(RuntimeError):
        with switch.scoped(False):
            assert not switch.enabled
            raise RuntimeError("inside")
    assert switch.enabled
    with pytest.raises(TypeError, match="True or False"):
        switch.set(1)
    assert switch.enabled


def test_the_refinement_setting():
    import torch

    cpu = torch.device("cpu")
    assert gram.refines_exceeding(cpu)
    with refine_exceeding(False):
        assert not gram.refines_exceeding(cpu)
        with refine_exceeding():
            assert gram.refines_exceeding(cpu)
    assert gram.refines_exceeding(cpu)
    assert set_refine_exceeding(False) is True
    try:
        assert not gram.refines_exceeding(cpu)
    finally:
        assert set_refine_exceeding(True) is False
