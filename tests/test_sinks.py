"""The decision log's sink: every accepted decision, a bounded sample of rejections per
reason and interval, and a summary line of the counts."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knockd_fast.decisions import JSON_KEYS, Decision
from knockd_fast.sinks import LogSink, PrintSink

T = 1_800_000_000.0


def decision(when: float, reason: str = "malformed") -> Decision:
    verdict = "accepted" if reason == "ok" else "rejected"
    action, port, proto = ("open", 22, "tcp") if reason == "ok" else (None, None, None)
    return Decision(when, "192.0.2.2", "192.0.2.1", None, action, port, proto, verdict, reason, "x")


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "knockd_fast.decisions"]


def test_a_flood_of_rejections_is_a_sample_and_a_count(caplog) -> None:
    flood = [decision(T + n / 1000, "malformed") for n in range(20_000)]
    flood[5_000:5_000] = [decision(T + 5, "ok"), decision(T + 6, "ok"), decision(T + 7, "ok")]
    flood += [decision(T + 20, "not_allowed") for _ in range(50)]
    sink = LogSink(sample=10, interval=60)
    with caplog.at_level(logging.INFO, logger="knockd_fast.decisions"):
        for start in range(0, len(flood), 64):  # as the loop hands it over: slice by slice
            sink.write(flood[start : start + 64])
        sink.close()
    said = lines(caplog)
    assert len(said) == 3 + 10 + 10 + 1
    assert sum(" accepted ok: " in line for line in said) == 3  # accepted: every one
    assert said[-1] == (
        "rejections 2027-01-15T08:00:00.000Z to the stop: "
        "malformed 20000 (10 shown), not_allowed 50 (10 shown)"
    )


def test_each_interval_gets_its_sample_and_its_summary(caplog) -> None:
    sink = LogSink(as_json=True, sample=2, interval=60)
    with caplog.at_level(logging.INFO, logger="knockd_fast.decisions"):
        sink.write([decision(T + n) for n in range(0, 150, 10)])  # 15 over two and a half minutes
        sink.tick(T + 400)  # a quiet loop turn ends the last interval
    said = [json.loads(line) for line in lines(caplog)]
    summaries = [line for line in said if "rejections" in line]
    assert [s["rejections"]["malformed"] for s in summaries] == [
        {"count": 6, "shown": 2},  # T .. T+50
        {"count": 6, "shown": 2},  # T+60 .. T+110
        {"count": 3, "shown": 2},  # T+120 .. T+140, closed by the tick
    ]
    assert all("verdict" not in s for s in summaries)  # no summary reads as a decision
    assert sum("verdict" in line for line in said) == 6


def test_nothing_held_back_needs_no_summary(caplog) -> None:
    sink = LogSink(sample=10)
    with caplog.at_level(logging.INFO, logger="knockd_fast.decisions"):
        sink.write([decision(T, "replay"), decision(T + 1, "ok")])
        sink.close()
    assert len(lines(caplog)) == 2


def test_replay_json_lines_are_the_live_logs_with_every_key(capsys, caplog) -> None:
    decisions = [decision(T, "replay"), decision(T + 1, "ok")._replace(interface="eth0")]
    PrintSink(as_json=True).write(decisions)
    printed = capsys.readouterr().out.splitlines()
    with caplog.at_level(logging.INFO, logger="knockd_fast.decisions"):
        LogSink(as_json=True).write(decisions)
    assert printed == lines(caplog)
    assert [tuple(json.loads(line)) for line in printed] == [JSON_KEYS, JSON_KEYS]


def test_replay_prints_every_decision(capsys) -> None:
    sink = PrintSink()
    sink.write([decision(T + n) for n in range(500)])
    sink.close()
    assert len(capsys.readouterr().out.splitlines()) == 500


texts = st.one_of(st.none(), st.text())


@settings(max_examples=300, deadline=None)
@given(
    st.floats(0, 2**33, allow_nan=False),
    st.tuples(texts, texts, texts, texts),
    st.one_of(st.none(), st.integers(0, 65535)),
    st.tuples(st.text(), st.text(), st.text(), st.text()),
    texts,
)
def test_the_json_log_line_is_json_dumps_of_the_decision(when, who, port, verdict, interface):
    """The daemon's --json line is built by hand, for speed: it must be what json.dumps says."""
    user, action, proto, source = who
    decision = Decision(
        when, source or "", verdict[0], user, action, port, proto, *verdict[1:], interface
    )
    assert decision.as_json_text() == json.dumps(decision.as_json())
