"""`apro --help` / `--version` stay light; overlays scale their lines with the image size."""
import subprocess
import sys

import numpy as np
import pytest

import apro
from apro.cli import COMMANDS, SUMMARIES, build_parser, main


def test_help_and_version_import_neither_torch_nor_numba():
    code = (
        "import sys, contextlib, io\n"
        "from apro.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(sorted(m for m in ('torch', 'numba') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_version_and_help_list_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"apro {apro.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in COMMANDS:
        assert name in text
    assert set(SUMMARIES) <= set(COMMANDS)


def test_full_parser_builds_every_command():
    parser = build_parser()
    args = parser.parse_args(["demo", "-o", "x.png"])
    assert args.command == "demo" and callable(args.handler)


def test_import_apro_is_lazy_but_exports_work():
    code = "import sys, apro; a = 'torch' in sys.modules; apro.global_propagation; print(a, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        apro.nonexistent


@pytest.mark.parametrize("size,width", [((64, 80), 2), ((512, 512), 2), ((3000, 4000), 16)])
def test_overlay_lines_scale_with_image_size(size, width):
    from apro.figures import BOX_COLOUR, OBJECT_LABEL_COLOUR, line_width, overlay

    h, w = size
    assert line_width(h, w) == width
    image = np.zeros((h, w, 3), np.uint8)
    mask = np.zeros((h, w), bool)
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    labels = np.full((h, w), 255, np.uint8)
    labels[h // 2, w // 2] = 1  # one clicked point
    out = overlay(image, mask, box=box, labels=labels)
    column = out[:, w // 2 + width * 3]  # a column crossing the top and bottom box lines
    green = np.all(column == BOX_COLOUR, axis=1)
    assert green.sum() == 2 * width
    dot = np.all(out == OBJECT_LABEL_COLOUR, axis=2)
    assert dot.sum() == (2 * width + 1) ** 2  # the point is drawn as a visible square
