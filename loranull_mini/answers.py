"""The type of a short factual answer (number, date, person, place, other), by rules.

NQ-open's contrastive probe scores the gold answer against distractors. Distractors drawn
at random from other questions' answers give the gold away by their type ("who ..." with
one name among three dates), so every distractor is drawn from answers of the gold's own
type. The rules below are simple and deterministic; what matters is that gold and
distractors are typed by the same rules, not that every answer is typed as a person
would.

ASDiv's numeric answers get distractors of their own kind: the same answer text with
another number built from the problem (numeric_distractors, asdiv_numeric_choices).
"""
from __future__ import annotations

import random
import re

from loranull_mini.metrics import NUMBER, _to_float, parse_number, same_number

MONTHS = ("january february march april may june july august september october november december "
          "jan feb mar apr jun jul aug sep sept oct nov dec").split()
WEEKDAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
NUMBER_WORDS = set(("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy "
                    "eighty ninety hundred thousand million billion trillion dozen half quarter first second "
                    "third fourth fifth sixth seventh eighth ninth tenth once twice percent").split())
COUNTRIES = set("""afghanistan albania algeria andorra angola argentina armenia australia austria azerbaijan
bahamas bahrain bangladesh barbados belarus belgium belize benin bhutan bolivia bosnia botswana brazil brunei
bulgaria burma burundi cambodia cameroon canada chad chile china colombia congo croatia cuba cyprus czechia
czechoslovakia denmark djibouti dominica ecuador egypt eritrea estonia ethiopia fiji finland france gabon gambia
georgia germany ghana greece grenada guatemala guinea guyana haiti honduras hungary iceland india indonesia iran
iraq ireland israel italy jamaica japan jordan kazakhstan kenya kiribati korea kosovo kuwait kyrgyzstan laos
latvia lebanon lesotho liberia libya liechtenstein lithuania luxembourg madagascar malawi malaysia maldives mali
malta mauritania mauritius mexico micronesia moldova monaco mongolia montenegro morocco mozambique myanmar
namibia nauru nepal netherlands holland nicaragua niger nigeria norway oman pakistan palau palestine panama
paraguay peru philippines poland portugal qatar romania russia rwanda samoa senegal serbia seychelles singapore
slovakia slovenia somalia spain sudan suriname sweden switzerland syria taiwan tajikistan tanzania thailand
togo tonga trinidad tunisia turkey turkmenistan tuvalu uganda ukraine uruguay uzbekistan vanuatu vatican
venezuela vietnam yemen zambia zimbabwe england scotland wales britain prussia persia yugoslavia usa uk
america""".split())
US_STATES = set("""alabama alaska arizona arkansas california colorado connecticut delaware florida georgia hawaii
idaho illinois indiana iowa kansas kentucky louisiana maine maryland massachusetts michigan minnesota mississippi
missouri montana nebraska nevada ohio oklahoma oregon pennsylvania tennessee texas utah vermont virginia
washington wisconsin wyoming""".split()) | {"new york", "new jersey", "new mexico", "new hampshire",
                                            "north carolina", "south carolina", "north dakota", "south dakota",
                                            "rhode island", "west virginia"}
CITIES_AND_REGIONS = set("""africa asia europe antarctica australia oceania america london paris berlin rome
madrid moscow tokyo beijing shanghai delhi mumbai cairo chicago boston houston dallas atlanta seattle denver
detroit philadelphia phoenix miami toronto montreal vancouver sydney melbourne dublin edinburgh glasgow
manchester liverpool birmingham venice florence milan naples vienna prague budapest warsaw amsterdam brussels
lisbon athens istanbul jerusalem baghdad tehran kabul hollywood manhattan brooklyn hawaii alaska siberia
scandinavia texas california pacific atlantic arctic mediterranean caribbean himalayas alps amazon nile
mississippi""".split())
PLACE_WORDS = set("""city town village county state province country island islands river lake ocean sea bay gulf
mountain mountains mount mt valley desert forest park street avenue road square bridge airport station harbor
harbour coast beach peninsula canal falls republic kingdom empire states continent district region capital
north south east west northern southern eastern western""".split())
ORGANISATION_WORDS = set("""company corporation inc ltd university college school party church band team club
association society council committee congress parliament court army navy league union records""".split())
GIVEN_NAMES = set("""james john robert michael william david richard joseph thomas charles christopher daniel
matthew anthony mark donald steven paul andrew joshua kenneth kevin brian george timothy ronald edward jason
jeffrey ryan jacob gary nicholas eric jonathan stephen larry justin scott brandon benjamin samuel gregory
alexander frank patrick raymond jack dennis jerry tyler aaron jose adam nathan henry douglas zachary peter kyle
ethan walter noah jeremy christian keith roger terry gerald harold sean austin carl arthur lawrence dylan jesse
jordan bryan billy joe bruce gabriel logan albert willie alan juan wayne elijah randy roy vincent ralph eugene
russell bobby mason philip louis harry elvis freddie ringo paul neil bob tom tim jim mike steve dave chris nick
mary patricia jennifer linda elizabeth barbara susan jessica sarah karen lisa nancy betty margaret sandra ashley
kimberly emily donna michelle carol amanda dorothy melissa deborah stephanie rebecca sharon laura cynthia kathleen
amy angela shirley anna brenda pamela emma nicole helen samantha katherine christine debra rachel carolyn janet
catherine maria heather diane ruth julie olivia joyce virginia victoria kelly lauren christina joan evelyn judith
megan andrea cheryl hannah jacqueline martha gloria teresa ann sara madison frances kathryn janice jean abigail
alice judy sophia grace denise amber doris marilyn danielle beverly isabella theresa diana natalie brittany
charlotte marie kayla alexis lori taylor whitney beyonce madonna adele rihanna kate jane lucy ellen meghan""".split())
NAME_PARTICLES = {"de", "van", "von", "der", "da", "di", "la", "le", "del", "bin", "jr", "sr", "ii", "iii", "iv"}

_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})s?\b")
_DECADE = re.compile(r"\b(\d0s|\d{1,2}(st|nd|rd|th) century|century|centuries|bc|bce|ad|ce|b\.c\.|a\.d\.)\b")
_WORD = re.compile(r"[a-z]+")


def answer_type(answer: str) -> str:
    """"date", "number", "place", "person" or "other" for a short answer text."""
    text = answer.strip()
    low = text.lower()
    words = _WORD.findall(low)
    if any(w in MONTHS or w in WEEKDAYS for w in words) or _YEAR.search(low) or _DECADE.search(low):
        return "date"
    letters = [w for w in words if w not in NUMBER_WORDS]
    if re.search(r"\d", low) and len(letters) <= 2 or (words and all(w in NUMBER_WORDS for w in words)):
        return "number"
    if (any(w in COUNTRIES or w in CITIES_AND_REGIONS or w in PLACE_WORDS for w in words)
            or any(state in low for state in US_STATES)):
        return "place"
    tokens = [t for t in re.split(r"[\s,]+", text) if t]
    names = [t for t in tokens if t.lower().strip(".") not in NAME_PARTICLES]
    if (2 <= len(names) <= 4 and all(t[:1].isupper() for t in names)
            and not any(w in ORGANISATION_WORDS for w in words) and words and words[0] not in ("the", "a", "an")):
        return "person"
    if len(names) == 1 and words and words[0] in GIVEN_NAMES:
        return "person"
    return "other"


# ----------------------------------------------------------------------------- numeric answers
def number_text(x: float) -> str:
    """A number as a problem would write it: 12, 2.5, -3 (at most 4 decimals)."""
    return str(int(round(x))) if abs(x - round(x)) < 1e-9 else f"{x:.4f}".rstrip("0")


def numeric_distractors(question: str, gold: float, k: int = 3, seed: int = 0) -> list[float]:
    """k distinct numbers, each different from the gold, built from the problem: k drawn with
    the seed from its numbers and their pairwise sums, differences and products; where the
    problem offers fewer than k, the gold's neighbours (gold + 1, gold - 1, 2 gold, gold + 10,
    ...) fill the rest."""
    operands = [v for v in (_to_float(m) for m in NUMBER.findall(question)) if v is not None]
    built = operands + [f(a, b) for i, a in enumerate(operands) for b in operands[i + 1:]
                        for f in (lambda a, b: a + b, lambda a, b: abs(a - b), lambda a, b: a * b)]
    pool: list[float] = []
    for v in built:
        if not same_number(v, gold) and not any(same_number(v, u) for u in pool):
            pool.append(v)
    picked = random.Random(seed).sample(pool, k) if len(pool) >= k else pool
    for v in (gold + 1, gold - 1, 2 * gold, gold + 10, gold - 10, gold + 2, gold + 100):
        if len(picked) < k and not same_number(v, gold) and not any(same_number(v, u) for u in picked):
            picked.append(v)
    return picked


def asdiv_numeric_choices(rows: list[dict], k: int = 3, seed: int = 0) -> list[dict]:
    """The ASDiv rows whose answer is a number, with options [gold answer, k distractor
    answers]: the answer text ("9 apples") with its number replaced by each of
    numeric_distractors (seed + the row's index), so the options differ only in the number.
    Rows answered by a word ("Book store") have no numeric contrast and are left out."""
    out = []
    for i, r in enumerate(rows):
        gold = parse_number(r["number"])
        if gold is None:
            continue
        others = [r["answer"].replace(r["number"], number_text(v), 1)
                  for v in numeric_distractors(r["question"], gold, k, seed=seed + i)]
        out.append({**r, "options": [r["answer"]] + others})
    return out
