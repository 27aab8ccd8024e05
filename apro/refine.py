"""Dense mask of one object from sparse labels of one image, with no training data.

A per-image prediction is fitted by Adam under the same losses the networks are trained with
(SPEC §4-5): box supervision uses the projection loss plus the chosen method's pairwise term,
points/scribbles use partial cross-entropy plus the chosen method's term on unlabeled pixels
(two classes, background = 0, object = 1). What the paper calls the unary term ``phi`` is here
the fitted prediction itself, so the masks always come from fitting a prediction to the GP/LP
pseudo labels.

The prediction (``RefineSettings.model``):

- ``"features"`` (default): a linear head (:class:`apro.frozen_features.LinearHead`) over
  frozen EfficientNet-Lite0 ImageNet features and the colour, so the unary already follows
  the image as a trained network's does. Boxes add one known label: pixels of the fitted
  crop outside the box are background. Points/scribbles add quadratic coordinate channels
  (a smooth spatial prior), a class-balanced partial CE (each class's labelled pixels weigh
  the same in total), GP with ``zeta_g = 0.1`` (0.01 is almost the identity at the
  normalised image's scale) and keep only the mask's connected parts that hold an object label.
- ``"logits"``: free per-pixel logits (the previous default, no image prior).
- ``"cnn"``: a tiny dilated CNN over RGB + coordinates fitted from scratch.

The working grid is coarse (``size``); the probability is upsampled bilinearly and then
``final_lp`` LP steps at full resolution (paper Eq. 5, the image as guide) move its edges onto
the image's. Measured on GrabCut-50 in ``docs/refine.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._color import imagenet_normalize
from ._validation import check_count, check_float_tensor, check_positive
from .tree import minimum_spanning_tree

IGNORE_INDEX = 255

# method name as the user types it -> name in apro.losses.BOX_MASK_LOSSES ("box": no fitting)
BOX_METHODS = {
    "apro": "apro",
    "gp-lp-p": "apro",
    "gp": "gp",
    "lp": "lp",
    "gp-lp-c": "gp-lp-c",
    "lp-gp-c": "lp-gp-c",
    "pairwise": "pairwise",
    "treefilter": "treefilter",
    "treefilter-local": "treefilter-local",
    "crf": "crf",
    "projection": "projection",
    "box": None,
}
# method name -> name in apro.losses.SPARSE_LOSSES
SPARSE_METHODS = {
    "apro": "apro",
    "gp-lp-p": "apro",
    "gp": "gp",
    "lp": "lp",
    "gp-lp-c": "gp-lp-c",
    "lp-gp-c": "lp-gp-c",
    "treefilter": "treeenergy",
    "treeenergy": "treeenergy",
    "pce": "pce",
}
MODELS = ("features", "logits", "cnn")
# Adam learning rate of each model when RefineSettings.lr is None
DEFAULT_LR = {"features": 0.05, "logits": 0.1, "cnn": 0.01}
# GP first-stage zeta of the features head for points/scribbles (RefineSettings.zeta_g None)
FEATURE_SPARSE_ZETA_G = 0.1


@dataclass(frozen=True)
class RefineSettings:
    """How the per-image prediction is fitted.

    steps: Adam steps. size: longer side of the working grid in pixels. lr: Adam learning
    rate (None: the model's default, :data:`DEFAULT_LR`). model: ``"features"`` (linear head
    over frozen EfficientNet-Lite0 features), ``"logits"`` (free per-pixel logits) or ``"cnn"``
    (tiny dilated CNN on RGB + coordinates). margin, margin_pixels: for boxes, context kept
    around the box on each side, ``margin * box size + margin_pixels`` (the crop, not the whole
    image, is fitted). seed: torch seed of the CNN's initial weights. feature_size: longer
    side the image (or box crop) is resized to before the frozen network sees it.
    coordinates: weight of the quadratic coordinate channels of the features head for
    points/scribbles (0: none). balance: features head, points/scribbles: partial CE weighs a
    class-c pixel by ``n_c ** -balance`` (``n_c`` labelled pixels of class c; 1: each class
    weighs the same in total, 0: the plain mean). zeta_g: GP's first-stage zeta for
    points/scribbles (None: 0.1 with the features head, the registered loss's 0.01
    otherwise). final_lp: LP steps at full resolution on the upsampled probability (0: plain
    bilinear upsampling). connected: points/scribbles only: keep the mask's 4-connected parts
    that hold an object label.
    device: where the prediction is fitted (``"cpu"``, ``"cuda"``, ...).
    """

    steps: int = 60
    size: int = 96
    lr: Optional[float] = None
    model: str = "features"
    margin: float = 0.15
    margin_pixels: int = 8
    seed: int = 0
    feature_size: int = 640
    coordinates: float = 6.0
    balance: float = 1.0
    zeta_g: Optional[float] = None
    final_lp: int = 10
    connected: bool = True
    device: str = "cpu"

    def checked(self) -> "RefineSettings":
        check_count(self.steps, "steps", 1)
        check_count(self.size, "size", 8)
        if self.lr is not None:
            check_positive(self.lr, "lr")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if not (0 <= float(self.margin) <= 10):
            raise ValueError(f"margin must be in [0, 10], got {self.margin!r}")
        check_count(self.margin_pixels, "margin_pixels", 0)
        check_count(self.feature_size, "feature_size", 32)
        if not (0 <= float(self.coordinates) < float("inf")):
            raise ValueError(f"coordinates must be a finite number >= 0, got {self.coordinates!r}")
        if not (0 <= float(self.balance) <= 1):
            raise ValueError(f"balance must be in [0, 1], got {self.balance!r}")
        if self.zeta_g is not None:
            check_positive(self.zeta_g, "zeta_g")
        check_count(self.final_lp, "final_lp", 0)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {self.device!r}") from None
        return self

    @property
    def learning_rate(self) -> float:
        """``lr``, or the model's default when ``lr`` is None."""
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.model]


class _TinyNet(nn.Module):
    """Per-image predictor: RGB + (x, y) -> K logits through dilated 3x3 convolutions."""

    def __init__(self, out_channels: int, width: int = 16):
        super().__init__()
        layers, c = [], 5
        for d in (1, 2, 4, 1):
            layers += [nn.Conv2d(c, width, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
            c = width
        layers.append(nn.Conv2d(c, out_channels, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _network_input(image: torch.Tensor) -> torch.Tensor:
    b, _, h, w = image.shape
    ys = torch.linspace(-1, 1, h, dtype=image.dtype, device=image.device).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1, 1, w, dtype=image.dtype, device=image.device).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([imagenet_normalize(image), xs, ys], 1)


def _working_size(h: int, w: int, size: int) -> tuple:
    scale = min(1.0, size / max(h, w))
    return max(2, round(h * scale)), max(2, round(w * scale))


def _resize(image: torch.Tensor, hw: tuple) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(hw):
        return image
    return F.interpolate(image, size=hw, mode="bilinear", align_corners=False, antialias=True)


def _predictor(settings: RefineSettings, small: torch.Tensor, out_channels: int, init_logits: Optional[torch.Tensor],
               features: Optional[torch.Tensor]):
    """``(parameters, predict)`` of the chosen model; ``predict()`` -> ``(1, K, h, w)`` logits.

    ``small``: ``(1, 3, h, w)`` working-grid image; ``features``: ``(1, D, h, w)`` input of the
    features head (required for ``model="features"``)."""
    if settings.model == "cnn":
        net = _TinyNet(out_channels).to(small.device)
        x = _network_input(small)
        return list(net.parameters()), lambda: net(x)
    if settings.model == "features":
        head = _frozen().LinearHead(features.shape[1], out_channels).to(small.device)
        return list(head.parameters()), lambda: head(features)
    logits = init_logits.clone() if init_logits is not None else small.new_zeros(1, out_channels, *small.shape[-2:])
    logits.requires_grad_(True)
    return [logits], lambda: logits


def _fit(params, predict, loss_fn, settings: RefineSettings, progress: bool, desc: str) -> torch.Tensor:
    """Adam on ``params``; returns the final logits ``predict()`` detached."""
    opt = torch.optim.Adam(params, lr=settings.learning_rate)
    for _ in tqdm(range(settings.steps), desc=desc, disable=not progress, leave=False, unit="step"):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(predict())
        loss.backward()
        opt.step()
    with torch.no_grad():
        return predict().detach()


def _seeded(fn):
    """Run ``fn()`` under ``torch.manual_seed(seed)`` without touching the caller's RNG state."""
    def run(seed, *args):
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            return fn(*args)
        finally:
            torch.random.set_rng_state(state)
    return run


def _frozen():
    from . import frozen_features

    return frozen_features


def _full_resolution(prob: torch.Tensor, image: torch.Tensor, settings: RefineSettings,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Working-grid probability ``(1, C, h, w)`` -> the image's ``(1, C, H, W)``: bilinear, then
    ``settings.final_lp`` LP steps guided by the full-resolution ``image`` ``(1, 3, H, W)``
    (ImageNet-normalised, 5x5, ``zeta_s = 0.15``; kept inside ``mask`` when given)."""
    from .propagation import local_propagation

    prob = F.interpolate(prob, size=image.shape[-2:], mode="bilinear", align_corners=False)
    if mask is not None:
        prob = prob * mask
    if settings.final_lp > 0:
        prob = local_propagation(prob, imagenet_normalize(image.to(prob.device)), 5, 0.15, settings.final_lp, mask=mask)
    return prob


def _check_image(image: torch.Tensor) -> torch.Tensor:
    check_float_tensor(image, "image", 3, "(3, H, W)")
    if image.shape[0] != 3:
        raise ValueError(f"image must be RGB with shape (3, H, W), got {tuple(image.shape)}")
    if float(image.min()) < 0 or float(image.max()) > 1:
        raise ValueError("image must hold RGB values in [0, 1]; divide uint8 images by 255")
    return image.detach().to("cpu", torch.float32)


def _device(settings: RefineSettings) -> torch.device:
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {settings.device!r} was asked for but torch sees no CUDA device; use device='cpu'")
    return device


def check_box(box: Sequence[float], height: int, width: int) -> tuple:
    """``(x0, y0, x1, y1)`` in pixels (x1/y1 exclusive), clipped to the image; raises if empty."""
    if len(box) != 4:
        raise ValueError(f"box must be (x0, y0, x1, y1), got {len(box)} numbers")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(map(lambda v: v == v and abs(v) != float("inf"), (x0, y0, x1, y1))):
        raise ValueError(f"box must hold finite numbers, got {tuple(box)}")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {tuple(box)} is empty: need x0 < x1 and y0 < y1")
    cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
    if cx1 - cx0 < 1 or cy1 - cy0 < 1:
        raise ValueError(
            f"box {tuple(box)} lies outside the {width}x{height} image (x in [0, {width}], y in [0, {height}])"
        )
    return cx0, cy0, cx1, cy1


def box_mask(box: Sequence[float], height: int, width: int) -> torch.Tensor:
    """Filled box ``(H, W)`` float {0, 1}: pixels whose centre lies inside ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    inside_y = (ys >= y0) & (ys <= y1)
    inside_x = (xs >= x0) & (xs <= x1)
    m = (inside_y[:, None] & inside_x[None, :]).float()
    if m.sum() == 0:  # a box thinner than a pixel still covers the pixel holding its centre
        cy = min(height - 1, max(0, int((y0 + y1) / 2)))
        cx = min(width - 1, max(0, int((x0 + x1) / 2)))
        m[cy, cx] = 1.0
    return m


def _losses():
    try:
        from . import losses
    except ImportError as err:  # pragma: no cover - only while apro.losses is missing
        raise ImportError(f"apro.refine needs apro.losses ({err})") from err
    return losses


def _tree_for(losses, loss_name: str, image: torch.Tensor):
    """The image's spanning tree, built once for all steps (losses without a tree ignore it)."""
    if loss_name in ("projection", "pairwise", "crf", "pce"):
        return None
    return minimum_spanning_tree(losses.tree_guide(loss_name, image))


def refine_box(
    image: torch.Tensor,
    box: Sequence[float],
    method: str = "apro",
    settings: Optional[RefineSettings] = None,
    progress: bool = False,
    loss=None,
) -> torch.Tensor:
    """Object probability ``(H, W)`` inside ``box``, fitted under a box-supervised mask loss.

    Args:
        image: ``(3, H, W)`` RGB in [0, 1].
        box: ``(x0, y0, x1, y1)`` in pixels, x1/y1 exclusive.
        method: a key of :data:`BOX_METHODS` (``"apro"`` = GP-LP-P, SPEC §4; ``"box"`` returns
            the filled box without fitting).
        settings: :class:`RefineSettings` (defaults if None).
        progress: show a tqdm bar over the Adam steps.
        loss: optional ``loss(logits, box_mask, image, tree) -> scalar`` replacing the method's
            registered loss (e.g. APro with other zetas); ``method`` still picks the tree guide.

    Returns:
        ``(H, W)`` float32 in [0, 1], exactly 0 outside the box (threshold at 0.5 for a mask).
    """
    img = _check_image(image)
    settings = (settings or RefineSettings()).checked()
    if method not in BOX_METHODS:
        raise ValueError(f"unknown box method {method!r}; choose one of {', '.join(BOX_METHODS)}")
    _, h, w = img.shape
    x0, y0, x1, y1 = check_box(box, h, w)
    full_box = box_mask((x0, y0, x1, y1), h, w)
    loss_name = BOX_METHODS[method]
    if loss_name is None:
        return full_box
    device = _device(settings)

    # fit on a crop around the box with some context: background just outside the box is
    # what the affinity terms (and the features head's known-background term) learn from
    mx = settings.margin * (x1 - x0) + settings.margin_pixels
    my = settings.margin * (y1 - y0) + settings.margin_pixels
    cx0, cy0 = int(max(0, x0 - mx)), int(max(0, y0 - my))
    cx1, cy1 = int(min(w, -(-(x1 + mx) // 1))), int(min(h, -(-(y1 + my) // 1)))
    crop = img[None, :, cy0:cy1, cx0:cx1]
    hw = _working_size(cy1 - cy0, cx1 - cx0, settings.size)
    small = _resize(crop, hw).clamp(0, 1)
    sy, sx = hw[0] / (cy1 - cy0), hw[1] / (cx1 - cx0)
    small_box = box_mask(((x0 - cx0) * sx, (y0 - cy0) * sy, (x1 - cx0) * sx, (y1 - cy0) * sy), *hw)[None, None]

    losses = _losses()
    tree = _tree_for(losses, loss_name, small)
    small, small_box = small.to(device), small_box.to(device)
    outside = 1 - small_box
    known_background = settings.model == "features" and bool(outside.any())

    def loss_fn(logits):
        value = (loss(logits, small_box, small, tree) if loss is not None
                 else losses.box_mask_loss(loss_name, logits, small_box, small, tree=tree))
        if known_background:  # crop pixels outside the box are background: BCE towards 0
            value = value + (F.softplus(logits) * outside).sum() / outside.sum()
        return value

    features = None
    if settings.model == "features":
        features = torch.cat([_frozen().image_features(crop.to(device), hw, settings.feature_size),
                              imagenet_normalize(small)], 1)
    init = (small_box * 2 - 1) if settings.model == "logits" else None
    fit = _seeded(lambda: _fit(*_predictor(settings, small, 1, init, features), loss_fn, settings, progress,
                               f"refine ({method}, box)"))
    logits = fit(settings.seed)
    crop_box = full_box[None, None, cy0:cy1, cx0:cx1].to(device)
    prob = _full_resolution(torch.sigmoid(logits), crop.to(device), settings, mask=crop_box)[0, 0]
    out = torch.zeros(h, w)
    out[cy0:cy1, cx0:cx1] = prob.float().cpu()
    return out * full_box


def _downsample_labels(labels: torch.Tensor, hw: tuple) -> torch.Tensor:
    """Sparse labels ``(H, W)`` -> ``(h, w)``: a cell takes a class if any of its pixels has it
    (thin scribbles survive the reduction); cells with both classes become unlabeled."""
    if tuple(labels.shape) == tuple(hw):
        return labels.clone()
    present = []
    for c in (0, 1):
        onehot = (labels == c).float()[None, None]
        present.append(F.adaptive_max_pool2d(onehot, hw)[0, 0] > 0)
    out = torch.full(hw, IGNORE_INDEX, dtype=torch.int64)
    out[present[0] & ~present[1]] = 0
    out[present[1] & ~present[0]] = 1
    return out


def check_sparse_labels(labels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Require ``(H, W)`` int labels with values in {0 (background), 1 (object), 255 (unlabeled)}
    and at least one pixel of each class."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError("labels must be an integer torch.Tensor (H, W) with 0 = background, 1 = object, 255 = unlabeled")
    if labels.dim() != 2 or tuple(labels.shape) != (height, width):
        raise ValueError(f"labels must have shape ({height}, {width}) like the image, got {tuple(labels.shape)}")
    labels = labels.to(torch.int64)
    bad = ~((labels == 0) | (labels == 1) | (labels == IGNORE_INDEX))
    if bool(bad.any()):
        raise ValueError(f"labels may hold only 0, 1 and {IGNORE_INDEX}, found {sorted(set(labels[bad].tolist()))[:5]}")
    if not bool((labels == 1).any()) or not bool((labels == 0).any()):
        raise ValueError("labels need at least one object (1) and one background (0) pixel")
    return labels


def refine_sparse(
    image: torch.Tensor,
    labels: torch.Tensor,
    method: str = "apro",
    settings: Optional[RefineSettings] = None,
    progress: bool = False,
    loss=None,
) -> torch.Tensor:
    """Object probability ``(H, W)`` from points or scribbles (SPEC §4, sparse labels).

    Args:
        image: ``(3, H, W)`` RGB in [0, 1].
        labels: ``(H, W)`` int, 0 = background, 1 = object, 255 = unlabeled.
        method: a key of :data:`SPARSE_METHODS` (``"apro"`` = partial CE + GP-LP-P term).
        settings: :class:`RefineSettings` (``margin`` unused: the whole image is fitted).
            With ``connected`` (default) mask parts holding no object label are dropped.
        progress: tqdm bar over the Adam steps.
        loss: optional ``loss(logits, labels, image, tree) -> scalar`` replacing the method's
            registered loss; ``method`` still picks the tree guide.

    Returns:
        ``(H, W)`` float32 softmax probability of the object class.
    """
    img = _check_image(image)
    settings = (settings or RefineSettings()).checked()
    if method not in SPARSE_METHODS:
        raise ValueError(f"unknown sparse-label method {method!r}; choose one of {', '.join(SPARSE_METHODS)}")
    _, h, w = img.shape
    labels = check_sparse_labels(labels, h, w)
    losses = _losses()
    loss_name = SPARSE_METHODS[method]
    if loss_name not in losses.SPARSE_LOSSES:
        raise ValueError(
            f"method {method!r} has no sparse-label loss; choose one of "
            f"{', '.join(k for k, v in SPARSE_METHODS.items() if v in losses.SPARSE_LOSSES)}"
        )
    device = _device(settings)
    hw = _working_size(h, w, settings.size)
    small = _resize(img[None], hw).clamp(0, 1)
    small_labels = _downsample_labels(labels, hw)[None]
    tree = _tree_for(losses, loss_name, small)
    small, small_labels = small.to(device), small_labels.to(device)
    zeta_g = settings.zeta_g if settings.zeta_g is not None else (
        FEATURE_SPARSE_ZETA_G if settings.model == "features" else None)
    apro_variant = {"apro": "gp-lp-p", "gp": "gp", "lp": "lp", "gp-lp-c": "gp-lp-c", "lp-gp-c": "lp-gp-c"}.get(loss_name)

    balance = float(settings.balance) if settings.model == "features" else 0.0

    def loss_fn(logits):
        if loss is not None:
            return loss(logits, small_labels, small, tree)
        if apro_variant is not None and zeta_g is not None:
            return losses.partial_cross_entropy(logits, small_labels, balance=balance) + losses.apro_sparse_loss(
                logits, small_labels, small, variant=apro_variant, zeta_g=zeta_g, tree=tree)
        return losses.SPARSE_LOSSES[loss_name](logits, small_labels, small, tree=tree)

    features = None
    if settings.model == "features":
        frozen = _frozen()
        parts = [frozen.image_features(img[None].to(device), hw, settings.feature_size), imagenet_normalize(small)]
        if settings.coordinates > 0:
            parts.append(settings.coordinates * frozen.quadratic_coordinates(hw, small))
        features = torch.cat(parts, 1)
    fit = _seeded(lambda: _fit(*_predictor(settings, small, 2, None, features), loss_fn, settings, progress,
                               f"refine ({method}, labels)"))
    logits = fit(settings.seed)
    prob = _full_resolution(torch.softmax(logits, 1)[:, 1:], img[None].to(device), settings)[0, 0].float().cpu()
    if settings.connected:
        prob = _keep_labelled_parts(prob, labels)
    return prob


def _keep_labelled_parts(prob: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``prob`` ``(H, W)`` with every 4-connected part of ``prob >= 0.5`` that holds no object
    label (1) set to 0 (such parts are far from every object click or stroke)."""
    import numpy as np
    from scipy import ndimage

    mask = (prob >= 0.5).numpy()
    parts, _ = ndimage.label(mask)
    keep = np.unique(parts[mask & (labels == 1).numpy()])
    drop = ~np.isin(parts, keep[keep > 0]) & mask
    return prob.masked_fill(torch.from_numpy(drop), 0.0)


class BoxRefiner(nn.Module):
    """Module form of :func:`refine_box` holding ``method`` and ``settings``.

    ``forward(image (3, H, W), box) -> (H, W)`` object probability.
    """

    def __init__(self, method: str = "apro", settings: Optional[RefineSettings] = None):
        super().__init__()
        if method not in BOX_METHODS:
            raise ValueError(f"unknown box method {method!r}; choose one of {', '.join(BOX_METHODS)}")
        self.method = method
        self.settings = (settings or RefineSettings()).checked()

    def forward(self, image, box):
        return refine_box(image, box, self.method, self.settings)


class SparseRefiner(nn.Module):
    """Module form of :func:`refine_sparse`. ``forward(image (3, H, W), labels (H, W)) -> (H, W)``."""

    def __init__(self, method: str = "apro", settings: Optional[RefineSettings] = None):
        super().__init__()
        if method not in SPARSE_METHODS:
            raise ValueError(f"unknown sparse-label method {method!r}; choose one of {', '.join(SPARSE_METHODS)}")
        self.method = method
        self.settings = (settings or RefineSettings()).checked()

    def forward(self, image, labels):
        return refine_sparse(image, labels, self.method, self.settings)


def mask_iou(pred: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None) -> float:
    """IoU of two ``(H, W)`` boolean masks over ``valid`` pixels (all if None); 1.0 if both empty."""
    pred, target = pred.bool(), target.bool()
    if valid is not None:
        pred, target = pred & valid.bool(), target & valid.bool()
    union = int((pred | target).sum())
    return 1.0 if union == 0 else int((pred & target).sum()) / union
