"""PII redaction at the node: planted identifiers never reach a token, counts are exact,
ordinary text is untouched."""

import numpy as np
import pytest

from fedllm.config import ConfigError, RedactionConfig
from fedllm.data import read_table, tokenize
from fedllm.node import NodeDataSpec, protect_table
from fedllm.pii import build_redactor, redact_texts

NAMES = ["Jane Doe", "Olusegun Adeyemi", "Marta Kowalska"]
EMAILS = ["jane.doe@example.com", "o.adeyemi+shop@mail.example.co.uk"]
PHONES = ["+1 415-555-0132", "(020) 7946 0958", "+49 30 901820"]
URLS = ["https://shop.example.org/orders?id=93812", "www.acme-store.com/help"]
IPS = ["192.168.17.4", "2001:db8::8a2e:370:7334"]
CARDS = ["4111 1111 1111 1111", "5500-0000-0000-0004"]
IBANS = ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432"]

PLANTED_ROWS = [
    ("u1", f"Hi, I am {NAMES[0]}, write to {EMAILS[0]} or call {PHONES[0]}", "1"),
    ("u1", f"my card {CARDS[0]} was charged twice, see {URLS[0]}", "0"),
    ("u2", f"{NAMES[1]} here: refund to {IBANS[0]} please, mail {EMAILS[1]}", "0"),
    ("u2", f"login from {IPS[0]} and {IPS[1]} blocked, phone {PHONES[1]}", "0"),
    ("u3", f"{NAMES[2]} paid with {CARDS[1]}; IBAN {IBANS[1]}; office {PHONES[2]}", "1"),
    ("u3", f"the FAQ at {URLS[1]} did not help", "0"),
]
EXPECTED = {"email": 2, "phone": 3, "url": 2, "ip": 2, "credit_card": 2, "iban": 2,
            "person": 3}

# Ordinary text, with the numbers, dots and capitals that a careless detector would eat.
ORDINARY = [
    "it 's a charming and often affecting journey .",
    "the film runs 1h 42m , cost $ 20 million and is rated 4.5 / 5 .",
    "Released in 2002, version 3.1.4 of the story : 12 chapters , 365 days .",
    "Order #4711 arrived on 03/04/2024 , thanks Doe family and Jane Austen fans !",
]


@pytest.fixture(scope="module")
def names_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("names") / "customers.txt"
    p.write_text("# known customers\n" + "\n".join(NAMES) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def redactor(names_file):
    return build_redactor(RedactionConfig(names_file=str(names_file)))


def planted_values():
    return NAMES + EMAILS + PHONES + URLS + IPS + CARDS + IBANS


def test_planted_identifiers_are_replaced_and_counted(redactor):
    res = redact_texts(redactor, [t for _, t, _ in PLANTED_ROWS] + ORDINARY)
    assert res.counts == EXPECTED
    assert res.rows_changed == list(range(len(PLANTED_ROWS)))
    joined = "\n".join(res.texts)
    for v in planted_values():
        assert v not in joined
    assert res.texts[0] == "Hi, I am <PERSON>, write to <EMAIL> or call <PHONE>"
    assert res.texts[1] == "my card <CREDIT_CARD> was charged twice, see <URL>"
    assert res.texts[4] == "<PERSON> paid with <CREDIT_CARD>; IBAN <IBAN>; office <PHONE>"


def test_ordinary_text_is_untouched(redactor):
    res = redact_texts(redactor, ORDINARY)
    assert res.texts == ORDINARY and res.rows_changed == []
    assert all(v == 0 for v in res.counts.values())


def test_only_configured_entities_and_the_names_note(names_file):
    r = build_redactor(RedactionConfig(entities=("email", "person")))
    assert r.notes and "NOT detected" in r.notes[0]  # no names list, no NER model
    text, counts = r.redact(f"{NAMES[0]} <{EMAILS[0]}> {PHONES[0]}")
    assert text == f"{NAMES[0]} <<EMAIL>> {PHONES[0]}" and dict(counts) == {"email": 1}
    with pytest.raises(ConfigError, match="names_file"):
        build_redactor(RedactionConfig(names_file=str(names_file.parent / "nope.txt")))
    with pytest.raises(ConfigError, match="not installed"):
        build_redactor(RedactionConfig(ner_model="xx_no_such_pipeline"))


def test_no_identifier_reaches_a_token_after_the_data_stage(tmp_path, names_file):
    from transformers import AutoTokenizer

    from fedllm.model import default_model_path

    data = tmp_path / "tickets.tsv"
    rows = PLANTED_ROWS + [(f"u{i}", t, "1") for i, t in enumerate(ORDINARY, start=4)]
    data.write_text("user\ttext\tlabel\n" + "".join(f"{u}\t{t}\t{y}\n" for u, t, y in rows),
                    encoding="utf-8")
    spec = NodeDataSpec(str(data), "text", "label", user_column="user",
                        redaction=RedactionConfig(names_file=str(names_file)))
    table = read_table(data, text_column="text", label_column="label", user_column="user")
    labels = np.array([int(y) for y in table.raw_labels])
    safe, _, info = protect_table(table, labels, spec, secret=b"s" * 32)
    assert info.redactions == EXPECTED and info.num_users == 7
    tok = AutoTokenizer.from_pretrained(default_model_path())
    ds = tokenize(tok, safe.texts, labels, max_length=128)
    decoded = [tok.decode(ids, skip_special_tokens=True) for ids in ds.input_ids]

    def squash(s):  # the uncased WordPiece decode lower-cases and re-spaces punctuation
        return "".join(s.lower().split())

    everything = squash(" ".join(decoded))
    for v in planted_values():
        assert squash(v) not in everything, v
    # ordinary rows decode to what they were (modulo the tokenizer's own normalisation)
    for i, t in enumerate(ORDINARY, start=len(PLANTED_ROWS)):
        assert squash(decoded[i]) == squash(t)
