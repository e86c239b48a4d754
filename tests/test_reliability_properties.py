"""Property-based tests (hypothesis) of the manifest parser, the dataset validation and ``prepare``.

Properties:

- any decoded JSON value, any file content: :func:`parse_manifest` never raises, :func:`load_manifest`
  and :func:`read_raw_dataset` raise :class:`ManifestError` or succeed - never TypeError, KeyError,
  AttributeError, RecursionError or an ITK error from deep inside;
- ``prepare`` on a small synthetic dataset with an arbitrary or a mutated manifest (wrong types,
  missing fields, negative / inverted / float / NaN / huge box coordinates, unknown types, unicode,
  ``../`` and absolute case ids, duplicate ids, ...): either it succeeds, or it raises
  :class:`ManifestError` whose problems name the case and the field, and the dataset folder is
  byte-for-byte unchanged;
- valid manifests always succeed, and a second run changes nothing.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnunet_mixsup.lab.synthetic import make_synthetic_dataset
from nnunet_mixsup.manifest import (
    Box,
    CaseSupervision,
    Manifest,
    ManifestError,
    load_manifest,
    parse_manifest,
    read_raw_dataset,
    validate_against_dataset,
)
from nnunet_mixsup.prepare import prepare_dataset

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    database=None)
FAST = settings(max_examples=150, deadline=None, database=None)

# ------------------------------------------------------------------------------------------ strategies
json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda ch: st.lists(ch, max_size=4)
                           | st.dictionaries(st.text(max_size=10), ch, max_size=4), max_leaves=25)

REAL_IDS = ["case_000", "case_001", "case_002", "case_003", "case_004"]
BAD_IDS = ["../case_000", "/abs/case_000", "a/b", "a\\b", "", ".", "..", ".hidden", "case_000\n", " case_000",
           "é", "ケース", "case\x00", "C:\\case", "x" * 300, "-x", "__duplicates__", "case_000/../case_001"]
case_ids = st.sampled_from(REAL_IDS) | st.sampled_from(BAD_IDS) | st.text(max_size=12)
weird = (st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=3)
         | st.integers(min_value=2 ** 40, max_value=2 ** 80) | st.integers(max_value=-1) | st.just([]) | st.just({}))
labels = st.integers(-2, 4) | weird
coords = st.lists(st.integers(-5, 45) | weird, min_size=0, max_size=4)
boxes = st.fixed_dictionaries({"label": labels, "min": coords, "max": coords}) | json_values
entries = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["mask", "none"])}),
    st.fixed_dictionaries({"type": st.just("box"), "boxes": st.lists(boxes, max_size=3)}),
    st.fixed_dictionaries({"type": st.just("tags"), "present": st.lists(labels, max_size=3)}),
    st.dictionaries(st.sampled_from(["type", "boxes", "present", "label", "extra"]),
                    st.sampled_from(["mask", "box", "tags", "none", "weird"]) | json_values, max_size=3),
    json_values,
)
manifests = st.fixed_dictionaries({"version": st.just(1) | json_values,
                                   "cases": st.dictionaries(case_ids, entries, max_size=6)}) | json_values


# ------------------------------------------------------------------------------------------ helpers
def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_problems_name_their_case(problems: list[str]) -> None:
    assert problems and all(isinstance(p, str) and p for p in problems)
    for p in problems:
        if p.startswith("case "):
            # the case is named with repr(), so any character in the id is visible and unambiguous
            assert p.startswith(("case '", 'case "')), p


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> dict:
    """A small valid 3D dataset (2 mask, 1 box, 1 tags, 1 none case) and its manifest."""
    mp = pytest.MonkeyPatch()
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        mp.delenv(k, raising=False)  # prepare must not write a sidecar anywhere outside tmp
    root = tmp_path_factory.mktemp("prop")
    folder = make_synthetic_dataset(root, 961, counts={"mask": 2, "box": 1, "tags": 1, "none": 1}, n_test=0, seed=3)
    shutil.rmtree(folder / "labelsTr_dense_hidden")
    manifest = json.loads((folder / "supervision.json").read_text())
    size = sitk.ReadImage(str(folder / "imagesTr" / "case_000_0000.nii.gz")).GetSize()
    yield {"folder": folder, "manifest": manifest, "size": tuple(size)}
    mp.undo()


@contextmanager
def fresh_copy(template: dict) -> Iterator[Path]:
    """A private copy of the template dataset, removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="mixsup-prop-"))
    try:
        dst = work / template["folder"].name
        shutil.copytree(template["folder"], dst)
        yield dst
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_prepare(folder: Path, manifest_text: str | bytes) -> tuple[list[str] | None, dict]:
    """Write the manifest, run prepare; (problems or None on success, digest before)."""
    data = manifest_text.encode("utf-8", "surrogatepass") if isinstance(manifest_text, str) else manifest_text
    (folder / "supervision.json").write_bytes(data)
    before = tree_digest(folder)
    try:
        prepare_dataset(folder, show_progress=False)
    except ManifestError as e:
        assert tree_digest(folder) == before, "prepare wrote something although validation failed"
        assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"
        return e.problems, before
    return None, before


# ------------------------------------------------------------------------------------------ parser
@FAST
@given(manifests)
def test_parse_manifest_never_raises_and_accepts_only_valid(obj):
    problems: list[str] = []
    man = parse_manifest(obj, problems)
    assert isinstance(man, Manifest)
    if problems:
        assert_problems_name_their_case(problems)
    else:
        # what was accepted round-trips exactly
        again: list[str] = []
        man2 = parse_manifest(json.loads(json.dumps(man.to_json())), again)
        assert not again and man2.cases == man.cases
    for cid, sup in man.cases.items():
        assert isinstance(cid, str) and sup.case_id == cid and sup.type in ("mask", "box", "tags", "none")
        for b in sup.boxes:
            assert all(type(v) is int for v in (*b.min, *b.max, b.label))
            assert len(b.min) == len(b.max) in (2, 3) and all(a < z for a, z in zip(b.min, b.max))


@FAST
@given(st.one_of(
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    manifests.map(lambda v: json.dumps(v, allow_nan=True)),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers(1, 200_000).map(lambda n: "[" * n),
    st.integers(4301, 9000).map(lambda n: '{"version": ' + "9" * n + "}"),
    st.sampled_from(['{"version": 1, "cases": {"a": {"type": "mask"}, "a": {"type": "none"}}}',
                     '{"version": 1, "version": 1, "cases": {}}',
                     '{"version": 1, "cases": {"a": {"type": "none", "type": "mask"}}}',
                     '{"version": 1, "cases": {"__duplicates__": 5}}',
                     '{"version": 1, "cases": {"a": {"__duplicates__": 5, "type": "none"}}}',
                     '{"version": NaN, "cases": {}}', '\ufeff{"version": 1, "cases": {}}',
                     '{"version": true, "cases": {}}', '{"version": 1.0, "cases": {}}']),
))
def test_load_manifest_raises_only_manifest_error(text):
    f = Path(tempfile.mkdtemp()) / "supervision.json"
    f.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        man = load_manifest(f)
    except ManifestError as e:
        assert_problems_name_their_case(e.problems)
        return
    assert isinstance(man, Manifest)


def test_load_manifest_specific_inputs(tmp_path):
    f = tmp_path / "supervision.json"
    cases = {
        '{"version": true, "cases": {}}': "'version' must be 1",
        '{"version": 1.0, "cases": {}}': "'version' must be 1",
        '{"version": 1, "cases": {"__duplicates__": 5}}': "case '__duplicates__': invalid case id",
        '{"version": 1, "cases": {"a": {"__duplicates__": 5, "type": "none"}}}': "unknown keys",
        '{"version": 1, "cases": {"a": {"type": "none", "type": "mask"}}}': "case 'a': duplicate key 'type'",
        '{"version": 1, "cases": {"a": {"type": "box", "boxes": [{"label": 1, "label": 2, "min": [0, 0], '
        '"max": [1, 1]}]}}}': "case 'a': box 0: duplicate key 'label'",
        '{"version": 1, "cases": {"case_000\\n": {"type": "none"}}}': "invalid case id",
        '{"version": 1, "cases": {"' + "x" * 250 + '": {"type": "none"}}}': "longer than 200",
        "[" * 100_000: "nested too deeply",
        '{"version": ' + "9" * 5000 + "}": "malformed JSON",
    }
    for text, expected in cases.items():
        f.write_text(text)
        with pytest.raises(ManifestError) as e:
            load_manifest(f)
        assert expected in str(e.value), (text[:80], str(e.value))
    f.unlink()
    f.mkdir()
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(f)


# ------------------------------------------------------------------------------------------ dataset.json
dataset_jsons = st.one_of(
    json_values,
    st.fixed_dictionaries({
        "channel_names": st.just({"0": "MRI"}) | json_values,
        "labels": st.just({"background": 0, "blob": 1, "dot": 2})
        | st.dictionaries(st.sampled_from(["background", "blob", "dot", "ignore"]), st.integers(-2, 300) | weird,
                          max_size=4) | json_values,
        "file_ending": st.sampled_from([".nii.gz", ".nii", "", ".", "/../x", "nii.gz", ".nii.gz\x00"]) | json_values,
    }, optional={"numTraining": json_values, "dataset": json_values, "modality": json_values,
                 "overwrite_image_reader_writer": st.sampled_from(
                     ["None", "SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO", "NibabelIOWithReorient",
                      "NaturalImage2DIO", "Tiff3DIO", "BaseReaderWriter", "NoSuchReader", ""]) | json_values}),
)


@SETTINGS
@given(dj=dataset_jsons)
def test_prepare_with_arbitrary_dataset_json(template, dj):
    with fresh_copy(template) as folder:
        (folder / "dataset.json").write_text(json.dumps(dj, allow_nan=True))
        problems, _ = run_prepare(folder, json.dumps(template["manifest"]))
    if problems is not None:
        assert_problems_name_their_case(problems)


# ------------------------------------------------------------------------------------------ prepare
@SETTINGS
@given(obj=manifests)
def test_prepare_with_arbitrary_manifest(template, obj):
    with fresh_copy(template) as folder:
        problems, _ = run_prepare(folder, json.dumps(obj, allow_nan=True))
    if problems is None:  # accepted: then every file entry is in the result and parse found nothing
        parse_problems: list[str] = []
        parse_manifest(obj, parse_problems)
        assert not parse_problems
    else:
        assert_problems_name_their_case(problems)


@st.composite
def mutation(draw, size: tuple[int, ...]) -> tuple[str | None, object, list[str], str | None]:
    """(case id, new entry or a marker, expected message fragments, raw-text marker)."""
    nd = len(size)
    good_box = {"label": 1, "min": [1] * nd, "max": [3] * nd}
    kind = draw(st.sampled_from([
        "type_wrong", "type_missing", "boxes_missing", "boxes_not_list", "boxes_empty", "coord_not_int",
        "coord_negative", "coord_too_big", "inverted", "empty", "two_coords", "four_coords", "mixed_dims",
        "label_unknown", "label_not_int", "box_extra_key", "box_missing_key", "box_not_object", "present_bad",
        "present_unknown", "present_duplicate", "unknown_key", "entry_not_object", "bad_case_id", "unknown_case",
        "mask_as_weak", "weak_as_mask", "version", "duplicate_id"]))
    weak = draw(st.sampled_from(["case_002", "case_003", "case_004"]))
    any_case = draw(st.sampled_from(REAL_IDS))
    axis = draw(st.integers(0, nd - 1))
    if kind == "type_wrong":
        t = draw(st.sampled_from(["weird", "Mask", "", "boxes", "tag"]) | weird)
        return any_case, {"type": t}, ["'type' must be one of"], None
    if kind == "type_missing":
        return any_case, {"present": [1]}, ["'type' must be one of"], None
    if kind == "boxes_missing":
        return weak, {"type": "box"}, ["'boxes'"], None
    if kind == "boxes_not_list":
        return weak, {"type": "box", "boxes": draw(weird.filter(lambda v: v != []) | st.just(good_box))}, \
            ["'boxes'"], None
    if kind == "boxes_empty":
        return weak, {"type": "box", "boxes": []}, ["non-empty 'boxes'"], None
    b = copy.deepcopy(good_box)
    if kind == "coord_not_int":
        b[draw(st.sampled_from(["min", "max"]))][axis] = draw(
            st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=2) | st.none() | st.booleans()
            | st.just([1]))
        return weak, {"type": "box", "boxes": [b]}, ["box 0", "'min' and 'max' must be lists of integer"], None
    if kind == "coord_negative":
        b["min"][axis] = -draw(st.integers(1, 2 ** 70))
        return weak, {"type": "box", "boxes": [b]}, ["box 0", "outside the image"], None
    if kind == "coord_too_big":
        b["max"][axis] = size[axis] + draw(st.integers(1, 2 ** 70))
        return weak, {"type": "box", "boxes": [b]}, ["box 0", "outside the image"], None
    if kind == "inverted":
        b["min"][axis], b["max"][axis] = 3, 1
        return weak, {"type": "box", "boxes": [good_box, b]}, ["box 1", "inverted"], None
    if kind == "empty":
        b["max"][axis] = b["min"][axis]
        return weak, {"type": "box", "boxes": [b]}, ["box 0", "empty box"], None
    if kind == "two_coords":
        b = {"label": 1, "min": [1, 1], "max": [3, 3]}
        return weak, {"type": "box", "boxes": [b]}, ["box 0", "wrong dimensionality"], None
    if kind == "four_coords":
        b = {"label": 1, "min": [1] * 4, "max": [3] * 4}
        return weak, {"type": "box", "boxes": [b]}, ["box 0", "2 (2D) or 3 (3D) coordinates"], None
    if kind == "mixed_dims":
        return weak, {"type": "box", "boxes": [good_box, {"label": 1, "min": [1, 1], "max": [3, 3]}]}, \
            ["mix 2D and 3D"], None
    if kind == "label_unknown":
        b["label"] = draw(st.sampled_from([0, 3, 7, -1, 2 ** 63]))
        return weak, {"type": "box", "boxes": [b]}, ["not foreground labels"], None
    if kind == "label_not_int":
        b["label"] = draw(st.sampled_from([1.0, "1", True, None, [1], float("nan")]))
        return weak, {"type": "box", "boxes": [b]}, ["box 0", "'label' must be an integer"], None
    if kind == "box_extra_key":
        b["colour"] = "red"
        return weak, {"type": "box", "boxes": [b]}, ["box 0", "exactly 'label', 'min', 'max'"], None
    if kind == "box_missing_key":
        del b[draw(st.sampled_from(["label", "min", "max"]))]
        return weak, {"type": "box", "boxes": [b]}, ["box 0", "exactly 'label', 'min', 'max'"], None
    if kind == "box_not_object":
        return weak, {"type": "box", "boxes": [draw(weird | st.just([1, 2]))]}, ["box 0", "must be an object"], None
    if kind == "present_bad":
        present = draw(st.sampled_from([None, 1, "1", [1.0], [True], ["a"], {"1": 1}, [None], [float("nan")]]))
        return weak, {"type": "tags", "present": present}, ["'present'"], None
    if kind == "present_unknown":
        return weak, {"type": "tags", "present": [draw(st.sampled_from([0, 3, 9, -1]))]}, \
            ["not foreground labels"], None
    if kind == "present_duplicate":
        return weak, {"type": "tags", "present": [1, 1]}, ["more than once"], None
    if kind == "unknown_key":
        return weak, {"type": "none", draw(st.sampled_from(["boxes", "present", "note", "Type"])): 1}, \
            ["unknown keys"], None
    if kind == "entry_not_object":
        return any_case, draw(st.sampled_from(["mask", 1, None, [], ["mask"], True])), ["must be an object"], None
    if kind == "bad_case_id":
        return draw(st.sampled_from(BAD_IDS)), {"type": "none"}, ["invalid case id"], None
    if kind == "unknown_case":
        return draw(st.sampled_from(["case_999", "Case_000", "case_0000", "case-000"])), {"type": "none"}, \
            ["unknown case"], None
    if kind == "mask_as_weak":
        return draw(st.sampled_from(["case_000", "case_001"])), {"type": draw(st.sampled_from(["none", "tags"]))}, ["refusing to overwrite"], None
    if kind == "weak_as_mask":
        return weak, {"type": "mask"}, ["type 'mask' but no label file"], None
    if kind == "version":
        return None, draw(st.sampled_from([2, 0, "1", 1.5, True, None, [1]])), ["'version' must be 1"], "version"
    return weak, None, ["duplicate entry"], "duplicate"


def _apply(manifest: dict, muts: list) -> str:
    m = copy.deepcopy(manifest)
    dups = []
    for cid, entry, _, marker in muts:
        if marker == "version":
            m["version"] = entry
        elif marker == "duplicate":
            dups.append(cid)  # several cases may be duplicated; each must be reported
        else:
            if entry == {"type": "tags"} or (isinstance(entry, dict) and entry.get("type") == "tags"
                                             and "present" not in entry):
                entry = {**entry, "present": []}
            m["cases"][cid] = entry
    text = json.dumps(m, allow_nan=True)
    for dup in dups:  # the JSON text names the case twice
        key = json.dumps(dup)
        text = text.replace(f"{key}: ", f'{key}: {{"type": "none"}}, {key}: ', 1)
    return text


@SETTINGS
@given(data=st.data())
def test_mutated_manifest_reports_case_and_field_and_writes_nothing(template, data):
    muts = data.draw(st.lists(mutation(template["size"]), min_size=1, max_size=3,
                              unique_by=lambda m: (m[0], m[3])))
    # one mutation per case (a later one would overwrite an earlier one)
    seen: set = set()
    kept = []
    for m in muts:
        if m[3] != "version":
            if m[0] in seen:
                continue
            seen.add(m[0])
        kept.append(m)
    muts = kept
    with fresh_copy(template) as folder:
        problems, _ = run_prepare(folder, _apply(template["manifest"], muts))
    assert problems is not None, f"accepted an invalid manifest: {muts}"
    assert_problems_name_their_case(problems)
    for cid, _, fragments, marker in muts:
        prefix = "" if marker == "version" else f"case {cid!r}"
        hits = [p for p in problems if p.startswith(prefix) and all(f in p for f in fragments)]
        assert hits, f"no problem for {prefix} with {fragments}: {problems}"


@st.composite
def valid_weak_entry(draw, size: tuple[int, ...]) -> dict:
    t = draw(st.sampled_from(["box", "tags", "none"]))
    if t == "none":
        return {"type": "none"}
    if t == "tags":
        return {"type": "tags", "present": draw(st.lists(st.sampled_from([1, 2]), unique=True))}
    out = []
    for _ in range(draw(st.integers(1, 3))):
        mn, mx = [], []
        for s in size:
            a = draw(st.integers(0, s - 1))
            mn.append(a)
            mx.append(draw(st.integers(a + 1, s)))
        out.append({"label": draw(st.sampled_from([1, 2])), "min": mn, "max": mx})
    return {"type": "box", "boxes": out}


@SETTINGS
@given(data=st.data())
def test_valid_manifests_succeed_and_are_idempotent(template, data):
    m = copy.deepcopy(template["manifest"])
    for cid in ("case_002", "case_003", "case_004"):
        m["cases"][cid] = data.draw(valid_weak_entry(template["size"]))
    if data.draw(st.booleans()):
        for cid in ("case_000", "case_001"):  # mask cases may also be left to the default
            del m["cases"][cid]
    with fresh_copy(template) as folder:
        _check_valid(folder, m)


def _check_valid(folder: Path, m: dict) -> None:
    problems, _ = run_prepare(folder, json.dumps(m))
    assert problems is None
    ignore = json.loads((folder / "dataset.json").read_text())["labels"]["ignore"]
    for cid in ("case_002", "case_003", "case_004"):
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{cid}.nii.gz")))
        e = m["cases"][cid]
        expected = np.full(lab.shape, ignore, lab.dtype)
        if e["type"] == "tags" and not e["present"]:
            expected[:] = 0
        if e["type"] == "box":
            expected[:] = 0
            for b in e["boxes"]:
                expected[tuple(slice(a, z) for a, z in zip(b["min"][::-1], b["max"][::-1]))] = ignore
        assert np.array_equal(lab, expected), cid
    snapshot = tree_digest(folder)
    res = prepare_dataset(folder, show_progress=False)
    assert res.written == [] and tree_digest(folder) == snapshot


# ------------------------------------------------------------------------------------------ in-code manifests
@FAST
@given(cid=case_ids, t=st.sampled_from(["mask", "box", "tags", "none", "weird"]) | weird,
       label=labels, mn=coords, mx=coords, present=st.lists(labels, max_size=3))
def test_validate_against_dataset_with_manifests_built_in_code(template, cid, t, label, mn, mx, present):
    """A Manifest built in code bypasses the parser: validation must still catch everything."""
    ds = read_raw_dataset(template["folder"])
    sup = CaseSupervision(cid, t, boxes=(Box(label, tuple(mn), tuple(mx)),) if t == "box" else (),
                          present=tuple(present) if t == "tags" else ())
    man = Manifest({cid: sup, "case_000": CaseSupervision("case_000", "mask")})
    try:
        full, _ = validate_against_dataset(man, ds, check_image_data=True)
    except ManifestError as e:
        assert_problems_name_their_case(e.problems)
        return
    assert cid in full.cases and full.cases[cid].type in ("mask", "box", "tags", "none")
    for b in full.cases[cid].boxes:  # accepted boxes are usable as they are
        assert all(0 <= a < z <= s for a, z, s in zip(b.min, b.max, template["size"]))
        assert not any(isinstance(v, float) and math.isnan(v) for v in b.min)
