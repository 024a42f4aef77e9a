"""The one text-table formatter of the applications (demo, evaluate, sweep, bench).

Every table the command line prints goes through `format_table`, so they share a look
(a header, a rule, left-aligned text and right-aligned numbers) and a legend under the
table that says what the less obvious columns mean: which speed-up is the FLOP model's
and which one was measured.
"""

from __future__ import annotations

from collections.abc import Sequence


def format_table(
  header: Sequence[str],
  rows: Sequence[Sequence[str]],
  *,
  markdown: bool = False,
  right: Sequence[bool] | None = None,
  legend: Sequence[str] = (),
) -> str:
  """A fixed-width text table (or a Markdown table) of already formatted cells.

  Args:
    header: the column titles.
    rows: one sequence of cell strings per row, as long as `header`.
    markdown: a Markdown pipe table instead of fixed-width text.
    right: per column, True to right-align (numbers); default: all left-aligned.
    legend: lines printed under the table, each as ``  title: meaning`` style text.

  Returns:
    The table, without a trailing newline.

  Raises:
    ValueError: if a row's length differs from the header's.
  """
  header = [str(h) for h in header]
  rows = [[str(c) for c in row] for row in rows]
  for row in rows:
    if len(row) != len(header):
      raise ValueError(f"a row has {len(row)} cells but the header has {len(header)}: {row}")
  right = list(right) if right is not None else [False] * len(header)
  if markdown:
    rule = "|" + "|".join("---:" if r else "---" for r in right) + "|"
    out = ["| " + " | ".join(header) + " |", rule]
    out += ["| " + " | ".join(row) + " |" for row in rows]
  else:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
      return "  ".join(
        c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)
      ).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
  if legend:
    out.append("")
    out += list(legend)
  return "\n".join(out)
