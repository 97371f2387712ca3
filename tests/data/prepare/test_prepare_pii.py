"""PII patterns: each kind is replaced by its placeholder and counted; look-alikes survive."""

import pytest

from haina.data.prepare.pii import pii_stage, scrub_pii


@pytest.mark.parametrize("text,expected,kind", [
    ("write to jane.doe+news@mail.example.co.uk today", "write to <EMAIL> today", "email"),
    ("call +1 (555) 123-4567 now", "call <PHONE> now", "phone"),
    ("call 555-123-4567 now", "call <PHONE> now", "phone"),
    ("ring +44 20 7946 0958.", "ring <PHONE>.", "phone"),
    ("host 192.168.0.17 is up", "host <IP_ADDRESS> is up", "ip_address"),
    ("host 2001:db8::8a2e:370:7334 is up", "host <IP_ADDRESS> is up", "ip_address"),
    ("loopback ::1 and fe80::1", "loopback <IP_ADDRESS> and <IP_ADDRESS>", "ip_address"),
    ("card 4111 1111 1111 1111 expired", "card <CREDIT_CARD> expired", "credit_card"),
    ("card 5500-0000-0000-0004 expired", "card <CREDIT_CARD> expired", "credit_card"),
])
def test_pii_is_replaced_and_counted(text, expected, kind):
    counts = {}
    assert scrub_pii(text, counts) == expected
    assert counts == {kind: expected.count("<")}


@pytest.mark.parametrize("text", [
    "In 2023 we sold 1500 units.",
    "Python 3.11.4 was released on 2024-01-31 at 12:30:45.",
    "The price is $1,299.99 and the ratio 3:2.",
    "Not an address: 999.1.1.1 or 10.0.0.256.",
    "A Luhn-invalid number 4111 1111 1111 1112 stays.",
    "ISBN 978-3-16-148410-0 and the year 1999.",
    "user at example dot com",
])
def test_look_alikes_are_kept(text):
    counts = {}
    assert scrub_pii(text, counts) == text
    assert counts == {}


def test_pii_stage_counts_across_a_batch():
    docs = [{"text": "a@b.io and c@d.io"}, {"text": "8.8.8.8"}]
    stats = {}
    kept, dropped = pii_stage(docs, stats)
    assert dropped == [] and [d["text"] for d in kept] == ["<EMAIL> and <EMAIL>", "<IP_ADDRESS>"]
    assert stats["pii"] == {"email": 2, "ip_address": 1}
