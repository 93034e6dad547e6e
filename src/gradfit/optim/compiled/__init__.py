"""The compiled Levenberg–Marquardt kernel (Numba): ``bridge`` (the Python side), ``kernel``
(the iteration), ``interpreter`` (expression programs as data)."""
