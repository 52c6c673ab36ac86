#!/usr/bin/env python3
"""An independent reader of pgferry's Kafka topics (schema-topic mode), written
against the Avro specification with fastavro and confluent-kafka only: no pgferry
code, no Rust.

Modes:

  selftest
      Check fastavro's CRC-64-AVRO fingerprint against known vectors.

  read --brokers B --prefix P --topic T [--reader-schema FILE]
      1. Read `<P>._schemas` (key = 16 hex digits of the 64-bit CRC-64-AVRO
         fingerprint, value = the schema JSON). For each schema, compute the
         fingerprint here with fastavro (parse_schema -> to_parsing_canonical_form
         -> fingerprint(canonical, "CRC-64-AVRO")) and require it to equal the key.
      2. Read every message of topic T (each partition from its beginning to the
         end it had when we started), check the single-object header
         (0xC3 0x01 + 8-byte little-endian fingerprint), find the writer schema by
         that fingerprint and decode key and value with fastavro.schemaless_reader
         generically (writer schema only). Every byte must be consumed.
      3. With --reader-schema FILE (JSON {"key": schema, "value": schema}), decode
         the same bytes again with those reader schemas (Avro schema resolution,
         as a consumer holding its own schema does) and report the result or the
         exception, per record.

      Output: JSON lines on stdout, one {"kind": "schema", ...} per schema and one
      {"kind": "record", ...} per message; bytes as hex, decimals as strings,
      non-finite and negative-zero floats as "NaN", "Infinity", "-Infinity", "-0".
      Problems (a fingerprint mismatch, an unknown fingerprint, a bad header, a
      record the generic read cannot decode) are printed to stderr and make the
      exit status 1, after every message was tried.

fastavro's fingerprint() returns the 8 fingerprint bytes in little-endian order as
hex (the order single-object encoding writes them, and Apache Avro Java's
byte order): int.from_bytes(..., "little") is the 64-bit value.
"""

import argparse
import datetime
import decimal
import io
import json
import math
import os
import sys
import time
import uuid

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

MAGIC = b"\xc3\x01"

# (schema, 64-bit CRC-64-AVRO fingerprint of its Parsing Canonical Form)
VECTORS = [
    # The Avro specification's vector for "int".
    ("int", 0x7275D51A3F395C8F),
    # pgferry's key schema of ehr.public.patients: the uuid logicalType and the
    # connect.* attributes are stripped by the canonical form.
    (
        {
            "type": "record",
            "name": "Key",
            "namespace": "ehr.public.patients",
            "fields": [
                {
                    "name": "id",
                    "type": {
                        "type": "string",
                        "logicalType": "uuid",
                        "connect.name": "io.debezium.data.Uuid",
                    },
                }
            ],
        },
        0x130E58E5A63A1EDA,
    ),
]


def fingerprint64(schema):
    """(64-bit fingerprint, canonical form) of a schema (JSON value), by fastavro."""
    canonical = to_parsing_canonical_form(parse_schema(schema))
    little_endian = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    return int.from_bytes(little_endian, "little"), canonical


def selftest():
    ok = True
    for schema, expected in VECTORS:
        got, canonical = fingerprint64(schema)
        line = {
            "kind": "vector",
            "canonical": canonical,
            "fingerprint": f"{got:016x}",
            "expected": f"{expected:016x}",
            "ok": got == expected,
        }
        ok &= got == expected
        print(json.dumps(line), flush=True)
    print(f"fastavro {fastavro.__version__}: selftest {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def plain(v):
    """A decoded Avro value as JSON-compatible data."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        if v == 0.0 and math.copysign(1.0, v) < 0:
            return "-0"
        return v
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return repr(v)


def error_text(e):
    return f"{type(e).__module__}.{type(e).__name__}: {e}"


def consumer(brokers):
    from confluent_kafka import Consumer

    return Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": f"pgferry-interop-{os.getpid()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )


def read_topic(brokers, topic, timeout):
    """Every message of `topic`, each partition from its beginning to the end it
    had when we started."""
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    c = consumer(brokers)
    try:
        deadline = time.monotonic() + timeout
        while True:
            meta = c.list_topics(topic, timeout=10).topics.get(topic)
            if meta is not None and meta.error is None and meta.partitions:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"topic {topic} not found within {timeout}s")
            time.sleep(0.2)
        partitions = sorted(meta.partitions)
        ends = {}
        for p in partitions:
            _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ends[p] = high
        pending = {p for p in partitions if ends[p] > 0}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        out = []
        while pending:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"{topic}: partitions {sorted(pending)} not read to their end "
                    f"{ends} within {timeout}s"
                )
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    if m.offset() >= ends[m.partition()]:
                        pending.discard(m.partition())
                    continue
                raise SystemExit(f"{topic}: {m.error()}")
            if m.offset() < ends[m.partition()]:
                out.append(m)
            if m.offset() >= ends[m.partition()] - 1:
                pending.discard(m.partition())
        out.sort(key=lambda m: (m.partition(), m.offset()))
        return out
    finally:
        c.close()


def frame(data):
    """(fingerprint, body) of a single-object encoded datum, or raise."""
    if data[:2] != MAGIC:
        raise ValueError(f"not single-object encoded: starts with {data[:2].hex()}")
    if len(data) < 10:
        raise ValueError(f"single-object header truncated: {len(data)} bytes")
    return int.from_bytes(data[2:10], "little"), data[10:]


def decode(body, writer, reader=None):
    """Decode the whole body; trailing bytes mean the schema did not fit."""
    fo = io.BytesIO(body)
    value = fastavro.schemaless_reader(fo, writer, reader)
    if fo.tell() != len(body):
        raise ValueError(f"{len(body) - fo.tell()} of {len(body)} bytes left over")
    return value


def read(args):
    problems = []
    schemas = {}  # 64-bit fingerprint -> parsed writer schema
    for m in read_topic(args.brokers, f"{args.prefix}._schemas", args.timeout):
        key = m.key().decode()
        text = m.value().decode()
        raw = json.loads(text)
        fp, canonical = fingerprint64(raw)
        subject = dict(m.headers() or []).get("pgferry.subject", b"").decode()
        line = {
            "kind": "schema",
            "key": key,
            "fingerprint": f"{fp:016x}",
            "subject": subject,
            "canonical": canonical,
        }
        print(json.dumps(line), flush=True)
        if key != f"{fp:016x}":
            problems.append(f"schema topic key {key} but fastavro computes {fp:016x} for {canonical}")
        schemas[fp] = parse_schema(raw)

    readers = None
    if args.reader_schema:
        with open(args.reader_schema) as f:
            given = json.load(f)
        readers = {part: parse_schema(given[part]) for part in ("key", "value")}

    for m in read_topic(args.brokers, args.topic, args.timeout):
        where = f"{m.topic()}[{m.partition()}]@{m.offset()}"
        line = {
            "kind": "record",
            "partition": m.partition(),
            "offset": m.offset(),
            "headers": {k: (v or b"").decode() for k, v in (m.headers() or [])},
        }
        alt = {}
        for part, data in (("key", m.key()), ("value", m.value())):
            if data is None:
                line[part] = None
                alt[part] = None
                continue
            try:
                fp, body = frame(data)
            except ValueError as e:
                problems.append(f"{where} {part}: {e}")
                line[f"{part}_error"] = str(e)
                continue
            line[f"{part}_fingerprint"] = f"{fp:016x}"
            writer = schemas.get(fp)
            if writer is None:
                problems.append(f"{where} {part}: fingerprint {fp:016x} is not on the schema topic")
                line[f"{part}_error"] = "unknown fingerprint"
                continue
            try:
                line[part] = plain(decode(body, writer))
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                problems.append(f"{where} {part}: generic read failed: {error_text(e)}")
                line[f"{part}_error"] = error_text(e)
            if readers is not None:
                try:
                    alt[part] = plain(decode(body, writer, readers[part]))
                except Exception as e:  # noqa: BLE001 - the refusal is the point
                    alt[f"{part}_error"] = error_text(e)
        if readers is not None:
            line["with_reader_schema"] = alt
        print(json.dumps(line, ensure_ascii=False), flush=True)

    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("selftest")
    r = sub.add_parser("read")
    r.add_argument("--brokers", required=True)
    r.add_argument("--prefix", required=True)
    r.add_argument("--topic", required=True)
    r.add_argument("--reader-schema")
    r.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    return selftest() if args.mode == "selftest" else read(args)


if __name__ == "__main__":
    sys.exit(main())
