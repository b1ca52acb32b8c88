"""CI slice of tests/fuzz_convert.py: random traced forwards are certified soundly or refused
cleanly, and the fuzz catches a traced rule 0.1% too small."""

import importlib
import operator

import pytest

import fuzz_convert

convert_module = importlib.import_module("lipnet.convert")  # lipnet.convert is also the function's name

SEEDS = range(150)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_traced_forward_is_certified_soundly_or_refused(seed):
    case = fuzz_convert.run_case(seed)
    assert not case.failures, fuzz_convert.report(case)


def test_the_slice_certifies_some_and_refuses_some():
    outcomes = [fuzz_convert.run_case(seed).outcome for seed in range(12)]
    assert "certified" in outcomes and "refused" in outcomes


def test_the_fuzz_catches_an_add_rule_slightly_too_small(monkeypatch):
    original = convert_module._BoundInterpreter._node_bound

    def shrunk(self, node, value):
        bound = original(self, node, value)
        return bound * 0.999 if node.target in (operator.add, "add") else bound

    monkeypatch.setattr(convert_module._BoundInterpreter, "_node_bound", shrunk)
    assert any(fuzz_convert.run_case(seed).failures for seed in range(40))
