"""The network (section 3): backbones (shared trunk, RoI pooling, fc6/fc7), gates, multi-scale
cross-region max pooling, the RGNN, and its losses (eqs. 6-9). Imports neither Ray nor MLflow, nor
rgnn.data, rgnn.train, rgnn.infer, rgnn.io or rgnn.tracking."""
