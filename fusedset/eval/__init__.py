"""Accuracy evaluation: 1:1 / 1:N metrics and the IJB-style evaluation run of the methods in
``fusedset.methods``."""
