"""How the field scores generated answers: VQA accuracy, exact match, ANLS, POPE, multiple choice.

Pure Python (no torch, no numpy), so the scoring rules can be imported and tested anywhere.
Each rule follows the reference scripts that published LLaVA-family numbers come from:

- `normalize_vqa_answer`, `vqa_accuracy`: the official VQA evaluation (GT-Vision-Lab/VQA,
  PythonEvaluationTools/vqaEvaluation/vqaEval.py: processPunctuation + processDigitArticle and
  the leave-one-annotator-out accuracy), which lmms-eval's vqav2 task applies to prediction and
  answers alike; the same tables are in EvalAI's answer processor (LLaVA's m4c_evaluator.py).
- `exact_match`: match after the same normalization (ST-VQA's accuracy in m4c_evaluator.py;
  LLaVA's GQA converter only lowercases and strips a trailing ".", a subset of it).
- `anls`: ANLS as in m4c_evaluator.py's STVQAANLSEvaluator and lmms-eval's `anls` (DocVQA):
  similarity 1 - edit distance / longer length, kept when >= the threshold.
- `pope_answer`, `pope_f1`: LLaVA's llava/eval/eval_pope.py.
- `mmbench_option`: the rule-based stage of MMBench's answer extraction (VLMEvalKit's
  can_infer_option / can_infer_text, as copied into lmms-eval's mmbench_evals.py), without the
  LLM fallback, and with three small additions: a reply that is exactly one option's text
  picks it first, a reply that is only a lowercase letter counts, and an "A" that ends the
  reply ("The answer is A") is not taken for the article.

`chance_floor` is the learning check the tests and the demo apply to a score: the fewest
correct answers out of n that a uniform guesser reaches with probability <= alpha.

`METRICS` names the per-example scores `(prediction, answers, **example) -> float` so that an
eval set can name its metric.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "METRICS",
    "anls",
    "exact_match",
    "levenshtein",
    "mmbench_option",
    "multiple_choice_accuracy",
    "normalize_vqa_answer",
    "pope_answer",
    "pope_f1",
    "pope_scores",
    "multiple_choice",
    "yes_no",
    "relaxed_accuracy",
    "SET_METRICS",
    "score_set",
    "vqa_accuracy",
]

# ---------------------------------------------------------------------------------------------
# VQA answer normalization (official VQA eval tables)
# ---------------------------------------------------------------------------------------------

# The official table, keys as written there. It is applied after lowercasing, so the keys with
# capitals ("Im", "Ive", "Id've", "I'dve") never match; they are kept to stay table-identical.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

# "manualMap": number words to digits ("none" counts as zero).
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES = frozenset({"a", "an", "the"})

# Characters processPunctuation deletes or turns into a space. "." is handled by PERIOD_STRIP;
# ":" and "'" are not in the list, so "10:30" and "don't" survive.
PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)  # fmt: skip

# A period not followed by a digit is deleted ("3.5" keeps its point, "dog." loses it). The
# "(?!<=\d)" is the official regex verbatim: meant as a look-behind, it is a look-ahead for the
# literal "<=" + digit and so in effect never rejects a match.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# A comma between digits ("1,000"): when present, every punctuation mark is deleted, not spaced.
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    """The official processPunctuation.

    Each mark is deleted when it touches a space somewhere in the (original) text, or when the
    text has a digit-comma-digit; otherwise it becomes a space ("black/white" -> "black white",
    "1,000" -> "1000", "yes, it is" -> "yes it is").
    """
    out = text
    has_number_comma = COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_number_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The official call passes re.UNICODE as the positional `count` (at most 32 periods are
    # removed); no real answer has that many, so no limit is applied here.
    return PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    """The official processDigitArticle: lowercase, number words to digits, drop articles,
    expand the contraction table, single spaces."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """Normalize an answer as the official VQA evaluation does.

    Newlines and tabs become spaces, the ends are stripped, then processPunctuation and
    processDigitArticle: "The two dogs." -> "2 dogs", "a dog." -> "dog", "dont" -> "don't".
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: the mean over leave-one-annotator-out subsets of min(1, matches / 3).

    Prediction and human answers are normalized with `normalize_vqa_answer`. For each
    annotator i, the matches are counted among the *other* answers; with 10 answers, m matches
    give (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10: 0.3, 0.6, 0.9, 1.0 for m = 1..4.
    With fewer answers the same formula runs over those given; no answers scores 0.
    """
    if not answers:
        return 0.0
    pred = normalize_vqa_answer(prediction)
    is_match = [normalize_vqa_answer(a) == pred for a in answers]
    total = sum(is_match)
    return sum(min(1.0, (total - own) / 3) for own in is_match) / len(is_match)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized answer, else 0.0."""
    pred = normalize_vqa_answer(prediction)
    return float(any(normalize_vqa_answer(a) == pred for a in answers))


# ---------------------------------------------------------------------------------------------
# ANLS (DocVQA, ST-VQA, InfographicVQA)
# ---------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1), two-row DP."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question.

    Strings are lowercased, stripped and their inner whitespace collapsed (as lmms-eval does);
    the similarity to an answer is 1 - distance / max(len) (1.0 when both are empty); the best
    answer counts, and a best similarity below `threshold` scores 0 (a normalized distance of
    exactly 0.5 keeps its 0.5, as in m4c_evaluator.py and lmms-eval).
    """
    pred = _anls_text(prediction)
    best = 0.0
    for answer in answers:
        gt = _anls_text(answer)
        length = max(len(pred), len(gt))
        similarity = 1.0 if length == 0 else 1.0 - levenshtein(pred, gt) / length
        best = max(best, similarity)
    return best if best >= threshold else 0.0


# ---------------------------------------------------------------------------------------------
# POPE (object hallucination, yes/no)
# ---------------------------------------------------------------------------------------------


def pope_answer(text: str) -> str:
    """Read "yes" or "no" from a free-form reply, as LLaVA's eval_pope.py reads it.

    Only the first sentence counts (text before the first "."), commas are dropped, the rest is
    split on single spaces, and "No", "no" or "not" among the words means "no"; anything else
    is "yes" ("Not really" is "yes": the reference list has no capitalized "Not").
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _yes_no_label(label: str) -> str:
    value = label.strip().lower()
    if value not in ("yes", "no"):
        raise ValueError(f"a POPE label must be 'yes' or 'no', got {label!r}")
    return value


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE's scores with "yes" as the positive class, as eval_pope.py prints them.

    Predictions are read with `pope_answer` ("yes"/"no" stay as they are); labels are "yes" or
    "no". Returns accuracy, precision, recall, f1 and yes_ratio (the share of "yes"
    predictions). A ratio with a zero denominator is 0.0 (the reference would divide by zero).
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        raise ValueError("pope_f1 needs at least one prediction")
    tp = fp = tn = fn = 0
    for prediction, label in zip(predictions, labels, strict=True):
        said_yes = pope_answer(prediction) == "yes"
        is_yes = _yes_no_label(label) == "yes"
        if said_yes and is_yes:
            tp += 1
        elif said_yes:
            fp += 1
        elif is_yes:
            fn += 1
        else:
            tn += 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(predictions)
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
    }


# ---------------------------------------------------------------------------------------------
# Multiple choice (MMBench, SEED, ScienceQA-style)
# ---------------------------------------------------------------------------------------------

# Marks MMBench's matcher turns into spaces before looking for a bare option letter.
_OPTION_MARKS = re.compile(r"[.()\[\],:;!*#{}]")
# (prefix, suffix) around a letter that make it an option label, not a word (lmms-eval's list).
_DECORATIONS = (
    ("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
    (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."),
)  # fmt: skip


def _letter_from_reply(text: str, letters: Sequence[str]) -> str | None:
    raw_words = text.split()
    words = _OPTION_MARKS.sub(" ", text).split()
    if len(words) == 1 and words[0].upper() in letters:  # "b", "(b)": the reply is the letter
        return words[0].upper()
    decorated = [
        letter
        for letter in letters
        if any(pre + letter + post in raw_words for pre, post in _DECORATIONS)
    ]
    found = [letter for letter in letters if letter in words]
    if len(found) == 1:
        letter = found[0]
        # "A" inside a longer sentence is most likely the article ("A dog on a bench"), and
        # MMBench's matcher does not take it then; kept when decorated ("A.", "(A)", "A:") or
        # the last word ("The answer is A").
        if not (letter == "A" and len(words) > 3 and words[-1] != "A" and "A" not in decorated):
            return letter
    # Several bare letters (or an article "A"): one decorated letter still decides ("B. A dog").
    return decorated[0] if len(decorated) == 1 else None


def _option_texts(options: Mapping[str, str]) -> dict[str, str]:
    # None or NaN (pandas' empty option cell) is no option
    texts = {k: str(v).strip().lower() for k, v in options.items() if v is not None and v == v}
    return {k: v for k, v in texts.items() if v}


def _letter_from_exact_text(text: str, options: Mapping[str, str]) -> str | None:
    bare = text.strip().lower().rstrip(".").strip()
    exact = [k for k, v in _option_texts(options).items() if v == bare]
    return exact[0] if len(exact) == 1 else None


def _letter_from_text(text: str, options: Mapping[str, str]) -> str | None:
    reply = text.lower()
    contained = [k for k, v in _option_texts(options).items() if v in reply]
    return contained[0] if len(contained) == 1 else None


def mmbench_option(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a reply picks, or None when the rules cannot tell.

    `options` maps letters to option texts ({"A": "cat", "B": "dog"}). First the letter: the
    reply's marks .()[],:;!*#{} become spaces and exactly one option letter must appear as a
    word ("B", "B.", "(B)", "B) dog", "The answer is B"), or, when several do, exactly one
    must be decorated as a label ("B. A dog": "B.", "(B)", "B:", ...); a lone "A" in a
    sentence of more than three words is read as the article unless decorated or last. Else the
    option text: a reply containing exactly one option's text (case-insensitive) picks it.
    Before all that, a reply that is exactly one option's text ("A dog." for "a dog") picks
    that option. Letters are matched in capitals, except a reply that is only the letter ("b").
    """
    by_letter = {str(k).strip().upper(): v for k, v in options.items()}
    return (
        _letter_from_exact_text(text, by_letter)
        or _letter_from_reply(text, list(by_letter))
        or _letter_from_text(text, by_letter)
    )


def multiple_choice_accuracy(
    predictions: Sequence[str],
    options_list: Sequence[Mapping[str, str]],
    answers: Sequence[str],
) -> float:
    """Share of replies whose `mmbench_option` is the answer letter (None counts as wrong)."""
    if not len(predictions) == len(options_list) == len(answers):
        raise ValueError(
            f"{len(predictions)} predictions, {len(options_list)} option sets, "
            f"{len(answers)} answers"
        )
    if not predictions:
        raise ValueError("multiple_choice_accuracy needs at least one prediction")
    hits = sum(
        mmbench_option(p, o) == a.strip().upper()
        for p, o, a in zip(predictions, options_list, answers, strict=True)
    )
    return hits / len(predictions)


# ---------------------------------------------------------------------------------------------
# Registry: per-example scores by name
# ---------------------------------------------------------------------------------------------


def _first(answers: Sequence[str], metric: str) -> str:
    if not answers:
        raise ValueError(f"the {metric} metric needs the label as answers[0]")
    return answers[0]


def _pope_metric(prediction: str, answers: Sequence[str], **example: object) -> float:
    return float(pope_answer(prediction) == _yes_no_label(_first(answers, "pope")))


def _multiple_choice_metric(prediction: str, answers: Sequence[str], **example: object) -> float:
    options = example.get("options")
    if not isinstance(options, Mapping):
        raise ValueError("the multiple_choice metric needs options={letter: text} per example")
    letter = _first(answers, "multiple_choice").strip().upper()
    return float(mmbench_option(prediction, options) == letter)


def _anls_metric(prediction: str, answers: Sequence[str], **example: object) -> float:
    threshold = example.get("anls_threshold", 0.5)
    return anls(prediction, answers, threshold=float(threshold))  # type: ignore[arg-type]


METRICS: dict[str, Callable[..., float]] = {
    "exact_match": lambda prediction, answers, **example: exact_match(prediction, answers),
    "vqa_accuracy": lambda prediction, answers, **example: vqa_accuracy(prediction, answers),
    "anls": _anls_metric,
    "pope": _pope_metric,
    "multiple_choice": _multiple_choice_metric,
}


# ---------------------------------------------------------------------------------------------
# What an eval set declares (`data.llava.eval[].metric`) and how its score is aggregated
# ---------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def multiple_choice(prediction: str, answer: str, options: Sequence[str]) -> float:
    """1.0 when the reply names the right option, by its letter ("B", "(B)", "The answer is
    B") or by its text; `options` in letter order (A, B, ...), `answer` a letter or the
    option's text."""
    by_letter = {LETTERS[i]: text for i, text in enumerate(options)}
    want = answer.strip()
    if want.upper() not in by_letter:
        matches = [k for k, v in by_letter.items() if v.strip().lower() == want.lower()]
        if len(matches) != 1:
            raise ValueError(f"answer {answer!r} is neither an option letter nor one option's text")
        want = matches[0]
    return float(mmbench_option(prediction, by_letter) == want.upper())


def yes_no(prediction: str, answer: str) -> float:
    """POPE with LLaVA's rule: the reply's first sentence, "no"/"not" means no."""
    return float(pope_answer(prediction) == _yes_no_label(answer))


def pope_f1(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """The set's F1 with "yes" as the positive class: the score the paper averages for POPE."""
    return pope_scores(predictions, answers)["f1"]


def _number(text: str) -> float | None:
    text = text.strip().rstrip("%").replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy: a numeric reply within 5% of a numeric answer counts, any
    other reply must match an answer exactly after the VQA normalization; best answer wins."""
    best = 0.0
    for answer in answers:
        predicted, target = _number(prediction), _number(answer)
        if predicted is not None and target is not None:
            ok = predicted == target if target == 0 else abs(predicted - target) / abs(target) <= tolerance
        else:
            ok = normalize_vqa_answer(prediction) == normalize_vqa_answer(answer)
        best = max(best, float(ok))
    return best


def _exact(prediction: str, answers: Sequence[str], **_: object) -> float:
    return exact_match(prediction, answers)


def _vqa(prediction: str, answers: Sequence[str], **_: object) -> float:
    return vqa_accuracy(prediction, answers)


def _choice(prediction: str, answers: Sequence[str], options: Sequence[str] = (), **_: object) -> float:
    return multiple_choice(prediction, _first(answers, "multiple_choice"), options)


def _yes_no(prediction: str, answers: Sequence[str], **_: object) -> float:
    return yes_no(prediction, _first(answers, "yes_no"))


def _anls(prediction: str, answers: Sequence[str], **_: object) -> float:
    return anls(prediction, answers)


def _relaxed(prediction: str, answers: Sequence[str], **_: object) -> float:
    return relaxed_accuracy(prediction, answers)


# metric name -> per-example score (prediction, reference answers, **example fields)
SET_METRICS: dict[str, Callable[..., float]] = {
    "vqa": _vqa, "exact": _exact, "multiple_choice": _choice, "yes_no": _yes_no, "anls": _anls, "relaxed": _relaxed,
}


def score_set(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]],
              options: Sequence[Sequence[str]] | None = None) -> tuple[float, float]:
    """(the set's score, its mean per-example accuracy). The score is the mean of the
    per-example scores, except yes_no, whose score is POPE's F1 (what the paper averages)."""
    if metric not in SET_METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose from {', '.join(SET_METRICS)}")
    per_example = SET_METRICS[metric]
    values = [
        per_example(p, list(r), options=list(options[i]) if options else ())
        for i, (p, r) in enumerate(zip(predictions, references, strict=True))
    ]
    accuracy = sum(values) / len(values) if values else 0.0
    if metric == "yes_no":
        return pope_f1(predictions, [r[0] for r in references]), accuracy
    return accuracy, accuracy


# ---------------------------------------------------------------------------------------------
# Is a score above chance?
# ---------------------------------------------------------------------------------------------


def chance_floor(n: int, chance: float, alpha: float = 0.001) -> int:
    """The smallest k with P(X >= k) <= alpha for X ~ Binomial(n, chance): a one-sided exact
    binomial test. n answers of which at least k are correct reject "this is guessing at
    `chance`" at level alpha. n + 1 when even n correct would not (n too small for alpha)."""
    if n < 0 or not 0.0 <= chance <= 1.0 or not 0.0 < alpha < 1.0:
        raise ValueError(f"chance_floor needs n >= 0, chance in [0, 1], alpha in (0, 1); got {n}, {chance}, {alpha}")
    if chance == 0.0:
        return 1  # a guesser that never hits has no correct answer: one is enough
    if chance == 1.0:
        return n + 1

    def log_pmf(k: int) -> float:
        return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                + k * math.log(chance) + (n - k) * math.log1p(-chance))

    tail = 0.0
    for k in range(n, -1, -1):  # add P(X = k) from the top until the tail passes alpha
        tail += math.exp(log_pmf(k))
        if tail > alpha:
            return k + 1
    return 0
