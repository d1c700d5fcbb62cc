"""GenEval reward: an object detector + a CLIP colour classifier, from local folders.

Detector (``detector_path``): any transformers ``AutoModelForObjectDetection`` folder (DETR family:
boxes only) or a ``Mask2FormerForUniversalSegmentation`` folder (instance masks; the reference uses
Mask2Former Swin-S on COCO); its processor is loaded from the same folder. Class names come from
the detector's ``id2label`` unless ``class_names`` (a list, or a text file with one name a line)
overrides them -- GenEval's prompts use COCO names such as ``"dining table"``, except ``mouse``,
``keyboard`` and ``remote``, which are renamed to GenEval's ``computer mouse``, ``computer keyboard``
and ``tv remote`` when the names come from ``id2label``.

Colour classifier (``clip_path``): CLIP zero-shot over ``COLORS`` with three templates per class,
on each object crop (the object's mask composited on a ``#999`` grey background when the detector
gives masks, then cropped to its box).

The rules live in :mod:`awm_jax.rewards.geneval_rules` (pure functions of detections). The
training reward (``__call__``) is the partial score; ``evaluate`` returns per-sample
``accuracy`` (GenEval's metric), ``strict_accuracy`` (exact counts, the reward server's strict
verdict), ``score`` (partial), ``tag`` and ``reason``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from awm_jax.rewards import geneval_rules as R
from awm_jax.rewards.base import RewardConfigError, check_batch, check_dir
from awm_jax.rewards.clip_utils import image_features, load_clip, text_features

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
# COCO label names (as in transformers COCO checkpoints' id2label) that GenEval's prompts spell differently
COCO_TO_GENEVAL = {"mouse": "computer mouse", "keyboard": "computer keyboard", "remote": "tv remote"}


def _load_class_names(class_names: Any, id2label: dict) -> list[str]:
    if class_names is None:
        return [COCO_TO_GENEVAL.get(id2label[i], id2label[i]) for i in sorted(id2label)]
    if isinstance(class_names, (str, os.PathLike)):
        path = os.fspath(class_names)
        if not os.path.isfile(path):
            raise RewardConfigError(f"geneval: class_names file {path!r} does not exist")
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = [str(c) for c in class_names]
    if len(names) != len(id2label):
        raise RewardConfigError(f"geneval: {len(names)} class names given but the detector has "
                                f"{len(id2label)} classes")
    return names


class Detector:
    """Wraps a transformers detector: ``detect(images) -> [{class: [{box, score, mask}]}]``."""

    def __init__(self, path: str, class_names: Any = None, device: str = "cpu"):
        from transformers import AutoConfig, AutoImageProcessor

        path = check_dir(path, "geneval detector_path")
        try:
            cfg = AutoConfig.from_pretrained(path)
            self.processor = AutoImageProcessor.from_pretrained(path)
            if cfg.model_type == "mask2former":
                from transformers import Mask2FormerForUniversalSegmentation as cls
            else:
                from transformers import AutoModelForObjectDetection as cls
            self.model = cls.from_pretrained(path).to(device).eval()
        except Exception as e:
            raise RewardConfigError(f"geneval: cannot load a detector from {path!r}: {e}") from e
        self.segmentation = cfg.model_type == "mask2former"
        self.class_names = _load_class_names(class_names, self.model.config.id2label)
        self.device = device

    def detect(self, images: np.ndarray) -> list[dict]:
        """Raw detections (all scores) of a uint8 (B,H,W,3) batch; boxes in pixels (x0,y0,x1,y1)."""
        import torch

        sizes = [tuple(img.shape[:2]) for img in images]
        with torch.inference_mode():
            inp = self.processor(images=list(images), return_tensors="pt")
            out = self.model(pixel_values=inp["pixel_values"].to(self.device))
            if self.segmentation:
                res = self.processor.post_process_instance_segmentation(
                    out, threshold=0.0, target_sizes=sizes, return_binary_maps=True)
            else:
                res = self.processor.post_process_object_detection(out, threshold=0.0, target_sizes=sizes)
        return [self._to_dets(r) for r in res]

    def _to_dets(self, r: dict) -> dict:
        dets: dict[str, list] = {}
        if self.segmentation:
            maps = r["segmentation"]
            for k, info in enumerate(r["segments_info"]):
                mask = maps[k].numpy().astype(bool) if maps is not None else None
                if mask is None or not mask.any():
                    continue  # an object without pixels is not in the image
                ys, xs = np.nonzero(mask)
                box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                obj = {"box": box, "score": float(info["score"]), "mask": mask}
                dets.setdefault(self.class_names[int(info["label_id"])], []).append(obj)
        else:
            for s, lab, box in zip(r["scores"].tolist(), r["labels"].tolist(), r["boxes"].tolist()):
                obj = {"box": tuple(float(v) for v in box), "score": float(s), "mask": None}
                dets.setdefault(self.class_names[int(lab)], []).append(obj)
        return dets


class ColorClassifier:
    """CLIP zero-shot colour classifier over ``COLORS`` (per-class text classifiers are cached)."""

    def __init__(self, clip_path: str, processor_path: str | None = None, bgcolor: str = "#999",
                 device: str = "cpu"):
        self.model, self.processor = load_clip(clip_path, processor_path, "geneval colour classifier",
                                               device=device)
        self.bgcolor, self.device, self._cache = bgcolor, device, {}

    def _weights(self, cls: str):
        if cls not in self._cache:
            import torch

            per_template = [text_features(self.model, self.processor,
                                          [t.format(c=c, cls=cls) for c in COLORS], self.device)
                            for t in TEMPLATES]
            w = torch.stack(per_template).mean(0)
            self._cache[cls] = w / w.norm(dim=-1, keepdim=True)
        return self._cache[cls]

    def crop(self, image: np.ndarray, obj: dict) -> Image.Image:
        """The object's crop: its mask over a grey background (if any), cut to its box."""
        pil = Image.fromarray(image)
        if obj.get("mask") is not None:
            blank = Image.new("RGB", pil.size, color=self.bgcolor)
            pil = Image.composite(pil, blank, Image.fromarray(np.asarray(obj["mask"], np.uint8) * 255))
        x0, y0, x1, y1 = obj["box"]
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        return pil.crop((x0, y0, x1, y1))

    def classify(self, image: np.ndarray, objs: list[dict], cls: str) -> list[str]:
        """The colour name of each object of class ``cls`` in ``image``."""
        if not objs:
            return []
        feats = image_features(self.model, self.processor, [self.crop(image, o) for o in objs], self.device)
        return [COLORS[i] for i in (feats @ self._weights(cls).T).argmax(-1).tolist()]


class GenEvalScorer:
    """GenEval partial-score reward with a strict ``evaluate``; see the module docstring.

    Metadata per sample: the GenEval record (``tag``, ``include``, optional ``exclude``).
    """

    def __init__(self, detector_path: str, clip_path: str, clip_processor_path: str | None = None,
                 class_names: Any = None, threshold: float = R.THRESHOLD,
                 counting_threshold: float = R.COUNTING_THRESHOLD, max_objects: int = R.MAX_OBJECTS,
                 position_margin: float = R.POSITION_MARGIN, legacy_position: bool = False,
                 bgcolor: str = "#999", batch_size: int = 8, device: str = "cpu"):
        self.detector = Detector(detector_path, class_names, device)
        self.colors = ColorClassifier(clip_path, clip_processor_path, bgcolor, device)
        self.threshold, self.counting_threshold = float(threshold), float(counting_threshold)
        self.max_objects, self.margin = int(max_objects), float(position_margin)
        self.legacy_position, self.batch_size = bool(legacy_position), int(batch_size)

    def detections(self, images: np.ndarray, metadata: list[dict]) -> list[dict]:
        """Filtered detections with colours (for classes that have a colour clause), per image."""
        raw = []
        for s in range(0, len(images), self.batch_size):
            raw.extend(self.detector.detect(images[s:s + self.batch_size]))
        out = []
        for img, dets, meta in zip(images, raw, metadata):
            dets = R.filter_detections(dets, meta["tag"], self.threshold, self.counting_threshold,
                                       self.max_objects)
            for cls in {req["class"] for req in meta["include"] if "color" in req}:
                objs = dets.get(cls, [])
                for obj, col in zip(objs, self.colors.classify(img, objs, cls)):
                    obj["color"] = col
            out.append(dets)
        return out

    def _prepare(self, images, prompts, metadata):
        images, prompts, metadata = check_batch(images, prompts, metadata, "geneval")
        for i, (p, m) in enumerate(zip(prompts, metadata)):
            R.validate_metadata(m, self.detector.class_names, where=f"#{i} (prompt {p!r})")
        return images, prompts, metadata, self.detections(images, metadata)

    def __call__(self, images, prompts, metadata) -> np.ndarray:
        """Training reward: GenEval partial score per image, float32 (B,)."""
        images, prompts, metadata, dets = self._prepare(images, prompts, metadata)
        return np.array([R.reward_score(d, m, self.margin, self.legacy_position)[1]
                         for d, m in zip(dets, metadata)], np.float32)

    def evaluate(self, images, prompts, metadata) -> dict:
        """Per-sample ``accuracy``, ``strict_accuracy``, ``score`` (B,) arrays, ``tag``, ``reason`` lists."""
        images, prompts, metadata, dets = self._prepare(images, prompts, metadata)
        acc, strict, score, reason = [], [], [], []
        for d, m in zip(dets, metadata):
            ok, why = R.geneval_correct(d, m, self.margin)
            exact, sc = R.reward_score(d, m, self.margin, self.legacy_position)
            acc.append(float(ok))
            strict.append(float(exact))
            score.append(sc)
            reason.append(why)
        return {"accuracy": np.array(acc, np.float32), "strict_accuracy": np.array(strict, np.float32),
                "score": np.array(score, np.float32), "tag": [m["tag"] for m in metadata], "reason": reason}
