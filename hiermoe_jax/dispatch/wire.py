"""The wire format of exchanged rows (`MoEConfig.comm_dtype`, docs/design.md section 4).

Dedup cuts the rows a hop sends; the wire format cuts the bytes per row, and the
two multiply. As DeepSeek-V3 / DeepEP do:
  - dispatch rows travel in `comm_dtype`: "float32", "bfloat16", or
    "float8_e4m3fn" with one float32 scale per row (amax / 448), packed into the
    same buffer as 4 extra bytes so a hop stays one collective;
  - combine rows travel in bfloat16 when a low-precision wire is asked for (or in
    the activation dtype, if that is narrower), in the activation dtype otherwise;
  - the backward pass of an fp8 dispatch sends its cotangents in bfloat16.
Expert compute, the router and the residual stream keep their dtypes: rows are
cast back to the activation dtype on arrival.

Sub-32-bit floats cross a padded exchange as raw bits (uint16 / uint8, `carry`):
XLA:CPU widens bfloat16 and float8 collectives to float32, which on the CPU testbed
put 2x (bf16) or 4x (fp8) the bytes on the link; on GPU the bitcasts are free.

Error of one fp8 row x (scale s = max|x| / 448), per element:
    |dequant(quant(x)) - x| <= max(2**-4 * |x|, 2**-10 * s)
(3 mantissa bits, round to nearest; 2**-10 is half the subnormal spacing), then
one rounding to the activation dtype. bfloat16: <= 2**-9 * |x|.
Legend (docs/legend.md): S buffer slots, D model dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

FP8 = "float8_e4m3fn"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
WIRE_DTYPES = ("float32", "bfloat16", FP8)


def combine_dtype(activation, comm_dtype: str | None):
  """The dtype combine rows travel in."""
  activation = jnp.dtype(activation)
  if comm_dtype is None:
    return activation
  wire = jnp.dtype("bfloat16" if comm_dtype == FP8 else comm_dtype)
  return wire if wire.itemsize < activation.itemsize else activation


def bytes_per_row(d_model: int, activation, comm_dtype: str | None) -> int:
  """Bytes one dispatched row of width D puts on the wire (fp8: + its scale)."""
  if comm_dtype == FP8:
    return d_model + 4
  return d_model * jnp.dtype(activation if comm_dtype is None else comm_dtype).itemsize


def bytes_per_elem(d_model: int, activation, comm_dtype: str | None) -> float:
  """Bytes per row element over a dispatch + combine round trip, averaged: what the
  cost model prices, since it prices both directions alike (fp8: ~1.5)."""
  back = combine_dtype(activation, comm_dtype).itemsize * d_model
  return (bytes_per_row(d_model, activation, comm_dtype) + back) / (2 * d_model)


def quantize(x_SD):
  """Per-row fp8: [S, D + 4] float8_e4m3fn, the last 4 bytes the row's f32 scale."""
  amax_S1 = jnp.max(jnp.abs(x_SD.astype(jnp.float32)), axis=-1, keepdims=True)
  scale_S1 = jnp.where(amax_S1 > 0, amax_S1 / FP8_MAX, 1.0)
  q_SD = (x_SD.astype(jnp.float32) / scale_S1).astype(FP8)
  scale_bytes = jax.lax.bitcast_convert_type(scale_S1[:, 0], jnp.uint8)  # [S, 4]
  return jnp.concatenate([q_SD, jax.lax.bitcast_convert_type(scale_bytes, FP8)], axis=-1)


def dequantize(packed, dtype):
  """Inverse of `quantize`, to `dtype`."""
  scale_S = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(packed[:, -4:], jnp.uint8), jnp.float32)
  return (packed[:, :-4].astype(jnp.float32) * scale_S[:, None]).astype(dtype)


def _bits_dtype(dtype):
  """The unsigned integer a sub-32-bit float travels as; None for any other dtype."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    return jnp.dtype(f"uint{8 * dtype.itemsize}")
  return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _exchange_bits(x_SD, exchange):
  bits = jax.lax.bitcast_convert_type(x_SD, _bits_dtype(x_SD.dtype))
  return jax.lax.bitcast_convert_type(exchange(bits), x_SD.dtype)


def _exchange_bits_fwd(x_SD, exchange):
  return _exchange_bits(x_SD, exchange), None


def _exchange_bits_bwd(exchange, _, g_SD):
  return (_exchange_bits(g_SD, exchange),)  # the all-to-all is its own transpose


_exchange_bits.defvjp(_exchange_bits_fwd, _exchange_bits_bwd)


def carry(x_SD, exchange, raw_bits: bool):
  """`exchange(x)`; with `raw_bits` (a padded exchange that closes over no traced
  value), a sub-32-bit float moves as raw bits, so the wire holds its own bytes."""
  if raw_bits and _bits_dtype(x_SD.dtype) is not None:
    return _exchange_bits(x_SD, exchange)
  return exchange(x_SD)


def send(buf_SD, exchange, comm_dtype: str | None, *, raw_bits: bool = False):
  """`exchange(buf)` (a linear, self-transposed all-to-all) with the rows on the
  wire in `comm_dtype`; returns them in buf's dtype. `raw_bits`: see `carry`."""
  move = functools.partial(carry, exchange=exchange, raw_bits=raw_bits)
  if comm_dtype is None or jnp.dtype(comm_dtype) == buf_SD.dtype:
    return move(buf_SD)
  if comm_dtype != FP8:  # a plain cast: its cotangent travels in the same dtype
    return move(buf_SD.astype(comm_dtype)).astype(buf_SD.dtype)
  return _send_fp8(buf_SD, move)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _send_fp8(buf_SD, exchange):
  return dequantize(exchange(quantize(buf_SD)), buf_SD.dtype)


def _send_fp8_fwd(buf_SD, exchange):
  return _send_fp8(buf_SD, exchange), None


def _send_fp8_bwd(exchange, _, g_SD):
  # The all-to-all is its own transpose; the cotangents go back in bfloat16.
  return (exchange(g_SD.astype(jnp.bfloat16)).astype(g_SD.dtype),)


_send_fp8.defvjp(_send_fp8_fwd, _send_fp8_bwd)
