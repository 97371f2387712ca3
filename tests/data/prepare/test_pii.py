"""PII scrubbing: every kind found in its real formats, near misses kept, and nothing unscrubbed reaches disk."""

import itertools
import json
import random

import pytest
import zstandard

from haina.data.prepare.config import PrepareConfig
from haina.data.prepare.pii import KINDS, PLACEHOLDERS, find_pii, scrub_pii, scrub_record
from haina.data.prepare.pipeline import prepare_documents

JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
# (text, the PII in it, kind): the test checks that exactly that span is found and replaced.
TRUE_POSITIVES = [
    # e-mail: subdomains, plus-tags, numeric QQ addresses, mailto:, CJK and full-width punctuation around it
    ("write to jane.doe+news@mail.example.co.uk today", "jane.doe+news@mail.example.co.uk", "email"),
    ("mailto:Support@Example-Shop.FR", "Support@Example-Shop.FR", "email"),
    ("邮箱：12345678@qq.com。", "12345678@qq.com", "email"),
    ("联系zhang.wei@example.com.cn获取资料", "zhang.wei@example.com.cn", "email"),
    ("From: <r.smith@cs.stanford.edu>", "r.smith@cs.stanford.edu", "email"),
    ("From: Páolo <főo@bar.com>", "főo@bar.com", "email"),
    # phones: international, national and PRC formats
    ("ring +44 20 7946 0958.", "+44 20 7946 0958", "phone"),
    ("call (555) 123-4567 now", "(555) 123-4567", "phone"),
    ("call +1 (555) 123-4567 now", "+1 (555) 123-4567", "phone"),
    ("toll free 1-800-555-0199", "1-800-555-0199", "phone"),
    ("office 555.123.4567", "555.123.4567", "phone"),
    ("UK mobile 07700 900123", "07700 900123", "phone"),
    ("London +44 (0)20 7946 0958", "+44 (0)20 7946 0958", "phone"),
    ("Paris 01 42 68 53 00", "01 42 68 53 00", "phone"),
    ("Tokyo 03-1234-5678", "03-1234-5678", "phone"),
    ("Berlin +49 30 901820", "+49 30 901820", "phone"),
    ("São Paulo +55 11 91234-5678", "+55 11 91234-5678", "phone"),
    ("Moscow +7 (495) 123-45-67", "+7 (495) 123-45-67", "phone"),
    ("请拨打+86 138 0013 8000。", "+86 138 0013 8000", "phone"),
    ("电话：138-0013-8000，谢谢", "138-0013-8000", "phone"),
    ("手机13800138000", "13800138000", "phone"),
    ("座机（010）1234 5678", "（010）1234 5678", "phone"),
    ("深圳0755-8765 4321", "0755-8765 4321", "phone"),
    ("全角１３８００１３８０００号码", "１３８００１３８０００", "phone"),
    ("tel: 5551234567", "5551234567", "phone"),
    ("Tel. 020 7946 0958", "020 7946 0958", "phone"),
    ("电话号码：87654321", "87654321", "phone"),
    ("dial 0044 20 7946 0958", "0044 20 7946 0958", "phone"),
    # IP addresses
    ("host 192.168.0.17 is up", "192.168.0.17", "ip_address"),
    ("from 8.8.8.8, port 53", "8.8.8.8", "ip_address"),
    ("host 2001:db8::8a2e:370:7334 is up", "2001:db8::8a2e:370:7334", "ip_address"),
    ("link-local fe80::1ff:fe23:4567:890a%eth0", "fe80::1ff:fe23:4567:890a", "ip_address"),
    ("listen [2001:db8::1]:8443", "2001:db8::1", "ip_address"),
    ("mapped ::ffff:192.0.2.128 here", "::ffff:192.0.2.128", "ip_address"),
    ("服务器（10.0.0.5）宕机", "10.0.0.5", "ip_address"),
    ("the build server at 10.0.0.5", "10.0.0.5", "ip_address"),
    ("ssh root@192.168.1.1", "192.168.1.1", "ip_address"),
    # payment cards (Luhn-valid, issuer prefix, card groupings)
    ("card 4111 1111 1111 1111 expired", "4111 1111 1111 1111", "credit_card"),
    ("card 5500-0000-0000-0004 expired", "5500-0000-0000-0004", "credit_card"),
    ("amex 3782 822463 10005", "3782 822463 10005", "credit_card"),
    ("paid with 4012888888881881.", "4012888888881881", "credit_card"),
    ("信用卡号6222021234567890128已冻结", "6222021234567890128", "credit_card"),
    # IBAN (mod-97)
    ("IBAN DE89 3704 0044 0532 0130 00 please", "DE89 3704 0044 0532 0130 00", "iban"),
    ("pay GB82WEST12345698765432 now", "GB82WEST12345698765432", "iban"),
    ("FR14 2004 1010 0505 0001 3M02 606 ok", "FR14 2004 1010 0505 0001 3M02 606", "iban"),
    ("收款账户：NL91ABNA0417164300，请付款", "NL91ABNA0417164300", "iban"),
    # US SSN
    ("SSN 123-45-6789 on file", "123-45-6789", "us_ssn"),
    ("social security number: 123 45 6789", "123 45 6789", "us_ssn"),
    # PRC resident ID (GB 11643 check character)
    ("身份证号码11010519491231002X。", "11010519491231002X", "cn_id"),
    ("ID 44030519900101123X on record", "44030519900101123X", "cn_id"),
    # secrets
    ("key AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE", "secret"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     "secret"),
    ("token ghp_1234567890abcdefghijABCDEFGHIJ123456 leaked", "ghp_1234567890abcdefghijABCDEFGHIJ123456", "secret"),
    ("github_pat_11ABCDEFG0123456789abc_" + "x1" * 30, "github_pat_11ABCDEFG0123456789abc_" + "x1" * 30, "secret"),
    ("slack xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
     "xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "secret"),
    ("OPENAI_API_KEY=sk-proj-AbCdEf123456GhIjKl789012MnOpQr", "sk-proj-AbCdEf123456GhIjKl789012MnOpQr", "secret"),
    ("maps AIzaSyA1234567890abcdefghijklmnopqrstuv", "AIzaSyA1234567890abcdefghijklmnopqrstuv", "secret"),
    ("Bearer " + JWT, JWT, "secret"),
    ("DATABASE_URL=postgres://admin:S3cr3t!x@db.example.com:5432/app", "admin:S3cr3t!x", "secret"),
    ("redis://:hunter2hunter2@cache:6379/0", ":hunter2hunter2", "secret"),
]
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq9abcdefghijklmnop\nQRSTUVWXyz0123456789+/==\n" \
      "-----END RSA PRIVATE KEY-----"

NEAR_MISSES = [
    # versions, not IPv4 addresses
    "Upgrade to version 1.2.3.4 today.", "Released v1.2.3.4 and V 2.0.1.3.", "pip install foo==1.2.3.4",
    "build is 10.0.1.2", "firmware 4.2.1.0", "版本号：1.2.3.4", "固件版本2.4.1.3", "1.2.3.4-beta and 1.2.3.4-rc1",
    "OID 1.3.6.1.4.1.311", "[assembly: AssemblyVersion(\"1.0.0.0\")]", "see section 1.2.3.4", "第1.2.3.4节",
    "Windows 10.0.19045.3693", "Chrome/120.0.6099.109", "Not an address: 999.1.1.1 or 10.0.0.256.",
    # dates and times, in many formats
    "Python 3.11.4 was released on 2024-01-31 at 12:30:45.", "31/01/2024, 01/31/2024, 31.01.2024, 2024.01.31",
    "Jan 31, 2024; 31 January 2024; 2024/01/31; 20240131", "2024-01-31T12:30:45Z and 2024-01-31 12:30:45.123",
    "31-01-2024 or 01-31-2024 or 31 01 2024", "2024年1月31日 下午3:30", "open 08:00-17:00, lunch 12:30",
    "06-07-2025 03:14:07 WARN", "01 06 2013 03:14:07", "Boston, MA 02110-1301 USA",
    "It fails on mobile. 20130410 03:14:07 WARN", "Call the desk.\n\n1.13.14.14-beta",
    # ISBNs
    "ISBN 978-3-16-148410-0", "ISBN-10: 0-306-40615-2", "ISBN 9780306406157", "ISBN 0 306 40615 2",
    # hashes, git SHAs, UUIDs, MAC addresses, code
    "commit 3f786850e387550fdab836ed7e6dc881de23001b", "uuid 123e4567-e89b-12d3-a456-426614174000",
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "MAC 00:1A:2B:3C:4D:5E",
    "std::vector<int> and Foo::Bar and a::b", "length 1000:: and ratio 3:2 and John 3:16",
    # ordinary numbers
    "In 2023 we sold 1500 units.", "The price is $1,299.99 and pi is 3.14159.", "population 1,411,750,000",
    "12345678 bytes", "9876543210 requests", "room 1204, 邮编100080, 人口14.1亿", "1990-2000 and 2.5e-5",
    "rng = default_rng(4202165767276)", "x = 4828147466240000*t**12", "a = +2147483647  # int32 max",
    # order numbers
    "Order #4111111111111111 shipped", "order no. 2024-000123", "订单号：20240131000123", "invoice INV-2024-00042",
    "tracking number 1Z999AA10123456784", "ticket 555-123-4567", "SKU 123-45-6789", "reference 4111-1111-1111-1111",
    # wrong checksums
    "A Luhn-invalid number 4111 1111 1111 1112 stays.", "DE00 3704 0044 0532 0130 00", "GB00WEST12345698765432",
    "11010519491231002Y 110105194912310021", "000-12-3456 666-12-3456 900-12-3456 123-00-4567",
    # e-mail look-alikes
    "user at example dot com", "@username and @scope/pkg", "logo@2x.png icon@1.5x.jpg", "requests@2.31.0",
    # secret look-alikes
    "scikit-learn and sk-learn-task-fine-tune", "tokens start with ghp_ and keys with AKIA",
    "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A\n-----END PUBLIC KEY-----",
    "the file starts with \"-----BEGIN RSA PRIVATE KEY-----\" and ends with \"-----END RSA PRIVATE KEY-----\"",
    "https://example.com:8443/path and http://localhost:8000/", "header eyJhbGciOi…",
]


@pytest.mark.parametrize("text,pii,kind", TRUE_POSITIVES)
def test_each_kind_is_found_with_its_exact_span(text, pii, kind):
    start = text.index(pii)
    assert find_pii(text) == [(start, start + len(pii), kind)]
    counts = {}
    assert scrub_pii(text, counts) == text.replace(pii, PLACEHOLDERS[kind])
    assert counts == {kind: 1}


def test_private_key_blocks_whole_truncated_and_inside_json():
    assert scrub_pii(f"leaked:\n{PEM}\nrotate it") == "leaked:\n<SECRET>\nrotate it"
    truncated = PEM.rsplit("\n", 1)[0] + "\nThanks, Bob"
    assert scrub_pii(truncated) == "<SECRET>\nThanks, Bob"
    in_json = json.dumps({"private_key": PEM + "\n", "type": "service_account"})
    assert scrub_pii(in_json) == json.dumps({"private_key": "<SECRET>\n", "type": "service_account"})


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_survive(text):
    counts = {}
    assert scrub_pii(text, counts) == text, find_pii(text)
    assert counts == {}


def test_version_rules_and_addresses_side_by_side():
    text = "Upgraded to 2.0.1.1; version 1.2.3.4 runs on 10.1.2.3, pkg==4.3.2.1 and v5.6.7.8; gateway 192.168.1.1."
    assert scrub_pii(text) == ("Upgraded to 2.0.1.1; version 1.2.3.4 runs on <IP_ADDRESS>, pkg==4.3.2.1 and "
                               "v5.6.7.8; gateway <IP_ADDRESS>.")


def test_overlaps_go_to_the_more_specific_kind():
    # The password's '@host' is not an e-mail; an IBAN's digit groups are not a phone or a card.
    assert scrub_pii("mysql://root:pa55@db.example.com/x") == "mysql://<SECRET>@db.example.com/x"
    assert scrub_pii("ES91 2100 0418 4502 0005 1332") == "<IBAN>"
    assert scrub_pii("SSN 123-45-6789, tel 555-123-4567") == "SSN <US_SSN>, tel <PHONE>"


def test_a_document_with_everything():
    text = ("Jane (jane@corp.example.com, +1 415 555 0132) paid 4111-1111-1111-1111 from IBAN GB82 WEST 1234 5698 "
            "7654 32 on 2024-01-31 at 12:30; SSN 078-05-1120; client 203.0.113.9 ran version 1.2.3.4; key "
            "AKIAIOSFODNN7EXAMPLE. 张伟，身份证11010519491231002X，手机：13800138000。")
    counts = {}
    assert scrub_pii(text, counts) == (
        "Jane (<EMAIL>, <PHONE>) paid <CREDIT_CARD> from IBAN <IBAN> on 2024-01-31 at 12:30; SSN <US_SSN>; client "
        "<IP_ADDRESS> ran version 1.2.3.4; key <SECRET>. 张伟，身份证<CN_ID>，手机：<PHONE>。")
    assert counts == {k: 2 if k == "phone" else 1 for k in KINDS}


def test_spans_are_sorted_disjoint_and_scrubbing_is_idempotent():
    rng = random.Random(0)
    pieces = [p for p, _, _ in TRUE_POSITIVES] + NEAR_MISSES + ["，", "。", " ", "\n", "(", ")", ":", "-", "1", "a"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        spans = find_pii(text)
        assert all(s < e for s, e, _ in spans)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
        once = scrub_pii(text)
        assert scrub_pii(once) == once  # placeholders are never taken for PII


def test_scrub_record_covers_text_and_meta_but_not_names():
    doc = {"id": "mail-7", "text": "from a@b.io", "source": "in/x.jsonl", "label": "spam",
           "meta": {"from": "c@d.io", "hops": ["10.0.0.1", 3], "ok": True}}
    counts = {}
    scrub_record(doc, counts)
    assert doc == {"id": "mail-7", "text": "from <EMAIL>", "source": "in/x.jsonl", "label": "spam",
                   "meta": {"from": "<EMAIL>", "hops": ["<IP_ADDRESS>", 3], "ok": True}}
    assert counts == {"email": 2, "ip_address": 1}


def _read_zst(path) -> str:
    return zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read().decode()


def test_nothing_unscrubbed_reaches_disk_rejects_included(tmp_path):
    prose = "The committee met again on Tuesday and agreed to publish the minutes next week. " * 3
    records = [{"text": prose + "Write to jane.doe@example.com or call +44 20 7946 0958.", "meta": {"by": "x@y.org"}},
               {"text": "too short: bob@example.org 555-123-4567"},  # dropped by the Gopher filter
               {"text": prose + "Version 1.2.3.4 shipped on 2024-01-31; pay DE89 3704 0044 0532 0130 00."}]
    lines = [json.dumps(r) for r in records] + ['{"body": "malformed, from eve@example.net at 192.168.1.20"}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    report = prepare_documents([tmp_path / "in.jsonl"], out, PrepareConfig(workers=1, pii=True, val_fraction=0,
                                                                                dedup=(), filters=("gopher",)))
    written = "".join(_read_zst(p) for p in sorted(out.rglob("*.jsonl.zst")))
    assert written.count("<EMAIL>") == 4 and "<IBAN>" in written and "1.2.3.4" in written and "2024-01-31" in written
    for raw in ("example.com", "example.org", "example.net", "y.org", "7946", "555-123", "192.168", "DE89"):
        assert raw not in written
    assert {p.name for p in (out / "rejects").iterdir()} == {"gopher_min_words.jsonl.zst",
                                                             "malformed_record.jsonl.zst"}
    reject = json.loads(_read_zst(out / "rejects" / "gopher_min_words.jsonl.zst"))
    assert reject["reason"] == "gopher_min_words" and reject["text"] == "too short: <EMAIL> <PHONE>"
    pii = report["stages"]["pii"]
    assert pii["replaced"] == {"email": 2, "iban": 1, "phone": 1}
    assert pii["replaced_in_rejects"] == {"email": 2, "ip_address": 1, "phone": 1}
    assert json.loads((out / "report.json").read_text())["stages"]["pii"] == pii
    md = (out / "report.md").read_text()
    assert "| email | `<EMAIL>` | 2 | 2 |" in md and "| iban | `<IBAN>` | 1 | 0 |" in md
    assert all(raw not in md for raw in ("example.com", "7946"))


def test_without_pii_the_report_says_so(tmp_path):
    (tmp_path / "in.txt").write_text("Nothing to see here, the minutes were published on time and in full.\n")
    report = prepare_documents([tmp_path / "in.txt"], tmp_path / "out",
                               PrepareConfig(workers=1, val_fraction=0, filters=(), dedup=()))
    assert report["stages"]["pii"] == {"enabled": False, "replaced": {}, "replaced_in_rejects": {}}
    assert "PII: not scrubbed (--pii turns it on)" in (tmp_path / "out" / "report.md").read_text()
