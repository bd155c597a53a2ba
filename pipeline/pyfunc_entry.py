"""MLflow "models from code" entry of every registered moie model: MLflow runs this file to
build the model (nothing pickled); `pipeline.serving.MoieModel` loads the logged safetensors
+ JSON, checking their sha256."""
import mlflow

from pipeline.serving import MoieModel

mlflow.models.set_model(MoieModel())
