"""Train an RGNN on Pascal VOC: `python cluster/train_voc.py --voc-root VOCdevkit/VOC2007 [flags]`.

The same engine as train_coco.py (every flag is shared); trains on trainval and validates on
test, reporting the VOC 2007 11-point mAP beside the area one.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.train_coco import main  # noqa: E402

if __name__ == "__main__":
    if not any(a.startswith(("--voc-root", "--config", "-h", "--help")) for a in sys.argv[1:]):
        sys.exit("train_voc.py needs --voc-root VOCdevkit/VOC2007 (or VOC2012)")
    main()
