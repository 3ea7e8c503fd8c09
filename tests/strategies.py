"""Hypothesis strategies shared by the tests."""
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@st.composite
def float_arrays(draw, *, min_dims=1, max_dims=3, min_side=1, max_side=12, last_multiple_of=1, dtypes=FLOAT_DTYPES,
                 max_abs=1e3):
    """Finite float arrays of a drawn dtype and shape; the last side is a multiple of
    ``last_multiple_of``. Elements mix zeros, tiny and large magnitudes and exact ties."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side))
    shape = shape[:-1] + (shape[-1] * last_multiple_of,)
    width = np.dtype(dtype).itemsize * 8
    elements = st.floats(-max_abs, max_abs, allow_nan=False, allow_infinity=False, width=width,
                         allow_subnormal=width > 16)
    return draw(hnp.arrays(dtype, shape, elements=elements))


def int_codes(bits, signed, shape):
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return hnp.arrays(np.int16, shape, elements=st.integers(lo, hi))


@st.composite
def weight_rows(draw, block, max_blocks=4):
    """float32 rows: mixed magnitudes (incl. subnormals), exact zeros, repeated values and ties."""
    rows = draw(st.integers(1, 3))
    n = block * draw(st.integers(1, max_blocks))
    scale = draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e4, 3e37]))
    kind = draw(st.sampled_from(["floats", "ints", "halves"]))
    if kind == "floats":
        el = st.floats(-1, 1, width=32, allow_subnormal=True)
        x = draw(hnp.arrays(np.float32, (rows, n), elements=el)) * np.float32(scale)
    else:
        x = draw(hnp.arrays(np.int8, (rows, n), elements=st.integers(-8, 8))).astype(np.float32)
        x = x * np.float32(0.5 if kind == "halves" else 1.0)
    return np.nan_to_num(x.astype(np.float32), posinf=3e38, neginf=-3e38)
