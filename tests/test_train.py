"""The trainer: exact resume, AMP really engaged, atomic checkpoints, clear errors, DDP on CPU."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import TensorDataset

import ddpm_nb.train as train_mod
from ddpm_nb.config import ConfigError, preset
from ddpm_nb.diffusion import drop_labels
from ddpm_nb.checkpoint import load_checkpoint
from ddpm_nb.train import EMA, Trainer, TrainingDivergedError, cpu_native_bf16, due, lr_factor, resolve_amp


def _data(n=64, channels=1, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g) * 2 - 1
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(x, y)


def _cfg(**over):
    base = {"train.steps": 8, "train.ckpt_every": 4, "train.sample_every": 4, "train.eval_every": 4,
            "train.log_every": 2, "train.num_samples": 4, "train.sample_steps": 3, "train.batch_size": 8,
            "train.ema_decay": 0.9, "unet.dropout": 0.1, "data.hflip": True}
    base.update(over)
    return preset("tiny", **base)


def _trainer(tmp_path, cfg=None, resume=False, **kw):
    return Trainer(cfg or _cfg(), run_dir=tmp_path / "run", device="cpu", resume=resume, progress=False,
                   train_dataset=_data(), val_dataset=_data(16, seed=1), **kw)


def _assert_same_state(a: Trainer, b: Trainer):
    for (n1, p1), (n2, p2) in zip(a.raw_model.state_dict().items(), b.raw_model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    for p1, p2 in zip(a.ema.model.parameters(), b.ema.model.parameters()):
        assert torch.equal(p1, p2)
    s1, s2 = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for k in s1:
        assert torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"])
    assert a.step == b.step and a.micro_batches_seen == b.micro_batches_seen
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr()


class _Plain(torch.utils.data.Dataset):
    """A dataset that is not a TensorDataset: with data.in_memory=False it goes through a DataLoader."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "dataloader"])
def test_resume_equals_uninterrupted_run(tmp_path, in_memory):
    """2N steps straight == N steps, a fresh process-like Trainer resumed from disk, N more steps.

    Uses dropout, random flips, EMA, grad accumulation and an epoch boundary (64 images, batch 8
    in 2 micro-batches of 4: 16 micro-batches per epoch; 8 steps = 16 micro-batches... plus eval
    and sampling in between), so every source of randomness must be restored exactly.
    """
    cfg = _cfg(**{"train.steps": 10, "train.grad_accum": 2, "train.ckpt_every": 5, "data.in_memory": in_memory})
    wrap = (lambda ds: ds) if in_memory else _Plain
    straight = Trainer(cfg, run_dir=tmp_path / "a", device="cpu", progress=False,
                       train_dataset=wrap(_data()), val_dataset=_data(16, seed=1))
    assert (straight.batches._tensors is not None) == in_memory
    straight.train()
    first = Trainer(cfg, run_dir=tmp_path / "b", device="cpu", progress=False,
                    train_dataset=wrap(_data()), val_dataset=_data(16, seed=1))
    first.train(until=5)
    torch.manual_seed(999)  # disturb the global RNG: resume must restore it
    resumed = Trainer(cfg, run_dir=tmp_path / "b", device="cpu", progress=False, resume=True,
                      train_dataset=wrap(_data()), val_dataset=_data(16, seed=1))
    assert resumed.step == 5
    resumed.train()
    _assert_same_state(straight, resumed)
    # the logs agree too, with no duplicated rows
    log_a = (tmp_path / "a" / "log.csv").read_text()
    log_b = (tmp_path / "b" / "log.csv").read_text()
    steps = [line.split(",")[0] for line in log_b.splitlines()[1:]]
    assert steps == sorted(set(steps), key=int)
    rows_a = {l.split(",")[0]: l.split(",")[1] for l in log_a.splitlines()[1:]}
    rows_b = {l.split(",")[0]: l.split(",")[1] for l in log_b.splitlines()[1:]}
    assert set(rows_b) - set(rows_a) == {"5"}  # the interrupted run also logged where it stopped
    assert all(rows_a[k] == rows_b[k] for k in rows_a)


def test_bf16_autocast_really_engages_and_loss_stays_fp32(tmp_path):
    cfg = _cfg(**{"train.amp": "bf16", "train.steps": 2})
    tr = _trainer(tmp_path, cfg)
    assert tr.amp_dtype == torch.bfloat16 and not tr.scaler.is_enabled()
    seen = []

    def record(module, inputs, output):
        seen.append(output.dtype)

    tr.raw_model.conv_in.register_forward_hook(record)
    tr.raw_model.down[0].res[0].conv2.register_forward_hook(record)
    original = tr.diffusion.training_losses
    losses = []

    def spy(*a, **k):
        out = original(*a, **k)
        losses.append(out.dtype)
        return out

    tr.diffusion.training_losses = spy
    out = tr.train_step(tr.batches.stream(tr.micro_batches_seen))
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert losses == [torch.float32]
    assert all(p.dtype == torch.float32 for p in tr.raw_model.parameters())  # master weights stay fp32
    assert torch.isfinite(out["loss"])


def test_fp16_uses_a_grad_scaler(tmp_path):
    dtype, use_scaler = resolve_amp("fp16", torch.device("cpu"))
    assert dtype == torch.float16 and use_scaler
    tr = _trainer(tmp_path, _cfg(**{"train.amp": "fp16", "train.steps": 2}))
    assert tr.scaler.is_enabled()
    scaled, real_scale = [], tr.scaler.scale
    tr.scaler.scale = lambda loss: scaled.append(loss.detach().clone()) or real_scale(loss)
    tr.train_step(tr.batches.stream(tr.micro_batches_seen))
    assert len(scaled) == 1                      # the loss went through the scaler before backward
    assert math.isfinite(tr.scaler.get_scale()) and tr.scaler.get_scale() >= 1.0
    assert resolve_amp("off", torch.device("cpu")) == (None, False)


@pytest.mark.parametrize("native", ["0", "1"])
def test_amp_auto_on_cpu_follows_native_bf16(monkeypatch, native):
    """auto = bf16 on a CPU with bf16 in hardware (about 1.7x faster there), fp32 on one without."""
    monkeypatch.setenv("DDPM_NB_CPU_BF16", native)
    want = (torch.bfloat16, False) if native == "1" else (None, False)
    assert resolve_amp("auto", torch.device("cpu")) == want
    assert resolve_amp("auto", torch.device("mps")) == (None, False)


def test_cpu_native_bf16_reads_the_cpu(monkeypatch):
    monkeypatch.delenv("DDPM_NB_CPU_BF16", raising=False)
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    if not flags:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert cpu_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_lr_schedule_warmup_then_cosine():
    kw = dict(warmup=10, total=110, schedule="cosine", min_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, **kw) == pytest.approx(0.1)
    assert lr_factor(50, warmup=0, total=100, schedule="constant", min_ratio=0.1) == 1.0


def test_ema_follows_its_formula():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.75, start=2, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=1)                    # before start: a copy
    assert torch.equal(ema.model.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, step=2)                    # 0.75 * 1 + 0.25 * 3 (decay and 1 - decay swapped would give 2.5)
    assert torch.allclose(ema.model.weight, torch.full((2, 2), 1.5))
    warm = EMA(model, decay=0.9999, warmup=True)
    assert warm.current_decay(0) == pytest.approx(0.1)


def test_existing_run_is_never_overwritten(tmp_path):
    _trainer(tmp_path, _cfg(**{"train.steps": 2})).train()
    with pytest.raises(FileExistsError, match="--resume"):
        _trainer(tmp_path, _cfg(**{"train.steps": 2}))


def test_wrong_channels_for_the_data(tmp_path):
    with pytest.raises(ConfigError, match="in_channels=1 but the dataset"):
        Trainer(_cfg(), run_dir=tmp_path / "r", device="cpu", progress=False,
                train_dataset=_data(channels=3), val_dataset=_data(8, channels=3))


@pytest.mark.parametrize("amp", ["off", "fp16"], ids=["deferred-check", "immediate-check"])
def test_nan_loss_stops_with_step_and_checkpoint(tmp_path, amp):
    """fp32/bf16 with the fused AdamW: checked on the device, raised at the next log step; fp16 (GradScaler)
    checks at once. Either way no weight and no optimizer state changes from the non-finite step on."""
    tr = _trainer(tmp_path, _cfg(**{"train.steps": 12, "train.log_every": 3, "train.amp": amp}))
    assert tr._deferred_guard == (amp == "off")
    tr.train(until=4)
    before = [p.clone() for p in tr.raw_model.parameters()]
    adam_before = {k: v["exp_avg_sq"].clone() for k, v in tr.optimizer.state_dict()["state"].items()}
    with torch.no_grad():
        tr.raw_model.conv_out.bias.fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match=r"nan at step 4.*Last good checkpoint: .*step_0000004.pt"):
        tr.train()
    assert tr.step == (6 if amp == "off" else 4)  # the deferred check fires at the log step 6
    assert all(torch.equal(a, b) for a, b in zip(before[:-2], list(tr.raw_model.parameters())[:-2]))
    for k, v in tr.optimizer.state_dict()["state"].items():
        assert torch.equal(v["exp_avg_sq"], adam_before[k])
    assert not (tmp_path / "run" / "checkpoints" / "step_0000008.pt").exists()


def test_unwritable_results_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="cannot write to the run folder"):
        Trainer(_cfg(), run_dir=blocker / "run", device="cpu", progress=False, train_dataset=_data(),
                val_dataset=_data(8))


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.utils.data import TensorDataset
    from ddpm_nb.config import preset
    from ddpm_nb.train import Trainer
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.rand(64, 1, 16, 16, generator=g) * 2 - 1, torch.zeros(64, dtype=torch.long))
    cfg = preset("tiny", **{"train.steps": 4, "train.batch_size": 8, "train.ckpt_every": 2, "train.sample_every": 4,
                           "train.eval_every": 4, "train.num_samples": 4, "train.sample_steps": 2})
    tr = Trainer(cfg, run_dir=sys.argv[1], device="cpu", progress=False, train_dataset=ds, val_dataset=ds)
    assert tr.world == 2 and tr.micro_batch == 4
    tr.train()
    flat = torch.cat([p.flatten() for p in tr.ema.model.parameters()])
    online = torch.cat([p.flatten() for p in tr.raw_model.parameters()])
    both = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    assert torch.equal(both[0], both[1]), "EMA differs across ranks"
    dist.all_gather(both, online)
    assert torch.equal(both[0], both[1]), "weights differ across ranks"
    print(f"rank {tr.rank} ok step {tr.step}")
    tr.close()
""")


@pytest.mark.slow
def test_ddp_two_cpu_processes_gloo(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(run_dir)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "rank 0 ok step 4" in proc.stdout and "rank 1 ok step 4" in proc.stdout
    # rank 0 alone wrote the run folder
    assert (run_dir / "checkpoints" / "latest.pt").exists()
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["step"] == 4
    rows = (run_dir / "log.csv").read_text().splitlines()
    assert len(rows) == 1 + len({r.split(",")[0] for r in rows[1:]})


def test_resume_applies_changed_hyperparameters_and_says_so(tmp_path, capsys):
    """--resume --train.lr 1e-5 trains with 1e-5 (not the old lr the optimizer state holds), says so
    in one line, and the config written is the one that ran."""
    import yaml

    fixed = {"train.steps": 8, "train.warmup_steps": 0, "train.lr_schedule": "constant"}
    _trainer(tmp_path, _cfg(**fixed)).train(until=4)
    new = _cfg(**fixed, **{"train.lr": 1e-5, "train.weight_decay": 0.01, "train.betas": [0.8, 0.99]})
    tr = _trainer(tmp_path, new, resume=True)
    group = tr.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(1e-5) and group["weight_decay"] == 0.01 and group["betas"] == (0.8, 0.99)
    err = capsys.readouterr().err
    assert "train.lr: 0.001 -> 1e-05" in err and "train.betas" in err and len(err.strip().splitlines()) == 1
    tr.train()
    assert [r["lr"] for r in tr.history if r["step"] > 4] == pytest.approx([1e-5] * 2)  # log_every=2
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["lr"] == 1e-5
    assert load_checkpoint(tmp_path / "run")["config"]["train"]["lr"] == 1e-5


@pytest.mark.parametrize("before, after", [("off", "fp16"), ("fp16", "off")])
def test_resume_may_switch_amp(tmp_path, before, after):
    _trainer(tmp_path, _cfg(**{"train.amp": before})).train(until=4)
    tr = _trainer(tmp_path, _cfg(**{"train.amp": after}), resume=True)
    assert tr.scaler.is_enabled() == (after == "fp16")
    tr.train()
    assert tr.step == 8 and load_checkpoint(tmp_path / "run")["config"]["train"]["amp"] == after


def test_resume_without_a_run_starts_fresh_and_says_so(tmp_path, capsys):
    tr = _trainer(tmp_path, resume=True)
    assert tr.step == 0
    assert "no run to resume" in capsys.readouterr().err


def test_unattended_log_has_one_line_per_interval_with_the_interval_mean(tmp_path, capsys):
    """Output to a file: one plain line per log interval (step, mean loss, lr, images/s, ETA) plus the
    validation loss and checkpoint saves, never a line per step; the logged loss is the interval's mean."""
    cfg = _cfg(**{"train.steps": 12, "train.log_every": 4, "train.eval_every": 6, "train.ckpt_every": 6,
                  "train.sample_every": 0})
    tr = Trainer(cfg, run_dir=tmp_path / "run", device="cpu", progress="lines", train_dataset=_data(),
                 val_dataset=_data(16, seed=1))
    per_step = []
    step = tr.train_step
    tr.train_step = lambda batches: per_step.append(step(batches)) or per_step[-1]
    tr.train()
    lines = capsys.readouterr().out.splitlines()
    import re
    logged = [l for l in lines if "| loss " in l]
    assert len(logged) == 3 and len(lines) <= 3 + 2 + 2 + 1, lines   # 3 intervals, 2 val, 2 checkpoints, samples
    assert re.fullmatch(r"step +4/12 \| loss \d\.\d{4} \| lr \d\.\d\de-\d\d \| [\d,]+ img/s \| ETA \d:\d\d:\d\d",
                        logged[0]), logged[0]
    assert any(re.fullmatch(r"step +6/12 \| val loss \d\.\d{4} \(EMA weights \d\.\d{4}\)", l) for l in lines), lines
    assert any(l.startswith("step 12/12 | checkpoint ") and l.endswith(".pt") for l in lines), lines
    means = [sum(float(o["loss"]) for o in per_step[i:i + 4]) / 4 for i in (0, 4, 8)]
    assert [r["loss"] for r in tr.history] == pytest.approx(means, rel=1e-6)
    assert tr.history[0]["loss"] != pytest.approx(float(per_step[3]["loss"]), rel=1e-6), "not the last batch's loss"


def test_progress_mode_follows_the_output(monkeypatch):
    from ddpm_nb.utils import progress_mode

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stdout", Stream(False))
    monkeypatch.setattr(sys, "stderr", Stream(True))
    assert progress_mode(True) == "lines" and progress_mode("auto") == "lines"
    monkeypatch.setattr(sys, "stdout", Stream(True))
    assert progress_mode(True) == "bar"
    assert progress_mode(False) == "off" and progress_mode("lines") == "lines"
    monkeypatch.setattr(sys, "stdout", Stream(False))
    monkeypatch.setitem(sys.modules, "ipykernel", object())   # a notebook: the widget bar
    assert progress_mode(True) == "bar"
    with pytest.raises(ValueError, match="progress"):
        progress_mode("loud")
# ---- fast paths (issue 13) -------------------------------------------------------------------
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402


class _Ops(TorchDispatchMode):
    """Calls `on_op(name, outputs)` for every aten op."""

    def __init__(self, on_op):
        super().__init__()
        self.on_op = on_op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.on_op(func.overloadpacket.__name__, [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def test_step_loop_reads_the_device_only_at_log_intervals(tmp_path):
    """`.item()`/`float()` of a tensor (aten._local_scalar_dense) waits for a GPU. None inside train_step,
    and in the loop only at log rows (steps 3, 6) and at the end (8), which also evaluates and checkpoints."""
    tr = _trainer(tmp_path, _cfg(**{"train.steps": 8, "train.log_every": 3, "train.eval_every": 0,
                                    "train.sample_every": 0, "train.ckpt_every": 0}))
    where, in_step = [], [False]
    original = tr.train_step

    def step(batches):
        in_step[0] = True
        try:
            return original(batches)
        finally:
            in_step[0] = False

    tr.train_step = step

    def on_op(name, outs):
        if name == "_local_scalar_dense":
            where.append(("train_step" if in_step[0] else "loop", tr.step))

    with _Ops(on_op):
        tr.train(until=7)
    assert [w for w in where if w[0] == "train_step"] == []
    assert {s for _, s in where} == {3, 6, 7}  # log rows and the end of this call (a log row too)
    assert [r["step"] for r in tr.history] == [3, 6, 7] and all(type(r["loss"]) is float for r in tr.history)


def test_adamw_is_fused_on_the_cpu_and_cudnn_benchmark_on_cuda(tmp_path, monkeypatch):
    tr = _trainer(tmp_path)
    assert tr.optimizer.defaults["fused"] is True and tr._deferred_guard
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    train_mod._set_cudnn_benchmark(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    train_mod._set_cudnn_benchmark(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True


@pytest.mark.parametrize("weights,amp,native", [("both", "auto", "1"), ("ema", "auto", "0"), ("online", "off", "1")])
def test_sample_grids_follow_the_config(tmp_path, monkeypatch, weights, amp, native):
    monkeypatch.setenv("DDPM_NB_CPU_BF16", native)
    cfg = _cfg(**{"train.sample_weights": weights, "train.sample_amp": amp, "train.sample_steps": 6,
                  "train.preview_steps": 2, "train.steps": 4, "train.sample_every": 2})
    tr = _trainer(tmp_path, cfg)
    calls = []
    original = tr.sample

    def spy(*a, **kw):
        calls.append((tr.step, kw["ema"], kw["steps"], kw["dtype"]))
        return original(*a, **kw)

    tr.sample = spy
    tr.train()
    dtype = torch.bfloat16 if (amp, native) == ("auto", "1") else None
    emas = {"both": [False, True], "ema": [True], "online": [False]}[weights]
    assert calls == [(2, e, 2, dtype) for e in emas] + [(4, e, 6, dtype) for e in emas]
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 2 * len(emas)
    with pytest.raises(ConfigError, match="sample_weights"):
        _cfg(**{"train.sample_weights": "all"})
    with pytest.raises(ConfigError, match="sample_amp"):
        _cfg(**{"train.sample_amp": "bf16"})


def test_trainer_sample_grid_puts_no_float64_on_the_device(tmp_path):
    """MPS has no float64; the trainer's grid, with its weights moved to the 'meta' device, creates none there."""
    tr = _trainer(tmp_path, _cfg(**{"unet.num_classes": 10, "data.class_cond": True}))
    tr.device = torch.device("meta")
    tr.ema.model.to("meta")
    tr.raw_model.to("meta")
    tr.diffusion.to("meta")
    bad, devices = [], set()

    def on_op(name, outs):
        devices.update(t.device.type for t in outs)
        bad.extend(name for t in outs if t.dtype == torch.float64 and t.device.type != "cpu")

    with _Ops(on_op):
        tr.sample(2, steps=3)
        tr.sample(2, ema=False, method="ddpm")
    assert "meta" in devices and bad == []


def test_one_rule_for_periodic_work():
    assert [s for s in range(1, 11) if due(s, 4)] == [4, 8]
    assert [s for s in range(1, 11) if due(s, 0)] == []            # 0: never ...
    assert due(7, 0, end=True) and due(7, 4, end=True)             # ... except at the end


def test_log_every_zero_logs_once_at_the_end(tmp_path):
    tr = _trainer(tmp_path, _cfg(**{"train.log_every": 0, "train.eval_every": 0, "train.sample_every": 0}))
    rows = tr.train()
    assert [r["step"] for r in rows] == [8]
    assert rows[0]["loss"] == pytest.approx(sum(float(v) for v in [rows[0]["loss"]]))
    assert [r["step"] for r in tr.val_history] == [8]                # eval 0: only at the final step
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == \
        ["step_0000008_ema.png", "step_0000008_online.png"]


def test_the_trainer_drops_labels_with_the_configured_probability(tmp_path):
    cfg = _cfg(**{"data.class_cond": True, "unet.num_classes": 10, "train.label_dropout": 0.5,
                  "data.hflip": False})
    tr = _trainer(tmp_path, cfg)
    x, y = _data(4096)[:]
    state = tr.gen.get_state()
    _, dropped = tr._prepare(x, y)
    tr.gen.set_state(state)
    expected = drop_labels(y, 0.5, 10, tr.gen)                       # the same generator state: the same draw
    assert torch.equal(dropped, expected)
    frac = (dropped == 10).float().mean().item()
    assert 0.47 < frac < 0.53                                        # 4096 draws: 3 sigma is 0.023
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])
    with pytest.raises(ConfigError, match=r"TrainConfig.label_dropout: must be in \[0, 1\)"):
        _cfg(**{"train.label_dropout": 1.0})
