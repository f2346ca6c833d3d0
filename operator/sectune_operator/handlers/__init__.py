"""kopf handlers. `kopf run -m sectune_operator.handlers` registers them all."""

from sectune_operator.handlers import adapterdeployment, finetunejob, finetuneschedule, startup

__all__ = ["adapterdeployment", "finetunejob", "finetuneschedule", "startup"]
