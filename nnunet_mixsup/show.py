"""``nnunet-mixsup show``: look at the weak labels on their images, raw or as nnU-Net preprocessed them.

One PNG per case (``DIR/<case>.png``; ``DIR/<case>_<configuration>.png`` for ``--preprocessed``):
for a 3D image one row per box (up to ``max_boxes``) with three orthogonal slices through the box
centre; cases without boxes get one row through the centre of their labelled voxels (or of the
image). A 2D image is one panel with all its boxes. Every panel shows the image (grey, 0.5-99.5
percentile window), the label map the trainer sees – the mask of a mask case, the derived map of a
weak case (``prepare``'s ignore label, hatched white, where nothing is known; background where
nothing can be) – tinted in class colours, and the outline of every box that the slice cuts, in
its class colour. ``sheet`` writes one contact sheet instead (``DIR/contact_sheet[_CONFIG].png``):
one panel per case, the first-axis slice through its first box (or labelled centre).

Spaces:

- raw: the image in its voxel index grid, numpy axis order (z, y, x) – the ITK index order
  reversed, no reorientation; boxes are the manifest's ``[min, max)`` reversed;
- preprocessed (``configuration``): the arrays of ``nnUNet_preprocessed/DatasetXXX/<data_identifier>``
  as the trainer loads them (transposed, cropped, resampled; outside the crop the label is -1 and
  untinted), boxes mapped by :func:`nnunet_mixsup.geometry.box_to_preprocessed` – what the loader
  rasterises. Boxes come from the manifest next to the preprocessed data (the trainers' copy) when
  it exists, otherwise from the raw dataset.

Panels are rasters at an integer zoom (every voxel a square block of pixels, so the outline of a box
``[lo, hi)`` is exactly the outermost ring of pixels of the blocks ``lo .. hi - 1``), shown with the
physical aspect ratio of the voxel spacing. Axes whose rows are the first array axis are drawn with
index 0 at the bottom. Only matplotlib's object interface is used (no pyplot, no global backend).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_mixsup.geometry import box_to_preprocessed
from nnunet_mixsup.importers import dataset_folder
from nnunet_mixsup.manifest import MANIFEST_NAME, CaseSupervision, Manifest, RawDataset, load_manifest
from nnunet_mixsup.prepare import derived_label_array, load_and_validate, preprocessed_dataset_folder

#: class colours (RGB), by position of the class among dataset.json's foreground labels
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))
IGNORE_RGB = (255, 255, 255)
FILL_ALPHA = 0.35
#: ignore (unknown) voxels: diagonal white hatching with this period in pixels and opacity
HATCH_PERIOD = 6
IGNORE_ALPHA = 0.5
#: panels are zoomed so that their longer side has about this many pixels (zoom 1 to 8)
TARGET_PIXELS = 240


@dataclass
class CaseView:
    """One case ready to draw: arrays in one axis order (a 2D image as (1, y, x)) and its boxes in that order."""

    case_id: str
    sup: CaseSupervision
    image: np.ndarray
    labels: np.ndarray  # -1: outside nnU-Net's crop (preprocessed only)
    boxes: list[tuple[int, np.ndarray, np.ndarray]]  # (label, lo, hi), hi exclusive
    spacing: tuple[float, float, float]
    axis_names: tuple[str, str, str]
    is_2d: bool
    space: str


@dataclass
class Panel:
    """One rendered slice: ``rgb`` (H, W, 3) is the slice zoomed by ``zoom``; ``rects`` in slice voxel indices."""

    rgb: np.ndarray
    axis: int  # the array axis the slice is taken across
    index: int
    rows_axis: int
    cols_axis: int
    zoom: int
    rects: list[tuple[int, int, int, int, int]]  # (label, r0, r1, c0, c1), r1 / c1 exclusive
    title: str


def class_colour(label: int, foreground: Sequence[int]) -> tuple[int, int, int]:
    """RGB colour of a foreground class (by its position among ``foreground``)."""
    fg = list(foreground)
    return PALETTE[(fg.index(label) if label in fg else label) % len(PALETTE)]


def intensity_window(image: np.ndarray) -> tuple[float, float]:
    """0.5 and 99.5 percentiles of (a subsample of) the image's finite values."""
    flat = image.ravel()
    if flat.size > 1_000_000:
        flat = flat[:: flat.size // 1_000_000]
    flat = flat[np.isfinite(flat)]
    if not flat.size:
        return 0.0, 1.0
    lo, hi = np.percentile(flat, [0.5, 99.5])
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def ring_mask(shape: tuple[int, int], r0: int, r1: int, c0: int, c1: int, thickness: int) -> np.ndarray:
    """Pixels of the outermost ``thickness`` rows / columns of the rectangle ``[r0, r1) x [c0, c1)``."""
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    inner = np.zeros(shape, bool)
    inner[r0 + thickness:r1 - thickness, c0 + thickness:c1 - thickness] = True
    return m & ~inner


def outline_thickness(zoom: int) -> int:
    """Outline width in pixels at a zoom: half a voxel, 1 to 3 pixels."""
    return min(3, max(1, zoom // 2))


def render_slice(image2d: np.ndarray, labels2d: np.ndarray, rects: Sequence[tuple[int, int, int, int, int]],
                 foreground: Sequence[int], ignore: int | None, window: tuple[float, float],
                 zoom: int) -> np.ndarray:
    """RGB raster (H * zoom, W * zoom, 3) of one slice: grey image, tinted labels, box outlines on top.

    Labels: foreground classes tinted in their colour, ``ignore`` hatched white, 0 and -1 untinted. Each
    rectangle ``(label, r0, r1, c0, c1)`` in voxel indices is outlined by the outermost
    :func:`outline_thickness` pixels of its zoomed area, in its class colour (later ones on top).
    """
    lo, hi = window
    grey = np.clip((np.nan_to_num(image2d.astype(np.float64)) - lo) / (hi - lo), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for value in np.unique(labels2d):
        if int(value) in foreground:
            m = labels2d == value
            rgb[m] = (1 - FILL_ALPHA) * rgb[m] + FILL_ALPHA * np.asarray(class_colour(int(value), foreground), float)
    rgb = np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1)
    if ignore is not None and np.any(labels2d == ignore):  # hatched: unknown, whatever the intensity
        m = np.repeat(np.repeat(labels2d == ignore, zoom, axis=0), zoom, axis=1)
        r, c = np.indices(m.shape)
        m &= (r + c) % HATCH_PERIOD < max(1, HATCH_PERIOD // 3)
        rgb[m] = (1 - IGNORE_ALPHA) * rgb[m] + IGNORE_ALPHA * np.asarray(IGNORE_RGB, float)
    out = np.round(rgb).astype(np.uint8)
    t = outline_thickness(zoom)
    for label, r0, r1, c0, c1 in rects:
        out[ring_mask(out.shape[:2], r0 * zoom, r1 * zoom, c0 * zoom, c1 * zoom, t)] = class_colour(label, foreground)
    return out


def choose_zoom(shape: Sequence[int]) -> int:
    """Integer zoom so that the longest axis of the case is about :data:`TARGET_PIXELS` pixels (1 to 8)."""
    return int(min(8, max(1, math.ceil(TARGET_PIXELS / max(1, max(shape))))))


def slice_panel(view: CaseView, axis: int, index: int, foreground: Sequence[int], ignore: int | None,
                window: tuple[float, float], zoom: int) -> Panel:
    """The slice ``index`` across array ``axis`` with the outlines of every box it cuts."""
    rows_axis, cols_axis = [a for a in range(3) if a != axis]
    rects = [(lab, int(lo[rows_axis]), int(hi[rows_axis]), int(lo[cols_axis]), int(hi[cols_axis]))
             for lab, lo, hi in view.boxes if lo[axis] <= index < hi[axis]]
    rgb = render_slice(np.take(view.image, index, axis=axis), np.take(view.labels, index, axis=axis), rects,
                       foreground, ignore, window, zoom)
    title = "" if view.is_2d else f"{view.axis_names[axis]} = {index}"
    return Panel(rgb, axis, index, rows_axis, cols_axis, zoom, rects, title)


def focus_point(view: CaseView, box: tuple[int, np.ndarray, np.ndarray] | None,
                foreground: Sequence[int]) -> list[int]:
    """Centre voxel of a box, else per axis the slice with the most labelled voxels, else the image centre."""
    if box is not None:
        return [int((a + b - 1) // 2) for a, b in zip(box[1], box[2])]
    fg = np.isin(view.labels, list(foreground))
    if fg.any():
        return [int(np.argmax(fg.sum(axis=tuple(b for b in range(fg.ndim) if b != a)))) for a in range(fg.ndim)]
    return [s // 2 for s in view.image.shape]


def case_panels(view: CaseView, foreground: Sequence[int], ignore: int | None,
                max_boxes: int = 10) -> list[list[Panel]]:
    """Rows of panels: per box (up to ``max_boxes``) three orthogonal slices through its centre; 2D: one panel."""
    window = intensity_window(view.image)
    zoom = choose_zoom(view.image.shape)
    if view.is_2d:
        return [[slice_panel(view, 0, 0, foreground, ignore, window, zoom)]]
    rows = []
    for box in (view.boxes[:max_boxes] or [None]):
        centre = focus_point(view, box, foreground)
        rows.append([slice_panel(view, a, centre[a], foreground, ignore, window, zoom) for a in range(3)])
    return rows


# ----------------------------------------------------------------------------------------------------------
# loading cases
# ----------------------------------------------------------------------------------------------------------
def raw_view(ds: RawDataset, sup: CaseSupervision, ignore: int, channel: int = 0) -> CaseView:
    """A case in raw index space: the mask of a mask case, the derived label map of a weak case."""
    img = sitk.ReadImage(str(ds.image_files(sup.case_id)[channel]))
    image = sitk.GetArrayFromImage(img)
    if sup.type == "mask":
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(ds.label_file(sup.case_id)))).astype(np.int64)
    else:
        labels = derived_label_array(sup, image.shape, ignore).astype(np.int64)
    spacing = tuple(float(s) for s in img.GetSpacing()[::-1])
    boxes = []
    for b in sup.boxes:
        lo, hi = b.numpy_order()
        boxes.append((b.label, np.asarray(lo), np.asarray(hi)))
    is_2d = image.ndim == 2
    if is_2d:
        image, labels, spacing = image[None], labels[None], (1.0, *spacing)
        boxes = [(lab, np.array([0, *lo]), np.array([1, *hi])) for lab, lo, hi in boxes]
    return CaseView(sup.case_id, sup, image, labels, boxes, spacing, ("z", "y", "x"), is_2d, "raw")


@dataclass
class PreprocessedSource:
    """Where and how one configuration's preprocessed cases are read."""

    folder: Path
    transpose_forward: list[int]
    target_spacing: list[float]
    configuration: str

    @classmethod
    def open(cls, dataset: str | int, configuration: str, plans: str = "nnUNetPlans") -> PreprocessedSource:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        pp = preprocessed_dataset_folder(dataset)
        plans_file = pp / f"{plans}.json"
        if not plans_file.is_file():
            raise FileNotFoundError(f"no plans file {plans_file}: run 'nnunet-mixsup plan_and_preprocess' first "
                                    "(or give -p)")
        pm = PlansManager(str(plans_file))
        if configuration not in pm.available_configurations:
            raise ValueError(f"configuration {configuration!r} is not in {plans_file.name} "
                             f"(available: {pm.available_configurations})")
        cm = pm.get_configuration(configuration)
        folder = pp / cm.data_identifier
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: configuration {configuration!r} was not preprocessed")
        return cls(folder, list(pm.transpose_forward), list(cm.spacing), configuration)

    def view(self, sup: CaseSupervision, channel: int = 0) -> CaseView:
        """The case as the trainer loads it, with its boxes mapped by ``box_to_preprocessed``."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        ds = infer_dataset_class(str(self.folder))(str(self.folder), [sup.case_id])
        data, seg, _, props = ds.load_case(sup.case_id)
        image, labels = np.asarray(data[channel]), np.asarray(seg[0]).astype(np.int64)
        boxes = []
        for b in sup.boxes:
            m = box_to_preprocessed(b, props, self.transpose_forward, image.shape)
            if m is not None:
                boxes.append((b.label, m[0], m[1]))
        orig = [float(props["spacing"][i]) for i in self.transpose_forward]
        spacing = [*orig[: 3 - len(self.target_spacing)], *self.target_spacing]
        names = tuple(("z", "y", "x")[i] for i in self.transpose_forward)
        return CaseView(sup.case_id, sup, image, labels, boxes, tuple(spacing), names, image.shape[0] == 1,
                        f"preprocessed {self.configuration}")


# ----------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------
def _describe(sup: CaseSupervision, names: dict[int, str]) -> str:
    if sup.type == "box":
        return f"box ({len(sup.boxes)} box{'es' if len(sup.boxes) != 1 else ''})"
    if sup.type == "tags":
        return "tags: " + (", ".join(names.get(c, str(c)) for c in sup.present) or "no foreground")
    return sup.type


def _draw(ax: Any, panel: Panel, view: CaseView, small: bool = False) -> None:
    sr, sc = view.spacing[panel.rows_axis] / panel.zoom, view.spacing[panel.cols_axis] / panel.zoom
    h, w = panel.rgb.shape[:2]
    bottom_up = panel.rows_axis == 0 and not view.is_2d
    ax.imshow(panel.rgb, interpolation="nearest", origin="lower" if bottom_up else "upper",
              extent=(0, w * sc, 0, h * sr) if bottom_up else (0, w * sc, h * sr, 0))
    ax.set_xticks([])
    ax.set_yticks([])
    if not small:
        ax.set_xlabel(f"{view.axis_names[panel.cols_axis]} →", fontsize=8)
        ax.set_ylabel(f"{view.axis_names[panel.rows_axis]} {'↑' if bottom_up else '↓'}", fontsize=8)
    if panel.title:
        ax.set_title(panel.title, fontsize=8 if small else 9)


def _legend(fig: Any, foreground: Sequence[int], names: dict[int, str], ncol: int) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=np.asarray(class_colour(c, foreground)) / 255, edgecolor="none",
                     label=f"{c} {names.get(c, '')}: label / box outline") for c in foreground]
    handles.append(Patch(facecolor="lightgrey", edgecolor="grey", hatch="///", label="hatched: ignore (unknown)"))
    handles.append(Line2D([], [], color="none", label="untinted: background / outside the crop"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(ncol, len(handles)), fontsize=8, frameon=False)


def save_case_figure(view: CaseView, rows: list[list[Panel]], foreground: Sequence[int], names: dict[int, str],
                     path: Path) -> None:
    """One PNG: the rows of panels of a case, a title and the class legend."""
    from matplotlib.figure import Figure

    ncols = len(rows[0])
    fig = Figure(figsize=(max(3.3 * ncols, 5.5), 3.2 * len(rows) + 0.8), dpi=100, layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            _draw(axes[r][c], panel, view)
    extra = f" – showing {len(rows)} of {len(view.boxes)} boxes" if len(view.boxes) > len(rows) and not view.is_2d \
        else ""
    fig.suptitle(f"{view.case_id} – {_describe(view.sup, names)} – {view.space}{extra}", fontsize=10)
    _legend(fig, foreground, names, ncol=2 if ncols == 1 else 4)
    fig.savefig(path, bbox_inches="tight")  # the legend can be wider than the panels


def save_contact_sheet(views: list[tuple[CaseView, Panel]], foreground: Sequence[int], names: dict[int, str],
                       path: Path, title: str) -> None:
    """One PNG with one panel per case."""
    from matplotlib.figure import Figure

    n = len(views)
    ncols = min(6, max(1, math.ceil(math.sqrt(n))))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(2.6 * ncols, 2.7 * nrows + 0.8), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, ax in enumerate(ax for row in axes for ax in row):
        if k >= n:
            ax.set_axis_off()
            continue
        view, panel = views[k]
        panel.title = f"{view.case_id}\n{_describe(view.sup, names)}"
        _draw(ax, panel, view, small=True)
    fig.suptitle(title, fontsize=11)
    _legend(fig, foreground, names, ncol=2 if ncols <= 3 else 4)
    fig.savefig(path)


# ----------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------
def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("'nnunet-mixsup show' needs matplotlib: pip install matplotlib") from None


def show_dataset(dataset: str | int | os.PathLike, out_dir: str | os.PathLike, cases: Sequence[str] = (),
                 configuration: str | None = None, plans: str = "nnUNetPlans", sheet: bool = False,
                 channel: int = 0, max_boxes: int = 10, show_progress: bool = True) -> list[Path]:
    """Write the PNGs of ``cases`` (all training cases if empty) into ``out_dir``; return their paths.

    ``configuration``: show the preprocessed data of this configuration (plans ``plans``) instead of
    the raw images. ``sheet``: one contact sheet instead of one PNG per case. The raw dataset and its
    manifest must be valid (as ``prepare`` checks them, without reading every voxel).
    """
    _require_matplotlib()
    folder = dataset_folder(dataset)
    ds, manifest, _ = load_and_validate(folder, check_image_data=False)
    names = {v: k for k, v in ds.dataset_json["labels"].items() if v in ds.foreground_labels}
    foreground = list(ds.foreground_labels)
    ignore = ds.ignore_label if ds.ignore_label is not None else (max(foreground, default=0) + 1)
    source = None
    if configuration is not None:
        source = PreprocessedSource.open(folder.name, configuration, plans)
        sidecar = source.folder.parent / MANIFEST_NAME
        if sidecar.is_file():
            manifest = Manifest(version=1, cases={**manifest.cases, **load_manifest(sidecar).cases})
    wanted = list(cases) or sorted(manifest.cases)
    unknown = [c for c in wanted if c not in manifest.cases]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}: not training cases of {folder.name}")
    if not 0 <= channel < ds.num_channels:
        raise ValueError(f"--channel {channel}: the dataset has {ds.num_channels} channel(s)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{configuration}" if configuration else ""
    written: list[Path] = []
    sheet_views: list[tuple[CaseView, Panel]] = []
    for cid in tqdm(wanted, desc="show", unit="case", disable=not show_progress):
        sup = manifest.cases[cid]
        view = source.view(sup, channel) if source is not None else raw_view(ds, sup, ignore, channel)
        if sheet:
            first = view.boxes[0] if view.boxes else None
            centre = focus_point(view, first, foreground)
            panel = slice_panel(view, 0, centre[0], foreground, ignore, intensity_window(view.image),
                                choose_zoom(view.image.shape))
            # keep the panel, not the volumes: a sheet of a large dataset must not hold every image in memory
            sheet_views.append((dataclasses.replace(view, image=np.empty(0), labels=np.empty(0), boxes=[]), panel))
            continue
        path = out / f"{cid}{suffix}.png"
        save_case_figure(view, case_panels(view, foreground, ignore, max_boxes), foreground, names, path)
        written.append(path)
    if sheet:
        path = out / f"contact_sheet{suffix}.png"
        space = f"preprocessed {configuration}" if configuration else "raw"
        save_contact_sheet(sheet_views, foreground, names, path, f"{folder.name} – {space}")
        written.append(path)
    return written


def _cmd_show(args: argparse.Namespace) -> int:
    if args.preprocessed and not args.c:
        raise ValueError("--preprocessed needs -c CONFIGURATION (e.g. -c 3d_fullres)")
    if args.c and not args.preprocessed:
        raise ValueError("-c is only used with --preprocessed")
    if args.max_boxes < 1:
        raise ValueError(f"--max-boxes must be at least 1, got {args.max_boxes}")
    paths = show_dataset(args.d, args.o, args.cases, configuration=args.c if args.preprocessed else None,
                         plans=args.p, sheet=args.sheet, channel=args.channel, max_boxes=args.max_boxes)
    print(f"wrote {len(paths)} PNG file(s) to {Path(args.o).resolve()}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``show``."""
    s = subparsers.add_parser(
        "show", help="PNGs of cases with their label map and box outlines (raw or preprocessed)",
        description="Write one PNG per case: three orthogonal slices through each box centre (2D images: one "
                    "panel) with the image, the mask or derived label map (ignore: hatched) in class colours, the "
                    "box outlines and a legend. --preprocessed -c CONFIG shows the arrays nnU-Net preprocessed "
                    "(transposed, cropped, resampled) with the boxes mapped as the trainer maps them. --sheet "
                    "writes one contact sheet of all cases instead.")
    s.add_argument("-d", required=True, help="dataset id or name")
    s.add_argument("cases", nargs="*", metavar="CASE", help="case ids (default: every training case)")
    s.add_argument("-o", required=True, metavar="DIR", help="output folder (created if needed)")
    s.add_argument("--preprocessed", action="store_true", help="show nnU-Net's preprocessed data (needs -c)")
    s.add_argument("-c", default=None, metavar="CONFIG", help="configuration, e.g. 3d_fullres or 2d")
    s.add_argument("-p", default="nnUNetPlans", metavar="PLANS", help="plans identifier (default nnUNetPlans)")
    s.add_argument("--sheet", action="store_true", help="one contact sheet for the whole dataset")
    s.add_argument("--channel", type=int, default=0, help="image channel to show (default 0)")
    s.add_argument("--max-boxes", type=int, default=10, help="rows per case at most (default 10)")
    s.set_defaults(func=_cmd_show)
