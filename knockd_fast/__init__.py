import os as _os

__version__ = "0.1.0"

# numpy's OpenBLAS starts a thread per core at import, and they spin for a while: about
# 0.1 s of CPU at every start on the daemon's 2-core gateways, for linear algebra it never
# does. Set before anything here imports numpy; an explicit setting wins.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
