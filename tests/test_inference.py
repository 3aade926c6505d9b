"""Inference and memory management (issue 5): exact save/load, corrupted and mismatched files, atomic
writes, SessionStore offload under a tiny budget, failing disks, batch-infer resume, chat end to end."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from titans.core.models import build_model
from titans.data.preprocessing import ByteTokenizer
from titans.inference import MemorySession, MemoryStateError, SessionStore, load_state, trace_memory
from titans.inference import memory_management as mm
from titans.scripts.cli import app
from titans.utils.checkpoint import export_model
from titans.utils.config import load_config

TOK = ByteTokenizer()
SMALL = ["model.dim=32", "model.depth=2", "model.heads=2", "model.window=16", "model.memory_chunk_size=8",
         "model.persistent_tokens=2", "data.max_bytes=200000"]


def model_for(variant="mac", dtype=torch.float64, **extra):
    cfg = load_config("small", SMALL + [f"model.variant={variant}"] + [f"model.{k}={v}" for k, v in extra.items()])
    torch.manual_seed(0)
    return build_model(cfg.model).to(dtype).eval(), cfg


def states_identical(a, b) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm", "swa"])
def test_save_load_is_bit_exact_and_continuing_matches_never_saving(variant, tmp_path):
    model, _ = model_for(variant)
    with MemorySession(model, TOK, "s") as a, MemorySession(model, TOK, "t") as b:
        a.feed("The memory learns at test time. " * 3)
        path = a.save(tmp_path / "s.safetensors")
        b.load(path)
        assert states_identical(a.state, b.state)
        assert torch.equal(a.last_logits, b.last_logits)
        out_a = a.generate(" and then", 12, temperature=0.7, seed=3)
        out_b = b.generate(" and then", 12, temperature=0.7, seed=3)
        assert out_a == out_b
        # continuing: equal up to float64 rounding (a loaded tensor is contiguous where the live one may
        # be a strided view, so kernels may sum in another order)
        ta, tb = a.state.tensors(), b.state.tensors()
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-12, atol=1e-14, msg=k)
        nxt = torch.tensor([TOK.encode("xyz")])
        torch.testing.assert_close(model(nxt, state=a.state).logits, model(nxt, state=b.state).logits,
                                   rtol=1e-12, atol=1e-14)


def test_corrupted_truncated_and_mismatched_files_fail_clearly(tmp_path):
    model, _ = model_for("mag")
    other, _ = model_for("mag", dim=48, heads=3)
    s = MemorySession(model, TOK)
    s.feed("hello memory")
    good = s.save(tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MemoryStateError, match="truncated or corrupt"):
        load_state(tmp_path / "trunc.safetensors", model)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a byte of tensor data: only the checksum notices
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(MemoryStateError, match="checksum mismatch"):
        load_state(tmp_path / "flip.safetensors", model)
    with pytest.raises(MemoryStateError, match="another model config"):
        load_state(good, other)
    with pytest.raises(MemoryStateError, match="no such memory state file"):
        load_state(tmp_path / "missing.safetensors", model)
    (tmp_path / "junk.safetensors").write_text("not a safetensors file")
    with pytest.raises(MemoryStateError, match="truncated or corrupt"):
        load_state(tmp_path / "junk.safetensors", model)


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model, _ = model_for("lmm")
    s = MemorySession(model, TOK)
    s.feed("first version")
    path = s.save(tmp_path / "m.safetensors")
    before = path.read_bytes()
    s.feed(" more text")

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mm, "save_file", disk_full)
    with pytest.raises(OSError):
        s.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind
    load_state(path, model)  # and it still loads


def test_retrieve_reads_without_writing_and_close_is_deterministic(tmp_path):
    model, _ = model_for("mac")
    s = MemorySession(model, TOK)
    s.feed("alpha beta gamma delta " * 4)
    before = s.snapshot()
    out = s.retrieve("beta gamma")
    assert out and all(v.shape == (len("beta gamma"), 32) for v in out.values())
    assert states_identical(before, s.state)
    d = s.tempdir()
    (d / "x").write_text("scratch")
    with s:
        pass
    assert s.closed and s.state is None and not d.exists()
    with pytest.raises(RuntimeError, match="closed"):
        s.feed("more")


def test_session_store_offloads_and_restores_fifty_sessions_losslessly(tmp_path):
    model, _ = model_for("mag", dtype=torch.float32)
    one = MemorySession(model, TOK).state.nbytes()
    expected = {}
    with SessionStore(model, TOK, tmp_path / "offload", budget_bytes=3 * one) as store:
        for i in range(50):
            s = store.create(f"user-{i}")
            s.feed(f"session {i} remembers the number {i * 7919}. ")
            expected[f"user-{i}"] = s.snapshot()
        assert len(store.sessions) <= 3 and len(store.offloaded) >= 47
        assert store.live_bytes() <= 3 * one + one  # within budget (+ the session being used)
        for i in reversed(range(50)):  # bring every one back, in another order
            s = store.get(f"user-{i}")
            assert states_identical(s.state, expected[f"user-{i}"]), i
            assert len(store.sessions) <= 3
        s = store.get("user-0")
        s.feed(" more")
        assert s.state.position == expected["user-0"].position + len(" more")
    assert not any((tmp_path / "offload").iterdir())  # closing the store removed its files


def test_failing_disk_keeps_sessions_in_ram_with_a_warning(tmp_path, monkeypatch, caplog):
    model, _ = model_for("lmm", dtype=torch.float32)
    one = MemorySession(model, TOK).state.nbytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mm, "save_state", disk_full)
    store = SessionStore(model, TOK, tmp_path / "offload", budget_bytes=one)
    with caplog.at_level(logging.WARNING, logger="titans.inference.memory_management"):
        snaps = {}
        for i in range(5):
            s = store.create(f"s{i}")
            s.feed(f"text {i}")
            snaps[f"s{i}"] = s.snapshot()
    assert len(store.sessions) == 5 and not store.offloaded
    assert "keeping it in memory" in caplog.text
    for sid, snap in snaps.items():
        assert states_identical(store.get(sid).state, snap)


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x" * 200, "a\\b", "a..b"])
def test_session_ids_are_validated(bad, tmp_path):
    model, _ = model_for("lmm", dtype=torch.float32)
    store = SessionStore(model, TOK, tmp_path, budget_bytes=10**9)
    with pytest.raises(ValueError, match="session id"):
        store.create(bad)


def test_trace_memory_reports_surprise_gates_and_losses():
    model, _ = model_for("mag")
    ids = torch.tensor([TOK.encode("abcabcabcabcabcabc")])
    layers = trace_memory(model, ids)
    assert [r["layer"] for r in layers] == [0, 1]
    T = ids.shape[1] + 2  # the persistent tokens are read first by a fresh MAG memory
    for r in layers:
        for k in ("grad_norm", "loss_before", "loss_after", "theta", "eta", "alpha"):
            assert r[k].shape == (2, T) and torch.isfinite(r[k]).all(), k
        assert (r["grad_norm"] > 0).all()
        assert r["loss_after"].mean() < r["loss_before"].mean()  # the update reduced the inner loss
        assert len(r["weight_norms"]) == 2


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    model, cfg = model_for("mac", dtype=torch.float32)
    out = tmp_path_factory.mktemp("exp")
    export_model(model, cfg, out)
    return out


def test_batch_infer_resumes_and_skips_bad_lines(export_dir, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "def f("}\nnot json\n{"id": "b", "prompt": "class X"}\n'
                   '{"id": "c"}\n{"id": "d", "prompt": "import", "max_new_tokens": 3}\n')
    args = ["batch-infer", "--checkpoint", str(export_dir), "--input", str(inp), "--output", str(out),
            "--max-new-tokens", "5", "--batch-size", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["id"] for x in rows] == ["a", "b", "d"] and "bad lines 2" in r.output
    assert len(rows[2]["completion"]) <= 3 * 4
    r = CliRunner().invoke(app, args)
    assert "generated 0, already done 3" in r.output
    with inp.open("a") as f:
        f.write('{"id": "e", "prompt": "print("}\n{"id": 7, "prompt": "x = "}\n')
    r = CliRunner().invoke(app, args)
    assert "generated 2" in r.output
    # ids come back as the input gave them (a number stays a number), and a resumed run skips them all the same
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b", "d", "e", 7]
    assert "generated 0, already done 5" in CliRunner().invoke(app, args).output


def test_chat_end_to_end_through_stdin(export_dir, tmp_path):
    script = f"hello there\n/stats\nwhat did I say?\n/save {tmp_path / 'chat.safetensors'}\n/reset\n/stats\n" \
             f"/load {tmp_path / 'chat.safetensors'}\n/stats\n/bogus\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "titans.scripts.cli", "chat", "--checkpoint", str(export_dir),
                        "--max-new-tokens", "8", "--seed", "1"], input=script, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert out.count("model: ") == 2
    stats = [line for line in out.splitlines() if line.startswith("[tokens seen")]
    assert len(stats) == 3
    seen = [int(line.split()[2].replace(",", "")) for line in stats]
    assert seen[0] > len("hello there") and seen[1] == 0 and seen[2] > seen[0]
    assert "surprise of last turn" in stats[0]
    assert "[memory reset]" in out and "[saved" in out and "[loaded" in out and "[unknown command /bogus" in out


def test_retention_half_life():
    from titans.inference.predictor import retention_half_life

    alpha = torch.tensor([[1e-3] * 50, [1e-5] * 50, [0.0] * 50])
    hl = retention_half_life(alpha)
    assert hl[0].item() == pytest.approx(math.log(2) / -math.log1p(-1e-3), rel=1e-5)  # ~693 tokens
    assert hl[1].item() == pytest.approx(69314, rel=1e-3) and math.isinf(hl[2].item())


def test_cli_analyze_memory_convert_and_profile(export_dir, tmp_path):
    r = CliRunner().invoke(app, ["analyze-memory", "--checkpoint", str(export_dir), "--text",
                                 "the quick brown fox " * 5, "--output", str(tmp_path / "an")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "an" / "memory_analysis.json").read_text())
    assert res["layers"] and len(res["layers"][0]["grad_norm"]) == 2
    for layer in res["layers"]:  # half-life per head, from the traced alphas
        alpha = torch.tensor(layer["alpha"], dtype=torch.float64)
        expect = math.log(2) / -torch.log1p(-alpha).mean(-1)
        assert layer["half_life_tokens"] == pytest.approx(expect.tolist(), rel=1e-5)
    assert "half-life" in r.output
    assert (tmp_path / "an" / "memory_analysis.png").read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(app, ["convert-checkpoint", "--checkpoint", str(export_dir), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0 and (tmp_path / "c" / "export.json").is_file()
    r = CliRunner().invoke(app, ["profile", "--config", "small", *[f"--set={s}" for s in SMALL], "--seq-len", "64",
                                 "--steps", "1", "--output", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["flops_per_token"]["memory"] > 0 and p["train_tokens_per_s"] > 0
    r = CliRunner().invoke(app, ["generate", "--checkpoint", str(export_dir), "--prompt", "abc", "--max-new-tokens",
                                 "4", "--session", str(tmp_path / "g.safetensors")])
    assert r.exit_code == 0, r.output
    st = load_state(tmp_path / "g.safetensors", __import__("titans.utils.checkpoint", fromlist=["x"])
                    .load_model(export_dir)[0])
    assert st.position == 3 + 4
    gen = ["generate", "--checkpoint", str(export_dir), "--prompt", "abc", "--max-new-tokens", "6",
           "--temperature", "0"]
    plain, graphed = CliRunner().invoke(app, gen), CliRunner().invoke(app, [*gen, "--cuda-graphs"])
    assert plain.exit_code == 0 and graphed.exit_code == 0, graphed.output
    assert graphed.output == plain.output and len(plain.output) > len("abc\n")
    both = CliRunner().invoke(app, [*gen, "--cuda-graphs", "--session", str(tmp_path / "g2.safetensors")])
    assert both.exit_code == 2 and "--cuda-graphs" in both.output
    bad = CliRunner().invoke(app, ["analyze-memory", "--checkpoint", str(tmp_path / "nope"), "--text", "x"])
    assert bad.exit_code == 2 and "error:" in bad.output
