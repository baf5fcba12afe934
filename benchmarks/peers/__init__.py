"""influencekit against dattri, pyDVL, Captum and kronfluence at matched iHVP accuracy (issue 15, item 2).

``context``: the workloads (W1 and W2 from ``ihvp_family``; the Figure 2 CNN), cast to the benchmark's dtype.
``rows``: one function per (library, method), each returning the iHVP in influencekit's parameter order.
The driver is ``benchmarks/bench_peers.py``.
"""
