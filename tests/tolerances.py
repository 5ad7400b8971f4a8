"""Tolerances of the oracle tests, a property of the computation rather than of one CPU's kernels."""

# Small float64 computations (a linear layer, a loss over a dozen samples): the rounding of their sums,
# about 1e-16 a term, stays far below this whatever order AVX-512, AVX2 or the default kernels sum in,
# while a wrong term or factor moves losses and gradients by 1e-3 and more.
FLOAT64 = {"rtol": 1e-9, "atol": 1e-12}
