"""The Sudoku model through dglocal: the checkpoint converted (WordLevel vocab as gpt2 without merges), its logits
against the reference, `dglocal sudoku` end to end, the eval's numbers against its own output file, and whole
trajectories against the reference `generate` fed identical noise.

Needs the HF checkpoint beside the recipe (scripts/sudoku/checkpoint) and the shipped dglocal/data/sudoku.gguf.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from reference_harness import ReferenceModel, encoder_logits, reference_generate
from test_cli import DGLOCAL

from dglocal.sudoku import core as sc
from dglocal.convert.hub import DEFAULT_MODEL
from dglocal.generation.sampler import SeededNoise

pytestmark = pytest.mark.backend

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "scripts" / "sudoku" / "checkpoint"
HELDOUT = ROOT / "scripts" / "sudoku" / "heldout.txt"
# f32 GGUF, f32 KV cache, no flash attention. The trained model's raw logits reach |12| (softcap 30); measured
# differences are up to 1.4e-4 of max(1, |logit|), float32 accumulation through 4 layers and the soft embedding.
ATOL, RTOL = 2e-4, 1e-4



def heldout(n: int) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in HELDOUT.read_text().splitlines()[:n]]


def dglocal_cli(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DGLOCAL_DEBUG"}
    return subprocess.run([*DGLOCAL, "sudoku", *map(str, args)], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=600)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A copy of the checkpoint, taken again until no file changed meanwhile (a training run rewrites it)."""
    if not (CHECKPOINT / "config.json").is_file():
        pytest.fail(f"{CHECKPOINT}: the Sudoku checkpoint is missing (scripts/sudoku_train.py writes it)")
    copy = tmp_path_factory.mktemp("ckpt") / "sudoku"
    for _ in range(5):
        before = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in CHECKPOINT.iterdir())
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(CHECKPOINT, copy)
        time.sleep(1)
        if sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in CHECKPOINT.iterdir()) == before:
            return copy
    pytest.fail(f"{CHECKPOINT} kept changing while copied")


@pytest.fixture(scope="module")
def gguf_path(checkpoint, tmp_path_factory):
    from dglocal.convert import convert

    out = tmp_path_factory.mktemp("gguf") / "sudoku-f32.gguf"
    done = convert(checkpoint, out, "f32")
    # the reference class's mandatory tower, with image ids outside the 41 tokens: text only, no mmproj beside it
    assert list(out.parent.iterdir()) == [out] and "outside the vocabulary" in " ".join(done.notes)
    return out


@pytest.fixture(scope="module")
def torch_model(checkpoint):
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint).float().eval()


@pytest.fixture(scope="module")
def model(gguf_path):
    from dglocal.sudoku import load_model

    m = load_model(gguf_path)  # f32 KV cache, flash attention off, 1 thread
    yield m
    m.close()


# -- the converted file ------------------------------------------------------------------------------------------

def test_converted_header(gguf_path):
    from gguf import TokenType

    from dglocal.runtime.gguf import read_header

    kv = read_header(gguf_path).kv
    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert list(kv["tokenizer.ggml.tokens"]) == sc.TOKENS
    types = list(kv["tokenizer.ggml.token_type"])
    assert [t == TokenType.CONTROL for t in types] == [t.startswith("<") for t in sc.TOKENS]
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"],
            kv["tokenizer.ggml.padding_token_id"]) == (sc.BOS_ID, sc.EOS_ID, sc.PAD_ID)
    # config.json's `per_layer_config: {}`: the full layer keeps the base head_dim and KV head count
    assert kv["diffusion-gemma.attention.key_length"] == 32 == kv["diffusion-gemma.attention.key_length_swa"]
    assert list(kv["diffusion-gemma.attention.head_count_kv"]) == [4, 4, 4, 4]
    assert kv["diffusion.canvas_length"] == sc.CANVAS_LENGTH


def test_tokenizer_and_chat_template(model):
    puzzle = heldout(1)[0][0]
    assert model.tokenize(puzzle, add_special=False, parse_special=True) == sc.encode_prompt(puzzle)[-82:-1]
    assert model.tokenize("<sep>1 .<r4><c9><b2>", add_special=True, parse_special=True) == [
        sc.BOS_ID, sc.SEP_ID, sc.DIGIT_BASE + 1, sc.BLANK_ID, sc.ROW_BASE + 3, sc.COL_BASE + 8, sc.BOX_BASE + 1]
    assert model.tokenize("<sep>", add_special=False, parse_special=False) == []  # specials only when parsed
    assert model.detokenize(sc.encode_canvas(heldout(1)[0][1])) == heldout(1)[0][1]
    chat = model.chat()  # `dglocal run` on this model: a message is a puzzle
    assert chat.prompt_tokens([{"role": "user", "content": f" {puzzle}\n"}]) == sc.encode_prompt(puzzle)


# -- numbers against the reference ------------------------------------------------------------------------------

def test_decoder_logits_match_reference(model, torch_model):
    """Three denoise steps (the later ones self-conditioned) after a puzzle prompt: raw logits against the
    reference's (its processed logits times T)."""
    prompt = sc.encode_prompt(heldout(2)[1][0])
    seq, rseq = model.sequence(), ReferenceModel(torch_model, n_ctx=512).sequence()
    seq.prefill(prompt)
    rseq.prefill(prompt)
    rng = np.random.default_rng(3)
    u = rng.random(sc.CANVAS_LENGTH)
    for step, (temp, self_condition) in enumerate([(0.8, False), (0.55, True), (0.5, True)]):
        canvas = rng.integers(0, sc.VOCAB_SIZE, sc.CANVAS_LENGTH).astype(np.int32)
        got = seq.denoise(canvas, temperature=temp, uniforms=u, self_condition=self_condition, return_logits=True)
        want = rseq.denoise(canvas, temperature=temp, uniforms=u, self_condition=self_condition, return_logits=True)
        np.testing.assert_allclose(got.logits, want.logits * temp, atol=ATOL, rtol=RTOL, err_msg=f"step {step}")
        np.testing.assert_array_equal(got.argmax, want.argmax)
        np.testing.assert_allclose(got.entropy, want.entropy, atol=1e-4, rtol=1e-4)


def test_encoder_logits_match_reference(model, torch_model):
    prompt = sc.encode_prompt(heldout(3)[2][0])
    got = model.sequence().prefill(prompt, logits_last=True)
    np.testing.assert_allclose(got, encoder_logits(torch_model, prompt)[-1], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("index,seed", [(0, 0), (1, 1), (2, 2)])
def test_trajectory_matches_reference_generate(model, torch_model, index, seed):
    """The same puzzle and the same noise: dglocal's runtime and the reference `generate` return the same grid
    after the same number of steps (the checkpoint's generation config on both sides)."""
    from dglocal.sudoku import solve

    puzzle = sc.parse_grid(heldout(index + 1)[index][0])
    tokens, steps = reference_generate(torch_model, sc.encode_prompt(puzzle), SeededNoise(sc.VOCAB_SIZE, seed))
    got = solve(model, puzzle, seed=seed, guide=False)  # the model alone, as the reference runs it
    assert got.grid == sc.decode_canvas(tokens)
    assert [got.steps] == steps


# -- the command -------------------------------------------------------------------------------------------------

VERDICT = re.compile(r"^(solved|unsolved: (\d+)/81 cells consistent \(\d+ break a rule\)) · (\d+) steps", re.MULTILINE)
EVAL = re.compile(r"(\d+) puzzles: solved ([\d.]+)%, blank-cell accuracy ([\d.]+)%, mean steps ([\d.]+)")


def easy_puzzle() -> tuple[str, str]:
    """A held-out solution with 4 cells blanked (77 givens)."""
    _, solution = heldout(1)[0]
    return "".join("." if i in (0, 20, 40, 80) else d for i, d in enumerate(solution)), solution


def test_cli_solves_an_easy_puzzle_with_the_shipped_model(tmp_path):
    assert DEFAULT_MODEL.is_file(), f"{DEFAULT_MODEL} is not shipped (scripts/sudoku_ship.sh makes it)"
    puzzle, solution = easy_puzzle()
    out = tmp_path / "grid.txt"
    r = dglocal_cli(puzzle, "--seed", "0", "--output", out)
    assert r.returncode == 0, r.stderr
    grid = out.read_text().split()
    assert len(grid) == 1 and re.fullmatch(r"[0-9]{81}", grid[0])
    verdict = VERDICT.search(r.stdout)
    assert verdict, r.stdout
    assert (verdict.group(1) == "solved") == sc.check_grid(puzzle, grid[0].replace("0", "."))
    assert grid[0] == solution, f"the shipped model did not solve an easy puzzle:\n{r.stdout}"


def test_cli_reports_a_broken_grid_unsolved(tmp_path):
    """A puzzle with no solution whose givens keep every rule (row 1 needs a 9 where column 9 has one; 20 givens):
    whatever the model returns is unsolved, the guide restarting it until the time limit is up, and the verdict
    says so."""
    from dglocal.sudoku.race import default_workers
    from dglocal.sudoku.stream import TIMED_RESTARTS

    puzzle = "12345678.........9...........2......9.7...6..53..4..9...1........5..........9...."
    assert sc.is_consistent(sc.parse_grid(puzzle)) and sc.count_solutions(puzzle) == 0
    out = tmp_path / "grid.txt"
    workers = default_workers()  # the steps of every worker count
    for guide, cap in ((["--no-guide"], 4 * workers), (["--time-limit", "1"], 4 * (1 + TIMED_RESTARTS) * workers)):
        t0 = time.monotonic()
        r = dglocal_cli(puzzle, "--seed", "0", "--steps", "4", "--output", out, *guide)
        assert r.returncode == 0, r.stderr
        verdict = VERDICT.search(r.stdout)
        assert verdict and verdict.group(1).startswith("unsolved") and int(verdict.group(3)) <= cap, r.stdout
        assert int(verdict.group(2)) < 81  # how close it got: the cells keeping every rule
        assert ("a longer --time-limit (it had 1 s) gives it more attempts" in r.stdout) == ("--time-limit" in guide)
        assert not sc.check_grid(puzzle, out.read_text().strip().replace("0", "."))
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("args,message", [
    (["123"], "a Sudoku puzzle has 81 cells, got 3 characters"),
    (["." * 80 + "x"], "invalid Sudoku cell 'x' at position 81"),
    (["." * 40 + "a" + "." * 40], "invalid Sudoku cell 'a' at position 41"),
    (["." * 81, "--eval", "heldout.txt"], "not both"),
])
def test_cli_bad_puzzles_give_one_clear_error(args, message):
    r = dglocal_cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert r.stdout == ""


def test_cli_bad_eval_file_names_the_line(tmp_path):
    bad = tmp_path / "puzzles.txt"
    bad.write_text(f"{'.' * 81}\n# a comment\n\n{'.' * 79}\n")
    r = dglocal_cli("--eval", bad)
    assert r.returncode == 1 and f"{bad}:4: a Sudoku puzzle has 81 cells, got 79" in r.stderr, r.stderr


def test_cli_eval_numbers_agree_with_the_output_file(tmp_path):
    """--eval reports what check_grid and the solutions say about the grids it writes with --output."""
    pairs = heldout(6)
    pairs[5] = easy_puzzle()  # one the model solves, so the solved count is not trivially 0
    puzzles = tmp_path / "puzzles.txt"
    puzzles.write_text("".join(f"{p} {s}\n" for p, s in pairs[:5]) + f"{pairs[5][0]}\n")  # last: no solution
    out = tmp_path / "grids.txt"
    r = dglocal_cli("--eval", puzzles, "--output", out, "--seed", "0")
    assert r.returncode == 0, r.stderr
    m = EVAL.search(r.stdout)
    assert m, r.stdout
    grids = out.read_text().splitlines()
    assert len(grids) == 6 and all(re.fullmatch(r"[0-9]{81}", g) for g in grids)
    solved = sum(sc.check_grid(p, g.replace("0", ".")) for (p, _), g in zip(pairs, grids))
    blanks = [(s, g) for (p, s), g in zip(pairs[:5], grids) for pc, s, g in zip(p, s, g) if pc == "."]
    assert int(m.group(1)) == 6
    assert float(m.group(2)) == pytest.approx(100 * solved / 6, abs=0.05)
    assert float(m.group(3)) == pytest.approx(100 * sum(s == g for s, g in blanks) / len(blanks), abs=0.05)
    from dglocal.sudoku import GUIDE_RESTARTS

    assert 1 <= float(m.group(4)) <= 48 * (1 + GUIDE_RESTARTS)  # a broken grid is denoised again
    assert solved >= 1  # the easy one


def test_run_without_a_model_takes_a_puzzle_per_line():
    """`dglocal run` with no MODEL: the shipped Sudoku model, one puzzle per input line, bad lines reported (one
    that is not a puzzle, one whose givens break a rule)."""
    puzzle, _ = easy_puzzle()
    env = {k: v for k, v in os.environ.items() if k != "DGLOCAL_DEBUG"}
    r = subprocess.run([*DGLOCAL, "run", "--seed", "0"], input=f"{puzzle}\nbad\n\n{'55' + '.' * 79}\n{puzzle}\n",
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert [m.group(1) for m in VERDICT.finditer(r.stdout)] == ["solved", "solved"], r.stdout
    assert r.stderr.strip().splitlines() == ["error: a Sudoku puzzle has 81 cells, got 3 characters: 'bad'",
                                             "error: the puzzle has no solution: its givens break a rule (5 twice in "
                                             "row 1)"]



def test_run_given_a_sudoku_model_treats_it_as_the_built_in_one(tmp_path):
    """`dglocal run MODEL` with a Sudoku GGUF (a retrained one, say) solves puzzles on the board, as with no MODEL;
    it used to chat with it, answering a puzzle with digits of no grid."""
    puzzle, solution = easy_puzzle()
    own = tmp_path / "my-sudoku.gguf"
    shutil.copy(DEFAULT_MODEL, own)
    env = {k: v for k, v in os.environ.items() if k != "DGLOCAL_DEBUG"}
    r = subprocess.run([*DGLOCAL, "run", str(own), "-p", puzzle, "--seed", "0"], capture_output=True, text=True,
                       env=env, stdin=subprocess.DEVNULL, timeout=600)
    assert r.returncode == 0, r.stderr
    assert [m.group(1) for m in VERDICT.finditer(r.stdout)] == ["solved"], r.stdout
    schema = tmp_path / "schema.json"
    schema.write_text("{}")
    r = subprocess.run([*DGLOCAL, "run", str(own), "-p", puzzle, "--json-schema", str(schema)], capture_output=True,
                       text=True, env=env, stdin=subprocess.DEVNULL, timeout=600)
    assert r.returncode == 1 and "do not apply to the Sudoku model" in r.stderr, r.stderr

def test_run_refuses_think_and_takes_seed_minus_one_with_the_sudoku_model():
    """`dglocal run --think` with the Sudoku model (which has no chat template) is refused by name before the load,
    not ignored; `--seed -1` is a random seed there, as with a chat model."""
    from test_cli import piped

    puzzle, solution = easy_puzzle()
    for flag in ("--think", "--hide-thinking"):
        r = piped("run", "-p", puzzle, flag)
        assert r.returncode == 1 and flag in r.stderr and "Sudoku model" in r.stderr, r.stderr
    r = piped("run", "-p", puzzle, "--seed", "-1")
    assert r.returncode == 0 and [m.group(1) for m in VERDICT.finditer(r.stdout)] == ["solved"], r.stderr


# -- batching and the guide --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_eval_grids_do_not_depend_on_the_batch(tmp_path):
    """--batch 1 and --batch 32 write byte-identical grids: puzzle i draws its noise from (seed, i)."""
    puzzles = tmp_path / "p.txt"
    puzzles.write_text("".join(f"{p} {s}\n" for p, s in heldout(64)))
    runs = [subprocess.Popen([*DGLOCAL, "sudoku", "--eval", str(puzzles), "--seed", "5", "--batch", str(b),
                              "--output", str(tmp_path / f"b{b}.txt")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for b in (1, 32)]
    for p in runs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    one, many = (tmp_path / "b1.txt").read_bytes(), (tmp_path / "b32.txt").read_bytes()
    assert one == many and len(one.splitlines()) == 64


def attempt_lengths(schedule) -> list[int]:
    """The steps of each attempt, from each step's (guided, temperature): an attempt's schedule cools from its top,
    so a step hotter than the last, or the first the guide judges, starts the next one."""
    lengths, last = [], None
    for guided, temp in schedule:
        if last is None or (guided is None) != (last[0] is None) or temp >= last[1]:
            lengths.append(0)
        lengths[-1] += 1
        last = (guided, temp)
    return lengths


def test_the_step_cap_bounds_every_attempt():
    """--steps (solve_stream's steps) caps the guide's restarts too, which are shorter by default (Guide.STEPS): a
    cap of 3 made 16-step restarts. Without a cap, restarts run Guide.STEPS."""
    from dglocal import sudoku

    unsolvable = sc.parse_grid("12345678.........9...........2......9.7...6..53..4..9...1........5..........9....")
    with sudoku.load_model(DEFAULT_MODEL) as m:
        for steps, cap in ((3, 3), (None, sc.Guide.STEPS)):
            shown = [(e.guided, e.temperature) for e in sudoku.solve_stream(m, unsolvable, steps=steps, seed=0,
                                                                            time_limit=1.0) if e.kind == "step"]
            attempts = attempt_lengths(shown)
            assert len(attempts) > 2 and max(attempts[1:-1]) == cap, attempts  # the last may be cut by the time


@pytest.mark.slow
def test_the_guide_fixes_drafts_the_model_alone_leaves_broken():
    """Rule-guided re-noising, seeded, on held-out puzzles: it solves at least one puzzle the model alone gets
    wrong and never fewer puzzles in all; where the model alone solves a puzzle, the guided run is that run."""
    from dglocal import sudoku

    pairs = [(sc.parse_grid(p), sc.parse_grid(s)) for p, s in heldout(40)]
    with sudoku.load_model(DEFAULT_MODEL, batch=8) as m:
        alone = sudoku.evaluate(m, pairs, seed=0, guide=False)
        guided = sudoku.evaluate(m, pairs, seed=0, guide=True)
    fixed = [i for i, (a, g) in enumerate(zip(alone.results, guided.results)) if g.solved and not a.solved]
    assert fixed and guided.solved >= alone.solved, (alone.solved, guided.solved)
    for i in fixed:
        assert sudoku.bad_cells(pairs[i][0], alone.results[i].grid)  # the model alone left a rule broken
    # the guide's first attempt is the model alone: the same grid in the same steps where that was solved
    for a, g in zip(alone.results, guided.results):
        assert (g.grid, g.steps) == (a.grid, a.steps) if a.solved else g.steps > a.steps


def test_training_lr_decays_over_wall_time_with_decay_minutes():
    """sudoku_train's --decay-minutes (a lent GPU's run, scripts/sudoku_gpu.sh): the warm-up is counted in examples
    as before, then the cosine runs from --lr to --lr-min over the invocation's wall time and stays at --lr-min."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from sudoku_train import lr_at

    args = type("Args", (), dict(lr=1e-3, lr_min=1e-5, batch=512, warmup_from=793_728, warmup_examples=100_000,
                                 anneal_from=0, horizon=20_000_000, decay_minutes=7.0))()
    assert lr_at(793_728, args, 0.0) == pytest.approx(1e-3 * 512 / 100_000)  # warming up, whatever the time
    done = 793_728 + 100_000
    assert lr_at(done, args, 0.0) == pytest.approx(1e-3)
    assert lr_at(done, args, 210.0) == pytest.approx((1e-3 + 1e-5) / 2)  # half of 7 minutes
    assert lr_at(done, args, 420.0) == pytest.approx(1e-5)
    assert lr_at(done + 10**7, args, 900.0) == pytest.approx(1e-5)
    args.decay_minutes = 0.0  # by examples, as before: the same point in time changes nothing
    assert lr_at(done, args, 210.0) == lr_at(done, args, 0.0) == pytest.approx(1e-3)


def test_givens_that_break_a_rule_are_refused_before_any_work(tmp_path, model):
    """No grid solves such a puzzle, and the guide, which checks only the cells that are not given, would find
    nothing to re-noise: a puzzle, a line of `dglocal run`, a line of an --eval file and the API all say which rule
    the givens break."""
    from dglocal import sudoku
    from dglocal.errors import ConfigError
    from dglocal.sudoku import solve

    message = "the puzzle has no solution: its givens break a rule (5 twice in row 1)"
    out = tmp_path / "grid.txt"
    r = dglocal_cli("55" + "." * 79, "--output", out)
    assert (r.returncode, r.stderr.strip(), out.exists()) == (1, f"error: {message}", False)
    bad = tmp_path / "bad.txt"
    bad.write_text("# a comment\n" + "." * 81 + "\n" + "." * 9 + "5" + "." * 8 + "5" + "." * 62 + "\n")
    r = dglocal_cli("--eval", bad)
    assert (r.returncode, r.stderr.strip()) == (1, f"error: {bad}:3: the puzzle has no solution: its givens break "
                                                   f"a rule (5 twice in column 1)")
    for p in (sc.parse_grid("55" + "." * 79), [0] * 9 + [0, 7] + [0] * 8 + [7] + [0] * 61):
        with pytest.raises(ConfigError, match="its givens break a rule"):
            solve(model, p)
        with pytest.raises(ConfigError, match="its givens break a rule"):
            solve([model], p)
    assert sc.first_conflict(sc.parse_grid("." * 10 + "7" + "." * 9 + "7" + "." * 60)) == "7 twice in box 1"
    # puzzles that are not 81 cells of 0-9, from Python: named, before any work (they used to raise IndexError or
    # TypeError, or run with a digit token shifted into the prompt)
    for bad, named in (([0] * 80, "has 81 cells, got 80"), ([0] * 80 + [10], "cell 81 must be an integer 0-9"),
                       ([-1] + [0] * 80, "cell 1 must be an integer 0-9 (0: a blank), got -1"),
                       ([0.5] * 81, "got 0.5"), (["1"] * 81, "got '1'"), ([True] * 81, "got True"),
                       (None, "is 81 cells (a string, or integers 0-9), got NoneType"), ("abc", "got 3 characters")):
        with pytest.raises(ConfigError, match=re.escape(named)):
            solve(model, bad)
        with pytest.raises(ConfigError, match=re.escape(named)):
            sudoku.evaluate(model, [(sc.parse_grid(HELDOUT.read_text().split()[0]), None), (bad, None)])
    assert solve(model, np.array(sc.parse_grid(heldout(1)[0][0]), dtype=np.int64), time_limit=0.5).puzzle == \
        sc.parse_grid(heldout(1)[0][0])  # numpy integers are integers
    assert sc.first_conflict(sc.parse_grid("." * 81)) is None


def test_an_unsolved_puzzle_with_few_givens_says_what_the_model_was_trained_on(tmp_path):
    """Below 17 givens (the fewest a puzzle with one solution can have) the model was never trained: the verdict
    says so instead of asking for more time."""
    pairs = heldout(1)
    solution = pairs[0][1]
    puzzle = solution[:3] + "." * 78  # 3 givens of a real grid: many solutions, any one is solved
    r = dglocal_cli(puzzle, "--seed", "0", "--time-limit", "0.5")
    assert r.returncode == 0, r.stderr
    verdict = VERDICT.search(r.stdout)
    hint = ("the model was trained on puzzles of 17 givens or more (the fewest a puzzle with one solution can "
            "have); this one has 3")
    assert verdict and (hint in " ".join(r.stdout.split())) == verdict.group(1).startswith("unsolved"), r.stdout
    assert "a longer --time-limit" not in r.stdout
    from dglocal.cli.sudoku import _hint
    from dglocal.sudoku.stream import Solved

    few, enough = sc.parse_grid(puzzle), sc.parse_grid(pairs[0][0])
    unsolved = lambda p, seconds: Solved(p, [0] * 81, False, 100, seconds)  # noqa: E731
    assert _hint(unsolved(few, 5.0), {}) == hint
    assert _hint(unsolved(enough, 5.0), {}) == "a longer --time-limit (it had 5 s) gives it more attempts"
    assert _hint(unsolved(enough, 0.4), {"time_limit": 0.5}) is None  # stopped before the time ran out
    assert _hint(unsolved(enough, 9.0), {"guide": False}) is None  # the model alone: time is not what it lacks


def test_a_bad_output_path_fails_before_the_work(tmp_path):
    """The grids are written at the end: a folder that is not there, or a folder given as the file, is an error
    before the model loads, not after a long evaluation."""
    for out, message in ((tmp_path / "missing" / "grids.txt", f"no such folder {tmp_path / 'missing'}"),
                         (tmp_path, "a folder, not a file")):
        t0 = time.monotonic()
        r = dglocal_cli("--eval", HELDOUT, "--output", out)
        assert (r.returncode, r.stderr.strip()) == (1, f"error: --output {out}: {message}"), r.stderr
        assert r.stdout == "" and time.monotonic() - t0 < 60
