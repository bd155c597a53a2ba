"""MLflow "models from code" entry of every registered moie model: MLflow runs this file to
build the model (nothing pickled); `pipeline.serve.serving.MoieModel` loads the logged safetensors
+ JSON, checking their sha256."""
import mlflow

from pipeline.serve.serving import MoieModel

mlflow.models.set_model(MoieModel())
