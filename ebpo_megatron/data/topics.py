"""A keyword classifier for the paper's 9 math topics (EBPO's topic-clustered curriculum).

The paper labelled DAPO-Math-17K with an LLM; this is the offline, deterministic stand-in.

Rule: the problem text is lower-cased; every topic has a list of ``(regex, weight)`` cues
(weight 3 = a cue that names the topic almost by itself, such as "determinant" or
"probability"; 1 = a weaker hint, such as "average" or "area"). A topic's score is the sum of
the weights of its cues that occur (each cue counts once, however often it occurs). The topic
with the highest score wins; ties go to the topic listed first in ``TIE_ORDER`` (the more
specific topics first); a problem with no cue at all gets ``DEFAULT_TOPIC``.

It is a heuristic: tests/test_math_data.py reports its agreement with the hand labels of
tests/data/math_small.jsonl. Keyword rules cannot see that, e.g., "how many diagonals does a
decagon have" is counting rather than geometry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

TOPICS: tuple[str, ...] = (
    "Algebra & Number Theory",
    "Calculus & Analysis",
    "Geometry & Trigonometry",
    "Discrete Mathematics",
    "Probability & Statistics",
    "Linear Algebra",
    "Applied Mathematics & Word Problems",
    "Physics & Chemistry",
    "Advanced Mathematics",
)
DEFAULT_TOPIC = "Algebra & Number Theory"

# Ties: specific vocabularies before general ones.
TIE_ORDER: tuple[str, ...] = (
    "Physics & Chemistry",
    "Linear Algebra",
    "Advanced Mathematics",
    "Probability & Statistics",
    "Calculus & Analysis",
    "Geometry & Trigonometry",
    "Discrete Mathematics",
    "Applied Mathematics & Word Problems",
    "Algebra & Number Theory",
)


_CUES: dict[str, list[tuple[str, int]]] = {
    "Physics & Chemistry": [
        (r"velocit|accelerat|momentum|kinetic energy|potential energy|friction|pendulum", 3),
        (r"\bjoules?\b|\bnewtons?\b|\bwatts?\b|\bohms?\b|-ohm\b|resistors?\b|voltage|\bcircuit", 3),
        (r"\bmoles?\b|molar mass|molecul|\batoms?\b|chemical|reaction|\bsolution of\b|concentration", 3),
        (r"m/s|\bg\s*=\s*\d|gravity|gravitational|air resistance|dropped from", 3),
        (r"\bforce\b|\bmass\b|\bkg\b|\benergy\b|\btemperature\b|\bheat\b|\bpressure\b|\bgas\b", 1),
        (r"\bwavelength|\bfrequency\b|\bcharge\b|\bcurrent\b|\bphoton|\belectron", 2),
    ],
    "Linear Algebra": [
        (r"matri(?:x|ces)|determinant|eigen(?:value|vector)|\\begin\{[pbv]matrix\}", 3),
        (r"dot product|cross product|linear(?:ly)? (?:independent|dependent|transformation|map)", 3),
        (r"\brank\b|\btrace\b|null ?space|\bkernel\b|\bspan\b|\bbasis\b|orthogonal|orthonormal", 2),
        (r"\bvectors?\b|\\vec|\\mathbf\{[a-z]\}", 2),
    ],
    "Advanced Mathematics": [
        (r"\bgroups?\b.*\b(?:order|generators?|isomorph|subgroups?|abelian|cyclic|symmetric)", 3),
        (r"\bsymmetric group|\bcyclic group|\bsubgroups?\b|homomorphism|isomorphi|\bring\b|\bfield extension", 3),
        (r"differential equation|\by'|\by''|residue|contour|holomorphic|analytic function|laplace transform", 3),
        (r"topolog|manifold|\bmeasure\b|lebesgue|hilbert|banach|fourier transform|\bgalois", 3),
        (r"\\mathbb\{z\}_|\\mathbb\{z\}/|\bs_\d|\bz_\{?\d", 2),
    ],
    "Probability & Statistics": [
        (r"probabilit|\bprobable\b|\bodds\b|expected value|expectation|random(?:ly)?", 3),
        (r"\bdice\b|\bdie\b|\bcoins?\b|\bmarbles?\b|deck of cards|\bcards?\b|\bdrawn\b|\bspinner", 2),
        (r"\bmedian\b|\bmode\b|variance|standard deviation|\bdata(?: set)?\b|distribution", 3),
        (r"\bmean\b|\baverage\b", 1),
    ],
    "Calculus & Analysis": [
        (r"derivative|differentiat|integral|\\int|\\lim(?![a-z])|\blimit\b|\bf'\(|\bd/dx|\\frac\{d", 3),
        (r"\\sum_\{[a-z]=\d\}\^\{?\\infty|infinite (?:geometric )?series|converge|diverge", 3),
        (r"\btaylor|\bmaclaurin|continuous|tangent line|rate of change|\bmaximum value|\bminimum value", 2),
        (r"\\infty|\bseries\b|\bsequence\b", 1),
    ],
    "Geometry & Trigonometry": [
        (r"triangle|\bcircle|\bradius|\bdiameter|circumference|hypotenuse|polygon|hexagon|pentagon|octagon", 3),
        (r"\\sin|\\cos|\\tan|\bsin\b|\bcos\b|\btan\b|trigonometr|\^\\circ|\bdegrees?\b", 3),
        (r"\barea\b|perimeter|\bvolume\b|\bsphere|\bcube\b|\bcone\b|cylinder|rectangle|\bsquare\b(?! root)", 2),
        (r"\bangles?\b|\bparallel\b|perpendicular|\bchord|\btangent to\b|trapezoid|rhomb|\bdiagonals?\b", 2),
        (r"\bpoints?\s*\$?\(|coordinate plane|distance between", 2),
    ],
    "Discrete Mathematics": [
        (r"how many (?:different |distinct )?ways|in how many ways|arrange|permutation|combination", 3),
        (r"\bcommittee|\bsubsets?\b|\bgraph\b|\bvertices\b|\bedges\b|recurrence|recursive|pigeonhole", 3),
        (r"fibonacci|\bf_\{?n|binary|boolean|\binduction\b|ordered (?:pairs|triples)|\bbijection", 3),
        (r"\bdistinct\b|\bchoose\b|\\binom|factorial|\bstrings?\b", 1),
    ],
    "Applied Mathematics & Word Problems": [
        (r"\bcosts?\b|\bprice\b|\bsale\b|discount|\binterest\b|\bdollars?\b|\\\$|\bprofit|\bsalary|\bearns?\b", 3),
        (r"\bworkers?\b|\bdays?\b|\bhours?\b|\bminutes?\b|\bmiles?\b|\bkm\b|\btrain\b|\bcar\b|\btravels?\b", 2),
        (r"\byears? old\b|\bages?\b|\bold is\b|\bbuys?\b|\bsells?\b|\bstore\b|recipe|\btank\b|\bpipes?\b", 2),
        (r"\bpercent|\\%|\brate\b|\bspeed\b|\bper hour\b", 1),
    ],
    "Algebra & Number Theory": [
        (r"remainder|divisib|divisors?\b|\bgcd\b|greatest common|least common|\blcm\b|\bprimes?\b|modulo|\\pmod|\bmod\b", 3),
        (r"units digit|last digit|\bdigits?\b|\bintegers?\b|relatively prime|congruen", 2),
        (r"solve for|\bequations?\b|polynomial|quadratic|\broots?\b|real solutions|inequalit|interval notation", 2),
        (r"\bsimplify\b|\bfactor\b|logarithm|\\log|\bexponent|\bi\^|complex number|\bx\^", 1),
    ],
}

_COMPILED: dict[str, list[tuple[re.Pattern[str], int]]] = {
    topic: [(re.compile(pattern), weight) for pattern, weight in cues] for topic, cues in _CUES.items()
}
assert set(_COMPILED) == set(TOPICS) == set(TIE_ORDER)


def topic_scores(text: str) -> dict[str, int]:
    """Score of every topic for ``text`` (see the module docstring)."""
    lowered = text.lower()
    return {
        topic: sum(weight for pattern, weight in cues if pattern.search(lowered))
        for topic, cues in _COMPILED.items()
    }


def classify_topic(text: str, default: str = DEFAULT_TOPIC) -> str:
    """The topic with the highest score; ``default`` when no cue matches."""
    if default not in TOPICS:
        raise ValueError(f"default: expected one of {TOPICS}, got {default!r}")
    scores = topic_scores(text)
    best = max(scores.values())
    if best == 0:
        return default
    return next(topic for topic in TIE_ORDER if scores[topic] == best)


def classify_topics(texts: Iterable[str], default: str = DEFAULT_TOPIC) -> list[str]:
    return [classify_topic(t, default) for t in texts]
