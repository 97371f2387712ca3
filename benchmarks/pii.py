"""Benchmark the PII scrubber: span-level precision and recall per kind, near-miss survival, and speed.

Generates English and Chinese documents (seeded) from sentence templates: support e-mails, CRM notes, logs,
config files, CSV and JSON rows, Markdown tables, signatures. PII is planted in the formats people write, drawn
per country (phones: North American, UK, DE, FR, JP, AU, IN, BR, RU, HK, SG, KR, PRC mobile and landline,
full-width digits; e-mails with subdomains, plus-tags, numeric QQ addresses, mailto: links; IPv6 compressed,
bracketed, upper-case, IPv4-mapped …), together with near misses that must survive: versions, dates, times,
ISBNs, hashes and UUIDs, ordinary numbers, order numbers, and numbers with a wrong checksum. Every planted
value is recorded with its exact span. The generator computes its own checksums; it shares no code with the
scrubber.

Counting (span level, strict): a predicted span is correct when a planted span of the same kind has exactly its
start and end. precision(kind) = correct / predicted spans of that kind; recall(kind) = correct / planted spans
of that kind. A span with the wrong boundaries or the wrong kind counts as a false positive and a miss. A near
miss "survives" when no predicted span overlaps it (any prediction on it is also a false positive).

Speed: `scrub_pii` alone, CPU time of this process (one core), on the benchmark documents (all of them hold
PII or near misses) and on PII-free prose documents (the common case in a corpus).

    .venv/bin/python benchmarks/pii.py [--docs 4000] [--seed 2] [--errors 20]
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import platform
import random
import re
import string
import time
from collections import Counter

from rounds import Spread, cpu_model

from haina.data.prepare.pii import KINDS, find_pii, scrub_pii


def words(s: str, sep: str | None = None) -> list[str]:
    """A list written as one string, the way long word lists read best."""
    return s.split(sep)


B62 = string.ascii_letters + string.digits
B64URL = B62 + "-_"
FIRST = words("james mary john patricia robert jennifer michael linda david sarah omar priya lukas sofia mateo chloe "
         "hiroshi yuki wei fang lei na jing min ahmed olga pierre giulia anna tom")
LAST = words("smith johnson garcia brown wang li zhang liu chen mueller dubois rossi kowalski tanaka patel nguyen "
             "silva ivanova obrien haddad kim yang huang")
CN_NAMES = words("张伟 王芳 李娜 刘洋 陈静 杨磊 赵敏 黄丽 周杰 吴涛 徐婷 孙浩")
DOMAINS = words("gmail.com outlook.com yahoo.co.uk qq.com 163.com 126.com mail.example.co.uk cs.stanford.edu "
           "dept.example.org example.com.cn sina.com.cn acme.io eng.corp.example.de student.uni-heidelberg.de "
           "support.example-shop.fr hotmail.com proton.me alumni.tsinghua.edu.cn mail2.my-company.travel web.de "
           "xs4all.nl ymail.com")

# Phone formats per country: {n} is n random digits, {A} a North American area code, {E} an exchange, {M} a PRC
# mobile prefix (1[3-9]x). Sources: each country's national numbering plan and common written style.
PHONES = {
    "cn": "{M} {4} {4}|{M}-{4}-{4}|{M}{8}|+86 {M} {4} {4}|+86-{M}-{4}-{4}|+86 {M}{8}|(+86) {M}{8}|010-{8}|021-{8}"
          "|0755-{8}|0571-{7}|(010) {4} {4}|(0755) {4} {4}|0755-{4} {4}|+86 10 {4} {4}|+86 755 {4} {4}|400-{3}-{4}",
    "us": "({A}) {E}-{4}|{A}-{E}-{4}|{A}.{E}.{4}|+1 {A} {E} {4}|+1-{A}-{E}-{4}|+1 ({A}) {E}-{4}|1-{A}-{E}-{4}"
          "|{A} {E} {4}|1-800-{E}-{4}|+1.{A}.{E}.{4}|{E}-{4}|{A}{E}{4}",
    "uk": "+44 20 {4} {4}|020 {4} {4}|+44 7{3} {6}|07{3} {6}|+44 (0)20 {4} {4}|0161 {3} {4}|+44 161 {3} {4}|07{9}"
          "|+44{10}",
    "de": "+49 30 {6}|+49 (0)30 {4} {4}|030 {6}|+49 151 {8}|0151 {8}|+49 89 {3} {4}|089 {3} {4}",
    "fr": "+33 1 {2} {2} {2} {2}|01 {2} {2} {2} {2}|+33 6 {2} {2} {2} {2}|06 {2} {2} {2} {2}|01.{2}.{2}.{2}.{2}",
    "jp": "+81 3-{4}-{4}|03-{4}-{4}|090-{4}-{4}|+81 90 {4} {4}",
    "au": "+61 2 {4} {4}|(02) {4} {4}|04{2} {3} {3}|+61 4{2} {3} {3}",
    "in": "+91 9{4} {5}|+91-9{9}|09{4} {5}|9{4} {5}",
    "br": "+55 11 9{4}-{4}|+55 (11) 9{4}-{4}|(11) 9{4}-{4}",
    "cn_en": "+86 {M} {4} {4}|+86 10 {4} {4}",
    "other": "+7 (495) {3}-{2}-{2}|+852 {4} {4}|+65 {4} {4}|+34 91 {3} {2} {2}|+39 06 {4} {4}|+31 20 {3} {4}"
             "|+82 2-{4}-{4}|+971 4 {3} {4}|0044 20 {4} {4}",
}
EN_COUNTRIES = words("us us us uk de fr jp au in br cn_en other")
FULLWIDTH = {ord(c): ord(c) + 0xFEE0 for c in "0123456789+"}


class Doc:
    """A document under construction: its text so far, planted PII spans and near-miss spans."""

    def __init__(self):
        self.parts: list[str] = []
        self.n = 0
        self.gold: list[tuple[int, int, str]] = []
        self.near: list[tuple[int, int, str]] = []

    def add(self, s: str, kind: str | None = None, near: str | None = None) -> None:
        if kind:
            self.gold.append((self.n, self.n + len(s), kind))
        if near:
            self.near.append((self.n, self.n + len(s), near))
        self.parts.append(s)
        self.n += len(s)

    def extend(self, other: Doc) -> None:
        self.gold += [(s + self.n, e + self.n, k) for s, e, k in other.gold]
        self.near += [(s + self.n, e + self.n, k) for s, e, k in other.near]
        self.parts += other.parts
        self.n += other.n

    @property
    def text(self) -> str:
        return "".join(self.parts)


def luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str((10 - total % 10) % 10)


def cn_check(first17: str) -> str:
    w = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return "10X98765432"[sum(int(c) * k for c, k in zip(first17, w, strict=True)) % 11]


def split3(s: str) -> tuple[str, str, str]:
    """'before⟦value⟧after' → (before, value, after)."""
    before, rest = s.split("⟦")
    value, after = rest.split("⟧")
    return before, value, after


class Gen:
    """PII and near-miss values in many real-world formats."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def digits(self, n: int) -> str:
        return "".join(self.r.choice(string.digits) for _ in range(n))

    def rand(self, n: int, alphabet: str = B62) -> str:
        return "".join(self.r.choice(alphabet) for _ in range(n))

    def pick(self, xs):
        return self.r.choice(xs)

    def expand(self, fmt: str) -> str:
        def repl(m: re.Match) -> str:
            t = m.group(1)
            if t == "A":
                return str(self.r.randint(201, 989))
            if t == "E":
                return str(self.r.randint(200, 999))
            if t == "M":
                return "1" + self.pick("3456789") + self.digits(1)
            return self.digits(int(t))

        return re.sub(r"\{(\w+)\}", repl, fmt)

    # --- PII ---------------------------------------------------------------------------------------------
    def email(self, cn: bool) -> str:
        r, f, la = self.r, self.pick(FIRST), self.pick(LAST)
        tag = self.pick(["news", "work", "github", "shop"])
        local = self.pick([f"{f}.{la}", f"{f}{la}", f"{f[0]}{la}", f"{f}_{la}{r.randint(1, 99)}", f"{la}.{f}",
                           f"{f}.{la}+{tag}", f"{f}-{la}", f"{f}{r.randint(70, 99)}",
                           self.pick(["info", "support", "hr.dept", "sales-team", "no-reply"])])
        if cn and r.random() < 0.4:
            local = str(r.randint(10_000, 3_999_999_999))  # QQ-style numeric addresses
        domain = self.pick(DOMAINS)
        if r.random() < 0.1:
            local, domain = local.capitalize(), domain.upper()
        form = r.random()  # bare, in angle brackets, or a mailto: link
        return ("mailto:⟦" if form < 0.15 else "<⟦" if form < 0.3 else "⟦") + f"{local}@{domain}" + \
            ("⟧>" if 0.15 <= form < 0.3 else "⟧")

    def phone(self, cn: bool) -> str:
        if cn and self.r.random() < 0.8:
            out = self.expand(self.pick(PHONES["cn"].split("|")))
            if self.r.random() < 0.08 and not out.startswith("("):  # full-width digits, as some Chinese text has
                out = out.translate(FULLWIDTH)
            return out
        return self.expand(self.pick(PHONES[self.pick(EN_COUNTRIES)].split("|")))

    def ipv4(self) -> str:
        o = lambda lo=0, hi=255: str(self.r.randint(lo, hi))
        return self.pick([f"192.168.{o()}.{o(1, 254)}", f"10.{o()}.{o()}.{o(1, 254)}",
                          f"172.{o(16, 31)}.{o()}.{o(1, 254)}", f"{o(1, 223)}.{o()}.{o()}.{o()}"])

    def ipv6(self) -> str:
        r = self.r
        g = [f"{r.randint(0, 0xffff):x}" for _ in range(8)]
        v4 = f"{r.randint(1, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"
        out = self.pick([":".join(g), ":".join(f"{int(x, 16):04x}" for x in g), f"2001:db8::{g[0]}:{g[1]}",
                         f"2001:db8:{g[2]}::{g[3]}", f"fe80::{g[4]}:{g[5]}:{g[6]}:{g[7]}", f"fe80::{g[7]}",
                         f"2a00:1450:4001:{g[1]}::200e", f"::ffff:{v4}", f"2606:4700:4700::{g[3]}", "::1",
                         f"2001:db8:{g[0]}:{g[1]}::"])
        return out.upper() if r.random() < 0.1 else out

    def card(self) -> str:
        r = self.r
        prefix, n = self.pick([("4", 16), ("4", 16), ("5" + str(r.randint(1, 5)), 16), (str(r.randint(2221, 2720)), 16),
                               (self.pick(["34", "37"]), 15), ("6011", 16), ("65", 16),
                               ("35" + str(r.randint(28, 89)), 16), ("62", self.pick([16, 19])), ("36", 14)])
        body = prefix + self.digits(n - len(prefix) - 1)
        num = body + luhn_digit(body)
        if n in (14, 15):
            return self.pick([num, f"{num[:4]} {num[4:10]} {num[10:]}", f"{num[:4]}-{num[4:10]}-{num[10:]}"])
        return self.pick([" ", "-", ""]).join(num[i:i + 4] for i in range(0, n, 4))

    def iban(self) -> str:
        up, d = string.ascii_uppercase, self.digits
        cc, bban = self.pick([("DE", d(18)), ("GB", self.rand(4, up) + d(14)),
                              ("FR", d(10) + self.rand(11, up + "0123456789") + d(2)), ("ES", d(20)),
                              ("IT", self.rand(1, up) + d(22)), ("NL", self.rand(4, up) + d(10)),
                              ("CH", d(17)), ("BE", d(12)), ("PL", d(24)), ("AT", d(16))])
        check = 98 - int("".join(str(int(c, 36)) for c in bban + cc + "00")) % 97
        compact = f"{cc}{check:02d}{bban}"
        return self.pick([compact, " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))])

    def ssn(self) -> str:
        area = self.pick([x for x in range(1, 900) if x != 666])
        return f"{area:03d}-{self.r.randint(1, 99):02d}-{self.r.randint(1, 9999):04d}"

    def cn_id(self) -> str:
        region = self.pick(words("110101 110105 120101 130102 310104 310115 320102 330106 340104 350102 370102 410105 "
                            "420106 430104 440106 440305 450103 500103 510107 530102 610113 650102"))
        birth = datetime.date(1950, 1, 1) + datetime.timedelta(days=self.r.randint(0, 20000))
        first = region + birth.strftime("%Y%m%d") + self.digits(3)
        return first + cn_check(first)

    def secret(self) -> str:
        """'before⟦secret⟧after': some secrets are only the value of an assignment, or part of a URL."""
        r, rand = self.r, self.rand
        which = self.pick(words("aws aws_secret ghp gh_pat slack openai openai_proj anthropic stripe google jwt pem "
                                "url url url_redis"))
        if which == "aws":
            before = self.pick(["export AWS_ACCESS_KEY_ID=", "aws_access_key_id = ", "key id "])
            return before + "⟦AKIA" + rand(16, string.ascii_uppercase + string.digits) + "⟧"
        if which == "aws_secret":
            before = self.pick(["aws_secret_access_key = ", "export AWS_SECRET_ACCESS_KEY=", '"SecretAccessKey": "'])
            return before + "⟦" + rand(40, B62 + "/+") + "⟧"
        if which == "pem":
            label = self.pick(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY",
                               "ENCRYPTED PRIVATE KEY"])
            lines = [rand(64, B62 + "+/") for _ in range(r.randint(3, 12))]
            lines.append(rand(r.randint(8, 60), B62 + "+/") + "==")
            return f"\n⟦-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----⟧\n"
        if which == "jwt":
            def b64(o: dict) -> str:
                return base64.urlsafe_b64encode(json.dumps(o).encode()).rstrip(b"=").decode()

            head = b64({"alg": self.pick(["HS256", "RS256", "ES256"]), "typ": "JWT"})
            body = b64({"sub": self.digits(10), "name": self.pick(FIRST).title(), "iat": r.randint(1.6e9, 1.8e9)})
            return f"⟦{head}.{body}.{rand(43, B64URL)}⟧"
        if which.startswith("url"):
            user = self.pick(["admin", "root", "app_user", "deploy", self.pick(FIRST)])
            pw = rand(r.randint(8, 20), B62 + "!$%*_-.~")
            host = self.pick(["db.internal", "cluster0.ab1cd.mongodb.net", "db.example.com:5432", "ftp.example.org"])
            if which == "url_redis":
                return f"redis://⟦:{pw}⟧@{host}:6379/0"
            scheme = self.pick(["postgres", "postgresql", "mysql", "mongodb+srv", "https", "ftp", "amqp"])
            return f"{scheme}://⟦{user}:{pw}⟧@{host}/{self.pick(['app', 'prod', 'data', ''])}"
        token = {"ghp": lambda: self.pick(["ghp_", "gho_", "ghs_"]) + rand(36),
                 "gh_pat": lambda: "github_pat_" + rand(22) + "_" + rand(59),
                 "slack": lambda: f"xox{self.pick('bpa')}-{self.digits(12)}-{self.digits(13)}-{rand(24)}",
                 "openai": lambda: "sk-" + rand(48),
                 "openai_proj": lambda: "sk-proj-" + rand(self.pick([48, 120, 156]), B64URL),
                 "anthropic": lambda: "sk-ant-api03-" + rand(93, B64URL) + "AA",
                 "stripe": lambda: self.pick(["sk_live_", "rk_live_", "sk_test_"]) + rand(24),
                 "google": lambda: "AIza" + rand(35, B64URL)}[which]()
        return f"⟦{token}⟧"

    # --- near misses --------------------------------------------------------------------------------------
    def near(self, cat: str) -> str:
        """'before⟦near miss⟧after' of one category."""
        r, d = self.r, self.digits
        q = ".".join(str(r.randint(0, 20)) for _ in range(4))
        if cat == "version":
            return self.pick([f"version ⟦{q}⟧", f"Version: ⟦{q}⟧", f"⟦v{q}⟧", f"release ⟦{q}⟧", f"build ⟦{q}⟧",
                              f"firmware ⟦{q}⟧", f"pip install requests==⟦{q}⟧", f"⟦{q}-rc{r.randint(1, 4)}⟧",
                              f"⟦{q}-beta⟧", f"版本 ⟦{q}⟧", f"版本号：⟦{q}⟧", f"固件版本⟦{q}⟧", f"upgraded to ⟦{q}⟧",
                              f'[assembly: AssemblyVersion("⟦{q}⟧")]', f"Version=⟦{q}⟧, Culture=neutral",
                              f"Windows ⟦10.0.{r.randint(17000, 22631)}.{r.randint(100, 4000)}⟧",
                              f"Chrome/⟦{r.randint(100, 125)}.0.{r.randint(5000, 6500)}.{r.randint(10, 200)}⟧",
                              f"OID ⟦1.3.6.1.4.1.{d(3)}⟧", f"see section ⟦{q}⟧", f"第⟦{q}⟧节"])
        if cat == "date":
            t = datetime.datetime(2000, 1, 1) + datetime.timedelta(days=r.randint(0, 9500), seconds=r.randint(0, 86399))
            fmt = self.pick(words("%Y-%m-%d|%d/%m/%Y|%m/%d/%Y|%d.%m.%Y|%b %d, %Y|%d %B %Y|%Y/%m/%d|%Y.%m.%d|%Y%m%d"
                            "|%Y-%m-%dT%H:%M:%SZ|%d-%m-%Y|%m-%d-%Y|%Y-%m-%d %H:%M:%S|%d %m %Y|cn|cn0", "|"))
            return "⟦" + (f"{t.year}年{t.month}月{t.day}日" if fmt == "cn" else
                          f"{t.year}年{t.month:02d}月{t.day:02d}日" if fmt == "cn0" else t.strftime(fmt)) + "⟧"
        if cat == "time":
            h, m, s = r.randint(0, 23), r.randint(0, 59), r.randint(0, 59)
            return "⟦" + self.pick([f"{h:02d}:{m:02d}", f"{h:02d}:{m:02d}:{s:02d}", f"{h:02d}:00-{(h + 8) % 24:02d}:00",
                                    f"{h % 12 + 1}:{m:02d} pm", f"下午{h % 12 + 1}:{m:02d}",
                                    f"{h:02d}:{m:02d}:{s:02d}.{d(3)}", f"{h}h{m:02d}"]) + "⟧"
        if cat == "isbn":
            body = self.pick(["978", "979"]) + d(9)
            i13 = body + str((10 - sum(int(c) * (1 if i % 2 == 0 else 3) for i, c in enumerate(body)) % 10) % 10)
            b10 = d(9)
            c10 = (11 - sum((10 - i) * int(c) for i, c in enumerate(b10)) % 11) % 11
            i10 = b10 + ("X" if c10 == 10 else str(c10))
            return "ISBN ⟦" + self.pick([i13, f"{i13[:3]}-{i13[3]}-{i13[4:6]}-{i13[6:12]}-{i13[12]}",
                                         f"{i10[0]}-{i10[1:4]}-{i10[4:9]}-{i10[9]}",
                                         f"{i13[:3]}-7-{i13[4:7]}-{i13[7:12]}-{i13[12]}", i10]) + "⟧"
        if cat == "hash":
            def hx(n: int) -> str:
                return self.rand(n, "0123456789abcdef")

            return self.pick([f"commit ⟦{hx(40)}⟧", f"⟦{hx(7)}⟧", f"sha256: ⟦{hx(64)}⟧", f"md5 ⟦{hx(32)}⟧",
                              f"⟦{hx(8)}-{hx(4)}-4{hx(3)}-{self.pick('89ab')}{hx(3)}-{hx(12)}⟧",
                              "MAC ⟦" + ":".join(hx(2) for _ in range(6)).upper() + "⟧", f"⟦{hx(12)}⟧"])
        if cat == "number":
            n = r.randint
            return self.pick([f"⟦{n(2, 9999)}⟧ units", f"$⟦{n(1, 99_999):,}.{d(2)}⟧", f"⟦{r.random() * 100:.5f}⟧",
                              f"population ⟦{n(10**6, 2 * 10**9):,}⟧", f"⟦{d(8)}⟧ bytes",
                              f"⟦{n(10**9, 10**10 - 1)}⟧ requests", f"⟦{n(1, 99)}.{d(2)}%⟧", f"room ⟦{n(100, 2999)}⟧",
                              f"邮编⟦{n(100000, 850000)}⟧", f"人口⟦{n(1, 20)}.{d(1)}亿⟧",
                              f"⟦{n(1, 999)} {d(3)} {d(3)}⟧ people", f"ratio ⟦{n(1, 9)}:{n(1, 9)}⟧",
                              f"⟦{n(1, 9)}e-{n(2, 9)}⟧", f"John ⟦{n(1, 21)}:{n(1, 40)}⟧",
                              f"¥⟦{n(100, 99999):,}⟧", f"⟦{n(1990, 2030)}-{n(1990, 2030)}⟧",
                              f"⟦{n(-90, 90)}.{d(4)}, {n(-180, 180)}.{d(4)}⟧"])
        if cat == "order":
            y = r.randint(2019, 2025)
            return self.pick([f"Order #⟦{d(r.randint(8, 16))}⟧", f"order no. ⟦{y}-{d(6)}⟧",
                              f"订单号：⟦{d(r.randint(14, 19))}⟧",
                              f"invoice INV-⟦{y}-{d(5)}⟧", f"tracking number ⟦1Z{d(3)}AA{d(10)}⟧",
                              f"ticket ⟦{d(3)}-{d(3)}-{d(4)}⟧", f"运单号⟦{d(12)}⟧",
                              f"reference ⟦{d(4)}-{d(4)}-{d(4)}-{d(4)}⟧",
                              f"SKU ⟦{d(3)}-{d(2)}-{d(4)}⟧", f"case ⟦{d(8)}⟧", f"编号：⟦{d(18)}⟧"])
        if cat == "bad_checksum":
            card = re.sub(r"\D", "", self.card())
            card = card[:-1] + str((int(card[-1]) + r.randint(1, 9)) % 10)
            iban = self.iban().replace(" ", "")
            iban = iban[:2] + f"{(int(iban[2:4]) + r.randint(1, 50)) % 100:02d}" + iban[4:]
            cid = self.cn_id()
            return "⟦" + self.pick([f"{card[:4]} {card[4:8]} {card[8:12]} {card[12:]}", iban,
                                    " ".join(iban[i:i + 4] for i in range(0, len(iban), 4)),
                                    cid[:17] + self.pick([c for c in "0123456789X" if c != cid[17]]),
                                    self.pick(["000", "666", f"9{d(2)}"]) + f"-{d(2)}-{d(4)}"]) + "⟧"
        if cat == "email_like":
            f, la = self.pick(FIRST), self.pick(LAST)
            return "⟦" + self.pick([f"{f} at {la} dot com", f"@{f}{la}", f"logo@{r.randint(2, 3)}x.png",
                                    f"requests@2.{r.randint(20, 32)}.0", f"{f}[at]example.com",
                                    f"@{f}/{la}-utils"]) + "⟧"
        # code: look-alikes of IPv6 addresses and of secrets
        hyphenated = "-".join(self.pick(["learn", "task", "fine", "tune", "model"]) for _ in range(4))
        return self.pick(["⟦std::vector<int>⟧", "⟦Foo::Bar::baz()⟧", "⟦a::b⟧", "⟦scikit-learn⟧",
                          "tokens start with ⟦ghp_⟧", "keys look like ⟦AKIA…⟧",
                          f"⟦-----BEGIN PUBLIC KEY-----\n{self.rand(64)}\n-----END PUBLIC KEY-----⟧",
                          f"⟦-----BEGIN CERTIFICATE-----\nMIID{self.rand(60)}\n-----END CERTIFICATE-----⟧",
                          f"⟦https://example.com:{r.randint(1024, 9999)}/api⟧", "⟦http://localhost:8000/⟧",
                          f"⟦sk-{hyphenated}⟧",
                          "⟦xoxb-⟧ tokens are bot tokens", "header ⟦eyJhbGciOi⟧…"])


# --- documents ----------------------------------------------------------------------------------------------

EN_FILLER = """Thanks for getting back to me so quickly. | The quarterly numbers look better than we expected.
| I have attached the revised draft of the proposal. | Let me know if anything is unclear.
| We are moving the weekly sync to Thursday afternoon. | The migration finished without errors overnight.
| Most of the failures came from a misconfigured cache. | Please review the pull request before lunch.
| Our team grew from 12 to 19 people this year. | The warehouse ships about 3,400 parcels a day.
| Remember to rotate the credentials after the audit. | Latency dropped by 35% after the index change.
| The new office is on the 4th floor, next to the lifts. | Budget approval is still pending with finance.
| He mentioned that the shipment was delayed by two days. | We should archive the old tickets first.
| The contract renewal is due at the end of Q3. | Customers reported the bug mostly on mobile.
| I'll be out of office until Monday. | The training run used 8 GPUs for about 36 hours.
| Kind regards, and have a great weekend. | Attendance was 240, up from 180 last year.
| The vendor promised a fix in the next release. | We need two more reviewers for the RFC.
| Backups are kept for 30 days and then deleted. | The survey had a response rate of 41.5%.""".replace("\n", " ")
CN_FILLER = ("感谢您的耐心等待。|本季度的销售额比去年同期增长了百分之十二。|附件是修改后的方案，请查收。"
             "|如有任何问题，请随时与我们联系。|每周例会改到周四下午举行。|系统迁移已于昨晚顺利完成。|大部分故障是由缓存配置错误引起的。|请在午饭前审核一下这个合并请求。"
             "|今年团队从12人增加到19人。|仓库每天发货约3400件。|审计结束后请及时更换密码。|索引调整后延迟下降了35%。"
             "|新办公室在四楼，电梯旁边。|预算审批仍在财务部等待中。|物流延误了两天，敬请谅解。|合同将于第三季度末到期。"
             "|用户主要在手机端反馈了这个问题。|我下周一之前不在办公室。|祝您周末愉快！|供应商承诺在下个版本中修复。"
             "|备份保留30天后自动删除。|本次问卷的回收率为41.5%。")
EN_PII = [
    "Please contact {name} at {email} or call {phone} before {~date}.",
    "For billing questions, reach our office at {phone} (Mon-Fri, {~time}).",
    "Hi team, my new number is {phone}; the old one was disconnected on {~date}.",
    "You can email me at {email}, or text {phone}.", "Reach me on WhatsApp: {phone}",
    "The server {ip4} stopped responding at {~time}.", "Our DNS now points to {ip4}; the old address {ip4} is retired.",
    "{~date} 03:14:07 WARN sshd[2231]: Failed password for root from {ip4} port 52144 ssh2",
    "Clients such as {ip6} can now connect over IPv6.", "Listening on [{ip6}]:8443 and {ip4}:8080",
    "The customer paid with card {card}, expiring 09/27.", "Card number: {card}",
    "Please wire the amount to IBAN {iban} by {~date}.", "Bank details: {iban} (reference {~order}).",
    "Employee SSN: {ssn}, hired on {~date}.", "Her social security number is {ssn}.", "SSN {ssn_sp}",
    "The leaked credential was {secret} and it has been revoked.", "{secret}", "config: {secret}",
    "| {name} | {email} | {phone} |", "{n},{name},{email},{phone},{~date}",
    '{{"user": "{name}", "email": "{email}", "ip": "{ip}", "last_login": "{~date}"}}',
    "--\n{name}\nSenior Engineer\nM: {phone}\nE: {email}", "Ship to {name}, phone {phone}, {~order}.",
    "I'm running {~version} on a box at {ip4} with 64 GB of RAM.", "Send the invoice to {email} ({~order}).",
    "Call me at {phone} or {phone} after {~time}.", "Login from {ip} at {~time} (user {email}).",
]
CN_PII = [
    "请联系{name_cn}，电话：{phone}，邮箱：{email}。", "客户身份证号码为{cn_id}，登记日期{~date}。",
    "服务器（{ip4}）于{~time}宕机。", "如有疑问请致电{phone}或发送邮件至{email}。",
    "收款账户：{iban}，请在{~date}前付款。",
    "信用卡号{card}已被冻结。", "手机号：{phone}（工作日{~time}）", "{~order}，收货人：{name_cn}，联系电话{phone}。",
    "用户{name_cn}的IP地址是{ip}。", "他的身份证号是{cn_id}，手机{phone}。", "泄露的密钥：{secret}，请立即更换。",
    "邮箱地址：{email}；备用邮箱：{email}。", "联系人：{name_cn}（{phone}）", "{cn_id}", "身份证：{cn_id}",
    "访问来源{ip}，时间{~date}。", "配置文件中发现{secret}。", "请把报告发到{email}，谢谢！", "热线电话{phone}",
    "【{name_cn}】{phone}，{email}", "IPv6地址{ip6}已分配给该设备。",
]
EN_NEAR = ["We noted {~} in the report.", "See {~} for details.", "The log shows {~} again.",
           "It says {~} on the label.", "({~})", "Value: {~}", "{~}", "The ticket mentions {~}, nothing else.",
           "Figures: {~} and {~}."]
CN_NEAR = ["报告中记录了{~}。", "详见{~}。", "日志显示{~}。", "备注：{~}", "（{~}）", "相关数据：{~}、{~}。"]
NEAR_CATS = ("version", "date", "time", "isbn", "hash", "number", "order", "bad_checksum", "email_like", "code")
SLOT_KIND = {"email": "email", "phone": "phone", "ip": "ip_address", "ip4": "ip_address", "ip6": "ip_address",
             "card": "credit_card", "iban": "iban", "ssn": "us_ssn", "ssn_sp": "us_ssn", "cn_id": "cn_id",
             "secret": "secret"}
SLOT = re.compile(r"\{\{|\}\}|\{(~?)(\w*)\}")


def plant(gen: Gen, slot: str, cn: bool) -> str:
    """'before⟦value⟧after' for a PII slot."""
    if slot == "email":
        return gen.email(cn)
    if slot == "secret":
        return gen.secret()
    if slot in ("ip", "ip4", "ip6"):
        if slot == "ip6" or (slot == "ip" and gen.r.random() < 0.4):
            v6 = gen.ipv6()
            zone = "%eth0" if v6.startswith("fe80") and gen.r.random() < 0.3 else ""  # a zone is not the address
            return f"⟦{v6}⟧{zone}"
        return f"⟦{gen.ipv4()}⟧"
    if slot == "ssn_sp":
        return "⟦" + gen.ssn().replace("-", gen.pick([" ", ""])) + "⟧"
    return "⟦" + {"phone": lambda: gen.phone(cn), "card": gen.card, "iban": gen.iban, "ssn": gen.ssn,
                  "cn_id": gen.cn_id}[slot]() + "⟧"


def fill(doc: Doc, gen: Gen, template: str, cn: bool) -> None:
    """Append `template` to `doc`, planting PII for {kind} slots and near misses for {~cat} slots."""
    pos = 0
    for m in SLOT.finditer(template):
        doc.add(template[pos:m.start()])
        pos = m.end()
        near, slot = m.group(1), m.group(2)
        if m.group() in ("{{", "}}"):
            doc.add(m.group()[0])
        elif slot in ("name", "name_cn"):
            doc.add(gen.pick(CN_NAMES) if slot == "name_cn" else f"{gen.pick(FIRST).title()} {gen.pick(LAST).title()}")
        elif slot == "n":
            doc.add(str(gen.r.randint(1, 5000)))
        else:
            cat = (slot or gen.pick(NEAR_CATS)) if near else None
            before, value, after = split3(gen.near(cat) if near else plant(gen, slot, cn))
            doc.add(before)
            doc.add(value, kind=None if near else SLOT_KIND[slot], near=cat)
            doc.add(after)
    doc.add(template[pos:])


def latin(c: str) -> bool:
    """An ASCII or full-width Latin letter, digit or sign (one that glues to a neighbouring number)."""
    return c.isascii() or "\uff01" <= c <= "\uff5e"


def make_doc(gen: Gen, pii: bool = True) -> Doc:
    """One document: 4–10 sentences of prose with PII and near-miss sentences mixed in (none when not `pii`)."""
    cn = gen.r.random() < 0.5
    doc = Doc()
    for i in range(gen.r.randint(4, 10)):
        sentence = Doc()
        x = gen.r.random()
        if not pii or x < 0.45:
            sentence.add(gen.pick((CN_FILLER if cn else EN_FILLER).split("|")).strip())
        else:
            fill(sentence, gen, gen.pick((CN_PII if cn else EN_PII) if x < 0.8 else (CN_NEAR if cn else EN_NEAR)), cn)
        if i:
            sep = gen.pick(["\n", "\n\n"]) if gen.r.random() < 0.3 else ("" if cn else " ")
            # Chinese runs sentences together, but Latin letters and digits of two sentences never touch.
            if not sep and latin(doc.text[-1]) and latin(sentence.text[:1]):
                sep = " "
            doc.add(sep)
        doc.extend(sentence)
    return doc


# --- scoring ------------------------------------------------------------------------------------------------

def score(docs: list[Doc]) -> tuple[dict, dict, list]:
    """Per kind: planted, predicted, correct; per near-miss category: planted, survived; and the errors."""
    per = {k: Counter() for k in KINDS}
    near = {c: Counter() for c in NEAR_CATS}
    errors = []
    for doc in docs:
        text = doc.text
        pred = find_pii(text)
        gold = set(doc.gold)
        for _, _, k in doc.gold:
            per[k]["planted"] += 1
        for span in pred:
            per[span[2]]["predicted"] += 1
            per[span[2]]["correct"] += span in gold
        for tag, spans in (("FP", set(pred) - gold), ("FN", gold - set(pred))):
            errors += [(tag, k, text[s:e], text[max(0, s - 25):e + 10]) for s, e, k in spans]
        for s, e, cat in doc.near:
            near[cat]["planted"] += 1
            near[cat]["survived"] += not any(ps < e and s < pe for ps, pe, _ in pred)
    return per, near, errors


def throughput(texts: list[str], rounds: int = 5) -> Spread:
    """Documents per CPU second through `scrub_pii`: the median over `rounds` passes, with its range."""
    rates = []
    for _ in range(rounds):
        t = time.process_time()
        for text in texts:
            scrub_pii(text)
        rates.append(len(texts) / max(time.process_time() - t, 1e-9))
    return Spread.of(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=2, help="seeds 0 and 1 were used while developing the scrubber")
    ap.add_argument("--errors", type=int, default=0, help="print this many misses and false positives")
    args = ap.parse_args()
    gen = Gen(args.seed)
    docs = [make_doc(gen) for _ in range(args.docs)]
    plain = [make_doc(gen, pii=False).text for _ in range(args.docs)]
    per, near, errors = score(docs)
    texts = [d.text for d in docs]
    cn = sum(bool(re.search("[\u4e00-\u9fff]", t)) for t in texts)
    print(f"#### PII scrubbing ({datetime.date.today()}, {cpu_model()}, Python {platform.python_version()})\n")
    print(f"{args.docs:,} generated documents ({cn:,} Chinese, {args.docs - cn:,} English), seed {args.seed}; "
          "strict span match (same kind, same start and end).\n")
    print("| kind | planted | predicted | correct | precision | recall | target |\n|---|---:|---:|---:|---:|---:|---|")
    worst = 1.0
    for k in KINDS:
        c = per[k]
        p, r = c["correct"] / max(c["predicted"], 1), c["correct"] / max(c["planted"], 1)
        worst = min(worst, p, r)
        print(f"| {k} | {c['planted']:,} | {c['predicted']:,} | {c['correct']:,} | {p:.3f} | {r:.3f} | ≥ 0.95 both |")
    tot = sum(per.values(), Counter())
    print(f"| **all** | {tot['planted']:,} | {tot['predicted']:,} | {tot['correct']:,} | "
          f"{tot['correct'] / max(tot['predicted'], 1):.3f} | {tot['correct'] / max(tot['planted'], 1):.3f} | |")
    print(f"\nTarget (precision and recall ≥ 0.95 for every kind): {'met' if worst >= 0.95 else 'NOT met'} "
          f"(lowest {worst:.3f}).\n")
    print("| near miss | planted | survived | share |\n|---|---:|---:|---:|")
    for cat in NEAR_CATS:
        c = near[cat]
        print(f"| {cat} | {c['planted']:,} | {c['survived']:,} | {c['survived'] / max(c['planted'], 1):.3f} |")
    print("\n| scrubber alone (`scrub_pii`, one core, CPU time) | chars/doc | docs/s | MB/s |\n|---|---:|---:|---:|")
    for name, corpus in (("benchmark documents (PII and near misses)", texts), ("PII-free prose", plain)):
        rate, chars = throughput(corpus), sum(map(len, corpus)) / len(corpus)
        print(f"| {name} | {chars:,.0f} | {rate.text(',.0f')} | {rate.median * chars / 1e6:.1f} |")
    if args.errors:
        print(f"\n{len(errors)} errors; the first {args.errors}:")
    for tag, k, value, context in errors[:args.errors]:
        print(f"  {tag} {k:12} {value!r:50} in …{context!r}")


if __name__ == "__main__":
    main()
