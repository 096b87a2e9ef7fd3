"""HTML reports rendered from Jinja2 templates that share one stylesheet.

Every page extends ``templates/base.html.j2``, which inlines ``templates/style.css``; plots are inline
base64 PNGs. So each report is one self-contained file that opens from an artifact store, a mail or
the UI plugin's file route with no server and no internet. Autoescaping is on for every ``.html.j2``
template: data text reaches the page escaped unless a caller wraps it in ``markupsafe.Markup``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jinja2


def render(template_name: str, **context: Any) -> str:
    """``templates/<template_name>`` rendered with ``context``.

    A name the template uses and the context lacks raises ``jinja2.UndefinedError`` instead of
    rendering blank; a None value renders as an empty string, not "None".
    """
    return _environment().get_template(template_name).render(**context)


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("airloom.reports"),
        autoescape=jinja2.select_autoescape(("html.j2",)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=lambda value: "" if value is None else value,
    )
    env.filters.update(num=_num, fixed=_fixed, fmt=_fmt, rounded=rounded)
    return env


def rounded(value: Any, signed: bool = False) -> str:
    """A number for reading: 3 decimals below 1 (scores), else 3 significant digits; "–" for none."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "–" if value is None else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    if isinstance(value, int):
        return f"{value:+,}" if signed else f"{value:,}"
    if abs(value) < 1:
        decimals = 3
    else:
        decimals = max(0, 3 - (int(math.floor(math.log10(abs(value)))) + 1))
    text = f"{value:{'+' if signed else ''},.{decimals}f}"
    return f"{0:.{decimals}f}" if float(text.replace(",", "")) == 0 else text  # no "-0.000"


def _num(value: Any) -> str:
    """A count or measure for reading: ``12,345``, ``0.1235``, ``1,234.5``; "–" for none or NaN."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:,.4g}" if abs(value) < 1 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "–" if value is None else str(value)


def _fixed(value: Any) -> str:
    """A score with four decimals (one from 1000 up), as the evaluation report compares them."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def _fmt(value: Any, spec: str) -> str:
    """``format(value, spec)`` (``"+.1%"``, ``".2%"``…); "–" for none."""
    return "–" if value is None else format(value, spec)
