"""MLflow "models from code" entry: the file ``log_model`` hands MLflow instead
of a pickled object. MLflow runs it when loading the model (with the logged
deltarec package first on the path) and takes the model it sets."""
import mlflow

from deltarec.serving.pyfunc import DeltarecRecommender

mlflow.models.set_model(DeltarecRecommender())
