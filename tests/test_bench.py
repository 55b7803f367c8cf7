"""The benchmark: JSON lines, FLOP counts against hand counts, naive attention == SDPA, peers optional.

No timing assertions: the machines that run this are shared and noisy.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ sits beside the package, not inside it

import benchmarks.bench as bench  # noqa: E402
import ddpm_nb.unet as unet_mod
from ddpm_nb.config import UNetConfig
from ddpm_nb.diffusion import GaussianDiffusion
from ddpm_nb.unet import AttentionBlock, UNet

FIELDS = {"bench", "preset", "image_size", "batch", "setting", "images_per_s", "peak_mem_mb", "flops_per_image",
          "mfu", "device", "torch", "timestamp"}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine a second OpenMP thread that waits for a busy core makes
    these small models ~100x slower (and the benchmark's --threads 1 does the same for its own runs)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_quick_train_ladder_writes_json_lines_and_a_table(tmp_path, capsys):
    out, md = tmp_path / "bench" / "x.jsonl", tmp_path / "table.md"
    assert bench.main(["--what", "train", "--quick", "--device", "cpu", "--threads", "1", "--no-progress",
                       "--out", str(out), "--markdown", str(md)]) == 0
    rows = _lines(out)
    assert [r["setting"] for r in rows] == [r.name for r in bench.LADDER]
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert (r["bench"], r["preset"], r["image_size"], r["batch"], r["device"]) == ("train", "tiny", 16, 4, "cpu")
        assert r["flops_per_image"] > 0 and r["torch"] == torch.__version__
    measured = [r for r in rows if not r.get("skipped")]
    assert [r["setting"] for r in measured] == ["fp32", "bf16", "channels_last", "sdpa"]
    for r in measured:
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["mfu"] is None  # no known peak on a CPU
    assert [r["attention"] for r in measured] == ["naive", "naive", "naive", "sdpa"]
    assert [r["sdpa_kernel"] for r in measured] == [None, None, None, "flash (CPU)"]  # a fused kernel ran
    assert [r["amp"] for r in measured] == ["fp32", "bf16", "bf16", "bf16"]
    skipped = {r["setting"]: r["skipped"] for r in rows if r.get("skipped")}
    assert set(skipped) == {"compile", "cudagraphs"} and all(skipped.values())
    # the same lines on stdout, then the Markdown table (also written to --markdown)
    printed = capsys.readouterr().out
    assert [json.loads(line) for line in printed.splitlines() if line.startswith("{")] == rows
    table = md.read_text()
    assert "| tiny | 16 | 4 | fp32 |" in table and "CUDA graphs need a CUDA device" in table
    # --report renders old lines without measuring anything
    assert bench.main(["--report", str(out)]) == 0
    assert "| tiny | 16 | 4 | sdpa |" in capsys.readouterr().out


def test_repeats_report_the_median_run(tmp_path):
    out = tmp_path / "r.jsonl"
    assert bench.main(["--what", "train", "--quick", "--device", "cpu", "--threads", "1", "--no-progress",
                       "--settings", "fp32", "--repeats", "3", "--iters", "1", "--out", str(out)]) == 0
    (row,) = _lines(out)
    runs = row["images_per_s_runs"]
    assert row["repeats"] == 3 and len(runs) == 3 and row["images_per_s"] == sorted(runs)[1]


def test_the_benchmark_is_a_script_beside_the_package_not_a_subcommand():
    import ddpm_nb
    import ddpm_nb.__main__ as cli

    assert not (Path(ddpm_nb.__file__).parent / "bench.py").exists()
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])  # argparse: invalid choice
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--help"], capture_output=True,
                          text=True, cwd="/", timeout=120)
    assert done.returncode == 0 and "usage: python benchmarks/bench.py" in done.stdout


def test_bad_arguments_are_reported_not_raised(capsys):
    for flag, value in [("--batch", "0"), ("--iters", "0"), ("--warmup", "-1"), ("--threads", "0"),
                        ("--gif-frames", "0"), ("--repeats", "0")]:
        assert bench.main(["--quick", "--device", "cpu", flag, value, "--out", "-"]) == 2
        assert f"{flag} must be >=" in capsys.readouterr().err
    assert bench.main(["--quick", "--device", "cpu", "--presets", "ddpm-cifar10", "--image-size", "20",
                       "--out", "-"]) == 2
    assert "image_size=20" in capsys.readouterr().err


def test_conv_flops_equal_the_hand_count():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    with FlopCounterMode(display=False) as fc:
        conv(x)
    assert fc.get_total_flops() == 2 * 3 * 8 * 3 * 3 * 16 * 16 * 2  # 2 * Cin * Cout * k * k * H * W * B


def _hand_count_forward(model: UNet, x: torch.Tensor, t: torch.Tensor) -> int:
    """Multiply-adds x 2 of every conv, linear layer and attention matmul, from the shapes seen in forward."""
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        total += 2 * (m.in_channels // m.groups) * m.out_channels * k * out.numel() // m.out_channels

    def linear_hook(m, inp, out):
        nonlocal total
        total += 2 * m.in_features * m.out_features * inp[0].shape[0]

    def attn_hook(m, inp, out):  # Q K^T and (weights) V: 2 * B * L * L * C each
        nonlocal total
        b, c, h, w = inp[0].shape
        total += 2 * 2 * b * (h * w) ** 2 * c

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, AttentionBlock):
            hooks.append(m.register_forward_hook(attn_hook))
    with torch.no_grad():
        model(x, t)
    for h in hooks:
        h.remove()
    return total


def test_unet_flops_match_an_independent_count_and_scale_with_batch():
    torch.manual_seed(0)
    model, diffusion = UNet(UNetConfig.tiny()), GaussianDiffusion()
    x0 = torch.rand(2, 1, 16, 16) * 2 - 1
    flops = bench.count_flops(model, diffusion, x0)
    assert flops["forward"] == _hand_count_forward(model, x0, torch.zeros(2, dtype=torch.long))
    # backward costs two forwards, except the input gradient of the first conv (x_t needs none)
    assert 2.9 * flops["forward"] < flops["train"] <= 3 * flops["forward"]
    one = bench.count_flops(model, diffusion, x0[:1])
    three = bench.count_flops(model, diffusion, torch.rand(3, 1, 16, 16) * 2 - 1)
    assert 2 * one["train"] == flops["train"] and 3 * one["train"] == three["train"]
    # the written-out attention and SDPA count the same FLOPs
    assert bench.count_flops(model, diffusion, x0, sdpa=True) == flops


def test_naive_attention_really_switches_the_path_and_matches_sdpa(monkeypatch):
    calls = []
    real = bench.naive_scaled_dot_product_attention

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(bench._FunctionalWithNaiveAttention, "scaled_dot_product_attention", staticmethod(spy))
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny(attn_head_channels=8)).eval()  # 4 heads of 8 channels at 8x8 (and the middle)
    x, t = torch.randn(3, 1, 16, 16), torch.randint(0, 1000, (3,))
    sdpa_functional = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        expected = model(x, t)
        assert not calls
        with bench.naive_attention():
            assert unet_mod.F.scaled_dot_product_attention is not sdpa_functional
            assert torch.nn.functional.scaled_dot_product_attention is sdpa_functional  # others untouched
            got = model(x, t)
        assert unet_mod.F is torch.nn.functional  # restored
        n_attn = sum(isinstance(m, AttentionBlock) for m in model.modules())
        assert len(calls) == n_attn and calls[0] == (3, 4, 64, 8)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with bench.naive_attention(enabled=False):
            model(x, t)
        assert len(calls) == n_attn


def test_naive_attention_equals_sdpa_in_bf16_autocast():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    torch.testing.assert_close(bench.naive_scaled_dot_product_attention(q, k, v),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = bench.naive_scaled_dot_product_attention(q, k, v)
        fused = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(naive.float(), fused.float(), rtol=3e-2, atol=3e-2)
    with pytest.raises(NotImplementedError):
        bench.naive_scaled_dot_product_attention(q, k, v, is_causal=True)


def test_peak_table(monkeypatch):
    cpu = torch.device("cpu")
    assert bench.device_peak_tflops(cpu, "bf16") == (None, "n/a")
    assert bench.device_peak_tflops(cpu, "bf16", override=123.0) == (123.0, "--peak-tflops")
    cuda = torch.device("cuda")
    for name, bf16 in [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H200", 989.4),
                       ("NVIDIA A100-SXM4-80GB", 312.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert bench.device_peak_tflops(cuda, "bf16")[0] == bf16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GeForce GTX 1080")
    peak, source = bench.device_peak_tflops(cuda, "bf16")
    assert peak is None and "--peak-tflops" in source


def test_peers_are_skipped_with_a_note_when_not_installed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "_installed", lambda module: False)
    out = tmp_path / "p.jsonl"
    assert bench.main(["--what", "peers", "--quick", "--device", "cpu", "--threads", "1", "--no-progress",
                       "--out", str(out)]) == 0
    rows = _lines(out)
    assert {r["model"]: r.get("skipped") for r in rows if r.get("skipped")} == {
        "diffusers.UNet2DModel": "diffusers not installed",
        "denoising_diffusion_pytorch.Unet": "denoising_diffusion_pytorch not installed"}
    ours = [r for r in rows if r["model"] == "ddpm_nb.UNet"]
    assert [r["setting"] for r in ours] == ["sdpa"] and ours[0]["images_per_s"] > 0
    assert "diffusers is not installed" in capsys.readouterr().err


def test_diffusers_peer_is_the_ddpm_cifar10_network():
    pytest.importorskip("diffusers")
    from ddpm_nb.unet import count_parameters

    cfg = UNetConfig.ddpm_cifar10()
    assert count_parameters(bench.diffusers_unet(cfg)) == count_parameters(UNet(cfg))  # 35.7M both
    tiny = bench.diffusers_unet(UNetConfig.tiny())
    assert tiny(torch.randn(2, 1, 16, 16), torch.tensor([3, 7])).shape == (2, 1, 16, 16)


def test_lucidrains_peer_runs_like_ours():
    pytest.importorskip("denoising_diffusion_pytorch")
    net = bench.lucidrains_unet(UNetConfig.tiny())
    assert net(torch.randn(2, 1, 16, 16), torch.tensor([3, 7])).shape == (2, 1, 16, 16)
