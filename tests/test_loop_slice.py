"""lminf_jax.loop_slice: the slice's values, and no whole-array conversion hoisted out of the loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lminf_jax.loop_slice import loop_slice


def test_values_are_the_plain_slices():
    x = {"a": jnp.arange(24.0).reshape(4, 6), "b": jnp.arange(8).reshape(4, 2)}
    got = loop_slice(x, jnp.int32(2))
    np.testing.assert_array_equal(got["a"], x["a"][2])
    np.testing.assert_array_equal(got["b"], x["b"][2])
    np.testing.assert_array_equal(loop_slice(x["a"], jnp.int32(1), 3, axis=1), x["a"][:, 1:4])


def test_a_bfloat16_stack_scanned_in_a_loop_is_not_converted_whole():
    """On XLA:CPU (bfloat16 computed in float32) a plain scan's slice plans a float32 copy of the whole
    stack; `loop_slice` plans one slice's."""
    stack = jax.ShapeDtypeStruct((16, 256, 256), jnp.bfloat16)
    h = jax.ShapeDtypeStruct((8, 256), jnp.bfloat16)

    def run(take):
        def body(h, xs):
            w, i = xs
            return jnp.tanh(h @ take(w, i)), None
        return lambda stack, h: lax.scan(lambda c, xs: body(c, (xs[0], xs[1])), h, (stack, jnp.arange(16)))[0]

    def temp(fn):
        return jax.jit(fn).lower(stack, h).compile().memory_analysis().temp_size_in_bytes

    whole_f32 = 16 * 256 * 256 * 4
    plain = temp(run(lambda w, i: w))
    pinned = temp(lambda s, h: run(lambda w, i: loop_slice(s, i))(s, h))
    if jax.default_backend() == "cpu":
        assert plain >= whole_f32  # the hoisted conversion this module exists for
    assert pinned < whole_f32 / 4
