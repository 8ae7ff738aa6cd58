"""Accuracy evaluation of the methods in ``fusedset.methods``: 1:1 / 1:N metrics
(``metrics``) and the IJB-style evaluation run (``run.evaluate``)."""
