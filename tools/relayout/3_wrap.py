"""Wrap the top-level `from lora_cli... import ...` lines over 120 characters that the hoist made."""
import subprocess
from pathlib import Path
files = subprocess.run(["git", "diff", "--name-only", "--", "lora_cli"], capture_output=True, text=True).stdout.split()
for f in files:
    p = Path(f); lines = p.read_text().splitlines(keepends=True); out = []
    for l in lines:
        if l.startswith("from lora_cli") and len(l.rstrip()) > 120 and "(" not in l:
            head, names = l.rstrip().split(" import ", 1)
            prefix = f"{head} import ("
            cur, rows = prefix, []
            for n in names.split(", "):
                add = n + ", "
                if len(cur) + len(add) > 118:
                    rows.append(cur.rstrip() + "\n"); cur = " " * len(prefix) + add
                else:
                    cur += add
            rows.append(cur.rstrip(", ") + ")\n")
            out.extend(rows)
        else:
            out.append(l)
    p.write_text("".join(out))
