"""Long-context tasks (issue 6): deterministic generators, exact lengths, recoverable answers, the
training mixture, and the evaluation grid end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from titans.core.models import build_model
from titans.data.preprocessing import ByteTokenizer
from titans.data.tasks import TASK_NAMES, Haystack, expand_tasks, insert_at, make_example
from titans.data.tasks.babilong import MOVE_VERBS, NUMBERS
from titans.inference.long_context import (
    answer_greedy,
    evaluate_tasks,
    forced_from,
    markdown_table,
    score_answer,
    stream_context,
    wilson_interval,
    write_report,
)

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def hay():
    return Haystack("stdlib", TOK, max_bytes=200_000)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_deterministic_and_exact_length(task, hay):
    for L in (400, 1000, 4097):
        a = make_example(task, L, 11, TOK, hay, depth=0.4)
        b = make_example(task, L, 11, TOK, hay, depth=0.4)
        assert a.input_ids == b.input_ids and a.answer == b.answer
        assert a.length == L
        assert TOK.decode(a.answer_ids) == a.answer
    others = {make_example(task, 1000, s, TOK, hay, depth=0.4).answer for s in range(12)}
    assert len(others) > 1  # the seed matters


@pytest.mark.parametrize("kind", ["passkey", "number", "uuid"])
def test_niah_answer_is_in_the_needle_at_the_requested_depth(kind, hay):
    for depth in (0.0, 0.3, 1.0):
        ex = make_example(f"niah_{kind}", 2000, 5, TOK, hay, depth=depth)
        text = TOK.decode(ex.input_ids)
        pos, needle = ex.facts[0]
        assert ex.answer in needle and TOK.decode(ex.input_ids[pos:pos + len(TOK.encode(needle))]) == needle
        assert text.count(ex.answer) >= 1
        hay_len = ex.length - len(TOK.encode(needle)) - (ex.length - len(ex.input_ids))
        question_len = len(text) - text.rfind("\n")
        assert abs(pos - depth * (ex.length - len(TOK.encode(needle)) - question_len)) <= 2 or hay_len < 0
    if kind == "uuid":
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", ex.answer)


def _replay(facts: list[str], question: str) -> str:
    """An independent reader: recompute the answer from the story sentences alone."""
    where, holder, trail = {}, {}, {}
    for f in facts:
        verbs = "|".join(MOVE_VERBS)
        m = re.fullmatch(rf"(\w+) (?:{verbs}) the (\w+)\.", f)
        if m:
            where[m[1]] = m[2]
            for o, h in holder.items():
                if h == m[1] and (not trail[o] or trail[o][-1] != m[2]):
                    trail[o].append(m[2])
            continue
        m = re.fullmatch(r"(\w+) picked up the (\w+)\.", f)
        if m:
            holder[m[2]] = m[1]
            trail.setdefault(m[2], [])
            if not trail[m[2]] or trail[m[2]][-1] != where[m[1]]:
                trail[m[2]].append(where[m[1]])
            continue
        m = re.fullmatch(r"(\w+) dropped the (\w+)\.", f)
        assert m, f
        holder[m[2]] = None
    if m := re.fullmatch(r"Where is (\w+)\? Answer: ", question):
        return where[m[1]]
    if m := re.fullmatch(r"Where is the (\w+)\? Answer: ", question):
        return trail[m[1]][-1]
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\? Answer: ", question):
        t = trail[m[1]]
        return t[t.index(m[2]) - 1]
    if m := re.fullmatch(r"Is (\w+) in the (\w+)\? Answer: ", question):
        return "yes" if where[m[1]] == m[2] else "no"
    if m := re.fullmatch(r"How many objects is (\w+) carrying\? Answer: ", question):
        return NUMBERS[sum(1 for h in holder.values() if h == m[1])]
    raise AssertionError(question)


@pytest.mark.parametrize("task", [t for t in TASK_NAMES if t.startswith("babilong_")])
def test_babilong_answers_follow_from_the_facts_in_the_text(task, hay):
    for seed in range(15):
        ex = make_example(task, 1500, seed, TOK, hay)
        positions = [p for p, _ in ex.facts]
        assert positions == sorted(positions)
        for pos, fact in ex.facts:  # each fact really is in the text where it says
            assert TOK.decode(ex.input_ids[pos:pos + len(fact) + 2]).strip() == fact
        assert TOK.decode(ex.input_ids).endswith(ex.meta["question"])
        assert _replay([f for _, f in ex.facts], ex.meta["question"]) == ex.answer


@pytest.mark.parametrize("task,answers", [("babilong_qa6", {"yes", "no"}), ("babilong_qa7", {"none", "one", "two"})])
def test_babilong_yes_no_and_counting_answers_are_balanced(task, answers, hay):
    # asked of a random person these came out ~65% "yes" / ~70% "none": a constant answer scored that much
    for length in (300, 1500):
        got = Counter(make_example(task, length, seed, TOK, hay).answer for seed in range(90))
        assert set(got) <= answers | {"three"}
        assert max(got.values()) / 90 < 0.5 if task == "babilong_qa7" else 0.35 < got["yes"] / 90 < 0.65, got


def test_insert_at_and_errors(hay):
    ids, starts = insert_at(list(range(10)), [(0.5, [-1, -2]), (0.0, [-3]), (1.0, [-4])])
    assert ids == [-3, 0, 1, 2, 3, 4, -1, -2, 5, 6, 7, 8, 9, -4] and starts == [6, 0, 13]
    with pytest.raises(ValueError, match="too short"):
        make_example("niah_uuid", 50, 0, TOK, hay)
    with pytest.raises(ValueError, match="depth"):
        make_example("niah_passkey", 500, 0, TOK, None, depth=1.5)
    with pytest.raises(ValueError, match="expected one of"):
        make_example("niah_bogus", 500, 0, TOK, hay)
    with pytest.raises(ValueError, match="needs a real-text haystack"):
        make_example("niah_number", 500, 0, TOK, None)
    assert expand_tasks(["niah"]) == ["niah_passkey", "niah_number", "niah_uuid"]
    assert len(expand_tasks(["babilong"])) == 5


def test_mixture_batches_label_only_answers_in_task_rows(hay):
    import tempfile

    from titans.data.dataset import ShardDataset, prepare_shards
    from titans.data.tasks.mixture import TaskMixtureBatcher

    with tempfile.TemporaryDirectory() as d:
        prepare_shards("stdlib", d, TOK, max_bytes=300_000, progress=False)
        ds = ShardDataset(d, "train")
        mb = TaskMixtureBatcher(ds, TOK, hay, ["niah", "babilong"], 512, 8, seed=3, task_fraction=0.5)
        ids, labels = mb.batch(4)
        ids2, labels2 = mb.batch(4)
        assert torch.equal(ids, ids2) and torch.equal(labels, labels2)
        assert ids.shape == labels.shape == (8, 513)
        task_rows = [r for r in range(8) if (labels[r] == -100).any()]
        lm_rows = [r for r in range(8) if r not in task_rows]
        assert task_rows and lm_rows
        for r in task_rows:
            pos = (labels[r] != -100).nonzero().flatten()
            assert 1 <= len(pos) <= 36 and torch.equal(pos, torch.arange(pos[0], pos[-1] + 1))  # one answer span
            assert torch.equal(labels[r, pos], ids[r, pos])
        for r in lm_rows:
            assert torch.equal(labels[r], ids[r])
        # the answer ends at varying positions, not always at the end of the row (segment phase for MAC)
        ends = set()
        for step in range(6):
            _, lab = mb.batch(step)
            ends |= {int((row != -100).nonzero().max()) for row in lab if (row == -100).any()}
        assert len(ends) > 3 and min(ends) < 500
        # placement="end": the answer closes every task row
        at_end = TaskMixtureBatcher(ds, TOK, hay, ["niah"], 512, 8, seed=3, task_fraction=1.0, placement="end")
        _, lab = at_end.batch(4)
        assert all(row[-1] != -100 for row in lab)
        with pytest.raises(ValueError, match="placement"):
            TaskMixtureBatcher(ds, TOK, hay, ["niah"], 512, 8, seed=3, placement="middle")
        # placement="segments": rows either close on the answer or start it on a segment boundary
        seg = TaskMixtureBatcher(ds, TOK, hay, ["niah_passkey"], 512, 8, seed=3, task_fraction=1.0,
                                 placement="segments", segment=128)
        kinds = []
        for step in range(4):
            _, lab = seg.batch(step)
            for row in lab:
                pos = (row != -100).nonzero().flatten()
                kinds.append("end" if int(pos[-1]) == 512 else "boundary" if int(pos[0]) % 128 == 0 else "other")
        assert "other" not in kinds and 8 <= kinds.count("boundary") <= 24, kinds
        with pytest.raises(ValueError, match="segment"):
            TaskMixtureBatcher(ds, TOK, hay, ["niah"], 512, 8, seed=3, placement="segments")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from titans.utils.checkpoint import export_model
    from titans.utils.config import load_config

    cfg = load_config("small", ["model.dim=32", "model.depth=2", "model.heads=2", "model.window=32",
                                "model.memory_chunk_size=8", "model.persistent_tokens=2", "model.variant=mac",
                                "data.max_bytes=200000"])
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("export")
    export_model(build_model(cfg.model), cfg, out)
    return out


def test_streaming_answers_do_not_depend_on_the_piece_length(tiny_export):
    from titans.utils.checkpoint import load_model

    model, _ = load_model(tiny_export)
    model = model.double()
    ids = torch.randint(0, 256, (2, 150))
    a = answer_greedy(model, ids, 5, piece=1000)
    b = answer_greedy(model, ids, 5, piece=17)
    assert torch.equal(a, b)


def test_teacher_forced_predictions_equal_one_forward_over_context_and_answer(tiny_export):
    """forced_from, from the streamed state, == the argmax of one pass over context + answer (float64)."""
    from titans.utils.checkpoint import load_model

    model, _ = load_model(tiny_export)
    model = model.double()
    g = torch.Generator().manual_seed(3)
    ctx, ans = torch.randint(0, 256, (2, 133), generator=g), torch.randint(0, 256, (2, 6), generator=g)
    state, last = stream_context(model, ctx, piece=40)
    forced = forced_from(model, state, last, ans)
    full = model(torch.cat([ctx, ans[:, :-1]], 1)).logits[:, ctx.shape[1] - 1:].argmax(-1)
    assert forced.shape == ans.shape and torch.equal(forced, full)
    # the streamed state serves greedy decoding afterwards unchanged: same tokens as a fresh read
    assert torch.equal(answer_greedy(model, ctx, 4, piece=40), answer_greedy(model, ctx, 4, piece=1000))
    with pytest.raises(ValueError, match="empty context"):
        stream_context(model, ctx[:, :0])


def test_evaluation_grid_end_to_end(tiny_export, hay, tmp_path):
    from titans.utils.checkpoint import load_model

    model, _ = load_model(tiny_export)
    res = evaluate_tasks(model, TOK, ["niah_passkey", "babilong_qa1"], [128, 256], [0.0, 1.0], 2, hay, piece=64,
                         progress=False)
    assert len(res["cells"]) == 2 * 2 + 2
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in res["cells"])
    paths = write_report(res, tmp_path / "rep")
    assert json.loads(open(paths["json"]).read())["cells"][0]["task"] == "niah_passkey"
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in paths["plots"])
    assert "| niah_passkey | 0.0 |" in markdown_table(res)
    for c in res["cells"]:  # partial credit, recomputed from the predictions (byte tokenizer: one char a token)
        pairs = [(e["answer"], e["prediction"]) for e in c["examples"]]
        assert len(pairs) == c["samples"]
        assert c["first_token_accuracy"] == sum(a[0] == p[:1] for a, p in pairs) / len(pairs)
        right = sum(x == y for a, p in pairs for x, y in zip(a, p))
        assert c["token_accuracy"] == pytest.approx(right / sum(len(a) for a, _ in pairs))
        assert c["accuracy"] <= min(c["first_token_accuracy"], c["token_accuracy"])
        # the true prefix makes the first token the same prediction, and can only be as good at exact answers
        assert 0.0 <= c["forced_token_accuracy"] <= 1.0
        if c["accuracy"] == 1.0:
            assert c["forced_token_accuracy"] == 1.0
        reordered = sum(a != p and sorted(a) == sorted(p) for a, p in pairs) / len(pairs)
        assert c["reordered"] == reordered and c["accuracy"] + c["reordered"] <= 1
        majority = max(Counter(a for a, _ in pairs).values()) / len(pairs)
        assert c["majority_baseline"] == majority and majority >= 1 / len(pairs)
    text = open(paths["table"]).read()
    assert all(t in text for t in ("exact match", "first answer token right", "answer tokens right",
                                   "true answer prefix", "in another order", "most common answer"))
    # one pooled row per niah task (over both depths: 4 samples a length), none for babilong (no depths)
    pooled = [line for line in markdown_table(res).splitlines() if "all (95% CI)" in line]
    assert len(pooled) == 1 and pooled[0].startswith("| niah_passkey |")
    k = round(sum(c["accuracy"] * c["samples"] for c in res["cells"] if c["task"] == "niah_passkey"
                  and c["length"] == 128))
    lo, hi = wilson_interval(k, 4)
    assert f"{100 * k / 4:.0f} ({100 * lo:.0f}-{100 * hi:.0f})" in pooled[0].split("|")[3]


def test_evaluation_does_not_depend_on_the_batch_size(tiny_export, hay):
    """Examples streamed together (one cell: one length) answer as they do alone, in float64: --batch-size only
    changes the speed."""
    from titans.utils.checkpoint import load_model

    model, _ = load_model(tiny_export)
    model = model.double()
    runs = [evaluate_tasks(model, TOK, ["niah_uuid", "babilong_qa1"], [300], [0.5], 4, hay, piece=48, batch_size=b,
                           progress=False) for b in (1, 3, 4)]  # every example is kept (4): all predictions compared
    for a, b in zip(runs, runs[1:]):
        for ca, cb in zip(a["cells"], b["cells"]):
            assert ca["examples"] == cb["examples"]
            assert {k: v for k, v in ca.items() if k != "examples"} == {k: v for k, v in cb.items() if k != "examples"}


def test_score_answer_counts_partial_credit_and_order_errors():
    assert score_answer([5, 8, 6, 4, 0, 9], [5, 8, 6, 4, 0]) == {  # tokens past the answer are not scored
        "exact": True, "first": True, "tokens_right": 5, "reordered": False}
    assert score_answer([5, 6, 8, 4, 0], [5, 8, 6, 4, 0]) == {  # two digits swapped: a permutation
        "exact": False, "first": True, "tokens_right": 3, "reordered": True}
    assert score_answer([5, 6, 6, 4, 0], [5, 8, 6, 4, 0])["reordered"] is False  # a digit lost, not moved
    assert score_answer([0, 5, 8, 6, 4], [5, 8, 6, 4, 0]) == {
        "exact": False, "first": False, "tokens_right": 0, "reordered": True}
    assert score_answer([5], [5, 8])["reordered"] is False  # too short to hold the answer's tokens
    with pytest.raises(ValueError, match="answer"):
        score_answer([1], [])


def test_wilson_interval_matches_the_closed_form():
    # k = 0 and k = n have closed-form bounds: z^2 / (n + z^2) and n / (n + z^2)
    z2 = 1.96 ** 2
    assert wilson_interval(0, 12) == pytest.approx((0.0, z2 / (12 + z2)))
    assert wilson_interval(12, 12) == pytest.approx((12 / (12 + z2), 1.0))
    lo, hi = wilson_interval(5, 12)
    assert lo < 5 / 12 < hi and hi - lo < 0.55
    with pytest.raises(ValueError, match="k=13"):
        wilson_interval(13, 12)


def test_cli_evaluate_task(tiny_export, tmp_path):
    from titans.scripts.cli import app

    out = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tiny_export), "--task", "niah_uuid",
                                   "--lengths", "300", "--depths", "0.5", "--samples", "2", "--data", "stdlib",
                                   "--output", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "r" / "niah_uuid.png").is_file()
    bad = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tiny_export), "--task", "niah_nope"])
    assert bad.exit_code == 2 and "niah_nope" in bad.output
    short = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tiny_export), "--task", "niah_uuid",
                                     "--lengths", "160", "--data", "stdlib"])
    assert short.exit_code == 2 and "too short" in short.output
    # lists: comma-separated and repeated forms; a bad entry is named
    two = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tiny_export), "--task", "niah_passkey",
                                   "--lengths", "300,320", "--lengths", "340", "--depths", "0,1", "--samples", "1",
                                   "--data", "stdlib", "--output", str(tmp_path / "r2")])
    assert two.exit_code == 0, two.output
    cells = json.loads((tmp_path / "r2" / "results.json").read_text())["cells"]
    assert sorted({c["length"] for c in cells}) == [300, 320, 340] and sorted({c["depth"] for c in cells}) == [0, 1]
    bad_len = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tiny_export), "--task", "niah_uuid",
                                       "--lengths", "300,4k"])
    assert bad_len.exit_code == 2 and "'4k' is not a whole number" in bad_len.output


def test_cli_evaluate_precision_and_batch_size_reach_the_evaluation(tiny_export, tmp_path, monkeypatch):
    """--precision picks the evaluation's arithmetic (bf16 autocast also on the CPU), and the results say which;
    --batch-size is passed on, and a bad value is named."""
    import titans.inference.long_context as lc
    from titans.scripts.cli import app

    seen, sizes = [], []
    real = lc.evaluate_tasks

    def spy(*args, **kwargs):
        seen.append(kwargs.get("amp_dtype"))
        sizes.append(kwargs.get("batch_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(lc, "evaluate_tasks", spy)
    out = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tiny_export), "--task", "niah_passkey",
                                   "--lengths", "300", "--samples", "1", "--data", "stdlib", "--batch-size", "0"])
    assert out.exit_code == 2 and "--batch-size 0" in out.output and not sizes
    for precision, amp, label in (("bf16", torch.bfloat16, "bf16 autocast"), ("fp32", None, "float32"),
                                  ("auto", None, "float32")):  # auto on the CPU: float32
        out = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tiny_export), "--task", "niah_passkey",
                                       "--lengths", "300", "--depths", "0.5", "--samples", "1", "--data", "stdlib",
                                       "--precision", precision, "--output", str(tmp_path / precision)])
        assert out.exit_code == 0, out.output
        assert seen[-1] == amp and sizes[-1] == 4  # the default batch
        assert json.loads((tmp_path / precision / "results.json").read_text())["precision"] == label
    out = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tiny_export), "--task", "niah_passkey",
                                   "--lengths", "300", "--samples", "3", "--data", "stdlib", "--batch-size", "2"])
    assert out.exit_code == 0 and sizes[-1] == 2
    bad = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tiny_export), "--task", "niah_passkey",
                                   "--precision", "fp16"])
    assert bad.exit_code == 2 and "--precision 'fp16'" in bad.output
