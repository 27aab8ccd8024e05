"""ScribbleSup XML polylines and What's-the-point JSON clicks, rasterised to label maps."""
import json

import numpy as np
import pytest
from PIL import Image

from apro.data.sparse_formats import (
    convert_sparse_labels,
    rasterize_points,
    rasterize_scribbles,
    read_point_json,
    read_scribblesup_xml,
    scribblesup_label,
)
from apro.data.voc import VocDataError, VocSegmentation

XML = """<annotation>
  <filename>a.jpg</filename>
  <size><width>40</width><height>30</height></size>
  <polygon><tag>plane</tag>
    <point><X>5</X><Y>10</Y></point><point><X>25</X><Y>10</Y></point><point><X>25</X><Y>20</Y></point>
  </polygon>
  <polygon><tag>background</tag>
    <point><X>0</X><Y>10</Y></point><point><X>39</X><Y>10</Y></point>
  </polygon>
  <polygon><tag>sky</tag><point><X>20</X><Y>2</Y></point></polygon>
</annotation>
"""


def test_scribblesup_xml(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(XML)
    size, strokes = read_scribblesup_xml(path)
    assert size == (30, 40) and [s[0] for s in strokes] == ["plane", "background", "sky"]
    lab = scribblesup_label(path, width=3)
    assert lab.shape == (30, 40) and lab.dtype == np.uint8
    # the aeroplane stroke (class 1) is drawn over the background stroke on the shared row
    assert lab[10, 15] == 1 and lab[10, 35] == 0 and lab[15, 25] == 1
    # width 3: rows 9..11 along the horizontal segment, nothing at distance 2
    assert (lab[9:12, 8:22] == 1).all() and (lab[13, 8:22] == 255).all() and (lab[7, 8:22] == 255).all()
    assert lab[2, 20] == 0  # PASCAL-Context "sky" is VOC background
    assert set(np.unique(lab)) == {0, 1, 255}
    thin = scribblesup_label(path, width=1)
    assert (thin != 255).sum() < (lab != 255).sum()
    assert (thin[10, 8:22] == 1).all() and (thin[9, 8:22] == 255).all()


def test_scribblesup_bad_files(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(XML.replace("plane", "unicorn"))
    with pytest.raises(VocDataError, match=r"a\.xml: unknown class tag 'unicorn'"):
        scribblesup_label(path)
    path.write_text(XML)
    with pytest.raises(VocDataError, match="unknown class tag 'sky'"):
        rasterize_scribbles(read_scribblesup_xml(path)[1], (30, 40), context="error")
    with pytest.raises(VocDataError, match="<size> is 40x30 but the image is 50x30"):
        scribblesup_label(path, size=(30, 50))
    path.write_text("<annotation><polygon>")
    with pytest.raises(VocDataError, match="not valid XML"):
        read_scribblesup_xml(path)
    path.write_text("<annotation><polygon><tag>cat</tag><point><X>a</X><Y>1</Y></point></polygon></annotation>")
    with pytest.raises(VocDataError, match="<X> 'a' is not a number"):
        read_scribblesup_xml(path)
    with pytest.raises(VocDataError, match="missing scribble file"):
        read_scribblesup_xml(tmp_path / "none.xml")


def test_point_json_disks(tmp_path):
    clicks = {"a": [{"cls": 15, "x": 10.4, "y": 5.6, "rank": 1}, {"cls": 15, "x": 20, "y": 20, "rank": 2},
                    {"cls": 0, "x": 10, "y": 6}, {"cls": 3, "x": 0, "y": 0, "rank": 1}]}
    (tmp_path / "p.json").write_text(json.dumps(clicks))
    pts = read_point_json(tmp_path / "p.json")
    lab = rasterize_points(pts["a"], (25, 30), radius=1)
    # radius 1 = centre + 4 neighbours at (round(x), round(y)) = (10, 6); person drawn over background
    disk = {(6, 10), (5, 10), (7, 10), (6, 9), (6, 11)}
    assert {tuple(p) for p in np.argwhere(lab == 15)} >= disk
    assert lab[5, 9] == 255 and lab[6, 10] == 15
    assert {tuple(p) for p in np.argwhere(lab == 3)} == {(0, 0), (1, 0), (0, 1)}  # clipped at the corner
    assert int((lab == 15).sum()) == 10
    one = rasterize_points(pts["a"], (25, 30), max_rank=1)
    assert int((one == 15).sum()) == 5
    big = rasterize_points(pts["a"], (25, 30), radius=2)
    assert int((big == 15).sum()) == 26


def test_point_json_grouped_lists_and_errors(tmp_path):
    grouped = {"a": {"fg_whats_the_point": [{"cls": 2, "x": 3, "y": 3, "rank": 1}],
                     "bg_from_scribblesup": [{"cls": 0, "x": 3, "y": 4}]}}
    (tmp_path / "g.json").write_text(json.dumps(grouped))
    pts = read_point_json(tmp_path / "g.json")
    assert [c["cls"] for c in pts["a"]] == [0, 2]
    lab = rasterize_points(pts["a"], (10, 10))
    assert lab[3, 3] == 2 and lab[4, 3] == 2 and lab[5, 3] == 0  # foreground on top
    (tmp_path / "b.json").write_text(json.dumps({"a": [{"cls": 30, "x": 1, "y": 1}]}))
    with pytest.raises(VocDataError, match="click class 30"):
        rasterize_points(read_point_json(tmp_path / "b.json")["a"], (5, 5))
    (tmp_path / "c.json").write_text(json.dumps({"a": [{"x": 1}]}))
    with pytest.raises(VocDataError, match="not an object with cls, x, y"):
        read_point_json(tmp_path / "c.json")
    (tmp_path / "d.json").write_text("{")
    with pytest.raises(VocDataError, match="not valid JSON"):
        read_point_json(tmp_path / "d.json")


def test_convert_feeds_the_reader(tmp_path):
    from test_voc import make_voc2012

    names = make_voc2012(tmp_path / "voc", n=2)
    clicks = {n: [{"cls": 1, "x": 4, "y": 4, "rank": 1}] for n in names}
    (tmp_path / "p.json").write_text(json.dumps(clicks))
    out = tmp_path / "points"
    assert convert_sparse_labels(tmp_path / "voc" / "JPEGImages", out, point_json=tmp_path / "p.json") == 2
    ds = VocSegmentation(tmp_path / "voc", "train", labels="points", sparse_dir=out)
    assert len(ds) == 2 and int((ds[0]["label"] == 1).sum()) == 5
    with pytest.raises(VocDataError, match="missing image file"):
        convert_sparse_labels(tmp_path / "voc" / "JPEGImages", out, point_json=tmp_path / "p.json", names=["zz"])
    xml_dir = tmp_path / "xml"
    xml_dir.mkdir()
    for n in names:
        (xml_dir / f"{n}.xml").write_text(XML.replace("<width>40</width><height>30</height>",
                                                      "<width>48</width><height>36</height>"))
    assert convert_sparse_labels(tmp_path / "voc" / "JPEGImages", tmp_path / "scr", scribble_xml_dir=xml_dir) == 2
    assert np.array(Image.open(tmp_path / "scr" / f"{names[0]}.png"))[10, 15] == 1
