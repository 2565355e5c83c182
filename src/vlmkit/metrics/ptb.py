"""PTB tokenization as pycocoevalcap does it, in pure Python.

pycocoevalcap writes every caption of a split on its own line of one file, runs Stanford
CoreNLP 3.4.1's `PTBTokenizer -preserveLines -lowerCase` over it and drops a list of
punctuation tokens. This module reproduces that pipeline without Java:

- a longest-match scanner over the same token classes as CoreNLP's lexer (words, contractions,
  numbers, fractions, abbreviations, URLs, quotes, brackets, smileys, ...), with the same
  normalisations (`(` -> `-LRB-`, quotes -> `` `` ``/`''`, dashes -> `--`, `…` -> `...`, `£` -> `#`,
  a space inside a phone number or mixed fraction -> U+00A0);
- lowercasing *after* those normalisations, which is why `-lrb-` survives the drop list;
- the drop list itself (`PUNCTUATION`);
- the cross-caption quirk: because all captions are one document, whether a final abbreviation
  keeps its period ("the letter b." vs "the letter b") depends on how the *next* caption
  starts. `tokenize` therefore takes the captions in pycocoevalcap's order.

Plain captions (letters, spaces, commas, a final period) take a fast path of C-level string
operations; everything else goes through the scanner. Parity with the Java tool is tested on
thousands of generated captions (tests/metrics/test_ptb.py).
"""
from __future__ import annotations

import bisect
import re
import unicodedata

import numpy as np

# Tokens pycocoevalcap removes after tokenization (compared after lowercasing, hence the
# upper-case bracket names never match: "-lrb-" stays).
PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                         ".", "?", "!", ",", ":", "-", "--", "...", ";"])


def _unicode_class(predicate) -> str:
    """A regex character class body for the BMP characters satisfying `predicate`."""
    ranges, start, prev = [], None, None
    for code in range(0x80, 0x10000):
        if 0xD800 <= code <= 0xDFFF:
            ok = False
        else:
            ok = predicate(chr(code))
        if ok and start is None:
            start = code
        if not ok and start is not None:
            ranges.append((start, prev))
            start = None
        prev = code
    if start is not None:
        ranges.append((start, prev))
    return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges)


# Java's Character.isLetter / isDigit are the Unicode L* / Nd categories; astral characters
# are two UTF-16 surrogates to the 2014 lexer and never match, so they are excluded here.
_L = "A-Za-z" + _unicode_class(lambda c: unicodedata.category(c).startswith("L"))
_D = "0-9" + _unicode_class(lambda c: unicodedata.category(c) == "Nd")
LETTER = f"[{_L}]"
DIGIT = f"[{_D}]"
# Characters the lexer lets into words besides letters: soft hyphen and combining marks.
_WORDEXTRA = "\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f"
WORD = f"(?:[{_L}{_WORDEXTRA}]|&[aeiouAEIOU](?i:acute|grave|uml);)+"
SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"
NEWLINE = "(?:\r|\r?\n|\u2028|\u2029|\u000b|\u000c|\u0085)"
SPACENL = f"(?:{SPACE}|{NEWLINE})"
SGML = r"<\/?[A-Za-z!][^>\n]*>"
SENTEND = f"{SPACENL}(?:{SPACENL}|[A-Z]|{SGML})"
APOS = "(?:['\u0092\u2019]|&apos;)"
APOSETC = f"(?:{APOS}|[\u0091\u2018\u201b])"
HYPHEN = "[-_\u058a\u2010\u2011]"
LD = f"[{_L}{_D}]"

ABMONTH = "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
ABDAYS = "Mon|Tue|Tues|Wed|Thu|Thurs|Fri"
ABSTATE = ("Ala|Ariz|[A]rk|Calif|Colo|Conn|Ct|Dak|Del|Fla|Ga|[I]ll|Ind|Kans?|Ky|La|[M]ass|Md|Mich|Minn|"
           "[M]iss|Mo|Mont|Neb|Nev|Okla|[O]re|Pa|Penn|Tenn|Tex|Va|Vt|[W]ash|Wisc?|Wyo")
ABCOMP = "Inc|Cos?|Corp|Pp?tys?|Ltd|Plc|Bancorp|Dept|Bhd|Assn|Univ|Intl|Sys"
ABNUM = "tel|est|ext|sq"
ABPTIT = r"Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq"
ABBREV1 = f"(?i:(?:{ABMONTH}|{ABDAYS}|{ABCOMP}|{ABNUM}|{ABPTIT}|etc|al|seq)\\.)|(?:{ABSTATE})\\."
ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\."
ACRO = (r"[A-Za-z](?:\.[A-Za-z])+|(?i:(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R))")
ABTITLE = ("Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|"
           "Pvt|Mt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Gov|Insp|Commr")
ABBREV4 = f"(?i:{ABTITLE}|vs|Alex|Wm|Jos|Cie|a\\.k\\.a|cf|TREAS|Invt|Elec|Natl|M[ft]g)|{ACRO}"
ACRONYM_FOLLOWERS = (
    "About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last|Many|More|"
    r"Mr\.|Ms\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Then|There|These|They|This|We|When|"
    "While|What|Yet|You")
# The first letter of a follower is a character class: it must be upper case even though the
# lexer is caseless.
ACRONYM_FOLLOWERS = "|".join(f"[{w[0]}]{w[1:]}" for w in ACRONYM_FOLLOWERS.split("|"))

NUM = f"{DIGIT}*(?:[.:,\u00ad\u066b\u066c]{DIGIT}+)+|{DIGIT}+"
APOWORD = (f"{APOS}n{APOS}?|[lLdDjJ]{APOS}|(?i:Dunkin){APOS}|(?i:somethin){APOS}|(?i:ol){APOS}|{APOS}(?i:em)|"
           f"[A-HJ-XZn]{APOSETC}{LETTER}{{2}}{LETTER}*|{APOS}[2-9]0s|{APOS}(?i:till?)|"
           f"{LETTER}{LETTER}*[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{LETTER}*|{APOS}(?i:cause)|(?i:cont'd\\.?|nor'easter|"
           f"c'mon|e'er|s'mores|ev'ry|li'l|nat'l)")
MISCSYMBOL = ("[\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00b3\u00b4-\u00ba\u00d7\u00f7\u0387\u05be\u05c0"
              "\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d\u0703-\u070d"
              "\u07f6\u07f7\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203c"
              "\u2043\u203e-\u2042\u2044\u2207\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff"
              "\u3012\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\u2100-\u214f\u25a0-\u25ff"
              "\u2e80-\u2eff\u00a4\u00a5\u20a1-\u20ab\u20ad-\u20cf\u060b\u0e3f\ufffd\u02b9-\u02bf]")

# Quote normalisation with latexQuotes (the default): left-ish quotes -> ` / ``, others -> ' / ''.
_QUOTE_SINGLE_LEFT = "\u0091\u2018\u201b\u2039"
_QUOTE_SINGLE_RIGHT = "\u0092\u2019\u203a"
_QUOTE_DOUBLE_LEFT = "\u0093\u201c\u00ab"
_QUOTE_DOUBLE_RIGHT = "\u0094\u201d\u00bb"


def _latex_quotes(text: str, left: bool) -> str:
    text = re.sub(r"&apos;|'", "`" if left else "'", text)
    text = re.sub(r'"|&quot;', "``" if left else "''", text)
    text = re.sub(f"[{_QUOTE_SINGLE_LEFT}]", "`", text)
    text = re.sub(f"[{_QUOTE_SINGLE_RIGHT}]", "'", text)
    text = re.sub(f"[{_QUOTE_DOUBLE_LEFT}]", "``", text)
    return re.sub(f"[{_QUOTE_DOUBLE_RIGHT}]", "''", text)


def _currency(text: str) -> str:
    text = text.replace("\u00a2", "cents").replace("\u00a3", "#")
    return re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", text)


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}

# Actions: how a matched token becomes output text. KEEP returns the text; PUSHBACK1 returns the
# text and rescans its last character (the sentence-final period of an abbreviation).
KEEP, DROP = "keep", "drop"


try:  # the regex parser moved in Python 3.11
    from re import _constants as _sre_constants, _parser as _sre_parse
except ImportError:  # pragma: no cover
    import sre_constants as _sre_constants  # type: ignore
    import sre_parse as _sre_parse  # type: ignore


_CLASS_ANSWERS: dict[tuple, dict[str, bool]] = {}


def _first_char_test(pattern: str):
    """A predicate telling whether a match of `pattern` can start with a given character.

    Conservative: anything it does not understand makes it answer True. It only prunes the
    rules tried at each position, so it affects speed, never results.
    """
    c = _sre_constants
    tests: list = []

    def first_of(items, ignore_case) -> bool:
        """Add tests for the first character of `items`; return True if `items` can be empty."""
        for op, arg in items:
            if op is c.LITERAL:
                tests.append((lambda ch, v=arg, ic=ignore_case:
                              ord(ch) == v or (ic and ch.lower() == chr(v).lower())))
                return False
            if op is c.IN:
                negate = any(kind is c.NEGATE for kind, _ in arg)
                category = any(kind is c.CATEGORY for kind, _ in arg)  # conservative: any char
                # the class's code points as sorted, merged [low, high] ranges, for a binary
                # search (a loop over a class of hundreds of ranges made the first call of
                # `_rules_for` on each new character slow)
                spans = sorted([(value, value) if kind is c.LITERAL else value
                                for kind, value in arg if kind is c.LITERAL or kind is c.RANGE])
                lows: list[int] = []
                highs: list[int] = []
                for low, high in spans:
                    if highs and low <= highs[-1] + 1:
                        highs[-1] = max(highs[-1], high)
                    else:
                        lows.append(low)
                        highs.append(high)

                def in_class(ch, lows=lows, highs=highs, negate=negate, category=category, ic=ignore_case):
                    candidates = {ch, ch.lower(), ch.upper()} if ic else {ch}
                    for cand in candidates:
                        hit = category
                        if not hit and len(cand) == 1:
                            code = ord(cand)
                            index = bisect.bisect_right(lows, code) - 1
                            hit = index >= 0 and code <= highs[index]
                        if hit != negate:
                            return True
                    return False

                # the same classes recur across rules (letters, digits, [aA], ...): answer each
                # (class, character) question once
                answers = _CLASS_ANSWERS.setdefault((tuple(lows), tuple(highs), negate, category, ignore_case), {})

                def in_class(ch, answers=answers, compute=in_class):
                    answer = answers.get(ch)
                    if answer is None:
                        answer = answers[ch] = compute(ch)
                    return answer
                tests.append(in_class)
                return False
            if op is c.SUBPATTERN:
                add_flags = arg[1]
                if not first_of(arg[3], ignore_case or bool(add_flags & re.IGNORECASE)):
                    return False
                continue
            if op is c.BRANCH:
                empty = False
                for branch in arg[1]:
                    empty |= first_of(branch, ignore_case)
                if not empty:
                    return False
                continue
            if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
                low, _high, body = arg
                body_empty = first_of(body, ignore_case)
                if low > 0 and not body_empty:
                    return False
                continue
            if op in (c.AT, c.ASSERT, c.ASSERT_NOT):
                continue
            tests.append(lambda ch: True)  # ANY, back-references, ...: give up pruning
            return False
        return True

    if first_of(_sre_parse.parse(pattern), False):
        tests.append(lambda ch: True)
    return lambda ch: any(test(ch) for test in tests)


def _split_top_level(pattern: str) -> list[str]:
    """Top-level alternatives of a regex, so each competes separately for the longest match."""
    parts, depth, in_class, escaped, current = [], 0, False, False, []
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]" or (current and current[-1] == "[")
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _caseless(pattern: str) -> str:
    """Make literal ASCII letters outside character classes match either case.

    The Java lexer is declared `%caseless`, which affects literals but not character classes
    (so `[A]rk` still needs a capital A); Python's IGNORECASE would affect both.
    """
    out, i, in_class = [], 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            width = 6 if pattern[i + 1] == "u" else 4 if pattern[i + 1] == "x" else 2
            out.append(pattern[i:i + width])
            i += width
            continue
        if in_class:
            if char == "]" and pattern[i - 1] != "[":
                in_class = False
        elif char == "[":
            in_class = True
            if pattern[i + 1] == "]":  # a literal "]" first in a class
                out.append("[]")
                i += 2
                continue
        elif pattern.startswith("(?", i):
            end = i + 2
            while pattern[end] not in ":=!)":
                end += 1
            if pattern[end - 1] == "<" or pattern.startswith("(?<", i) and pattern[i + 3] not in "=!":
                pass
            out.append(pattern[i:end + 1])
            i = end + 1
            continue
        elif char == "{":
            end = pattern.index("}", i)
            out.append(pattern[i:end + 1])
            i = end + 1
            continue
        elif char.isascii() and char.isalpha():
            out.append(f"[{char.lower()}{char.upper()}]")
            i += 1
            continue
        out.append(char)
        i += 1
    return "".join(out)


def _rule(name, pattern, context=None, out=KEEP):
    """One lexer rule per top-level alternative: (name, regex, first-character test, out).

    JFlex picks the longest match (trailing context included) and, on ties, the earliest
    rule; Python alternation picks the first alternative that works, so each alternative is
    matched on its own. The trailing context is a capturing look-ahead so its length counts.
    """
    rules = []
    for alternative in _split_top_level(pattern):
        regex = _caseless(f"(?:{alternative})" + (f"(?=({context}))" if context else ""))
        rules.append((name, re.compile(regex), _first_char_test(regex), out))
    return rules


# The characters SPACENL can start with (spaces and line breaks).
_SPACENL_CHARS = " \t\u00a0\u2000-\u200a\u3000\r\n\u2028\u2029\u000b\u000c\u0085"


def _no_soft_hyphen(text: str) -> str:
    return text.replace("\u00ad", "")


def _parens(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _nbsp(text: str) -> str:
    return text.replace(" ", "\u00a0")


# Rule order matters: on equal match lengths the earlier rule wins, as in JFlex.
_RULE_GROUPS = [
    _rule("cannot", "(?i:cannot)", out=lambda t: (t[:3], 3)),
    _rule("assimilation", "(?i:gonna|wanna|gotta)", context=f"[^{_L}{_D}]|$", out=lambda t: (t[:3], 3)),
    _rule("sgml", SGML),
    _rule("dash", "&(?i:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", out=lambda t: "--"),
    _rule("amp", "&(?i:amp);", out=lambda t: "&"),
    _rule("sppunc", "&(?i:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);"),
    _rule("word_redaux", WORD, context=f"{APOS}(?:[msdMSD]|(?i:re|ve|ll))", out=_no_soft_hyphen),
    _rule("sword_sredaux", "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*", context=f"(?i:n){APOSETC}(?i:t)",
          out=_no_soft_hyphen),
    _rule("word", WORD, out=_no_soft_hyphen),
    _rule("apoword", APOWORD),
    _rule("apoword2", f"(?i:y){APOS}", context=LETTER),
    _rule("fullurl", r"(?i:https?)://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-]"),
    _rule("likelyurl", r"(?:(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})|"
                       r"(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},\-_$]+\.)+(?i:com|net|org|edu)))"
                       r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"),
    _rule("email", r"[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}\u00a0]*@(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)+"
                   r"[^ \t\n\f\r\"<>|(){}\[\].\u00a0]+"),
    _rule("redaux_nonletter", f"{APOS}(?:[msdMSD]|(?i:re|ve|ll))", context="[^A-Za-z]|$",
          out=lambda t: _latex_quotes(t, False)),
    _rule("sredaux", f"(?i:n){APOSETC}(?i:t)", out=lambda t: _latex_quotes(t, False)),
    _rule("apos_t", f"{APOS}(?i:t)", context="(?i:is|was)", out=lambda t: _latex_quotes(t, False)),
    _rule("date", f"{DIGIT}{{1,2}}[\\-/]{DIGIT}{{1,2}}[\\-/]{DIGIT}{{2,4}}"),
    _rule("number", f"[\\-+]?(?:{NUM})", out=_no_soft_hyphen),
    _rule("subsupnum", "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"),
    _rule("frac", f"(?:{DIGIT}{{1,4}}[- \u00a0])?{DIGIT}{{1,4}}(?:\\\\?/|\u2044){DIGIT}{{1,4}}", out=_nbsp),
    _rule("frac2", "[\u00bc\u00bd\u00be\u2153-\u215e]", out=lambda t: _FRACTIONS.get(t, t)),
    _rule("tbspec", r"-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-|(?i:C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|"
                    f"Cap{APOS}n|c{APOS}est)", out=lambda t: re.sub("(?i:&amp;)", "&", t)),
    _rule("thing3", r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"),
    _rule("dolsign", r"[A-Z]*\$|#"),
    _rule("dolsign2", "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
          out=_currency),
    # Before a likely sentence start ("U.S. The ..."), an acronym is emitted with its period and
    # the period is emitted again; a single letter gives up its period instead.
    _rule("letter_followed", "[A-Za-z]\\.", context=f"{SPACENL}+(?:{ACRONYM_FOLLOWERS}){SPACENL}",
          out=lambda t: (t[:1], 1)),
    _rule("acronym_followed", f"(?:{ACRO})\\.", context=f"{SPACENL}+(?:{ACRONYM_FOLLOWERS}){SPACENL}",
          out=lambda t: (t, len(t) - 1)),
    _rule("abbrev1_sentend", f"(?:{ABBREV1})", context=f"{SENTEND}|$", out=lambda t: (t, len(t) - 1)),
    _rule("abbrev1", ABBREV1),
    _rule("abbrev3", ABBREV3, context=f"{SPACENL}?[0-9]"),  # a line break counts (Java: "no." + "\n5")
    _rule("abbrev2", f"[A-Za-z]\\.|(?:{ABBREV4})\\."),
    _rule("abbrev4", f"(?:{ABBREV4})", context=SPACE),
    _rule("acro", ACRO, context=SPACENL),
    _rule("tbspec2", f"{APOS}[0-9][0-9]", context=SPACENL),
    _rule("word_period", f"{WORD}\\.", context="[,;:]", out=_no_soft_hyphen),
    _rule("phone", r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00a0])?[0-9]{2,4}[\- \u00a0/])"
                   r"[0-9]{3,4}[\- \u00a0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}",
          out=lambda t: _parens(_nbsp(t))),
    _rule("smiley", r"[<>]?[:;=][\-o\*']?[()DPdpO\\{@|\[\]]", out=_parens),
    _rule("prog_lang", r"(?i:c\+\+|[cf]#)"),
    _rule("dblquote_left", '"|&quot;', context="[A-Za-z0-9$]", out=lambda t: _latex_quotes(t, True)),
    _rule("dblquote", '"|&quot;', out=lambda t: _latex_quotes(t, False)),
    _rule("plus", r"\+"),
    _rule("percent_amp", "[%&\u2030\u2031]"),
    _rule("tilde_caret", r"[~^]"),
    _rule("bar_backslash", r"[|\\\u007f]"),
    _rule("lsb", r"\[", out=lambda t: "-LSB-"),
    _rule("rsb", r"\]", out=lambda t: "-RSB-"),
    _rule("angle", "[<>]"),
    _rule("lcb", r"\{", out=lambda t: "-LCB-"),
    _rule("rcb", r"\}", out=lambda t: "-RCB-"),
    _rule("lrb", r"\(", out=lambda t: "-LRB-"),
    _rule("rrb", r"\)", out=lambda t: "-RRB-"),
    _rule("hyphens", r"-+", out=lambda t: "--" if 3 <= len(t) <= 4 else t),
    _rule("ldots", "\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", out=lambda t: "..."),
    _rule("fnmarks", "@+|#+|_+"),
    _rule("asts", r"\*+|(?:\\\*){1,3}"),
    _rule("insentp", "[,;:]"),
    _rule("qmarks", "[?!]+"),
    _rule("period", "[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa]"),
    _rule("equals", "="),
    _rule("slash", "/"),
    _rule("hthing_period", f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|{ACRO}\\.))+\\.",
          context="[,;:]", out=_no_soft_hyphen),
    _rule("hthing", f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|{ACRO}\\.))+", out=_no_soft_hyphen),
    _rule("thing_period", f"(?:[dDoOlL]{APOSETC}{LD})?{LD}+(?:{HYPHEN}(?:[dDoOlL]{APOSETC}{LD})?{LD}+)*\\.",
          context="[,;:]"),
    _rule("thing", f"(?:[dDoOlL]{APOSETC}{LD})?{LD}+(?:{HYPHEN}(?:[dDoOlL]{APOSETC}{LD})?{LD}+)*"),
    # words joined by periods ("foo.bar", "node.js"): one token in the 3.4.1 lexer
    _rule("dotted_word", f"{LETTER}[{_L}{_D}]*(?:\\.{LETTER}[{_L}{_D}]*)+"),
    _rule("thinga_period", r"[A-Z]+(?:(?:[+&]|&(?i:amp);)[A-Z]+)+\.", context="[,;:]",
          out=lambda t: re.sub("(?i:&amp;)", "&", t)),
    _rule("thinga", r"[A-Z]+(?:(?:[+&]|&(?i:amp);)[A-Z]+)+", out=lambda t: re.sub("(?i:&amp;)", "&", t)),
    _rule("left_quote", "'", context="[A-Za-z][^ \t\n\r\u00a0]", out=lambda t: _latex_quotes(t, True)),
    _rule("redaux", f"{APOS}(?:[msdMSD]|(?i:re|ve|ll))", out=lambda t: _latex_quotes(t, False)),
    _rule("quotes", f"{APOS}|''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f"
                    "\u2039\u203a\u00ab\u00bb]{1,2}", out=lambda t: _latex_quotes(t, False)),
    _rule("miscsymbol", MISCSYMBOL),
    _rule("space", f"\\x00|{SPACE}+|[\u200b\u200e\u200f\ufeff]|&(?i:nbsp);", out=DROP),
    _rule("newline", NEWLINE, out=DROP),
]
_RULES = [rule for group in _RULE_GROUPS for rule in group]


def _scan(text: str, start: int, end: int) -> list[str]:
    """Raw tokens of `text[start:end]`; `text[end:]` is only look-ahead context."""
    tokens: list[str] = []
    pos = start
    while pos < end:
        # Fast path: a run of ASCII words each followed by spaces (not the words the lexer
        # splits) in one regex call: each word is a token whatever the rules say (no rule can
        # make it longer or shorter) and the spaces are dropped, exactly what the rules below
        # would do word by word; scanning only depends on the position, so jumping over the
        # run changes nothing.
        run = _WORD_RUN.match(text, pos)
        if run is not None:
            tokens.extend(run.group().split())
            pos = run.end()
            continue
        best_total, best, best_end = 0, None, 0
        for rule in _rules_for(text[pos]):
            match = rule[1].match(text, pos)
            if match is None or match.end() == pos:
                continue
            total = match.end() - pos + (len(match.group(1)) if match.re.groups else 0)
            if total > best_total:
                best_total, best, best_end = total, rule, match.end()
        if best is None:
            pos += 1  # untokenizable (e.g. emoji): the lexer deletes it and logs a warning
            continue
        out = best[3]
        token = text[pos:min(best_end, end)]
        if out is DROP:
            pos = best_end
            continue
        if out is KEEP:
            result, consumed = token, len(token)
        else:
            produced = out(token)
            result, consumed = produced if isinstance(produced, tuple) else (produced, len(token))
        tokens.append(result)
        pos += consumed
    return tokens


_SPLIT_WORDS = frozenset(["cannot", "gonna", "wanna", "gotta"])  # split by the lexer ("can not")
# Words (not split by the lexer) each followed by a space or tab and then by all the spaces
# after it: the tokens are the words. ASCII flag: case-insensitivity must not reach e.g. U+212A.
_NOT_SPLIT_WORD = r"(?!(?:cannot|gonna|wanna|gotta)(?![A-Za-z]))"
_WORD_RUN = re.compile(f"(?:{_NOT_SPLIT_WORD}[A-Za-z]+(?=[ \t]){SPACE}+)+", re.IGNORECASE | re.ASCII)
_FIRST_CHAR_CACHE: dict[str, tuple] = {}


def _rules_for(char: str) -> tuple:
    """The rules whose match can begin with `char` (computed once per character)."""
    rules = _FIRST_CHAR_CACHE.get(char)
    if rules is None:
        rules = tuple(rule for rule in _RULES if rule[2](char))
        _FIRST_CHAR_CACHE[char] = rules
    return rules


_LINE_BREAKS = re.compile("[\r\n\u2028\u2029\u000b\u000c\u0085]")
# A "plain" caption: ASCII words separated by single spaces, commas glued to the word before,
# optionally a final period. Such a caption tokenizes to its lowercased words whatever follows.
_PLAIN = re.compile(r"[A-Za-z]+(?:,? [A-Za-z]+)*(?: ?\.)?")


def _is_plain(caption: str) -> bool:
    if _PLAIN.fullmatch(caption) is None:
        return False
    words = caption.lower().replace(",", "").rstrip(" .").split(" ")
    if not _SPLIT_WORDS.isdisjoint(words):
        return False
    if caption.endswith("."):
        last = words[-1]
        # a final abbreviation or single letter keeps or splits its period depending on context
        if len(last) == 1 or _ABBREV_WORDS.fullmatch(last + "."):
            return False
    return True


def _plain_kept(caption: str) -> str:
    """The kept tokens of a plain caption (`_is_plain`) joined by spaces: its words lowercased,
    commas and the final period dropped."""
    return caption.lower().replace(",", "").replace(" .", "").replace(".", "")


_ABBREV_WORDS = re.compile(f"(?:{ABBREV1})|(?:{ABBREV3})|(?:(?:{ABBREV4})\\.)|(?i:no|nos)\\.", re.IGNORECASE)
_OTHER_LINE_BREAK_CHARS = "\r\u2028\u2029\u000b\u000c\u0085"  # line breaks but "\n"


def _ascii_lines(text: str) -> bytes:
    """Captions joined by "\n" as `text`, plus a final "\n", one byte per character: every
    non-ASCII character becomes "?", which like it makes a line non-plain, so
    `_non_plain_lines` sees the same answers (and plain lines the same text) in less memory."""
    return text.encode("ascii", "replace") + b"\n"


# Character classes of `_non_plain_lines` (one byte per character; padding is a line break).
_OTHER, _LETTER, _SPACE, _COMMA, _PERIOD, _NEWLINE = range(6)
_CLASS_OF_BYTE = np.zeros(256, dtype=np.uint8)
_CLASS_OF_BYTE[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", np.uint8)] = _LETTER
_CLASS_OF_BYTE[[ord(" "), ord(","), ord("."), ord("\n")]] = [_SPACE, _COMMA, _PERIOD, _NEWLINE]


def _bad_characters(classes: np.ndarray) -> np.ndarray:
    """Whether each character (by its class, `_CLASS_OF_BYTE`) breaks `_PLAIN`, as conditions
    on its neighbours (line breaks beyond the ends): not an ASCII letter, space, comma, period
    or line break; a comma not between a letter and a space; a space neither after a letter
    and before a letter or a final period (a period before a line break), nor after a comma
    and before a letter; a period not before a line break, or after neither a letter nor a
    space after a letter; and a line's first character (after a line break) not a letter. A
    line is plain exactly when none of its characters is bad (the split words and a final
    abbreviation aside, which `_non_plain_lines` checks apart)."""
    letter, space, comma, period, newline = (classes == kind for kind in (_LETTER, _SPACE, _COMMA, _PERIOD, _NEWLINE))

    def before(mask, edge=False):  # at i: mask[i - 1], `edge` at the first character
        return np.concatenate([[edge], mask[:-1]])

    def after(mask, edge=False):  # at i: mask[i + 1], `edge` at the last character
        return np.concatenate([mask[1:], [edge]])

    letter_before, letter_after, line_break_after = before(letter), after(letter), after(newline, True)
    bad = classes == _OTHER
    bad |= comma & ~(letter_before & after(space))
    bad |= space & ~((letter_before & (letter_after | after(period & line_break_after)))
                     | (before(comma) & letter_after))
    bad |= period & ~(line_break_after & (letter_before | (before(space) & before(letter_before))))
    bad |= before(newline, True) & ~letter  # a line starts with a letter (so is not empty)
    return bad


_CLASS_TABLE = _CLASS_OF_BYTE.tobytes()  # for bytes.translate


def _non_plain_lines(data: bytes, lowered_data: bytes, count: int) -> list[int]:
    """Indices of the lines `_is_plain` rejects, of the `count` lines of `_ascii_lines` text
    and its `bytes.lower()`.

    The same test as `_is_plain`, written as local conditions on the characters of all
    captions at once (numpy, `_bad_characters`), because a regex or Python check per caption
    costs more than the whole rest of the tokenization of plain captions.
    """
    codes = np.frombuffer(data, dtype=np.uint8)
    classes = np.frombuffer(data.translate(_CLASS_TABLE), dtype=np.uint8)  # = _CLASS_OF_BYTE[codes]
    bad = _bad_characters(classes)
    letter = classes == _LETTER
    line_end = np.flatnonzero(classes == _NEWLINE)
    non_plain = np.zeros(count, dtype=bool)
    non_plain[np.searchsorted(line_end, np.flatnonzero(bad))] = True

    # the words the lexer splits ("cannot" -> "can not"), as whole words, in any case
    lowered = lowered_data.decode("ascii")  # ASCII letters lowercased, same positions
    for word in _SPLIT_WORDS:
        position = lowered.find(word)
        while position >= 0:
            stop = position + len(word)
            if (position == 0 or not letter[position - 1]) and not letter[stop]:
                non_plain[np.searchsorted(line_end, position)] = True
            position = lowered.find(word, stop)

    # a final single letter or abbreviation before the final period ("plan B.", "etc .")
    candidates = np.flatnonzero(~non_plain & (codes[line_end - 1] == 46) & (line_end > 0))
    word_end = line_end[candidates] - 1
    word_end -= classes[word_end - 1] == _SPACE
    word_starts = np.flatnonzero(letter & ~np.concatenate([[False], letter[:-1]]))
    word_start = word_starts[np.searchsorted(word_starts, word_end) - 1]
    non_plain[candidates[_final_abbreviations(lowered, word_start, word_end)]] = True
    return np.flatnonzero(non_plain).tolist()


def _final_abbreviations(lowered: str, word_start: np.ndarray, word_end: np.ndarray) -> np.ndarray:
    """Whether each word lowered[word_start:word_end] is a single letter or an abbreviation
    (asking the regex once per distinct word)."""
    words = [lowered[a:b] for a, b in zip(word_start.tolist(), word_end.tolist())]
    abbreviations = {word for word in set(words) if len(word) == 1 or _ABBREV_WORDS.fullmatch(word + ".")}
    return np.fromiter(map(abbreviations.__contains__, words), dtype=bool, count=len(words))


def tokenize(captions: list[str], memo: dict | None = None) -> list[str]:
    """pycocoevalcap's tokenized form of each caption: PTB tokens joined by single spaces.

    Computed in bulk: plain captions (the vast majority in caption data) are lowercased and
    stripped of their commas and final period with whole-text string operations; only the
    other captions go through the scanner, each distinct segment once (`_scan_segmented`).
    `memo` (segment -> tokens) may be shared by calls on the same data, e.g. predictions then
    references; by default it is per call.
    """
    if not captions:
        return []
    text = "\n".join(captions)
    # (one `in` per character is several times faster than a regex search for the class)
    if text.count("\n") != len(captions) - 1 or any(map(text.__contains__, _OTHER_LINE_BREAK_CHARS)):
        captions = [_LINE_BREAKS.sub(" ", caption) for caption in captions]
        text = "\n".join(captions)
    # For a plain caption ("A dog, a cat ." / "a dog.") this is exactly its tokens joined by
    # spaces (`_plain_kept` of every line at once); the other lines are overwritten below.
    # Done on the one-byte-per-character copy (`_ascii_lines`): plain lines are ASCII, so they
    # are unchanged in it, and a text with any wide character (one emoji makes every character
    # 4 bytes) costs twice as much as str.
    data = _ascii_lines(text)
    lowered = data.lower()
    lines = lowered[:-1].replace(b",", b"").replace(b" .", b"").replace(b".", b"").decode("ascii").split("\n")
    last = len(captions) - 1
    memo = {} if memo is None else memo  # segment -> its kept tokens (None: none)
    bulk = []
    for index in _non_plain_lines(data, lowered, len(captions)):
        caption = captions[index]
        if "<" in caption or _MARK in caption:  # scanned whole (see `_scan_segmented`)
            following = "\n" + captions[index + 1] if index < last else ""
            lines[index] = _kept(_scan(caption + following, 0, len(caption))) or ""
        else:
            bulk.append(index)
    for index, line in zip(bulk, _scan_segmented(captions, bulk, memo)):
        lines[index] = line
    return lines


_MARK = "\x01"  # stands for a caption boundary in `_scan_segmented`
# a tail whose tokens may depend on the next caption (see `_scan_segmented`)
_LETTER_PERIOD_END = re.compile(f"[A-Za-z]\\.{SPACE}*$")


# Where a caption can be cut into independently scanned segments (see `_scan_segmented`): a
# space followed by a character that no rule can take in after a space (anything but a space
# or line break, a digit, a period, an ASCII capital and "<"), or a space after an ASCII letter
# followed by anything but a space or line break and "<" (no rule takes in a space, or looks
# past one, after a letter).
# (Written with positive look-aheads on one character class each, SPACENL's first characters
# spelled out, and the space first in both alternatives: a third faster to split with than
# the same breaks as `(?!...|{SPACENL}|$)` alternatives.)
_SEGMENT_BREAK = re.compile(f" (?=[^{_D}A-Z.<{_SPACENL_CHARS}])| (?<=[A-Za-z] )(?=[^<{_SPACENL_CHARS}])")
# The same breaks, and line breaks, for captions joined by "\n" (a space before the "\n" is
# no break, as a space at the end of a lone caption, since "\n" is in SPACENL).
_SEGMENT_OR_LINE_BREAK = re.compile(f"{_SEGMENT_BREAK.pattern}|\n")


def _kept(tokens: list[str]) -> str | None:
    """Tokens as pycocoevalcap keeps them: lowercased, punctuation dropped, joined by spaces;
    None when none is kept (an empty string would be one empty token)."""
    kept = [t for t in (tok.lower() for tok in tokens) if t not in PUNCTUATION]
    return " ".join(kept) if kept else None


_MISSING = object()


def _scan_segmented(captions: list[str], indices: list[int], memo: dict) -> list[str]:
    """Kept tokens (as `_kept`, "" for none) of `captions[i]` for each i of `indices`, each
    distinct segment scanned once per `memo`.

    Same result as `_kept(_scan(caption + following, 0, len(caption)))`, `following` being
    "\n" and the next caption, because a space followed by a character `c` matched by
    `_SEGMENT_BREAK` (not a space or line break, digit, period, ASCII capital or "<") is
    always a token boundary, and nothing scanned before it looks past `c` or tells one such
    `c` from another:

    - the scanner has no look-behind, so the tokens after the boundary depend only on the text
      from the boundary on;
    - the only rules whose match or trailing context can take in a space are `space` (stops
      at `c`, which is not a space), `frac`/`phone` (need a digit after the space), `ldots`
      (a period), the sentence-start contexts (`SENTEND`: a space, a line break, a capital or
      `<`; acronym followers: capitalised words), `abbrev3` (a digit), one-character contexts
      (the space itself), and `sgml`, whose `[^>\n]*` can run on indefinitely: captions
      containing `<` are therefore scanned whole (by `tokenize`). The fast path of `_scan`
      looks no further than the character after a space either.

    A space after an ASCII letter is a token boundary whatever follows it (but a space, a line
    break or "<"): the rules whose match spans a space need a digit (`frac`, `phone`), a
    closing bracket (`phone`) or a period (`ldots`) before it, and the contexts that look past
    a space (sentence starts, acronym followers, `abbrev3`'s digit) follow a period; every
    other context is at most the space itself when it follows a letter.

    So the tokens of every segment but the last are the same as in front of " a"; the last one
    (the tail) sees the real following text (the next caption matters there). Captions differ
    but their segments (words and the odd fragment) repeat, which is what makes the memo pay.

    The captions (none holding "<" or `_MARK`) are joined as `_MARK` + "\n" + caption + "\n"
    + `_MARK` + ... and cut with one regex call at segment breaks and line breaks. Within a
    caption the breaks are the ones of `_SEGMENT_BREAK` on the caption alone (the look-ahead
    sees the caption's own characters, and at its end "\n", which like the end of the text is
    no break), so the pieces between two marks are exactly the caption's segments, the last one
    being its tail. All pieces but the tails go through the memo, the missing ones scanned in
    front of " a". The kept parts (not None) are joined with spaces, "\n" at the marks, so each
    caption's line is its parts joined by spaces between one leading and one trailing space
    (just " " when it has none).

    A plain tail ("grass." or "table .") gives its lowercased words whatever follows. A tail
    that does not end in an ASCII letter and a period (trailing spaces aside) sees of the next
    caption only whether there is one: after "\n", the only rules whose context looks further
    (sentence starts after `abbrev1`, acronym followers after `letter_followed` and
    `acronym_followed`) match a letter and a period, every other context either stops at the
    "\n" or cannot take it in, and no match spans a line break. Such tails are scanned once
    per call and remembered (the last caption's tail, which sees the end of the text, aside).
    """
    if not indices:
        return []
    # _MARK "\n" caption "\n" _MARK "\n" caption ... "\n" _MARK
    text = ("\n" + _MARK + "\n").join([""] + [captions[i] for i in indices] + [""])[1:-1]
    pieces = _SEGMENT_OR_LINE_BREAK.split(text)
    last = len(captions) - 1
    marks, tails, tail_results = [0], [], []
    # kept tokens of a tail followed by a caption, for the tails whose tokens do not depend on
    # which caption (plain tails, and those not ending in a letter and a period: see above)
    free_tails: dict[str, str | None] = {}
    bound_tails: set[str] = set()  # the others
    start = 1
    for index in indices:
        mark = pieces.index(_MARK, start)
        tail = pieces[mark - 1]
        pieces[mark - 1] = _MARK  # not a segment for the memo
        result = free_tails.get(tail, _MISSING) if index < last else _MISSING
        if result is _MISSING:
            following = "\n" + captions[index + 1] if index < last else ""
            if tail in bound_tails:
                result = _kept(_scan(tail + following, 0, len(tail)))
            elif _is_plain(tail):  # e.g. "grass." or "table .": its lowercased words whatever follows
                result = free_tails[tail] = _plain_kept(tail)
            else:
                result = _kept(_scan(tail + following, 0, len(tail)))
                if _LETTER_PERIOD_END.search(tail):
                    bound_tails.add(tail)
                elif index < last:
                    free_tails[tail] = result
        marks.append(mark)
        tails.append(mark - 1)
        tail_results.append(result)
        start = mark + 1
    missing = set(pieces)
    missing.discard(_MARK)
    missing.difference_update(memo)
    for segment in missing:
        memo[segment] = _kept(_scan(segment + " a", 0, len(segment) + 1))
    parts = list(map(memo.get, pieces))
    for position in marks:
        parts[position] = "\n"
    for position, result in zip(tails, tail_results):
        parts[position] = result
    text = " ".join([part for part in parts if part is not None])
    return [line[1:-1] for line in text.split("\n")[1:-1]]


__all__ = ["PUNCTUATION", "tokenize"]
