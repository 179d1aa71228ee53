"""Data: records of labelled images (records), the COCO and VOC readers, image decoding, EdgeBoxes
proposals, WebDataset shards, the input transforms, and the generated sets (synthetic, photos).
Imports no model, training, Ray or MLflow code."""
