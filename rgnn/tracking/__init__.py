"""Everything MLflow: runs and their lifecycle (runs), the artifacts of a finished training
(artifacts), the trained model as a pyfunc Model (pyfunc). Imports no Ray."""
