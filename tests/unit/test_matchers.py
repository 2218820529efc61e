"""Trigger matchers: Alertmanager's operators and semantics, the CLI's text, the stored form."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.api.v1 import mitigation_pb2 as mpb
from controlplane.errors import InvalidArgumentError
from controlplane.model import (
    Matcher,
    MatcherSyntaxError,
    MatchOp,
    matchers_from_proto,
    matchers_from_record,
    parse_matcher,
)


def checked(text: str) -> Matcher:
    found = parse_matcher(text)
    return Matcher.checked(found.label, found.op, found.value, "m")


# What an Alertmanager route or silence with the same matcher decides (a label the
# alert lacks is "", a regular expression matches the whole value).
@pytest.mark.parametrize(
    ("text", "labels", "holds"),
    [
        ("severity=page", {"severity": "page"}, True),
        ("severity=page", {"severity": "pager"}, False),
        ("severity=page", {}, False),
        ("env!=staging", {"env": "prod"}, True),
        ("env!=staging", {}, True),
        ("env!=staging", {"env": "staging"}, False),
        ('env!=""', {"env": "x"}, True),
        ('env!=""', {}, False),
        ("severity=~critical|page", {"severity": "page"}, True),
        ("severity=~critical|page", {"severity": "critical-ish"}, False),
        ("severity=~crit.*", {"severity": "critical"}, True),
        ("severity=~.*", {}, True),
        ("severity=~.+", {}, False),
        ("team!~db-.*", {"team": "db-core"}, False),
        ("team!~db-.*", {"team": "web-db-"}, True),
        ("team!~db-.*", {}, True),
        ("path=~/api/(v1|v2)/.*", {"path": "/api/v2/pay"}, True),
    ],
)
def test_a_matcher_holds_as_in_alertmanager(text: str, labels: dict[str, str], holds: bool) -> None:
    assert checked(text).holds(labels) is holds


def test_the_text_forms() -> None:
    assert parse_matcher("alertname=HighErrorRate") == Matcher(
        "alertname", MatchOp.EQUAL, "HighErrorRate"
    )
    assert parse_matcher(' severity =~ "critical|page" ') == Matcher(
        "severity", MatchOp.REGEX, "critical|page"
    )
    assert parse_matcher("a=b=c") == Matcher("a", MatchOp.EQUAL, "b=c")  # the first operator
    assert parse_matcher("a!=~x") == Matcher("a", MatchOp.NOT_EQUAL, "~x")
    assert parse_matcher('msg="say \\"hi\\", then go"').value == 'say "hi", then go'
    for bad in ("alertname", "=x", "a~x", "!x"):
        with pytest.raises(MatcherSyntaxError, match="is not LABEL=VALUE"):
            parse_matcher(bad)
    with pytest.raises(MatcherSyntaxError, match="no closing double quote"):
        parse_matcher('a="open')
    with pytest.raises(MatcherSyntaxError, match="a double quote inside"):
        parse_matcher('a="x"y"')
    # As amtool reads it: only \", \\ and \n are escapes; another backslash is itself.
    assert parse_matcher('team=~"db-\\d+"').value == "db-\\d+"
    assert parse_matcher('t="a\\\\b\\nc"').value == "a\\b\nc"
    with pytest.raises(MatcherSyntaxError, match="not valid text"):
        parse_matcher("a=\udcff")  # an undecodable byte of argv


_LABELS = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,20}", fullmatch=True)
_VALUES = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)


@given(label=_LABELS, op=st.sampled_from(list(MatchOp)), value=_VALUES)
def test_the_shown_text_reads_back_as_the_same_matcher(label: str, op: MatchOp, value: str) -> None:
    matcher = Matcher(label, op, value)
    assert parse_matcher(matcher.text) == matcher
    assert matchers_from_record([matcher.to_record()]) == [matcher]


def test_values_that_would_read_back_otherwise_are_quoted() -> None:
    assert Matcher("a", MatchOp.EQUAL, "~x").text == 'a="~x"'  # not a=~x, a regex
    assert Matcher("a", MatchOp.NOT_EQUAL, "=x").text == 'a!="=x"'
    assert Matcher("a", MatchOp.EQUAL, "x\ny").text == 'a="x\\ny"'
    assert Matcher("a", MatchOp.REGEX, "db-\\d+").text == "a=~db-\\d+"


def test_records_of_the_first_triggers_still_read() -> None:
    assert matchers_from_record([["alertname", "X"]]) == [Matcher("alertname", MatchOp.EQUAL, "X")]
    assert matchers_from_record([["s", "a|b", "=~"]]) == [Matcher("s", MatchOp.REGEX, "a|b")]


def refused(*matchers: mpb.LabelMatcher) -> str:
    with pytest.raises(InvalidArgumentError) as raised:
        matchers_from_proto(list(matchers))
    return str(raised.value)


def test_requests_are_checked_naming_the_matcher_and_the_fix() -> None:
    eq = mpb.MATCH_EQUAL
    ok = mpb.LabelMatcher(label="alertname", value="X")
    assert "[1].value" in refused(ok, mpb.LabelMatcher(label="s", value="(", type=mpb.MATCH_REGEX))
    assert "RE2" in refused(mpb.LabelMatcher(label="s", value="a(?=b)", type=mpb.MATCH_REGEX))
    assert "over 256" in refused(mpb.LabelMatcher(label="s", value="x" * 257, type=eq))
    assert 's!="" for any value' in refused(mpb.LabelMatcher(label="s", value=""))
    assert "is empty" in refused()
    assert "over 16" in refused(*[mpb.LabelMatcher(label=f"l{i}", value="x") for i in range(17)])
    assert "given twice" in refused(ok, ok)
    assert "not a match type" in refused(mpb.LabelMatcher(label="s", value="x", type=9))  # type: ignore[arg-type]
    negative = mpb.LabelMatcher(label="env", value="staging", type=mpb.MATCH_NOT_EQUAL)
    anything = mpb.LabelMatcher(label="s", value=".*", type=mpb.MATCH_REGEX)
    assert "any alert would fire the trigger" in refused(negative, anything)
    any_byte = mpb.LabelMatcher(label="s", value="a\\Cb", type=mpb.MATCH_REGEX)
    assert "use . instead" in refused(ok, any_byte)
    escaped = mpb.LabelMatcher(label="s", value="a\\\\Cb", type=mpb.MATCH_REGEX)
    assert matchers_from_proto([ok, escaped])[1].holds({"s": "a\\Cb"})
    # One condition that needs a label is enough; the same label twice is fine.
    both = [ok, negative, mpb.LabelMatcher(label="env", value="dev", type=mpb.MATCH_NOT_EQUAL)]
    assert [m.text for m in matchers_from_proto(both)] == [
        "alertname=X",
        "env!=staging",
        "env!=dev",
    ]


def test_an_expression_that_backtracks_in_pythons_re_answers_at_once() -> None:
    """RE2 runs in time linear in the value; Python's re would take 2**64 steps here
    (the suite's timeout would fail the test)."""
    matcher = checked("path=~(a+)+$")
    assert matcher.holds({"path": "a" * 64 + "!"}) is False
    assert matcher.holds({"path": "a" * 64}) is True


def test_a_stored_expression_that_no_longer_compiles_holds_for_nothing() -> None:
    [broken] = matchers_from_record([["s", "(", "!~"]])
    assert broken.holds({"s": "x"}) is False
