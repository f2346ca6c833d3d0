"""Person names in security text, found offline with the name lists Faker ships.

A blank spaCy pipeline has no NER, and no model may be downloaded at run time, so names are
found from lists: the first and last names of Faker's person providers for the locales below
(several thousand of each, maintained with Faker). A span is a person name when

- a listed first name is followed by a listed last name ("John Smith", "Maria K. Garcia"), or
- a title precedes one or two capitalised words ("Dr. Okafor", "Ms. Nkechi Eze"), or
- a capitalised listed first name follows a word that introduces a person in tickets, alerts and
  chats ("Analyst John", "reported by Priya Sharma", "my name is Cory", "cc: Lena"), with the
  next capitalised word taken as the surname;

and a name goes on over further listed surnames ("Valentina Verdejo Tovar", "Ana del Río").

Both parts must be capitalised: "will", "grant" or "mark" in running text are words. A single
word that is also a common capitalised term in security text ("Grant", "Chase", "Will") is
only a name with a listed surname after it.
"""

from __future__ import annotations

import importlib
import re
from functools import cache

LOCALES = (
    "en_US", "en_GB", "en_IE", "en_IN", "en_NZ", "de_DE", "fr_FR", "es_ES", "es_MX", "it_IT",
    "nl_NL", "pt_BR", "pl_PL", "sv_SE", "da_DK", "no_NO", "fi_FI", "cs_CZ", "tr_TR", "ro_RO",
)  # fmt: skip

# Capitalised words that name things in security text far more often than people.
NOT_NAMES = frozenset(
    [
        "Access",
        "Active",
        "Admin",
        "Agent",
        "Alert",
        "Allow",
        "Amber",
        "Apache",
        "April",
        "Audit",
        "August",
        "Austin",
        "Azure",
        "Bill",
        "Black",
        "Blue",
        "Brown",
        "Cache",
        "Chase",
        "Chrome",
        "Cisco",
        "Cloud",
        "Crystal",
        "Dawn",
        "Defender",
        "Deny",
        "Event",
        "Faith",
        "Fancy",
        "Field",
        "Flash",
        "Ford",
        "Gate",
        "Grant",
        "Green",
        "Guy",
        "Hope",
        "Hunter",
        "Ivy",
        "Jenkins",
        "Joy",
        "June",
        "King",
        "Lane",
        "Lazarus",
        "Link",
        "Long",
        "Major",
        "March",
        "Mark",
        "May",
        "Max",
        "Mercy",
        "Miles",
        "Norton",
        "North",
        "Page",
        "Park",
        "Penny",
        "Power",
        "Price",
        "Ray",
        "Reading",
        "Reed",
        "Rich",
        "Rose",
        "Ruby",
        "Sandy",
        "Server",
        "Shell",
        "Sky",
        "Snow",
        "Spring",
        "Star",
        "Stone",
        "Summer",
        "Sun",
        "Trend",
        "Trinity",
        "Victory",
        "Wade",
        "Walker",
        "White",
        "Will",
        "Windows",
        "Winter",
        "Wolf",
        "Young",
    ]
)

INTRODUCERS = (
    r"(?:[Aa]nalyst|[Ee]ngineer|[Aa]dministrator|[Aa]dmin|[Ee]mployee|[Cc]ontractor|[Mm]anager"
    r"|[Dd]irector|[Ii]ntern|[Cc]olleague|[Cc]ustomer|[Vv]ictim|[Uu]ser|[Oo]wner|[Cc]ontact"
    r"|CEO|CFO|CISO|CTO|[Mm]r\.?|[Mm]rs\.?|[Mm]s\.?|[Dd]r\.?|[Pp]rof\.?|[Cc]c:?|[Bb]y|[Ff]rom|[Tt]o"
    r"|[Hh]i|[Hh]ello|[Dd]ear|[Tt]hanks|[Rr]egards,?|[Ss]igned|[Aa]ssignee:?|[Rr]eporter:?|[Nn]amed"
    r"|[Cc]alled|[Nn]ame\s+is|[Nn]ame's|[Cc]alls?\s+me|I\s+am|I'm|[Tt]his\s+is|[Ss]peak\s+(?:to|with)"
    r"|[Aa]sk\s+for|[Mm]y\s+(?:kid|son|daughter|wife|husband|partner|father|mother|brother|sister"
    r"|friend|boss|colleague))"
)
# A capitalised word in Latin-1 letters ("Jürgen", "Søren"), with an inner capital
# ("McGee", "DeShawn") or a hyphenated or apostrophised second part ("Hans-Peter", "O'Neil").
_UPPER, _LOWER = "A-ZÀ-ÖØ-Þ", "a-zß-öø-ÿ"
_PART = rf"[{_UPPER}][{_LOWER}]+(?:[{_UPPER}][{_LOWER}]+)?"
_WORD = rf"{_PART}(?:[-'’]{_PART})?"
# A lookahead, so "Analyst Mark Cook" is tried at "Mark" too after failing at "Analyst".
_PAIR = re.compile(rf"\b(?=({_WORD})((?:\s+[A-Z]\.)?\s+)({_WORD})\b)")
# A title is a word of its own ("Settingcontent-Ms" is not one) with the name on its line.
_TITLED = re.compile(rf"(?<![\w-])(?:Mr|Mrs|Ms|Mx|Dr|Prof)\.?[ \t]+({_WORD})(?:[ \t]+({_WORD}))?\b")
_NEXT_SURNAME = re.compile(
    rf"(?:[ \t]+|-)(?:(?:de|del|da|do|dos|van|von|y)[ \t]+(?:la[ \t]+)?)?({_WORD})\b"
)
_INTRODUCED = re.compile(rf"\b{INTRODUCERS}\s+({_WORD})(?:(?:\s+[A-Z]\.)?\s+({_WORD}))?\b")


@cache
def _lists() -> tuple[frozenset[str], frozenset[str]]:
    first: set[str] = set()
    last: set[str] = set()
    for locale in LOCALES:
        provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        first.update(getattr(provider, "first_names", ()))
        last.update(getattr(provider, "last_names", ()))
    latin = re.compile(_WORD)
    return (
        frozenset(n for n in first if latin.fullmatch(n)),
        frozenset(n for n in last if latin.fullmatch(n)),
    )


def person_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each person name found in `text`."""
    if not any(c.isupper() for c in text):
        return []
    first, last = _lists()
    spans = [
        (m.start(1), m.end(3))
        for m in _PAIR.finditer(text)
        if m.group(1) in first and m.group(3) in last
    ]
    for m in _INTRODUCED.finditer(text):
        given, surname = m.group(1), m.group(2)
        if (given in first or given in last) and given not in NOT_NAMES:
            end = m.end(2) if surname and surname not in NOT_NAMES else m.end(1)
            spans.append((m.start(1), end))
    for m in _TITLED.finditer(text):  # a title makes the next capitalised word(s) a name
        spans.append((m.start(1), m.end(2) if m.group(2) else m.end(1)))
    return [(start, _more_surnames(text, end, last)) for start, end in spans]


def _more_surnames(text: str, end: int, last: frozenset[str]) -> int:
    """The end of a name that goes on with more listed surnames ("Valentina Verdejo Tovar",
    "Ana del Río"): two family names are the rule in Spanish and Portuguese."""
    while (m := _NEXT_SURNAME.match(text, end)) and m.group(1) in last:
        end = m.end(1)
    return end
