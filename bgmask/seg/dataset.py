"""`CUBBinarySegDataset` (the `bgmask make-binary-seg` folder) and `BinarySegMetric`, registered in
MMSeg's registries on import.

    DATA_ROOT/images/<split>/<CUB relpath>.jpg
    DATA_ROOT/annotations/<split>/<CUB relpath>.png     0 = background, 1 = bird

Splits: train, val, test, and waterbird_test (Waterbirds images, scored against annotations/test).
The images are upright and carry no EXIF rotation (`make-binary-seg` writes them by
`bgmask.data.images.write_upright`), so the configs' LoadImageFromFile gives the classifier's pixels with
any decoding backend, and the annotations (PNG, read without EXIF handling) line up with them.
`BinarySegMetric` = MMSeg's IoUMetric (aAcc, mIoU, mDice in percent) plus the bird class's own
IoU and Dice (`IoU.bird`, `Dice.bird`): with two classes, mIoU averages in the easy background.
"""

from __future__ import annotations

import os

from bgmask.seg import compat

compat.install()  # before mmseg: stand-in mmcv._ext on mmcv-lite, PyTorch deformable attention

from mmseg.datasets.basesegdataset import BaseSegDataset  # noqa: E402
from mmseg.evaluation.metrics import IoUMetric  # noqa: E402
from mmseg.registry import DATASETS, METRICS  # noqa: E402

from bgmask.errors import UserError  # noqa: E402

CLASSES = ("background", "bird")
PALETTE = [[0, 0, 0], [255, 255, 255]]


@DATASETS.register_module()
class CUBBinarySegDataset(BaseSegDataset):
    """Binary background (0) / bird (1) segmentation of CUB-200-2011, Waterbirds or the synthetic
    benchmark."""

    METAINFO = dict(classes=CLASSES, palette=PALETTE)

    def __init__(self, img_suffix=".jpg", seg_map_suffix=".png", reduce_zero_label=False, **kwargs) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label, **kwargs)

    def load_data_list(self) -> list[dict]:
        img_dir = self.data_prefix.get("img_path", "")
        ann_dir = self.data_prefix.get("seg_map_path", None)
        if not os.path.isdir(img_dir):
            raise UserError(f"segmentation image folder not found: {img_dir} "
                            "(expected the output of `bgmask make-binary-seg`; set it with --data-root)")
        data_list = super().load_data_list()
        if not data_list:
            raise UserError(f"no {self.img_suffix} images in {img_dir}")
        if ann_dir is not None:
            missing = [d["seg_map_path"] for d in data_list if not os.path.isfile(d["seg_map_path"])]
            if missing:
                raise UserError(f"annotation not found: {missing[0]} ({len(missing)} of {len(data_list)} "
                                f"images in {img_dir} have none)")
        return data_list


@METRICS.register_module()
class BinarySegMetric(IoUMetric):
    """IoUMetric plus `IoU.bird` and `Dice.bird` (percent, like MMSeg's other metrics)."""

    def compute_metrics(self, results: list) -> dict[str, float]:
        metrics = super().compute_metrics(results)
        if self.format_only or not results:
            return metrics
        inter, union, pred, label = (sum(x) for x in zip(*results))
        classes = list(self.dataset_meta["classes"])
        bird = classes.index("bird") if "bird" in classes else len(classes) - 1
        i, u, p, t = (float(x[bird]) for x in (inter, union, pred, label))
        metrics["IoU.bird"] = round(100.0 * i / u, 2) if u else float("nan")
        metrics["Dice.bird"] = round(200.0 * i / (p + t), 2) if p + t else float("nan")
        return metrics
