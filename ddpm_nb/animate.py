"""GIFs and MP4s of the denoising chain, and spherical interpolation between noises.

Explained in notebooks/05_animations.

A sampler that records its trajectory gives `x_t: (S, B, C, H, W)` in [-1, 1]: S steps, the
first one pure noise, the last one the final sample (and optionally `x0_pred` of the same
shape, the model's guess of the clean image at each step). `chain_frames` turns that into
uint8 RGB frames (H, W, 3); `write_gif` / `write_mp4` save them; `show` displays them inline.

    frames = chain_frames(x_t, x0_pred, num_frames=40)     # list of (H, W, 3) uint8
    # with a recorded ddpm_nb.sample.Trajectory:
    frames = chain_frames(traj.x_t, traj.x0_pred, timesteps=traj.timesteps)
    show(write_gif(frames, results_dir("anim") / "chain.gif"))

Frames are RGB for 1- and 3-channel images alike (grayscale is repeated), upscaled with
nearest-neighbour (`scale`) so 28x28 images stay visible, and MP4 frames are padded with white
to multiples of 16 (what H.264 players expect).
"""
from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ddpm_nb.utils import atomic_path, atomic_write_bytes, is_disk_full, make_grid

__all__ = [
    "frame_schedule",
    "chain_frames",
    "side_by_side",
    "encode_gif",
    "write_gif",
    "write_mp4",
    "show",
    "slerp",
]

WHITE = 255  # background of gaps, padding and label rows
GIF_MAX_FPS = 50  # GIF delays are whole centiseconds and browsers slow down delays < 2 cs


# --------------------------------------------------------------------------- which steps


def frame_schedule(num_steps: int, num_frames: int, *, late_bias: float = 2.0) -> list[int]:
    """Indices of the chain steps to show: increasing, unique, from 0 to num_steps - 1.

    Explained in notebooks/05_animations.

    The chain has `num_steps` entries (0 = the starting noise, num_steps - 1 = the final image).
    Most of the visible change happens late in sampling, so with `late_bias > 1` the frames are
    denser toward the end: frame k of F sits at `round((num_steps - 1) * (k / (F - 1)) ** (1 / late_bias))`
    (then nudged apart so no index repeats). `late_bias = 1` spaces them evenly.
    If `num_frames >= num_steps`, every step is returned.
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if not late_bias > 0:
        raise ValueError(f"late_bias must be > 0 (1 = even spacing, > 1 = denser at the end), got {late_bias!r}")
    if num_frames >= num_steps:
        return list(range(num_steps))
    if num_frames == 1:
        raise ValueError("num_frames must be at least 2 so that both the noise and the final image are shown")
    last = num_steps - 1
    u = np.linspace(0.0, 1.0, num_frames) ** (1.0 / late_bias)
    idx = np.rint(u * last).astype(np.int64)
    idx[0], idx[-1] = 0, last
    # Rounding can make neighbours collide where the frames are dense; push them apart.
    # Forward pass: strictly increasing; backward pass: stay below the next one (and <= last).
    for k in range(1, num_frames):
        idx[k] = max(idx[k], idx[k - 1] + 1)
    idx[-1] = last
    for k in range(num_frames - 2, -1, -1):
        idx[k] = min(idx[k], idx[k + 1] - 1)
    return [int(i) for i in idx]


# --------------------------------------------------------------------------- frames


def _check_chain(x: torch.Tensor, name: str) -> torch.Tensor:
    """(S, B, C, H, W) or (S, C, H, W) -> (S, B, C, H, W), with a clear error otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (S, B, C, H, W), got {type(x).__name__}")
    if x.dim() == 4:
        x = x.unsqueeze(1)
    if x.dim() != 5 or x.shape[2] not in (1, 3):
        raise ValueError(f"{name} must have shape (S, B, C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} has no steps (S = 0)")
    return x


def _font(size: int):
    """PIL's default font (a scalable one where Pillow >= 10.1 has it), about `size` px tall."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(math.ceil(right - min(left, 0))), int(math.ceil(bottom - min(top, 0)))


def _pad(frame: np.ndarray, height: int, width: int, *, center: bool = True) -> np.ndarray:
    """Pad an (h, w, 3) frame with white to (height, width, 3), centred or at the top left."""
    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    if h > height or w > width:
        raise ValueError(f"cannot pad a {h}x{w} frame to a smaller {height}x{width}")
    top, left = ((height - h) // 2, (width - w) // 2) if center else (0, 0)
    out = np.full((height, width, 3), WHITE, np.uint8)
    out[top:top + h, left:left + w] = frame
    return out


def _hstack(panels: Sequence[np.ndarray], gap: int) -> np.ndarray:
    """Panels (h_i, w_i, 3) side by side, vertically centred, with `gap` white columns between."""
    height = max(p.shape[0] for p in panels)
    parts: list[np.ndarray] = []
    for i, p in enumerate(panels):
        if i and gap > 0:
            parts.append(np.full((height, gap, 3), WHITE, np.uint8))
        parts.append(_pad(p, height, p.shape[1]))
    return np.concatenate(parts, axis=1)


def _as_frame(frame, i: int = 0) -> np.ndarray:
    """One frame as (H, W, 3) uint8: accepts (H, W), (H, W, 1), (H, W, 3) and (H, W, 4) uint8 arrays."""
    if isinstance(frame, torch.Tensor):
        raise TypeError(
            f"frame {i} is a torch.Tensor; convert images with ddpm_nb.utils.make_grid(x) "
            "(or build frames with chain_frames) first"
        )
    a = np.asarray(frame)
    if a.dtype != np.uint8:
        raise TypeError(f"frame {i} must be uint8 (0..255), got dtype {a.dtype}; use ddpm_nb.utils.to_uint8/make_grid")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"frame {i} must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def _uniform(frames: Sequence[np.ndarray], multiple: int = 1) -> np.ndarray:
    """Frames -> one (N, H, W, 3) uint8 array, each padded (white, centred) to the largest size,
    rounded up to a multiple of `multiple`."""
    if len(frames) == 0:
        raise ValueError("no frames to write (the list is empty)")
    fs = [_as_frame(f, i) for i, f in enumerate(frames)]
    height = max(f.shape[0] for f in fs)
    width = max(f.shape[1] for f in fs)
    height = -(-height // multiple) * multiple
    width = -(-width // multiple) * multiple
    return np.stack([_pad(f, height, width) for f in fs])


def chain_frames(
    x_t: torch.Tensor,
    x0_pred: torch.Tensor | None = None,
    *,
    num_frames: int = 40,
    nrow: int | None = None,
    scale: int = 2,
    late_bias: float = 2.0,
    hold_last: int = 10,
    label: bool = True,
    timesteps: Sequence[int] | None = None,
    gap: int = 8,
) -> list[np.ndarray]:
    """Frames of a sampling trajectory: the grid of `x_t` (beside the grid of `x0_pred` when given).

    Explained in notebooks/05_animations.

    x_t:     (S, B, C, H, W) in [-1, 1]; S steps, x_t[0] = the starting noise, x_t[-1] = the sample.
             (S, C, H, W) is read as B = 1.  C is 1 or 3.
    x0_pred: None, or the same shape as x_t: the model's prediction of x_0 at each step.
    Returns a list of (H', W', 3) uint8 RGB frames, all the same size: `num_frames` steps chosen
    by `frame_schedule(S, num_frames, late_bias=late_bias)`, then the last frame `hold_last`
    more times so the final image stays on screen.

    nrow: images per grid row (default about square); scale: nearest-neighbour upscaling;
    label: a white row on top with the step ("x_t  step 12/50", or "x_t  t=..." when
    `timesteps`, one diffusion timestep per chain entry such as `Trajectory.timesteps`, is
    given; a negative t reads "final") and "x0_pred" over the second grid;
    gap: white pixels between the two grids.
    """
    x_t = _check_chain(x_t, "x_t")
    num_steps = x_t.shape[0]
    if x0_pred is not None:
        x0_pred = _check_chain(x0_pred, "x0_pred")
        if x0_pred.shape != x_t.shape:
            raise ValueError(f"x0_pred must have the shape of x_t {tuple(x_t.shape)}, got {tuple(x0_pred.shape)}")
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive integer (nearest-neighbour upscaling), got {scale!r}")
    if hold_last < 0:
        raise ValueError(f"hold_last must be >= 0, got {hold_last!r}")
    if timesteps is not None and len(timesteps) != num_steps:
        raise ValueError(f"timesteps must give one value per chain step ({num_steps}), got {len(timesteps)}")

    steps = frame_schedule(num_steps, num_frames, late_bias=late_bias)
    grids_a = [make_grid(x_t[i], nrow=nrow, scale=scale) for i in steps]
    grids_b = None if x0_pred is None else [make_grid(x0_pred[i], nrow=nrow, scale=scale) for i in steps]

    if not label:
        frames = grids_a if grids_b is None else [_hstack([a, b], gap) for a, b in zip(grids_a, grids_b)]
    else:
        frames = _labelled(grids_a, grids_b, steps, num_steps, timesteps, scale, gap)
    return frames + [frames[-1]] * hold_last


def _labelled(grids_a, grids_b, steps, num_steps, timesteps, scale, gap) -> list[np.ndarray]:
    """Add a white label row above each panel; panels are widened (never cropped) to fit the text."""
    from PIL import Image, ImageDraw

    font = _font(min(24, max(10, 3 * scale + 2)))
    text_x = min(2 * scale, 8)  # left margin of the text: in line with the grid's first image

    def step_text(i: int) -> str:
        if timesteps is None:
            return f"step {i}/{num_steps - 1}"
        t = int(timesteps[i])
        return f"t={t}" if t >= 0 else "final"  # sample.Trajectory marks the final sample with t = -1

    texts_a = [("x_t  " if grids_b is not None else "") + step_text(i) for i in steps]
    sizes = [_text_size(font, s) for s in texts_a]
    text_h = max(h for _, h in sizes)
    width_a = max(grids_a[0].shape[1], max(w for w, _ in sizes) + text_x + 2)
    width_b = 0
    if grids_b is not None:
        wb, hb = _text_size(font, "x0_pred")
        text_h = max(text_h, hb)
        width_b = max(grids_b[0].shape[1], wb + text_x + 2)
    row_h = text_h + 6

    frames = []
    for k, text in enumerate(texts_a):
        panels = [(grids_a[k], width_a, text)]
        if grids_b is not None:
            panels.append((grids_b[k], width_b, "x0_pred"))
        columns = []
        for grid, width, caption in panels:
            body = _pad(grid, grid.shape[0], width, center=True)
            head = Image.new("RGB", (width, row_h), (WHITE, WHITE, WHITE))
            ImageDraw.Draw(head).text((text_x, 3), caption, fill=(0, 0, 0), font=font)
            columns.append(np.concatenate([np.asarray(head, np.uint8), body], axis=0))
        frames.append(columns[0] if len(columns) == 1 else _hstack(columns, gap))
    return frames


def side_by_side(frames_a: list[np.ndarray], frames_b: list[np.ndarray], gap: int = 8) -> list[np.ndarray]:
    """Two animations next to each other (e.g. DDPM vs DDIM chains of different lengths).

    Explained in notebooks/05_animations.

    frames_a, frames_b: lists of (H, W, 3) uint8 frames. The shorter list is padded by holding its
    last frame; frames of different heights are centred on white. Returns max(len) frames.
    """
    if not frames_a or not frames_b:
        raise ValueError("side_by_side needs two non-empty lists of frames")
    a, b = _uniform(frames_a), _uniform(frames_b)
    n = max(len(a), len(b))
    out = []
    for k in range(n):
        out.append(_hstack([a[min(k, len(a) - 1)], b[min(k, len(b) - 1)]], gap))
    return out


# --------------------------------------------------------------------------- files


def _gif_runs(frames: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """Collapse consecutive identical frames: (distinct frames, how many frames each one covers)."""
    kept, counts = [frames[0]], [1]
    for f in frames[1:]:
        if np.array_equal(f, kept[-1]):
            counts[-1] += 1
        else:
            kept.append(f)
            counts.append(1)
    return kept, counts


GIF_TOLERANCE = 2  # grey levels (of 255) an in-between GIF frame may lag behind the chain: invisible, half the bytes


def _gif_durations(counts: list[int], fps: int) -> list[int]:
    """Milliseconds per stored frame; rounded on the running total (whole centiseconds) so the length does not drift."""
    ends = np.rint(np.cumsum(counts) * 100.0 / fps).astype(np.int64)
    delays_cs = np.diff(np.concatenate([[0], ends]))
    return [int(max(2, d) * 10) for d in delays_cs]


def _encode_gray_gif(kept: list[np.ndarray], durations: list[int], loop: int, tolerance: int) -> bytes:
    """Grey frames (all r = g = b) with one fixed grey palette and delta frames.

    The first and last frames are stored whole and exact (index = grey level). An in-between frame
    redraws only the pixels that moved more than `tolerance` levels away from what is on screen;
    the others get the transparent index 255 (which shows the frame below; such a frame draws
    level 255 as 254). Unchanged labels, padding and settled pixels then cost almost nothing, which
    per-frame adaptive palettes (Pillow's default) cannot do.
    """
    import io

    from PIL import Image

    palette = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    images, shown = [], None
    for k, frame in enumerate(kept):
        g = frame[:, :, 0]
        if k == 0 or k == len(kept) - 1:
            idx, info = g, {}
            shown = g
        else:
            moved = np.abs(g.astype(np.int16) - shown) > tolerance
            idx = np.where(moved, np.minimum(g, 254), 255).astype(np.uint8)
            shown = np.where(moved, g, shown)
            info = {"transparency": 255}
        im = Image.fromarray(np.ascontiguousarray(idx), "P")
        im.putpalette(palette.tobytes())
        im.info.update(info)
        images.append(im)
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=loop,
                   disposal=1, optimize=False)
    return buf.getvalue()


def encode_gif(frames: list[np.ndarray], *, fps: int = 20, loop: int = 0, tolerance: int = GIF_TOLERANCE) -> bytes:
    """GIF bytes of (H, W, 3) uint8 frames; see `write_gif`."""
    if not 0 < fps <= GIF_MAX_FPS:
        raise ValueError(f"GIF fps must be in 1..{GIF_MAX_FPS} (GIF delays are whole centiseconds); "
                         f"got {fps!r}. Use write_mp4 for faster video.")
    if not 0 <= tolerance <= 16:
        raise ValueError(f"tolerance must be 0..16 grey levels, got {tolerance!r}")
    import imageio.v3 as iio

    stack = _uniform(frames)
    kept, counts = _gif_runs(stack)
    durations_ms = _gif_durations(counts, fps)
    if tolerance and len(kept) > 1 and all((f[:, :, 0] == f[:, :, 1]).all() and (f[:, :, 0] == f[:, :, 2]).all() for f in kept):
        return _encode_gray_gif(kept, durations_ms, loop, tolerance)
    return iio.imwrite("<bytes>", np.stack(kept), extension=".gif", duration=durations_ms, loop=loop)


def write_gif(frames: list[np.ndarray], path, *, fps: int = 20, loop: int = 0, tolerance: int = GIF_TOLERANCE) -> Path:
    """Save (H, W, 3) uint8 frames as an animated GIF; returns the path.

    Explained in notebooks/05_animations.

    fps: frames per second (1..50); loop: 0 = forever, n = play n more times.
    Grey frames (1-channel images) use one exact grey palette; the first and last frames are
    exact, and in-between frames redraw only pixels that changed by more than `tolerance` grey
    levels (default 2 of 255, invisible), which keeps a 16-image chain under 2 MB; `tolerance=0`
    stores every grey frame exactly (bigger). Colour frames get Pillow's adaptive palette per frame.
    Consecutive identical frames (e.g. the `hold_last` copies from `chain_frames`) are stored once
    with a longer delay, as GIF encoders do anyway, so a decoder reports fewer frames than
    `len(frames)` but the same total duration (`len(frames) / fps` seconds). Frames of different
    sizes are padded with white to the largest. The file is written atomically.
    """
    path = Path(path)
    data = encode_gif(frames, fps=fps, loop=loop, tolerance=tolerance)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def _require_ffmpeg() -> None:
    try:
        import imageio_ffmpeg
    except ImportError as exc:
        raise ImportError("MP4 export needs the ffmpeg binary from imageio-ffmpeg: pip install imageio-ffmpeg") from exc
    try:
        imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as exc:
        raise RuntimeError(
            f"imageio-ffmpeg is installed but found no ffmpeg binary ({exc}). "
            "Reinstall it with `pip install --force-reinstall imageio-ffmpeg`, "
            "or point IMAGEIO_FFMPEG_EXE at an ffmpeg executable."
        ) from exc


def write_mp4(frames: list[np.ndarray], path, *, fps: int = 20) -> Path:
    """Save (H, W, 3) uint8 frames as an H.264 MP4 (yuv420p, plays in browsers and Colab); returns the path.

    Explained in notebooks/05_animations.

    Frames are padded with white (content centred) so that both sides are multiples of 16; all
    `len(frames)` frames are written (holds included). Needs imageio-ffmpeg. Written to a temp
    file in the same folder, then renamed into place.
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    _require_ffmpeg()
    import imageio.v3 as iio

    stack = _uniform(frames, multiple=16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".mp4") as tmp:
        try:
            iio.imwrite(
                tmp, stack, plugin="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                macro_block_size=16, quality=None, ffmpeg_log_level="quiet",
                output_params=["-crf", "18", "-movflags", "+faststart"],
            )
            # ffmpeg writes the file itself and may only log a failed write (a full disk): read the file back
            # (stream copy, no decoding) before it replaces anything
            import imageio_ffmpeg
            if imageio_ffmpeg.count_frames_and_secs(str(tmp))[0] != len(stack):
                raise RuntimeError(f"ffmpeg wrote an incomplete MP4 ({tmp.stat().st_size} bytes)")
        except (OSError, RuntimeError) as exc:
            # a full disk, unless there is clearly room (the frames' raw size at 1:50 compression)
            if not is_disk_full(exc) and shutil.disk_usage(path.parent).free > stack.nbytes // 50:
                raise
            raise OSError(errno.ENOSPC, "No space left on device") from None
    return path


_GIF_CLASS = None


def _gif_display_class():
    """An `IPython.display.Image` subclass whose GIF also has an HTML form (built once, on first use)."""
    global _GIF_CLASS
    if _GIF_CLASS is None:
        import base64

        from IPython.display import Image

        class AnimatedGIF(Image):
            """A GIF for Jupyter: image/gif for JupyterLab and Colab, plus text/html
            (`<img src="data:image/gif;base64,...">`) for what skips image/gif: `jupyter nbconvert --to html`,
            nbviewer, GitHub. Small images are scaled up without blur (`image-rendering: pixelated`)."""

            def _repr_html_(self) -> str:
                b64 = base64.b64encode(self.data).decode("ascii")
                width = f' width="{int(self.width)}"' if self.width else ""
                return (f'<img src="data:image/gif;base64,{b64}"{width} alt="animation" '
                        f'style="image-rendering: pixelated"/>')

        _GIF_CLASS = AnimatedGIF
    return _GIF_CLASS


def show(path_or_frames, *, width: int | None = None):
    """Display a GIF/MP4 file, or a list of frames (shown as a GIF), inline in Jupyter or Colab.

    Explained in notebooks/05_animations.

    Returns a display object with the data embedded, which the notebook shows when it is the
    cell's last expression (or through `display(...)`): for a GIF an `IPython.display.Image` that
    also carries an HTML `<img>` form, so the animation survives `jupyter nbconvert --to html`,
    nbviewer and GitHub; for an MP4 an `IPython.display.Video`. `width` in pixels (GIFs are scaled
    up crisply). Returns None when IPython is not installed (plain scripts).
    """
    try:
        from IPython.display import Video
        gif = _gif_display_class()
    except ImportError:
        return None
    if isinstance(path_or_frames, (str, os.PathLike)):
        path = Path(path_or_frames)
        if not path.is_file():
            raise FileNotFoundError(f"no animation at {path}")
        suffix = path.suffix.lower()
        if suffix == ".gif":
            return gif(data=path.read_bytes(), format="gif", width=width)
        if suffix in (".mp4", ".webm", ".mov"):
            return Video(str(path), embed=True, width=width)
        raise ValueError(f"show() displays .gif and .mp4 files, got {path.name!r}")
    return gif(data=encode_gif(list(path_or_frames)), format="gif", width=width)


# --------------------------------------------------------------------------- noise interpolation


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors, sample by sample.

    Explained in notebooks/05_animations.

    z0, z1: (B, ...) with the same shape; each sample z[b] is flattened to a vector.
    alpha:  a float, or a tensor of shape (N,) broadcast against B (e.g. B = 1 and
            alpha = torch.linspace(0, 1, 8) gives 8 interpolants).
    Returns (max(B, N), ...):
        sin((1 - alpha) theta) / sin(theta) * z0 + sin(alpha theta) / sin(theta) * z1,
    theta the angle between z0[b] and z1[b]. High-dimensional Gaussian noise lives near a sphere;
    unlike lerp (whose midpoint has norm about 0.71 x), slerp keeps the norm there, so every
    interpolant still looks like noise to the model. Nearly parallel pairs fall back to lerp.
    """
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    if z0.dim() < 1:
        raise ValueError("z0 and z1 must have a batch dimension: (B, ...)")
    batch, rest = z0.shape[0], z0.shape[1:]
    # float64 on the CPU (Apple's MPS has no float64); the result goes back to z0's device and dtype
    a = torch.as_tensor(alpha, dtype=torch.float64, device="cpu").reshape(-1, 1)  # (N, 1)
    v0 = z0.reshape(batch, -1).to("cpu", torch.float64)
    v1 = z1.reshape(batch, -1).to("cpu", torch.float64)
    n0, n1 = v0.norm(dim=1, keepdim=True), v1.norm(dim=1, keepdim=True)
    cos = ((v0 * v1).sum(dim=1, keepdim=True) / (n0 * n1).clamp_min(1e-30)).clamp(-1.0, 1.0)
    theta = torch.acos(cos)  # (B, 1)
    sin = torch.sin(theta)
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    w0 = torch.where(parallel, 1.0 - a, torch.sin((1.0 - a) * theta) / safe)
    w1 = torch.where(parallel, a + 0.0 * theta, torch.sin(a * theta) / safe)
    out = w0 * v0 + w1 * v1
    return out.to(z0.device, z0.dtype).reshape(out.shape[0], *rest)
