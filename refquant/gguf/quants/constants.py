"""Constants of ggml-quants.c shared by the NumPy reference (``core`` and the family
modules) and the compiled quantizers (``compiled``), which must not import each other."""
import numpy as np

GROUP_MAX_EPS = np.float32(1e-15)
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
KVALUES_FP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)  # 2 * e2m1
