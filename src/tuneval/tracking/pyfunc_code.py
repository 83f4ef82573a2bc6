"""The code of every logged tuneval model (MLflow's "models from code": this file is copied into the
model and run when it loads, instead of unpickling an object). It needs tuneval installed."""

import mlflow.models

from tuneval.tracking.pyfunc_model import TunevalModel

mlflow.models.set_model(TunevalModel())
