"""ddpm_nb.animate: frame schedules, frame shapes/colours, GIF/MP4 files that decode, slerp."""
from __future__ import annotations

import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from ddpm_nb import animate
from ddpm_nb.animate import chain_frames, frame_schedule, side_by_side, slerp, write_gif, write_mp4


def _chain(steps=12, batch=4, channels=1, size=8, seed=0):
    """A fake trajectory (S, B, C, H, W) in [-1, 1] whose every step differs from the last."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(steps, batch, channels, size, size, generator=g) * 2 - 1


# --------------------------------------------------------------------------- frame_schedule


@pytest.mark.parametrize("num_steps,num_frames,late_bias", [
    (1000, 60, 2.0), (1000, 2, 2.0), (50, 49, 3.0), (101, 30, 1.0), (20, 7, 0.5), (1000, 999, 2.0),
])
def test_frame_schedule_properties(num_steps, num_frames, late_bias):
    idx = frame_schedule(num_steps, num_frames, late_bias=late_bias)
    assert len(idx) == num_frames
    assert idx[0] == 0 and idx[-1] == num_steps - 1
    assert all(b > a for a, b in zip(idx, idx[1:])), "strictly increasing (so also unique)"
    assert all(isinstance(i, int) for i in idx)


def test_frame_schedule_all_steps_when_enough_frames():
    assert frame_schedule(10, 10) == list(range(10))
    assert frame_schedule(10, 500) == list(range(10))
    assert frame_schedule(1, 1) == [0]


@pytest.mark.parametrize("late_bias", [1.5, 2.0, 4.0])
def test_frame_schedule_denser_late(late_bias):
    num_steps = 1000
    idx = np.array(frame_schedule(num_steps, 60, late_bias=late_bias))
    first_half = (idx < num_steps / 2).sum()
    second_half = (idx >= num_steps / 2).sum()
    assert second_half > first_half
    gaps = np.diff(idx)
    assert gaps[:5].mean() > gaps[-5:].mean(), "early gaps wider than late gaps"


def test_frame_schedule_even_when_no_bias():
    gaps = np.diff(frame_schedule(1001, 11, late_bias=1.0))
    assert set(gaps.tolist()) == {100}


def test_frame_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_frames"):
        frame_schedule(100, 1)
    with pytest.raises(ValueError, match="late_bias"):
        frame_schedule(100, 10, late_bias=0)
    with pytest.raises(ValueError, match="num_steps"):
        frame_schedule(0, 10)


# --------------------------------------------------------------------------- chain_frames


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("with_x0", [False, True])
@pytest.mark.parametrize("label", [False, True])
def test_chain_frames_shapes(channels, with_x0, label):
    steps, batch, size, scale = 12, 4, 8, 3
    x_t = _chain(steps, batch, channels, size)
    x0_pred = _chain(steps, batch, channels, size, seed=1) if with_x0 else None
    frames = chain_frames(x_t, x0_pred, num_frames=6, scale=scale, hold_last=3, label=label)
    assert len(frames) == 6 + 3
    h, w = frames[0].shape[:2]
    assert all(f.shape == (h, w, 3) and f.dtype == np.uint8 for f in frames)
    grid_side = (2 * (size + 2) + 2) * scale  # nrow=2 for B=4, padding 2, then upscaled
    if not label:
        assert h == grid_side
        assert w == (2 * grid_side + 8 if with_x0 else grid_side)
    else:
        assert h > grid_side and w >= grid_side
    assert frames[-1] is frames[-4] or np.array_equal(frames[-1], frames[-4])


def test_chain_frames_grid_content_matches_make_grid():
    from ddpm_nb.utils import make_grid

    x_t = _chain(10, 3, 1, 8)
    frames = chain_frames(x_t, num_frames=4, scale=2, label=False, hold_last=0)
    steps = frame_schedule(10, 4)
    for f, i in zip(frames, steps):
        np.testing.assert_array_equal(f, make_grid(x_t[i], scale=2))


def test_chain_frames_grayscale_is_gray_and_upscaled_nearest():
    x_t = _chain(8, 2, 1, 6)
    frames = chain_frames(x_t, _chain(8, 2, 1, 6, seed=3), num_frames=5, scale=4)
    for f in frames:
        assert np.array_equal(f[..., 0], f[..., 1]) and np.array_equal(f[..., 1], f[..., 2])
    # nearest-neighbour: every 4x4 block of the (unlabelled) grid is constant
    grid = chain_frames(x_t, num_frames=2, scale=4, label=False, hold_last=0)[-1]
    blocks = grid.reshape(grid.shape[0] // 4, 4, grid.shape[1] // 4, 4, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()


def test_chain_frames_colour_kept():
    x_t = torch.zeros(3, 1, 3, 4, 4)
    x_t[:, :, 0] = 1.0  # pure red
    x_t[:, :, 1:] = -1.0
    f = chain_frames(x_t, num_frames=3, scale=1, label=False, hold_last=0)[-1]
    assert tuple(f[2, 2]) == (255, 0, 0)  # inside the first tile (padding 2)


def test_chain_frames_timestep_labels_and_errors():
    x_t = _chain(5, 1, 1, 4)
    frames = chain_frames(x_t, num_frames=5, scale=1, timesteps=[4, 3, 2, 1, 0], hold_last=0)
    assert len({f.shape for f in frames}) == 1
    final = chain_frames(x_t, x_t, num_frames=3, scale=2, timesteps=[999, 500, 250, 0, -1], hold_last=0)
    assert len({f.shape for f in final}) == 1 and not np.array_equal(final[0], final[-1])
    with pytest.raises(ValueError, match="timesteps"):
        chain_frames(x_t, timesteps=[1, 2])
    with pytest.raises(ValueError, match="x0_pred"):
        chain_frames(x_t, _chain(4, 1, 1, 4))
    with pytest.raises(ValueError, match=r"\(S, B, C, H, W\)"):
        chain_frames(torch.zeros(5, 2, 2, 4, 4))


def test_side_by_side_pads_length_and_height():
    a = chain_frames(_chain(10, 4, 1, 8), num_frames=5, hold_last=0, scale=2)
    b = chain_frames(_chain(4, 1, 3, 8), num_frames=3, hold_last=0, scale=2)
    both = side_by_side(a, b, gap=6)
    assert len(both) == 5
    ha, wa = a[0].shape[:2]
    hb, wb = b[0].shape[:2]
    assert all(f.shape == (max(ha, hb), wa + 6 + wb, 3) for f in both)
    np.testing.assert_array_equal(both[-1][:, wa + 6:][:hb], both[2][:, wa + 6:][:hb])  # b held


# --------------------------------------------------------------------------- files


def test_gif_decodes_with_hold_as_duration(tmp_path):
    num_frames, hold, fps = 8, 5, 20
    frames = chain_frames(_chain(20, 4, 1, 8), num_frames=num_frames, hold_last=hold, scale=2)
    path = write_gif(frames, tmp_path / "sub" / "chain.gif", fps=fps)
    assert path.is_file() and path.suffix == ".gif"
    assert not [p for p in path.parent.iterdir() if p.name != "chain.gif"], "no temp files left"
    video = iio.imread(path, index=None, mode="RGB")  # grey GIFs decode as "L" unless asked for RGB
    h, w = frames[0].shape[:2]
    # GIF stores the held final frame once, with a longer delay (see write_gif)
    assert video.shape == (num_frames, h, w, 3)
    durations = [iio.immeta(path, index=i)["duration"] for i in range(num_frames)]
    assert durations[:-1] == [1000 // fps] * (num_frames - 1)
    assert durations[-1] == (hold + 1) * 1000 // fps
    assert sum(durations) == len(frames) * 1000 // fps
    assert iio.immeta(path, index=0).get("loop") == 0
    # grey frames: first and last exact, in-between ones within GIF_TOLERANCE grey levels (delta frames)
    kept = [frames[i] for i in range(num_frames)]
    np.testing.assert_array_equal(video[0], kept[0])
    np.testing.assert_array_equal(video[-1], frames[-1])
    lag = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(video, kept))
    assert 0 < lag <= animate.GIF_TOLERANCE, "in-between frames lag by at most the tolerance (and some do)"
    exact = iio.imread(write_gif(frames, tmp_path / "exact.gif", fps=fps, tolerance=0), index=None, mode="RGB")
    for a, b in zip(exact, kept):
        np.testing.assert_array_equal(a, b)


def test_gif_colour_frames_still_decode(tmp_path):
    frames = chain_frames(_chain(10, 4, 3, 8), num_frames=5, hold_last=0, scale=2, label=False)
    video = iio.imread(write_gif(frames, tmp_path / "c.gif"), index=None, mode="RGB")
    assert video.shape == (5, *frames[0].shape)
    assert np.abs(video[-1].astype(int) - frames[-1]).mean() < 8  # adaptive palette: close, not exact


@pytest.mark.slow
def test_default_gif_of_16_images_is_under_2_mb(tmp_path):
    """The CLI's default animation (16 images, DDIM-50, default frames and scale) of the shipped model."""
    import ddpm_nb
    from ddpm_nb.__main__ import make_parser
    from ddpm_nb.sample import sample

    args = make_parser().parse_args(["animate", "fashion-quick-cond"])
    model, diffusion, _ = ddpm_nb.pretrained("fashion-quick-cond", device="cpu")
    _, traj = sample(model, diffusion, args.num, sampler=args.sampler, steps=args.steps, y=torch.arange(16) % 10,
                     generator=torch.Generator().manual_seed(0), progress=False, return_trajectory=True)
    frames = chain_frames(traj.x_t, traj.x0_pred, num_frames=args.frames, scale=args.scale)
    size = write_gif(frames, tmp_path / "chain.gif", fps=args.fps).stat().st_size
    assert args.num == 16 and size <= 2e6, f"{size / 1e6:.2f} MB"


def test_gif_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_gif([], tmp_path / "x.gif")
    with pytest.raises(ValueError, match="fps"):
        write_gif([np.zeros((4, 4, 3), np.uint8)], tmp_path / "x.gif", fps=100)
    with pytest.raises(TypeError, match="uint8"):
        write_gif([np.zeros((4, 4, 3), np.float32)], tmp_path / "x.gif")


def test_mp4_decodes_with_all_frames_and_sizes_multiple_of_16(tmp_path):
    frames = chain_frames(_chain(20, 3, 3, 7), num_frames=9, hold_last=4, scale=3)
    h, w = frames[0].shape[:2]
    assert h % 16 or w % 16, "the test needs a frame size that must be padded"
    path = write_mp4(frames, tmp_path / "chain.mp4", fps=12)
    assert [p.name for p in tmp_path.iterdir()] == ["chain.mp4"], "no temp files left"
    decoded = list(iio.imiter(path, plugin="FFMPEG"))
    assert len(decoded) == 9 + 4
    H, W = decoded[0].shape[:2]
    assert H % 16 == 0 and W % 16 == 0
    assert h <= H < h + 16 and w <= W < w + 16
    meta = iio.immeta(path, plugin="FFMPEG")
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == pytest.approx(12)


def test_mp4_missing_ffmpeg_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install imageio-ffmpeg"):
        write_mp4([np.zeros((16, 16, 3), np.uint8)], tmp_path / "x.mp4")


def test_show_returns_display_objects(tmp_path, monkeypatch):
    pytest.importorskip("IPython")
    from IPython.display import Image, Video

    frames = chain_frames(_chain(4, 1, 1, 8), num_frames=3, hold_last=1)
    gif = write_gif(frames, tmp_path / "a.gif")
    mp4 = write_mp4(frames, tmp_path / "a.mp4")
    shown = animate.show(gif, width=200)
    assert isinstance(shown, Image)
    html = shown._repr_html_()  # the form HTML exports use (they skip image/gif)
    assert html.startswith('<img src="data:image/gif;base64,') and 'width="200"' in html
    import base64
    assert base64.b64decode(html.split("base64,")[1].split('"')[0]) == gif.read_bytes()
    assert isinstance(animate.show(mp4), Video)
    assert isinstance(animate.show(frames), Image)
    with pytest.raises(ValueError, match="gif"):
        (tmp_path / "a.txt").write_text("x")
        animate.show(tmp_path / "a.txt")
    monkeypatch.setitem(sys.modules, "IPython", None)
    monkeypatch.setitem(sys.modules, "IPython.display", None)
    assert animate.show(gif) is None


# --------------------------------------------------------------------------- slerp


def test_slerp_endpoints_equal_inputs():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)


def test_slerp_keeps_gaussian_norm_and_differs_from_lerp():
    g = torch.Generator().manual_seed(1)
    d = 3 * 32 * 32
    z0, z1 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    mid = slerp(z0, z1, 0.5)
    norms = mid.flatten(1).norm(dim=1)
    expected = 0.5 * (z0.flatten(1).norm(dim=1) + z1.flatten(1).norm(dim=1))
    torch.testing.assert_close(norms, expected, rtol=0.02, atol=0)
    assert ((norms / d ** 0.5 - 1).abs() < 0.05).all()
    lerp_norms = (0.5 * (z0 + z1)).flatten(1).norm(dim=1)
    assert (lerp_norms < 0.8 * norms).all(), "lerp shrinks independent noises toward 0.71x"
    # independent check of the formula for one sample
    v0, v1 = z0[0].flatten().double(), z1[0].flatten().double()
    theta = torch.arccos(v0 @ v1 / (v0.norm() * v1.norm()))
    ref = (torch.sin(0.3 * theta) * v0 + torch.sin(0.7 * theta) * v1) / torch.sin(theta)
    torch.testing.assert_close(slerp(z0, z1, 0.7)[0].flatten().double(), ref, rtol=1e-5, atol=1e-5)


def test_slerp_many_alphas_and_parallel_fallback():
    z0, z1 = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    path = slerp(z0, z1, torch.linspace(0, 1, 7))
    assert path.shape == (7, 2, 4, 4)
    torch.testing.assert_close(path[0], z0[0])
    torch.testing.assert_close(path[-1], z1[0])
    same = slerp(z0, 2 * z0, 0.25)  # parallel: lerp
    torch.testing.assert_close(same, 1.25 * z0)
    assert torch.isfinite(slerp(z0, z0, 0.5)).all()


@pytest.mark.slow
def test_executed_notebook_exported_to_html_shows_the_gif(tmp_path):
    """`jupyter nbconvert --to html` of an executed notebook keeps the animation inline (it used to print
    `<IPython.core.display.Image object>`): a throwaway notebook, executed, exported with nbconvert."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nbconvert = pytest.importorskip("nbconvert")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import numpy as np\n"
        "from ddpm_nb import animate\n"
        "frames = [np.full((8, 8, 3), v, np.uint8) for v in (0, 120, 255)]\n"
        "gif = animate.write_gif(frames, 'tiny.gif')\n"
        "animate.show(gif, width=64)")]
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    html, _ = nbconvert.HTMLExporter().from_notebook_node(nb)
    assert "IPython.core.display.Image object" not in html
    import base64
    import re
    found = re.findall(r'<img[^>]* src="data:image/gif;base64,([A-Za-z0-9+/=]+)"', html)
    assert found and base64.b64decode(found[0]) == (tmp_path / "tiny.gif").read_bytes()
