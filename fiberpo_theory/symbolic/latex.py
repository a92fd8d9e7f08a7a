"""The one LaTeX printer for :class:`fiberpo_theory.symbolic.Derivation`.

Mathematics lives in ``proofs/``; this module only prints.  ``to_latex``
turns one derivation into a standalone section (statement, assumptions, the
steps as an ``align*`` with a justification beside each line, conclusion,
paper reference, and whether the computation verified it);
``master_document`` writes the document that ``\\input``s every section.
The output needs only ``amsmath`` and ``amssymb``, so it compiles with the
pdflatex of Debian's ``texlive-latex-base``.

Prose fields (statement, assumptions, justifications, conclusion) are plain
text in which ``$...$`` marks inline mathematics.  Outside ``$...$`` the
printer escapes LaTeX's special characters; everywhere it maps the Unicode
mathematical symbols authors like to type (Greek letters, ≤, ∞, ...) to
macros, so a statement such as "δ ≤ ‖Â‖∞" prints without a Unicode engine.
"""

from __future__ import annotations

import re
from typing import Iterable

import sympy as sp

from .derivation import Derivation, Step

__all__ = ["to_latex", "master_document", "text", "math", "slug", "RELATIONS"]

#: Step.relation -> LaTeX relation symbol.
RELATIONS = {
    "=": "=",
    "<=": r"\le",
    "<": "<",
    ">=": r"\ge",
    ">": ">",
    "approx": r"\approx",
    "!=": r"\ne",
    "in": r"\in",
    "implies": r"\implies",
    "iff": r"\iff",
    "->": r"\to",
}

# Unicode symbols -> math-mode LaTeX.
_UNICODE_MATH = {
    "α": r"\alpha", "β": r"\beta", "γ": r"\gamma", "Γ": r"\Gamma", "δ": r"\delta", "Δ": r"\Delta",
    "ε": r"\varepsilon", "ϵ": r"\epsilon", "ζ": r"\zeta", "η": r"\eta", "θ": r"\theta", "Θ": r"\Theta",
    "κ": r"\kappa", "λ": r"\lambda", "Λ": r"\Lambda", "μ": r"\mu", "ν": r"\nu", "ξ": r"\xi", "π": r"\pi",
    "Π": r"\Pi", "ρ": r"\rho", "σ": r"\sigma", "Σ": r"\Sigma", "τ": r"\tau", "φ": r"\varphi", "Φ": r"\Phi",
    "χ": r"\chi", "ψ": r"\psi", "Ψ": r"\Psi", "ω": r"\omega", "Ω": r"\Omega",
    "≤": r"\le", "≥": r"\ge", "≠": r"\ne", "≈": r"\approx", "≲": r"\lesssim", "≳": r"\gtrsim",
    "∞": r"\infty", "→": r"\to", "←": r"\leftarrow", "⇒": r"\Rightarrow", "⇔": r"\Leftrightarrow",
    "∈": r"\in", "∉": r"\notin", "⊆": r"\subseteq", "⊂": r"\subset", "∪": r"\cup", "∩": r"\cap",
    "×": r"\times", "·": r"\cdot", "∘": r"\circ", "±": r"\pm", "∓": r"\mp", "√": r"\surd",
    "∑": r"\sum", "∏": r"\prod", "∫": r"\int", "∂": r"\partial", "∇": r"\nabla", "∀": r"\forall",
    "∃": r"\exists", "‖": r"\|", "−": "-", "…": r"\ldots", "⋯": r"\cdots", "ℓ": r"\ell",
    "⁺": r"^{+}", "⁻": r"^{-}", "²": r"^{2}", "³": r"^{3}", "¹": r"^{1}", "⁰": r"^{0}",
    "₀": r"_{0}", "₁": r"_{1}", "₂": r"_{2}", "₃": r"_{3}", "ᵢ": r"_{i}", "ⱼ": r"_{j}", "ₖ": r"_{k}",
    "∗": "*", "Â": r"\hat{A}", "â": r"\hat{a}", "ŝ": r"\hat{s}",
}
# Unicode punctuation -> text-mode LaTeX.
_UNICODE_TEXT = {
    "—": "---", "–": "--", "“": "``", "”": "''", "‘": "`", "’": "'", "\u00a0": "~", "é": r"\'e",
    "è": r"\`e", "ü": r'\"u', "ö": r'\"o', "ä": r'\"a',
}
_TEXT_SPECIALS = {  # math-mode forms avoid the TS1 (textcomp) fonts, which may need METAFONT
    "\\": r"$\backslash$", "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
    "~": r"$\sim$", "^": r"\^{}", "$": r"\$", "<": r"$<$", ">": r"$>$", "|": r"$|$",
}


_COMBINING = {"\u0303": r"\tilde", "\u0302": r"\hat", "\u0304": r"\bar"}


def _combine(s: str, math_mode: bool) -> str:
    """x + combining accent -> \\tilde{x} (wrapped in $ in text mode)."""
    def rep(m):
        macro = _COMBINING[m.group(2)] + "{" + m.group(1) + "}"
        return macro if math_mode else "$" + macro + "$"

    return re.sub("(\\w)([\u0302\u0303\u0304])", rep, s)


def _math_unicode(s: str) -> str:
    s = _combine(s, True)
    out = []
    for ch in s:
        rep = _UNICODE_MATH.get(ch)
        if rep is None:
            out.append(ch if ord(ch) < 128 else _UNICODE_TEXT.get(ch, "?"))
        else:
            # a trailing space keeps "\alpha x" from becoming "\alphax"
            out.append(rep + (" " if rep[-1].isalpha() else ""))
    return "".join(out)


def _text_unicode(s: str) -> str:
    parts = re.split(r"(\$[^$]*\$)", _combine(s, False))
    if len(parts) > 1:  # accents produced inline math: keep it, escape the rest
        return "".join(p if p.startswith("$") and p.endswith("$") and len(p) > 1 else _text_unicode(p) for p in parts)
    out: list[tuple[bool, str]] = []  # (is_math, latex); adjacent math pieces are merged

    def put(is_math: bool, piece: str):
        if is_math and out and out[-1][0]:
            out[-1] = (True, out[-1][1] + piece)
        else:
            out.append((is_math, piece))

    for ch in s:
        if ch in _TEXT_SPECIALS:
            rep = _TEXT_SPECIALS[ch]
            if rep.startswith("$") and rep.endswith("$") and len(rep) > 2:
                put(True, rep[1:-1] + " ")
            else:
                put(False, rep)
        elif ch in _UNICODE_TEXT:
            put(False, _UNICODE_TEXT[ch])
        elif ch in _UNICODE_MATH:
            rep = _UNICODE_MATH[ch]
            put(True, rep + (" " if rep[-1].isalpha() else ""))
        elif ord(ch) < 128:
            put(False, ch)
        else:
            put(False, "?")
    return "".join(f"${piece.rstrip()}$" if is_math else piece for is_math, piece in out)


def text(prose: str) -> str:
    """Prose with ``$...$`` inline math -> LaTeX-safe text (see the module docstring)."""
    parts = re.split(r"(?<!\\)\$", prose or "")
    if len(parts) % 2 == 0:  # an unmatched $: treat the whole string as text
        return _text_unicode(prose)
    return "".join(_math_unicode(p).join("$$") if i % 2 else _text_unicode(p) for i, p in enumerate(parts))


def math(expr) -> str:
    """A SymPy expression (or a string of LaTeX math) as LaTeX math."""
    if isinstance(expr, str):
        return _math_unicode(expr)
    return _math_unicode(sp.latex(expr, mul_symbol=None))


def slug(identifier: str) -> str:
    """A file-name-safe, LaTeX-label-safe version of a derivation id."""
    return re.sub(r"[^A-Za-z0-9]+", "-", identifier).strip("-").lower() or "derivation"


# Rough width budget of one display line, in characters of LaTeX source.
_LINE = 95


def _visible_length(latex: str) -> int:
    """A crude width estimate: LaTeX source without command names and braces."""
    stripped = re.sub(r"\\(left|right|frac|mathrm|text|operatorname|begin|end)\b", "", latex)
    stripped = re.sub(r"\\[A-Za-z]+", "x", stripped)
    return len(re.sub(r"[{}\s]", "", stripped))


def _rhs_lines(expr) -> list[str]:
    """The right-hand side broken into display lines: long sums term by term, long rows as columns."""
    if isinstance(expr, sp.MatrixBase) and expr.rows == 1 and _visible_length(math(expr)) > _LINE:
        return [math(expr.T) + r"^{\mathsf{T}}"]
    if isinstance(expr, sp.Add) and _visible_length(math(expr)) > _LINE:
        lines, current = [], ""
        for n, term in enumerate(expr.as_ordered_terms()):
            piece = math(term)
            if n and not piece.lstrip().startswith("-"):
                piece = "+ " + piece
            if current and _visible_length(current + piece) > _LINE:
                lines.append(current)
                current = piece
            else:
                current = f"{current} {piece}".strip()
        lines.append(current)
        return lines
    return [math(expr)]


def _step_lines(step: Step, number: int) -> str:
    rel = RELATIONS.get(step.relation, _math_unicode(step.relation))
    why = text(step.why) if step.why else ""
    out = [rf"\intertext{{\footnotesize ({number}) {why}}}"] if why else []
    lhs_lines = _rhs_lines(step.lhs)
    rhs = _rhs_lines(step.rhs)
    lhs = lhs_lines[-1]
    if len(lhs_lines) > 1 or (_visible_length(lhs) + _visible_length(rhs[0]) > _LINE and _visible_length(lhs) > 25):
        # a long left-hand side gets lines of its own in the right-hand column (in the left column its width
        # would push every right-hand side of the block to the right); the relation starts the next line
        out.extend([rf"&{lhs_lines[0]} \\"] + [rf"&\qquad {line} \\" for line in lhs_lines[1:]])
        lhs = ""
    out.append(f"{lhs} &{rel} {rhs[0]}" + ("" if len(rhs) == 1 else r" \\"))
    for i, line in enumerate(rhs[1:], start=1):
        out.append(rf"&\qquad {line}" + ("" if i == len(rhs) - 1 else r" \\"))
    return "\n".join(out)


def to_latex(derivation: Derivation) -> str:
    """One derivation as a standalone LaTeX section (to be ``\\input`` by the master document)."""
    d = derivation
    lines = [
        f"% generated by fiberpo_theory.symbolic.latex from the derivation {d.id!r}; do not edit by hand",
        rf"\section{{{text(d.title)}}}",
        rf"\label{{sec:{slug(d.id)}}}",
        rf"\noindent\textbf{{Paper reference.}} {text(d.paper_ref)}\par",
        rf"\noindent\textbf{{Identifier.}} \texttt{{{text(d.id)}}}\par\medskip",
        rf"\noindent\textbf{{Statement.}} {text(d.statement)}\par",
    ]
    if d.assumptions:
        lines.append(r"\medskip\noindent\textbf{Assumptions.}")
        lines.append(r"\begin{itemize}")
        lines.extend(rf"  \item {text(a)}" for a in d.assumptions)
        lines.append(r"\end{itemize}")
    if d.steps:
        lines.append(r"\medskip\noindent\textbf{Derivation.}")
        lines.append(r"\begin{align*}")
        lines.append(" \\\\\n".join(_step_lines(s, n) for n, s in enumerate(d.steps, start=1)))
        lines.append(r"\end{align*}")
    if d.conclusion:
        lines.append(rf"\noindent\textbf{{Conclusion.}} {text(d.conclusion)}\par")
    status = (
        r"\textbf{verified} by the computation above"
        if d.verified
        else r"\textbf{not verified}: the computation did not establish the statement (see the conclusion)"
    )
    lines.append(rf"\medskip\noindent\textbf{{Status.}} {status}.\par")
    return "\n".join(lines) + "\n"


_PREAMBLE = r"""\documentclass[10pt]{article}
\usepackage{amsmath}
\usepackage{amssymb}
\allowdisplaybreaks
\setlength{\textwidth}{6.5in}
\setlength{\oddsidemargin}{0in}
\setlength{\evensidemargin}{0in}
\setlength{\textheight}{9in}
\setlength{\topmargin}{-0.5in}
\setlength{\parindent}{0pt}
\setlength{\parskip}{3pt}
\sloppy
"""


def master_document(derivations: Iterable[Derivation], *, title: str | None = None) -> str:
    """The master document: preamble, a summary table, and one ``\\input`` per derivation.

    Each derivation is expected in ``<slug(id)>.tex`` beside the master file
    (which is what :mod:`fiberpo_theory.tools.derive` writes).
    """
    derivations = list(derivations)
    title = title or "Fibration Policy Optimization (arXiv:2603.08239): derivations checked with SymPy"
    rows = [
        rf"\texttt{{{text(d.id)}}} & {text(d.paper_ref)} & {'yes' if d.verified else 'no'} \\"
        for d in derivations
    ]
    body = [
        _PREAMBLE,
        rf"\title{{{text(title)}}}",
        r"\author{generated by \texttt{fiberpo-theory derive}}",
        r"\date{}",
        r"\begin{document}",
        r"\maketitle",
        r"Each section below is produced by a SymPy derivation in the package's \texttt{proofs/} directory.",
        r"A derivation is marked verified only when the computation itself established the statement",
        r"(a difference simplified to zero, or every region of a piecewise definition was checked);",
        r"the symbolic results are also compared numerically with the package's torch implementation in its tests.",
        r"\begin{center}\small",
        r"\begin{tabular}{p{0.3\textwidth}p{0.52\textwidth}l}",
        r"\hline derivation & paper reference & verified \\ \hline",
        *rows,
        r"\hline",
        r"\end{tabular}",
        r"\end{center}",
        r"\tableofcontents",
        r"\clearpage",
        *[rf"\input{{{slug(d.id)}}}" for d in derivations],
        r"\end{document}",
    ]
    return "\n".join(body) + "\n"
