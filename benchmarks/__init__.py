"""The benchmark suite, installed as ``fusedset.bench`` (setup.py maps this folder there), so
``fusedset bench`` runs from any installation and ``python benchmarks/run.py`` from a checkout.

One module per op or module (``style_pool.py``, ...) defines ``cases(mode)``: the sizes to time
and the implementations to time side by side; ``suite.py`` runs them and writes the report.
"""
