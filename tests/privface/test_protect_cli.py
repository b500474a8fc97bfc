"""The client commands end to end on real images: align, protect, show-protected."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from enrollment import wire
from privface.cli import main


def test_protect_single_image_to_npy(lfw_dir, tmp_path):
    img = lfw_dir / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"
    out = tmp_path / "x.npy"
    assert main(["protect", str(img), "--seed", "3", "-o", str(out)]) == 0
    x = np.load(out)
    assert x.dtype == np.float32 and x.shape == (27, 112, 112)
    out2 = tmp_path / "y.npy"
    assert main(["protect", str(img), "--seed", "3", "-o", str(out2)]) == 0
    np.testing.assert_array_equal(x, np.load(out2))  # seeded: same rank


def test_protect_batch_wire_and_folder(lfw_dir, att_dir, tmp_path, capsys):
    imgs = [
        str(lfw_dir / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"),
        str(att_dir / "s2" / "1.pgm"),
    ]
    bad = tmp_path / "bad.txt"
    bad.write_text("no")
    blob = tmp_path / "faces.pfpi"
    assert main(["protect", *imgs, str(bad), "--rank", "2,1", "-o", str(blob)]) == 1
    assert "unreadable" in capsys.readouterr().err
    profile, x = wire.load(blob.read_bytes())
    assert x.shape == (2, 27, 112, 112) and profile.name == "partialface-balanced"
    folder = tmp_path / "out"
    assert main(["protect", *imgs, "--profile", "hfcf", "-o", str(folder)]) == 0
    files = sorted(folder.glob("*.pfpi"))
    assert [f.stem for f in files] == ["1", "Aaron_Peirsol_0001"]
    assert wire.load(files[0].read_bytes())[1].shape == (1, 71, 112, 112)


def test_protect_aligned_input_and_refusal(tmp_path):
    crop = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    Image.fromarray(crop).save(tmp_path / "c.png")
    assert (
        main(["protect", str(tmp_path / "c.png"), "--aligned", "-o", str(tmp_path / "c.npy")]) == 0
    )
    Image.fromarray(crop[:100]).save(tmp_path / "d.png")
    assert (
        main(["protect", str(tmp_path / "d.png"), "--aligned", "-o", str(tmp_path / "d.npy")]) == 1
    )


def test_show_protected_writes_panels(lfw_dir, tmp_path, capsys):
    img = lfw_dir / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"
    blob = tmp_path / "x.pfpi"
    assert main(["protect", str(img), "--rank", "4,2", "-o", str(blob)]) == 0
    png = tmp_path / "show.png"
    capsys.readouterr()
    assert main(["show-protected", str(blob), "--original", str(img), "-o", str(png)]) == 0
    assert "(rank 4,2)" in capsys.readouterr().out  # read off the input, never sent
    pic = np.asarray(Image.open(png))
    assert pic.shape[0] == 224 and pic.shape[1] > 3 * 224


def test_align_command_and_console_script(lfw_dir, tmp_path):
    out = tmp_path / "aligned"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "privface.cli",
            "align",
            str(lfw_dir / "Aaron_Peirsol"),
            "-o",
            str(out),
            "-q",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "aligned" in res.stdout
    assert len(list((out / "Aaron_Peirsol").glob("*.png"))) == 4
