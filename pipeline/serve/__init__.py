"""Models in use: registered models as MLflow pyfunc models, sampling and scoring, the expert library."""
