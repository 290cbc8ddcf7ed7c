"""The code MLflow logs for the `clip` pyfunc (MLflow's "models from code"): loading the model runs
this file rather than unpickling an object. The model is `pipeline.serving.ClipModel`, so the project
must be installed where it is served (`--env-manager local`)."""
import mlflow

from pipeline.serving import ClipModel

mlflow.models.set_model(ClipModel())
