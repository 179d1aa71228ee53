"""Training (section 4.2): the configuration, the 4-stage schedule and lambda, one epoch of a stage
(engine), the stages in order (stages), the EMA of the weights, the stand-in backbone's pretraining.
Imports neither Ray nor MLflow, nor rgnn.infer or rgnn.tracking."""
