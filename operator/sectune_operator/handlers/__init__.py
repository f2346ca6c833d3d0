"""kopf handlers: importing this package registers them; `register` adds the timers whose
interval is an operator setting (`python -m sectune_operator` calls it with the settings it
read at startup)."""

from sectune_operator.handlers import adapterdeployment, finetunejob, finetuneschedule, startup
from sectune_operator.settings import Settings


def register(settings: Settings) -> None:
    adapterdeployment.register_timers(settings.status_interval)
    finetuneschedule.register_timers(settings.status_interval)


__all__ = ["adapterdeployment", "finetunejob", "finetuneschedule", "register", "startup"]
