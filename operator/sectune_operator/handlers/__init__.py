"""kopf handlers. `kopf run -m sectune_operator.handlers` registers them all."""

from sectune_operator.handlers import adapterdeployment, finetunejob, startup

__all__ = ["adapterdeployment", "finetunejob", "startup"]
