"""The DVC stages, what they share, and the Prefect flows.

Importing the package (which any `pipeline.*` import does first) turns off the telemetry of the
tools it drives, before any of them is imported (Prefect, MLflow and onnxruntime read these at import),
selects matplotlib's file-only backend and hides MLflow's artifact progress bars (the store is
local: "Downloading artifacts" in a stage's log would only read as network traffic). Values
already set in the environment win.
"""
import os

TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "ORT_DISABLE_TELEMETRY": "1"}

for _key, _value in {**TELEMETRY_OFF, "MPLBACKEND": "Agg", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
    os.environ.setdefault(_key, _value)
