"""Math datasets: loaders (jsonl, verl and DAPO parquet), malformed rows, prompt rendering with
tokenizers built offline in the test (tokenizers BPE, sentencepiece, tiktoken), topic labels."""

from __future__ import annotations

import base64
import importlib.util
import json
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ebpo_megatron.data import (
    DEFAULT_INSTRUCTION,
    DEFAULT_TOPIC,
    TOPICS,
    ChatPromptRenderer,
    MathExample,
    classify_topic,
    load_math_dataset,
    load_tokenizer,
)
from ebpo_megatron.data.math_datasets import DAPO_FOOTER, DAPO_HEADER

needs_pyarrow = pytest.mark.skipif(
    importlib.util.find_spec("pyarrow") is None, reason="parquet needs pyarrow (the math extra)"
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
JSONL = DATA / "math_small.jsonl"
VERL = DATA / "math_small_verl.parquet"
DAPO = DATA / "math_small_dapo.parquet"

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is the remainder when 2^{100} is divided by 7?",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "A right triangle has legs of length 6 and 8. What is the length of its hypotenuse?",
    "Compute the determinant of the matrix. The answer is 5.",
    "user assistant system",
] * 20


def _jsonl(tmp_path: Path, rows: list, name: str = "rows.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# the shipped test data
def test_test_data_is_complete_and_consistent():
    rows = [json.loads(line) for line in JSONL.read_text().splitlines()]
    assert 50 <= len(rows) <= 60
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["topic"] for r in rows} == set(TOPICS)  # all 9 topics present
    assert all(0.0 <= r["difficulty"] <= 1.0 for r in rows)
    assert all(r["problem"].strip() and r["answer"].strip() for r in rows)


@needs_pyarrow
def test_three_layouts_load_to_the_same_problems():
    plain, verl, dapo = (load_math_dataset(p) for p in (JSONL, VERL, DAPO))
    assert len(plain) == len(verl) == len(dapo)
    assert [e.problem for e in verl] == [e.problem for e in plain]  # verl's suffix stripped
    assert [e.problem for e in dapo] == [e.problem for e in plain]  # DAPO's template stripped
    assert [e.answer for e in verl] == [e.answer for e in dapo] == [e.answer for e in plain]
    assert [e.uid for e in verl] == [e.uid for e in plain]  # extra_info.uid
    assert [(e.topic, e.difficulty) for e in verl] == [(e.topic, e.difficulty) for e in plain]
    assert plain[0].messages is None and plain[0].source == "math_small"
    assert dapo[0].source == "math_dapo" and dapo[0].topic is None and dapo[0].difficulty is None
    assert dapo[0].extra == {"ability": "MATH", "reward_style": "rule-lighteval/MATH_v2"}
    assert len(dapo[0].uid) == 36  # extra_info.index, a uuid
    assert dapo[0].messages[0]["content"].startswith(DAPO_HEADER)


@needs_pyarrow
def test_parquet_files_match_the_generator(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_test_math_data.py"), "--out-dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    import pyarrow.parquet as pq

    for name in ("math_small_verl.parquet", "math_small_dapo.parquet"):
        assert pq.read_table(tmp_path / name).equals(pq.read_table(DATA / name)), name


# ---------------------------------------------------------------------------------------------
# row layouts
def test_plain_row_variants(tmp_path):
    path = _jsonl(
        tmp_path,
        [
            {"question": "What is 1+1?", "ground_truth": 2},
            {"problem": "Half of 7?", "answer": 3.5, "difficulty": 1},
            {"problem": "Pick one.", "answer": 3.0},
            {"problem": "MATH style", "solution": "We get $\\boxed{\\frac{1}{2}}$."},
            {"prompt": "open-r1 style problem", "solution": "34"},
            {"problem": "topic in extra", "answer": "1", "extra_info": {"topic": "Linear Algebra", "difficulty": 0.25}},
            {"problem": "single-element list answer", "answer": ["9"]},
            {"problem": "id column", "answer": "1", "id": 17},
        ],
    )
    ex = load_math_dataset(path)
    assert [e.answer for e in ex] == ["2", "3.5", "3", "\\frac{1}{2}", "34", "1", "9", "1"]
    assert [e.problem for e in ex][:2] == ["What is 1+1?", "Half of 7?"]
    assert ex[1].difficulty == 1.0
    assert (ex[5].topic, ex[5].difficulty) == ("Linear Algebra", 0.25)
    assert ex[0].uid == "rows-0" and ex[7].uid == "17"
    assert all(e.source == "rows" for e in ex)


def test_chat_rows_keep_messages_and_take_the_last_user_turn(tmp_path):
    row = {
        "data_source": "mine",
        "prompt": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Solve x + 1 = 3."},
        ],
        "reward_model": {"ground_truth": "2", "style": "rule"},
    }
    (ex,) = load_math_dataset(_jsonl(tmp_path, [row]))
    assert ex.problem == "Solve x + 1 = 3." and ex.answer == "2" and ex.source == "mine"
    assert [m["role"] for m in ex.messages] == ["system", "user"]


def test_dedupe_drops_repeated_problems(tmp_path):
    rows = [{"problem": "p", "answer": "1"}, {"problem": "p", "answer": "1"}, {"problem": "p", "answer": "2"}]
    path = _jsonl(tmp_path, rows)
    assert len(load_math_dataset(path)) == 3
    assert [e.answer for e in load_math_dataset(path, dedupe=True)] == ["1", "2"]


@pytest.mark.parametrize(
    "rows,line,field",
    [
        (['{"problem": "a", "answer": "1"}', "{not json"], 2, "<row>"),
        ([{"problem": "a", "answer": "1"}, "", {"problem": "b"}], 3, "answer"),
        ([{"problem": "a", "answer": ""}], 1, "answer"),
        ([{"problem": "a", "answer": None}], 1, "answer"),
        ([{"problem": "a", "answer": True}], 1, "answer"),
        ([{"problem": "a", "answer": ["1", "2"]}], 1, "answer"),
        ([{"problem": 5, "answer": "1"}], 1, "problem"),
        ([{"answer": "1"}], 1, "problem"),
        ([{"problem": "   ", "answer": "1"}], 1, "problem"),
        ([{"prompt": [], "reward_model": {"ground_truth": "1"}}], 1, "prompt"),
        ([{"prompt": [{"content": "x"}], "reward_model": {"ground_truth": "1"}}], 1, "prompt[0].role"),
        ([{"prompt": [{"role": "user", "content": 3}], "reward_model": {"ground_truth": "1"}}], 1, "prompt[0].content"),
        ([{"prompt": [{"role": "system", "content": "s"}], "reward_model": {"ground_truth": "1"}}], 1, "prompt"),
        ([{"prompt": "p", "reward_model": "1"}], 1, "reward_model"),
        ([{"prompt": "p", "reward_model": {"style": "rule"}}], 1, "reward_model.ground_truth"),
        ([{"problem": "a", "answer": "1", "difficulty": 1.5}], 1, "difficulty"),
        ([{"problem": "a", "answer": "1", "difficulty": "Level 3"}], 1, "difficulty"),
        ([{"problem": "a", "answer": "1", "topic": ""}], 1, "topic"),
        ([{"problem": "a", "answer": "1", "extra_info": "x"}], 1, "extra_info"),
        (["[1, 2]"], 1, "<row>"),
    ],
)
def test_malformed_jsonl_rows_name_file_line_and_field(tmp_path, rows, line, field):
    path = _jsonl(tmp_path, rows)
    with pytest.raises(ValueError) as info:
        load_math_dataset(path)
    message = str(info.value)
    assert str(path) in message and f"line {line}:" in message and f"field {field}:" in message, message


@needs_pyarrow
def test_malformed_parquet_row_names_its_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "prompt": [[{"role": "user", "content": "ok"}]] * 3,
            "reward_model": [{"ground_truth": "1"}, {"ground_truth": "2"}, {"ground_truth": None}],
        }
    )
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=r"bad\.parquet: row index 2: field reward_model\.ground_truth: "):
        load_math_dataset(path)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_math_dataset(tmp_path / "nope.jsonl")
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown dataset format"):
        load_math_dataset(csv)


# ---------------------------------------------------------------------------------------------
# tokenizers built offline
@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection during these tests fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A byte-level BPE trained with `tokenizers`, wrapped in PreTrainedTokenizerFast, saved."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("bpe_tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory) -> Path:
    """A sentencepiece BPE model trained on a tiny corpus, saved as a Llama-style tokenizer.model."""
    pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    work = tmp_path_factory.mktemp("spm")
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(work / "sp"),
        vocab_size=400,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        minloglevel=2,
    )
    out = work / "tokenizer"
    out.mkdir()
    (out / "tokenizer.model").write_bytes((work / "sp.model").read_bytes())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    return out


TIKTOKEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _toy_tiktoken_ranks() -> dict[bytes, int]:
    ranks = {bytes([i]): i for i in range(256)}
    for merge in [b"th", b"the", b" the", b"is", b" is", b"an", b" an", b"wer", b" answer", b"at", b"hat", b"What"]:
        ranks[merge] = len(ranks)
    return ranks


@pytest.fixture(scope="module")
def tiktoken_dir(tmp_path_factory) -> Path:
    """A tiktoken-format ``tokenizer.model`` (base64 token + rank lines, as Llama-3 ships)."""
    pytest.importorskip("transformers")
    pytest.importorskip("tiktoken", reason="transformers reads tiktoken files through the tiktoken package")
    out = tmp_path_factory.mktemp("tiktoken_tokenizer")
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in _toy_tiktoken_ranks().items()]
    (out / "tokenizer.model").write_text("\n".join(lines) + "\n")
    specials = ["<|im_start|>", "<|im_end|>", "<|end_of_text|>"]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|end_of_text|>",
        "extra_special_tokens": specials,
        "chat_template": CHATML,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _example(problem: str = "What is 2+3?") -> MathExample:
    return MathExample(uid="u", problem=problem, answer="5")


@pytest.mark.parametrize("which", ["bpe_dir", "sentencepiece_dir", "tiktoken_dir"])
def test_render_with_each_tokenizer_kind(request, which):
    directory = request.getfixturevalue(which)
    renderer = ChatPromptRenderer(directory)
    prompt = renderer.render(_example())
    assert prompt.text == (
        "<|im_start|>user\nWhat is 2+3?\n\n" + DEFAULT_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n"
    )
    tok = renderer.tokenizer
    assert list(prompt.token_ids) == tok(prompt.text, add_special_tokens=False)["input_ids"]
    assert tok.decode(list(prompt.token_ids)) == prompt.text  # lossless round trip
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert prompt.token_ids[0] == start and prompt.token_ids.count(start) == 2  # special, not split


def test_sentencepiece_tokenizer_matches_sentencepiece(sentencepiece_dir):
    import sentencepiece as spm

    tok = load_tokenizer(sentencepiece_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_dir / "tokenizer.model"))
    text = "What is the remainder when 2^{100} is divided by 7?"
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


def test_tiktoken_tokenizer_matches_tiktoken(tiktoken_dir):
    import tiktoken

    enc = tiktoken.Encoding("toy", pat_str=TIKTOKEN_PATTERN, mergeable_ranks=_toy_tiktoken_ranks(), special_tokens={})
    tok = load_tokenizer(tiktoken_dir)
    text = "What is the answer? What is the answer to 12345?"
    assert tok(text, add_special_tokens=False)["input_ids"] == enc.encode(text)


def test_prompt_length_filter_counts_drops(bpe_dir):
    examples = load_math_dataset(JSONL)
    renderer = ChatPromptRenderer(bpe_dir)
    lengths = [len(renderer.render(e).token_ids) for e in examples]
    limit = sorted(lengths)[len(lengths) // 2]
    kept, dropped = ChatPromptRenderer(bpe_dir, max_prompt_tokens=limit).render_all(examples)
    assert dropped == sum(n > limit for n in lengths) > 0
    assert len(kept) + dropped == len(examples)
    assert all(len(p.token_ids) <= limit for p in kept)
    assert [p.example.uid for p in kept] == [e.uid for e, n in zip(examples, lengths) if n <= limit]


@needs_pyarrow
def test_dataset_messages_versus_problem_rendering(bpe_dir):
    dapo = load_math_dataset(DAPO)[0]
    as_stored = ChatPromptRenderer(bpe_dir).render(dapo).text
    assert DAPO_HEADER in as_stored and DAPO_FOOTER in as_stored and DEFAULT_INSTRUCTION not in as_stored
    rebuilt = ChatPromptRenderer(bpe_dir, prompt_source="problem", system_prompt="Be brief.").render(dapo).text
    assert DAPO_HEADER not in rebuilt and DEFAULT_INSTRUCTION in rebuilt
    assert rebuilt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the remainder")
    custom = ChatPromptRenderer(bpe_dir, instruction="Answer with a number.").render(_example()).text
    assert "What is 2+3?\n\nAnswer with a number.<|im_end|>" in custom
    bare = ChatPromptRenderer(bpe_dir, instruction="").render(_example()).text
    assert "What is 2+3?<|im_end|>" in bare


def test_tokenizer_errors(tmp_path, bpe_dir):
    with pytest.raises(FileNotFoundError, match="only local directories"):
        load_tokenizer(tmp_path / "missing")
    tok = load_tokenizer(bpe_dir)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        ChatPromptRenderer(tok)
    assert ChatPromptRenderer(tok, chat_template=CHATML).render(_example()).text.endswith("assistant\n")
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        ChatPromptRenderer(bpe_dir, max_prompt_tokens=0)


# ---------------------------------------------------------------------------------------------
# topics
def test_topic_classifier_against_hand_labels():
    examples = load_math_dataset(JSONL)
    predicted = [classify_topic(e.problem) for e in examples]
    agree = sum(p == e.topic for p, e in zip(predicted, examples))
    accuracy = agree / len(examples)
    misses = [(e.uid, e.topic, p) for p, e in zip(predicted, examples) if p != e.topic]
    print(f"\ntopic classifier vs hand labels: {agree}/{len(examples)} = {accuracy:.1%}; misses: {misses}")
    # Same author wrote the labels and the cue lists: expect lower agreement on real data.
    assert accuracy >= 0.85


@pytest.mark.parametrize(
    "text,topic",
    [
        ("Compute the determinant of the 3x3 matrix A.", "Linear Algebra"),
        ("Find the eigenvalues of the matrix.", "Linear Algebra"),
        ("A fair die is rolled twice. What is the probability of two sixes?", "Probability & Statistics"),
        ("Evaluate the integral of x^2 from 0 to 1.", "Calculus & Analysis"),
        ("What is the area of a triangle with base 4 and height 6?", "Geometry & Trigonometry"),
        ("In how many ways can 6 people sit in a row?", "Discrete Mathematics"),
        ("What is the remainder when 3^{50} is divided by 11?", "Algebra & Number Theory"),
        ("A car costs $20000 and loses 10% of its value every year.", "Applied Mathematics & Word Problems"),
        ("A ball of mass 2 kg has velocity 4 m/s. Find its momentum.", "Physics & Chemistry"),
        ("How many subgroups does the cyclic group of order 12 have?", "Advanced Mathematics"),
        ("Hello there.", DEFAULT_TOPIC),
    ],
)
def test_unambiguous_topics(text, topic):
    assert classify_topic(text) == topic


@needs_pyarrow
def test_label_topics_cli(tmp_path):
    tool = ROOT / "tools" / "label_topics.py"
    out = tmp_path / "dapo_topics.parquet"
    run = subprocess.run([sys.executable, str(tool), "--in", str(DAPO), "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    labelled = load_math_dataset(out)
    assert all(e.topic in TOPICS for e in labelled)
    import pyarrow.parquet as pq

    assert pq.read_table(out).column_names == pq.read_table(DAPO).column_names + ["topic"]

    out_jsonl = tmp_path / "relabelled.jsonl"
    run = subprocess.run(
        [sys.executable, str(tool), "--in", str(JSONL), "--out", str(out_jsonl), "--overwrite"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "existing labels" in run.stdout
    rows = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert [r["topic"] for r in rows] == [classify_topic(r["problem"]) for r in rows]
    # without --overwrite, existing labels are kept
    kept = tmp_path / "kept.jsonl"
    subprocess.run([sys.executable, str(tool), "--in", str(JSONL), "--out", str(kept)], check=True, capture_output=True)
    assert kept.read_text().splitlines() == [json.dumps(json.loads(l), ensure_ascii=False) for l in JSONL.read_text().splitlines()]
    assert Counter(r["topic"] for r in map(json.loads, kept.read_text().splitlines())) == Counter(
        r["topic"] for r in map(json.loads, JSONL.read_text().splitlines())
    )


@pytest.mark.parametrize(
    "content,line,what",
    [
        (b'{"problem": "a", "answer": "1"}\n{"problem": "caf\xe9", "answer": "2"}\n', 2, "UTF-8"),
        (b'{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer": ' + b"7" * 5000 + b"}\n", 3, "4300 digits"),
    ],
    ids=["latin-1 byte", "5000-digit integer"],
)
def test_undecodable_jsonl_line_names_file_and_line(tmp_path, content, line, what):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_math_dataset(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line {line}: ") and what in message, message
