"""Using a trained model: prediction (`python -m rgnn.infer.predict`), evaluation on a labelled split
(`python -m rgnn.infer.evaluate`), gate pictures and PR curves (`python -m rgnn.infer.visualize`).
Imports neither Ray nor MLflow (a `models:/` checkpoint is fetched through rgnn.io.checkpoint)."""
