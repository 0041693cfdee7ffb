"""The training tool: schedule, data order, losses, checkpoints, resume, signals,
non-finite stops, distributed training, and the demo end to end (tiny settings)."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from rmi_triton import RMILoss
from rmi_triton.checkpoint import load_checkpoint, save_checkpoint
import rmi_triton.train as train_module
from rmi_triton.train import (bce_pixel_loss, capture_rng, epoch_order, iterations_per_epoch, parse_args,
                              poly_lr, restore_rng, run)

# module-wide fixtures: under pytest-xdist this file runs whole in one worker (conftest.WHOLE_FILES)

# A tiny run: DeepLabv3+ ResNet-18 on 32 x 32 scenes, batch 2; 6 scenes -> 3 iterations per epoch,
# so 6 iterations cross an epoch boundary. Augmentation on: its RNG must be reproducible too.
TINY = ["--model", "deeplabv3plus", "--backbone", "resnet18", "--dataset", "synthetic", "--crop", "32",
        "--batch-size", "2", "--train-length", "6", "--val-length", "2", "--iterations", "6",
        "--augment", "--threads", "2", "--no-progress", "--log-every", "1", "--seed", "3"]


def _args(out, *extra):
    return parse_args(TINY + ["--out", str(out), *extra])


def _quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run (RMI loss, 6 iterations)."""
    out = tmp_path_factory.mktemp("straight")
    result = run(_args(out, "--no-final-eval"), log=_quiet)
    assert result["status"] == "done" and result["iteration"] == 6
    return result


def _assert_same_run(result, reference):
    assert result["iteration"] == reference["iteration"]
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-6, atol=1e-7)
    ref_state = reference["model"].state_dict()
    for name, value in result["model"].state_dict().items():
        torch.testing.assert_close(value, ref_state[name], rtol=1e-6, atol=1e-7, msg=name)


def test_poly_schedule():
    assert poly_lr(0.007, 0, 100) == pytest.approx(0.007)
    assert poly_lr(0.007, 50, 100) == pytest.approx(0.007 * 0.5 ** 0.9)
    assert poly_lr(0.007, 99, 100) == pytest.approx(0.007 * 0.01 ** 0.9)


def test_epoch_order_is_seeded_and_sharded():
    a = epoch_order(10, seed=1, epoch=0)
    assert sorted(a) == list(range(10)) and a == epoch_order(10, seed=1, epoch=0)
    assert a != epoch_order(10, seed=1, epoch=1)
    shards = [epoch_order(10, seed=1, epoch=2, rank=r, world=3) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # ceil(10 / 3), padded by wrapping
    assert set().union(*shards) == set(range(10))
    even = [epoch_order(12, seed=1, epoch=2, rank=r, world=3) for r in range(3)]
    assert sorted(sum(even, [])) == list(range(12))  # disjoint shards of one permutation
    assert iterations_per_epoch(10, 2, world=3) == 2
    with pytest.raises(ValueError):
        iterations_per_epoch(3, 4)


def test_bce_loss_is_the_rmi_pixel_term():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 16)
    labels = torch.randint(0, 4, (2, 16, 16))
    labels[0, :3] = 255
    expected = RMILoss(4, rmi_weight=1.0).terms(logits, labels).pixel
    torch.testing.assert_close(bce_pixel_loss(logits, labels), expected, rtol=1e-5, atol=1e-6)


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    import random

    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = capture_rng()
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.zeros(1)}, {"name": "x", "num_classes": 2, "backbone": "b",
                                                  "output_stride": 16}, rng=state)
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng(load_checkpoint(path)["rng"])
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_interrupted_and_resumed_run_matches_straight_run(straight, tmp_path):
    first = run(_args(tmp_path, "--no-final-eval", "--stop-at", "3"), log=_quiet)
    assert first["status"] == "stopped" and first["iteration"] == 3
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 3 and ckpt["config"]["backbone"] == "resnet18"
    assert "loss" not in " ".join(k for k in ckpt if k != "losses")  # no loss state stored
    # the second half loads through a worker process: data must not depend on who loads it
    second = run(_args(tmp_path, "--resume", str(tmp_path / "last.pt"), "--workers", "1"), log=_quiet)
    assert second["status"] == "done"
    _assert_same_run(second, straight)
    m = second["metrics"]
    assert 0.0 <= m["miou"] <= 1.0 and len(m["iou"]) == 5 and 0.0 <= m["boundary_f"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["iteration"] == 6


def test_same_seed_gives_the_same_loss_curve_bitwise(straight, tmp_path):
    """Determinism on CPU: a second run with the same seed repeats the first exactly."""
    again = run(_args(tmp_path, "--no-final-eval"), log=_quiet)
    assert again["losses"] == straight["losses"]
    for name, value in again["model"].state_dict().items():
        assert torch.equal(value, straight["model"].state_dict()[name]), name


def test_seeds_do_not_share_data_orders(tmp_path, monkeypatch):
    """Orders seeded by seed + epoch gave run 1 the orders of run 0 one epoch late; a
    checkpoint written before train_config said how its orders go resumes them (its next
    batches are the ones its run would have drawn)."""
    assert epoch_order(2000, seed=1, epoch=0) != epoch_order(2000, seed=0, epoch=1)
    legacy = epoch_order(50, seed=1, epoch=0, data_order=1)
    assert legacy == torch.randperm(50, generator=torch.Generator().manual_seed(1)).tolist()
    monkeypatch.setattr(train_module, "DATA_ORDER", 1)  # a run of the versions before
    before = run(_args(tmp_path / "before", "--no-final-eval"), log=_quiet)
    run(_args(tmp_path / "old", "--no-final-eval", "--stop-at", "4"), log=_quiet)  # past epoch 0's 3
    path = tmp_path / "old" / "last.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["train_config"].pop("data_order") == 1  # as those checkpoints were written
    torch.save(state, path)
    monkeypatch.setattr(train_module, "DATA_ORDER", 2)
    resumed = run(_args(tmp_path / "old", "--no-final-eval", "--resume", str(path)), log=_quiet)
    _assert_same_run(resumed, before)


def test_resume_refuses_a_different_schedule(tmp_path):
    run(_args(tmp_path, "--no-final-eval", "--stop-at", "1"), log=_quiet)
    with pytest.raises(SystemExit, match="batch_size"):
        run(parse_args(TINY[:-8] + ["--batch-size", "3", "--out", str(tmp_path), "--resume",
                                    str(tmp_path / "last.pt")]), log=_quiet)
    # the learning rate, the optimizer's settings, the precision and the loss's options went
    # unchecked (a resumed run took --lr 0.5 without a word); the engine may change
    path = str(tmp_path / "last.pt")
    for flags, named in ((["--lr", "0.5"], "lr 0.007 -> 0.5"), (["--momentum", "0.5"], "momentum 0.9 -> 0.5"),
                         (["--amp"], "amp False -> True"), (["--rmi-radius", "2"], "rmi_radius 3 -> 2"),
                         (["--rmi-pixel-loss", "none"], "rmi_pixel_loss 'bce' -> 'none'")):
        with pytest.raises(SystemExit, match=re.escape(named)):
            run(_args(tmp_path, "--no-final-eval", "--resume", path, *flags), log=_quiet)
    run(_args(tmp_path, "--no-final-eval", "--resume", path, "--stop-at", "2", "--rmi-backend", "torch"),
        log=_quiet)
    # a checkpoint from before these were saved is not held to them
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("momentum", "weight_decay", "amp", "rmi_radius"):
        del state["train_config"][key]
    torch.save(state, path)
    assert run(_args(tmp_path, "--no-final-eval", "--resume", path, "--stop-at", "3", "--rmi-radius", "2"),
               log=_quiet)["iteration"] == 3


def test_resume_into_another_runs_out_is_refused(tmp_path):
    """--resume PATH --out DIR replaced DIR's own last.pt and mixed the two runs' logs; a
    snapshot of DIR's own run (an earlier last.pt kept aside) rolls it back."""
    run(_args(tmp_path / "a", "--no-final-eval", "--stop-at", "2"), log=_quiet)
    shutil.copyfile(tmp_path / "a" / "last.pt", tmp_path / "a-at-2.pt")
    run(_args(tmp_path / "c", "--no-final-eval", "--stop-at", "1", "--seed", "7"), log=_quiet)
    with pytest.raises(SystemExit, match="holds the last.pt of another run"):
        run(_args(tmp_path / "c", "--no-final-eval", "--resume", str(tmp_path / "a" / "last.pt")), log=_quiet)
    assert load_checkpoint(tmp_path / "c" / "last.pt")["iteration"] == 1  # run c's, untouched
    os.remove(tmp_path / "c" / "last.pt")  # its log and metrics stay: no part of run a
    result = run(_args(tmp_path / "c", "--no-final-eval", "--resume", str(tmp_path / "a" / "last.pt")),
                 log=_quiet)
    assert result["status"] == "done"
    logged = [json.loads(line)["iteration"] for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert logged == [3, 4, 5, 6]
    # c went its own way from a's checkpoint: it is another run, and may not replace a's either
    with pytest.raises(SystemExit, match="holds the last.pt of another run"):
        run(_args(tmp_path / "a", "--no-final-eval", "--resume", str(tmp_path / "c" / "last.pt")), log=_quiet)
    # run a went on to 4; its snapshot at 2 rolls it back, its log cut there and later metrics gone
    run(_args(tmp_path / "a", "--no-final-eval", "--resume", "auto", "--stop-at", "4"), log=_quiet)
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({"iteration": 4, "metrics": {}}))
    back = run(_args(tmp_path / "a", "--no-final-eval", "--resume", str(tmp_path / "a-at-2.pt"),
                     "--stop-at", "3"), log=_quiet)
    assert back["iteration"] == 3 and not (tmp_path / "a" / "metrics.json").exists()
    logged = [json.loads(line)["iteration"] for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]


def test_resume_of_a_checkpoint_from_before_its_settings_were_saved(tmp_path):
    """Such a checkpoint's optimizer state says the momentum and weight decay its run used
    (the flags were taken and written into the next checkpoint while the loaded state ran
    on the old values); a data order it does not know is refused."""
    run(_args(tmp_path, "--no-final-eval", "--stop-at", "1"), log=_quiet)
    path = tmp_path / "last.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("momentum", "weight_decay"):
        del state["train_config"][key]
    torch.save(state, path)
    with pytest.raises(SystemExit, match=re.escape("momentum 0.9 -> 0.5")):
        run(_args(tmp_path, "--no-final-eval", "--resume", str(path), "--momentum", "0.5"), log=_quiet)
    state["train_config"]["data_order"] = 3
    torch.save(state, path)
    with pytest.raises(SystemExit, match="orders its data by rule 3"):
        run(_args(tmp_path, "--no-final-eval", "--resume", str(path)), log=_quiet)


def test_epochs_bce_and_bfloat16_autocast(tmp_path):
    i = TINY.index("--iterations")
    args = parse_args(TINY[:i] + TINY[i + 2:] + [
        "--epochs", "1", "--train-length", "4", "--loss", "bce", "--amp", "--no-final-eval",
        "--out", str(tmp_path)])
    assert args.iterations is None and args.epochs == 1
    result = run(args, log=_quiet)
    assert result["status"] == "done" and result["total_iterations"] == 2 and len(result["losses"]) == 2
    assert all(math.isfinite(v) and v > 0 for v in result["losses"])
    assert load_checkpoint(tmp_path / "last.pt")["train_config"]["loss"] == "bce"


@pytest.mark.parametrize("argv, message", [
    (["--rmi-radius", "11"], "--rmi-radius: radius must lie in [1, 10], got 11"),
    (["--rmi-pool-size", "0"], "--rmi-pool-size: pool_size must lie in [1, 8], got 0"),
    (["--rmi-weight", "-1"], "--rmi-weight: rmi_weight must be finite and >= 0"),
    (["--loss", "ce", "--rmi-radius", "4"], "--rmi-radius applies to --loss rmi only"),
    (["--loss", "bce", "--rmi-probs", "softmax", "--rmi-exclude-ignored"],
     "--rmi-probs, --rmi-exclude-ignored apply to --loss rmi only"),
    (["--dataset", "voc"], "--dataset voc needs --data-root"),
    (["--dataset", "camvid", "--data-root", "/no/such/folder"], "--data-root '/no/such/folder' is not a directory"),
    (["--pretrained", "/no/such/file.pt"], "--pretrained '/no/such/file.pt' is not a file"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "1"], "--batch-size 1: the networks' global-pooling branch gives BatchNorm one value"),
    (["--resume", "/no/such/last.pt"], "--resume '/no/such/last.pt' is not a file"),
    (["--train-length", "1"], "--train-length 1 does not fill one batch of --batch-size 2"),
    (["--crop", "8"], "--crop must be >= 16 px"),
    (["--crop", "16", "--rmi-radius", "6"], "--crop 16: --rmi-pool avg --rmi-pool-size 4 makes it 5 x 5, smaller "
                                            "than the --rmi-radius 6 region; use a larger --crop"),
    (["--crop", "40", "--rmi-pool", "interp", "--rmi-pool-size", "8", "--rmi-radius", "6"],
     "--crop 40: --rmi-pool interp --rmi-pool-size 8 makes it 5 x 5, smaller than the --rmi-radius 6 region"),
    (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    (["--seed", "4294967296"], "--seed must be in [0, 2**32), got 4294967296"),
    (["--val-length", "0"], "--val-length must be >= 1, got 0 (--no-final-eval skips the evaluation)"),
    (["--boundary-tolerance", "-1"], "--boundary-tolerance must be >= 0, got -1"),
    (["--lr", "nan"], "--lr must be >= 0, got nan"),
    (["--workers", "-2"], "--workers must be >= 0, got -2"),
    (["--num-classes", "9"], "--num-classes must be in 2..7 for the synthetic scenes, got 9"),
    (["--dataset", "voc", "--data-root", "."], "--train-length applies to the synthetic scenes only"),
    (["--dataset", "camvid", "--data-root", ".", "--num-classes", "3"],
     "--num-classes applies to the synthetic scenes only (--dataset camvid has its own classes)"),
])
def test_command_line_mistakes_are_named_before_the_run(argv, message, capsys):
    """A mistake in the flags ends in parse_args with a usage error that names the flag (exit 2),
    not in a traceback from inside the run (or, for flags another dataset has no use for, silence)."""
    with pytest.raises(SystemExit) as raised:
        parse_args(TINY + argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_device_without_cuda_is_named(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--device", "cuda"])
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the tests' interpreter would run it on the CPU
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--rmi-backend", "triton", "--device", "cpu"])
    assert "--rmi-backend triton needs triton and a CUDA device (this run: cpu)" in capsys.readouterr().err


def test_one_gpu_named_for_every_process_is_refused(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--device", "cuda:0"])
    assert "--device cuda:0 under torchrun would put every process on that GPU" in capsys.readouterr().err


def test_triton_too_old_for_the_kernels_is_named(capsys, monkeypatch):
    from rmi_triton.engines import triton_engine

    if triton_engine.triton_problem() == "triton is not installed":
        pytest.skip("needs triton installed")
    monkeypatch.setattr(triton_engine.triton, "__version__", "3.4.0")
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--rmi-backend", "triton"])
    assert "--rmi-backend triton: triton 3.4.0 is installed and the kernels need 3.5" in capsys.readouterr().err


def test_an_unusable_out_is_named_before_the_run(tmp_path, capsys):
    """An --out that is a file, or holds a folder where the run writes a file, was found at the
    first write: after the datasets and the network were built, or after the whole training."""
    a_file = tmp_path / "afile"
    a_file.write_text("")
    (tmp_path / "taken" / "last.pt").mkdir(parents=True)
    for out, said in ((a_file, "is a file, not a folder"), (a_file / "sub", f"cannot be made: {a_file} is a file"),
                      (tmp_path / "taken", "holds a folder named last.pt, where the run writes that file"),
                      (" ", "is empty")):
        with pytest.raises(SystemExit) as raised:
            parse_args(TINY + ["--out", str(out)])
        assert raised.value.code == 2 and f"--out {str(out)!r} {said}" in capsys.readouterr().err


def test_whole_images_too_small_for_the_rmi_regions_are_one_line(tmp_path):
    """--no-augment feeds a real dataset's images whole, at sizes only the data knows: images
    the RMI options pool below one region ended the run with the loss's traceback."""
    from test_data import make_camvid

    argv = ["--backbone", "resnet18", "--dataset", "camvid", "--data-root", make_camvid(tmp_path), "--no-augment",
            "--batch-size", "2", "--iterations", "1", "--threads", "2", "--no-progress", "--no-final-eval",
            "--rmi-pool-size", "8", "--rmi-radius", "5", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=r"^error: iteration 1, a batch of 24 x 32 images: the downsampled map is "
                                         r"4 x 5 .* smaller than the 5 x 5 region"):
        run(parse_args(argv), log=_quiet)


def test_unusable_resume_and_pretrained_files_are_named(tmp_path):
    """Files that exist but cannot be used end the run with one line naming the flag."""
    weights_only = tmp_path / "weights.pt"  # a network's checkpoint (as the exporter reads), not a run's
    save_checkpoint(weights_only, {"w": torch.zeros(1)}, {"name": "deeplabv3plus", "num_classes": 5,
                                                          "backbone": "resnet18", "output_stride": 16})
    with pytest.raises(SystemExit, match=f"--resume {weights_only}: checkpoint has no training state "
                                         r"\('iteration' missing\)"):
        run(_args(tmp_path / "w", "--resume", str(weights_only)), log=_quiet)
    not_a_checkpoint = tmp_path / "notes.json"
    not_a_checkpoint.write_text("{}")
    with pytest.raises(SystemExit, match=f"--resume {not_a_checkpoint}: .*not a complete torch.save"):
        run(_args(tmp_path, "--resume", str(not_a_checkpoint)), log=_quiet)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(SystemExit, match=f"--pretrained {empty}: could not read pretrained weights"):
        run(_args(tmp_path, "--pretrained", str(empty)), log=_quiet)


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("segmentation network (default: deeplabv3plus)", "(default: resnet101)", "(default: synthetic)",
                  "(default: rmi)", "(default: 3)", "(default: avg)", "(default: bce)", "(default: auto)"):
        assert shown in text


def test_sync_bn_on_cpu_is_refused_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        _args(tmp_path, "--sync-bn", "--device", "cpu")
    assert raised.value.code == 2
    assert "--sync-bn needs a distributed run (torchrun) on CUDA devices" in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["ce", "rmi"])
def test_nonfinite_logits_stop_the_run_cleanly(tmp_path, monkeypatch, loss):
    """NaN logits with finite weights (the trainer's RMILoss runs with validate=False): the loss
    is NaN, not an exception from the factorisation, and the run stops with its message."""
    import rmi_triton.train as train

    make = train.make_criterion

    def poisoned(*a, **k):
        criterion, calls = make(*a, **k), []

        def call(logits, labels):
            calls.append(1)
            return criterion(logits * float("nan") if len(calls) == 3 else logits, labels)
        return call

    monkeypatch.setattr(train, "make_criterion", poisoned)
    result = run(_args(tmp_path, "--loss", loss), log=_quiet)
    assert result["status"] == "nonfinite" and result["iteration"] == 2
    assert "non-finite loss at iteration 3" in result["message"]


def test_nonfinite_loss_stops_and_keeps_finite_checkpoint(tmp_path):
    messages = []
    args = _args(tmp_path, "--lr", "1e6", "--save-every", "1", "--loss", "ce")
    result = run(args, log=messages.append)
    assert result["status"] == "nonfinite"
    failed_at = result["iteration"] + 1
    assert "non-finite" in result["message"] and f"iteration {failed_at}" in result["message"]
    assert result["message"] in messages and result["metrics"] is None
    path = tmp_path / "last.pt"
    if path.exists():  # every checkpoint written holds finite weights of an earlier iteration
        ckpt = load_checkpoint(path)
        assert ckpt["iteration"] < failed_at
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    from rmi_triton.train import main
    assert main(TINY + ["--out", str(tmp_path / "cli"), "--lr", "1e6", "--loss", "ce"]) == 1


def test_sigterm_saves_and_resume_reaches_the_same_loss(straight, tmp_path):
    """SIGTERM as a scheduler sends it (Slurm's scancel, systemd): to the whole process group,
    DataLoader workers included, which leave it to the main process (a worker killed by it took
    the run down with no checkpoint)."""
    cmd = [sys.executable, "-m", "rmi_triton.train", *TINY, "--no-final-eval", "--workers", "2",
           "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("iter 1/"):
                os.killpg(proc.pid, signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert 1 <= ckpt["iteration"] < 6
    resumed = run(_args(tmp_path, "--no-final-eval", "--resume", "auto"), log=_quiet)
    assert resumed["status"] == "done"
    _assert_same_run(resumed, straight)
    logged = [json.loads(line)["iteration"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 7))


def test_resumed_log_drops_what_came_after_its_checkpoint(tmp_path):
    """A run killed after logging iterations its checkpoint does not hold logs them again when
    resumed: the log keeps what the checkpoint holds (a line cut short by the kill goes too,
    and a save's temporary file); a fresh run (--overwrite) drops an earlier run's files."""
    from rmi_triton.train import _start_files

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"iteration": i, "loss": 1.0 / i}) + "\n" for i in range(1, 6))
                   + '{"iteration": 6, "lo')
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "last.pt").write_bytes(b"an earlier run's")
    (tmp_path / ".tmp-k1ll3d.pt").write_bytes(b"a save a kill cut short")
    os.utime(tmp_path / ".tmp-k1ll3d.pt", (1.0e9, 1.0e9))
    (tmp_path / ".tmp-metrics.json").write_bytes(b'{"metrics": {"mi')  # metrics.json's, cut short
    os.utime(tmp_path / ".tmp-metrics.json", (1.0e9, 1.0e9))
    (tmp_path / ".tmp-writing.pt").write_bytes(b"a save at work now")
    (tmp_path / ".tmp-other.txt").write_bytes(b"not a trainer's")
    os.utime(tmp_path / ".tmp-other.txt", (1.0e9, 1.0e9))
    _start_files(str(tmp_path), str(log), 3, fresh=False)
    assert not (tmp_path / ".tmp-k1ll3d.pt").exists() and not (tmp_path / ".tmp-metrics.json").exists()
    assert (tmp_path / ".tmp-writing.pt").exists() and (tmp_path / ".tmp-other.txt").exists()
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "last.pt").exists()
    _start_files(str(tmp_path), str(log), 0, fresh=True)
    assert not log.exists() and not (tmp_path / "metrics.json").exists() and not (tmp_path / "last.pt").exists()


def test_a_fresh_run_into_an_earlier_runs_folder_is_refused(tmp_path, capsys):
    """The default --out is shared by every run: a second run there silently mixed its log with
    the first's and replaced its checkpoint."""
    run(_args(tmp_path, "--no-final-eval", "--stop-at", "1"), log=_quiet)
    with pytest.raises(SystemExit):
        _args(tmp_path)
    assert f"--out {tmp_path} holds an earlier run (last.pt): continue it with --resume auto" in \
        capsys.readouterr().err
    assert _args(tmp_path, "--resume", "auto").resume == "auto"
    with pytest.raises(SystemExit):
        _args(tmp_path, "--resume", "auto", "--overwrite")
    assert "--overwrite starts afresh and --resume auto continues" in capsys.readouterr().err
    fresh = run(_args(tmp_path, "--no-final-eval", "--overwrite", "--iterations", "2"), log=_quiet)
    assert fresh["status"] == "done" and load_checkpoint(tmp_path / "last.pt")["iteration"] == 2
    assert [json.loads(line)["iteration"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    # a fresh run that writes no checkpoint leaves none of the earlier run's to pass for its own
    failed = run(_args(tmp_path, "--overwrite", "--lr", "1e6", "--loss", "ce"), log=_quiet)
    assert failed["status"] == "nonfinite" and "no checkpoint was written" in failed["message"]
    assert not (tmp_path / "last.pt").exists()


def test_evaluation_takes_images_of_different_sizes(tmp_path):
    """VOC's validation images differ in size: a batch of them is scored one size at a time, as
    one image a batch would be (it stopped with "stack expects each tensor to be equal size")."""
    from rmi_triton.train import evaluate

    class Sizes(torch.utils.data.Dataset):
        num_classes, ignore_index, class_names = 3, 255, ["a", "b", "c"]
        sizes = [(33, 47), (33, 47), (45, 38), (20, 20), (45, 38)]

        def __len__(self):
            return len(self.sizes)

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            h, w = self.sizes[i]
            return torch.randn(3, h, w, generator=g), torch.randint(0, 3, (h, w), generator=g)

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 3, padding=1).train()
    batched = evaluate(model, Sizes(), torch.device("cpu"), batch_size=4)
    assert model.training
    one_by_one = evaluate(model, Sizes(), torch.device("cpu"), batch_size=1)
    assert batched["miou"] == one_by_one["miou"] and batched["boundary_f"] == one_by_one["boundary_f"]
    assert evaluate(model, Sizes(), torch.device("cpu"), batch_size=2, interrupted=lambda: True) is None
    assert model.training


def test_seconds_per_iteration_leave_out_evaluations(tmp_path, monkeypatch):
    """s/iteration (printed, and in metrics.json) times the training steps, not the evaluations
    between them: a clock that moves only while evaluating reads 0."""
    import types

    import rmi_triton.train as train

    clock = [0.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    evaluate, make_criterion = train.evaluate, train.make_criterion

    def slow_evaluate(*args, **kwargs):
        clock[0] += 100.0
        return evaluate(*args, **kwargs)

    def timed_criterion(*args, **kwargs):  # a training step: 2 s on this clock
        criterion = make_criterion(*args, **kwargs)

        def step(*inputs):
            clock[0] += 2.0
            return criterion(*inputs)
        return step

    monkeypatch.setattr(train, "evaluate", slow_evaluate)
    monkeypatch.setattr(train, "make_criterion", timed_criterion)
    result = run(_args(tmp_path, "--eval-every", "2", "--iterations", "4", "--save-every", "1"), log=_quiet)
    assert result["status"] == "done" and clock[0] == 4 * 2.0 + 200.0  # evaluations at 2 and the final one
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["iteration"], sorted(r)) for r in records if "eval" in r] == [(2, ["eval", "iteration", "split"])]
    assert "log.jsonl (the losses and evaluations)" in result["message"]  # the periodic one was only printed
    assert result["seconds_per_iteration"] == 2.0
    assert json.loads((tmp_path / "metrics.json").read_text())["seconds_per_iteration"] == 2.0


def test_a_signal_during_a_periodic_evaluation_stops_it_and_the_run(tmp_path, monkeypatch):
    """SIGTERM while --eval-every evaluates: the evaluation stops at its next batch, a checkpoint
    of the iteration is written and the run ends (it used to finish the evaluation first: on a
    large validation set longer than a scheduler's grace period)."""
    import rmi_triton.train as train

    evaluate, batches = train.evaluate, []

    def evaluate_with_a_signal(*args, interrupted=None, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives as the evaluation starts

        def asked():
            batches.append(interrupted())
            return batches[-1]
        return evaluate(*args, interrupted=asked, **kwargs)

    monkeypatch.setattr(train, "evaluate", evaluate_with_a_signal)
    result = run(_args(tmp_path, "--eval-every", "2", "--val-length", "6", "--eval-batch-size", "1"), log=_quiet)
    assert batches == [True]  # asked once, before its first batch
    assert result["status"] == "signal" and "stopped by SIGTERM after iteration 2" in result["message"]
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 2 and result["metrics"] is None


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_final_evaluation_stops_it_and_resume_evaluates(tmp_path, monkeypatch, signum):
    """Ctrl-C during the final evaluation ended in a KeyboardInterrupt traceback (and SIGTERM
    killed the process): it now stops the evaluation at its next batch, as in training, and
    --resume auto evaluates the written checkpoint."""
    import rmi_triton.train as train

    evaluate = train.evaluate

    def evaluate_with_a_signal(*args, **kwargs):
        os.kill(os.getpid(), signum)  # arrives as the evaluation starts
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", evaluate_with_a_signal)
    argv = ["--iterations", "1", "--val-length", "2", "--eval-batch-size", "1"]
    result = run(_args(tmp_path, *argv), log=_quiet)
    assert result["status"] == "signal" and result["metrics"] is None
    assert f"stopped by {signal.Signals(signum).name} during the final evaluation" in result["message"]
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 1 and not (tmp_path / "metrics.json").exists()
    monkeypatch.setattr(train, "evaluate", evaluate)
    resumed = run(_args(tmp_path, *argv, "--resume", "auto"), log=_quiet)
    assert resumed["status"] == "done" and resumed["metrics"] is not None
    assert json.loads((tmp_path / "metrics.json").read_text())["iteration"] == 1


def test_metrics_file_is_strict_json(tmp_path, monkeypatch):
    """A class absent from the labels and the predictions has a NaN IoU; JSON has no NaN (jq and
    strict parsers refuse the file): it is written as null."""
    import rmi_triton.train as train

    evaluate = train.evaluate

    def absent_class(*args, **kwargs):
        metrics = evaluate(*args, **kwargs)
        metrics["iou"][2] = float("nan")
        return metrics

    monkeypatch.setattr(train, "evaluate", absent_class)
    run(_args(tmp_path, "--iterations", "1", "--val-length", "1"), log=_quiet)
    text = (tmp_path / "metrics.json").read_text()
    saved = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))
    assert saved["metrics"]["iou"][2] is None


DDP = TINY + ["--iterations", "3", "--train-length", "8", "--val-length", "3", "--device", "cpu", "--threads", "1"]


def _torchrun(tmp_path, argv, rank1_argv=None, timeout=240):
    """rmi-train's run() on 2 CPU processes (gloo); rank 1 may get other flags. -> the process."""
    script = tmp_path / "ddp_worker.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch
        from rmi_triton.train import main
        argv = {argv!r} if os.environ["RANK"] == "0" or {rank1_argv!r} is None else {rank1_argv!r}
        import rmi_triton.train as train
        run = train.run

        def keep(args, log=print):  # every rank's trained parameters and buffers, for the test
            res = run(args, log=log)
            state = {{k: v.detach() for k, v in res["model"].state_dict().items()}}
            torch.save(state, os.path.join({str(tmp_path)!r}, "rank%s.pt" % os.environ["RANK"]))
            return res

        train.run = keep
        sys.exit(main(argv))
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, timeout=timeout, env=env)


def test_distributed_two_ranks_stay_identical(tmp_path):
    """Both ranks end with the same parameters, and the final evaluation scores the checkpoint:
    each rank's shard with rank 0's BatchNorm statistics (DDP sends them at each forward, but
    every rank then updates its own: the metrics were of a network never saved)."""
    out = tmp_path / "out"
    proc = _torchrun(tmp_path, DDP + ["--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("training deeplabv3plus") == 1  # only rank 0 prints
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["iteration"] == 3 and len(ckpt["rng"]["torch_ranks"]) == 2
    assert ckpt["train_config"]["world"] == 2
    from rmi_triton.models import build_model
    from rmi_triton.train import build_datasets, evaluate

    args = parse_args(DDP + ["--out", str(tmp_path / "single")])
    model = build_model(args.model, 5, args.backbone, args.output_stride)
    model.load_state_dict(ckpt["model"])
    single = evaluate(model, build_datasets(args)[1], torch.device("cpu"), batch_size=2)
    saved = json.loads((out / "metrics.json").read_text())["metrics"]
    assert saved["miou"] == single["miou"] and saved["boundary_f"] == single["boundary_f"]


def test_distributed_resume_needs_the_same_processes_and_checkpoint(tmp_path):
    """A run stopped on one process and resumed on two would shard the data differently (and
    with --epochs change its length): refused, by rank 0 alone. Ranks that see different
    checkpoints under --resume auto (each node its own --out) trained with mismatched
    collectives and hung: refused too."""
    out = tmp_path / "out"
    first = run(parse_args(DDP + ["--out", str(out), "--stop-at", "1", "--no-final-eval"]), log=_quiet)
    assert first["status"] == "stopped"
    proc = _torchrun(tmp_path, DDP + ["--out", str(out), "--resume", "auto"])
    assert proc.returncode != 0
    message = "the checkpoint's run had 1 process(es), this one 2: resume with 1"
    assert proc.stderr.count(message) == 1, proc.stderr[-3000:]
    two = tmp_path / "two"
    assert _torchrun(tmp_path, DDP + ["--out", str(two), "--stop-at", "1", "--no-final-eval"]).returncode == 0
    (tmp_path / "empty").mkdir()
    proc = _torchrun(tmp_path, DDP + ["--out", str(two), "--resume", "auto"],
                     rank1_argv=DDP + ["--out", str(tmp_path / "empty"), "--resume", "auto"], timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("the processes disagree on --resume auto") == 1, proc.stderr[-3000:]
    assert "rank 0: (1, 1), rank 1: None" in proc.stderr
    # a checkpoint that one rank alone cannot use: every rank stops, and rank 1's reason is printed
    proc = _torchrun(tmp_path, DDP + ["--out", str(two), "--resume", "auto"],
                     rank1_argv=DDP + ["--out", str(two), "--resume", "auto", "--seed", "4"], timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("rank 1: --resume") == 1 and "seed 3 -> 4" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("argv, message", [(["--size", "8"], "--size must be >= 16, got 8"),
                                           (["--val-length", "0"], "--val-length must be >= 1, got 0"),
                                           (["--batch-size", "3", "--train-length", "2"],
                                            "--train-length must be >= 3, got 2"),
                                           (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
                                           (["--threads", "-1"], "--threads must be >= 1, got -1")])
def test_demo_flag_mistakes_are_named(argv, message, capsys, tmp_path):
    from rmi_triton.demo import main as demo_main

    with pytest.raises(SystemExit) as raised:
        demo_main(["--quick", "--out", str(tmp_path), *argv])
    said = capsys.readouterr().err  # the demo's own usage, not the trainer's
    assert raised.value.code == 2 and message in said and said.startswith("usage: python -m rmi_triton.demo")


@pytest.mark.skipif(torch.cuda.is_available(), reason="takes --device cuda for a mistake")
def test_demo_flag_mistakes_leave_an_earlier_demos_outputs(tmp_path, capsys):
    """The demo removed an earlier demo's files first and then met a mistake the trainer's flags
    found (--device cuda without CUDA): the results were lost to a typo."""
    import rmi_triton.demo as demo

    out = tmp_path / "demo"
    out.mkdir()
    for name in demo.PUBLISHED:
        (out / name).write_bytes(b"an earlier demo's")
    with pytest.raises(SystemExit) as raised:
        demo.main(["--quick", "--out", str(out), "--device", "cuda"])
    said = capsys.readouterr().err
    assert raised.value.code == 2 and "usage: python -m rmi_triton.demo" in said and "--device cuda: no CUDA" in said
    assert sorted(p.name for p in out.iterdir()) == sorted(demo.PUBLISHED)
    a_file = tmp_path / "afile"
    a_file.write_text("")
    with pytest.raises(SystemExit):
        demo.main(["--quick", "--out", str(a_file)])
    assert f"--out {str(a_file)!r} is a file, not a folder" in capsys.readouterr().err


def test_demo_figure_without_examples_shows_the_loss_curves(tmp_path, monkeypatch):
    """--examples 0 drew one example all the same."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from rmi_triton.data import build_dataset
    from rmi_triton.demo import write_figure

    scores = {"miou": 0.5, "boundary_f": 0.25}
    results = {key: {"losses": [1.0, 0.8, 0.7, 0.6, 0.5, 0.45], "metrics": scores} for key in ("ce", "rmi")}
    val_set = build_dataset("synthetic", split="val", length=2, size=32)
    drawn = []
    real_figure = plt.figure

    def figure(*args, **kwargs):
        drawn.append(real_figure(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(plt, "figure", figure)
    write_figure(str(tmp_path / "d.png"), results, {}, val_set, 0, torch.device("cpu"))
    assert len(drawn[0].axes) == 2  # the two runs' loss curves, no image panels
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_quick_end_to_end(tmp_path, capsys):
    from rmi_triton.checkpoint import build_from_checkpoint
    from rmi_triton.demo import main as demo_main

    out = tmp_path / "demo"
    assert demo_main(["--quick", "--out", str(out), "--no-export", "--no-progress", "--threads", "2",
                      "--examples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "BCE+RMI" in printed and "mIoU (%)" in printed and "boundary F@2px" in printed
    for name in ("ce.pt", "rmi.pt", "demo.png", "results.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert results["figure"] == str(out / "demo.png")
    for key in ("ce", "rmi"):
        run_ = results["runs"][key]
        assert len(run_["losses"]) == 2 and 0.0 <= run_["metrics"]["miou"] <= 1.0
        assert "--loss" in run_["argv"] and run_["argv"][run_["argv"].index("--loss") + 1] == key
    assert results["runs"]["ce"]["losses"] != results["runs"]["rmi"]["losses"]
    net = build_from_checkpoint(out / "rmi.pt")
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 5, 32, 32)


def test_demo_without_matplotlib_says_so_first_and_keeps_its_results(tmp_path, capsys, monkeypatch):
    """Without the plot extra the demo trained both networks, then died importing matplotlib
    for the figure, before results.json was written."""
    import sys

    from rmi_triton.demo import main as demo_main

    for name in ("matplotlib", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.setattr("rmi_triton.demo._export_step", lambda *args, **kwargs: {"skipped": "test"})
    out = tmp_path / "demo"
    assert demo_main(["--quick", "--out", str(out), "--no-progress", "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    for said in ("matplotlib is not installed, so no demo.png this time (pip install 'rmi_triton[plot]')",
                 "no ONNX export this time: onnxruntime not installed (pip install 'rmi_triton[export]')"):
        assert printed.index(said) < printed.index("== cross-entropy ==")
    assert not (out / "demo.png").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["figure"].startswith("skipped: matplotlib is not installed") and results["runs"]["rmi"]
    assert f"wrote ce.pt, rmi.pt, results.json into {out}" in printed


def test_demo_with_a_failing_figure_and_a_broken_exporter_still_writes_its_results(tmp_path, capsys,
                                                                                   monkeypatch):
    """An exporter that is installed but fails to import stopped the demo before training (the
    check for the extra imported it); a figure that failed lost results.json."""
    import sys

    import rmi_triton.demo as demo

    def fails(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setitem(sys.modules, "rmi_triton.export", None)  # an import that fails
    monkeypatch.setattr(demo, "write_figure", fails)
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--out", str(out), "--no-progress", "--threads", "2"]) == 1
    captured = capsys.readouterr()
    assert "demo: no ONNX export this time: rmi_triton.export unavailable: ModuleNotFoundError" in captured.out
    assert "demo: the figure failed: RuntimeError: no display; the results are written all the same" in captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["figure"] == "failed: RuntimeError: no display" and results["runs"]["rmi"]["metrics"]
    assert results["export"]["skipped"].startswith("rmi_triton.export unavailable: ModuleNotFoundError")
    assert not (out / "demo.png").exists()


def test_a_demo_stopped_half_way_leaves_no_earlier_demos_outputs(tmp_path, monkeypatch, capsys):
    """A demo stopped in its second run left the new ce.pt beside the earlier demo's rmi.pt,
    rmi.onnx and results.json: a pair that compares as one (same structure) but is not."""
    import rmi_triton.demo as demo

    out = tmp_path / "demo"
    out.mkdir()
    for name in demo.PUBLISHED:
        (out / name).write_bytes(b"an earlier demo's")
    real_run = demo.run

    def stopped_in_the_rmi_run(args):
        if args.loss == "rmi":
            return {"status": "stopped", "message": "stopped at iteration 1/2 (--stop-at); continue with --resume x"}
        return real_run(args)

    monkeypatch.setattr(demo, "run", stopped_in_the_rmi_run)
    assert demo.main(["--quick", "--out", str(out), "--no-export", "--no-progress", "--threads", "2"]) == 1
    said = capsys.readouterr().err
    assert "run the demo again" in said and "--resume" not in said  # its run folders go next time
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["ce.pt"]
    assert load_checkpoint(out / "ce.pt")["iteration"] == 2


VOC_RUN = ["--model", "deeplabv3plus", "--backbone", "resnet18", "--dataset", "voc", "--crop", "32",
           "--batch-size", "2", "--iterations", "2", "--loss", "ce", "--threads", "2", "--no-progress"]


def test_a_voc_run_on_a_split_of_its_own_name(tmp_path, capsys):
    """The training split was augmented only when its name began with 'train': a list of one's own
    (or CamVid's val) went in whole, --crop unused, and images of different sizes failed in torch's
    collation; the validation split was read even where nothing evaluates it."""
    from test_data import make_voc

    voc = make_voc(tmp_path / "data")  # images of 30x40, 36x28 and 24x24
    lists = os.path.join(voc, "ImageSets", "Segmentation")
    shutil.copy(os.path.join(lists, "train.txt"), os.path.join(lists, "mine.txt"))
    os.remove(os.path.join(lists, "val.txt"))
    out = tmp_path / "run"
    result = run(parse_args(VOC_RUN + ["--data-root", voc, "--train-split", "mine", "--no-final-eval",
                                       "--out", str(out)]), log=_quiet)
    assert result["status"] == "done" and result["message"] == (f"wrote {out}: last.pt (the checkpoint), "
                                                                "log.jsonl (the losses)")
    with pytest.raises(SystemExit, match=rf"^error: --dataset voc --data-root {re.escape(voc)} \(splits "
                                         r"'mine', 'val'\): VOC split list for split='val' not found"):
        run(parse_args(VOC_RUN + ["--data-root", voc, "--train-split", "mine", "--out", str(tmp_path / "r2")]),
            log=_quiet)
    with pytest.raises(SystemExit, match=r"^error: training images of different sizes in one batch \(\d+x\d+ "
                                         r"and \d+x\d+\): with --no-augment they go in whole"):
        train_module.main(VOC_RUN[:6] + VOC_RUN[8:] + ["--data-root", voc, "--train-split", "mine",
                                                       "--no-augment", "--no-final-eval",
                                                       "--out", str(tmp_path / "r3")])
    with pytest.raises(SystemExit):
        parse_args(VOC_RUN + ["--data-root", voc, "--no-augment"])
    assert "--crop is the augmentation's random crop: with --no-augment" in capsys.readouterr().err


def test_cross_entropy_of_a_batch_without_labelled_pixels_is_zero():
    """F.cross_entropy's mean over no labelled pixel is 0 / 0: one such crop stopped a --loss ce run
    as 'non-finite' (BCE and RMI gave finite values on the same batch)."""
    args = parse_args(TINY + ["--loss", "ce", "--out", "unused"])
    criterion = train_module.make_criterion(args, 3, 255)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = criterion(logits, torch.full((2, 8, 8), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[0, :4] = 255
    torch.testing.assert_close(criterion(logits, labels),
                               torch.nn.functional.cross_entropy(logits, labels, ignore_index=255))



@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_training_data_is_one_line(tmp_path, workers):
    """A truncated image (or a label out of range, of another size) ended the run in a traceback
    from PIL or the dataset, wrapped once more by a DataLoader worker. The workers are stopped
    before the error returns: they outlived it, and the command then took a minute to exit."""
    import multiprocessing

    from test_data import VOC_IDS, make_voc

    voc = make_voc(tmp_path / "data")
    with open(os.path.join(voc, "JPEGImages", f"{VOC_IDS['train'][1]}.jpg"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(SystemExit, match=r"^error: training item 1: image file .*2007_000002.jpg could not be "
                                         r"decoded: [^\n]*$"):
        train_module.main(VOC_RUN + ["--data-root", voc, "--workers", workers, "--batch-size", "3",
                                     "--no-final-eval", "--out", str(tmp_path / "run")])
    assert multiprocessing.active_children() == []


def test_a_checkpoint_from_before_the_augmentation_was_recorded_resumes_as_it_ran(tmp_path, capsys):
    """A VOC run of a list of one's own, written before: it went in whole (the rule then read the
    split's name), recorded --train-length and --crop that did nothing, and --num-classes' default."""
    from test_data import make_voc

    voc = make_voc(tmp_path / "data")
    lists = os.path.join(voc, "ImageSets", "Segmentation")
    with open(os.path.join(lists, "mine.txt"), "w") as f:
        f.write("2007_000003\n" * 4)  # one size: whole images stack
    out = tmp_path / "run"
    flags = VOC_RUN[:6] + VOC_RUN[8:] + ["--data-root", voc, "--train-split", "mine", "--out", str(out),
                                         "--eval-every", "10"]
    first = run(parse_args(flags + ["--no-augment", "--stop-at", "1"]), log=_quiet)
    assert first["status"] == "stopped"
    state = load_checkpoint(out / "last.pt")
    config = state["train_config"]
    del config["augment"]
    config.update(num_classes=5, train_length=6, crop=32)
    torch.save(state, out / "last.pt")
    with pytest.raises(SystemExit, match=r"settings differ from the checkpoint's run: augment False -> True$"):
        run(parse_args(flags + ["--resume", "auto"]), log=_quiet)
    done = run(parse_args(flags + ["--no-augment", "--resume", "auto"]), log=_quiet)
    assert done["status"] == "done" and done["iteration"] == 2
    assert "log.jsonl (the losses), metrics.json" in done["message"]  # --eval-every 10 never evaluated
