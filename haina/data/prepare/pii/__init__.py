"""PII scrubbing: find personal data and secrets in text and replace each with a typed placeholder.

Kinds (placeholder), in the order they claim text when two candidates overlap (the earlier kind wins):

- `secret` (`<SECRET>`): PEM private-key blocks (BEGIN to END with only base64, headers and `\\n` escapes
  between; a block cut off before END runs to the end of its base64 lines), AWS access key ids (AKIA/ASIA…) and
  `aws_secret_access_key = …` values, GitHub tokens (ghp_/gho_/ghu_/ghs_/ghr_, github_pat_), Slack tokens
  (xox?-), OpenAI/Anthropic-style `sk-…` keys (a digit and a long random-looking run required, so `sk-learn-…`
  survives), Stripe `sk_live_`/`rk_live_`, Google `AIza…` keys, JWTs (the header must decode to JSON naming `alg`
  or `typ`), and the `user:password` of `scheme://user:password@host`. A mentioned marker is not a key.
- `email` (`<EMAIL>`): local@domain with an alphabetic TLD; `name@2x.png`-style image names survive.
- `iban` (`<IBAN>`): a known country code, that country's length, and the ISO 13616 mod-97 checksum.
- `cn_id` (`<CN_ID>`): 18-character PRC resident ID: province code, a real birth date, GB 11643 check character.
- `credit_card` (`<CREDIT_CARD>`): 14–19 digits in card groupings (4-4-4-4[-n], 4-6-4/5) or unbroken (14, 15,
  16 or 19 digits, not an operand in code such as `rng(…)` or `…*t`), an issuer prefix with its length
  (2221–2720, 30/36/38/39, 34/37, 35, 4, 50–58, 6) and the Luhn checksum.
- `us_ssn` (`<US_SSN>`): AAA-GG-SSSS with the SSA's rules (area not 000, 666 or 9xx; group not 00; serial not
  0000); unbroken or space-separated only right after "SSN" / "social security (number)".
- `ip_address` (`<IP_ADDRESS>`): IPv4 (octets 0–255, no leading zeros) and IPv6 (validated by `ipaddress`;
  short `x::y` forms need a group of 3+ hex digits, so C++/Rust paths like `a::b` survive).
- `phone` (`<PHONE>`): `+CC` or `00CC` international numbers (an assigned E.164 country code, and the national
  length of common countries; unbroken `+…` only with 10–15 digits), `(area) nnn-nnnn` (9–12 digits, the area
  not a year), North American `[1-]NPA-NXX-XXXX` (one separator throughout) and `NXX-XXXX`, Indian `9xxxx xxxxx`,
  PRC mobiles `1[3-9]x xxxx xxxx` (unbroken only near Chinese text or a phone word), trunk-prefix national numbers
  (`020 7946 0958`, `03-1234-5678`, `0755-8765 4321`, `07700900123`; 9–12 digits, trailing groups that would
  overflow the length are left out), and 7–15 digits right after a phone word (phone, tel, call, fax, mobile,
  WhatsApp, 电话, 手机, 致电, 热线 …, through `number`/`:`/`号码` and the like).

Near misses that must survive, and how:

- Version strings versus IPv4. A dotted quad is NOT an address when (1) it is glued to a word or is part of a
  longer dotted sequence (`v1.2.3.4`, `Qt5.1.2.3.4`, OIDs like `1.3.6.1.4.1`); (2) it follows a package
  operator (`==`, `>=`, `<=`, `~=`, `!=`, `^`, `~`); (3) it carries a pre-release or build suffix (`-beta`,
  `-rc1`, `+build`); or (4) on the same line it follows a version or numbering word directly, or through at most
  two linking words (is, was, number, no, nr, now, string, id, 号, 为, 是) and `:`/`=`/`#`/`(`/quotes: version
  (also inside `AssemblyVersion`, `app_version`), identifier, oid, ver, v, release, rel, build, firmware, kernel,
  driver, bios, patch, revision, rev, sdk, section, sec, chapter, ch, clause, figure, fig, step, article, art,
  appendix, paragraph, para, par, §, 版本(号), 固件, 第; or "update/upgrade/bump [≤ 2 words] to", 升级到, 更新到.
  So `version 1.2.3.4`, `build is 10.0.1.2` and `版本号：1.2.3.4` survive while `the build server at 10.0.0.5`
  is scrubbed. A product name is no context: `zlib 1.2.5.3` reads as an address (octets ≤ 255), while most
  four-part product versions (`Windows 10.0.19045.3693`, `Chrome/120.0.6099.109`) have a part over 255.
- Dates, times, ISBNs, order numbers: `:` is never a phone separator; dates with a four-digit year (any order,
  `-./` or space) and US ZIP+4 codes after a state (`MA 02110-1301`) are claimed first so no phone or card can
  take their digits; a number that continues a run of digit groups (`4530 0179 …`) is not a phone or card;
  numbers right after order / invoice / tracking / ref / ticket / sku / serial / isbn / seed / 订单 / 单号 / 编号
  … are not phones, cards or SSNs; IBAN-shaped strings with a failing checksum are claimed too. Hex hashes, git
  SHAs and UUIDs match no digit-only pattern and hold no colon.

Text is matched ASCII-only (`re.ASCII`), so a CJK character next to PII is a boundary, and on a copy in which
full-width forms (`１３８`, `＠`, `（`, `＋`) are folded to ASCII one code point for one, so spans line up.
Not found, by design: names and postal addresses, obfuscated e-mails (`name at example dot com`) and e-mails with
non-ASCII domain names, North American numbers written as 10 bare digits with no phone word, SSNs without dashes
or an SSN word, AWS secret keys without their key name, and passwords outside URLs.
"""

from __future__ import annotations

import bisect

from haina.data.prepare.pii.finders import DIGITS7, FINDERS, fold_fullwidth

PLACEHOLDERS = {
    "secret": "<SECRET>",
    "email": "<EMAIL>",
    "iban": "<IBAN>",
    "cn_id": "<CN_ID>",
    "credit_card": "<CREDIT_CARD>",
    "us_ssn": "<US_SSN>",
    "ip_address": "<IP_ADDRESS>",
    "phone": "<PHONE>",
}
KINDS = tuple(PLACEHOLDERS)  # priority order: an earlier kind wins an overlap
Span = tuple[int, int, str]  # (start, end, kind)


def find_pii(text: str) -> list[Span]:
    """Every PII span in `text` as (start, end, kind), sorted by start; spans never overlap."""
    view = fold_fullwidth(text)
    many_digits = DIGITS7.search(view) is not None
    starts: list[int] = []
    spans: list[Span] = []
    for kind, wanted, finder in FINDERS:
        if not (many_digits if wanted is None else wanted(view)):
            continue
        for s, e in finder(view):
            i = bisect.bisect_right(starts, s)
            # Kinds run in priority order, so a span that overlaps an earlier one loses.
            if (i and spans[i - 1][1] > s) or (i < len(spans) and spans[i][0] < e):
                continue
            starts.insert(i, s)
            spans.insert(i, (s, e, kind))
    return [span for span in spans if span[2] is not None]


def scrub_pii(text: str, counts: dict[str, int] | None = None) -> str:
    """Replace PII in `text` with placeholders; add how many of each kind to `counts`."""
    spans = find_pii(text)
    if not spans:
        return text
    out, pos = [], 0
    for s, e, kind in spans:
        out.append(text[pos:s])
        out.append(PLACEHOLDERS[kind])
        pos = e
        if counts is not None:
            counts[kind] = counts.get(kind, 0) + 1
    out.append(text[pos:])
    return "".join(out)


def _scrub_value(value, counts: dict[str, int] | None):
    if isinstance(value, str):
        return scrub_pii(value, counts)
    if isinstance(value, dict):
        return {k: _scrub_value(v, counts) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_value(v, counts) for v in value]
    return value


def scrub_record(doc: dict, counts: dict[str, int] | None = None) -> dict:
    """Scrub a record in place before it is written: its text and every string inside its `meta`.

    The id, source path, label and reason are left as they are: they name the record, not a person.
    """
    if isinstance(doc.get("text"), str):
        doc["text"] = scrub_pii(doc["text"], counts)
    if doc.get("meta"):
        doc["meta"] = _scrub_value(doc["meta"], counts)
    return doc


def pii_stage(docs: list[dict], stats: dict) -> tuple[list[dict], list[dict]]:
    """Scrub a batch in place; counts go to stats['pii'][kind]. Drops nothing."""
    counts = stats.setdefault("pii", {})
    for doc in docs:
        scrub_record(doc, counts)
    return docs, []
