"""lminf_jax.sharding: meshes from sizes and text, logical axes to partition specs (whole heads,
divisibility, FSDP), parameter rules and their errors."""

from __future__ import annotations

import jax
import pytest
from multidevice import run_on_devices

from lminf_jax.sharding import ShardingPlan, make_mesh, parse_mesh

SCRIPT = r"""
import json
from lminf_jax.sharding import ShardingPlan, make_mesh, parse_mesh

def partition_spec(plan, logical, shape, units=None):
    return [a for a in plan.partition_spec(logical, shape, units)]

out = {}
mesh = parse_mesh("data=2, model=-1")
out["parsed"] = dict(mesh.shape)
tp = ShardingPlan(make_mesh(data=2, model=4))
fsdp = ShardingPlan(make_mesh(data=2, model=4), fsdp=True)
out["q_proj"] = partition_spec(tp, ("layers", "heads", "embed"), (3, 8 * 16, 64), {"heads": 8})
out["q_proj_fsdp"] = partition_spec(fsdp, ("layers", "heads", "embed"), (3, 8 * 16, 64), {"heads": 8})
# 96 columns divide, heads not
out["six_heads"] = partition_spec(tp, ("layers", "heads", "embed"), (3, 6 * 16, 64), {"heads": 6})
out["odd_vocab"] = partition_spec(tp, ("vocab", "embed"), (97, 64))
out["activations"] = partition_spec(ShardingPlan(make_mesh(data=2, seq=4)), ("batch", "length", "hidden"), (4, 64, 32))
out["batch_3"] = partition_spec(ShardingPlan(make_mesh(data=2, seq=4)), ("batch", "length", "hidden"), (3, 64, 32))
rules = ((r"a\.w", ("heads", "embed")), (r"a\..*", ("hidden",)))
shardings = fsdp.param_shardings({"a.w": (8, 4), "a.b": (4,)}, rules)
out["rules"] = {name: list(s.spec) for name, s in shardings.items()}
out["describe"] = fsdp.describe(shardings)
for name, call in (("unmatched", lambda: tp.param_shardings({"b.w": (8, 4)}, rules)),
                   ("rank", lambda: tp.param_shardings({"a.w": (8,)}, rules)),
                   ("unknown_axis", lambda: tp.partition_spec(("nope",), (8,))),
                   ("product", lambda: make_mesh(data=3)),
                   ("free_divides", lambda: parse_mesh("data=3,seq=-1")),
                   ("syntax", lambda: parse_mesh("pipe=8"))):
    try:
        call()
    except ValueError as e:
        out[name] = str(e)
print("RESULT " + json.dumps(out))
"""


def test_specs_keep_heads_whole_and_follow_the_mesh():
    result = run_on_devices(SCRIPT)
    assert result["parsed"] == {"data": 2, "seq": 1, "model": 4}
    assert result["q_proj"] == [None, "model", None]
    assert result["q_proj_fsdp"] == [None, "model", "data"]
    assert result["six_heads"] == [None, None, None]  # 6 heads do not split 4 ways, whatever the columns
    assert result["odd_vocab"] == [None, None]
    assert result["activations"] == ["data", "seq", None]
    assert result["batch_3"] == [None, "seq", None]
    assert result["rules"] == {"a.w": ["model", "data"], "a.b": [None]}
    assert result["describe"].startswith("mesh data=2 x seq=1 x model=4 (8 cpu devices), FSDP; 1/2 parameters split")
    assert "no sharding rule matches parameter 'b.w'" in result["unmatched"]
    assert "names 2 axes" in result["rank"] and "unknown logical axis 'nope'" in result["unknown_axis"]
    assert "= 3 devices, but 8 are given" in result["product"]
    assert "8 devices do not divide by 3" in result["free_divides"]
    assert "'pipe=8'" in result["syntax"]


def test_one_device_plan_and_errors():
    plan = ShardingPlan(parse_mesh(""))
    assert dict(plan.mesh.shape) == {"data": 1, "seq": 1, "model": 1} and not plan.context_parallel
    assert plan.partition_spec(("batch", "length", "heads"), (2, 3, 4)) == jax.sharding.PartitionSpec(None, None, None)
    with pytest.raises(ValueError, match="mesh with axes"):
        ShardingPlan(jax.sharding.Mesh(jax.devices(), ("x",)))
    with pytest.raises(ValueError, match="mesh axis seq must be an integer >= 1"):
        make_mesh(seq=0)
    with pytest.raises(ValueError, match="at most one -1"):
        parse_mesh("data=-1,seq=-1")
