"""PII scrubbing: e-mail addresses, phone numbers, IP addresses and card numbers → typed placeholders.

Regexes find candidates; numbers are then validated (the Luhn checksum for cards, `ipaddress` for
IPs, a digit count for phones) so that version strings, dates and prices survive. Order matters:
cards before phones (a card number also looks like a long phone number), IPs before phones.
"""

from __future__ import annotations

import ipaddress
import re

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "credit_card": "<CREDIT_CARD>",
    "ip_address": "<IP_ADDRESS>",
    "phone": "<PHONE>",
}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
# An optional +country code, then groups of digits separated by space, dot or dash, or an (area code).
_PHONE = re.compile(r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,8}){1,4}(?![\w-])"
                    r"|(?<![\w+.-])\+\d{7,14}(?!\w)")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str | None:
    digits = re.sub(r"\D", "", m.group())
    return PLACEHOLDERS["credit_card"] if 13 <= len(digits) <= 19 and _luhn(digits) else None


def _ip(m: re.Match) -> str | None:
    try:
        ipaddress.ip_address(m.group())
    except ValueError:
        return None
    return PLACEHOLDERS["ip_address"]


def _phone(m: re.Match) -> str | None:
    s = m.group()
    digits = sum(c.isdigit() for c in s)
    # A phone number has 7–15 digits (E.164) and at least one separator or a leading '+'; this keeps
    # plain numbers ('1500 units'), dates (2024-01-31: 8 digits but grouped 4-2-2) and prices intact.
    if not 7 <= digits <= 15:
        return None
    if re.fullmatch(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}", s) or re.fullmatch(r"\d{1,2}[-./]\d{1,2}[-./]\d{2,4}", s):
        return None
    return PLACEHOLDERS["phone"]


_RULES = (("email", _EMAIL, None), ("credit_card", _CARD, _card), ("ip_address", _IPV4, _ip),
          ("ip_address", _IPV6, _ip), ("phone", _PHONE, _phone))


def scrub_pii(text: str, counts: dict[str, int] | None = None) -> str:
    """Replace PII in `text` with placeholders; add how many of each kind to `counts`."""
    for kind, pattern, check in _RULES:
        if kind == "email" and "@" not in text:
            continue
        if kind == "ip_address" and pattern is _IPV6 and ":" not in text:
            continue

        def repl(m: re.Match, kind=kind, check=check) -> str:
            out = PLACEHOLDERS[kind] if check is None else check(m)
            if out is None:
                return m.group()
            if counts is not None:
                counts[kind] = counts.get(kind, 0) + 1
            return out

        text = pattern.sub(repl, text)
    return text


def pii_stage(docs: list[dict], stats: dict) -> tuple[list[dict], list[dict]]:
    """Scrub a batch in place; counts go to stats['pii'][kind]. Drops nothing."""
    counts = stats.setdefault("pii", {})
    for doc in docs:
        doc["text"] = scrub_pii(doc["text"], counts)
    return docs, []
