import os
import subprocess
import sys
import textwrap

import pytest

from llava_jax import sharding

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    from flax import nnx
    from llava_jax import sharding
    from tests.train.toy import ToyLM

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model = sharding.create_sharded(lambda: ToyLM(vocab=18, dim=8, num_layers=3, rngs=nnx.Rngs(0)), mesh)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        array = var.get_value()
        shard_shapes = sorted({s.data.shape for s in array.addressable_shards})
        print("/".join(map(str, path)), tuple(array.sharding.spec), shard_shapes)
    reference = ToyLM(vocab=18, dim=8, num_layers=3, rngs=nnx.Rngs(0))
    # Same values as an unsharded init (up to float rounding of the jitted initializers).
    same = all(bool(jax.numpy.allclose(a, b, atol=1e-7)) for a, b in zip(jax.tree.leaves(nnx.state(model)),
                                                     jax.tree.leaves(nnx.state(reference))))
    print("same_values", same)
""")


def test_parameters_are_sharded_per_rules_on_8_devices():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    # embed [vocab 18, embed 8]: vocab -> tensor, embed -> fsdp; each device holds a [9, 4] block.
    assert lines["embed/weight"] == "('tensor', 'fsdp') [(9, 4)]"
    # stacked linear [layers 3, mlp 8, embed 8]: layers replicated.
    assert lines["layers/weight"] == "(None, 'tensor', 'fsdp') [(3, 4, 4)]"
    assert lines["norm/weight"] == "('fsdp',) [(4,)]"
    assert lines["same_values"] == "True"


def test_logical_rules_table():
    spec = sharding.logical_to_spec(("embed", "mlp"))
    assert tuple(spec) == ("fsdp", "tensor")
    # A mesh axis is used once per array.
    assert tuple(sharding.logical_to_spec(("mlp", "heads"))) == ("tensor", None)
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.logical_to_spec(("unknown",))


def test_mesh_shape_errors_name_the_axes():
    with pytest.raises(ValueError, match="data\\*fsdp\\*tensor"):
        sharding.make_mesh(data=2, fsdp=1, tensor=1)
