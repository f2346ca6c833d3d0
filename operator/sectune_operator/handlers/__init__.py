"""kopf handlers. `kopf run -m sectune_operator.handlers` registers them all."""

from sectune_operator.handlers import finetunejob, startup

__all__ = ["finetunejob", "startup"]
