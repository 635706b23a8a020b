"""pfor converters for TensorFlow's stateless random ops (V2), so a shard can vectorize them.

`tf.random.stateless_uniform(shape, seed)` is two ops, `StatelessRandomGetKeyCounter(seed)`
and `StatelessRandomUniformV2(shape, key, counter, alg)`, and TensorFlow has no pfor
converter for either (their kernels take one key, not a batch). A client update that draws
its own minibatch order from a per-client seed (the main job does) would then not vectorize
at all, or, with pfor's per-op fallback, pay a while-loop iteration per client (~100 us
each measured here: two thirds of the vectorized round).

The converters here compute the same Philox-4x32-10 stream as the CPU kernels, batched
over the group's clients, with uint64 tensor arithmetic (integer math: the numbers are
bitwise those of the per-client op; tests/test_vectorized_map.py compares them):

    StatelessRandomGetKeyCounter  seed (int32/int64 [2]) -> key uint64[1], counter uint64[2]
                                  (the seed's two halves scrambled by one Philox call)
    StatelessRandomUniformV2      float32, Philox (or auto-select, Philox on CPU and GPU),
                                  a shape that is the same for every client: element i of
                                  a client's output is word i % 4 of Philox(counter + i // 4)
                                  mapped to [0, 1) by its 23 low bits

Any other case (another dtype or distribution, a per-client shape, ThreeFry) loops over the
group's clients with pfor's own fallback (the per-client op, so again the same numbers), as
TensorFlow does for the V1 stateless ops; a per-client output shape fails the conversion
(the map then runs on the loop).

`register()` installs them, once per process, for ops TensorFlow has no converter for.
"""

from __future__ import annotations

import importlib
import threading

from mp_executors._tf import tf

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_KEY_SCRAMBLE = (0x3EC8F720, 0x02461E29)  # GenerateKey's fixed key for mixing a seed
_PHILOX, _AUTO_SELECT = 1, 3  # tensorflow/core/framework/rng_alg.h (auto-select is Philox on CPU/GPU)

_V2_OPS = ("StatelessRandomUniformV2", "StatelessRandomNormalV2", "StatelessTruncatedNormalV2",
           "StatelessRandomUniformIntV2", "StatelessRandomUniformFullIntV2")
_lock = threading.Lock()
_registered = False


def _u64(value: int):
    return tf.constant(value, tf.uint64)


def philox(counter: list, key: list) -> list:
    """Philox-4x32-10 on uint64 tensors holding 32-bit words (counter: 4 words, key: 2)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    mask, shift = _u64(_MASK32), _u64(32)
    for r in range(10):
        p0 = c0 * _u64(_PHILOX_M[0])
        p1 = c2 * _u64(_PHILOX_M[1])
        c0, c1, c2, c3 = (
            tf.bitwise.bitwise_xor(tf.bitwise.bitwise_xor(tf.bitwise.right_shift(p1, shift), c1), k0),
            tf.bitwise.bitwise_and(p1, mask),
            tf.bitwise.bitwise_xor(tf.bitwise.bitwise_xor(tf.bitwise.right_shift(p0, shift), c3), k1),
            tf.bitwise.bitwise_and(p0, mask),
        )
        if r < 9:
            k0 = tf.bitwise.bitwise_and(k0 + _u64(_PHILOX_W[0]), mask)
            k1 = tf.bitwise.bitwise_and(k1 + _u64(_PHILOX_W[1]), mask)
    return [c0, c1, c2, c3]


def _words(x) -> list:
    """A uint64 tensor as its (low, high) 32-bit words."""
    return [tf.bitwise.bitwise_and(x, _u64(_MASK32)), tf.bitwise.right_shift(x, _u64(32))]


def _join(low, high):
    return tf.bitwise.bitwise_or(low, tf.bitwise.left_shift(high, _u64(32)))


def key_counter(seeds):
    """Batched StatelessRandomGetKeyCounter: seeds [G, 2] int32/int64 -> key [G, 1], counter [G, 2] uint64."""
    # static_cast<uint64>(seed): int32 seeds are sign-extended first.
    as_u64 = tf.bitcast(tf.cast(seeds, tf.int64), tf.uint64)
    s0, s1 = as_u64[:, 0], as_u64[:, 1]
    mix = philox(_words(s0) + _words(s1), [_u64(_KEY_SCRAMBLE[0]), _u64(_KEY_SCRAMBLE[1])])
    key = _join(mix[0], mix[1])[:, None]
    counter = tf.stack([tf.zeros_like(key[:, 0]), _join(mix[2], mix[3])], axis=1)
    return key, counter


def uniform_float32(shape, key, counter):
    """Batched StatelessRandomUniformV2 (Philox, float32): key [G, 1], counter [G, >=2] -> [G, *shape]."""
    size = tf.reduce_prod(tf.cast(shape, tf.int64))
    groups = (size + 3) // 4
    # Skip(g) on the 128-bit counter: add g to word 0, carrying into the next words.
    g = tf.bitcast(tf.range(groups, dtype=tf.int64), tf.uint64)[None, :]
    c0, c1 = _words(counter[:, 0:1])
    c2, c3 = _words(counter[:, 1:2])
    s = c0 + g
    t = c1 + tf.bitwise.right_shift(s, _u64(32))
    u = c2 + tf.bitwise.right_shift(t, _u64(32))
    mask = _u64(_MASK32)
    words = [tf.bitwise.bitwise_and(s, mask), tf.bitwise.bitwise_and(t, mask), tf.bitwise.bitwise_and(u, mask),
             tf.bitwise.bitwise_and(c3 + tf.bitwise.right_shift(u, _u64(32)), mask)]
    k0, k1 = _words(key[:, 0:1])
    bits = tf.reshape(tf.stack(philox(words, [k0, k1]), axis=2), [tf.shape(key)[0], -1])[:, :size]
    # Uint32ToFloat: exponent 127 and the 23 low bits as mantissa, in [1, 2), minus 1.
    mantissa = tf.bitwise.bitwise_or(tf.bitwise.bitwise_and(bits, _u64(0x7FFFFF)), _u64(127 << 23))
    values = tf.bitcast(tf.cast(mantissa, tf.uint32), tf.float32) - 1.0
    return tf.reshape(values, tf.concat([tf.shape(key)[:1], tf.cast(shape, tf.int32)], axis=0))


def register() -> None:
    """Installs the converters (once per process; only where TensorFlow has none)."""
    global _registered
    with _lock:
        if _registered:
            return
        # TensorFlow's pfor internals: the converter registry, the per-op fallback, wrap().
        # By module name: in TF 2.14 (TFF's venv) `parallel_for.pfor` is the pfor *function*.
        pfor = importlib.import_module("tensorflow.python.ops.parallel_for.pfor")

        registry = getattr(pfor, "_pfor_converter_registry", {})

        def per_client(pfor_input):
            return pfor._fallback_converter(pfor_input, root_cause="stateless random op", warn=False)

        def convert_key_counter(pfor_input):
            seeds = pfor_input.stacked_input(0)
            if seeds.dtype not in (tf.int32, tf.int64):
                return per_client(pfor_input)
            key, counter = key_counter(seeds)
            return [pfor.wrap(key, True), pfor.wrap(counter, True)]

        def convert_v2(pfor_input):
            shape = pfor_input.unstacked_input(0)  # raises (no conversion) if it is per client
            alg = tf.get_static_value(pfor_input.unstacked_input(3))
            if (pfor_input.op_type == "StatelessRandomUniformV2" and pfor_input.get_attr("dtype") == tf.float32
                    and alg is not None and int(alg) in (_PHILOX, _AUTO_SELECT)):
                out = uniform_float32(shape, pfor_input.stacked_input(1), pfor_input.stacked_input(2))
                return [pfor.wrap(out, True)]
            return per_client(pfor_input)

        if "StatelessRandomGetKeyCounter" not in registry:
            pfor.RegisterPFor("StatelessRandomGetKeyCounter")(convert_key_counter)
        if "StatelessRandomGetKeyCounterAlg" not in registry:
            pfor.RegisterPFor("StatelessRandomGetKeyCounterAlg")(per_client)
        for op in _V2_OPS:
            if op not in registry:
                pfor.RegisterPFor(op)(convert_v2)
        _registered = True


__all__ = ["key_counter", "philox", "register", "uniform_float32"]
