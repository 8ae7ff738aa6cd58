"""Accuracy evaluation: template fusion baselines and the method registry, 1:1 / 1:N metrics,
and the IJB-style evaluation run."""

from fusedset.eval.fusion import (
    Fuser,
    Method,
    Template,
    get_method,
    method_names,
    register_method,
)

__all__ = ["Fuser", "Method", "Template", "get_method", "method_names", "register_method"]
