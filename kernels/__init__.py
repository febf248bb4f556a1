"""Triton kernels, installed as ``fastft.kernels``.

Each module here holds one op: kernels, launchers, an autograd Function and a plain alias. Nothing
here queries the device at import time; the dispatcher in ``fastft.ops`` imports these lazily.
"""
