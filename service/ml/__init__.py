"""Pure machine-learning core: dropout nets, training, MC-dropout sampling and metrics.

Imports torch, numpy and (for the builtin datasets) scikit-learn only.
"""

from service.ml.nets import Activation, NetworkSpec, Task, build_network

__all__ = ["Activation", "NetworkSpec", "Task", "build_network"]
