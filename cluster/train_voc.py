"""Train an RGNN on Pascal VOC: `python cluster/train_voc.py --voc-root VOCdevkit/VOC2007 [flags]`.

The same driver as train_coco.py (every flag is shared); trains on trainval and validates on
test, reporting the VOC 2007 11-point mAP beside the area one.
"""
import sys

from cluster.driver import main

if __name__ == "__main__":
    if not any(a.startswith(("--voc-root", "--config", "-h", "--help")) for a in sys.argv[1:]):
        sys.exit("train_voc.py needs --voc-root VOCdevkit/VOC2007 (or VOC2012)")
    main()
