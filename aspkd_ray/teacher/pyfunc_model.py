"""MLflow models-from-code entry point for the served victim (run by MLflow, not imported).

The output mode comes from the model config saved with the model (see serving.py).
"""

import mlflow

from aspkd_ray.teacher.serving import VictimPyfunc

mlflow.models.set_model(VictimPyfunc())
