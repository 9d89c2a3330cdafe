"""`permute_blocks` / `unpermute_blocks` (the exchange hops' blockwise gathers and
scatter-adds) equal `permute` / `unpermute` with unit weights: values, gradients
(their custom VJPs are each other), padding ids, and the pallas fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiermoe_jax.permute import permute, permute_blocks, unpermute, unpermute_blocks

ROWS, BLOCKS, SIZE, D = 10, 4, 6, 8  # a hop: 10 sender rows, 4 peers x 6 slots


def _ids(seed: int):
  """A hop's slot -> row table: each row in at most one slot per block, -1 padding,
  plus out-of-range ids (treated as padding by the contract)."""
  rng = np.random.default_rng(seed)
  ids = np.full((BLOCKS, SIZE), -1)
  for b in range(BLOCKS):
    rows = rng.permutation(ROWS)[:rng.integers(0, SIZE + 1)]
    ids[b, :len(rows)] = rows
  ids[1, -1], ids[3, 0] = ROWS, -7
  return jnp.asarray(ids.reshape(-1), jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_blockwise_forms_equal_the_plain_ones_with_gradients(dtype, seed):
  ids = _ids(seed)
  x = jax.random.normal(jax.random.key(seed), (ROWS, D)).astype(dtype)
  buf = jax.random.normal(jax.random.key(seed + 9), (BLOCKS * SIZE, D)).astype(dtype)
  ones = jnp.ones((BLOCKS * SIZE,), dtype)

  def plain(x, buf):
    return (permute(x, ids), unpermute(buf, ids, ones, num_tokens=ROWS))

  def blocks(x, buf):
    return (permute_blocks(x, ids, blocks=BLOCKS),
            unpermute_blocks(buf, ids, blocks=BLOCKS, num_tokens=ROWS))

  for a, b in zip(jax.jit(blocks)(x, buf), plain(x, buf)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  cot = (jax.random.normal(jax.random.key(5), (BLOCKS * SIZE, D)).astype(dtype),
         jax.random.normal(jax.random.key(6), (ROWS, D)).astype(dtype))
  got = jax.jit(lambda x, buf: jax.vjp(blocks, x, buf)[1](cot))(x, buf)
  want = jax.vjp(plain, x, buf)[1](cot)
  for a, b in zip(got, want):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_one_block_and_pallas_are_the_plain_calls():
  ids = _ids(2)
  x = jax.random.normal(jax.random.key(0), (ROWS, D))
  np.testing.assert_array_equal(permute_blocks(x, ids, blocks=1), permute(x, ids))
  np.testing.assert_array_equal(permute_blocks(x, ids, blocks=BLOCKS, impl="pallas"),
                                permute(x, ids))
  buf = permute(x, ids)
  np.testing.assert_allclose(
      unpermute_blocks(buf, ids, blocks=BLOCKS, num_tokens=ROWS, impl="pallas"),
      unpermute(buf, ids, jnp.ones(ids.shape, buf.dtype), num_tokens=ROWS), rtol=1e-6)


@pytest.mark.parametrize("blocks", [0, 5, 2.0])
def test_blocks_that_do_not_split_the_buffer_are_refused(blocks):
  ids, x = _ids(0), jnp.zeros((ROWS, D))
  with pytest.raises(ValueError, match=f"blocks={blocks!r} is invalid.*24 rows"):
    permute_blocks(x, ids, blocks=blocks)
  with pytest.raises(ValueError, match=f"blocks={blocks!r} is invalid.*24 rows"):
    unpermute_blocks(permute(x, ids), ids, blocks=blocks, num_tokens=ROWS)
