import json

import pytest

from edgelm.train.data import DataError, load_records, parse_line, read_records

GSM8K_LINE = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72",
}


def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_gsm8k_record_fields():
    record = parse_line(GSM8K_LINE, "gsm8k-train-00001")
    assert record["id"] == "gsm8k-train-00001"
    assert record["prompt"].startswith("Natalia sold clips")
    assert record["answer"] == "72"
    assert "<<" not in record["reasoning"]
    assert ">>" not in record["reasoning"]
    assert record["reasoning"] == "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether."
    assert record["difficulty"] == 2


def test_gsm8k_answer_with_thousands_separator():
    record = parse_line({"question": "q?", "answer": "a\n#### 1,200"}, "x")
    assert record["answer"] == "1200"


def test_chat_record_takes_last_user_turn():
    row = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ignored"},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "2+3 = 5\n#### 5"},
    ]}
    record = parse_line(row, "chat-1")
    assert record["prompt"] == "What is 2+3?"
    assert record["reasoning"] == "2+3 = 5"
    assert record["answer"] == "5"
    assert record["difficulty"] == 1


@pytest.mark.parametrize("bad, reason", [
    ({"question": "q"}, "'answer' must be a string"),
    ({"question": "", "answer": "#### 1"}, "'question' is missing or empty"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "no user message"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"text": "hello"}, "unknown format"),
])
def test_malformed_line_reports_file_and_line(tmp_path, bad, reason):
    path = write_lines(tmp_path / "data.jsonl", [GSM8K_LINE, bad])
    with pytest.raises(DataError) as error:
        read_records(path)
    assert f"{path}:2:" in str(error.value)
    assert reason in str(error.value)


def test_invalid_json_reports_line(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GSM8K_LINE, "", "{not json"])
    with pytest.raises(DataError, match=r"data.jsonl:3:"):
        read_records(path)


def test_limit_and_stable_ids(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [GSM8K_LINE] * 5)
    records = load_records(str(tmp_path), "train", limit=3)
    assert [r["id"] for r in records] == [f"{tmp_path.name}-train-0000{i}" for i in (1, 2, 3)]


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        load_records(str(tmp_path / "nothere.jsonl"), "train")


def test_real_gsm8k_parses(gsm8k_dir):
    records = load_records(str(gsm8k_dir), "test", limit=200)
    assert len(records) == 200
    assert all(r["answer"] and r["difficulty"] >= 1 for r in records)
    assert len({r["id"] for r in records}) == 200


def test_chat_reply_without_final_answer_is_the_target():
    from edgelm.train.chat import target_text

    record = parse_line({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there."}]}, "c")
    assert record["answer"] == ""
    assert target_text(record, "reasoning") == "Hello there."
    assert target_text(record, "fast") == "Hello there."


def test_gsm8k_empty_final_answer_rejected():
    with pytest.raises(ValueError, match="#### <final answer>"):
        parse_line({"question": "q?", "answer": "steps\n####   "}, "x")
