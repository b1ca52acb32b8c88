"""Mutation-testing gaps of lipnet.export.runtime's load checks."""

import pytest
import torch

from lipnet.export import export, runtime
from lipnet.nn import GramLinear

SHAPE = (4, 2, 2)


def _archive(bound_kept: bool) -> dict:
    archive = export(torch.nn.Sequential(torch.nn.Flatten(), GramLinear(16, 3)).eval(), SHAPE).archive()
    return archive if bound_kept else {**archive, "lipschitz_bound": None}


def _batch_norm_first(archive: dict, training) -> dict:
    """The archive with ``aten.batch_norm(x, running_mean=m, running_var=v, training=...)`` on stored
    statistics applied to the input first."""
    placeholder, *body = archive["nodes"]
    raw = dict(placeholder, name="raw_input")
    stats = {"stat_mean": torch.zeros(4), "stat_var": torch.ones(4)}
    gets = [{"name": k, "op": "get_attr", "target": k, "args": [], "kwargs": {}} for k in stats]
    node = {"name": placeholder["name"], "op": "call_function", "target": "aten.batch_norm.default", "kwargs": {},
            "args": [{"$node": "raw_input"}, None, None, {"$node": "stat_mean"}, {"$node": "stat_var"}, training,
                     0.5, 1e-5, False]}
    return {**archive, "nodes": [raw, *gets, node, *body], "state_dict": {**archive["state_dict"], **stats}}


@pytest.mark.parametrize("bound_kept", [True, False], ids=["certified", "uncertified"])
@pytest.mark.parametrize("training", [True, 1], ids=["True", "1"])
def test_batch_norm_writing_its_stored_statistics_is_refused_whatever_the_flag_is_spelled(bound_kept, training):
    """``training=1`` runs batch norm in training mode as ``True`` does: it overwrites the stored
    running statistics at every call (and, certified, normalizes by the batch's statistics)."""
    archive = _batch_norm_first(_archive(bound_kept), training)
    with pytest.raises(ValueError):
        runtime.build(archive)
    eval_mode = runtime.build(_batch_norm_first(_archive(bound_kept), False))  # the same graph in eval mode loads
    x = torch.rand(3, *SHAPE)
    before = {k: v.clone() for k, v in eval_mode.network.state_dict().items()}
    eval_mode(x)
    assert all(torch.equal(before[k], v) for k, v in eval_mode.network.state_dict().items())
