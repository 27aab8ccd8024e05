"""The official sparse-label files, rasterised to label maps (class 0..20, 255 = unlabeled).

- ScribbleSup (Lin et al., CVPR 2016) XML: ``<annotation><size><width/><height/></size>`` and one
  ``<polygon><tag>CLASS</tag><point><X/><Y/></point>...</polygon>`` per scribble, a polyline
  in pixel coordinates. Each polyline is drawn as segments ``width`` px wide (default 3, about
  the width of the released rasterised scribbles) with round joints; background scribbles
  first, object scribbles on top. Tags are VOC names or ScribbleSup's short names
  (``plane``, ``bike``, ``table``, ``plant``, ``monitor``); ScribbleSup also labels
  PASCAL-Context "stuff" classes (``sky``, ``grass``, ...), which are background for the 21
  VOC classes (``context="background"``) or refused (``context="error"``).
- What's-the-point (Bearman et al., ECCV 2016) JSON as redistributed by GatedCRFLoss:
  ``{NAME: [{"cls": c, "x": x, "y": y, "rank": r}, ...]}`` (0-based pixel coordinates), or
  ``{NAME: {"list name": [clicks], ...}}`` (lists whose name starts with ``bg`` are drawn first).
  Each click is a disk of ``radius`` px around ``(round(x), round(y))`` (radius 1 = the pixel
  and its 4 neighbours), clipped to the image; ``max_rank=1`` keeps one click per class.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .voc import IGNORE_INDEX, VOC_CLASSES, VocDataError

SCRIBBLESUP_ALIASES = {
    "plane": "aeroplane", "bike": "bicycle", "table": "diningtable", "plant": "pottedplant",
    "monitor": "tvmonitor", "tv": "tvmonitor", "motorbike": "motorbike",
}
# PASCAL-Context classes ScribbleSup annotates that are not among the 20 VOC objects
CONTEXT_CLASSES = frozenset("""
sky grass ground road building tree water mountain wall floor track keyboard ceiling bag bed bedclothes
bench book cabinet cloth computer cup curtain door fence flower food mouse plate platform rock shelves
sidewalk sign snow truck window wood light
""".split())


def _class_index(tag: str, source: str, context: str) -> int:
    name = tag.strip().lower()
    name = SCRIBBLESUP_ALIASES.get(name, name)
    if name in VOC_CLASSES:
        return VOC_CLASSES.index(name)
    if name in CONTEXT_CLASSES and context == "background":
        return 0
    raise VocDataError(f"{source}: unknown class tag {tag!r} (VOC names, ScribbleSup short names"
                       + (" or PASCAL-Context classes" if context == "background" else "") + " expected)")


def _number(node, name: str, source: str) -> float:
    child = node.find(name)
    if child is None or child.text is None:
        raise VocDataError(f"{source}: a <point> has no <{name}>")
    try:
        return float(child.text)
    except ValueError:
        raise VocDataError(f"{source}: <{name}> {child.text!r} is not a number") from None


def read_scribblesup_xml(path) -> Tuple[Tuple[int, int], List[Tuple[int, np.ndarray]]]:
    """Parse a ScribbleSup XML file: ``((H, W) or None, [(tag, (P, 2) float xy array), ...])``."""
    source = os.fspath(path)
    try:
        root = ET.parse(source).getroot()
    except FileNotFoundError:
        raise VocDataError(f"missing scribble file {source}") from None
    except ET.ParseError as exc:
        raise VocDataError(f"{source} is not valid XML: {exc}") from None
    size = None
    node = root.find("size")
    if node is not None and node.find("width") is not None and node.find("height") is not None:
        try:
            size = (int(node.find("height").text), int(node.find("width").text))
        except (TypeError, ValueError):
            raise VocDataError(f"{source}: <size> must hold integer <width> and <height>") from None
    strokes = []
    for poly in root.iter("polygon"):
        tag = poly.find("tag")
        if tag is None or not (tag.text or "").strip():
            raise VocDataError(f"{source}: a <polygon> has no <tag>")
        pts = [(_number(p, "X", source), _number(p, "Y", source)) for p in poly.findall("point")]
        if not pts:
            raise VocDataError(f"{source}: the <polygon> tagged {tag.text!r} has no <point>")
        strokes.append((tag.text.strip(), np.asarray(pts, dtype=np.float64)))
    return size, strokes


def rasterize_scribbles(strokes, size: Sequence[int], width: int = 3, context: str = "background",
                        source: str = "scribbles") -> np.ndarray:
    """Draw ``[(tag, (P, 2) xy), ...]`` polylines into an ``(H, W)`` uint8 map (255 elsewhere).

    Args:
        strokes: from :func:`read_scribblesup_xml`; tags are class names.
        size: ``(H, W)``.
        width: stroke width in pixels (>= 1).
        context: "background" maps PASCAL-Context stuff tags to class 0; "error" refuses them.
    """
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    if context not in ("background", "error"):
        raise ValueError(f"context must be 'background' or 'error', got {context!r}")
    h, w = int(size[0]), int(size[1])
    canvas = Image.new("L", (w, h), IGNORE_INDEX)
    draw = ImageDraw.Draw(canvas)
    indexed = [(_class_index(tag, source, context), pts) for tag, pts in strokes]
    indexed.sort(key=lambda s: s[0] != 0)  # background first, objects on top (stable)
    r = (width - 1) / 2.0
    for cls, pts in indexed:
        xy = [(float(x), float(y)) for x, y in pts]
        if len(xy) > 1 and width > 1:
            draw.line(xy, fill=cls, width=width, joint="curve")
        elif len(xy) > 1:
            draw.line(xy, fill=cls, width=1)
        for x, y in xy:  # round caps and single-point scribbles
            if r > 0:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=cls)
            else:
                draw.point((x, y), fill=cls)
    return np.array(canvas, dtype=np.uint8)


def scribblesup_label(path, size: Optional[Sequence[int]] = None, width: int = 3,
                      context: str = "background") -> np.ndarray:
    """Read and rasterise one ScribbleSup XML file; ``size`` ``(H, W)`` checked against the file's."""
    file_size, strokes = read_scribblesup_xml(path)
    if size is not None and file_size is not None and tuple(file_size) != tuple(size):
        raise VocDataError(f"{os.fspath(path)}: <size> is {file_size[1]}x{file_size[0]} but the image is "
                           f"{size[1]}x{size[0]} (W x H)")
    size = size if size is not None else file_size
    if size is None:
        raise VocDataError(f"{os.fspath(path)} has no <size>; pass the image size")
    return rasterize_scribbles(strokes, size, width, context, os.fspath(path))


def read_point_json(path) -> Dict[str, List[dict]]:
    """Parse a What's-the-point JSON: ``{NAME: [click, ...]}`` with background lists first."""
    source = os.fspath(path)
    try:
        with open(source) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise VocDataError(f"missing point file {source}") from None
    except json.JSONDecodeError as exc:
        raise VocDataError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise VocDataError(f"{source} must hold a JSON object {{image name: clicks}}")
    out = {}
    for name, clicks in data.items():
        if isinstance(clicks, dict):
            keys = sorted(clicks, key=lambda k: not k.lower().startswith("bg"))
            merged = []
            for k in keys:
                merged.extend(clicks[k] or [])
            clicks = merged
        if not isinstance(clicks, list):
            raise VocDataError(f"{source}: the clicks of {name!r} must be a list")
        for c in clicks:
            if not isinstance(c, dict) or not {"cls", "x", "y"} <= set(c):
                raise VocDataError(f"{source}: a click of {name!r} is not an object with cls, x, y: {c!r}")
        out[name] = clicks
    return out


def rasterize_points(clicks: Sequence[dict], size: Sequence[int], radius: int = 1, max_rank: Optional[int] = None,
                     num_classes: int = len(VOC_CLASSES), source: str = "points") -> np.ndarray:
    """Draw clicks ``{"cls", "x", "y"[, "rank"]}`` as disks into an ``(H, W)`` uint8 map (255 elsewhere).

    Background clicks (class 0) are drawn first, objects on top. ``max_rank`` keeps clicks whose
    ``rank`` is at most that (clicks without a rank are kept).
    """
    if not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius!r}")
    h, w = int(size[0]), int(size[1])
    label = np.full((h, w), IGNORE_INDEX, dtype=np.uint8)
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
               if dy * dy + dx * dx <= radius * radius]
    order = sorted(range(len(clicks)), key=lambda i: int(clicks[i]["cls"]) != 0)
    for i in order:
        c = clicks[i]
        if max_rank is not None and c.get("rank") is not None and int(c["rank"]) > max_rank:
            continue
        cls = int(c["cls"])
        if not 0 <= cls < num_classes:
            raise VocDataError(f"{source}: click class {cls} outside 0..{num_classes - 1}")
        cx, cy = int(round(float(c["x"]))), int(round(float(c["y"])))
        for dy, dx in offsets:
            y, x = cy + dy, cx + dx
            if 0 <= y < h and 0 <= x < w:
                label[y, x] = cls
    return label


def convert_sparse_labels(images_dir, out_dir, *, scribble_xml_dir=None, point_json=None, names=None,
                          width: int = 3, radius: int = 1, max_rank: Optional[int] = None) -> int:
    """Rasterise official files into ``out_dir/NAME.png`` ('L', 255 = unlabeled) for :class:`VocSegmentation`.

    Exactly one of ``scribble_xml_dir`` (``NAME.xml`` files) or ``point_json`` is given; image
    sizes come from ``images_dir/NAME.jpg``. Returns the number of files written.
    """
    if (scribble_xml_dir is None) == (point_json is None):
        raise ValueError("give exactly one of scribble_xml_dir or point_json")
    os.makedirs(out_dir, exist_ok=True)
    points = read_point_json(point_json) if point_json is not None else None
    if names is None:
        if points is not None:
            names = sorted(points)
        else:
            names = sorted(f[:-4] for f in os.listdir(scribble_xml_dir) if f.endswith(".xml"))
    count = 0
    for name in names:
        image_path = os.path.join(images_dir, f"{name}.jpg")
        try:
            with Image.open(image_path) as im:
                size = (im.height, im.width)
        except FileNotFoundError:
            raise VocDataError(f"missing image file {image_path}") from None
        if points is not None:
            if name not in points:
                raise VocDataError(f"{os.fspath(point_json)} has no clicks for {name}")
            label = rasterize_points(points[name], size, radius, max_rank, source=f"{os.fspath(point_json)}[{name}]")
        else:
            label = scribblesup_label(os.path.join(scribble_xml_dir, f"{name}.xml"), size, width)
        Image.fromarray(label, mode="L").save(os.path.join(out_dir, f"{name}.png"))
        count += 1
    return count
