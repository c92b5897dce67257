"""IMAP dates: "1-Feb-2024" for SEARCH, "01-Feb-2024 13:05:09 +0100" for APPEND.

RFC 9051 §9 date-text and date-time. Month names are case-insensitive
(ABNF string literals are). Parsing raises `DateError`; the command parser
turns it into a BAD reply.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta, timezone

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {name.upper(): number for number, name in enumerate(MONTHS, start=1)}

# date-day = 1*2DIGIT; date-day-fixed = (SP DIGIT) / 2DIGIT (single digits
# without the space are accepted too: some clients send them).
_DATE = re.compile(r"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
_DATE_TIME = re.compile(
    r" ?([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"
)


class DateError(ValueError):
    """Not a valid IMAP date or date-time; str(error) says why."""


def parse_date(text: str) -> date:
    """RFC 9051 §9 date-text: d-Mon-yyyy."""
    match = _DATE.fullmatch(text)
    if not match:
        raise DateError("expected a date such as 1-Feb-2024")
    return _date(*match.groups())


def parse_date_time(text: str) -> datetime:
    """RFC 9051 §9 date-time (without the quotes): dd-Mon-yyyy hh:mm:ss +zzzz."""
    match = _DATE_TIME.fullmatch(text)
    if not match:
        raise DateError('expected a date-time such as "01-Feb-2024 13:05:09 +0100"')
    day, month, year, hour, minute, second, sign, zone_hours, zone_minutes = match.groups()
    if int(zone_hours) > 23 or int(zone_minutes) > 59:
        raise DateError("time zone offset out of range")
    offset = timedelta(hours=int(zone_hours), minutes=int(zone_minutes))
    # A leap second (:60) becomes :59; datetime has no room for it.
    seconds = 59 if second == "60" else int(second)
    day_date = _date(day, month, year)
    try:
        moment = time(int(hour), int(minute), seconds)
    except ValueError:
        raise DateError("time out of range") from None
    return datetime.combine(day_date, moment, tzinfo=timezone(-offset if sign == "-" else offset))


def format_date_time(moment: datetime) -> str:
    """The wire form of an INTERNALDATE (RFC 9051 §9 date-time, without quotes)."""
    offset = moment.utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    zone = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return f"{moment.day:02d}-{MONTHS[moment.month - 1]}-{moment.year:04d} {moment:%H:%M:%S} {zone}"


def _date(day: str, month: str, year: str) -> date:
    number = _MONTH_NUMBER.get(month.upper())
    if number is None:
        raise DateError(f"unknown month {month!r}")
    try:
        return date(int(year), number, int(day))
    except ValueError:
        raise DateError("day or year out of range") from None
