import json

import numpy as np
import pytest

from fedllm.data import (
    Collator,
    DataError,
    TokenizedDataset,
    check_trainable_size,
    encode_labels,
    infer_label_names,
    partition_indices,
    read_table,
)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_tsv_csv_jsonl(tmp_path):
    tsv = write(tmp_path / "a.tsv", "label\tsentence\n1\tgood film\n0\tbad film\n")
    csv = write(tmp_path / "a.csv", 'text,y\n"good, really",pos\nbad,neg\n')
    jsonl = write(tmp_path / "a.jsonl", json.dumps({"t": "x y", "l": 1}) + "\n\n"
                  + json.dumps({"t": "z", "l": 0}) + "\n")
    t = read_table(tsv, text_column="sentence", label_column="label")
    assert t.texts == ["good film", "bad film"] and t.raw_labels == ["1", "0"]
    assert t.lines == [2, 3]
    c = read_table(csv, text_column="text", label_column="y")
    assert c.texts[0] == "good, really"
    j = read_table(jsonl, text_column="t", label_column="l")
    assert j.raw_labels == ["1", "0"] and j.lines == [1, 3]
    assert infer_label_names(t) == ("0", "1")
    assert encode_labels(t, ("0", "1"), "label").tolist() == [1, 0]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.tsv"):
        read_table(tmp_path / "nope.tsv", text_column="t", label_column="l")


def test_missing_column_lists_present_ones(tmp_path):
    f = write(tmp_path / "d.tsv", "label\tcontent\n1\tok\n")
    with pytest.raises(DataError, match=r"d.tsv: missing column\(s\) 'sentence'; "
                                        r"columns present: label, content"):
        read_table(f, text_column="sentence", label_column="label")


def test_empty_text_names_line(tmp_path):
    f = write(tmp_path / "d.tsv", "label\tsentence\n1\tok\n0\t   \n")
    with pytest.raises(DataError, match=r"d.tsv:3: empty text in column 'sentence'"):
        read_table(f, text_column="sentence", label_column="label")


def test_unknown_label_names_line(tmp_path):
    f = write(tmp_path / "d.tsv", "label\tsentence\n1\tok\n2\tmeh\n")
    t = read_table(f, text_column="sentence", label_column="label")
    with pytest.raises(DataError, match=r"d.tsv:3: unknown label '2' in column 'label'"):
        encode_labels(t, ("0", "1"), "label")


def test_ragged_row_and_bad_json(tmp_path):
    f = write(tmp_path / "d.tsv", "label\tsentence\n1\tok\textra\n")
    with pytest.raises(DataError, match=r"d.tsv:2: expected 2 fields, found 3"):
        read_table(f, text_column="sentence", label_column="label")
    j = write(tmp_path / "d.jsonl", '{"t": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        read_table(j, text_column="t", label_column=None)


def test_header_only_and_unsupported(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        read_table(write(tmp_path / "h.tsv", "label\tsentence\n"), text_column="sentence",
                   label_column="label")
    with pytest.raises(DataError, match="unsupported file type"):
        read_table(write(tmp_path / "x.parquet", ""), text_column="a", label_column=None)


def test_too_few_examples_for_batch():
    with pytest.raises(DataError, match="node-1 .*: 10 examples, fewer than train.batch_size=32"):
        check_trainable_size(10, 32, where="node-1 (f.tsv)")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover(scheme):
    labels = np.array([0] * 300 + [1] * 700)
    parts = partition_indices(1000, 4, scheme=scheme, seed=1, labels=labels, alpha=0.5)
    allidx = np.concatenate(parts)
    assert len(parts) == 4 and sorted(allidx.tolist()) == list(range(1000))
    again = partition_indices(1000, 4, scheme=scheme, seed=1, labels=labels, alpha=0.5)
    assert all((a == b).all() for a, b in zip(parts, again, strict=True))  # seeded


def test_dirichlet_skews_labels():
    labels = np.array([0, 1] * 2000)
    parts = partition_indices(4000, 5, scheme="dirichlet", seed=0, labels=labels, alpha=0.1)
    shares = [labels[p].mean() for p in parts if len(p)]
    assert max(shares) - min(shares) > 0.5  # strongly non-IID at small alpha


def test_collator_pads_dynamically():
    ds = TokenizedDataset([[5, 6, 7], [8]], np.array([1, 0]))
    batch = Collator(pad_token_id=0)([ds[0], ds[1]])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


# -- per-user contribution bounding (issue 9) ---------------------------------------------------


def test_a_user_with_500_examples_contributes_at_most_the_cap():
    from fedllm.data import cap_per_user

    users = ["heavy"] * 500 + [f"u{i}" for i in range(100) for _ in range(3)]
    texts = [f"text {i}" for i in range(len(users))]
    keep = cap_per_user(users, texts, max_per_user=20, secret=b"a" * 32)
    kept = [users[i] for i in keep]
    assert kept.count("heavy") == 20 and len(keep) == 20 + 300  # small users untouched
    assert list(keep) == sorted(keep)
    # deterministic for one secret, a different subsample for another
    assert np.array_equal(keep, cap_per_user(users, texts, max_per_user=20, secret=b"a" * 32))
    other = cap_per_user(users, texts, max_per_user=20, secret=b"b" * 32)
    assert set(keep[:20].tolist()) != set(other[:20].tolist())
    # another user's rows do not change which rows of "heavy" are kept
    more = cap_per_user(["x"] * 7 + users, ["y"] * 7 + texts, max_per_user=20,
                        secret=b"a" * 32)
    assert [i - 7 for i in more if i >= 7 and users[i - 7] == "heavy"] == \
        [i for i in keep if users[i] == "heavy"]


def test_user_column_is_read_and_validated(tmp_path):
    p = write(tmp_path / "u.tsv", "uid\tsentence\tlabel\nc1\tgood\t1\nc2\tbad\t0\n")
    t = read_table(p, text_column="sentence", label_column="label", user_column="uid")
    assert t.user_ids == ["c1", "c2"]
    assert read_table(p, text_column="sentence", label_column="label").user_ids is None
    bad = write(tmp_path / "b.tsv", "uid\tsentence\tlabel\nc1\tgood\t1\n \tbad\t0\n")
    with pytest.raises(DataError, match=r"b.tsv:3: empty user id in column 'uid'"):
        read_table(bad, text_column="sentence", label_column="label", user_column="uid")
    with pytest.raises(DataError, match="missing column.*'customer'"):
        read_table(p, text_column="sentence", label_column="label", user_column="customer")


def test_group_column_is_optional_per_file(tmp_path):
    from fedllm.data import MISSING_GROUP, subset

    with_g = tmp_path / "a.csv"
    with_g.write_text("sentence,label,group\nfine,1,x\nbad,0,\nok,1,y\n")
    t = read_table(with_g, text_column="sentence", label_column="label", group_column="group")
    assert t.groups == ["x", MISSING_GROUP, "y"]  # an empty cell is its own, named group
    without = tmp_path / "b.csv"
    without.write_text("sentence,label\nfine,1\n")
    assert read_table(without, text_column="sentence", label_column="label",
                      group_column="group").groups is None  # unavailable, not an error
    sub = subset(t, np.array([2, 0]))
    assert sub.groups == ["y", "x"]
