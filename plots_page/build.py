"""Build the offline plots page template that .dvc/config names as plots.html_template.

plots_page/template.src.html with each `<script data-inline="node_modules/...">` replaced by
that file's content -> plots_page/template.html (git-ignored). Run by `make setup` after
`npm ci`; needs only the standard library. Pages that `dvc plots show` writes from it carry
vega, vega-lite and vega-embed themselves, so they render offline wherever they are written
(README: Plots offline).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "plots_page" / "template.src.html"
OUTPUT = ROOT / "plots_page" / "template.html"
INLINE = re.compile(r'<script data-inline="(node_modules/[^"]+)"></script>')
SOURCE_MAP = re.compile(r"\s*//# sourceMappingURL=\S+\s*$")
# dvc-render fills the template with str.replace on its placeholders, and the HTML parser
# ends a script element at its first "</script": inlined code must contain neither.
FORBIDDEN = ("</script", "<!--", "{plot_divs}", "{scripts}", "{refresh_tag}")


def inline_script(rel: str) -> str:
    """One `<script>` element holding the file ``rel`` (relative to the repo root)."""
    path = ROOT / rel
    if not path.is_file():
        raise SystemExit(f"{rel}: not found; run `npm ci` first (`make setup` does both)")
    code = SOURCE_MAP.sub("", path.read_text(encoding="utf-8"))  # no .map next to the page
    for text in FORBIDDEN:
        if text in code.lower():
            raise SystemExit(f"{rel}: contains {text!r}, which cannot be inlined in the page")
    package = ROOT / "node_modules" / Path(rel).parts[1]
    version = json.loads((package / "package.json").read_text(encoding="utf-8"))["version"]
    return f"<script>/* {package.name} {version}: {rel} */\n{code}\n</script>"


def build() -> str:
    template = SOURCE.read_text(encoding="utf-8")
    if not INLINE.search(template):
        raise SystemExit(f"{SOURCE.relative_to(ROOT)}: no <script data-inline=...> to fill")
    return INLINE.sub(lambda m: inline_script(m.group(1)), template)


def main() -> None:
    page = build()
    tmp = OUTPUT.with_name(f".{OUTPUT.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, OUTPUT)  # a half-written template never replaces a working one
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(page.encode()) // 1024} KiB)")


if __name__ == "__main__":
    main()
