"""The coding engine of bitstream version 2.

* ``kernels``: the compiled (numba) plane coder: network, adaptive context tables and rANS, fused;
* ``planes``: the Python face of it: weights in the engine's layout, payloads of whole planes, threads;
* ``reference``: a plain-Python transcription of the coder, the oracle of the tests.
"""

import os


def default_threads() -> int:
    """Threads the engine and the node's retrieval use when not told: ``DICOM_NNCODEC_THREADS``, else one
    per CPU.  Here, not in ``planes``, so that asking costs no compiled-engine import."""
    env = os.environ.get("DICOM_NNCODEC_THREADS")
    return max(1, int(env)) if env else max(1, os.cpu_count() or 1)
