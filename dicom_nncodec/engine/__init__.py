"""The coding engine of bitstream version 2.

* ``kernels``: the compiled (numba) plane coder: network, adaptive context tables and rANS, fused;
* ``planes``: the Python face of it: weights in the engine's layout, payloads of whole planes, threads;
* ``reference``: a plain-Python transcription of the coder, the oracle of the tests.
"""
