"""Move function-level `from lora_cli... import ...` statements of non-cli modules to the top import block."""
import ast, re, sys
from pathlib import Path
KEEP = {("lora_cli/train/run.py", "lora_cli.model.load", "masks_from_positions"),  # monkeypatched by a test
        ("lora_cli/train/sweep.py", "lora_cli.train", "run")}  # transformers at import changes how the schema prints
changed = {}
for path in sorted(Path("lora_cli").rglob("*.py")):
    if path.as_posix() == "lora_cli/cli.py":
        continue
    src = path.read_text(); tree = ast.parse(src); lines = src.splitlines(keepends=True)
    moves = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if not (mod or "").startswith("lora_cli"):
                    continue
                names = {a.name for a in node.names}
                if any((path.as_posix(), mod, n) in KEEP for n in names):
                    continue
                moves.append(node)
    if not moves:
        continue
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    existing = {ast.get_source_segment(src, n).strip() for n in top}
    new_top = []
    drop = set()
    for node in moves:
        text = "".join(lines[node.lineno - 1:node.end_lineno])
        stmt = re.sub(r"\s+#.*$", "", " ".join(l.strip() for l in text.splitlines()))
        stmt = stmt.replace("( ", "(").replace(" )", ")")
        if stmt.startswith("from") and "(" in stmt:
            stmt = stmt.replace("(", "").replace(")", "")
        if stmt not in existing and stmt not in new_top:
            new_top.append(stmt)
        drop.update(range(node.lineno - 1, node.end_lineno))
        # a blank line that followed the import block inside the function
        nxt = node.end_lineno
        if nxt < len(lines) and lines[nxt].strip() == "" and (node.lineno - 2 < 0 or lines[node.lineno - 2].strip() != "" or True):
            prev = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
            if not (prev.startswith("from lora_cli") or prev.startswith("import lora_cli")) or True:
                pass
    out = [l for i, l in enumerate(lines) if i not in drop]
    text = "".join(out)
    # tidy: an import block that became empty leaves "\n\n\n" inside a function, or a docstring followed by a blank then code
    text = re.sub(r'(\n[ ]+(?:from|import) [^\n]+\n)\n(?=\n)', r"\1", text)
    anchor = max(top, key=lambda n: n.end_lineno) if top else None
    tl = text.splitlines(keepends=True)
    # recompute the anchor line in the new text: the last top-level lora_cli import or last top import
    idx = None
    for i, l in enumerate(tl):
        if re.match(r"(from|import) ", l) and not l.startswith(" "):
            idx = i
            # follow a parenthesised continuation
            j = i
            if "(" in l and ")" not in l:
                while ")" not in tl[j]:
                    j += 1
                idx = j
        if l.startswith(("def ", "class ", "@")):
            break
    tl[idx + 1:idx + 1] = [s + "\n" for s in new_top]
    path.write_text("".join(tl))
    changed[path.as_posix()] = new_top
for k, v in changed.items():
    print(k); [print("   ", s) for s in v]
