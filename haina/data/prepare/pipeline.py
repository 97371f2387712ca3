"""The prepare pipeline: per-unit stages in parallel, then global dedup, split and report.

Nothing is written into OUT until the end: the working state lives in a directory beside it,
`.OUT.haina-partial/` (STATE below), kept after a crash for `--resume`.
Phase 1 (parallel, one task per input unit): read → normalize → filter → PII → hash. Each unit
writes its surviving documents, their hashes and MinHash signatures, and its rejects under
`STATE/_work/`, then a marker `STATE/_done/<unit>.json` holding its counts. `--resume` skips every
unit with a marker whose config fingerprint matches.
Phase 2 (sequential): deduplicate across all units in input order (first occurrence kept).
Phase 3 (sequential, streaming): split by content hash and write `train/`, `val/`, `test/`,
`rejects/` and the report into `STATE/_work/out/`, which is then swapped in for OUT whole
(`haina.core.output`): OUT may be replaced only if it is empty or an earlier `data prepare` output.
Memory: one batch per worker in phase 1; in phase 2 the on-disk SQLite dedup index (64 MB page cache) and 8
bytes per kept document for the exact split; phase 3 streams.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from haina.core.errors import HainaError
from haina.core.io import write_json
from haina.core.log import info, progress
from haina.core.output import check_output, partial_dir, publish
from haina.data.prepare.config import PrepareConfig
from haina.data.prepare.dedup import Deduplicator, MinHasher, dedup_key, exact_hash
from haina.data.prepare.filters import is_no_space_script, make_filter_stage, words_of
from haina.data.prepare.normalize import normalize_stage
from haina.data.prepare.pii import pii_stage, scrub_record
from haina.data.prepare.readers import Unit, discover_units, read_unit
from haina.data.prepare.report import LengthHistogram, write_report
from haina.data.prepare.split import SplitPlan, group_key
from haina.data.prepare.writers import JsonlZstWriter, ShardedWriter, read_jsonl_zst

SPLITS = ("train", "val", "test")
COMMAND = "data prepare"  # the name in the manifest of every output (and working directory) this writes
Stage = Callable[[list[dict], dict], tuple[list[dict], list[dict]]]


def build_stages(cfg: PrepareConfig) -> list[tuple[str, Stage]]:
    """The per-document stages, in order; each maps a batch to (kept, dropped-with-reason)."""
    norm = cfg.normalize
    if cfg.code:  # indentation and blank lines are part of code: keep every whitespace run
        norm = dataclasses.replace(norm, collapse_whitespace=False)
    stages: list[tuple[str, Stage]] = [("normalize", lambda docs, stats: normalize_stage(docs, norm, stats))]
    if cfg.filters:
        stages.append(("filter", make_filter_stage(cfg)))
    if cfg.pii:
        stages.append(("pii", pii_stage))
    return stages


def doc_words(text: str) -> int:
    """Length in words (characters for scripts written without spaces), for the report."""
    return len(words_of(text, is_no_space_script(text)))


def _batches(it: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for doc in it:
        batch.append(doc)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- phase 1 ---------------------------------------------------------------------------------------------------


def unit_id(index: int) -> str:
    return f"{index:05d}"


def process_unit(unit: Unit, uid: str, cfg: PrepareConfig, out: str, fingerprint: str) -> dict:
    """Phase 1 for one unit in the working directory `out` (STATE); returns its stats (also written, last, to
    STATE/_done/<uid>.json)."""
    work, done = Path(out) / "_work", Path(out) / "_done"
    stats: dict = {"unit": unit.name, "path": unit.path, "fingerprint": fingerprint, "documents_in": 0,
                   "dropped": {}, "passed": 0, "length_before": LengthHistogram().to_dict()}
    hist = LengthHistogram()
    dropped: Counter = Counter()
    stages = build_stages(cfg)
    hasher = MinHasher(cfg.minhash_perm, cfg.minhash_ngram) if "minhash" in cfg.dedup else None
    docs_w = JsonlZstWriter(work / f"{uid}.docs.jsonl.zst")
    rej_w = JsonlZstWriter(work / f"{uid}.rejects.jsonl.zst")
    index_w = JsonlZstWriter(work / f"{uid}.index.jsonl.zst")
    hash_tmp, sig_tmp = work / f".{uid}.hash.u64.tmp", work / f".{uid}.sig.u32.tmp"
    # With --pii nothing reaches disk unscrubbed: rejects left the stages before the PII stage saw them.
    reject_pii = stats.setdefault("pii_rejects", {}) if cfg.pii else None

    def write_reject(doc: dict) -> None:
        rej_w.write(scrub_record(doc, reject_pii) if reject_pii is not None else doc)
        dropped[doc["reason"]] += 1

    try:
        with open(hash_tmp, "wb") as hf, open(sig_tmp, "wb") as sf:
            for batch in _batches(read_unit(unit, cfg, stats), cfg.batch_size):
                stats["documents_in"] += len(batch)
                live = []
                for doc in batch:
                    hist.add(doc_words(doc["text"]))
                    if "reason" in doc:  # a malformed record from the reader
                        write_reject(doc)
                    else:
                        live.append(doc)
                for _name, stage in stages:
                    live, gone = stage(live, stats)
                    for doc in gone:
                        write_reject(doc)
                hashes = np.empty(len(live), dtype=np.uint64)
                sigs = np.empty((len(live), cfg.minhash_perm if hasher else 0), dtype=np.uint32)
                for i, doc in enumerate(live):
                    key = dedup_key(doc["text"])
                    hashes[i] = exact_hash(key)
                    if hasher is not None:
                        sigs[i] = hasher.signature(key)
                    docs_w.write(doc)
                    index_w.write([doc["id"], doc.get("label")])
                hashes.tofile(hf)
                sigs.tofile(sf)
                stats["passed"] += len(live)
        for w in (docs_w, rej_w, index_w):
            w.close()
        os.replace(hash_tmp, work / f"{uid}.hash.u64")
        os.replace(sig_tmp, work / f"{uid}.sig.u32")
    except BaseException:
        for w in (docs_w, rej_w, index_w):
            w.abort()
        hash_tmp.unlink(missing_ok=True)
        sig_tmp.unlink(missing_ok=True)
        raise
    stats["dropped"] = dict(dropped)
    stats["length_before"] = hist.to_dict()
    write_json(done / f"{uid}.json", stats)  # the marker comes last: its presence means the unit is complete
    return stats


def _run_phase1(units: list[Unit], cfg: PrepareConfig, out: Path, fingerprint: str, resume: bool) -> list[dict]:
    done_dir = out / "_done"
    results: dict[str, dict] = {}
    pending = []
    for i, unit in enumerate(units):
        uid = unit_id(i)
        marker = done_dir / f"{uid}.json"
        if resume and marker.is_file():
            stats = json.loads(marker.read_text(encoding="utf-8"))
            if stats.get("fingerprint") == fingerprint and stats.get("path") == unit.path:
                results[uid] = stats
                continue
        pending.append((uid, unit))
    if resume and results:
        info(f"resume: {len(results)} of {len(units)} input units already done, {len(pending)} to go")
    workers = min(cfg.workers or (os.cpu_count() or 1), max(1, len(pending)))
    bar = progress(total=len(units), desc="prepare", initial=len(results), unit="file")
    try:
        if workers <= 1:
            for uid, unit in pending:
                results[uid] = process_unit(unit, uid, cfg, str(out), fingerprint)
                bar.update(1)
        else:
            import multiprocessing as mp
            from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

            # spawn, not fork: a forked child inherits locks held by the parent's threads.
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(process_unit, unit, uid, cfg, str(out), fingerprint): uid
                           for uid, unit in pending}
                remaining = set(futures)
                while remaining:
                    finished, remaining = wait(remaining, return_when=FIRST_EXCEPTION)
                    for f in finished:
                        if f.exception() is not None:
                            for other in remaining:
                                other.cancel()
                            raise f.exception()
                        results[futures[f]] = f.result()
                        bar.update(1)
    finally:
        bar.close()
    return [results[unit_id(i)] for i in range(len(units))]


# --- phases 2 and 3 --------------------------------------------------------------------------------------------


def _load(path: Path, dtype, width: int) -> np.ndarray:
    """A unit's hashes or signatures, memory-mapped: the OS pages them in, the heap stays small."""
    if path.stat().st_size == 0:
        return np.zeros((0, width) if width > 1 else 0, dtype=dtype)
    m = np.memmap(path, dtype=dtype, mode="r")
    return m.reshape(-1, width) if width > 1 else m


def _dedup(units: list[Unit], cfg: PrepareConfig, out: Path) -> tuple[SplitPlan, dict]:
    """Phase 2: the dedup decisions of each unit, written to `_work/<unit>.drops.jsonl.zst` in document order
    ({"j", "reason", "rep"}), and the split plan. Memory: the SQLite index's page cache plus 8 bytes per kept
    document for the exact split."""
    work = out / "_work"
    dedup = Deduplicator(exact="exact" in cfg.dedup, minhash="minhash" in cfg.dedup,
                         threshold=cfg.minhash_threshold, num_perm=cfg.minhash_perm, path=work / "dedup.sqlite")
    groups: dict[str, array] = {}  # 8 bytes per kept document
    try:
        for i in range(len(units)):
            uid = unit_id(i)
            hashes = _load(work / f"{uid}.hash.u64", np.uint64, 1)
            sigs = _load(work / f"{uid}.sig.u32", np.uint32, cfg.minhash_perm) if "minhash" in cfg.dedup else None
            drops = JsonlZstWriter(work / f"{uid}.drops.jsonl.zst")
            for j, (doc_id, label) in enumerate(read_jsonl_zst(work / f"{uid}.index.jsonl.zst")):
                h = int(hashes[j])
                reason, rep = (dedup.check(doc_id, h, sigs[j] if sigs is not None else None) if cfg.dedup
                               else (None, None))
                if reason:
                    drops.write({"j": j, "reason": reason, "rep": rep})
                else:
                    groups.setdefault(group_key(label), array("Q")).append(h)
            drops.close()
        plan = SplitPlan(cfg.val_fraction, cfg.test_fraction, groups)
        info_ = {"bands": dedup.bands[0], "rows": dedup.bands[1], **dedup.cluster_summary()}
    finally:
        dedup.close()
        (work / "dedup.sqlite").unlink(missing_ok=True)
    return plan, info_


def _write_outputs(units: list[Unit], cfg: PrepareConfig, out: Path, plan: SplitPlan) -> dict:
    """Phase 3: stream every unit once more into staged split and reject shards."""
    work, stage = out / "_work", out / "_work" / "out"
    if stage.exists():
        shutil.rmtree(stage)
    writers = {s: ShardedWriter(stage / s, cfg.output_format, cfg.shard_docs) for s in SPLITS}
    rejects: dict[str, JsonlZstWriter] = {}
    hist = LengthHistogram()
    labels: dict[str, Counter] = {s: Counter() for s in SPLITS}
    sources: Counter = Counter()
    dedup_dropped: Counter = Counter()
    rejected = 0

    def reject(doc: dict) -> None:
        nonlocal rejected
        reason = doc["reason"]
        if reason not in rejects:
            rejects[reason] = JsonlZstWriter(stage / "rejects" / f"{reason}.jsonl.zst")
        rejects[reason].write(doc)
        rejected += 1

    try:
        for i in range(len(units)):
            uid = unit_id(i)
            for doc in read_jsonl_zst(work / f"{uid}.rejects.jsonl.zst"):
                reject(doc)
            # The drops come in document order: read them in step with the documents, one at a time.
            drops = read_jsonl_zst(work / f"{uid}.drops.jsonl.zst")
            drop = next(drops, None)
            for j, doc in enumerate(read_jsonl_zst(work / f"{uid}.docs.jsonl.zst")):
                if drop is not None and drop["j"] == j:
                    reason, rep = drop["reason"], drop["rep"]
                    drop = next(drops, None)
                    doc["reason"] = reason
                    doc["meta"] = {**doc.get("meta", {}), "duplicate_of": rep, "cluster": rep}
                    reject(doc)
                    dedup_dropped[reason] += 1
                    continue
                split = plan.assign(doc.get("label"), exact_hash(dedup_key(doc["text"])))
                writers[split].write(doc)
                hist.add(doc_words(doc["text"]))
                sources[doc["source"]] += 1
                if "label" in doc:
                    labels[split][group_key(doc["label"])] += 1
        for w in list(writers.values()) + list(rejects.values()):
            w.close()
    except BaseException:
        for w in list(writers.values()) + list(rejects.values()):
            w.abort()
        raise
    (stage / "rejects").mkdir(parents=True, exist_ok=True)
    return {"splits": {s: {"documents": w.count, "shards": w.shards} for s, w in writers.items()},
            "length_after": hist, "labels": labels, "sources": sources, "dedup_dropped": dict(dedup_dropped),
            "rejects_written": rejected}


def prepare_documents(input_paths: list[str], out_dir: str | os.PathLike, config: PrepareConfig | None = None,
                      resume: bool = False, overwrite: bool = False) -> dict:
    """Run the whole pipeline and return the report (also written to OUT/report.json and report.md).

    Args:
        input_paths: files, directories and glob patterns.
        out_dir: output directory (train/, val/, test/, rejects/, report.json, report.md, PNGs); it is
            replaced whole at the end, which is allowed only if it is empty or an earlier `data prepare` output.
        config: every setting; the defaults are the published filter thresholds.
        resume: skip input units completed by an interrupted run with the same config.
        overwrite: replace an `out_dir` that is not a `data prepare` output (never one overlapping an input).
    """
    cfg = config or PrepareConfig()
    out = Path(out_dir)
    inputs = [str(p) for p in input_paths]
    # Before anything is read or written: a refused --out must cost nothing and touch nothing.
    check_output(out, COMMAND, inputs=inputs, overwrite=overwrite)
    start = time.perf_counter()
    units, skipped = discover_units(inputs, cfg.format, exclude=str(out))
    if not units:
        raise HainaError(f"no input files found in {', '.join(inputs)}"
                         + (f" ({len(skipped)} files of unknown format skipped; pass --format)" if skipped else ""))
    fingerprint = cfg.fingerprint()
    state = partial_dir(out, COMMAND, keep=resume)
    work = state / "_work"
    work.mkdir(exist_ok=True)
    for tmp in work.glob(".*.tmp"):  # partial files of a unit that was running at the crash
        tmp.unlink()
    info(f"prepare: {len(units)} input file(s) → {out}")
    try:
        return _run(units, skipped, cfg, out, state, inputs, fingerprint, resume, overwrite, start)
    except (Exception, KeyboardInterrupt):
        if state.exists():
            info(f"prepare: the work done so far is kept in {state}; run again with --resume to continue it")
        raise


def _run(units: list[Unit], skipped: list[str], cfg: PrepareConfig, out: Path, state: Path, inputs: list[str],
         fingerprint: str, resume: bool, overwrite: bool, start: float) -> dict:
    """Phases 1-3 in the working directory `state`, then the finished output swapped in for `out`."""
    unit_stats = _run_phase1(units, cfg, state, fingerprint, resume)
    n_in = sum(s["documents_in"] for s in unit_stats)
    n_empty = sum(s["dropped"].get("empty", 0) for s in unit_stats)
    if n_in == n_empty:
        shutil.rmtree(state, ignore_errors=True)
        what = "no documents" if n_in == 0 else f"only empty documents ({n_in:,})"
        raise HainaError(f"the input holds {what} in {len(units)} file(s); check the paths, --format and "
                         "--text-field")
    t1 = time.perf_counter()
    plan, dedup_info = _dedup(units, cfg, state)
    t2 = time.perf_counter()
    written = _write_outputs(units, cfg, state, plan)
    timings = {"filter_s": round(t1 - start, 2), "dedup_s": round(t2 - t1, 2),
               "write_s": round(time.perf_counter() - t2, 2)}
    staged = state / "_work" / "out"
    report = write_report(staged, cfg, units, skipped, unit_stats, dedup_info, written, timings)
    publish(staged, out, COMMAND, inputs=inputs, overwrite=overwrite)
    shutil.rmtree(state, ignore_errors=True)
    return report
