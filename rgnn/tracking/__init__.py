"""Everything MLflow: runs, their lifecycle and what is read back from them (runs), the artifacts of a
finished training (artifacts), the trained model as a pyfunc Model (pyfunc) and read back as a checkpoint
(models). Imports no Ray."""
