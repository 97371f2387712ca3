"""The finders of the PII kinds: each yields (start, end) spans of its kind in the folded text.

Regexes find candidates; checksums, context and shape rules (see the package docstring) decide. Text is matched
ASCII-only (`re.ASCII`), on a copy in which full-width forms are folded to ASCII one code point for one.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import ipaddress
import json
import re
from collections.abc import Callable, Iterator

from haina.data.prepare.pii.tables import (
    CN_PROVINCES,
    COUNTRY_CODES,
    IBAN_LENGTHS,
    NSN_LENGTHS,
    card_issuer_ok,
    cn_id_check,
    iban_ok,
    luhn_ok,
)

_A = re.ASCII
_AI = re.ASCII | re.IGNORECASE

# --- full-width folding ---------------------------------------------------------------------------------------

_FOLD = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}
# Only digits, letters, ＠, ＋ and （ change what the patterns can see; full-width punctuation elsewhere is a
# boundary either way, so most Chinese text skips the (per-character) translation.
_FOLD_NEEDED = re.compile("[\uff08\uff0b\uff10-\uff19\uff20-\uff3a\uff41-\uff5a]")


def fold_fullwidth(text: str) -> str:
    """`text` with full-width digits, letters and symbols as ASCII (same length), if it has any."""
    if text.isascii() or not _FOLD_NEEDED.search(text):
        return text
    return text.translate(_FOLD)


# --- context --------------------------------------------------------------------------------------------------

# Words after which a number is an identifier of something else, not a phone or a card.
_NOT_PERSONAL = re.compile(
    r"(?:\b(?:order|invoice|tracking|ref|reference|case|ticket|sku|serial|part|model|isbn|issn|doi|patent|"
    r"receipt|transaction|txn|batch|lot|item|product|policy|claim|shipment|seed|hash|nonce|checksum|timestamp|"
    r"ieee|iso|iec|rfc|ansi|ecma|din|gb)"
    r"|订单|单号|编号|运单|发票|流水)"
    r"(?:[\s.]*(?:no|nr|num|number|id|code|#)\.?)?[\s:#=：]*$", _AI)
_VERSION_BEFORE = re.compile(
    r"(?:(?:version|identifier|\b(?:oid|ver|v|release|rel|build|firmware|kernel|driver|bios|patch|revision|rev|"
    r"sdk|section|sec|chapter|ch|clause|figure|fig|step|article|art|appendix|paragraph|para|par)|§|版本号?|固件|第)"
    r"[\s.:=#：(\"']{0,3}(?:(?:is|was|number|no|nr|now|string|id|号|为|是)[\s.:=#：(\"']{0,3}){0,2}"
    r"|\b(?:updat|upgrad|bump)(?:e|es|ed|ing)?\s+(?:\w+\s+){0,2}to\s*|升级到|更新到|升级至|更新至)$", _AI)
_VERSION_OP = re.compile(r"(?:==|>=|<=|~=|!=|\^|~)\s*$")
_PRERELEASE = re.compile(r"-(?:alpha|beta|rc|dev|pre|post|snapshot|final|nightly)|\+[0-9A-Za-z]", _AI)
_PHONE_WORDS = re.compile(r"(?:\b(?:phone|tel|telephone|mobile|mob|ph|cell|call|fax|whatsapp|hotline|sms)|电话|手机|"
                          r"联系方式|致电|热线|传真|短信)", _AI)


def _before(view: str, start: int, n: int = 40) -> str:
    """The text just before `start` on the same line (at most `n` characters)."""
    lo = max(0, start - n)
    nl = view.rfind("\n", lo, start)
    return view[(nl + 1 if nl >= 0 else lo):start]


# --- finders: each yields (start, end) spans of one kind in the folded view ----------------------------------

Finder = Callable[[str], Iterator[tuple[int, int]]]

_PEM_BEGIN = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----", _A)
# Between BEGIN and END: base64, whitespace, '\n' escapes (keys inside JSON strings) and 'Proc-Type: …' headers.
_PEM_INNER = re.compile(r"(?:[A-Za-z0-9+/=\s]|\\[nr]|[A-Za-z-]+: [^\n\\]+)*", _A)
# A block cut off before its END line: the base64 and header lines that follow BEGIN.
_PEM_TAIL = re.compile(r"(?:(?:[ \t]*(?:\r?\n|\\r\\n|\\n))+(?:[A-Za-z0-9+/=]{4,}|[A-Za-z-]+: [^\n\\]+)"
                       r"[ \t]*(?=[\r\n\\]|$))+", _A)
_B64_RUN = re.compile(r"[A-Za-z0-9+/]{16}", _A)
_TOKENS = (  # (literal that must occur, pattern)
    ("AKIA", re.compile(r"AKIA[A-Z0-9]{16}", _A)),
    ("ASIA", re.compile(r"ASIA[A-Z0-9]{16}", _A)),
    ("gh", re.compile(r"gh[pousr]_[A-Za-z0-9]{36,255}", _A)),
    ("github_pat_", re.compile(r"github_pat_[A-Za-z0-9_]{22,255}", _A)),
    ("xox", re.compile(r"xox[abposre]-[A-Za-z0-9-]{10,250}", _A)),
    ("sk-", re.compile(r"sk-[A-Za-z0-9_-]{20,250}", _A)),
    ("k_", re.compile(r"[rs]k_(?:live|test)_[A-Za-z0-9]{16,250}", _A)),
    ("AIza", re.compile(r"AIza[0-9A-Za-z_-]{35}", _A)),
    ("eyJ", re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*", _A)),
)
_RUN = re.compile(r"[A-Za-z0-9_]{16,}", _A)
_AWS_SECRET = re.compile(r"(?:aws_?secret(?:_?access)?_?key|secret_?access_?key)[\"']?\s*[:=]\s*[\"']?"
                         r"([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])", _AI)
_URL_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{1,15}://([^\s:/?#@\[\]\"'<>]*:[^\s/?#@\"'<>]+)@", _A)


def _glued(view: str, s: int, e: int, chars: str = "_") -> bool:
    """True when the span continues a longer token on either side."""
    return (s > 0 and (view[s - 1].isascii() and (view[s - 1].isalnum() or view[s - 1] in chars))) or \
           (e < len(view) and (view[e].isascii() and (view[e].isalnum() or view[e] in chars)))


def _random_looking(s: str) -> bool:
    """Mixed case, or letters with digits: how random base62 looks and words do not."""
    return (not s.islower() and not s.isupper()) or (any(c.isdigit() for c in s) and any(c.isalpha() for c in s))


def _jwt_ok(token: str) -> bool:
    head = token.split(".", 1)[0]
    try:
        obj = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and ("alg" in obj or "typ" in obj)


def _find_secrets(view: str) -> Iterator[tuple[int, int]]:
    if "-----BEGIN" in view:
        for m in _PEM_BEGIN.finditer(view):
            end_line = f"-----END {m.group(1)}-----"
            stop = view.find(end_line, m.end())
            if stop >= 0 and _PEM_INNER.fullmatch(view, m.end(), stop) and _B64_RUN.search(view, m.end(), stop):
                yield m.start(), stop + len(end_line)
            elif (tail := _PEM_TAIL.match(view, m.end())) and _B64_RUN.search(tail.group()):
                yield m.start(), tail.end()  # truncated before its END line
            # else: the marker is only mentioned ('files start with -----BEGIN RSA PRIVATE KEY-----')
    for literal, pattern in _TOKENS:
        if literal not in view:
            continue
        for m in pattern.finditer(view):
            s, e = m.span()
            if _glued(view, s, e, "_-"):
                continue
            tok = m.group()
            if literal == "sk-" and not (any(map(str.isdigit, tok)) and any(map(_random_looking, _RUN.findall(tok)))):
                continue  # hyphenated words ('sk-learn-…') lack a digit and a long random-looking run
            if literal == "eyJ" and not _jwt_ok(tok):
                continue
            yield s, e
    if "ecret" in view or "ECRET" in view:
        for m in _AWS_SECRET.finditer(view):
            yield m.span(1)
    if "://" in view and "@" in view:
        for m in _URL_USERINFO.finditer(view):
            yield m.span(1)


_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24})(?![A-Za-z0-9_-])", _A)
_IMAGE_SCALE = re.compile(r"\d(?:\.\d)?x\.(?:png|jpe?g|gif|webp|svg|bmp)$", _AI)


def _find_emails(view: str) -> Iterator[tuple[int, int]]:
    # Scan from each '@' outwards: cheaper than a regex that retries the local part at every letter.
    at = view.find("@")
    while at >= 0:
        s = at
        # Internationalized local parts ('főo@…') take non-ASCII letters too, but not CJK: in Chinese text the
        # characters before an address are words, not part of it.
        while s > 0 and at - s < 64 and (view[s - 1] in _LOCAL or (view[s - 1].isalpha() and view[s - 1] < "\u2e80")):
            s -= 1
        while s < at and view[s] in ".-+":  # a local part starts with a letter, digit, _ or %
            s += 1
        m = _DOMAIN.match(view, at + 1)
        if s < at and m and view[at - 1] != "." and not _IMAGE_SCALE.match(view, at + 1, m.end()):
            yield s, m.end()
        at = view.find("@", at + 1)


_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,8}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])", _A)


def _find_ibans(view: str, valid: bool = True) -> Iterator[tuple[int, int]]:
    for m in _IBAN.finditer(view):
        s, cand = m.start(), m.group()
        length = IBAN_LENGTHS.get(cand[:2])
        if length is None:
            continue
        # Cut at the country's length, which must fall on a group boundary (a word may follow the IBAN).
        seen, cut = 0, len(cand)
        for i, c in enumerate(cand):
            if c != " ":
                seen += 1
                if seen == length:
                    cut = i + 1
                    break
        if seen < length or (cut < len(cand) and cand[cut] != " "):
            continue
        if iban_ok(cand[:cut].replace(" ", "")) == valid:
            yield s, s + cut


_DATE = re.compile(r"(?<![\w.\-/])(?:(\d{1,2})[-./ ](\d{1,2})[-./ ](?:19|20)\d\d"
                   r"|(?:19|20)\d\d[-./ ](\d{1,2})[-./ ](\d{1,2}))"
                   r"(?![\w]|[-./]\d)", _A)


_ZIP4 = re.compile(r"\b[A-Z]{2},?[ \t]+(\d{5}-\d{4})(?![\w\-])", _A)  # 'MA 02110-1301', as in every GPL header


def _find_shields(view: str) -> Iterator[tuple[int, int]]:
    """Spans that are not PII but hold digit groups a phone or card pattern could take: dates (day, month and
    a four-digit year, any order and separator), US ZIP+4 codes and IBAN-shaped strings whose checksum fails."""
    for m in _DATE.finditer(view):
        a, b = (int(x) for x in (m.group(1, 2) if m.group(1) else m.group(3, 4)))
        if 1 <= min(a, b) and max(a, b) <= 31 and min(a, b) <= 12:
            yield m.span()
    if "-" in view:
        for m in _ZIP4.finditer(view):
            yield m.span(1)
    if _IBAN_HINT.search(view):
        yield from _find_ibans(view, valid=False)


_NUM_LB = r"(?<![\w+\-./#$@%])(?<!\d[ \-])"  # not inside a longer run of digit groups
_NUM_LA = r"(?![\w@]|[\-./]\d)"
_CN_ID = re.compile(r"(?<![\w+\-./#$@%])[1-8]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]"
                    + _NUM_LA, _A)


def _find_cn_ids(view: str) -> Iterator[tuple[int, int]]:
    for m in _CN_ID.finditer(view):
        d = m.group()
        if int(d[:2]) not in CN_PROVINCES or cn_id_check(d[:17]) != d[17].upper():
            continue
        try:
            datetime.date(int(d[6:10]), int(d[10:12]), int(d[12:14]))
        except ValueError:
            continue
        yield m.span()


_CARD = re.compile(_NUM_LB + r"(?:\d{4}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{1,3})?|\d{4}([ -])\d{6}\2\d{4,5}|\d{13,19})"
                   + _NUM_LA, _A)


def _in_arithmetic(view: str, s: int, e: int) -> bool:
    """Whether a bare number is an operand in code or maths: `rng(4202165767276)`, `+ 4828147466240000*t`."""
    before, after = view[max(0, s - 3):s].rstrip(), view[e:e + 3].lstrip()
    return (before[-1:] in tuple("([*/^+-<>")) or (after[:1] in tuple("*/^)]"))


def _find_cards(view: str) -> Iterator[tuple[int, int]]:
    for m in _CARD.finditer(view):
        s, e = m.span()
        d = m.group().replace(" ", "").replace("-", "")
        if len(d) == e - s and (len(d) not in (14, 15, 16, 19) or _in_arithmetic(view, s, e)):
            continue  # unbroken: the card lengths in use (13 is long retired), and not an operand
        if card_issuer_ok(d) and luhn_ok(d) and not _NOT_PERSONAL.search(_before(view, s)):
            yield s, e


_SSN = re.compile(_NUM_LB + r"(\d{3})-(\d{2})-(\d{4})" + _NUM_LA, _A)
_SSN_CTX = re.compile(r"\b(?:ssn|ss#|social security(?: number| no\.?| #)?)[\s:#=.]{0,4}(\d{3}) ?(\d{2}) ?(\d{4})"
                      r"(?![\w@]|[\-./]\d)", _AI)


def _find_ssns(view: str) -> Iterator[tuple[int, int]]:
    for pattern, group in ((_SSN, 0), (_SSN_CTX, None)):
        for m in pattern.finditer(view):
            area, grp, serial = m.group(1), m.group(2), m.group(3)
            if area in ("000", "666") or area[0] == "9" or grp == "00" or serial == "0000":
                continue
            if group == 0 and _NOT_PERSONAL.search(_before(view, m.start())):
                continue
            yield m.span() if group == 0 else (m.start(1), m.end(3))


_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                   r"(?![\w]|\.\d)", _A)
_IPV6_HINT = re.compile(r"[0-9A-Fa-f]?:[0-9A-Fa-f]{0,4}:", _A)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:])",
                   _A)


def is_version_context(view: str, start: int, end: int) -> bool:
    """Whether the dotted quad at view[start:end] reads as a version or section number (see the docstring)."""
    before = _before(view, start)
    return bool(_VERSION_OP.search(before) or _VERSION_BEFORE.search(before)
                or _PRERELEASE.match(view, end, end + 12))


def _find_ips(view: str) -> Iterator[tuple[int, int]]:
    # IPv6 first: '::ffff:192.0.2.1' is one address, not a prefix and an IPv4.
    if ":" in view and _IPV6_HINT.search(view):
        for m in _IPV6.finditer(view):
            cand = m.group()
            try:
                ipaddress.IPv6Address(cand)
            except ValueError:
                continue
            # 'a::b' could be a scope path (C++, Rust): short compressed forms need a 3-hex-digit group; and
            # 'x::' with one group is reST ('length 1000::') unless a prefix length follows ('fc00::/7').
            if cand.count(":") < 3 and cand != "::1" and max(map(len, cand.split(":"))) < 3:
                continue
            if cand.endswith("::") and cand.count(":") == 2 and view[m.end():m.end() + 1] != "/":
                continue
            yield m.span()
    if "." in view:
        for m in _IPV4.finditer(view):
            if not is_version_context(view, *m.span()):
                yield m.span()


_G = r"[ .\-]?"
_PHONE = re.compile(  # the lookahead first: most positions fail on one character test
    r"(?=[+(\d])(?<![\w+\-./#$@%])(?<!\d[ .\-])(?:"
    r"(?P<intl>(?:\+[1-9]\d{0,2}|\(\+[1-9]\d{0,2}\)|00[1-9]\d{0,2})(?:" + _G + r"\(0\))?(?:" + _G
    + r"(?:\(\d{1,5}\)|\d{1,6})){1,6})"
    r"|(?P<paren>\(\d{2,5}\)" + _G + r"\d{3,5}" + _G + r"\d{3,4})"
    r"|(?<!:)(?P<cnmob>1[3-9]\d(?:[ \-]?\d{4}){2})"  # after ':' only via a phone word (times, ratios)
    r"|(?<!:)(?P<nanp>1(?P<s1>[ .\-])[2-9]\d{2}(?P=s1)\d{3}(?P=s1)\d{4}|[2-9]\d{2}(?P<s>[ .\-])\d{3}(?P=s)\d{4})"
    r"|(?<!:)(?P<trunk>0[1-9]\d{0,4}(?:[ .\-]\d{2,8}){1,4})"  # unbroken ('0123456789'): only after a phone word
    r"|(?<!:)(?P<local>[2-9]\d{2}-(?!19\d\d|20\d\d)\d{4}|[6-9]\d{4}[ \-]\d{5})"  # NXX-XXXX, not 754-2008; IN 5+5
    r")(?![\w@]|[\-./]\d)", _A)
# After a phone word: a few linking tokens ('number', 'me at', '号码', ':'), then 7–15 digits in groups.
# On the same line, through linking words; a '.' only after an abbreviation ('Tel. 555…', not 'on mobile. 2013…').
_PHONE_AFTER_WORD = re.compile(r"(?:(?<=tel|mob|fax)\.|(?<=\bph)\.)?(?:[ \t]*(?:numbers?|no\.?|nr|num|#|at|on|is|me|"
                               r"us|号码|号|是|为|[:：=,，\-]))*[ \t]*((?:\+|\(\+?)?\d[\d .\-()]{5,20}\d)"
                               r"(?![\w@]|[\-./]\d)", _AI)
_GROUP = re.compile(r"\(\d+\)|\d+", _A)
_CJK = re.compile("[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")
_YEAR = re.compile(r"(?:19|20)\d\d", _A)
_CC = re.compile(r"\(?(?:\+|00)(\d{1,3})\)?", _A)


def _trim_groups(text: str, lo: int, hi: int, first: int = 0) -> int | None:
    """The end of the longest prefix of digit groups of `text` whose digits (after the first `first` groups, and
    ignoring a '(0)' trunk group) number lo..hi; None if no prefix fits. Drops trailing groups that belong to
    the next number ('call 020 7946 0958 24 hours')."""
    groups = list(_GROUP.finditer(text))
    counts = [0 if g.group() == "(0)" else sum(c.isdigit() for c in g.group()) for g in groups]
    for k in range(len(groups), first, -1):
        n = sum(counts[first:k])
        if lo <= n <= hi:
            return groups[k - 1].end()
        if n < lo:
            return None
    return None


def _phone_end(m: re.Match) -> int | None:
    """Validate one structured phone match; the end of the number (trailing groups trimmed) or None."""
    kind, s = m.lastgroup, m.start()
    text = m.group()
    if kind == "intl":
        cc = _CC.match(text)
        rest = text[cc.end():]
        if rest[:1] in (" ", ".", "-", "(", ")") or cc.group(0).endswith(")"):  # the code stands apart
            if cc.group(1) not in COUNTRY_CODES:
                return None
            end = _trim_groups(rest, *NSN_LENGTHS.get(cc.group(1), (6, 12)))
            return None if end is None else s + cc.end() + end
        # +CCNNN… unbroken: 10–15 digits and nothing else ('+35236450.6' is a signed number), led by a real
        # country code ('+2147483647' is not: no country has code 21 or 214).
        digits = text[1:]
        if text[0] != "+" or not digits.isdigit() or not 10 <= len(digits) <= 15:
            return None
        if digits[0] == "1":
            return m.end() if len(digits) == 11 and digits[1] in "23456789" else None
        return m.end() if digits[:2] in COUNTRY_CODES or digits[:3] in COUNTRY_CODES else None
    if kind == "paren":
        area = text[1:text.index(")")]
        digits = sum(c.isdigit() for c in text)
        return m.end() if 9 <= digits <= 12 and not _YEAR.fullmatch(area) else None  # '(1996) 329-359'
    if kind == "cnmob" and text.isdigit():
        # Unbroken 1[3-9]… is also any 11-digit number: only near Chinese text or after a phone word.
        near = m.string[max(0, s - 24):m.end() + 24]
        return m.end() if _CJK.search(near) or _PHONE_WORDS.search(_before(m.string, s)) else None
    if kind == "trunk":
        end = _trim_groups(text, 9, 12)
        if end is None:
            return None
        groups = text[:end].split(".")
        # Dots only: French pairs (01.42.68.53.00) or three groups; not '03.08.16.0001.01' or '01234.000000'.
        if len(groups) > 1 and not any(c in text[:end] for c in " -") and not (
                len(groups) == 3 or all(len(g) == 2 for g in groups)):
            return None
        return s + end
    return m.end()


def _find_phones(view: str) -> Iterator[tuple[int, int]]:
    for m in _PHONE.finditer(view):
        end = _phone_end(m)
        if end is not None and not _NOT_PERSONAL.search(_before(view, m.start())):
            yield m.start(), end
    for w in _PHONE_WORDS.finditer(view):
        m = _PHONE_AFTER_WORD.match(view, w.end())
        if m is None or _NOT_PERSONAL.search(_before(view, w.start())):
            continue
        s = m.start(1)
        end = _trim_groups(m.group(1), 7, 15)
        if end is not None:
            yield s, s + end


# Cheap tests that skip a finder when it cannot match (most documents hold no PII at all).
DIGITS7 = re.compile(r"\d(?:[\d .\-()]{0,3}\d){6}", _A)
_IBAN_HINT = re.compile(r"[A-Z]{2}\d\d", _A)
_SSN_WORD = re.compile(r"ssn|ss#|social security", _AI)

# (kind, prefilter, finder); kind None claims text without replacing it; prefilter None: a run of 7 digits.
FINDERS: tuple[tuple[str | None, Callable[[str], bool] | None, Finder], ...] = (
    ("secret", lambda v: True, _find_secrets),
    ("email", lambda v: "@" in v, _find_emails),
    ("iban", lambda v: _IBAN_HINT.search(v) is not None, _find_ibans),
    (None, None, _find_shields),  # claimed, never replaced
    ("cn_id", None, _find_cn_ids),
    ("credit_card", None, _find_cards),
    ("us_ssn", lambda v: "-" in v or _SSN_WORD.search(v) is not None, _find_ssns),
    ("ip_address", lambda v: "." in v or ":" in v, _find_ips),
    ("phone", None, _find_phones),
)
