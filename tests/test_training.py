"""Training pipeline (issue 4): it learns, resumes exactly, validates configs, checkpoints safely."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from titans.core.models import build_model
from titans.data.dataloader import TokenBatcher, build_data
from titans.data.dataset import ShardDataset, prepare_shards
from titans.data.preprocessing import ByteTokenizer
from titans.scripts.cli import app
from titans.training.trainer import train
from titans.utils.checkpoint import (
    CheckpointError,
    export_model,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
    save_weights,
)
from titans.utils.config import ConfigError, load_config

TINY = ["model.dim=32", "model.depth=2", "model.heads=2", "model.window=16", "model.memory_chunk_size=8",
        "model.persistent_tokens=2", "data.seq_len=32", "data.max_bytes=150000", "training.batch_size=8",
        "training.lr=3e-3", "training.warmup_steps=5", "training.eval_batches=4", "logging.tensorboard=false",
        "logging.progress=false", "logging.log_every=1"]


def tiny_cfg(tmp_path, *extra):
    return load_config("small", TINY + [f"training.out_dir={tmp_path / 'run'}", *extra])


def test_tiny_model_learns_well_below_uniform(tmp_path):
    cfg = tiny_cfg(tmp_path, "training.max_steps=40", "training.eval_every=40", "training.ckpt_every=40")
    s = train(cfg)
    uniform = math.log(256)
    print("val loss after 40 steps:", s["val_loss"])  # measured 3.88 on the stdlib corpus (uniform: 5.55)
    assert s["val_loss"] < uniform - 1.5
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    # a constant learning rate, so the 6-step first leg has the same schedule as the 12-step run
    common = ["training.max_steps=12", "training.eval_every=100", "training.ckpt_every=6", "model.variant=lmm",
              "training.warmup_steps=0", "training.min_lr_ratio=1.0"]
    full = tiny_cfg(tmp_path / "a", *common)
    train(full)
    part = tiny_cfg(tmp_path / "b", *common, "training.max_steps=6")
    train(part)
    train(tiny_cfg(tmp_path / "b", *common), resume=True)

    def losses(p):
        rows = [json.loads(line) for line in (p / "run" / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), step


def test_init_from_starts_at_the_given_weights_with_a_fresh_run(tmp_path):
    from safetensors.torch import load_file

    first = tiny_cfg(tmp_path / "a", "training.max_steps=3", "training.eval_every=100", "training.ckpt_every=3")
    train(first)
    src = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "step_0000003" / "model.safetensors"))
    # a learning rate so small that one step moves no weight by more than ~1e-9: the result is the source
    second = tiny_cfg(tmp_path / "b", "training.max_steps=1", "training.eval_every=100", "training.ckpt_every=1",
                      "training.warmup_steps=0", "training.lr=1e-12", "data.seq_len=64",
                      f"training.init_from={tmp_path / 'a' / 'run'}")
    train(second)
    got = load_file(str(tmp_path / "b" / "run" / "checkpoints" / "step_0000001" / "model.safetensors"))
    assert got.keys() == src.keys()
    assert max((got[k] - src[k]).abs().max().item() for k in src) < 1e-8
    fresh = tiny_cfg(tmp_path / "c", "training.max_steps=1", "training.eval_every=100", "training.ckpt_every=1",
                     "training.warmup_steps=0", "training.lr=1e-12", "training.seed=1")
    train(fresh)
    other = load_file(str(tmp_path / "c" / "run" / "checkpoints" / "step_0000001" / "model.safetensors"))
    assert max((other[k] - src[k]).abs().max().item() for k in src) > 1e-3  # the check can fail
    # the step count starts fresh: one step was run and logged
    rows = [json.loads(line) for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        train(tiny_cfg(tmp_path / "d", "training.max_steps=1", f"training.init_from={tmp_path / 'missing'}"))
    with pytest.raises(CheckpointError, match="has shape"):
        train(tiny_cfg(tmp_path / "e", "training.max_steps=1", "model.dim=48",
                       f"training.init_from={tmp_path / 'a' / 'run'}"))


def test_curriculum_equals_the_stages_run_by_hand_and_resumes_after_a_failed_stage(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import titans.training.trainer as trainer_mod

    common = ["training.eval_every=100", "training.ckpt_every=100", "training.warmup_steps=0"]
    stages = ("training.curriculum=[{seq_len: 32, max_steps: 3}, "
              "{seq_len: 64, max_steps: 2, batch_size: 4, lr: 1.0e-3}]")
    s = train(tiny_cfg(tmp_path / "cur", *common, stages))
    run = tmp_path / "cur" / "run"
    assert s["step"] == 5 and s["tokens_seen"] == 3 * 8 * 32 + 2 * 4 * 64 and len(s["stages"]) == 2
    assert [st["tasks"] for st in s["stages"]] == [[], []]  # each stage's record names its data (here: LM alone)
    assert load_config(run / "config.yaml").data.seq_len == 64  # the final model lives in the run folder itself
    final = load_file(str(run / "checkpoints" / "step_0000002" / "model.safetensors"))
    # the same two runs by hand: stage 0, then stage 1 from its weights with a fresh optimizer and schedule
    train(tiny_cfg(tmp_path / "h0", *common, "training.max_steps=3"))
    train(tiny_cfg(tmp_path / "h1", *common, "training.max_steps=2", "training.batch_size=4", "training.lr=1e-3",
                   "data.seq_len=64", f"training.init_from={tmp_path / 'h0' / 'run'}"))
    by_hand = load_file(str(tmp_path / "h1" / "run" / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert final.keys() == by_hand.keys()
    assert max((final[k] - by_hand[k]).abs().max().item() for k in final) == 0.0
    stage0 = load_file(str(run / "stages" / "0_seq32" / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert max((final[k] - stage0[k]).abs().max().item() for k in final) > 1e-4  # stage 1 trained

    # a second stage that fails part-way; resume skips the finished first stage and reaches the same weights
    real, calls = trainer_mod._train_run, []

    def failing(cfg, *a, **k):
        calls.append(cfg.data.seq_len)
        if cfg.data.seq_len == 64 and calls.count(64) == 1:
            raise RuntimeError("simulated crash in stage 1")
        return real(cfg, *a, **k)

    monkeypatch.setattr(trainer_mod, "_train_run", failing)
    cfg = tiny_cfg(tmp_path / "res", *common, stages)
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg)
    record = json.loads((tmp_path / "res" / "run" / "curriculum.json").read_text())
    assert [st["seq_len"] for st in record["stages"]] == [32]
    s2 = train(cfg, resume=True)
    assert calls == [32, 64, 64] and s2["step"] == 5
    again = load_file(str(tmp_path / "res" / "run" / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert max((again[k] - final[k]).abs().max().item() for k in final) == 0.0
    with pytest.raises(ValueError, match="not stage 0 of training.curriculum now"):
        train(tiny_cfg(tmp_path / "res", *common, "training.curriculum=[{seq_len: 48, max_steps: 3}, "
                       "{seq_len: 64, max_steps: 2}]"), resume=True)
    with pytest.raises(ConfigError, match=r"curriculum\[1\]\.batch_size"):
        tiny_cfg(tmp_path, "training.grad_accum=2",
                 "training.curriculum=[{seq_len: 32, max_steps: 1}, {seq_len: 64, max_steps: 1, batch_size: 3}]")
    with pytest.raises(ConfigError, match="max_steps"):
        tiny_cfg(tmp_path, "training.curriculum=[{seq_len: 32}]")
    with pytest.raises(ConfigError, match="niah_bogus"):
        tiny_cfg(tmp_path, "training.curriculum=[{seq_len: 32, max_steps: 1, tasks: [niah_bogus]}]")
    # a task curriculum: each stage's rows come from its own tasks
    from titans.training.trainer import curriculum_stage_configs

    cfg = tiny_cfg(tmp_path, "data.tasks=[niah]", "training.curriculum=[{seq_len: 512, max_steps: 1, tasks: "
                   "[niah_passkey]}, {seq_len: 1024, max_steps: 1}]")
    # a stage without tasks takes the run's data.tasks, not the previous stage's: allowed, with a warning that says so
    with pytest.warns(UserWarning, match=r"curriculum\[1\] sets no tasks: it trains on data.tasks=\['niah'\], not on "
                      r"the previous stage's \['niah_passkey'\]"):
        staged = curriculum_stage_configs(cfg)
    assert [c.data.tasks for c in staged] == [["niah_passkey"], ["niah"]]
    assert [c.data.seq_len for c in staged] == [512, 1024] and not any(c.training.curriculum for c in staged)


def test_config_errors_name_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.colour.*unknown key"):
        load_config(bad)
    bad.write_text("model:\n  dim: 30\n  heads: 4\n")
    with pytest.raises(ConfigError, match="heads"):
        load_config(bad)
    bad.write_text("training:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="training.lr"):
        load_config(bad)
    with pytest.raises(ConfigError, match="window"):
        load_config(None, ["model.window=0"])
    with pytest.raises(ConfigError, match="memory_max_forget"):  # a bound below the default start 1e-3
        load_config(None, ["model.memory_max_forget=1e-4"])
    res = CliRunner().invoke(app, ["train", "--config", str(bad)])
    assert res.exit_code == 2
    assert "training.lr" in res.output and "Traceback" not in res.output


def test_cli_help_and_missing_checkpoint():
    r = CliRunner()
    assert r.invoke(app, ["--help"]).exit_code == 0
    for cmd in ("train", "evaluate", "prepare-data", "generate"):
        out = r.invoke(app, [cmd, "--help"])
        assert out.exit_code == 0 and "Example" in out.output
    res = r.invoke(app, ["evaluate", "--checkpoint", "/nonexistent/run"])
    assert res.exit_code == 2 and "nonexistent" in res.output
    # python -m titans: the same command line without the console script (a source tree on PYTHONPATH)
    mod = subprocess.run([sys.executable, "-m", "titans", "evaluate", "--checkpoint", "/nonexistent/run"],
                         capture_output=True, text=True, timeout=120)
    assert mod.returncode == 2 and "nonexistent" in mod.stdout + mod.stderr


def test_every_command_and_option_says_what_it_is():
    """``titans CMD --help`` explains every option (help text on each, an example on each command), and a bad
    device (``profile --device``, ``training.device``) is a one-line usage error, not a traceback."""
    import typer.main

    group = typer.main.get_command(app)
    options, missing = [], []
    for name, cmd in group.commands.items():
        assert cmd.help and cmd.epilog and "Example" in cmd.epilog, name
        # (typer may bring a click of its own: options are told by their kind, not by click's class)
        options += [(name, p) for p in cmd.params if p.param_type_name == "option" and p.name != "help"]
    missing = [f"{name} {p.opts[0]}" for name, p in options if not (p.help or "").strip()]
    assert len(options) > 40 and not missing, f"options without help text: {missing}"
    res = CliRunner().invoke(app, ["profile", "--device", "cdua"])
    assert res.exit_code == 2 and "--device: 'cdua' is not a device" in res.output and "Traceback" not in res.output
    # the same check (trainer.pick_device) names the config key in training
    res = CliRunner().invoke(app, ["train", "--set", "training.device=cdua", "--set", "training.max_steps=1"])
    assert res.exit_code == 2 and "training.device: 'cdua' is not a device" in res.output


def test_shards_round_trip_and_corruption(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(20):
        (src / f"doc{i}.txt").write_text(f"héllo wörld {i}\n" * 50)
    m = prepare_shards(str(src), tmp_path / "shards", ByteTokenizer(), val_fraction=0.5, progress=False)
    assert m["dtype"] == "uint8"
    ds = ShardDataset(tmp_path / "shards", "train")
    ds.verify()
    text = ByteTokenizer().decode(ds.get(0, len(ds)).tolist())
    assert "héllo wörld" in text
    b1 = TokenBatcher(ds, 16, 4, seed=3).batch(5)
    assert torch.equal(b1, TokenBatcher(ds, 16, 4, seed=3).batch(5))
    # two ranks together see exactly the single-process global batch
    full = TokenBatcher(ds, 16, 4, seed=3, world_size=2, rank=0).batch(2)
    other = TokenBatcher(ds, 16, 4, seed=3, world_size=2, rank=1).batch(2)
    single = TokenBatcher(ds, 16, 8, seed=3).batch(2)
    assert not torch.equal(full, other)
    assert single.shape == (8, 17) and full.shape == (4, 17)
    shard = tmp_path / "shards" / m["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        ShardDataset(tmp_path / "shards", "train").verify()
    (tmp_path / "shards" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardDataset(tmp_path / "shards", "train")


def test_a_source_too_small_for_a_split_says_how_to_fix_it(tmp_path):
    """One file goes to one split whole: the empty split's error names the source, the split and the knob."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello world\n")
    with pytest.raises(ValueError, match=r"'.*corpus': the val split is empty.*data.val_fraction"):
        prepare_shards(str(tmp_path / "corpus"), tmp_path / "shards", ByteTokenizer(), progress=False)


def test_shards_are_written_through_temp_files_of_their_own(tmp_path):
    """Two runs sharing a data cache may tokenize it at once: a shard's temp file must be unique to its writer (a
    fixed ``<shard>.tmp`` made one run's rename fail when the other had already renamed it). A directory standing
    where that fixed name would be stands in for the other writer."""
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(20):
        (src / f"doc{i}.txt").write_text(f"some text to tokenize {i}\n" * 50)
    out = tmp_path / "shards"
    for name in ("train_000.bin.tmp", "val_000.bin.tmp"):
        (out / name).mkdir(parents=True)
    m = prepare_shards(str(src), out, ByteTokenizer(), val_fraction=0.5, progress=False)
    ShardDataset(out, "train").verify()
    assert m["splits"]["train"]["tokens"] > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_checkpoint_round_trip_and_errors(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = build_model(cfg.model)
    export_model(model, cfg, tmp_path / "export")
    loaded, cfg2 = load_model(tmp_path / "export")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.lm_head.weight is loaded.embed.weight  # tie survives
    other = load_config("small", TINY + ["model.dim=64"])
    with pytest.raises(CheckpointError, match="different architecture"):
        load_model(tmp_path / "export", expect=other)
    w = tmp_path / "export" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "export")


def test_a_run_its_checkpoints_folder_and_its_latest_file_all_name_the_latest_checkpoint(tmp_path):
    """``--checkpoint`` takes whatever a user copies from a run: the run folder, its ``checkpoints`` folder, the
    ``latest`` pointer file itself (its text names the step folder), or a step folder; a pointer to a checkpoint
    that is gone, or any other file, is an error that names what is wrong."""
    cfg = tiny_cfg(tmp_path)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    run = tmp_path / "run"
    save_checkpoint(run, 3, model, opt, sched, {}, cfg)
    step = save_checkpoint(run, 7, model, opt, sched, {}, cfg)
    for given in (run, run / "checkpoints", run / "checkpoints" / "latest", step, str(run)):
        assert resolve_checkpoint(given) == step, given
    assert resolve_checkpoint(run / "checkpoints" / "step_0000003") == run / "checkpoints" / "step_0000003"
    (step / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="step_0000007.*holds no model.safetensors"):
        resolve_checkpoint(run / "checkpoints" / "latest")
    with pytest.raises(CheckpointError, match="a file; expected"):
        resolve_checkpoint(run / "checkpoints" / "step_0000003" / "config.yaml")
    with pytest.raises(CheckpointError, match="no such"):
        resolve_checkpoint(run / "nothing")
    with pytest.raises(CheckpointError, match="no checkpoints/latest"):
        resolve_checkpoint(tmp_path)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    model = build_model(cfg.model)
    path = tmp_path / "w.safetensors"
    save_weights(model, path)
    before = path.read_bytes()
    import titans.utils.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_weights(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".w.")] == []


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    code = f"""
import os, signal, threading
from titans.training.trainer import train
from titans.utils.config import load_config
cfg = load_config("small", {TINY!r} + ["training.out_dir={tmp_path / 'run'}", "training.max_steps=100000",
                  "training.eval_every=100000", "training.ckpt_every=100000"])
metrics = {str(tmp_path / 'run' / 'metrics.jsonl')!r}

def kill_once_training():  # wait until steps are being logged, so the handler is installed
    import time
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=kill_once_training, daemon=True).start()
s = train(cfg)
print("INTERRUPTED", s["interrupted"], s["step"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "INTERRUPTED True" in out.stdout
    step = int(out.stdout.split()[-1])
    assert (tmp_path / "run" / "checkpoints" / f"step_{step:07d}" / "model.safetensors").is_file()


def test_time_limit_stops_with_a_checkpoint_and_an_evaluation(tmp_path):
    # a limit far below one step's time: the run stops after its first step, evaluated and saved
    cfg = tiny_cfg(tmp_path, "training.max_steps=1000", "training.eval_every=1000", "training.ckpt_every=1000",
                   "training.max_time_s=1e-6")
    s = train(cfg)
    assert s["time_limited"] and not s["interrupted"]
    assert s["step"] == 1 and "val_loss" in s
    assert (tmp_path / "run" / "checkpoints" / "step_0000001" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="max_time_s"):
        tiny_cfg(tmp_path, "training.max_time_s=0")


def test_build_data_uses_stdlib_by_default(tmp_path):
    cfg = tiny_cfg(tmp_path)
    train_ds, val_ds, tok = build_data(cfg.data, tmp_path / "cache", progress=False)
    assert len(train_ds) > 50_000 and len(val_ds) > 0 and tok.vocab_size == 256


def test_two_process_gloo_ddp_step_equals_single_process_step(tmp_path):
    """torchrun with 2 CPU processes (gloo, DDP) on a global batch of 8 == one process on the same 8 rows."""
    from safetensors.torch import load_file

    common = [f"--set={o}" for o in TINY + ["training.max_steps=2", "training.eval_every=100",
                                            "training.ckpt_every=100", "training.device=cpu",
                                            "training.warmup_steps=0", "model.variant=mag"]]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    # build the data cache once so both runs read the same shards
    single = subprocess.run([sys.executable, "-m", "titans.scripts.cli", "train", "--config", "small", *common,
                             "--set=training.batch_size=8", f"--out={tmp_path / 'single'}"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731",
                          "-m", "titans.scripts.cli", "train", "--config", "small", *common,
                          "--set=training.batch_size=4", f"--out={tmp_path / 'ddp'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    a = load_file(str(tmp_path / "single" / "checkpoints" / "step_0000002" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert a.keys() == b.keys()
    cfg = load_config("small", TINY + ["model.variant=mag"])
    torch.manual_seed(cfg.training.seed)  # the trainer's initialisation
    init = build_model(cfg.model).state_dict()
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-4, atol=2e-6, msg=k)
        moved += int(not torch.equal(a[k], init[k].to(a[k].dtype)))
    assert moved > len(a) // 2, (moved, len(a))  # the steps really changed the weights


def test_time_limit_stops_every_ddp_rank_together(tmp_path):
    """rank 0's clock decides for all ranks (a broadcast each step): both stop after step 1, nothing hangs."""
    args = [f"--set={o}" for o in TINY + ["training.max_steps=1000", "training.eval_every=1000",
                                          "training.ckpt_every=1000", "training.device=cpu", "training.batch_size=4",
                                          "training.max_time_s=1e-6"]]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29733",
                          "-m", "titans.scripts.cli", "train", "--config", "small", *args, f"--out={tmp_path / 'run'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert steps == ["step_0000001"], steps


def test_nonfinite_gradients_skip_the_update():
    from titans.training.trainer import clipped_step

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 3)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    norm, stepped = clipped_step(model, opt, 1.0)
    assert not stepped and math.isnan(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters()) and not opt.state  # moments untouched
    model(torch.randn(4, 3)).sum().backward()
    norm, stepped = clipped_step(model, opt, 1.0)
    assert stepped and math.isfinite(norm)
    assert not torch.equal(before[0], model.weight)


def test_every_shipped_config_validates_and_builds():
    # on the meta device: parameters get shapes but no storage, so even the large config costs nothing
    from titans.core.models import build_model
    from titans.utils.config import list_builtin_configs

    names = list_builtin_configs()
    assert {"default", "small", "base", "large", "experiment", "long_context", "passkey"} <= set(names)
    for name in names:
        cfg = load_config(name)
        with torch.device("meta"):
            model = build_model(cfg.model)
        assert model.num_parameters() > 0, name


def test_a_failed_cuda_graph_capture_falls_back_to_eager_training(tmp_path, monkeypatch):
    """A capture that fails (RESULTS 4o: once, for one stage of eight processes under MPS) must not lose the run: the
    trainer warns and trains eagerly; the loss curve is the eager one."""
    import titans.training.trainer as trainer

    def failing_capture(*args, **kwargs):
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture\nmore")

    common = ["training.max_steps=3", "training.eval_every=100", "training.ckpt_every=100"]
    eager = train(tiny_cfg(tmp_path / "eager", *common))
    monkeypatch.setattr(trainer, "graphed_loss", failing_capture)
    with pytest.warns(RuntimeWarning, match="capture failed .*operation failed.*continues eagerly"):
        fell_back = train(tiny_cfg(tmp_path / "graphs", *common, "training.cuda_graphs=true"))
    assert fell_back["step"] == 3
    assert fell_back["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-6)
    assert fell_back["cuda_graphs"] == {"used": False, "capture_check": None,
                                        "why_not": "the capture failed: CUDA error: operation failed due to a "
                                                   "previous error during capture"}
    assert "cuda_graphs" not in eager


def test_capture_agreement_judges_the_captured_loss_against_the_eager_ones():
    """The check graphed_loss runs after a capture: the replayed loss against the warm-up's.  Session 37's numbers
    (MAC's batched read-outs captured on an H200: 4.176023 against the eager 4.176198) disagree; rounding-level
    differences agree; non-deterministic eager losses widen the tolerance; a non-finite loss never agrees."""
    from titans.training.trainer import CAPTURE_LOSS_RTOL, capture_agreement

    eager = [4.176197528839111] * 3
    bad = capture_agreement(eager, 4.176022529602051)
    assert not bad["agrees"] and bad["rel_diff"] == pytest.approx(4.1904e-05, rel=1e-3)
    assert bad["eager_spread"] == 0 and bad["tolerance"] == CAPTURE_LOSS_RTOL
    same = capture_agreement(eager, eager[-1])
    assert same["agrees"] and same["rel_diff"] == 0 and same["replayed"] == same["eager"] == eager[-1]
    assert capture_agreement(eager, eager[-1] * (1 + 0.5 * CAPTURE_LOSS_RTOL))["agrees"]
    noisy = [4.0, 4.0 * (1 + 3e-5), 4.0]  # eager kernels that vary by 3e-5: 1.2e-4 of room
    assert capture_agreement(noisy, 4.0 * (1 + 1e-4))["agrees"]
    assert not capture_agreement(noisy, 4.0 * (1 + 2e-4))["agrees"]
    assert not capture_agreement(eager, float("nan"))["agrees"]
    assert not capture_agreement([float("inf")] * 2, float("inf"))["agrees"]
    with pytest.raises(ValueError, match="no eager losses"):
        capture_agreement([], 1.0)


def test_a_capture_that_disagrees_with_the_eager_step_is_not_trained(tmp_path, monkeypatch):
    """graphed_loss's check (the captured loss against the eager one on the same batch) failing: the trainer warns
    and trains with the eager step, never calling the captured one; the loss curve is the eager one."""
    import titans.training.trainer as trainer

    class DisagreeingCapture:
        capture_check = trainer.capture_agreement([4.176197528839111] * 3, 4.176022529602051)

        def __call__(self, *args):
            raise AssertionError("a capture whose loss disagrees with the eager step's was trained")

    common = ["training.max_steps=3", "training.eval_every=100", "training.ckpt_every=100"]
    eager = train(tiny_cfg(tmp_path / "eager", *common))
    monkeypatch.setattr(trainer, "graphed_loss", lambda *args, **kwargs: DisagreeingCapture())
    with pytest.warns(RuntimeWarning, match="captured step's loss differs .*4.19e-05.*continues eagerly"):
        fell_back = train(tiny_cfg(tmp_path / "graphs", *common, "training.cuda_graphs=true"))
    assert fell_back["step"] == 3
    assert fell_back["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-6)
    graphs = fell_back["cuda_graphs"]
    assert not graphs["used"] and graphs["why_not"] == "the captured step's loss differs from the eager step's"
    assert graphs["capture_check"] == DisagreeingCapture.capture_check
    # the command line says so after the run
    sets = [a for o in (*TINY, *common, "training.cuda_graphs=true") for a in ("--set", o)]
    with pytest.warns(RuntimeWarning, match="continues eagerly"):
        r = CliRunner().invoke(app, ["train", "--config", "small", "--out", str(tmp_path / "cli"), *sets])
    assert r.exit_code == 0, r.output
    assert "CUDA graphs: not used (the captured step's loss differs from the eager step's)" in r.output


def test_training_compile_goes_through_compile_fn_with_in_place_buffers_off(tmp_path, monkeypatch):
    """``training.compile`` compiles through ``titans.utils.compiling.compile_fn`` (inductor's in-place buffers
    changed the gradients, benchmarks/RESULTS.md section 6, session 13).  Inductor is too slow for CI here: the
    trainer's compile is traced with dynamo's eager backend, and compile_fn's options are read off its call."""
    import titans.training.trainer as trainer_mod
    import titans.utils.compiling as compiling

    seen = []
    real_compile = torch.compile

    def recording_compile(fn, **kwargs):
        seen.append(kwargs)
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(compiling.torch, "compile", recording_compile)
    calls = []
    monkeypatch.setattr(trainer_mod, "compile_fn", lambda m: calls.append(m) or compiling.compile_fn(m))
    # one segment and a 1-token piece a row (seq_len 16 + 1, window 16): the whole-model trace unrolls fewer segments
    s = train(tiny_cfg(tmp_path, "training.max_steps=2", "training.eval_every=2", "training.compile=true",
                       "training.compile_scope=model", "data.seq_len=16"))
    assert len(calls) == 1 and math.isfinite(s["val_loss"])
    assert seen[0]["backend"] == "inductor" and seen[0]["options"] == compiling.INDUCTOR_OPTIONS
    assert compiling.INDUCTOR_OPTIONS["inplace_buffers"] is False
    compiling.compile_fn(torch.nn.Linear(2, 2), backend="aot_eager", fullgraph=True)
    assert seen[-1] == {"backend": "aot_eager", "fullgraph": True}  # no inductor options for other backends
    blocks = []
    monkeypatch.setattr(trainer_mod, "compile_blocks", lambda m: blocks.append(m) or compiling.compile_blocks(m,
                                                                                                       "eager"))
    s = train(tiny_cfg(tmp_path / "blocks", "training.max_steps=2", "training.eval_every=2", "training.compile=true",
                       "training.compile_scope=blocks", "data.seq_len=16"))
    assert len(blocks) == 1 and len(calls) == 1 and math.isfinite(s["val_loss"])  # regional: no whole-model compile
    # CUDA graphs take regional compilation only (the blocks compile in the eager warm-up before the capture); here
    # on the CPU the blocks scope gets as far as the capture's own device check
    with pytest.raises(ValueError, match="compile_scope=blocks"):
        train(tiny_cfg(tmp_path / "g1", "training.max_steps=1", "training.compile=true", "training.cuda_graphs=true",
                       "training.compile_scope=model"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            train(tiny_cfg(tmp_path / "g2", "training.max_steps=1", "training.compile=true",
                           "training.cuda_graphs=true"))


def test_gc_paused_turns_the_collector_off_inside_and_restores_it():
    """Captures run after a full collection with Python's cyclic collector off (a collection inside a capture can
    destroy an earlier capture's graphs there, which invalidates the capture); its state comes back after the block,
    also on error."""
    import gc
    import weakref

    from titans.utils.tensors import gc_paused

    class Node:
        pass

    cycle = Node()
    cycle.self = cycle
    dead = weakref.ref(cycle)
    del cycle  # garbage only a collection frees
    assert gc.isenabled()
    with gc_paused():
        assert dead() is None  # collected on entry, before the block
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="inside"), gc_paused():
        raise RuntimeError("inside")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # a collector that was off stays off
    finally:
        gc.enable()


def test_wavefront_training_follows_the_one_pass_loss_curve(tmp_path, monkeypatch, queues_at_cuda_check):
    """``training.wavefront=true`` trains with the segment-major forward (titans.training.wavefront): the same losses
    as the one-pass forward up to float32 rounding, with the default and with a longer step
    (``training.wavefront_step``); with the whole model compiled, or a step without the wavefront, it is refused by
    name.  A wavefront run asks CUDA for 32 hardware queues before it starts (CUDA_DEVICE_MAX_CONNECTIONS, before its
    first torch.cuda.is_available(); a run without the wavefront leaves the variable alone)."""
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    common = ["training.max_steps=3", "training.eval_every=100", "training.ckpt_every=100"]
    one_pass = train(tiny_cfg(tmp_path / "one", *common))
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    # asked before the run's first torch.cuda.is_available(), which starts CUDA's driver (it reads the variable then)
    seen = queues_at_cuda_check()
    wave = train(tiny_cfg(tmp_path / "wave", *common, "training.wavefront=true"))
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "32" and seen and seen[0] == "32"
    assert wave["step"] == 3
    assert wave["train_loss"] == pytest.approx(one_pass["train_loss"], rel=1e-5)
    # 24-token steps over 32-token rows: pieces that cross the 16-token segments, the same losses again
    cfg = tiny_cfg(tmp_path / "wave24", *common, "training.wavefront=true", "training.wavefront_step=24")
    assert cfg.training.wavefront_step == 24 and cfg.model.window < 24 < cfg.data.seq_len
    assert train(cfg)["train_loss"] == pytest.approx(one_pass["train_loss"], rel=1e-5)
    with pytest.raises(ConfigError, match="training.wavefront"):
        tiny_cfg(tmp_path / "bad", "training.wavefront=true", "training.compile=true", "training.compile_scope=model")
    with pytest.raises(ConfigError, match="training.wavefront_step is the step of training.wavefront"):
        tiny_cfg(tmp_path / "bad", "training.wavefront_step=1024")
    with pytest.raises(ConfigError, match="wavefront_step"):
        tiny_cfg(tmp_path / "bad", "training.wavefront=true", "training.wavefront_step=0")


def test_inductor_options_from_the_config_reach_the_compile(tmp_path, monkeypatch):
    """``training.inductor_options`` is checked when the config loads (unknown names and inplace_buffers refused,
    naming the key) and handed to the compile of the model."""
    import titans.training.trainer as trainer_mod

    for bad, words in [("{no_such_option: true}", "no_such_option"), ("{inplace_buffers: true}", "stays off")]:
        with pytest.raises(ConfigError, match="training.inductor_options") as err:
            tiny_cfg(tmp_path, f"training.inductor_options={bad}")
        assert words in str(err.value)
    seen = []
    monkeypatch.setattr(trainer_mod, "compile_blocks", lambda m, **kw: seen.append(kw) or m)  # (not compiled here)
    train(tiny_cfg(tmp_path, "training.max_steps=1", "training.eval_every=1", "training.compile=true",
                   "training.inductor_options={combo_kernels: true}"))
    assert seen == [{"options": {"combo_kernels": True}}]
