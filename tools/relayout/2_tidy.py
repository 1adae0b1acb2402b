"""After the hoist: merge top-level `from M import ...` of the same module, drop blank lines left at
the start of function bodies, and squeeze triple blank lines inside indented code."""
import ast, re, subprocess, sys
from pathlib import Path
files = subprocess.run(["git", "diff", "--name-only", "--", "lora_cli"], capture_output=True, text=True).stdout.split()
for f in files:
    p = Path(f); src = p.read_text(); tree = ast.parse(src); lines = src.splitlines(keepends=True)
    # 1. merge top-level from-imports of lora_cli modules without aliases-on-module conflicts
    groups, order = {}, []
    for n in tree.body:
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("lora_cli") and n.lineno == n.end_lineno \
                and "#" not in lines[n.lineno - 1]:
            groups.setdefault(n.module, []).append(n); order.append(n)
    drop, replace = set(), {}
    for mod, nodes in groups.items():
        if len(nodes) < 2:
            continue
        names = []
        for n in nodes:
            for a in n.names:
                s = a.name + (f" as {a.asname}" if a.asname else "")
                if s not in names: names.append(s)
        first = nodes[0]
        replace[first.lineno - 1] = f"from {mod} import {', '.join(sorted(names, key=str.lower))}\n"
        drop.update(n.lineno - 1 for n in nodes[1:])
    # 2. blank lines right after a function header
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            i = fn.lineno - 1
            while not re.sub(r"#.*$", "", lines[i]).rstrip().endswith(":"):
                i += 1
            j = i + 1
            while j < len(lines) and lines[j].strip() == "":
                drop.add(j); j += 1
    out = [replace.get(i, l) for i, l in enumerate(lines) if i not in drop]
    text = "".join(out)
    text = re.sub(r"\n\n\n+(?=[ ]+\S)", "\n\n", text)
    ast.parse(text)
    p.write_text(text)
    print("tidied", f)
