"""Every MLflow tracking-store call of medldm: logging training and evaluation runs (``Tracker``) and fetching
logged or registered models (``download_model``). Registration, the pyfunc model and serving live in
``medldm.serving``, which builds on this package and on ``medldm.sampling``."""

from medldm.tracking.runs import Tracker, flatten, git_commit, mlflow_name

__all__ = ["Tracker", "flatten", "git_commit", "mlflow_name"]
