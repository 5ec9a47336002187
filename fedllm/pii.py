"""PII redaction at the node, before tokenisation: identifiers never enter training.

Detection uses Microsoft Presidio's *pattern recognizers* (``presidio-analyzer``), which run
fully offline and validate what they match: e-mail addresses (with a domain check), phone numbers
(Google's ``phonenumbers``), URLs, IPv4/IPv6 addresses, credit-card numbers (Luhn checksum) and
IBANs (ISO 7064 checksum). Presidio's NLP engine is not used (its spaCy model is not on PyPI).

Person names have no pattern; they are detected when a detector is available:

* ``names_file``: the operator's list of known names (e.g. customer names from their CRM),
  matched as whole words, case-insensitively (Presidio deny-list recognizer);
* ``ner_model``: an installed spaCy pipeline with NER (e.g. ``en_core_web_sm``), whose PERSON
  entities are redacted. fedllm does not install one.

Without either, names are **not** detected, and :func:`build_redactor` says so in
:attr:`Redactor.notes`. Every match is replaced by a typed placeholder (``<EMAIL>``,
``<PHONE>``, ...); the node reports only the number of replacements per type, never a value.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.config import REDACTION_ENTITIES, ConfigError, RedactionConfig

log = logging.getLogger(__name__)

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "url": "<URL>",
    "ip": "<IP>",
    "credit_card": "<CREDIT_CARD>",
    "iban": "<IBAN>",
    "person": "<PERSON>",
}
assert set(PLACEHOLDERS) == set(REDACTION_ENTITIES)

# Presidio's entity names -> ours.
_PRESIDIO = {"EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "URL": "url",
             "IP_ADDRESS": "ip", "CREDIT_CARD": "credit_card", "IBAN_CODE": "iban",
             "PERSON": "person"}


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    entity: str
    score: float


def _offline_email_recognizer() -> Any:
    """Presidio's EmailRecognizer checks the domain with tldextract, whose default extractor
    fetches the Public Suffix List from the internet; nodes are offline, so use the snapshot
    that ships inside tldextract."""
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):  # type: ignore[misc]
        def validate_result(self, pattern_text: str) -> bool:
            return bool(extract(pattern_text).fqdn)

    return OfflineEmailRecognizer()


def _pattern_recognizers(entities: Sequence[str]) -> list[Any]:
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UrlRecognizer,
    )

    makers = {"email": _offline_email_recognizer, "phone": PhoneRecognizer,
              "url": UrlRecognizer, "ip": IpRecognizer, "credit_card": CreditCardRecognizer,
              "iban": IbanRecognizer}
    return [makers[e]() for e in entities if e in makers]


def _read_names(path: str) -> list[str]:
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"redaction.names_file {p}: cannot read ({e})") from None
    names = sorted({ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")},
                   key=len, reverse=True)
    if not names:
        raise ConfigError(f"redaction.names_file {p}: no names in the file")
    return names


@dataclass
class Redactor:
    """Replaces the configured entity types in texts by typed placeholders."""

    entities: tuple[str, ...]
    recognizers: list[Any]
    ner: Any = None  # a loaded spaCy pipeline, when configured
    notes: list[str] = field(default_factory=list)

    def find(self, text: str) -> list[Span]:
        """Non-overlapping spans to redact, in text order. Overlaps (e.g. the domain of an
        e-mail also matching as a URL) go to the higher score, then the longer span."""
        found: list[Span] = []
        for r in self.recognizers:
            for res in r.analyze(text, r.supported_entities, None) or ():
                ent = _PRESIDIO.get(res.entity_type)
                if ent in self.entities:
                    found.append(Span(res.start, res.end, ent, float(res.score)))
        if self.ner is not None:
            for ent in self.ner(text).ents:
                if ent.label_ in ("PERSON", "PER"):
                    found.append(Span(ent.start_char, ent.end_char, "person", 0.85))
        found.sort(key=lambda s: (-s.score, -(s.end - s.start), s.start))
        kept: list[Span] = []
        for s in found:
            if all(s.end <= k.start or s.start >= k.end for k in kept):
                kept.append(s)
        return sorted(kept, key=lambda s: s.start)

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        spans = self.find(text)
        out, pos = [], 0
        for s in spans:
            out.append(text[pos:s.start])
            out.append(PLACEHOLDERS[s.entity])
            pos = s.end
        out.append(text[pos:])
        return "".join(out), Counter(s.entity for s in spans)


def build_redactor(config: RedactionConfig) -> Redactor:
    """A redactor for ``config`` (ConfigError naming the field if it cannot be built)."""
    entities = tuple(dict.fromkeys(config.entities))
    recognizers = _pattern_recognizers(entities)
    notes: list[str] = []
    ner = None
    if "person" in entities:
        if config.names_file:
            from presidio_analyzer import PatternRecognizer

            recognizers.append(PatternRecognizer(
                supported_entity="PERSON", name="operator names list",
                deny_list=_read_names(config.names_file)))
        if config.ner_model:
            ner = _load_spacy(config.ner_model)
        if not config.names_file and not config.ner_model:
            notes.append("person names are NOT detected: set redaction.names_file (known "
                         "names) or redaction.ner_model (an installed spaCy NER pipeline)")
    return Redactor(entities, recognizers, ner, notes)


def _load_spacy(name: str) -> Any:
    try:
        import spacy
    except ImportError:  # pragma: no cover - spaCy comes with presidio-analyzer
        raise ConfigError("redaction.ner_model needs spaCy (pip install spacy)") from None
    if not spacy.util.is_package(name) and not Path(name).is_dir():
        raise ConfigError(f"redaction.ner_model: spaCy pipeline {name!r} is not installed "
                          "(nodes are offline: install its wheel, or give a local folder)")
    return spacy.load(name, disable=["parser", "lemmatizer", "tagger"])


@dataclass(frozen=True)
class RedactionResult:
    texts: list[str]
    counts: dict[str, int]  # replacements per entity type (every configured type, 0 included)
    rows_changed: list[int]  # indices of texts with at least one replacement


def redact_texts(redactor: Redactor, texts: Sequence[str]) -> RedactionResult:
    total: Counter[str] = Counter()
    out: list[str] = []
    changed: list[int] = []
    for i, t in enumerate(texts):
        new, counts = redactor.redact(t)
        if counts:
            changed.append(i)
            total.update(counts)
        out.append(new)
    return RedactionResult(out, {e: total.get(e, 0) for e in redactor.entities}, changed)


__all__ = ["PLACEHOLDERS", "RedactionResult", "Redactor", "Span", "build_redactor",
           "redact_texts"]
